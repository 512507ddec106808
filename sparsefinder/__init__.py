"""Sparsefinder: gold entmax attention graphs, their predictors and metrics.

The public API, one import away and loaded lazily (``import sparsefinder`` is cheap: torch and
transformers load on first use of a name that needs them)::

    import sparsefinder as sf

    model = sf.load_model("minilm-entmax15")             # a catalogue name or a local directory
    ex = model.extract(["The quick brown fox jumps over the lazy dog."])
    gold = ex.gold(layer=2)                               # AttentionGraph of every head
    pred = sf.get_predictor("window", window=3).predict(ex.queries[2], ex.keys[2], ex.lengths)
    sf.graph_metrics(gold, pred)                          # recall, precision, sparsity, ...

The packages show the stages, each importing only from the floors below it:
``graphs``/``metrics``/``kernels``/``artifacts`` (primitives) → ``model``/``corpora`` (data) →
``predictors``/``training`` (learning) → ``evaluation``/``plots`` → ``results``/``figures`` → ``cli`` and the app.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it. The single source of the top-level API.
_EXPORTS: dict[str, str] = {
    # primitives
    "AttentionGraph": "sparsefinder.graphs",
    "valid_pair_mask": "sparsefinder.graphs",
    "graph_metrics": "sparsefinder.metrics",
    "metrics_frame": "sparsefinder.metrics",
    "aggregate": "sparsefinder.metrics",
    "entmax": "sparsefinder.kernels.entmax",
    # data
    "load_model": "sparsefinder.model.entmax_model",
    "EntmaxModel": "sparsefinder.model.entmax_model",
    "Extraction": "sparsefinder.model.entmax_model",
    "load_catalogue": "sparsefinder.model.catalogue",
    "read_corpus": "sparsefinder.corpora.readers",
    "extract_corpus": "sparsefinder.corpora.extract",
    "ExtractionStore": "sparsefinder.corpora.store",
    # learning
    "Predictor": "sparsefinder.predictors",
    "REGISTRY": "sparsefinder.predictors",
    "get_predictor": "sparsefinder.predictors",
    "list_predictors": "sparsefinder.predictors",
    "register": "sparsefinder.predictors",
    "Projections": "sparsefinder.training.projections",
    # evaluation
    "fit_predictors": "sparsefinder.evaluation.sweep",
    "run_sweep": "sparsefinder.evaluation.sweep",
    "load_sweep": "sparsefinder.evaluation.sweep",
    "save_sweep": "sparsefinder.evaluation.sweep",
    "pareto_front": "sparsefinder.evaluation.pareto",
    "best_recall_table": "sparsefinder.evaluation.pareto",
    "best_recall_at": "sparsefinder.evaluation.pareto",
    "sparsity_accuracy_curve": "sparsefinder.evaluation.approximate",
    "interpret": "sparsefinder.evaluation.interpret",
    "analyse": "sparsefinder.evaluation.analysis",
    "predict_batch": "sparsefinder.evaluation.analysis",
    # results: which artifacts go with a model, a result and a method
    "resolve_result": "sparsefinder.results",
    "result_artifacts": "sparsefinder.results",
    # figures and tables of a model's results in one call (a notebook's, the CLI's)
    "result_sweep": "sparsefinder.figures",
    "result_interpretation": "sparsefinder.figures",
    "overview_figure": "sparsefinder.figures",
    "head_figure": "sparsefinder.figures",
    "compare_methods": "sparsefinder.figures",
    "sweep_fronts": "sparsefinder.figures",
    "sweep_pareto_figure": "sparsefinder.figures",
    "cluster_pos_figure": "sparsefinder.figures",
    "save_figure": "sparsefinder.plots.export",
    "figure_bytes": "sparsefinder.plots.export",
}
# Names whose defining module exports them under another name.
_ALIASES: dict[str, str] = {"load_catalogue": "load_registry"}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'sparsefinder' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), _ALIASES.get(name, name))
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
