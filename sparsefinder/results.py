"""Which artifacts go together: a model, a result (shipped or saved), and a method.

A *result* is what the pages, the CLI and a notebook read for one registered
model: a corpus (an extraction store, or the default validation split), the
projections, the fitted predictors, the sweep table and the sparsity–accuracy
curves. Two kinds exist:

- the **shipped** result, declared in ``data/models.json`` (``artifacts``), which
  may also carry the learned predictors' own projections and fitted state
  (``learned_projections`` / ``learned_fitted``, listwise r = 8, not the paper's);
- a **saved** result, made by the Corpus page (or :func:`build_result`) under
  ``<runs>/<model>/<name>/{store,projections,fitted,sweep.parquet,curves.parquet}``.
  A saved result without projections or fitted predictors falls back to the
  shipped ones: both depend on the model, not on the corpus.

The one question everything else asks, "what does ``method`` run with here, and
if it cannot run, why?", is :meth:`ResultArtifacts.for_method` and
:meth:`ResultArtifacts.unsupported`: a method fitted only in the learned state was
fitted on the learned projections' :math:`q', k'`, so it must be fed those.

Loading is injected (:class:`Loaders`): the app passes cached loaders, the CLI and
notebooks the plain ones (:meth:`Loaders.direct`). Nothing here keeps state
between calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparsefinder.model.catalogue import load_registry

if TYPE_CHECKING:
    import pandas as pd

    from sparsefinder.model.entmax_model import EntmaxModel

SHIPPED = "shipped"
RUNS_ENV = "SPARSEFINDER_RUNS"
_RESULT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def fingerprint(path: str | Path | None) -> str:
    """Names, sizes and mtimes of a file or of a directory's files, hashed (part of cache keys).

    A file replaced while a server runs changes its fingerprint, so a cache keyed
    by it loads the new file instead of serving the old one.
    """
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


# -- where results live ------------------------------------------------------------
def default_runs_dir() -> Path:
    """Where saved results go: ``$SPARSEFINDER_RUNS``; else ``runs/ui`` in the checkout the package runs
    from, or under the working directory for an installed wheel (never inside site-packages)."""
    env = os.environ.get(RUNS_ENV)
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent
    base = checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()
    return base / "runs" / "ui"


def result_name_error(name: str) -> str | None:
    """Why ``name`` cannot name a saved result (None when it can): letters, digits, ``-`` and ``_`` only."""
    if not name:
        return "Enter a result name."
    if not _RESULT_NAME.fullmatch(name):
        return f"Invalid result name {name!r}: use 1 to 64 letters, digits, '-' and '_' only."
    return None


def result_dir(model_name: str, name: str, runs: Path | None = None) -> Path:
    """``<runs>/<model>/<name>``; refuses an invalid name or an unregistered model (never a typed path)."""
    err = result_name_error(name)
    if err is not None:
        raise ValueError(err)
    if model_name not in load_registry():
        raise ValueError(f"unknown model {model_name!r}")
    return (runs or default_runs_dir()) / model_name / name


def saved_results(model_name: str, runs: Path | None = None) -> list[dict]:
    """The results saved for ``model_name``: name, and what each holds (store sentences, projections, sweep)."""
    base = (runs or default_runs_dir()) / model_name
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
                pass  # a half-written or foreign manifest: listed, but not usable as a result
        out.append(info)
    return out


def result_choices(model_name: str, runs: Path | None = None) -> list[str]:
    """:data:`SHIPPED`, then every saved result of ``model_name`` whose extraction is complete."""
    return [SHIPPED] + [r["name"] for r in saved_results(model_name, runs) if r["store"]]


# -- a result: paths that exist --------------------------------------------------------
@dataclass(frozen=True)
class Result:
    """The artifacts of one result, as paths that exist (None where there is none).

    ``name`` is :data:`SHIPPED` or a saved result's name. ``store`` is None for the
    shipped result (its corpus is the default validation split). ``extra_sweeps`` are
    tables shown beside ``sweep`` (the shipped learned predictors', made with their
    own projections). ``learned_projections`` / ``learned_fitted`` are as declared in
    ``data/models.json``: they may not exist yet, and :meth:`ResultArtifacts.learned`
    then says how to make them.
    """

    name: str
    is_default: bool
    store: Path | None
    projections: Path | None
    fitted: Path | None
    sweep: Path | None
    curves: Path | None = None
    extra_sweeps: tuple[Path, ...] = ()
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
        parts = [self.name] + [f"{p}:{fingerprint(p)}" for p in paths]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _dir(path: Path | None) -> Path | None:
    return path if path is not None and path.is_dir() else None


def _file(path: Path | None) -> Path | None:
    return path if path is not None and path.is_file() else None


def shipped_result(model_name: str) -> Result:
    """The artifacts ``data/models.json`` declares for ``model_name``."""
    spec = load_registry()[model_name]
    # Sweeps shipped beside the paper's, drawn with it on the Pareto page: the learned predictors', pages'.
    extra = tuple(f for f in (_file(spec.artifact(kind)) for kind in ("learned_sweep", "pages_sweep")) if f)
    return Result(
        name=SHIPPED, is_default=True, store=None,
        projections=_dir(spec.artifact("projections")), fitted=_dir(spec.artifact("fitted")),
        sweep=_file(spec.artifact("sweep")), curves=_file(spec.artifact("curves")),
        extra_sweeps=extra,
        learned_projections=spec.artifact("learned_projections"), learned_fitted=spec.artifact("learned_fitted"),
    )


def resolve_result(model_name: str, name: str = SHIPPED, runs: Path | None = None) -> Result:
    """The result ``name`` of ``model_name``; the shipped one when ``name`` is not a complete saved result."""
    shipped = shipped_result(model_name)
    if name == SHIPPED or name not in result_choices(model_name, runs):
        return shipped
    d = result_dir(model_name, name, runs)
    return Result(
        name=name, is_default=False, store=d / "store",
        projections=_dir(d / "projections") or shipped.projections,
        fitted=_dir(d / "fitted") or shipped.fitted,
        sweep=_file(d / "sweep.parquet"), curves=_file(d / "curves.parquet"),
    )


def override_result(result: Result, projections: str | Path | None = None,
                    fitted: str | Path | None = None) -> Result:
    """``result`` with projections and/or fitted predictors given explicitly (the CLI's ``--projections``).

    Given artifacts replace the learned pairing too: what the user names is what runs.
    """
    out = result
    for kind, path in (("projections", projections), ("fitted", fitted)):
        if path is None:
            continue
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{kind} directory not found: {path}")
        out = replace(out, **{kind: Path(path)}, learned_projections=None, learned_fitted=None)
    return out


# -- loaded artifacts and the method question ------------------------------------------------
def load_projections(path: str | Path, model: EntmaxModel | None = None) -> Any:
    """A projections folder, checked against ``model`` when it is given."""
    from sparsefinder.training.projections import Projections

    return Projections.load(path, model=model)


def load_fitted(path: str | Path) -> Mapping:
    """A fitted-predictors folder: ``fitted[method][params][layer]``."""
    from sparsefinder.evaluation.fitted import load_fitted as load

    return load(path)


@dataclass(frozen=True)
class Loaders:
    """How a result's artifacts are read: ``projections(path)`` and ``fitted(path)``."""

    projections: Callable[[Path], Any]
    fitted: Callable[[Path], Mapping]

    @classmethod
    def direct(cls, model: EntmaxModel | None = None) -> Loaders:
        """Plain loaders (no cache); projections are checked against ``model`` when it is given."""
        return cls(projections=lambda p: load_projections(p, model), fitted=load_fitted)


@dataclass
class ResultArtifacts:
    """A result's projections and fitted predictors, loaded on first use, and what each method runs with."""

    result: Result
    loaders: Loaders

    @cached_property
    def projections(self) -> Any:
        return self.loaders.projections(self.result.projections) if _dir(self.result.projections) else None

    @cached_property
    def fitted(self) -> Mapping | None:
        """``fitted[method][params][layer]``, or None."""
        return self.loaders.fitted(self.result.fitted) if _dir(self.result.fitted) else None

    @cached_property
    def learned(self) -> tuple[Mapping | None, str | None]:
        """``(fitted, problem)``: the learned predictors' own fitted state, or None and why it is unusable
        (``problem`` is None too when the result declares none)."""
        from sparsefinder.evaluation.fitted import FittedFileError

        path = self.result.learned_fitted
        if path is None:
            return None, None
        if not path.is_dir():
            return None, (f"the learned predictors' fitted state is missing ({path}); make it with "
                          "`sparsefinder sweep ... --save-fitted` on the listwise projections")
        try:
            return self.loaders.fitted(path), None
        except FittedFileError as e:
            return None, f"the learned predictors' fitted state could not be read: {e}"

    @cached_property
    def learned_projections(self) -> Any:
        path = self.result.learned_projections
        return self.loaders.projections(path) if _dir(path) else None

    def for_method(self, method: str) -> tuple[Any, Mapping | None]:
        """``(projections, fitted)`` that ``method`` runs with on new text.

        The result's own, except for a method fitted only in the learned predictors' state: its
        scorer was fitted on the learned projections' :math:`q', k'`, and another projection's
        coordinates would be scored as if they were its own.
        """
        fitted = self.fitted
        if fitted is not None and method in fitted:
            return self.projections, fitted
        l_fitted = self.learned[0]
        if l_fitted is not None and method in l_fitted:
            return self.learned_projections, l_fitted
        return self.projections, fitted

    def unsupported(self, method: str) -> str | None:
        """Why ``method`` cannot run on new text with these artifacts (None when it can)."""
        from sparsefinder.predictors.base import REGISTRY
        from sparsefinder.predictors.methods import unsupported_reason

        reason = unsupported_reason(method, *self.for_method(method))
        # Only the learned family: a paper method's missing fit has nothing to do with their file.
        if reason is not None and method in REGISTRY and REGISTRY[method].family == "learned":
            problem = self.learned[1]
            if problem is not None:
                reason = f"{reason}: {problem}"
        return reason

    def available_methods(self) -> list[str]:
        """Registered methods that can run on new text here, in registry order.

        Whether projections *exist* is enough to list a method: loading them needs the model,
        and listing the methods must not.
        """
        from sparsefinder.predictors.base import REGISTRY
        from sparsefinder.predictors.methods import predictable_methods

        r = self.result
        methods = set(predictable_methods(True if _dir(r.projections) else None, self.fitted))
        l_fitted = self.learned[0]
        if l_fitted is not None:
            has = True if _dir(r.learned_projections) else None
            methods |= {m for m in predictable_methods(has, l_fitted) if m in l_fitted}
        return [m for m in REGISTRY if m in methods]


def result_artifacts(result: Result, model: EntmaxModel | None = None, loaders: Loaders | None = None,
                     ) -> ResultArtifacts:
    """The artifacts of ``result``, read by ``loaders`` (default: :meth:`Loaders.direct` for ``model``)."""
    return ResultArtifacts(result, loaders or Loaders.direct(model))


# -- tables and texts of a result ---------------------------------------------------------
def merge_sweeps(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The first table, then the rows of the others whose methods it does not have.

    A method appears once, from the first table that has it (the shipped learned
    sweep adds methods; it never overrides the paper's rows).
    """
    import pandas as pd

    frame, extra = frames[0], frames[1:]
    if not extra:
        return frame
    known = set(frame["method"])
    out = pd.concat([frame, *(e[~e["method"].isin(known)] for e in extra)], ignore_index=True)
    out.attrs = frame.attrs
    return out


def sweep_paths(result: Result) -> tuple[Path, ...]:
    """The sweep tables of ``result`` that exist, main table first (empty when it has none)."""
    if _file(result.sweep) is None:
        return ()
    return (result.sweep, *(p for p in result.extra_sweeps if p.is_file()))


def load_sweeps(paths: tuple[str | Path, ...]) -> pd.DataFrame:
    """The tables at ``paths`` merged by :func:`merge_sweeps`."""
    from sparsefinder.evaluation.sweep.table import load_sweep

    return merge_sweeps([load_sweep(p) for p in paths])


def load_result_sweep(result: Result) -> pd.DataFrame | None:
    """The result's sweep table with its extra tables' methods after it, or None."""
    paths = sweep_paths(result)
    return load_sweeps(paths) if paths else None


def corpus_texts(store: Path | None) -> tuple[str, ...]:
    """The sentences of a result's corpus: its store's (``Result.store``), or the default validation split's."""
    if store is None:
        from sparsefinder.corpora.readers import default_corpus

        return tuple(default_corpus(split="validation").texts())
    from sparsefinder.corpora.store import ExtractionStore

    return tuple(ExtractionStore.open(store).texts())


def _params_order(params: str) -> tuple:
    """Sort key of a canonical params key: its values compared as numbers (``window`` 1, 3, 11, not 1, 11, 3)."""
    try:
        point = json.loads(params)
    except ValueError:
        return (1, params)
    if not isinstance(point, dict):
        return (1, params)
    # Numbers (and bools) before other values of the same hyperparameter; each kind compared within itself.
    return (0, tuple((k, (0, float(v), "") if isinstance(v, int | float) else (1, 0.0, json.dumps(v)))
                     for k, v in sorted(point.items())))


def params_options(method: str, frame: pd.DataFrame | None = None) -> list[str]:
    """The method's configurations as canonical keys, in numeric order: those in the sweep table, else its grid."""
    from sparsefinder.predictors.base import REGISTRY
    from sparsefinder.predictors.methods import params_key

    if frame is not None and method in set(frame["method"]):
        keys = frame.loc[frame["method"] == method, "params"].unique().tolist()
    else:
        keys = [params_key(p) for p in REGISTRY[method].grid()]
    return sorted(set(keys), key=_params_order)


def default_params(method: str, options: list[str]) -> str:
    """The configuration a method starts at: its constructor's defaults for the grid's hyperparameters when
    that point is among ``options`` (``window`` 3, not the empty ``window`` 0), else the first option."""
    import inspect

    from sparsefinder.predictors.base import REGISTRY
    from sparsefinder.predictors.methods import params_key

    if not options:
        raise ValueError(f"{method} has no configurations")
    cls = REGISTRY.get(method)
    if cls is not None:
        sig = inspect.signature(cls.__init__)
        names = [n for n in cls.param_grid if n in sig.parameters]
        key = params_key({n: sig.parameters[n].default for n in names})
        if key in options:
            return key
    return options[0]


# -- making a saved result: extract -> train -> fit -> sweep ---------------------------------
#: Most training points per head when a saved result's predictors are fitted (the server's time).
SWEEP_MAX_POINTS = 5000


RAY_ADDRESS_ENV = "SPARSEFINDER_RAY_ADDRESS"
RAY_WORKERS_ENV = "SPARSEFINDER_RAY_WORKERS"


def ray_engine() -> tuple[str, int] | None:
    """``(address, workers)`` when the app is pointed at a Ray cluster (``$SPARSEFINDER_RAY_ADDRESS``:
    ``auto``, ``ray://host:10001``, or ``local`` for a Ray on this machine), else None."""
    address = os.environ.get(RAY_ADDRESS_ENV, "").strip()
    if not address:
        return None
    try:
        workers = int(os.environ.get(RAY_WORKERS_ENV, "1"))
    except ValueError:
        raise ValueError(f"{RAY_WORKERS_ENV} must be a whole number, got {os.environ[RAY_WORKERS_ENV]!r}") from None
    if workers < 1:
        raise ValueError(f"{RAY_WORKERS_ENV} must be >= 1, got {workers}")
    return address, workers


def extract_result(model: EntmaxModel, texts: list[str], out: Path, corpus_name: str = "",
                   callback: Callable[[int, int | None], None] | None = None) -> Path:
    """Extract ``texts`` into ``out/store``, replacing the whole result.

    A new store replaces the projections, fitted predictors and sweep too: those of
    an old store no longer describe it. When :func:`ray_engine` names a cluster, the
    catalogued model runs there (:func:`~sparsefinder.distributed.ray_extract.extract_corpus_ray`,
    the same store), ``callback`` counting the sentences of the shards done.
    """
    import shutil

    from sparsefinder.corpora.extract import extract_corpus

    if out.exists():
        shutil.rmtree(out)
    split = "validation" if "validation" in str(corpus_name) else ""
    engine = ray_engine()
    if engine is not None:
        from sparsefinder.distributed.ray_extract import extract_corpus_ray

        address, workers = engine
        extract_corpus_ray(model.name, texts, out / "store", alpha=model.alpha, device="auto",
                           batch_size=32, workers=workers, address=None if address == "local" else address,
                           corpus_name=str(corpus_name), split=split, overwrite=True, progress=False,
                           callback=callback)
        return out / "store"
    extract_corpus(model, texts, out / "store", batch_size=32, progress=False, corpus_name=str(corpus_name),
                   split=split, overwrite=True, callback=callback)
    return out / "store"


def train_result_projections(out: Path, log: Callable[[str], None] | None = None, seed: int = 0) -> Path:
    """Train projections on ``out/store`` (a seeded 90/10 train/validation split) into ``out/projections``."""
    import numpy as np

    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.training.projections import projection_manifest, train_projections

    store = ExtractionStore.open(out / "store")
    perm = np.random.default_rng(seed).permutation(len(store))
    cut = max(1, len(store) // 10)
    val, train = sorted(perm[:cut].tolist()), sorted(perm[cut:].tolist()) or sorted(perm.tolist())
    proj, history = train_projections(store, train_indices=train, val_indices=val, progress=False, log=log)
    proj.save(out / "projections", projection_manifest(store, history["config"], history))
    return out / "projections"


def sweep_result(out: Path, log: Callable[[str], None] | None = None,
                 max_points: int = SWEEP_MAX_POINTS) -> pd.DataFrame:
    """Fit every default method on ``out/store`` (with ``out/projections`` when there are some), save the
    fitted state to ``out/fitted`` and the sweep to ``out/sweep.parquet``; returns the sweep table."""
    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.evaluation.fitted import save_fitted
    from sparsefinder.evaluation.sweep.fit import fit_predictors
    from sparsefinder.evaluation.sweep.run import run_sweep
    from sparsefinder.evaluation.sweep.table import save_sweep
    from sparsefinder.predictors.learned.budgets import TokenContext
    from sparsefinder.training.projections import Projections

    say = log or (lambda _msg: None)
    store = ExtractionStore.open(out / "store")
    projections = Projections.load(out / "projections", store=store) if (out / "projections").is_dir() else None
    say("Projections: " + ("the saved ones." if projections is not None else
                           "none (methods that need them are skipped)."))
    say(f"Fitting the learned predictors on this store (at most {max_points:,} points per head)…")
    fitted = fit_predictors(store, projections, max_points=max_points, progress=False)
    # Saved beside the sweep, so pages that use this result predict with its own centroids.
    save_fitted(fitted, out / "fitted", info={"store": str(out / "store"), "max_points": max_points})
    say("Scoring every configuration…")
    frame = run_sweep(store, projections, methods=None, fitted=fitted, progress=False, context=TokenContext())
    save_sweep(frame, out / "sweep.parquet")
    return frame
