"""One padded batch of stored sentences, and the counts every metric is computed from."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsefinder.graphs import num_valid_pairs, real_tokens, valid_pair_mask
from sparsefinder.predictors.base import (
    Predictor,
    shared_pattern,
)


def _last_sum(x: torch.Tensor, dims: int) -> torch.Tensor:
    """int32 count of True over the last ``dims`` dims of a bool tensor.

    Through a uint8 view of rows of a 2-D reshape: on CPU several times faster than a bool sum,
    and than the same sum over the dims of a 5-D tensor; exact (integers, far below 2³¹).
    """
    shape = x.shape[: x.dim() - dims]
    return x.view(torch.uint8).reshape(-1, math.prod(x.shape[x.dim() - dims:])).sum(dim=-1, dtype=torch.int32
                                                                                    ).reshape(shape)


@dataclass
class _Batch:
    """One padded batch of one layer, with everything the kernels share.

    ``cache`` holds work shared by the configurations of this layer (squared
    distances, ranks, distances to centroids); ``shared`` is the same dict for
    every layer of the batch and holds what does not depend on the layer
    (random draws and the levels built from them, fixed patterns).
    """

    layer: int
    lengths: torch.Tensor  # (B,)
    causal: bool
    gold: torch.Tensor  # (B, H, N, N) bool, valid pairs only
    raw_q: torch.Tensor
    raw_k: torch.Tensor
    proj_q: torch.Tensor | None
    proj_k: torch.Tensor | None
    head_dim: int
    sentence_ids: torch.Tensor
    context: dict[str, Any]
    shared: dict[Any, Any] = field(default_factory=dict)
    window: int | None = None  # the layer's sliding window (largest |i - j| its mask allows)
    # (B, H, N, N) float32 gold probabilities, zero off the gold graph (for mass recall); None: mass unknown.
    probs: torch.Tensor | None = None
    cache: dict[Any, Any] = field(default_factory=dict)
    shape: tuple[int, int, int] = field(init=False)
    valid: torch.Tensor = field(init=False)
    real: torch.Tensor = field(init=False)
    gold_edges: torch.Tensor = field(init=False)
    gold_mass: torch.Tensor = field(init=False)
    row_gold: torch.Tensor = field(init=False)
    valid_pairs: torch.Tensor = field(init=False)
    valid_queries: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        b, h, n, _ = self.gold.shape
        self.shape = (b, h, n)
        key = ("valid", self.window)  # layers of one window share the mask
        if key not in self.shared:
            self.shared[key] = valid_pair_mask(self.lengths, n, self.causal, self.window)  # (B, 1, N, N)
        self.valid = self.shared[key]
        self.real = real_tokens(self.lengths, n)  # (B, N)
        # Sums of bool tensors are much faster through a uint8 view with an explicit accumulator type.
        self.row_gold = _last_sum(self.gold, 1)  # (B, H, N)
        self.gold_edges = self.row_gold.sum(dim=-1).long()
        if self.probs is None:
            self.gold_mass = torch.full((b, h), float("nan"), dtype=torch.float64, device=self.lengths.device)
        else:
            # The mass lives on the gold edges only (a fifth of the pairs or fewer): every mass sum is a
            # weighted bincount over them, in row-major order, so it is the same whatever the padding.
            flat = self.gold.reshape(-1).nonzero().squeeze(1)
            self.gold_index = flat
            self.gold_segment = flat // (n * n)  # (sentence, head) of each gold edge
            self.gold_p = self.probs.reshape(-1)[flat].double()
            self.gold_mass = self._segment_sum(self.gold_p)
        self.valid_pairs = num_valid_pairs(self.lengths, self.causal, self.window)[:, None].expand(b, h)
        self.valid_queries = self.lengths[:, None].expand(b, h)

    def _segment_sum(self, weights: torch.Tensor) -> torch.Tensor:
        b, h, _ = self.shape
        return torch.bincount(self.gold_segment, weights=weights, minlength=b * h).reshape(b, h)

    def at_gold(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (``(B, H|1, N, N)``) at each gold edge, in the order of ``gold_p``."""
        if values.shape[1] == self.shape[1]:
            return values.reshape(-1)[self.gold_index]
        b, h, n = self.shape  # one head for all: skip the head part of the flat index
        index = self.gold_index // (h * n * n) * (n * n) + self.gold_index % (n * n)
        return values.reshape(-1)[index]

    def inputs(self, cls: type[Predictor]) -> tuple[torch.Tensor, torch.Tensor]:
        if cls.reads_projections(self.proj_q is not None):
            assert self.proj_q is not None and self.proj_k is not None
            return self.proj_q, self.proj_k
        return self.raw_q, self.raw_k

    def predictor_context(self) -> dict[str, Any]:
        return {"head_dim": self.head_dim, "sentence_ids": self.sentence_ids, **self.context}


Counts = dict[str, torch.Tensor]
"""``pred_edges``, ``hits``, ``covered_queries`` (int64), ``cost`` and ``mass_hits`` (float64), each ``(C, B, H)``."""
_COUNT_KEYS = ("pred_edges", "hits", "covered_queries", "cost", "mass_hits")
_FLOAT_KEYS = ("cost", "mass_hits")


def _mass_hits(edges: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """``(B, H)`` float64 gold probability on the predicted pairs (NaN when the batch has no probabilities)."""
    b, h, _ = batch.shape
    if batch.probs is None:
        return torch.full((b, h), float("nan"), dtype=torch.float64, device=batch.lengths.device)
    return batch._segment_sum(batch.gold_p * batch.at_gold(edges))


def _count(edges: torch.Tensor) -> torch.Tensor:
    """Edges per (sentence, head) of a ``(B, H|1, N, N)`` bool tensor, int64.

    Summed as uint8 into int32 (exact: a sentence has far fewer than 2³¹ pairs),
    several times faster than a bool sum into int64.
    """
    return _last_sum(edges, 2).long()


def _dense_counts(edges: torch.Tensor, cost: torch.Tensor, batch: _Batch) -> Counts:
    """Counts of one predicted graph (``(B, H|1, N, N)`` bool, valid pairs only) against the gold graph."""
    b, h, _ = batch.shape
    row_hits = _last_sum(batch.gold & edges, 1)  # (B, H, N)
    hits = row_hits.sum(dim=-1).long()
    # A query is covered when it hits all its gold keys; padding rows (0 == 0) must not count.
    covered = ((row_hits == batch.row_gold) & batch.real[:, None, :]).sum(dim=-1)
    pred = _count(edges).expand(b, h)
    return {"pred_edges": pred[None], "hits": hits[None], "covered_queries": covered[None],
            "cost": torch.broadcast_to(cost.double(), (b, h))[None], "mass_hits": _mass_hits(edges, batch)[None]}


def _finish(core: torch.Tensor, core_cost: torch.Tensor | None, batch: _Batch, window: int, global_tokens: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictor's own tail (:meth:`Predictor._run`): mask, OR window/global, cost = core cost + added edges.

    Returns ``(B, H|1, N, N)`` edges (a head-independent core stays one head) and the ``(B, H)`` cost.
    """
    core = core & batch.valid
    base = _count(core).double() if core_cost is None else core_cost.double()
    extra = shared_pattern(batch.lengths, batch.shape[2], window, global_tokens)
    if extra is None:
        return core, base
    edges = core | (extra & batch.valid)
    # The core is a subset of the edges, so the added edges are the difference of the counts.
    return edges, base + (_count(edges) - _count(core)).double()


def _cumulative_hist(levels: torch.Tensor, n_levels: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``(R, C)``: for each row of ``(R, M)`` levels in ``[0, C]``, how many are ``<= c`` (level C = never).

    With ``weights`` (``(R, M)``), the sum of their weights instead of the count (float64).
    """
    rows = levels.shape[0]
    width = n_levels + 1
    key = levels.to(torch.int32) + torch.arange(rows, dtype=torch.int32, device=levels.device)[:, None] * width
    w = None if weights is None else weights.reshape(-1).double()
    hist = torch.bincount(key.reshape(-1), weights=w, minlength=rows * width).reshape(rows, width)
    return hist.cumsum(dim=-1)[:, :n_levels]


def _level_dtype(n_levels: int) -> torch.dtype:
    # Small integer levels: elementwise work on uint8 moves an eighth of the bytes of int64.
    return torch.uint8 if n_levels < 255 else torch.int32


def _never(mask: torch.Tensor, n_levels: int, dtype: torch.dtype) -> torch.Tensor:
    """``C`` where ``mask`` is False, 0 elsewhere (to be combined with ``torch.maximum``).

    Arithmetic instead of ``torch.where``, which is an order of magnitude slower
    on small integer types.
    """
    return (~mask).to(dtype) * n_levels


@dataclass
class _Levels:
    """A nested family on one batch: ``core`` ``(B, H|1, N, N)`` levels (C = never, :func:`_level_dtype`)
    of the method's own edges, ``extra`` ``(B, 1, N, N)`` window/global edges present at every level, and
    the core cost ``(B, H)`` when it is not the edge count (distance). ``position`` ``(H, C)``: when
    the nesting order differs per head (per-head thresholds), the level at which head ``h`` has grid
    point ``c``; ``None``: level ``c`` is grid point ``c`` in every head."""

    core: torch.Tensor
    extra: torch.Tensor | None = None
    core_cost: torch.Tensor | None = None
    position: torch.Tensor | None = None


def _nested_counts(lv: _Levels, n_levels: int, batch: _Batch) -> Counts:
    """Counts of every grid point of a nested family at once, from per-pair levels (module docstring)."""
    b, h, n = batch.shape
    c = n_levels
    dtype = lv.core.dtype
    levels = lv.core
    if lv.extra is not None:
        levels = levels * (~lv.extra).to(dtype)  # window/global pairs: level 0
    levels = torch.maximum(levels, _never(batch.valid, c, dtype))
    hs = levels.shape[1]
    pred = _cumulative_hist(levels.reshape(b * hs, n * n), c).reshape(b, hs, c)
    gold_levels = torch.maximum(levels, _never(batch.gold, c, dtype))
    hits = _cumulative_hist(gold_levels.reshape(b * h, n * n), c).reshape(b, h, c)
    if batch.probs is None:
        mass = torch.full((b, h, c), float("nan"), dtype=torch.float64, device=hits.device)
    else:  # the mass lives on the gold edges: a weighted histogram of their levels, per (sentence, head)
        width = c + 1
        key = batch.at_gold(levels).long() + batch.gold_segment * width
        mass = torch.bincount(key, weights=batch.gold_p, minlength=b * h * width).reshape(b, h, width)
        mass = mass.cumsum(dim=-1)[..., :c]
    # A query is covered at level c when its latest gold key enters by level c (no gold key: always).
    latest = ((levels + 1) * batch.gold.to(dtype)).amax(dim=-1).to(torch.int32) - 1  # -1: no gold key
    latest = torch.where(batch.real[:, None, :], latest.clamp(min=0), c)
    covered = _cumulative_hist(latest.reshape(b * h, n), c).reshape(b, h, c)
    pred = pred.expand(b, h, c)
    if lv.core_cost is None:
        cost = pred.double()
    else:
        # cost = core cost + |extra edges not already in the core| (as Predictor._run counts it).
        if lv.extra is None:
            added = torch.zeros(b, h, c, dtype=torch.float64, device=pred.device)
        else:
            ev = lv.extra & batch.valid
            core_in = torch.maximum(lv.core, _never(ev, c, dtype))
            hc = core_in.shape[1]
            inside = _cumulative_hist(core_in.reshape(b * hc, n * n), c).reshape(b, hc, c)
            added = (_count(ev)[..., None] - inside).double().expand(b, h, c)
        cost = lv.core_cost.double()[..., None] + added
    out = {"pred_edges": pred, "hits": hits, "covered_queries": covered, "cost": cost, "mass_hits": mass}
    if lv.position is not None:  # each head's levels back to grid order
        index = lv.position.to(hits.device)[None].expand(b, h, c)
        out = {k: v.gather(-1, index) for k, v in out.items()}
    return {k: v.permute(2, 0, 1) for k, v in out.items()}


def _generic_counts(batch: _Batch, pred: Predictor) -> Counts:
    """Counts of one configuration through the predictor itself (every method has this path)."""
    q, k = batch.inputs(type(pred))
    graph, cost = pred.predict_with_cost(q, k, batch.lengths, batch.causal, **batch.predictor_context())
    edges = graph.edges if batch.window is None else graph.edges & batch.valid  # as graph_metrics scores it
    return _dense_counts(edges, cost, batch)


@dataclass(frozen=True)
class _Nested:
    """A method whose grid parameter ``param`` only adds edges as it grows: the whole grid in one pass."""

    param: str
    levels: Callable[[_Batch, Predictor, list[Any]], _Levels]
    descending: bool = False  # grid order in which the graphs grow
    usable: Callable[[_Batch], bool] = lambda batch: True
    # What ``levels`` gets of each configuration (its layer's predictor); default: the value of ``param``.
    value: Callable[[Predictor], Any] | None = None


# Fast paths, keyed by the predictor *class*: a method re-registered under the same name with
# another class runs the generic path, never a kernel written for the old one. Filled by
# nested.py, learned.py, dense.py and pages.py, beside the kernels themselves.
NESTED: dict[type[Predictor], _Nested] = {}
SHARED_DENSE: dict[type[Predictor], Callable[[_Batch, Predictor], Counts]] = {}
# Kernels that score every configuration of a method together: they get each configuration's
# predictor of the layer, in grid order, and return the counts in that order.
GROUPED: dict[type[Predictor], Callable[[_Batch, list[Predictor]], Counts]] = {}
