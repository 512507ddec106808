"""Plotly figures of sparsity–accuracy curves (:func:`sparsefinder.evaluation.approximate.sparsity_accuracy_curve`).

Only Plotly, NumPy and pandas: no Streamlit, no model code.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go

from sparsefinder.plots.heatmaps import DASHES, MARKERS, OKABE_ITO

#: Axis titles of the curve table's metrics.
METRIC_LABELS = {
    "cos_mean": "embedding cosine to the exact model (mean)",
    "cos_min": "embedding cosine to the exact model (min)",
    "retrieval": "retrieval stability (nearest neighbour kept)",
    "mlm_loss": "masked-LM loss",
    "mlm_accuracy": "masked-LM accuracy",
    "recall": "recall of the gold graph",
    "exact": "share of exactly covered queries",
    "sparsity": "sparsity of the restricted layers",
    "model_sparsity": "sparsity over all layers (unrestricted = dense)",
}
REFERENCES = ("exact", "gold")
#: Reference markers are grey so they never share a colour with a method (Okabe–Ito's eighth is black).
REFERENCE_COLOR = "#7f7f7f"


def sparsity_accuracy_figure(
    frame: pd.DataFrame,
    metric: str = "cos_mean",
    x: str = "sparsity",
    layers: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """End-task ``metric`` against ``x`` sparsity, one line per (method, layer subset).

    ``frame``: the curve table (:data:`sparsefinder.evaluation.approximate.CURVE_COLUMNS`);
    ``metric``: a column such as ``"cos_mean"``, ``"retrieval"``,
    ``"mlm_loss"``, ``"mlm_accuracy"``; ``x``: ``"sparsity"`` (of the
    restricted layers) or ``"model_sparsity"`` (all layers, unrestricted ones
    dense); ``layers``/``methods``: only these layer subsets (e.g.
    ``["all", "later"]``) and methods (default: all in the table). A method
    keeps its colour and marker across subsets; the subset sets the line dash
    (first subset solid, then dashed, dotted). The exact model and the gold
    oracle are drawn as grey reference markers. Hover shows each point's
    ``params``.
    """
    for col in (metric, x, "method", "params", "layers"):
        if col not in frame.columns:
            raise ValueError(f"the curve table has no column {col!r}")
    subsets = [s for s in dict.fromkeys(frame["layers"]) if s != "none"]
    if layers is not None:
        unknown = set(layers) - set(subsets)
        if unknown:
            raise ValueError(f"no rows for layer subsets {sorted(unknown)}; the table has {subsets}")
        subsets = list(layers)
    names = [m for m in dict.fromkeys(frame["method"]) if m not in REFERENCES]
    if methods is not None:
        names = [m for m in methods if m in set(names)]
    fig = go.Figure()
    for i, method in enumerate(names):
        colour, marker = OKABE_ITO[i % len(OKABE_ITO)], MARKERS[i % len(MARKERS)]
        for j, subset in enumerate(subsets):
            rows = frame[(frame["method"] == method) & (frame["layers"] == subset)].sort_values(x)
            rows = rows[rows[metric].notna()]
            if rows.empty:
                continue
            label = f"{method} ({subset} layers)"
            fig.add_trace(go.Scatter(
                x=rows[x], y=rows[metric], mode="lines+markers", name=label, legendgroup=method,
                line=dict(color=colour, width=1.5, dash=DASHES[j % len(DASHES)]),
                marker=dict(color=colour, symbol=marker, size=8),
                customdata=rows[["params"]].to_numpy(),
                hovertemplate=f"{label} %{{customdata[0]}}<br>{x} %{{x:.3f}}<br>{metric} %{{y:.3f}}<extra></extra>",
            ))
    refs = frame[frame["method"].isin(REFERENCES) & frame[metric].notna()]
    refs = refs[(refs["layers"] == "none") | refs["layers"].isin(subsets)]
    for j, (_, ref) in enumerate(refs.iterrows()):
        exact = ref["method"] == "exact"
        label = "exact model" if exact else f"gold graph ({ref['layers']} layers)"
        fig.add_trace(go.Scatter(
            x=[ref[x]], y=[ref[metric]], mode="markers", name=label, legendgroup="references",
            marker=dict(color=REFERENCE_COLOR, symbol="star" if exact else ("diamond-open", "square-open")[j % 2],
                        size=12 if exact else 10),
            hovertemplate=f"{label}<br>{x} %{{x:.3f}}<br>{metric} %{{y:.3f}}<extra></extra>",
        ))
    fig.update_layout(
        title=title or f"{METRIC_LABELS.get(metric, metric)} against {METRIC_LABELS.get(x, x)}",
        template="plotly_white", xaxis=dict(title=METRIC_LABELS.get(x, x), range=[-0.02, 1.02]),
        yaxis=dict(title=METRIC_LABELS.get(metric, metric)),
        legend=dict(title="method (layers)", font=dict(size=11), tracegroupgap=4),
        width=980, height=720,
    )
    return fig

