"""Plotly figures of the interpretability tables (:mod:`sparsefinder.evaluation.interpret`).

Only Plotly, NumPy and pandas: no Streamlit, no model code. Every function
takes the library's tables and returns a :class:`plotly.graph_objects.Figure`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.colors as pc
import plotly.graph_objects as go

from sparsefinder.plots.heatmaps import OKABE_ITO

#: Okabe–Ito without black (colour-vision safe; black marks the centroids), then Plotly's Dark24.
PALETTE = tuple(c for c in OKABE_ITO if c != "#000000") + tuple(
    c for c in pc.qualitative.Dark24 if c not in OKABE_ITO and c.upper() not in ("#222A2A", "#000000"))
#: Query and key markers of the 2-D view.
SIDE_SYMBOLS = {"query": "circle", "key": "x"}


def group_colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def cluster_pos_heatmap(matrix: pd.DataFrame, title: str, proportions: bool = False) -> go.Figure:
    """Clusters (rows) × POS tags (columns), each cell annotated: counts, or row proportions to 2 decimals."""
    z = matrix.to_numpy(dtype=float)
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(c) for c in matrix.columns], y=[f"cluster {c}" for c in matrix.index],
        colorscale="Blues", zmin=0.0, zmax=1.0 if proportions else max(float(z.max(initial=0)), 1.0),
        colorbar=dict(title="share" if proportions else "tokens"),
        texttemplate="%{z:.2f}" if proportions else "%{z:.0f}",
        hovertemplate="%{y}, %{x}: %{z" + (":.3f" if proportions else ":.0f") + "}<extra></extra>",
        xgap=1, ygap=1,
    ))
    fig.update_layout(title=dict(text=title), yaxis=dict(autorange="reversed", type="category"),
                      xaxis=dict(side="top", type="category"), height=150 + 34 * len(matrix),
                      margin=dict(l=10, r=10, t=110, b=10))
    return fig


def pca_scatter(points: pd.DataFrame, centres: pd.DataFrame, colour: str = "cluster", title: str = "") -> go.Figure:
    """The 2-D view of :func:`~sparsefinder.evaluation.interpret.head_points`: queries as circles, keys as crosses,
    coloured by ``colour`` (``"cluster"`` or ``"pos"``), centroids as labelled black diamonds; hover shows the token."""
    if colour not in ("cluster", "pos"):
        raise ValueError(f"colour must be 'cluster' or 'pos', not {colour!r}")
    fig = go.Figure()
    groups = sorted(points[colour].unique().tolist(), key=lambda v: (str(type(v)), v))
    for gi, g in enumerate(groups):
        for side, symbol in SIDE_SYMBOLS.items():
            sel = points[(points[colour] == g) & (points["side"] == side)]
            if sel.empty:
                continue
            label = f"cluster {g}" if colour == "cluster" else str(g)
            fig.add_trace(go.Scatter(
                x=sel["x"], y=sel["y"], mode="markers", name=f"{label} ({side})", legendgroup=label,
                marker=dict(symbol=symbol, color=group_colour(gi), size=9 if side == "query" else 8,
                            line=dict(width=1.5 if side == "key" else 0.5, color=group_colour(gi))),
                customdata=np.stack([sel["token"], sel["pos"], sel["cluster"], sel["sentence"], sel["position"]],
                                    axis=1),
                hovertemplate=(f"{side} %{{customdata[0]}}<br>POS %{{customdata[1]}}<br>cluster %{{customdata[2]}}"
                               "<br>sentence %{customdata[3]}, position %{customdata[4]}<extra></extra>"),
            ))
    if len(centres):
        fig.add_trace(go.Scatter(
            x=centres["x"], y=centres["y"], mode="markers+text", name="centroids",
            text=[f"c{c}" for c in centres["cluster"]], textposition="top center",
            marker=dict(symbol="diamond", color="black", size=12, line=dict(width=1, color="white")),
            hovertemplate="centroid %{text}<extra></extra>",
        ))
    fig.update_layout(title=dict(text=title), xaxis=dict(title="PC 1", zeroline=False),
                      yaxis=dict(title="PC 2", zeroline=False), height=560, plot_bgcolor="white",
                      legend=dict(groupclick="togglegroup"), margin=dict(l=10, r=10, t=60, b=10))
    return fig


def distance_figure(hist: pd.DataFrame, title: str = "Relative distance j − i of gold edges") -> go.Figure:
    """Bars of :func:`~sparsefinder.evaluation.interpret.distance_histogram`; the outer bars count everything beyond."""
    d = hist["distance"].to_numpy()
    md = int(d.max()) - 1 if len(d) else 0
    labels = [f"≤{-md - 1}" if v == -md - 1 else f"≥{md + 1}" if v == md + 1 else str(v) for v in d]
    fig = go.Figure(go.Bar(
        x=labels, y=hist["share"], customdata=hist["count"], marker_color=OKABE_ITO[4],
        hovertemplate="j − i = %{x}<br>%{customdata} edges (%{y:.1%})<extra></extra>",
    ))
    fig.update_layout(title=dict(text=title), xaxis=dict(title="key position − query position", type="category"),
                      yaxis=dict(title="share of gold edges", tickformat=".0%"), height=340,
                      margin=dict(l=10, r=10, t=60, b=10))
    return fig


def head_grid_heatmap(grid: np.ndarray, title: str, label: str, zmax: float = 1.0) -> go.Figure:
    """Layers × heads heatmap of one per-head value (``label``), annotated to 2 decimals."""
    grid = np.asarray(grid, dtype=float)
    layers, heads = grid.shape
    fig = go.Figure(go.Heatmap(
        z=grid, x=[f"head {h}" for h in range(heads)], y=[f"layer {la}" for la in range(layers)],
        zmin=0.0, zmax=zmax, colorscale="Blues", colorbar=dict(title=label), texttemplate="%{z:.2f}",
        hovertemplate="%{y}, %{x}<br>" + label + " %{z:.3f}<extra></extra>", xgap=1, ygap=1,
    ))
    fig.update_layout(title=dict(text=title), yaxis=dict(autorange="reversed"), xaxis=dict(side="top"),
                      height=120 + 48 * layers, margin=dict(l=10, r=10, t=100, b=10))
    return fig
