"""A model's figures and tables in one call each: what a notebook, the CLI and a script draw.

Over an extraction (:meth:`sparsefinder.EntmaxModel.extract`) and a model's results (:mod:`sparsefinder.results`):
the gold overview, one head, a comparison of predictors, the Pareto fronts of a sweep and one head's
clusters × parts of speech. Every figure is a Plotly figure: a notebook shows it inline, and
:func:`sparsefinder.plots.export.save_figure` writes it as HTML, PNG, SVG or PDF.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from sparsefinder import results as rs
from sparsefinder.metrics import HEAD_METRICS


def _model_name(model: str | None) -> str:
    from sparsefinder.model.catalogue import default_model_name, load_registry

    name = model or default_model_name()
    if name not in load_registry():
        raise ValueError(f"unknown model {name!r}: results belong to registered models (sparsefinder models)")
    return name


def result_sweep(model: str | None = None, result: str = rs.SHIPPED) -> pd.DataFrame:
    """The sweep table of a registered ``model``'s ``result`` (default: the default model's shipped one),
    with the learned predictors' table merged in; ValueError when the result has none."""
    found = rs.resolve_result(_model_name(model), result)
    frame = rs.load_result_sweep(found)
    if frame is None:
        raise ValueError(f"{found.label} has no sweep table: run sparsefinder sweep")
    return frame


def result_interpretation(model: str | None = None, result: str = rs.SHIPPED):
    """The interpretation tables (:class:`~sparsefinder.evaluation.interpret.InterpretTables`) of a registered
    ``model``'s ``result``: the shipped ones, or those saved beside a saved result's store."""
    from sparsefinder.evaluation import interpret as itp
    from sparsefinder.model.catalogue import get_spec

    name = _model_name(model)
    found = rs.resolve_result(name, result)
    path = get_spec(name).artifact("interpret") if found.is_default else Path(found.store).parent / "interpret"
    if path is None or not (path / itp.MANIFEST_FILE).is_file():
        raise ValueError(f"{found.label} has no interpretation tables: run sparsefinder interpret")
    return itp.InterpretTables.load(path)


def overview_figure(ex, sentence: int = 0, prediction=None) -> go.Figure:
    """Layers × heads gold sparsity of one sentence of ``ex``; with ``prediction``
    (:func:`~sparsefinder.evaluation.analysis.predict_batch` of the same ``ex``), the method's recall."""
    from sparsefinder.plots.heatmaps import sparsity_heatmap

    _check_sentence(ex, sentence)
    if prediction is not None:
        return sparsity_heatmap(prediction.metrics["recall"][sentence], title="Recall per layer and head",
                                value_name="recall")
    grid = np.stack([ex.gold(layer).sparsity()[sentence].numpy() for layer in range(ex.num_layers)])
    return sparsity_heatmap(grid)


def head_figure(ex, layer: int, head: int, sentence: int = 0, prediction=None) -> go.Figure:
    """One head's entmax probabilities on one sentence of ``ex`` (exact zeros grey, pairs the layer's mask
    forbids marked apart); with ``prediction``
    (:func:`~sparsefinder.evaluation.analysis.predict_batch` of the same ``ex``) its TP/FP/FN marks."""
    from sparsefinder.evaluation.analysis import allowed_pairs, head_probabilities
    from sparsefinder.plots.heatmaps import attention_heatmap

    _check_sentence(ex, sentence)
    if not (0 <= layer < ex.num_layers and 0 <= head < ex.num_heads):
        raise ValueError(f"layer {layer}, head {head}: the model has {ex.num_layers} layers × {ex.num_heads} heads")
    probs = head_probabilities(ex, sentence, layer, head)
    sparsity = float(ex.gold(layer).sparsity()[sentence, head])
    title = f"Layer {layer}, head {head}: entmax probabilities (gold sparsity {sparsity:.3f})"
    # The layer's valid pairs (a decoder's past, a sliding window): forbidden pairs are drawn apart from
    # exact zeros and never scored, as on the Explore page.
    allowed = allowed_pairs(ex, sentence, layer)
    pred = None
    if prediction is not None:
        pred = prediction.edges(sentence, layer, probs.shape[0])[head]
        title = f"Layer {layer}, head {head}: entmax probabilities and the predicted graph"
    return attention_heatmap(probs, list(ex.tokens[sentence]), title=title, pred=pred, allowed=allowed)


def _check_sentence(ex, sentence: int) -> None:
    if not 0 <= sentence < len(ex.tokens):
        raise ValueError(f"sentence {sentence}: the extraction has {len(ex.tokens)}")


def compare_methods(ex, configs: Mapping[str, Mapping[str, Any] | str | None] | Sequence[str],
                    artifacts: rs.ResultArtifacts | None = None) -> pd.DataFrame:
    """Each method's graph on ``ex`` against the gold one: the means of
    :data:`~sparsefinder.metrics.HEAD_METRICS` (recall, mass recall, precision, sparsity, exact, output
    error) over its sentences, layers and heads, one row per method, in the order given.

    ``configs``: method → parameters (a mapping, a sweep-table ``params`` string, or None for the
    method's defaults), or just method names. A fitted method (k-means, the learned ones) runs with the
    parameters of a fitted configuration only, e.g. ``{"n_clusters": 4}`` or ``{"sparsity": 0.7}``.
    ``artifacts`` (:func:`sparsefinder.result_artifacts`) give the
    projections and fitted state of the methods that need them (distance, k-means, the learned ones).
    """
    from sparsefinder.evaluation.analysis import predict_batch

    if not isinstance(configs, Mapping):
        configs = dict.fromkeys(configs)
    rows = []
    for method, params in configs.items():
        projections, fitted = artifacts.for_method(method) if artifacts is not None else (None, None)
        if artifacts is not None and (reason := artifacts.unsupported(method)):
            raise ValueError(f"{method} cannot run with these artifacts: {reason}")
        p = predict_batch(ex, method, params, projections=projections, fitted=fitted)
        shown = "" if params is None else params if isinstance(params, str) else json.dumps(dict(params),
                                                                                             separators=(",", ":"))
        rows.append({"method": method, "params": shown, **{k: float(np.nanmean(p.metrics[k])) for k in HEAD_METRICS}})
    return pd.DataFrame(rows)


def sweep_fronts(sweep: pd.DataFrame, layer: int | None = None, head: int | None = None,
                 methods: Sequence[str] | None = None) -> tuple[pd.DataFrame, str]:
    """Each method's Pareto front of ``sweep`` (means over all heads, or over ``layer``'s, or of one ``head``),
    and the words that say over what."""
    from sparsefinder.evaluation.pareto import pareto_front

    frame, by, where = sweep, ("method",), "all layers and heads"
    if methods:
        from sparsefinder.predictors.base import expand_methods

        frame = frame[frame["method"].isin(expand_methods(",".join(methods)))]
    if layer is not None:
        frame, by, where = frame[frame["layer"] == layer], ("method", "layer"), f"layer {layer}"
    if head is not None:
        if layer is None:
            raise ValueError("a head needs its layer")
        frame, by, where = frame[frame["head"] == head], ("method", "layer", "head"), f"{where}, head {head}"
    if frame.empty:
        raise ValueError(f"no sweep rows for {where}" + (f" and methods {list(methods)}" if methods else ""))
    return pareto_front(frame, by=by), where


def sweep_pareto_figure(sweep: pd.DataFrame, layer: int | None = None, head: int | None = None,
                        methods: Sequence[str] | None = None) -> go.Figure:
    """Recall against sparsity of every configuration in ``sweep``, each method's front joined
    (see :func:`sweep_fronts` for ``layer``, ``head`` and ``methods``)."""
    from sparsefinder.plots.heatmaps import pareto_figure

    front, where = sweep_fronts(sweep, layer, head, methods)
    return pareto_figure(front, title=f"Recall against sparsity ({where})")


def default_clusters(tables) -> int:
    """The cluster count shown when none is asked for: 8 where the tables have it (as ``interpret``'s summary)."""
    return 8 if 8 in tables.n_clusters else tables.n_clusters[0]


def cluster_pos_figure(tables, layer: int, head: int, n_clusters: int | None = None, side: str = "query",
                       proportions: bool = False) -> go.Figure:
    """One head's k-means clusters (rows) × parts of speech (columns) of its queries or keys
    (``side``), token counts or row ``proportions``, from interpretation ``tables``."""
    from sparsefinder.evaluation import interpret as itp
    from sparsefinder.plots.clusters import cluster_pos_heatmap

    c = default_clusters(tables) if n_clusters is None else n_clusters
    m = itp.cluster_pos_matrix(tables, layer, head, c, side, normalise=proportions)
    values = "proportions" if proportions else "counts"
    title = f"{side.capitalize()} clusters × POS ({values}), layer {layer} head {head}, {c} clusters"
    return cluster_pos_heatmap(m, title, proportions=proportions)
