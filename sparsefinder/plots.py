"""Plotly figures of gold attention graphs (used by the app and for README images).

Only Plotly and NumPy here: no Streamlit, no model code. Every function takes
plain arrays and token strings and returns a :class:`plotly.graph_objects.Figure`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

#: Colour of cells whose probability is exactly zero (no edge in the gold graph).
ZERO_COLOR = "#d9d9d9"
#: Colour scale of positive probabilities; its low end is dark, so tiny but
#: non-zero probabilities never look like the light-grey exact zeros.
PROB_COLORSCALE = "Viridis"
#: Colour scale of sparsity in [0, 1].
SPARSITY_COLORSCALE = "Blues"


def token_labels(tokens: Sequence[str], sep: str = "·") -> list[str]:
    """Axis labels that keep repeated tokens apart: ``the`` at position 7 becomes ``the·7``.

    Plotly merges equal category labels, so every label must be unique.
    Tokens that occur once keep their text; repeated ones get their position.
    """
    counts = Counter(tokens)
    labels: list[str] = []
    seen: set[str] = set()
    for i, tok in enumerate(tokens):
        label = f"{tok}{sep}{i}" if counts[tok] > 1 else tok
        while label in seen:  # a token that already looks like "the·7"
            label += sep
        seen.add(label)
        labels.append(label)
    return labels


def sparsity_heatmap(
    sparsity: np.ndarray,
    title: str = "Gold sparsity per layer and head",
    decimals: int = 2,
) -> go.Figure:
    """Layers × heads heatmap of sparsity values, each cell annotated with its value.

    ``sparsity``: ``(layers, heads)`` array in ``[0, 1]``.
    """
    grid = np.asarray(sparsity, dtype=float)
    if grid.ndim != 2:
        raise ValueError(f"sparsity must be (layers, heads), got shape {grid.shape}")
    layers, heads = grid.shape
    fig = go.Figure(
        go.Heatmap(
            z=grid,
            x=[f"head {h}" for h in range(heads)],
            y=[f"layer {layer}" for layer in range(layers)],
            zmin=0.0,
            zmax=1.0,
            colorscale=SPARSITY_COLORSCALE,
            colorbar=dict(title="sparsity"),
            texttemplate=f"%{{z:.{decimals}f}}",
            hovertemplate="%{y}, %{x}<br>gold sparsity %{z:.4f}<extra></extra>",
            xgap=1,
            ygap=1,
        )
    )
    fig.update_layout(
        title=dict(text=title),
        yaxis=dict(autorange="reversed"),
        xaxis=dict(side="top"),
        height=120 + 48 * layers,
        margin=dict(l=10, r=10, t=100, b=10),
    )
    return fig


def attention_heatmap(
    probs: np.ndarray,
    query_tokens: Sequence[str],
    key_tokens: Sequence[str] | None = None,
    title: str = "Entmax attention probabilities",
) -> go.Figure:
    """Heatmap of one head's probabilities: query tokens on y, key tokens on x.

    Exact zeros (pairs outside the gold graph) are drawn in :data:`ZERO_COLOR`
    as a separate trace, so they can never be confused with small positive
    probabilities, which start at the dark end of :data:`PROB_COLORSCALE`.
    """
    p = np.asarray(probs, dtype=float)
    key_tokens = query_tokens if key_tokens is None else key_tokens
    if p.shape != (len(query_tokens), len(key_tokens)):
        raise ValueError(f"probs shape {p.shape} does not match {len(query_tokens)} queries × {len(key_tokens)} keys")
    y = token_labels(query_tokens)
    x = token_labels(key_tokens)
    zero = p == 0
    positive = np.where(zero, np.nan, p)
    zeros = np.where(zero, 0.0, np.nan)
    fig = go.Figure()
    fig.add_trace(
        go.Heatmap(
            z=zeros,
            x=x,
            y=y,
            zmin=0.0,
            zmax=1.0,
            colorscale=[[0.0, ZERO_COLOR], [1.0, ZERO_COLOR]],
            showscale=False,
            name="zero",
            hovertemplate="query %{y}<br>key %{x}<br>p = 0 (no edge)<extra></extra>",
            xgap=1,
            ygap=1,
        )
    )
    fig.add_trace(
        go.Heatmap(
            z=positive,
            x=x,
            y=y,
            zmin=0.0,
            zmax=max(float(np.nanmax(positive)) if np.any(~zero) else 1.0, 1e-9),
            colorscale=PROB_COLORSCALE,
            colorbar=dict(title="p"),
            name="p",
            hovertemplate="query %{y}<br>key %{x}<br>p = %{z:.4g}<extra></extra>",
            xgap=1,
            ygap=1,
        )
    )
    side = max(len(y), 1)
    fig.update_layout(
        title=dict(text=title),
        xaxis=dict(title="key", side="top", tickangle=-60, type="category"),
        yaxis=dict(title="query", autorange="reversed", type="category"),
        height=min(260 + 22 * side, 1400),
        plot_bgcolor="white",
        margin=dict(l=10, r=10, t=130, b=10),
    )
    return fig


# Okabe–Ito: distinguishable with the common colour-vision deficiencies.
# Beyond eight methods colours repeat, so line dash and marker keep every method distinct.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
MARKERS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "star", "triangle-down", "hexagon")
DASHES = ("solid", "dash", "dot")


def pareto_figure(
    summary, front: str = "on_front", x: str = "sparsity", y: str = "recall", title: str | None = None
) -> go.Figure:
    """Recall against sparsity, one trace per method, frontier points joined and drawn larger.

    ``summary`` is :func:`sparsefinder.sweep.pareto_front` output: one row per
    configuration (means over heads) with ``method``, ``params``, ``x``, ``y``
    and the boolean ``front`` column.
    """
    fig = go.Figure()
    for i, (method, rows) in enumerate(summary.groupby("method", sort=False)):
        rows = rows.sort_values(x)
        colour, marker = OKABE_ITO[i % len(OKABE_ITO)], MARKERS[i % len(MARKERS)]
        dash = DASHES[(i // len(OKABE_ITO)) % len(DASHES)]
        on = rows[rows[front]] if front in rows else rows
        fig.add_trace(go.Scatter(
            x=on[x], y=on[y], mode="lines+markers", name=str(method), legendgroup=str(method),
            line=dict(color=colour, width=1.5, dash=dash), marker=dict(color=colour, symbol=marker, size=9),
            customdata=on[["params"]].to_numpy() if "params" in on else None,
            hovertemplate=f"{method} %{{customdata[0]}}<br>{x} %{{x:.3f}}<br>{y} %{{y:.3f}}<extra></extra>",
        ))
        off = rows[~rows[front]] if front in rows else rows.iloc[:0]
        if len(off):
            fig.add_trace(go.Scatter(
                x=off[x], y=off[y], mode="markers", name=f"{method} (dominated)", legendgroup=str(method),
                showlegend=False, marker=dict(color=colour, symbol=marker, size=5, opacity=0.45),
                customdata=off[["params"]].to_numpy() if "params" in off else None,
                hovertemplate=f"{method} %{{customdata[0]}}<br>{x} %{{x:.3f}}<br>{y} %{{y:.3f}}<extra></extra>",
            ))
    fig.update_layout(
        title=title or f"{y.capitalize()} against {x} (mean over heads)", template="plotly_white",
        xaxis=dict(title=x, range=[0, 1.02]), yaxis=dict(title=y, range=[0, 1.02]),
        legend=dict(title="method"), width=900, height=600,
    )
    return fig
