"""What the dashboard's sessions share: loaded models, per-text results and artifacts, in bounded caches.

Every function is a cached call of one library function; the decisions (which
artifacts go with a result and a method, what a text's gold graph is) are the
library's (:mod:`sparsefinder.results`, :mod:`sparsefinder.evaluation.analysis`).

- :func:`get_model`: one :class:`~sparsefinder.model.entmax_model.EntmaxModel` per
  registered model name (``st.cache_resource``). Only names from ``data/models.json``
  are ever loaded; never a path from the URL or a widget.
- :func:`analyse`, :func:`head_probabilities`, :func:`batch_prediction`: small,
  picklable per-text results (``st.cache_data``) keyed by model name, model version,
  alpha and a hash of the texts.
- :func:`artifacts`: a result's projections and fitted predictors, loaded once per
  file version.

Nothing here keeps module-level mutable state: a model is only read after loading
(``EntmaxModel.extract`` is thread-safe), and the cached values are never modified.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from sparsefinder import results as rs
from sparsefinder.evaluation import analysis as an
from sparsefinder.model.catalogue import ModelSpec, load_registry
from sparsefinder.model.entmax_model import EntmaxModel, Extraction, load_model


# -- model -----------------------------------------------------------------------------
def alpha_key(alpha) -> str:
    """A stable cache-key string for a scalar or per-head alpha (None: the model's own, fixed by its files)."""
    if alpha is None:
        return "own"
    arr = np.asarray(alpha, dtype=float)
    if arr.size == 1:
        return repr(float(arr))
    return hashlib.sha256(arr.tobytes() + repr(arr.shape).encode()).hexdigest()[:16]


def model_version(spec: ModelSpec) -> str:
    """Fingerprint of a model's adapter files (names, sizes, mtimes).

    Part of every cache key, so a model whose adapter is created or replaced
    while the server runs is loaded again instead of serving a stale result
    or a stale loading error.
    """
    adapter = spec.resolve_adapter()
    if adapter is None:
        return "no-adapter"
    if not adapter.is_dir():
        return "adapter-missing"
    return rs.fingerprint(adapter)


@dataclass(frozen=True)
class LoadOutcome:
    """A loaded model, or why it could not be loaded."""

    model: EntmaxModel | None
    error: str | None = None


@st.cache_resource(show_spinner=False, max_entries=4)
def _load(name: str, version: str) -> LoadOutcome:
    """Load a registered model. Errors that depend only on files on disk are cached
    (keyed by ``version``, which changes when the adapter files change); anything
    else is raised and therefore retried on the next run."""
    from sparsefinder.model.adapter import AdapterMismatchError

    if name not in load_registry():
        return LoadOutcome(None, f"unknown model {name!r}")
    try:
        return LoadOutcome(load_model(name))
    except (AdapterMismatchError, FileNotFoundError, KeyError) as e:
        return LoadOutcome(None, f"{type(e).__name__}: {e}")


def get_model(name: str) -> LoadOutcome:
    """The shared model ``name`` (registered names only)."""
    specs = load_registry()
    if name not in specs:
        return LoadOutcome(None, f"unknown model {name!r}; registered models: {', '.join(sorted(specs))}")
    return _load(name, model_version(specs[name]))


def require_model(name: str) -> EntmaxModel:
    outcome = get_model(name)
    if outcome.model is None:
        raise RuntimeError(outcome.error)
    return outcome.model


@st.cache_resource(show_spinner=False, max_entries=2)
def _load_at(name: str, version: str, alpha: float) -> LoadOutcome:
    """A second instance of a registered model at another alpha (the Models page): alpha lives on the
    attention modules, so changing it on the shared instance would change every session's results."""
    try:
        return LoadOutcome(load_model(name, alpha=alpha))
    except (FileNotFoundError, KeyError, ValueError) as e:
        return LoadOutcome(None, f"{type(e).__name__}: {e}")


def model_at(name: str, alpha: float | None) -> LoadOutcome:
    """Model ``name`` at ``alpha`` (None or its catalogue alpha: the shared instance)."""
    specs = load_registry()
    if name not in specs:
        return LoadOutcome(None, f"unknown model {name!r}")
    if alpha is None or alpha_key(alpha) == alpha_key(specs[name].alpha):
        return get_model(name)
    return _load_at(name, model_version(specs[name]), float(alpha))


@st.cache_resource(show_spinner=False, max_entries=4)  # both sides of a comparison, for two sessions
def extraction_at(model_name: str, version: str, alpha: float | None, texts_hash: str,
                  _texts: tuple[str, ...]) -> Extraction:
    outcome = model_at(model_name, alpha)
    if outcome.model is None:
        raise RuntimeError(outcome.error)
    return outcome.model.extract(list(_texts))


@st.cache_data(show_spinner=False, max_entries=32)
def model_comparison(a: tuple[str, str, float | None], b: tuple[str, str, float | None], texts_hash: str,
                     _texts: tuple[str, ...]):
    """Per-head gold sparsity of both sides and the Jaccard overlap of their gold graphs (one frame)."""
    from sparsefinder.evaluation.compare_models import compare_extractions

    return compare_extractions(extraction_at(*a, texts_hash, _texts), extraction_at(*b, texts_hash, _texts))


# -- per-text results ------------------------------------------------------------------------
def extraction(model_name: str, version: str, alpha: str, texts_hash: str, _texts: tuple[str, ...],
               full: bool = False) -> Extraction:
    """One model run per text batch, shared by the analysis, the head heatmaps and the predictions.

    Holds dense probabilities of every head (above
    :data:`~sparsefinder.evaluation.analysis.LONG_INPUT_TOKENS` tokens, gold bits and block summaries
    instead: :func:`~sparsefinder.evaluation.analysis.extract_for_view`), so only the two latest batches
    are kept; callers read it and never modify it (it is shared by sessions). ``full``: keep the
    probabilities at any length (a method's prediction and its mass recall need them); a short batch has
    them either way and is one cache entry for both.
    """
    bits = not full and an.is_long_input(require_model(model_name), _texts)
    return _extraction(model_name, version, alpha, texts_hash, _texts, bits)


@st.cache_resource(show_spinner=False, max_entries=2)
def _extraction(model_name: str, version: str, alpha: str, texts_hash: str, _texts: tuple[str, ...],
                bits: bool) -> Extraction:
    return an.extract_for_view(require_model(model_name), _texts, bits=bits)


def analyse(model_name: str, version: str, alpha: str, texts_hash: str, _texts: tuple[str, ...]) -> an.Analysis:
    """:func:`~sparsefinder.evaluation.analysis.analyse` of ``_texts``; ``_texts`` is not hashed by
    Streamlit (its hash is ``texts_hash``).

    An analysis holds the packed gold graphs (``H n² / 8`` bytes a layer: 256 MiB for 4 layers of 8 heads
    at 8,192 tokens), so a long text's (a gold-bits extraction) goes to a cache of two entries, not 64.
    """
    long = an.is_long_input(require_model(model_name), _texts)  # tokenizing only: no model run on a cache hit
    return (_analyse_long if long else _analyse)(model_name, version, alpha, texts_hash, _texts)


@st.cache_data(show_spinner=False, max_entries=64)
def _analyse(model_name: str, version: str, alpha: str, texts_hash: str, _texts: tuple[str, ...]) -> an.Analysis:
    return an.analyse(extraction(model_name, version, alpha, texts_hash, _texts), _texts)


@st.cache_data(show_spinner=False, max_entries=2)
def _analyse_long(model_name: str, version: str, alpha: str, texts_hash: str,
                  _texts: tuple[str, ...]) -> an.Analysis:
    return an.analyse(extraction(model_name, version, alpha, texts_hash, _texts), _texts)


@st.cache_data(show_spinner=False, max_entries=256)
def head_probabilities(model_name: str, version: str, alpha: str, texts_hash: str, sentence: int, layer: int,
                       head: int, _texts: tuple[str, ...]) -> np.ndarray:
    """One head's ``(n, n)`` probabilities, from the same run as :func:`analyse` (its zeros are the
    gold graph's non-edges there); only this head's matrix is kept."""
    ex = extraction(model_name, version, alpha, texts_hash, _texts)
    return an.head_probabilities(ex, sentence, layer, head)


@st.cache_data(show_spinner=False, max_entries=256)
def head_view(model_name: str, version: str, alpha: str, texts_hash: str, sentence: int, layer: int, head: int,
              _texts: tuple[str, ...]) -> an.HeadView:
    """One head as it is drawn (:func:`~sparsefinder.evaluation.analysis.head_view`): every pair of a short
    text, at most 96 × 96 blocks of a long one, so an entry is small whatever the length."""
    return an.head_view(extraction(model_name, version, alpha, texts_hash, _texts), sentence, layer, head)


def allowed_pairs(model_name: str, version: str, alpha: str, texts_hash: str, sentence: int, layer: int,
                  _texts: tuple[str, ...]):
    """The pairs the layer's mask allows for one sentence (cheap: read off the cached extraction)."""
    return an.allowed_pairs(extraction(model_name, version, alpha, texts_hash, _texts), sentence, layer)


@st.cache_data(show_spinner=False, max_entries=256)
def head_prediction(model_name: str, version: str, alpha: str, text_key: str, layer: int, head: int, method: str,
                    params: str, _text: str, artifacts_key: str = "", _result: rs.Result | None = None,
                    ) -> an.HeadPrediction:
    """Predicted vs gold graph of ``method`` ``params`` for one head on ``_text`` (hash ``text_key``);
    the cache is keyed by ``artifacts_key`` (:attr:`Result.key`), not by the unhashed ``_result``."""
    ex = extraction(model_name, version, alpha, text_key, (_text,), full=True)
    projections, fitted = artifacts(model_name, _result).for_method(method)
    return an.predict_head(ex, layer, head, method, params, projections, fitted)


@st.cache_data(show_spinner=False, max_entries=64)
def batch_prediction(model_name: str, version: str, alpha: str, texts_hash: str, method: str, params: str,
                     artifacts_key: str, _texts: tuple[str, ...], _result: rs.Result | None = None,
                     ) -> an.BatchPrediction:
    """``method`` ``params`` on every layer of the batch ``_texts``, against the gold graphs of the same run."""
    ex = extraction(model_name, version, alpha, texts_hash, _texts)
    projections, fitted = artifacts(model_name, _result).for_method(method)
    return an.predict_batch(ex, method, params, projections, fitted)


# -- a result's artifacts and tables ------------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=4)
def _projections(name: str, path: str, version: str, model_version_: str):
    return rs.load_projections(path, require_model(name))


@st.cache_resource(show_spinner=False, max_entries=4)
def _fitted(path: str, version: str):
    return rs.load_fitted(path)  # exceptions are not cached: a repaired file is picked up on the next run


def artifacts(name: str, result: rs.Result | None = None) -> rs.ResultArtifacts:
    """The artifacts of ``result`` (default: the shipped one) read through the shared caches."""
    spec = load_registry()[name]
    loaders = rs.Loaders(
        projections=lambda p: _projections(name, str(p), rs.fingerprint(p), model_version(spec)),
        fitted=lambda p: _fitted(str(p), rs.fingerprint(p)),
    )
    return rs.result_artifacts(result or rs.shipped_result(name), loaders=loaders)


@st.cache_data(show_spinner=False, max_entries=8)
def _sweep(paths: tuple[str, ...], versions: tuple[str, ...]):
    return rs.load_sweeps(paths)


def sweep_table(result: rs.Result):
    """The result's sweep table (its extra tables' methods after it), or None."""
    paths = rs.sweep_paths(result)
    if not paths:
        return None
    return _sweep(tuple(str(p) for p in paths), tuple(rs.fingerprint(p) for p in paths))


@st.cache_data(show_spinner=False, max_entries=8)
def _curves(path: str, version: str):
    from sparsefinder.evaluation.approximate import load_curves

    return load_curves(path)


def curves_table(result: rs.Result):
    """The result's sparsity–accuracy curves (``sparsefinder curves``), or None."""
    path = result.curves
    if path is None or not path.is_file():
        return None
    return _curves(str(path), rs.fingerprint(path))


@st.cache_data(show_spinner=False, max_entries=16)
def _texts(store: str | None, version: str) -> tuple[str, ...]:
    return rs.corpus_texts(None if store is None else Path(store))


def corpus_texts(result: rs.Result) -> tuple[str, ...]:
    """The result's corpus sentences: the default validation split, or the saved result's store."""
    if result.store is None:
        return _texts(None, "default")
    return _texts(str(result.store), rs.fingerprint(result.store / "manifest.json"))


@st.cache_data(show_spinner=False, max_entries=2)
def _study_report(name: str, result_name: str, store: str | None, versions: tuple[str, ...]) -> bytes:
    from sparsefinder.report import study_report

    return study_report(model=name, result=result_name, store=store).encode("utf-8")


def study_report(name: str, result: rs.Result) -> bytes:
    """The study report (:func:`sparsefinder.report.study_report`) of ``result``, with its store when saved;
    made once per version of its files (~5 MB, a few seconds)."""
    from sparsefinder.report import interpret_dir

    store = None if result.store is None else str(result.store)
    versions = (result.key, rs.fingerprint(result.curves), rs.fingerprint(interpret_dir(name, result)),
                rs.fingerprint(None if result.store is None else result.store / "manifest.json"))
    return _study_report(name, result.name, store, versions)
