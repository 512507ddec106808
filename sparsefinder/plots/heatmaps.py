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
# Pairs the layer's own mask forbids (a decoder's future keys, keys outside a sliding window): not part
# of any graph, so drawn apart from exact zeros (which the model could have given a weight).
NOT_ALLOWED_COLOR = "#ffffff"
NOT_ALLOWED_HOVER = "not allowed by this layer's mask (future key or outside its window)"
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
    value_name: str = "gold sparsity",
) -> go.Figure:
    """Layers × heads heatmap of values in ``[0, 1]`` (gold sparsity, or a method's recall), annotated.

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
            colorbar=dict(title=value_name.split()[-1]),
            texttemplate=f"%{{z:.{decimals}f}}",
            hovertemplate=f"%{{y}}, %{{x}}<br>{value_name} %{{z:.4f}}<extra></extra>",
            xgap=1,
            ygap=1,
        )
    )
    y_labels = [f"layer {layer}" for layer in range(layers)]
    fig.update_layout(  # margins from the labels, not automargin (see label_extent)
        title=dict(text=title),
        yaxis=dict(autorange="reversed", automargin=False),
        xaxis=dict(side="top", automargin=False),
        height=120 + 48 * layers,
        margin=dict(l=round(label_extent(y_labels) + 16), r=10, t=100, b=10),
    )
    return fig


#: Largest heatmap side drawn cell by cell; longer inputs are drawn as blocks of tokens.
MAX_SIDE = 96
#: Okabe–Ito colours (colour-blind safe) of every predicted-vs-gold drawing: true positive,
#: false positive, false negative; light grey for neither.
OUTCOME_COLORS = {"TN": "#f0f0f0", "TP": "#0072B2", "FP": "#E69F00", "FN": "#CC79A7"}
OUTCOMES = ("TN", "TP", "FP", "FN")


# Plotly's automargin (on in its default template) measures every tick label in the browser and then
# draws the whole figure a second time with the margins it found: about half of a head heatmap's drawing
# time (bench/ui_latency.py). The heatmaps turn it off and reserve margins from the labels' lengths instead.
#: Width in pixels of one tick-label character (Plotly's 12 px default font, a little over its average).
LABEL_CHAR_PX = 6.5
#: Longest tick label the margins make room for, in characters (longer ones are cut by the margin).
MAX_LABEL_CHARS = 40


def label_extent(labels: Sequence[str], angle: float = 0.0, font_px: float = 12.0) -> float:
    """Pixels a column of tick labels needs across its axis: their longest width, or, rotated by
    ``angle`` degrees, the height of that width (plus the font's own)."""
    longest = min(max((len(str(t)) for t in labels), default=0), MAX_LABEL_CHARS) * LABEL_CHAR_PX
    a = np.deg2rad(abs(angle))
    return float(longest * np.sin(a) + font_px * np.cos(a)) if angle else float(longest)


def block_size(n: int, max_side: int = MAX_SIDE) -> int:
    """Tokens per block so that an ``n``-token side fits in ``max_side`` cells."""
    return max(1, -(-n // max_side))


def block_reduce(a: np.ndarray, size: int, how: str = "max") -> np.ndarray:
    """``(n, n)`` → ``(⌈n/s⌉, ⌈n/s⌉)`` by max or sum over ``s × s`` tiles (the last tile may be smaller)."""
    a = np.asarray(a)
    if size == 1:
        return a.astype(float)
    n0, n1 = a.shape
    m0, m1 = -(-n0 // size), -(-n1 // size)
    # Padded (with zeros, which change neither a max of probabilities nor a sum) in the input's own dtype,
    # and only when the side is not a multiple of the block: at 8192 tokens a float64 copy is 512 MiB.
    pad = a
    if (m0 * size, m1 * size) != (n0, n1):
        pad = np.zeros((m0 * size, m1 * size), dtype=a.dtype)
        pad[:n0, :n1] = a
    tiles = pad.reshape(m0, size, m1, size)
    if how == "max":
        return tiles.max(axis=(1, 3)).astype(float)
    if how == "sum":
        return tiles.sum(axis=(1, 3), dtype=float if a.dtype.kind == "f" else np.int64).astype(float)
    raise ValueError(f"how must be 'max' or 'sum', not {how!r}")


def block_labels(tokens: Sequence[str], size: int) -> list[str]:
    """``tok_a…tok_b [a–b]`` per block of ``size`` tokens (unique, so Plotly keeps every block)."""
    out = []
    for start in range(0, len(tokens), size):
        stop = min(start + size, len(tokens)) - 1
        out.append(f"{tokens[start]}…{tokens[stop]} [{start}–{stop}]" if stop > start else f"{tokens[start]} [{start}]")
    return out


def attention_heatmap(
    probs: np.ndarray,
    query_tokens: Sequence[str],
    key_tokens: Sequence[str] | None = None,
    title: str = "Entmax attention probabilities",
    pred: np.ndarray | None = None,
    max_side: int = MAX_SIDE,
    allowed: np.ndarray | None = None,
) -> go.Figure:
    """Heatmap of one head's probabilities: query tokens on y, key tokens on x.

    ``allowed`` (bool ``(n, n)``, the layer's valid pairs) marks the pairs its mask
    forbids — a decoder's triangle, a sliding window's outside — in
    :data:`NOT_ALLOWED_COLOR`, apart from the exact zeros the model chose.

    Exact zeros (pairs outside the gold graph) are drawn in :data:`ZERO_COLOR`
    as a separate trace, so they can never be confused with small positive
    probabilities, which start at the dark end of :data:`PROB_COLORSCALE`.

    ``pred`` (a bool ``(n, n)`` predicted graph) overlays the prediction: a
    gold edge the method keeps (TP) is marked blue, one it misses (FN) pink,
    and a predicted pair outside the gold graph (FP) orange; the marks are
    inset cells of a second heatmap trace, so the probability colour stays
    visible around them, the hover still gives p, and the figure's size does
    not grow with the number of marks.

    Above ``max_side`` tokens the matrix is drawn as blocks of
    :func:`block_size` tokens: a block's colour is its largest probability,
    its mark the worst outcome inside it (FN before FP before TP), and the
    hover gives the block's counts. A 512-token head is then ~96 × 96 cells,
    not 262,144.
    """
    p = np.asarray(probs)
    if p.dtype.kind != "f":  # float32 probabilities stay float32: a float64 copy of a long head is 4 × n² bytes more
        p = p.astype(float)
    key_tokens = query_tokens if key_tokens is None else key_tokens
    if p.shape != (len(query_tokens), len(key_tokens)):
        raise ValueError(f"probs shape {p.shape} does not match {len(query_tokens)} queries × {len(key_tokens)} keys")
    if pred is not None and np.shape(pred) != p.shape:
        raise ValueError(f"pred shape {np.shape(pred)} does not match probs shape {p.shape}")
    size = block_size(max(p.shape), max_side)
    gold = p > 0
    if size == 1:
        y, x = token_labels(query_tokens), token_labels(key_tokens)
        z, edges = p.astype(float), None
    else:
        y, x = block_labels(list(query_tokens), size), block_labels(list(key_tokens), size)
        z = block_reduce(p, size, "max")
        edges = block_reduce(gold, size, "sum")
    fig, height, side = _probability_figure(z, edges, _forbidden(allowed, p.shape, size), x, y, size)
    notes = []
    if size > 1:
        notes.append(f"{p.shape[0]} tokens drawn as blocks of {size} (colour: largest p in the block)")
    if pred is not None:
        notes.append(_add_overlay(fig, gold, np.asarray(pred, dtype=bool), z, x, y, size, height, side))
    return _probability_layout(fig, title, notes, x, y, height)


def block_attention_heatmap(
    top: np.ndarray,
    edges: np.ndarray,
    allowed: np.ndarray,
    tokens: Sequence[str],
    size: int,
    title: str = "Entmax attention probabilities",
) -> go.Figure:
    """:func:`attention_heatmap` of one head from its block summary (no ``(n, n)`` matrix needed).

    ``size`` tokens per block a side; per block ``top`` is the largest probability, ``edges`` the
    number of gold edges (``p > 0``) and ``allowed`` the number of pairs the layer's mask allows
    (:class:`sparsefinder.evaluation.analysis.HeadView`). A block's colour is its largest p; grey: no
    gold edge in it; white: none of its pairs is allowed (future keys, outside the window). With
    ``size`` 1 the blocks are the pairs and the figure is :func:`attention_heatmap`'s.
    """
    top, edges, allowed = np.asarray(top), np.asarray(edges), np.asarray(allowed)
    m = -(-len(tokens) // size)
    if top.shape != (m, m) or edges.shape != (m, m) or allowed.shape != (m, m):
        raise ValueError(f"{len(tokens)} tokens in blocks of {size} are {m} × {m} blocks, got {top.shape}, "
                         f"{edges.shape}, {allowed.shape}")
    if size == 1:
        return attention_heatmap(top, tokens, title=title, allowed=allowed > 0)
    labels = block_labels(list(tokens), size)
    forbidden = None if int(allowed.sum()) == len(tokens) ** 2 else allowed == 0
    fig, height, _ = _probability_figure(top.astype(float), edges, forbidden, labels, labels, size)
    notes = [f"{len(tokens)} tokens drawn as blocks of {size} (colour: largest p in the block)"]
    return _probability_layout(fig, title, notes, labels, labels, height)


def _probability_figure(z: np.ndarray, edges: np.ndarray | None, forbidden: np.ndarray | None, x, y,
                        size: int) -> tuple[go.Figure, int, int]:
    """The not-allowed, zero and probability traces of a head (cells, or blocks with their edge counts)."""
    if size == 1:
        hover_zero = "query %{y}<br>key %{x}<br>p = 0 (no edge)"
        hover_pos = "query %{y} → key %{x}<br>p = %{z:.4g}"
    else:
        hover_zero = f"queries %{{y}}<br>keys %{{x}}<br>no edge in this {size}×{size} block"
        hover_pos = "queries %{y}<br>keys %{x}<br>max p = %{z:.4g}<br>gold edges %{customdata}"
    zero = z == 0
    fig = go.Figure()
    if forbidden is not None:
        zero = zero & ~forbidden
        fig.add_trace(_forbidden_trace(forbidden, x, y, gap=0))
    # The cells have no gaps: with xgap/ygap Plotly paints every cell as its own rectangle instead of one
    # image of the whole matrix, which took most of a head switch's drawing in the browser. z is float32:
    # half the bytes to send, and exact for the probabilities (float32 already).
    fig.add_trace(go.Heatmap(
        z=np.where(zero, 0.0, np.nan).astype(np.float32), x=x, y=y, zmin=0.0, zmax=1.0,
        colorscale=[[0.0, ZERO_COLOR], [1.0, ZERO_COLOR]], showscale=False, name="zero",
        hovertemplate=hover_zero + "<extra></extra>",
    ))
    positive = np.where(zero | (forbidden if forbidden is not None else False), np.nan, z)
    fig.add_trace(go.Heatmap(
        z=positive.astype(np.float32), x=x, y=y, zmin=0.0,
        zmax=max(float(np.nanmax(positive)) if np.any(~np.isnan(positive)) else 1.0, 1e-9),
        colorscale=PROB_COLORSCALE, colorbar=dict(title="p" if size == 1 else "max p"), name="p",
        customdata=None if edges is None else np.asarray(edges).astype(np.uint16 if size * size < 2**16 else np.uint32),
        hovertemplate=hover_pos + "<extra></extra>",
    ))
    side = max(len(y), len(x), 1)
    return fig, min(260 + 22 * side, 1400), side


def _probability_layout(fig: go.Figure, title: str, notes: list[str], x, y, height: int) -> go.Figure:
    top = 60 + 18 * len(notes) + label_extent(x, -60) + 24  # title, its notes, the key labels, "key"
    fig.update_layout(
        title=dict(text=title + "".join(f"<br><sup>{n}</sup>" for n in notes), y=1.0, yanchor="top",
                   yref="container", pad=dict(t=14)),
        xaxis=dict(title=dict(text="key", standoff=4), side="top", tickangle=-60, type="category",
                   automargin=False),
        yaxis=dict(title=dict(text="query", standoff=4), autorange="reversed", type="category", automargin=False),
        height=min(height + max(0, top - 130 - 18 * len(notes)), 1600),
        plot_bgcolor="white",
        margin=dict(l=round(label_extent(y) + 40), r=10, t=round(top), b=10),
    )
    return fig


def _forbidden(allowed: np.ndarray | None, shape: tuple[int, ...], size: int) -> np.ndarray | None:
    """Cells (or blocks of ``size``) without a single allowed pair, or None when every pair is allowed."""
    if allowed is None:
        return None
    allowed = np.asarray(allowed, dtype=bool)
    if allowed.shape != tuple(shape):
        raise ValueError(f"allowed shape {allowed.shape} does not match probs shape {tuple(shape)}")
    if allowed.all():
        return None
    return ~(allowed if size == 1 else block_reduce(allowed, size, "max").astype(bool))


def _forbidden_trace(forbidden: np.ndarray, x, y, gap: int = 1) -> go.Heatmap:
    return go.Heatmap(
        z=np.where(forbidden, 0.0, np.nan).astype(np.float32), x=x, y=y, zmin=0.0, zmax=1.0, showscale=False,
        name="not allowed", colorscale=[[0.0, NOT_ALLOWED_COLOR], [1.0, NOT_ALLOWED_COLOR]], xgap=gap, ygap=gap,
        hovertemplate=f"query %{{y}}<br>key %{{x}}<br>{NOT_ALLOWED_HOVER}<extra></extra>",
    )


def _add_overlay(
    fig: go.Figure, gold: np.ndarray, pred: np.ndarray, z: np.ndarray, x, y, size: int, height: int, side: int
) -> str:
    """Inset marks of TP / FP / FN cells (see :func:`attention_heatmap`); returns their key with the counts."""
    counts = {"TP": int((gold & pred).sum()), "FP": int((~gold & pred).sum()), "FN": int((gold & ~pred).sum())}
    masks = {
        "TP": block_reduce(gold & pred, size, "max") > 0,
        "FP": block_reduce(~gold & pred, size, "max") > 0,
        "FN": block_reduce(gold & ~pred, size, "max") > 0,
    }
    # One code per cell, the worst outcome wins: FN (a missed gold edge) over FP over TP.
    code = np.full(masks["TP"].shape, np.nan)
    for i, o in enumerate(("TP", "FP", "FN")):
        code[masks[o]] = i
    cell = max((height - 140) / side, 2.0)
    gap = max(1.0, round(cell * 0.3))
    scale = []
    for i, o in enumerate(("TP", "FP", "FN")):
        scale += [[i / 3, OUTCOME_COLORS[o]], [(i + 1) / 3, OUTCOME_COLORS[o]]]
    names = np.array(["TP (gold & predicted)", "FP (predicted only)", "FN (missed gold edge)"])
    # The marks sit on top and take the hover, so their text repeats p (and a block's counts).
    label = names[np.nan_to_num(code).astype(int)].astype(object)
    if size == 1:
        text = label + np.char.mod("<br>p = %.4g", z).astype(object)
    else:
        tallies = [block_reduce(m, size, "sum").astype(int) for m in (gold & pred, ~gold & pred, gold & ~pred)]
        text = (label + np.char.mod("<br>max p = %.4g", z).astype(object)
                + np.char.mod("<br>TP %d", tallies[0]).astype(object)
                + np.char.mod(" · FP %d", tallies[1]).astype(object)
                + np.char.mod(" · FN %d", tallies[2]).astype(object))
    fig.add_trace(go.Heatmap(
        z=code, x=x, y=y, zmin=-0.5, zmax=2.5, colorscale=scale, showscale=False, name="prediction",
        customdata=np.where(np.isnan(code), "", text),
        hovertemplate="query %{y} → key %{x}<br>%{customdata}<extra></extra>", xgap=gap, ygap=gap,
    ))
    # The key goes into the title, not into legend-only scatter traces: those would add an SVG
    # scatter layer and a legend to every redraw of the heatmap in the browser.
    key = " ".join(f'<span style="color:{OUTCOME_COLORS[o]}">■</span> {name}: {counts[o]}'
                   for o, name in zip(("TP", "FP", "FN"), names, strict=True))
    fig.layout.meta = {"overlay_counts": counts}
    return key


# Okabe–Ito: distinguishable with the common colour-vision deficiencies.
# Beyond eight methods colours repeat, so line dash and marker keep every method distinct.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
MARKERS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "star", "triangle-down", "hexagon")
DASHES = ("solid", "dash", "dot")


def pareto_figure(
    summary, front: str = "on_front", x: str = "sparsity", y: str = "recall", title: str | None = None
) -> go.Figure:
    """Recall against sparsity, one trace per method, frontier points joined and drawn larger.

    ``summary`` is :func:`sparsefinder.evaluation.pareto.pareto_front` output: one row per
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


# ---------------------------------------------------------------------- predicted vs gold heatmap


def outcome_grid(gold: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """``(n, n)`` codes: 0 neither, 1 TP (gold and predicted), 2 FP (predicted only), 3 FN (gold only)."""
    gold = np.asarray(gold, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    out = np.zeros(gold.shape, dtype=np.int8)
    out[gold & pred] = 1
    out[~gold & pred] = 2
    out[gold & ~pred] = 3
    return out


def outcome_heatmap(gold: np.ndarray, pred: np.ndarray, tokens, title: str, height: int | None = None,
                    allowed: np.ndarray | None = None):
    """Query × key heatmap of TP / FP / FN cells in :data:`OUTCOME_COLORS`, with a legend.

    ``allowed`` (the layer's valid pairs) draws the pairs its mask forbids in
    :data:`NOT_ALLOWED_COLOR`, apart from the pairs that are simply no edge.

    Above :data:`MAX_SIDE` tokens the grid is drawn as blocks of :func:`block_size`
    tokens, each in the colour of its worst outcome (FN over FP over TP); the
    legend still counts single cells.
    """
    cells = outcome_grid(gold, pred)
    size = block_size(cells.shape[0])
    codes = cells if size == 1 else block_reduce(cells, size, "max").astype(np.int8)
    labels = token_labels(list(tokens)) if size == 1 else block_labels(list(tokens), size)
    n = len(labels)
    step = 1 / len(OUTCOMES)
    scale = []
    for i, o in enumerate(OUTCOMES):
        scale += [[i * step, OUTCOME_COLORS[o]], [(i + 1) * step, OUTCOME_COLORS[o]]]
    names = np.array(["no edge", "TP (gold & predicted)", "FP (predicted only)", "FN (missed gold edge)"])
    forbidden = _forbidden(allowed, cells.shape, size)
    fig = go.Figure(
        go.Heatmap(
            z=codes if forbidden is None else np.where(forbidden, np.nan, codes),
            x=labels, y=labels, zmin=-0.5, zmax=len(OUTCOMES) - 0.5, colorscale=scale, showscale=False,
            customdata=names[codes], xgap=1, ygap=1, name="outcome",
            hovertemplate="query %{y} → key %{x}<br>%{customdata}<extra></extra>",
        )
    )
    if forbidden is not None:
        fig.add_trace(_forbidden_trace(forbidden, labels, labels))
    for o, name in zip(OUTCOMES[1:], names[1:], strict=True):  # legend entries
        count = int((cells == OUTCOMES.index(o)).sum())
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"{name}: {count}",
                                 marker=dict(color=OUTCOME_COLORS[o], size=12, symbol="square")))
    fig.update_layout(
        title=dict(text=title),
        xaxis=dict(title="key", side="top", tickangle=-60, type="category"),
        yaxis=dict(title="query", autorange="reversed", type="category"),
        height=height or min(300 + 22 * n, 1400), plot_bgcolor="white",
        legend=dict(orientation="h", yanchor="top", y=-0.02),
        margin=dict(l=10, r=10, t=130, b=10),
    )
    return fig
