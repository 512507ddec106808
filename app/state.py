"""Cached resources and view state shared by the dashboard's pages.

- :func:`get_model` — one :class:`~sparsefinder.model.entmax_model.EntmaxModel` per registered
  model name, shared by every session (``st.cache_resource``). Only names from
  ``data/models.json`` are ever loaded; never a path from the URL or a widget.
- :func:`analyse` / :func:`head_probabilities` — small, picklable per-text
  results (``st.cache_data``) keyed by model name, model version, alpha and a
  hash of the texts.
- View state (model, layer, head, text, sentence) lives in ``st.session_state``;
  model, layer and head are mirrored in ``st.query_params`` so a copied link
  reproduces the view.

Nothing here keeps module-level mutable state: the model is only read after
loading (``EntmaxModel.extract`` is thread-safe), and the cached results are
immutable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import streamlit as st

from sparsefinder.corpora.readers import split_sentences
from sparsefinder.graphs import AttentionGraph
from sparsefinder.model.catalogue import ModelSpec, default_model_name, load_registry
from sparsefinder.model.entmax_model import EntmaxModel, Extraction, load_model

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."
#: Most sentences analysed in one batch (protects the shared server's memory).
MAX_TEXTS = 16
SPLIT_MODES = ("sentences", "lines")
VERSION_PACKAGES = ("sparsefinder", "torch", "transformers", "entmax", "streamlit", "plotly", "numpy", "pandas")

# Session-state keys of the view; URL_KEYS are mirrored in the query string.
MODEL = "model"
LAYER = "layer"
HEAD = "head"
TEXT = "text"
SPLIT = "split"
SENTENCE = "sentence"
SOURCE = "source"
SOURCES = ("type text", "sentence from the active corpus")
CORPUS_SENTENCE = "corpus_sentence"
OVERVIEW = "overview"
RESULT = "result"
METHOD = "method"
PARAMS = "params"
URL_KEYS = (MODEL, LAYER, HEAD, RESULT, METHOD, PARAMS)
_INITIALISED = "_view_initialised"


# -- registry ------------------------------------------------------------------
def registry() -> dict[str, ModelSpec]:
    """The registered models (re-read each run: a small JSON file)."""
    return load_registry()


def default_model() -> str:
    return default_model_name()


def alpha_label(alpha) -> str:
    """Alpha as shown to people: ``1.5``, or ``per-head (L×H)`` for a per-head table."""
    arr = np.asarray(alpha, dtype=float)
    if arr.size == 1:
        return f"{float(arr):g}"
    return f"per-head ({arr.shape[0]}×{arr.shape[1]})" if arr.ndim == 2 else "per-head"


def alpha_key(alpha) -> str:
    """A stable cache-key string for a scalar or per-head alpha."""
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
    parts = []
    for f in sorted(adapter.iterdir()):
        try:
            st_ = f.stat()
        except OSError:
            continue
        parts.append(f"{f.name}:{st_.st_size}:{st_.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# -- model ---------------------------------------------------------------------
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

    if name not in registry():
        return LoadOutcome(None, f"unknown model {name!r}")
    try:
        return LoadOutcome(load_model(name))
    except (AdapterMismatchError, FileNotFoundError, KeyError) as e:
        return LoadOutcome(None, f"{type(e).__name__}: {e}")


def get_model(name: str) -> LoadOutcome:
    """The shared model ``name`` (registered names only)."""
    specs = registry()
    if name not in specs:
        return LoadOutcome(None, f"unknown model {name!r}; registered models: {', '.join(sorted(specs))}")
    return _load(name, model_version(specs[name]))


def require_model(name: str) -> EntmaxModel:
    outcome = get_model(name)
    if outcome.model is None:
        raise RuntimeError(outcome.error)
    return outcome.model


# -- per-text results ----------------------------------------------------------
@dataclass(frozen=True)
class Analysis:
    """What the Explore page shows for a batch of texts; small and picklable.

    ``sparsity[b, l, h]`` is the gold sparsity of sentence ``b``, layer ``l``,
    head ``h``; ``packed[b][l]`` the packed bits of that sentence's ``(H, n, n)``
    gold graph (see :meth:`AttentionGraph.pack`).
    """

    model_name: str
    texts: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]
    sparsity: np.ndarray
    packed: tuple[tuple[np.ndarray, ...], ...]
    truncated: tuple[bool, ...]
    num_layers: int
    num_heads: int
    max_length: int

    def gold_edges(self, b: int, layer: int) -> np.ndarray:
        """``(H, n, n)`` bool gold edges of sentence ``b`` in ``layer``."""
        n = len(self.tokens[b])
        return AttentionGraph.unpack_sentence(self.packed[b][layer], self.num_heads, n).numpy()


def text_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        data = t.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def split_texts(text: str, mode: str = "sentences") -> list[str]:
    """The texts to analyse: one per non-empty line, or per sentence within each line.

    Sentences come from the library's spaCy splitter (the one that splits the
    default corpus), so abbreviations such as "Dr." do not end a sentence.
    """
    if mode not in SPLIT_MODES:
        raise ValueError(f"split mode must be one of {SPLIT_MODES}, got {mode!r}")
    out: list[str] = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        if mode == "lines":
            out.append(line)
        else:
            out.extend(split_sentences(line))
    return out


@st.cache_resource(show_spinner=False, max_entries=2)
def extraction(model_name: str, version: str, alpha: str, texts_hash: str, _texts: tuple[str, ...]) -> Extraction:
    """One model run per text batch, shared by the analysis, the head heatmaps and the predictions.

    Holds dense probabilities of every head, so only the two latest batches
    are kept; callers read it and never modify it (it is shared by sessions).
    """
    return require_model(model_name).extract(list(_texts))


@st.cache_data(show_spinner=False, max_entries=64)
def analyse(model_name: str, version: str, alpha: str, texts_hash: str, _texts: tuple[str, ...]) -> Analysis:
    """Gold sparsity grid, tokens and packed gold graphs of ``_texts`` (one batch).

    Keyed by ``(model_name, version, alpha, texts_hash)``; ``_texts`` is not
    hashed by Streamlit (its hash is ``texts_hash``).
    """
    model = require_model(model_name)
    ex = extraction(model_name, version, alpha, texts_hash, _texts)
    grids = [ex.gold(layer) for layer in range(ex.num_layers)]
    sparsity = np.stack([g.sparsity().numpy() for g in grids], axis=1)  # (B, L, H)
    packed = tuple(tuple(g.pack(b) for g in grids) for b in range(len(_texts)))
    return Analysis(
        model_name=model_name,
        texts=tuple(_texts),
        tokens=tuple(tuple(t) for t in ex.tokens),
        sparsity=sparsity,
        packed=packed,
        truncated=tuple(bool(t) for t in ex.truncated),
        num_layers=ex.num_layers,
        num_heads=ex.num_heads,
        max_length=model.max_length,
    )


@st.cache_data(show_spinner=False, max_entries=256)
def head_probabilities(
    model_name: str,
    version: str,
    alpha: str,
    texts_hash: str,
    sentence: int,
    layer: int,
    head: int,
    _texts: tuple[str, ...],
) -> np.ndarray:
    """``(n, n)`` float32 entmax probabilities of one head for one sentence.

    Runs the same batch as :func:`analyse`, so the zeros here are exactly the
    gold graph's non-edges there; only this head's matrix is kept.
    """
    ex = extraction(model_name, version, alpha, texts_hash, _texts)
    n = int(ex.lengths[sentence])
    return ex.probs[layer][sentence, head, :n, :n].numpy().astype(np.float32, copy=True)


# -- view state ------------------------------------------------------------------
def _as_int(value, default: int = 0) -> int:
    try:
        v = int(str(value))
    except (TypeError, ValueError):
        return default
    return v if v >= 0 else default


def init_view_state() -> None:
    """Fill the session's view from the URL (first run of a session only)."""
    ss = st.session_state
    if ss.get(_INITIALISED):
        return
    specs = registry()
    qp = st.query_params
    model = qp.get(MODEL)
    ss[MODEL] = model if model in specs else default_model()
    ss[LAYER] = _as_int(qp.get(LAYER))
    ss[HEAD] = _as_int(qp.get(HEAD))
    ss[TEXT] = DEFAULT_TEXT
    ss[SPLIT] = SPLIT_MODES[0]
    ss[SENTENCE] = 0
    ss[SOURCE] = SOURCES[0]
    ss[CORPUS_SENTENCE] = 0
    # Checked against what exists when the widgets are drawn (persistent_widget falls back).
    for key in (RESULT, METHOD, PARAMS):
        if qp.get(key):
            ss[key] = str(qp.get(key))
    ss[_INITIALISED] = True


def sync_query_params() -> None:
    """Mirror the view (model, layer, head, result, method, params) into the URL."""
    qp = st.query_params
    for key in URL_KEYS:
        raw = st.session_state.get(key)
        value = "" if raw is None else str(raw)
        if key in (RESULT, METHOD, PARAMS) and value in ("", SHIPPED, NO_METHOD):
            if key in qp:  # the defaults stay out of the URL
                del qp[key]
            continue
        if qp.get(key) != value:
            qp[key] = value


def persistent_widget(widget, view_key: str, *args, options: Sequence | None = None, **kwargs):
    """Render ``widget`` bound to the view value ``st.session_state[view_key]``.

    Streamlit forgets a widget's state on runs where it is not drawn (another
    page); the view value outlives it and seeds the widget when it comes back.
    """
    ss = st.session_state
    wkey = f"_w_{view_key}"
    if options is not None:
        options = list(options)
        if ss.get(view_key) not in options:
            ss[view_key] = options[0]
        if wkey not in ss or ss[wkey] not in options:
            ss[wkey] = ss[view_key]
        value = widget(*args, options=options, key=wkey, **kwargs)
    else:
        if wkey not in ss:
            ss[wkey] = ss[view_key]
        value = widget(*args, key=wkey, **kwargs)
    ss[view_key] = value
    return value


def model_sidebar() -> ModelSpec:
    """Sidebar: the registered-model select and the model's alpha. Returns the spec."""
    specs = registry()
    names = list(specs)
    ss = st.session_state
    if ss.get(MODEL) not in specs:
        ss[MODEL] = default_model() if default_model() in specs else names[0]
    with st.sidebar:
        persistent_widget(
            st.selectbox,
            MODEL,
            "Model",
            options=names,
            format_func=lambda n: f"{n} (default)" if n == default_model() else n,
            help="Only models registered in data/models.json can be chosen.",
        )
        spec = specs[ss[MODEL]]
        st.markdown(f"**α (entmax alpha):** `{alpha_label(spec.alpha)}`")
        if spec.description:
            st.caption(spec.description)
    return spec


def versions() -> dict[str, str]:
    out = {}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# -- shipped artifacts: sweep table, projections, fitted predictors ------------------
# Extra view keys of the Pareto and Compare pages (session only, not in the URL).
GRAPH_TEXT = "graph_text"
RESOLUTION = "pareto_resolution"
CONFIG = "pareto_config"
METHODS = "compare_methods"
RESOLUTIONS = ("overall", "per layer", "per head")


def _file_version(path) -> str:
    """Names, sizes and mtimes of a file or a directory's files (part of cache keys)."""
    from pathlib import Path

    if path is None:
        return "none"
    p = Path(path)
    files = sorted(p.iterdir()) if p.is_dir() else [p] if p.exists() else []
    parts = []
    for f in files:
        try:
            s = f.stat()
        except OSError:
            continue
        parts.append(f"{f.name}:{s.st_size}:{s.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16] if parts else "missing"


# -- active result: the shipped artifacts or a result saved by the Corpus page ----------
SHIPPED = "shipped"


@dataclass(frozen=True)
class ActiveResult:
    """Where the pages take their corpus, projections, fitted predictors and sweep from.

    ``name`` is :data:`SHIPPED` for the model's shipped artifacts (``data/``), or a
    result saved by the Corpus page under ``<runs dir>/<model>/<name>``. A saved
    result without its own projections or fitted predictors falls back to the
    shipped ones (both depend on the model, not on the corpus); its sweep and
    corpus are its own.

    The shipped result may also carry the learned predictors' fitted state
    (``learned_fitted``), fitted on their own projections (``learned_projections``,
    listwise r=8, not the paper's). A method fitted only there runs with both of
    them (:func:`method_artifacts`). Saved results fit every method on their one
    projections set, so they have none.
    """

    name: str
    is_default: bool
    store: Path | None
    projections: Path | None
    fitted: Path | None
    sweep: Path | None
    curves: Path | None = None
    #: More sweep tables shown beside ``sweep`` (the shipped learned predictors, made with
    #: their own projections; see ``learned_sweep`` in data/models.json).
    extra_sweeps: tuple[Path, ...] = ()
    #: The learned predictors' projections and fitted state as declared in data/models.json (they may not
    #: exist yet: the pages then say how to make them).
    learned_projections: Path | None = None
    learned_fitted: Path | None = None

    @property
    def label(self) -> str:
        return "shipped (default corpus)" if self.is_default else f"saved: {self.name}"

    @property
    def key(self) -> str:
        """Cache key of the artifacts (paths and file fingerprints)."""
        paths = (self.projections, self.fitted, self.sweep, *self.extra_sweeps, self.learned_projections,
                 self.learned_fitted)
        parts = [self.name] + [f"{p}:{_file_version(p)}" for p in paths]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _dir_or_none(path) -> Path | None:
    return Path(path) if path is not None and Path(path).is_dir() else None


def shipped_result(model_name: str) -> ActiveResult:
    spec = registry()[model_name]
    sweep, curves, learned = spec.artifact("sweep"), spec.artifact("curves"), spec.artifact("learned_sweep")
    return ActiveResult(
        name=SHIPPED, is_default=True, store=None,
        projections=_dir_or_none(spec.artifact("projections")), fitted=_dir_or_none(spec.artifact("fitted")),
        sweep=sweep if sweep is not None and sweep.is_file() else None,
        curves=curves if curves is not None and curves.is_file() else None,
        extra_sweeps=(learned,) if learned is not None and learned.is_file() else (),
        learned_projections=spec.artifact("learned_projections"), learned_fitted=spec.artifact("learned_fitted"),
    )


def result_choices(model_name: str) -> list[str]:
    """:data:`SHIPPED` then every saved result of ``model_name`` whose extraction is complete."""
    return [SHIPPED] + [r["name"] for r in saved_results(model_name) if r["store"]]


def active_result(model_name: str) -> ActiveResult:
    """The result selected in the sidebar (:data:`RESULT`), resolved to paths that exist."""
    name = st.session_state.get(RESULT, SHIPPED)
    shipped = shipped_result(model_name)
    if name == SHIPPED or name not in result_choices(model_name):
        return shipped
    d = result_dir(model_name, name)
    sweep, curves = d / "sweep.parquet", d / "curves.parquet"
    return ActiveResult(
        name=name, is_default=False, store=d / "store",
        projections=_dir_or_none(d / "projections") or shipped.projections,
        fitted=_dir_or_none(d / "fitted") or shipped.fitted,
        sweep=sweep if sweep.is_file() else None,
        curves=curves if curves.is_file() else None,
    )


@st.cache_data(show_spinner=False, max_entries=8)
def _sweep(paths: tuple[str, ...], versions: tuple[str, ...]):
    """The first table, then the rows of the others whose methods it does not have (``versions`` key the cache)."""
    import pandas as pd

    from sparsefinder.evaluation.sweep import load_sweep

    frame = load_sweep(paths[0])
    extra = [load_sweep(p) for p in paths[1:]]
    if not extra:
        return frame
    known = set(frame["method"])  # a method appears once, from the main table
    out = pd.concat([frame, *(e[~e["method"].isin(known)] for e in extra)], ignore_index=True)
    out.attrs = frame.attrs
    return out


def sweep_table(name: str):
    """The active result's sweep table (a DataFrame, with any extra tables' rows after it), or None."""
    result = active_result(name)
    if result.sweep is None or not result.sweep.is_file():
        return None
    paths = (result.sweep, *(p for p in result.extra_sweeps if p.is_file()))
    return _sweep(tuple(str(p) for p in paths), tuple(_file_version(p) for p in paths))


@st.cache_data(show_spinner=False, max_entries=8)
def _curves(path: str, version: str):
    from sparsefinder.evaluation.approximate import load_curves

    return load_curves(path)


def curves_table(name: str):
    """The active result's sparsity–accuracy curves (``sparsefinder curves``), or None."""
    path = active_result(name).curves
    if path is None or not path.is_file():
        return None
    return _curves(str(path), _file_version(path))


@st.cache_resource(show_spinner=False, max_entries=4)
def _projections(name: str, path: str, version: str, model_version_: str):
    from sparsefinder.training.projections import Projections

    return Projections.load(path, model=require_model(name))


@st.cache_resource(show_spinner=False, max_entries=4)
def _fitted(path: str, version: str):
    from sparsefinder.evaluation.fitted import load_fitted

    return load_fitted(path)


def get_projections(name: str, result: ActiveResult | None = None):
    """The active result's projections (else the shipped ones), or None."""
    path = (result or active_result(name)).projections
    if path is None or not path.is_dir():
        return None
    return _projections(name, str(path), _file_version(path), model_version(registry()[name]))


def get_fitted(name: str, result: ActiveResult | None = None):
    """The active result's fitted predictors ``fitted[method][params][layer]`` (else the shipped ones), or None."""
    path = (result or active_result(name)).fitted
    if path is None or not path.is_dir():
        return None
    return _fitted(str(path), _file_version(path))


def learned_fitted(name: str, result: ActiveResult | None = None) -> tuple[object | None, str | None]:
    """``(fitted, problem)``: the result's learned predictors ``fitted[method][params][layer]``, or None and
    why they are unusable (``problem`` is None too when the result declares none)."""
    from sparsefinder.evaluation.fitted import FittedFileError

    path = (result or active_result(name)).learned_fitted
    if path is None:
        return None, None
    if not path.is_dir():
        return None, (f"the learned predictors' fitted state is missing ({path}); make it with "
                      "`sparsefinder sweep ... --save-fitted` on the listwise projections")
    try:
        return _fitted(str(path), _file_version(path)), None
    except FittedFileError as e:  # exceptions are not cached: a repaired file is picked up on the next run
        return None, f"the learned predictors' fitted state could not be read: {e}"


def learned_projections(name: str, result: ActiveResult | None = None):
    """The projections the learned predictors were fitted on, or None (loading them needs the model)."""
    path = (result or active_result(name)).learned_projections
    if path is None or not path.is_dir():
        return None
    return _projections(name, str(path), _file_version(path), model_version(registry()[name]))


def method_artifacts(name: str, method: str, result: ActiveResult | None = None) -> tuple[object, object]:
    """``(projections, fitted)`` that ``method`` runs with on new text.

    The result's own, except for a method fitted only in the learned predictors' state: its scorer
    was fitted on the learned projections' :math:`q', k'`, so it must be fed those, not the paper's
    (another projection's coordinates would be scored as if they were its own).
    """
    result = result or active_result(name)
    projections, fitted = get_projections(name, result), get_fitted(name, result)
    if fitted is not None and method in fitted:
        return projections, fitted
    l_fitted, _ = learned_fitted(name, result)
    if l_fitted is not None and method in l_fitted:
        return learned_projections(name, result), l_fitted
    return projections, fitted


def unsupported(name: str, method: str, result: ActiveResult | None = None) -> str | None:
    """Why ``method`` cannot be drawn on new text with the result's artifacts (None when it can)."""
    from sparsefinder.predictors import REGISTRY
    from sparsefinder.predictors.methods import unsupported_reason

    result = result or active_result(name)
    reason = unsupported_reason(method, *method_artifacts(name, method, result))
    # Only the learned family: a paper method's missing fit has nothing to do with their file.
    if reason is not None and method in REGISTRY and REGISTRY[method].family == "learned":
        problem = learned_fitted(name, result)[1]
        if problem is not None:
            reason = f"{reason}: {problem}"
    return reason


@st.cache_data(show_spinner=False, max_entries=16)
def _corpus_texts(store: str, version: str) -> tuple[str, ...]:
    from sparsefinder.corpora.store import ExtractionStore

    return tuple(ExtractionStore.open(store).texts())


@st.cache_data(show_spinner=False, max_entries=2)
def _default_texts() -> tuple[str, ...]:
    from sparsefinder.corpora.readers import default_corpus

    return tuple(default_corpus(split="validation").texts())


def corpus_texts(name: str) -> tuple[str, ...]:
    """The active corpus's sentences: the default validation split, or the saved result's store."""
    result = active_result(name)
    if result.store is None:
        return _default_texts()
    return _corpus_texts(str(result.store), _file_version(result.store / "manifest.json"))


@dataclass(frozen=True)
class HeadPrediction:
    """One head's gold and predicted graph on one sentence, and its metrics (small, picklable)."""

    tokens: tuple[str, ...]
    gold: np.ndarray  # (n, n) bool
    pred: np.ndarray  # (n, n) bool
    metrics: dict
    truncated: bool


@st.cache_data(show_spinner=False, max_entries=256)
def head_prediction(
    model_name: str, version: str, alpha: str, text_key: str, layer: int, head: int, method: str, params: str,
    _text: str, artifacts: str = "", _result: ActiveResult | None = None,
) -> HeadPrediction:
    """Predicted vs gold graph of ``method`` ``params`` for one head on ``_text`` (hash ``text_key``).

    ``artifacts`` is the :attr:`ActiveResult.key` of ``_result`` (the projections and
    fitted predictors used); the cache is keyed by it, not by the unhashed ``_result``.
    """
    from sparsefinder.metrics import graph_metrics
    from sparsefinder.predictors.methods import predict_layer

    ex = extraction(model_name, version, alpha, text_key, (_text,))
    projections, fitted = method_artifacts(model_name, method, _result)
    pred = predict_layer(ex, layer, method, params, projections=projections, fitted=fitted)
    gold = ex.gold(layer)
    m = graph_metrics(gold, pred)
    n = int(ex.lengths[0])
    metrics = {k: float(v[0, head]) for k, v in m.items()}
    return HeadPrediction(
        tokens=tuple(ex.tokens[0]),
        gold=gold.edges[0, head, :n, :n].numpy().copy(),
        pred=pred.edges[0, head, :n, :n].cpu().numpy().copy(),
        metrics=metrics,
        truncated=bool(ex.truncated[0]),
    )


@dataclass(frozen=True)
class BatchPrediction:
    """A method's predicted graphs for a batch of texts: per-head metrics and packed edges (picklable).

    ``metrics[name]`` is ``(B, L, H)`` (recall, precision, sparsity, exact);
    ``packed[b][l]`` the packed bits of sentence ``b``'s ``(H, n, n)`` predicted graph.
    """

    metrics: dict
    packed: tuple[tuple[np.ndarray, ...], ...]
    num_heads: int

    def edges(self, b: int, layer: int, n: int) -> np.ndarray:
        return AttentionGraph.unpack_sentence(self.packed[b][layer], self.num_heads, n).numpy()


@st.cache_data(show_spinner=False, max_entries=64)
def batch_prediction(
    model_name: str, version: str, alpha: str, texts_hash: str, method: str, params: str, artifacts: str,
    _texts: tuple[str, ...], _result: ActiveResult | None = None,
) -> BatchPrediction:
    """``method`` ``params`` on every layer of the batch ``_texts``, against the gold graphs of the same run."""
    from sparsefinder.metrics import graph_metrics
    from sparsefinder.predictors.methods import predict_layer

    ex = extraction(model_name, version, alpha, texts_hash, _texts)
    projections, fitted = method_artifacts(model_name, method, _result)
    per_layer, packed = [], []
    for layer in range(ex.num_layers):
        pred = predict_layer(ex, layer, method, params, projections=projections, fitted=fitted)
        per_layer.append({k: v.numpy() for k, v in graph_metrics(ex.gold(layer), pred).items()})
        packed.append([pred.pack(b) for b in range(len(_texts))])
    metrics = {k: np.stack([m[k] for m in per_layer], axis=1) for k in per_layer[0]}
    return BatchPrediction(
        metrics=metrics, packed=tuple(tuple(packed[layer][b] for layer in range(ex.num_layers))
                                      for b in range(len(_texts))), num_heads=ex.num_heads,
    )


# -- method and hyperparameters (sidebar) ------------------------------------------
NO_METHOD = "(gold only)"


def params_options(method: str, frame=None) -> list[str]:
    """The method's configurations: those in the sweep table, else its own grid."""
    from sparsefinder.predictors import REGISTRY
    from sparsefinder.predictors.methods import params_key

    if frame is not None and method in set(frame["method"]):
        return sorted(frame.loc[frame["method"] == method, "params"].unique().tolist())
    return [params_key(p) for p in REGISTRY[method].grid()]


def available_methods(name: str, result: ActiveResult | None = None) -> list[str]:
    """Registered methods the dashboard can run on new text with the active artifacts (the learned
    predictors' included, when their fitted state is there), in registry order."""
    from sparsefinder.predictors import REGISTRY
    from sparsefinder.predictors.methods import predictable_methods

    result = result or active_result(name)
    fitted = get_fitted(name, result)
    # Whether projections exist is enough here; loading them needs the model.
    methods = set(predictable_methods(True if result.projections is not None else None, fitted))
    l_fitted, _ = learned_fitted(name, result)
    if l_fitted is not None:
        has_proj = result.learned_projections is not None and result.learned_projections.is_dir()
        methods |= {m for m in predictable_methods(True if has_proj else None, l_fitted) if m in l_fitted}
    return [m for m in REGISTRY if m in methods]


def method_sidebar(name: str) -> tuple[str | None, str | None]:
    """Sidebar: the active result, the method and its hyperparameters. Returns ``(method, params)``."""
    ss = st.session_state
    with st.sidebar:
        choices = result_choices(name)
        persistent_widget(
            st.selectbox, RESULT, "Results", options=choices,
            format_func=lambda r: "shipped (default corpus)" if r == SHIPPED else f"saved: {r}",
            help="Corpus, projections, fitted predictors and sweep used by the pages: the model's shipped "
                 "artifacts, or a result saved on the Corpus page.",
        )
        result = active_result(name)
        methods = [NO_METHOD, *available_methods(name, result)]
        method = persistent_widget(st.selectbox, METHOD, "Method", options=methods,
                                   help="The predictor whose graph Explore overlays on the gold graph.")
        problem = learned_fitted(name, result)[1]
        if problem is not None:
            st.caption(f"The learned predictors cannot be drawn: {problem}.")
        if method == NO_METHOD:
            return None, None
        options = params_options(method, sweep_table(name))
        if ss.get(PARAMS) not in options:
            ss[PARAMS] = options[0]
        params = persistent_widget(st.selectbox, PARAMS, "Hyperparameters", options=options)
    return method, params


def figure_html(fig) -> bytes:
    """A standalone HTML file of ``fig`` with plotly.js inlined (opens offline)."""
    return fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8")


def download_figure(fig, file_stem: str, key: str) -> None:
    """A download button for ``fig`` as standalone, offline HTML.

    The file (plotly.js inlined, ~5 MB) is made only when the button is clicked:
    built eagerly it would be sent to the browser on every rerun of the page.
    """
    st.download_button(
        "Download the figure (HTML)", lambda: figure_html(fig), file_name=f"{file_stem}.html", mime="text/html",
        icon=":material/download:", key=key, on_click="ignore",
    )


def graph_text_input(label: str = "Sentence") -> str:
    """The sentence the Pareto and Compare pages predict on (shared by both)."""
    ss = st.session_state
    if GRAPH_TEXT not in ss:
        ss[GRAPH_TEXT] = DEFAULT_TEXT
    return persistent_widget(st.text_input, GRAPH_TEXT, label, max_chars=4000).strip()



# -- Corpus page: uploads, result names and saved results on disk ---------------------
#: Most sentences of an uploaded corpus used for extraction (the shared server's time and disk).
MAX_EXTRACT_SENTENCES = 2000
RUNS_ENV = "SPARSEFINDER_RUNS"
_RESULT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def runs_dir() -> Path:
    """Where the Corpus page saves results: ``$SPARSEFINDER_RUNS``, default ``runs/ui`` under the repository."""
    env = os.environ.get(RUNS_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "runs" / "ui"


def result_name_error(name: str) -> str | None:
    """Why ``name`` cannot name a saved result (None when it can): letters, digits, ``-`` and ``_`` only."""
    if not name:
        return "Enter a result name."
    if not _RESULT_NAME.fullmatch(name):
        return f"Invalid result name {name!r}: use 1 to 64 letters, digits, '-' and '_' only."
    return None


def result_dir(model_name: str, name: str) -> Path:
    """``<runs dir>/<model>/<name>``; refuses an invalid name (never a path from the user)."""
    err = result_name_error(name)
    if err is not None:
        raise ValueError(err)
    if model_name not in registry():
        raise ValueError(f"unknown model {model_name!r}")
    return runs_dir() / model_name / name


@dataclass(frozen=True)
class ParsedUpload:
    """An uploaded corpus read by :func:`sparsefinder.corpora.readers.read_corpus`, or why it could not be read."""

    corpus: object | None
    stats: dict | None
    error: str | None = None


def parse_upload(data: bytes, filename: str, column: str = "text") -> ParsedUpload:
    """Read an uploaded file (txt, csv, tsv, conllu) of at most ``MAX_BYTES``; errors are returned, not raised."""
    from sparsefinder.corpora.readers import MAX_BYTES, CorpusError, corpus_stats, read_corpus, read_csv

    if len(data) > MAX_BYTES:
        return ParsedUpload(None, None, f"{filename}: {len(data):,} bytes, more than the limit of {MAX_BYTES:,}")
    try:
        if Path(filename).suffix.lower() in (".csv", ".tsv", ".tab"):
            corpus = read_csv(data, column=column or "text", name=filename)
        else:
            corpus = read_corpus(data, filename)
    except CorpusError as e:
        return ParsedUpload(None, None, str(e))
    if not len(corpus):
        return ParsedUpload(None, None, f"{filename}: no sentences found")
    return ParsedUpload(corpus, corpus_stats(corpus))


def saved_results(model_name: str) -> list[dict]:
    """The results saved for ``model_name``: name, and what each holds (store sentences, projections, sweep)."""
    base = runs_dir() / model_name
    if not base.is_dir():
        return []
    out = []
    for d in sorted(p for p in base.iterdir() if p.is_dir() and _RESULT_NAME.fullmatch(p.name)):
        manifest = d / "store" / "manifest.json"
        info: dict = {"name": d.name, "store": False, "sentences": None, "corpus": None,
                      "projections": (d / "projections").is_dir(), "fitted": (d / "fitted").is_dir(),
                      "sweep": (d / "sweep.parquet").is_file()}
        if manifest.is_file():
            try:
                m = json.loads(manifest.read_text(encoding="utf-8"))
                info.update(store=bool(m.get("complete")), sentences=m.get("num_sentences"), corpus=m.get("corpus"))
            except (OSError, ValueError):
                pass
        out.append(info)
    return out
