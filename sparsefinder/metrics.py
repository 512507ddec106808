r"""Metrics of a predicted attention graph against the gold entmax graph (docs/method.md §2).

For one sentence ``b`` and head ``h`` let :math:`V` be its valid pairs (both
positions real and, for a causal model, :math:`j \le i`; :math:`|V| = n^2`, or
:math:`n(n+1)/2` when causal; in a sliding-window layer only the pairs its mask
allows, :func:`sparsefinder.graphs.num_valid_pairs`), :math:`Q` its real queries, :math:`G` the gold
edges and :math:`\hat G` the predicted ones (both subsets of :math:`V`):

.. math::
    \mathrm{recall} = \frac{|G \cap \hat G|}{|G|}, \qquad
    \mathrm{precision} = \frac{|G \cap \hat G|}{|\hat G|}, \qquad
    \mathrm{sparsity} = 1 - \frac{|\hat G|}{|V|}, \qquad
    \mathrm{gold\_sparsity} = 1 - \frac{|G|}{|V|},

.. math::
    \mathrm{exact} = \frac{|\{i \in Q : G_i \subseteq \hat G_i\}|}{|Q|}, \qquad
    \mathrm{efficiency} = 1 - \frac{\mathrm{cost}}{|V|}, \qquad
    \mathrm{mass\_recall} = \frac{\sum_{\hat G} p_{ij}}{\sum_{V} p_{ij}}.

Mass recall needs the gold probabilities :math:`p_{ij}` (``probs``; see
:mod:`sparsefinder.mass`, which also computes the output error of entmax
restricted to :math:`\hat G`). Without them it is NaN, and so are its counts
``gold_mass`` and ``mass_hits``: unknown, never a fake 1.

Conventions for empty sets (so that every value is defined and an empty
prediction of an empty gold graph is perfect):

- recall = 1 when :math:`|G| = 0` (nothing to find, nothing missed), and likewise
  mass recall = 1 when the gold mass is 0;
- precision = 1 when :math:`|\hat G| = |G| = 0`, and 0 when :math:`|\hat G| = 0 < |G|`;
- a sentence without real tokens (:math:`n = 0`, e.g. an empty text in a decoder
  without BOS) has no pairs at all: every ratio is NaN there, so it drops out of
  macro averages, and its counts are 0, so it adds nothing to micro averages.

``cost`` is the number of pairs a real kernel must score; it defaults to
:math:`|\hat G|`. For bucketing or clustering it is the grouped computation's
cost, which may exceed :math:`|\hat G|`; efficiency is not clipped and may go
below 0 when a method scores more than :math:`|V|` pairs.

Per-(sentence, layer, head) values go into a tidy frame
(:func:`per_sentence_frame`, :func:`metrics_frame`) that keeps the counts, so
any aggregation (:func:`aggregate`: macro by default, micro on request) can be
recomputed from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from sparsefinder.graphs import AttentionGraph, num_valid_pairs
from sparsefinder.mass import mass_counts

CONFIG_COLUMNS: tuple[str, ...] = ("method", "family", "params")
"""The columns that name a predictor configuration in sweep and curve tables."""

RATIO_COLUMNS: tuple[str, ...] = (
    "recall", "precision", "sparsity", "gold_sparsity", "exact", "efficiency", "mass_recall",
)
COUNT_COLUMNS: tuple[str, ...] = (
    "gold_edges",
    "pred_edges",
    "hits",
    "valid_pairs",
    "valid_queries",
    "covered_queries",
    "cost",
    "gold_mass",
    "mass_hits",
)
FLOAT_COUNT_COLUMNS: tuple[str, ...] = ("cost", "gold_mass", "mass_hits")
"""Counts that are sums of reals (a kernel's cost may be fractional, e.g. n²·r/d; probability mass); the
other counts are integers."""
HEAD_METRICS: dict[str, str] = {
    "recall": "Recall", "mass_recall": "Mass recall", "precision": "Precision",
    "sparsity": "Sparsity", "exact": "Exact", "output_error": "Output error",
}
"""The metrics a page shows for one head's prediction on a text, with their labels (``output_error`` comes from
:mod:`sparsefinder.mass` and needs the values: a text's run has them, a stored corpus does not)."""
ID_COLUMNS: tuple[str, ...] = ("sentence", "layer", "head")
FRAME_COLUMNS: tuple[str, ...] = ID_COLUMNS + RATIO_COLUMNS + COUNT_COLUMNS


def _check_same_batch(gold: AttentionGraph, pred: AttentionGraph) -> None:
    if gold.edges.shape != pred.edges.shape:
        raise ValueError(
            "gold and predicted graphs are over different batches: edge shapes "
            f"{tuple(gold.edges.shape)} vs {tuple(pred.edges.shape)}"
        )
    if not torch.equal(gold.lengths.cpu().long(), pred.lengths.cpu().long()):
        raise ValueError(
            "gold and predicted graphs are over different batches: lengths "
            f"{gold.lengths.tolist()} vs {pred.lengths.tolist()}"
        )
    if gold.causal != pred.causal:
        raise ValueError(
            f"gold and predicted graphs are over different batches: causal={gold.causal} vs causal={pred.causal}"
        )
    # A predictor that knows nothing of the layer's window predicts over all pairs (window None);
    # its edges outside the window are dropped in graph_metrics.
    if pred.window is not None and pred.window != gold.window:
        raise ValueError(f"gold and predicted graphs are over different layers: window {gold.window} vs {pred.window}")


def _torch_ratios(
    hits: torch.Tensor,
    gold_edges: torch.Tensor,
    pred_edges: torch.Tensor,
    valid_pairs: torch.Tensor,
    valid_queries: torch.Tensor,
    covered_queries: torch.Tensor,
    cost: torch.Tensor,
    gold_mass: torch.Tensor | None = None,
    mass_hits: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The ratios of the module docstring from counts, with its empty-set conventions."""
    hits, gold_edges, pred_edges = hits.double(), gold_edges.double(), pred_edges.double()
    pairs, queries = valid_pairs.double(), valid_queries.double()
    # Denominators clamped to 1 only to avoid 0/0; the where() picks the convention there.
    recall = torch.where(gold_edges > 0, hits / gold_edges.clamp(min=1), 1.0)
    precision = torch.where(pred_edges > 0, hits / pred_edges.clamp(min=1), (gold_edges == 0).double())
    empty = pairs == 0
    out = {
        "recall": recall,
        "precision": precision,
        "sparsity": 1.0 - pred_edges / pairs.clamp(min=1),
        "gold_sparsity": 1.0 - gold_edges / pairs.clamp(min=1),
        "exact": covered_queries.double() / queries.clamp(min=1),
        "efficiency": 1.0 - cost.double() / pairs.clamp(min=1),
    }
    if gold_mass is None or mass_hits is None:
        out["mass_recall"] = torch.full_like(recall, float("nan"))
    else:
        mass, kept = gold_mass.double(), mass_hits.double()
        # An unknown (NaN) mass stays NaN: NaN > 0 is False, so the where() alone would say 1.
        out["mass_recall"] = torch.where(mass > 0, kept / mass.clamp(min=1e-300), 1.0).masked_fill(mass.isnan(),
                                                                                                    float("nan"))
    return {k: v.masked_fill(empty, float("nan")) for k, v in out.items()}


def graph_metrics(
    gold: AttentionGraph,
    pred: AttentionGraph,
    cost: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    r"""Per-(sentence, head) metrics of ``pred`` against ``gold`` for one layer.

    Returns ``(B, H)`` tensors on ``gold``'s device: float64 ratios ``recall``,
    ``precision``, ``sparsity``, ``gold_sparsity``, ``exact``, ``efficiency``,
    ``mass_recall`` (definitions and empty-set conventions in the module docstring), int64 counts
    ``gold_edges`` :math:`|G|`, ``pred_edges`` :math:`|\hat G|`, ``hits``
    :math:`|G \cap \hat G|`, ``valid_pairs`` :math:`|V|`, ``valid_queries``
    :math:`|Q| = n`, ``covered_queries`` :math:`|\{i : G_i \subseteq \hat G_i\}|`,
    and the float64 ``cost`` used for efficiency, ``gold_mass`` and ``mass_hits``
    (:func:`sparsefinder.mass.mass_counts`).

    ``probs``: the ``(B, H, N, N)`` gold entmax probabilities of the layer (only the
    valid pairs count), for mass recall; without them the mass columns are NaN.

    ``cost``: pairs a real kernel must score, broadcastable to ``(B, H)``;
    defaults to ``pred_edges``. Raises ``ValueError`` when the graphs are over
    different batches (shape, lengths or causal flag differ) or ``cost`` does
    not fit.
    """
    _check_same_batch(gold, pred)
    g = gold.edges
    p = pred.edges.to(g.device)
    if gold.window is not None and pred.window is None:
        p = p & gold.valid_pairs()
    batch, heads = int(g.shape[0]), int(g.shape[1])
    lengths = gold.lengths.to(g.device).long()

    # Edges outside the valid pairs were dropped when the graphs were built, so
    # plain sums already count only valid pairs.
    gold_edges = g.sum(dim=(-1, -2))
    pred_edges = p.sum(dim=(-1, -2))
    hits = (g & p).sum(dim=(-1, -2))
    valid_pairs = num_valid_pairs(lengths, gold.causal, gold.window)[:, None].expand(batch, heads)
    valid_queries = lengths[:, None].expand(batch, heads)
    # A query is covered when none of its gold keys is missing from the prediction;
    # padding rows have no edges and would look covered, hence the query mask.
    missed = (g & ~p).any(dim=-1)
    covered_queries = (~missed & gold.valid_queries()).sum(dim=-1)

    if cost is None:
        cost_t = pred_edges.double()
    else:
        cost_t = torch.as_tensor(cost, device=g.device).double()
        try:
            cost_t = torch.broadcast_to(cost_t, (batch, heads))
        except RuntimeError as err:
            raise ValueError(f"cost must broadcast to (B, H) = {(batch, heads)}, got {tuple(cost_t.shape)}") from err
        if bool((cost_t < 0).any()):
            raise ValueError("cost must be non-negative")

    counts = {
        "gold_edges": gold_edges,
        "pred_edges": pred_edges,
        "hits": hits,
        "valid_pairs": valid_pairs.contiguous(),
        "valid_queries": valid_queries.contiguous(),
        "covered_queries": covered_queries,
    }
    counts = {k: v.long() for k, v in counts.items()}
    if probs is None:
        gold_mass = mass_hits = torch.full((batch, heads), float("nan"), dtype=torch.float64, device=g.device)
    else:
        if tuple(probs.shape) != tuple(g.shape):
            raise ValueError(f"probs must be shaped like the gold edges {tuple(g.shape)}, got {tuple(probs.shape)}")
        # A model's probabilities on padding rows are not zero (entmax over a masked row): drop them.
        gold_mass, mass_hits = mass_counts(probs.to(g.device) * gold.valid_pairs(), p)
    ratios = _torch_ratios(**counts, cost=cost_t, gold_mass=gold_mass, mass_hits=mass_hits)
    return {**ratios, **counts, "cost": cost_t.contiguous(), "gold_mass": gold_mass, "mass_hits": mass_hits}


def _as_int_array(ids: Sequence[int] | torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr.astype(np.int64)


def per_sentence_frame(
    metrics_by_layer: Mapping[int, Mapping[str, torch.Tensor]],
    sentence_ids: Sequence[int] | torch.Tensor | np.ndarray,
    extra: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Tidy frame with one row per (sentence, layer, head) from :func:`graph_metrics` outputs.

    ``metrics_by_layer[layer]`` is one layer's ``graph_metrics`` dict over a batch
    of ``B`` sentences whose ids are ``sentence_ids`` (length ``B``). ``extra``
    maps column names to scalars repeated on every row (e.g. method name and
    hyperparameter of a sweep); they are placed after the id columns, and
    :func:`aggregate` always groups by them.

    Columns: ``sentence, layer, head, *extra, recall, precision, sparsity,
    gold_sparsity, exact, efficiency, mass_recall, gold_edges, pred_edges, hits, valid_pairs,
    valid_queries, covered_queries, cost, gold_mass, mass_hits``; rows sorted by (sentence, layer, head).
    """
    ids = _as_int_array(sentence_ids, "sentence_ids")
    extra = dict(extra or {})
    clash = set(extra) & set(FRAME_COLUMNS)
    if clash:
        raise ValueError(f"extra columns clash with metric columns: {sorted(clash)}")
    for key, value in extra.items():
        if not np.isscalar(value) and value is not None:
            raise ValueError(f"extra column {key!r} must be a scalar, got {type(value).__name__}")

    parts = []
    for layer, metrics in metrics_by_layer.items():
        missing = [c for c in RATIO_COLUMNS + COUNT_COLUMNS if c not in metrics]
        if missing:
            raise ValueError(f"layer {layer}: metrics lack {missing}")
        shape = tuple(metrics["recall"].shape)
        if len(shape) != 2 or shape[0] != len(ids):
            raise ValueError(f"layer {layer}: metrics are {shape}, expected (B, H) with B = {len(ids)} sentence ids")
        batch, heads = shape
        cols: dict[str, Any] = {
            "sentence": np.repeat(ids, heads),
            "layer": np.full(batch * heads, int(layer), dtype=np.int64),
            "head": np.tile(np.arange(heads, dtype=np.int64), batch),
        }
        cols.update({k: [v] * (batch * heads) for k, v in extra.items()})
        for c in RATIO_COLUMNS + COUNT_COLUMNS:
            dtype = torch.float64 if c in RATIO_COLUMNS or c in FLOAT_COUNT_COLUMNS else torch.int64
            cols[c] = metrics[c].detach().cpu().to(dtype).numpy().reshape(-1)
        parts.append(pd.DataFrame(cols))
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype="float64" if c in RATIO_COLUMNS + FLOAT_COUNT_COLUMNS else "int64")
                             for c in FRAME_COLUMNS})
    frame = pd.concat(parts, ignore_index=True)
    return frame.sort_values(list(ID_COLUMNS), kind="stable").reset_index(drop=True)


def metrics_frame(
    gold_graphs: Sequence[AttentionGraph],
    pred_graphs: Sequence[AttentionGraph],
    sentence_ids: Sequence[int] | torch.Tensor | np.ndarray,
    layers: Sequence[int] | None = None,
    costs: Sequence[torch.Tensor | None] | None = None,
    extra: Mapping[str, Any] | None = None,
    probs: Sequence[torch.Tensor | None] | None = None,
) -> pd.DataFrame:
    """:func:`graph_metrics` for each layer of one batch, as a :func:`per_sentence_frame`.

    ``gold_graphs[k]`` and ``pred_graphs[k]`` are layer ``layers[k]`` (default
    ``k``); ``costs[k]`` is that layer's optional ``(B, H)`` cost and ``probs[k]``
    its optional gold probabilities (for mass recall).
    """
    if len(gold_graphs) != len(pred_graphs):
        raise ValueError(f"{len(gold_graphs)} gold layers but {len(pred_graphs)} predicted layers")
    layer_ids = list(range(len(gold_graphs))) if layers is None else [int(x) for x in layers]
    if len(layer_ids) != len(gold_graphs) or len(set(layer_ids)) != len(layer_ids):
        raise ValueError("layers must give one distinct id per graph")
    cost_list = [None] * len(gold_graphs) if costs is None else list(costs)
    if len(cost_list) != len(gold_graphs):
        raise ValueError("costs must give one entry (or None) per layer")
    prob_list = [None] * len(gold_graphs) if probs is None else list(probs)
    if len(prob_list) != len(gold_graphs):
        raise ValueError("probs must give one entry (or None) per layer")
    layer_inputs = zip(layer_ids, gold_graphs, pred_graphs, cost_list, prob_list, strict=True)
    by_layer = {layer: graph_metrics(g, p, c, pr) for layer, g, p, c, pr in layer_inputs}
    return per_sentence_frame(by_layer, sentence_ids, extra)


def _numpy_ratios(counts: pd.DataFrame) -> pd.DataFrame:
    """Same conventions as :func:`_torch_ratios`, on pooled counts (micro averages)."""
    # A copy: pandas may hand out read-only views, which torch warns about.
    tensors = {c: torch.from_numpy(counts[c].to_numpy().copy()) for c in COUNT_COLUMNS}
    ratios = _torch_ratios(**tensors)
    return pd.DataFrame({k: v.numpy() for k, v in ratios.items()}, index=counts.index)


def aggregate(
    frame: pd.DataFrame,
    by: Sequence[str] = ("layer", "head"),
    micro: bool = False,
) -> pd.DataFrame:
    r"""Average a :func:`per_sentence_frame` per head, per layer or overall.

    Groups are ``by`` plus every *setting* column of ``frame`` (any column that
    is neither an id nor a metric, e.g. a sweep's method and hyperparameter), so
    different settings are never averaged together. ``by=("layer", "head")``:
    per head; ``by=("layer",)``: per layer; ``by=()``: overall.

    Macro (default, docs/method.md §2): first the mean over the group's rows of each
    sentence (for a per-layer group, the mean over heads), then the mean over
    sentences:

    .. math:: \bar m_{g} = \frac{1}{|S_g|} \sum_{s \in S_g} \frac{1}{|R_{g,s}|} \sum_{r \in R_{g,s}} m_r

    With every head present for every sentence this weighs each (sentence,
    head) value equally. Sentences without pairs (NaN ratios) are skipped.

    Micro (``micro=True``): the counts are pooled over the group and the ratios
    recomputed from the sums, with the same empty-set conventions.

    The result has the group columns, the six ratios, the summed counts and
    ``sentences`` (distinct sentences with at least one valid pair).
    """
    by = list(by)
    missing = [c for c in by + list(ID_COLUMNS + RATIO_COLUMNS + COUNT_COLUMNS) if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing}")
    metric_like = set(ID_COLUMNS + RATIO_COLUMNS + COUNT_COLUMNS)
    settings = [c for c in frame.columns if c not in metric_like and c not in by]
    keys = settings + by

    # A constant key lets the overall (keys = []) case share the groupby path.
    work = frame.assign(_all=0)
    group_keys = keys or ["_all"]
    grouped = work.groupby(group_keys, sort=True, dropna=False)
    # min_count: a group whose mass is unknown (NaN) sums to NaN, not to a mass of 0.
    sums = grouped[list(COUNT_COLUMNS)].sum(min_count=1)
    sentences = work[work["valid_pairs"] > 0].groupby(group_keys, sort=True, dropna=False)["sentence"].nunique()
    if micro:
        ratios = _numpy_ratios(sums)
    else:
        # by=("sentence", ...) is already per sentence: the first stage is then the identity.
        sentence_keys = group_keys if "sentence" in group_keys else group_keys + ["sentence"]
        per_sentence = work.groupby(sentence_keys, sort=True, dropna=False)[list(RATIO_COLUMNS)].mean()
        ratios = per_sentence.groupby(level=list(range(len(group_keys))), sort=True, dropna=False).mean()
    out = ratios.join(sums)
    out["sentences"] = sentences.reindex(out.index).fillna(0).astype(np.int64)
    out = out.reset_index()
    if not keys:
        out = out.drop(columns="_all")
    return out[keys + list(RATIO_COLUMNS) + list(COUNT_COLUMNS) + ["sentences"]]


def gold_sparsity_grid(source: Any) -> np.ndarray:
    r"""``(layers, heads)`` mean over sentences of the gold sparsity :math:`1 - |G|/|V|`.

    ``source`` is one of:

    - a sequence of per-layer gold :class:`AttentionGraph` of one batch (row
      ``k`` = ``source[k]``), or a mapping ``layer -> graph`` (rows in sorted
      layer order);
    - an extraction-like object with ``num_layers`` and ``gold(layer)``
      (duck-typed, so this module need not import the model);
    - a :func:`per_sentence_frame` (rows in sorted layer order, heads in sorted
      order; repeated settings of the same sentence count once).

    Sentences without real tokens are left out of the mean.
    """
    if isinstance(source, pd.DataFrame):
        cells = source.drop_duplicates(subset=list(ID_COLUMNS))
        grid = cells.groupby(["layer", "head"])["gold_sparsity"].mean().unstack("head").sort_index()
        return grid.sort_index(axis=1).to_numpy(dtype=np.float64)
    if isinstance(source, Mapping):
        graphs = [source[k] for k in sorted(source)]
    elif hasattr(source, "gold") and hasattr(source, "num_layers"):
        graphs = [source.gold(layer) for layer in range(source.num_layers)]
    else:
        graphs = list(source)
    if not graphs:
        raise ValueError("no graphs")
    rows = []
    for graph in graphs:
        if not isinstance(graph, AttentionGraph):
            raise TypeError(f"expected AttentionGraph, got {type(graph).__name__}")
        real = (graph.lengths > 0).cpu()
        sparsity = graph.sparsity().cpu()[real]
        # An all-empty batch has no defined sparsity; NaN rather than a fake 1.
        rows.append(sparsity.mean(dim=0).numpy() if len(sparsity) else np.full(graph.num_heads, np.nan))
    if len({len(r) for r in rows}) != 1:
        raise ValueError("layers have different numbers of heads")
    return np.stack(rows).astype(np.float64)
