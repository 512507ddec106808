r"""The sweep engine: every predictor over its grid, every layer and head, on a stored corpus split.

:func:`run_sweep` streams an :class:`~sparsefinder.corpora.store.ExtractionStore` one
padded batch of sentences (with all its layers) at a time, so memory holds one
batch, never the corpus, and scores every configuration (method × grid point) against the gold entmax
graph with the metrics of :mod:`sparsefinder.metrics` (docs/method.md §2). The result is
a tidy :class:`pandas.DataFrame` (:data:`SWEEP_COLUMNS`), one row per
(method, params, layer, head):

- ``recall``, ``precision``, ``sparsity``, ``gold_sparsity``, ``exact``,
  ``efficiency``: the *macro* means over sentences (per sentence first, then
  the mean over the ``sentences`` sentences that have at least one valid pair),
  exactly as :func:`sparsefinder.metrics.aggregate` computes them;
- ``gold_edges``, ``pred_edges``, ``hits``, ``valid_pairs``, ``valid_queries``,
  ``covered_queries``, ``cost``: the sums over sentences, so micro averages
  can be recomputed;
- ``params`` is the grid point as canonical JSON (:func:`canonical_params`);
  the full hyperparameters of each configuration are in ``frame.attrs["sweep"]``.

With ``per_sentence=True`` the same engine returns one row per
(method, params, sentence, layer, head) instead, in the layout of
:func:`sparsefinder.metrics.per_sentence_frame` (``method``, ``family`` and
``params`` are its setting columns, so ``metrics.aggregate`` reproduces the
aggregated table). Any per-sentence row is thus reproducible from the
aggregated table by rerunning one configuration on the sentences wanted
(``methods=[m], grids={m: [params]}, layers=[l], indices=[...]``).

Speed comes from sharing work across the grid; nothing loops over heads, and
metrics are batched tensor counts (``hits = (gold & pred).sum``):

- the projections are applied once per batch and layer, for every method;
- *nested* families, where a larger grid value only adds edges, are scored
  for the whole grid in one pass: each pair gets the first grid index at which
  it becomes an edge (its *level*) and the counts of every grid point are
  cumulative histograms of the levels (``bincount``). This covers distance
  (squared distances computed once; level = number of thresholds below the
  distance), window and position, Longformer (number of global tokens), BigBird
  (number of random keys: one seeded draw and one sort per batch), random
  (matched sparsity) and blocks (``top_k``);
- bucketing ranks the tokens of every projected dimension once per batch; a
  grid point's bins are then ``rank // ⌈n/β⌉``;
- k-means computes the distances to the centroids once per fitted set of
  centroids (shared by its ``top_t`` values);
- the grouping methods (bucketing, k-means, Reformer, Routing) pack each
  token's groups into integer bit codes, so "shares a group" is one broadcast
  AND per 31 groups instead of the predictors' matmul over the groups, and
  their grouped cost comes from group sizes;
- random draws (BigBird, random) and fixed patterns do not depend on the
  layer: batches hold every layer, and these are computed once per batch;
- everything else (strided, syntax, lexical, …) calls the predictor's own
  batched :meth:`~sparsefinder.predictors.base.Predictor.predict_with_cost`
  over the whole padded batch.

Levels and masks use ``uint8`` arithmetic rather than ``torch.where`` and bool
sums go through ``uint8`` views: on CPU both are many times faster.

Every fast path gives exactly the numbers of ``predictor.predict`` followed by
:func:`~sparsefinder.metrics.graph_metrics` (tests/test_sweep.py checks it).

Which methods run by default (``methods=None``): every registered predictor
whose inputs are available, except the opt-in ones (``default_sweep = False``).
Methods on the ``"projected"`` space need ``projections``; methods with ``input_space = "any"`` (Reformer, Routing) get
the projected vectors when there are projections and the raw ones otherwise;
methods that learn (k-means, blocks, Routing) need their fitted instances in
``fitted`` (from :func:`fit_predictors`, on a *training* store); syntax and
lexical need context the store does not hold (dependency heads; the model's
input embeddings) and run only when a ``context`` provider declares those keys
(see :class:`EmbeddingContext` for lexical). Skipped methods and the reason
are recorded in ``frame.attrs["sweep"]["skipped"]``; a method asked for
explicitly that cannot run is an error.

Stochastic predictors get ``seed`` (unless the grid point sets one) and the
store's sentence indices as ``sentence_ids``, so each sentence draws its own
random pattern, the same in any batch: the same seed gives the same table.

:func:`save_sweep` / :func:`load_sweep` store the table as Parquet plus a JSON
sidecar with its provenance. :func:`pareto_front`, :func:`best_recall_at` and
:func:`best_recall_table` summarise it (recall against sparsity, per head, per
layer or overall).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sparsefinder import __version__
from sparsefinder.corpora.context import ContextProvider, EmbeddingContext  # noqa: F401 (public here too)
from sparsefinder.corpora.store import ExtractionStore, StoredBatch
from sparsefinder.graphs import AttentionGraph, num_valid_pairs, real_tokens, valid_pair_mask
from sparsefinder.metrics import CONFIG_COLUMNS, COUNT_COLUMNS, RATIO_COLUMNS, _torch_ratios
from sparsefinder.predictors import REGISTRY, Predictor, get_predictor
from sparsefinder.predictors.base import (
    check_sentence_ids,
    edge_positions,
    global_token_mask,
    grouped_cost,
    sentence_rng,
    shared_pattern,
    window_mask,
)
from sparsefinder.predictors.baselines import lsh_buckets
from sparsefinder.predictors.clustering import normalise, sq_dists
from sparsefinder.predictors.paper import (
    block_lengths,
    block_vectors,
    equal_frequency_bins,
)
from sparsefinder.predictors.patterns import edge_budget

SWEEP_FORMAT = "sparsefinder-sweep"
SWEEP_FORMAT_VERSION = 1


SWEEP_COLUMNS: tuple[str, ...] = (
    CONFIG_COLUMNS + ("layer", "head") + RATIO_COLUMNS + ("sentences",) + COUNT_COLUMNS
)
"""Columns of the aggregated sweep table, in order."""
SENTENCE_COLUMNS: tuple[str, ...] = CONFIG_COLUMNS + ("sentence", "layer", "head") + RATIO_COLUMNS + COUNT_COLUMNS
"""Columns of the per-sentence table (``per_sentence=True``)."""

SUPPLIED_CONTEXT: frozenset[str] = frozenset({"head_dim", "sentence_ids"})
"""Context keys the sweep fills in itself (the model's head size; the store's sentence indices)."""
OPTIONAL_CONTEXT: frozenset[str] = frozenset({"match", "tokens"})
"""Context keys a method can do without (random's ``match``: it falls back to its target ``sparsity``; the
learned predictors' ``tokens``: without them every token counts as unseen; give
:class:`sparsefinder.predictors.learned.core.TokenContext`)."""


_RATIO_INDEX = {c: i for i, c in enumerate(RATIO_COLUMNS)}


# ---------------------------------------------------------------------- configurations


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"not JSON-serialisable: {value!r}")


def canonical_params(params: Mapping[str, Any]) -> str:
    """The canonical JSON of a grid point: sorted keys, no spaces (``{"n_buckets":4}``); the table's ``params``."""
    return json.dumps(dict(params), sort_keys=True, separators=(",", ":"), default=_jsonable)


def default_grids(methods: Iterable[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Each method's own :meth:`~sparsefinder.predictors.base.Predictor.grid` (the paper's values)."""
    return {m: REGISTRY[m].grid() for m in (REGISTRY if methods is None else methods)}


def _param_names(cls: type[Predictor]) -> list[str]:
    return cls._param_names()


def _config_params(method: str, point: Mapping[str, Any], seed: int, extra: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Constructor keywords of one configuration: run-level ``seed`` (if the method has one), ``extra``, the point."""
    cls = REGISTRY[method]
    names = set(_param_names(cls))
    params: dict[str, Any] = {}
    if "seed" in names:
        params["seed"] = seed
    params.update({k: v for k, v in (extra or {}).items() if k in names})
    params.update(point)
    return params


@dataclass
class _Config:
    index: int
    method: str
    point: dict[str, Any]
    key: str
    predictor: Predictor  # unfitted template (hyperparameters); fitted ones are looked up per layer
    fitted: dict[int, Predictor] | None = None

    def for_layer(self, layer: int) -> Predictor:
        if self.fitted is None:
            return self.predictor
        return self.fitted[layer]


# ---------------------------------------------------------------------- projections and inputs


def _check_projections(projections: Any, store: ExtractionStore) -> None:
    if projections is None:
        return
    for attr in ("num_layers", "num_heads", "head_dim"):
        have, want = getattr(projections, attr, None), getattr(store, attr)
        if have is not None and int(have) != int(want):
            raise ValueError(f"projections have {attr} = {have} but the store has {want}")
    manifest = getattr(projections, "manifest", None)
    if isinstance(manifest, dict) and manifest.get("model") is not None:
        from sparsefinder.training.projections import check_store  # refuses projections trained for another model

        check_store(manifest, store)


def _project(projections: Any, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        qp = projections.project_queries(layer, q)
        kp = projections.project_keys(layer, k)
    # Predictors compute in float32 (check_inputs); converting once here avoids a copy per method.
    return qp.float().contiguous(), kp.float().contiguous()


def _uses_projection(cls: type[Predictor], projections: Any) -> bool:
    return cls.reads_projections(projections is not None)


# ---------------------------------------------------------------------- fitting


class FittedPredictors(dict):
    """``{method: {params: {layer: fitted predictor}}}`` from :func:`fit_predictors`, with ``info`` (provenance)."""

    info: dict[str, Any]

    def __init__(self, *args: Any, info: dict[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.info = dict(info or {})


def _fit_signature(method: str, params: Mapping[str, Any]) -> str:
    skip = {"window", "global_tokens"} | REGISTRY[method].predict_only_params
    return canonical_params({k: v for k, v in params.items() if k not in skip})


def _pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    n = max(p.shape[2] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0, 0, n - p.shape[2])) for p in parts])


def fit_predictors(
    store: ExtractionStore,
    projections: Any | None,
    methods: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    max_points: int | None = 100_000,
    grids: Mapping[str, list[dict[str, Any]]] | None = None,
    batch_size: int = 32,
    indices: Sequence[int] | None = None,
    progress: bool = False,
) -> FittedPredictors:
    """Fit the learning predictors (k-means, blocks, Routing) of every grid point, per layer, on a training store.

    For each layer, the (projected, or raw for ``"any"`` methods without
    projections) queries and keys of the store's sentences (``indices``, default
    all) are streamed once and concatenated; each distinct fit is made once
    (grid points that differ only in :attr:`~sparsefinder.predictors.base.Predictor.predict_only_params`, ``window`` or
    ``global_tokens`` share it). ``seed`` and ``max_points`` (the subsample per
    head) are passed to methods that take them, unless a grid point sets them.
    Methods with ``fit_uses_gold`` (the learned predictors of
    :mod:`sparsefinder.predictors.learned.core`) also get the padded gold graphs
    (``gold=``) and the sentences' token strings (``tokens=``).
    Returns ``fitted[method][canonical_params(point)][layer]``, for :func:`run_sweep`.
    """
    t0 = time.perf_counter()
    if methods is None:
        methods = [m for m, cls in REGISTRY.items() if cls.requires_fit and cls.default_sweep
                   and (projections is not None or not cls.needs_projections())]
    for m in methods:
        if m not in REGISTRY:
            raise KeyError(f"unknown predictor {m!r}")
        if REGISTRY[m].needs_projections() and projections is None:
            raise ValueError(f"{m} works on projected queries and keys: give projections")
    _check_projections(projections, store)
    grids = dict(grids or {})
    layer_ids = [store._layer_index(x) for x in (range(store.num_layers) if layers is None else layers)]
    todo = [m for m in methods if REGISTRY[m].requires_fit]
    out = FittedPredictors(info={
        "store": _store_info(store),
        "sentences": len(store) if indices is None else len(indices),
        "indices_sha256": None if indices is None else _digest(indices),
        "seed": seed,
        "max_points": max_points,
        "layers": layer_ids,
    })
    for m in todo:
        out[m] = {}
    bar = tqdm(total=len(layer_ids), desc="fit", disable=not progress, dynamic_ncols=True)
    for layer in layer_ids:
        raw_q, raw_k, proj_q, proj_k, lens = [], [], [], [], []
        golds: list[torch.Tensor] = []
        tokens: list[list[str]] = []
        need_raw = any(not _uses_projection(REGISTRY[m], projections) for m in todo)
        # Learned predictors (sparsefinder.predictors.learned.core) fit on the gold graphs and token strings.
        need_gold = any(REGISTRY[m].fit_uses_gold for m in todo)
        for batch in store.iter_batches(layer, batch_size, indices=indices, order="length"):
            lens.append(batch.lengths)
            if need_gold:
                golds.append(batch.gold.edges)
                tokens.extend(batch.tokens)
            if need_raw:
                raw_q.append(batch.queries)
                raw_k.append(batch.keys)
            if projections is not None:
                qp, kp = _project(projections, layer, batch.queries, batch.keys)
                proj_q.append(qp)
                proj_k.append(kp)
        lengths = torch.cat(lens)
        gold_kw: dict[str, Any] = {}
        if need_gold:
            n_max = max(g.shape[-1] for g in golds)
            edges = torch.cat([torch.nn.functional.pad(g, (0, n_max - g.shape[-1], 0, n_max - g.shape[-1]))
                               for g in golds])
            gold_kw = {"gold": AttentionGraph(edges, lengths, store.causal), "tokens": tokens}
        data = {}
        if need_raw:
            data["raw"] = (_pad_cat(raw_q), _pad_cat(raw_k))
        if projections is not None:
            data["projected"] = (_pad_cat(proj_q), _pad_cat(proj_k))
        for m in todo:
            cls = REGISTRY[m]
            q, k = data["projected" if _uses_projection(cls, projections) else "raw"]
            cache: dict[str, Predictor] = {}
            names = set(_param_names(cls))
            extra = {"max_points": max_points} if "max_points" in names else {}
            for point in grids.get(m) or cls.grid():
                params = _config_params(m, point, seed, extra)
                sig = _fit_signature(m, params)
                if sig not in cache:
                    kw = gold_kw if cls.fit_uses_gold else {}
                    cache[sig] = get_predictor(m, **params).fit(q, k, lengths, **kw)
                pred = get_predictor(m, **params).load_state_dict(cache[sig].state_dict())
                # Share the fitted tensors themselves, so run_sweep sees one fit for the whole group.
                for attr in cls.fitted_tensors:
                    setattr(pred, attr, getattr(cache[sig], attr))
                out[m].setdefault(canonical_params(point), {})[layer] = pred
        bar.update(1)
    bar.close()
    out.info["seconds"] = round(time.perf_counter() - t0, 3)
    return out


# ---------------------------------------------------------------------- one batch


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
    cache: dict[Any, Any] = field(default_factory=dict)
    shape: tuple[int, int, int] = field(init=False)
    valid: torch.Tensor = field(init=False)
    real: torch.Tensor = field(init=False)
    gold_edges: torch.Tensor = field(init=False)
    row_gold: torch.Tensor = field(init=False)
    valid_pairs: torch.Tensor = field(init=False)
    valid_queries: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        b, h, n, _ = self.gold.shape
        self.shape = (b, h, n)
        if "valid" not in self.shared:
            self.shared["valid"] = valid_pair_mask(self.lengths, n, self.causal)  # (B, 1, N, N)
        self.valid = self.shared["valid"]
        self.real = real_tokens(self.lengths, n)  # (B, N)
        # Sums of bool tensors are much faster through a uint8 view with an explicit accumulator type.
        self.row_gold = self.gold.view(torch.uint8).sum(dim=-1, dtype=torch.int32)  # (B, H, N)
        self.gold_edges = self.row_gold.sum(dim=-1).long()
        self.valid_pairs = num_valid_pairs(self.lengths, self.causal)[:, None].expand(b, h)
        self.valid_queries = self.lengths[:, None].expand(b, h)

    def inputs(self, cls: type[Predictor]) -> tuple[torch.Tensor, torch.Tensor]:
        if cls.reads_projections(self.proj_q is not None):
            assert self.proj_q is not None and self.proj_k is not None
            return self.proj_q, self.proj_k
        return self.raw_q, self.raw_k

    def predictor_context(self) -> dict[str, Any]:
        return {"head_dim": self.head_dim, "sentence_ids": self.sentence_ids, **self.context}


Counts = dict[str, torch.Tensor]
"""``pred_edges``, ``hits``, ``covered_queries`` (int64) and ``cost`` (float64), each ``(C, B, H)``."""
_COUNT_KEYS = ("pred_edges", "hits", "covered_queries", "cost")


def _count(edges: torch.Tensor) -> torch.Tensor:
    """Edges per (sentence, head) of a ``(B, H|1, N, N)`` bool tensor, int64.

    Summed as uint8 into int32 (exact: a sentence has far fewer than 2³¹ pairs),
    several times faster than a bool sum into int64.
    """
    return edges.view(torch.uint8).sum(dim=(-1, -2), dtype=torch.int32).long()


def _dense_counts(edges: torch.Tensor, cost: torch.Tensor, batch: _Batch) -> Counts:
    """Counts of one predicted graph (``(B, H|1, N, N)`` bool, valid pairs only) against the gold graph."""
    b, h, _ = batch.shape
    row_hits = (batch.gold & edges).view(torch.uint8).sum(dim=-1, dtype=torch.int32)  # (B, H, N)
    hits = row_hits.sum(dim=-1).long()
    # A query is covered when it hits all its gold keys; padding rows (0 == 0) must not count.
    covered = ((row_hits == batch.row_gold) & batch.real[:, None, :]).sum(dim=-1)
    pred = _count(edges).expand(b, h)
    return {"pred_edges": pred[None], "hits": hits[None], "covered_queries": covered[None],
            "cost": torch.broadcast_to(cost.double(), (b, h))[None]}


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


def _cumulative_hist(levels: torch.Tensor, n_levels: int) -> torch.Tensor:
    """``(R, C)``: for each row of ``(R, M)`` levels in ``[0, C]``, how many are ``<= c`` (level C = never)."""
    rows = levels.shape[0]
    width = n_levels + 1
    key = levels.to(torch.int32) + torch.arange(rows, dtype=torch.int32, device=levels.device)[:, None] * width
    hist = torch.bincount(key.reshape(-1), minlength=rows * width).reshape(rows, width)
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
    the core cost ``(B, H)`` when it is not the edge count (distance)."""

    core: torch.Tensor
    extra: torch.Tensor | None = None
    core_cost: torch.Tensor | None = None


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
    return {k: v.permute(2, 0, 1) for k, v in
            {"pred_edges": pred, "hits": hits, "covered_queries": covered, "cost": cost}.items()}


# ---------------------------------------------------------------------- nested families


def _count_below(x: torch.Tensor, bounds: Sequence[Any], dtype: torch.dtype, strict: bool = True) -> torch.Tensor:
    """``#{c : bounds[c] < x}`` (``<=`` with ``strict=False``) per element, as ``dtype``; one compare per bound."""
    out = torch.zeros(x.shape, dtype=dtype, device=x.device)
    for bound in bounds:
        out += (x > bound if strict else x >= bound).to(dtype)
    return out


def _distance_levels(batch: _Batch, pred: Predictor, values: list[Any]) -> _Levels:
    q, k = batch.inputs(type(pred))
    if "sqdist" not in batch.cache:
        batch.cache["sqdist"] = sq_dists(q, k)  # once per batch and layer, for every threshold and variant
    d = batch.cache["sqdist"]
    # The predictor compares d <= t with t a Python float, i.e. in d's dtype: round t the same way.
    thresholds = torch.tensor([float(v) for v in values], dtype=d.dtype).tolist()
    thresholds = [torch.tensor(t, dtype=d.dtype, device=d.device) for t in thresholds]
    core = _count_below(d, thresholds, _level_dtype(len(values)))  # edge at c iff d <= t_c
    b, h, _ = batch.shape
    pairs = num_valid_pairs(batch.lengths, batch.causal)
    core_cost = (pairs.double() * q.shape[-1] / batch.head_dim)[:, None].expand(b, h)
    extra = shared_pattern(batch.lengths, batch.shape[2], pred.window, pred.global_tokens)
    return _Levels(core, extra, core_cost)


def _window_levels(batch: _Batch, pred: Predictor, values: list[Any]) -> _Levels:
    n = batch.shape[2]
    pos = torch.arange(n, device=batch.lengths.device)
    diff = (pos[:, None] - pos[None, :]).abs()
    halves = [w // 2 if w > 0 else -1 for w in values]
    core = _count_below(diff, halves, _level_dtype(len(values)))[None, None]  # edge at c iff |i - j| <= ⌊w_c/2⌋
    extra = global_token_mask(batch.lengths, n) if pred.global_tokens else None
    return _Levels(core, extra)


def _longformer_levels(batch: _Batch, pred: Predictor, values: list[Any]) -> _Levels:
    n = batch.shape[2]
    # More global tokens only add positions, so a position's level is the number of grid points lacking it.
    is_global = torch.stack([edge_positions(batch.lengths, n, (g + 1) // 2, g // 2) for g in values])
    pos_level = (len(values) - is_global.sum(dim=0)).to(_level_dtype(len(values)))  # (B, N)
    core = torch.minimum(pos_level[:, :, None], pos_level[:, None, :])[:, None]
    return _Levels(core, shared_pattern(batch.lengths, n, pred.window, pred.global_tokens))


def _uniform_draws(batch: _Batch, seed: int) -> torch.Tensor:
    """``(B, H, N, N)`` float64: each sentence's ``default_rng([seed, n, id]).random((H, n, n))``, inf elsewhere."""
    key = ("uniform", seed)
    if key in batch.shared:
        return batch.shared[key]
    b, h, n = batch.shape
    ids = check_sentence_ids(batch.sentence_ids, b)
    u = torch.full((b, h, n, n), math.inf, dtype=torch.float64)
    # The draws are per sentence by definition (a sentence's pattern must not depend on its batch).
    for i, nb in enumerate(batch.lengths.tolist()):
        if nb:
            u[i, :, :nb, :nb] = torch.from_numpy(sentence_rng(seed, i, nb, ids).random((h, nb, nb)))
    u = u.to(batch.lengths.device)
    batch.shared[key] = u
    return u


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Position of each entry in a stable ascending sort along the last dim."""
    order = torch.argsort(x.contiguous(), dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    return ranks


def _prefix_levels(rank: torch.Tensor, sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Level of each ranked entry when grid point ``c`` keeps the first ``sizes[..., c]`` ranks.

    ``sizes`` is ``(C,)`` or ``(B, C)`` non-decreasing; the level is ``#{c : sizes[c] <= rank}``,
    looked up in a table over all possible ranks (cheaper than a compare per grid point).
    """
    span = torch.arange(int(rank.max()) + 1 if rank.numel() else 1, device=rank.device)
    if sizes.dim() == 1:
        table = (sizes[None, :] <= span[:, None]).sum(dim=-1).to(dtype)  # (R,)
        return torch.take(table, rank)
    table = (sizes[:, None, :] <= span[None, :, None]).sum(dim=-1).to(dtype)  # (B, R)
    b = rank.shape[0]
    return table.gather(1, rank.reshape(b, -1)).reshape(rank.shape)


def _bigbird_levels(batch: _Batch, pred: Predictor, values: list[Any]) -> _Levels:
    key = ("bigbird-levels", pred.seed, pred.window, pred.global_tokens, tuple(values))
    if key in batch.shared:  # the draws and the allowed keys do not depend on the layer
        return batch.shared[key]
    b, h, n = batch.shape
    u = _uniform_draws(batch, pred.seed)
    dev = u.device
    allowed = batch.valid
    if pred.window > 0:
        allowed = allowed & ~window_mask(n, pred.window, dev)
    if pred.global_tokens:
        allowed = allowed & ~global_token_mask(batch.lengths, n)
    if batch.causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    # A query's r random keys are its r allowed keys of lowest draw: a prefix of one sort serves every r.
    rank = _ranks(torch.where(allowed, u, math.inf))
    dtype = _level_dtype(len(values))
    core = _prefix_levels(rank, torch.tensor([int(v) for v in values], device=dev), dtype)
    core = torch.maximum(core, _never(allowed, len(values), dtype))
    out = _Levels(core, shared_pattern(batch.lengths, n, pred.window, pred.global_tokens))
    batch.shared[key] = out
    return out


def _random_levels(batch: _Batch, pred: Predictor, values: list[Any]) -> _Levels:
    key = ("random-levels", pred.seed, pred.window, pred.global_tokens, tuple(values))
    if key in batch.shared:
        return batch.shared[key]
    b, h, n = batch.shape
    u = _uniform_draws(batch, pred.seed)
    if batch.causal:
        u = u.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=u.device).tril(), math.inf)
    rank = _ranks(u.reshape(b, h, n * n))
    # values are sorted by decreasing sparsity, so each sentence's budgets increase with the level.
    budgets = torch.stack([edge_budget(batch.lengths, float(s), batch.causal) for s in values], dim=1)  # (B, C)
    core = _prefix_levels(rank, budgets, _level_dtype(len(values))).reshape(b, h, n, n)
    out = _Levels(core, shared_pattern(batch.lengths, n, pred.window, pred.global_tokens))
    batch.shared[key] = out
    return out


def _blocks_levels(batch: _Batch, pred: Predictor, values: list[Any]) -> _Levels:
    q, k = batch.inputs(type(pred))
    centroids = pred.centroids_
    assert centroids is not None
    bsz, c_levels = pred.block_size, len(values)
    if centroids.shape[0] != q.shape[1] or centroids.shape[2] != bsz * q.shape[3]:
        raise ValueError(f"centroids are {tuple(centroids.shape)} but blocks of q {tuple(q.shape)} "
                         f"have dimension {bsz * q.shape[3]}")
    centroids = centroids.to(device=q.device, dtype=q.dtype)
    nb = block_lengths(batch.lengths, bsz)
    vq, vk = block_vectors(q, batch.lengths, bsz), block_vectors(k, batch.lengths, bsz)
    m = vq.shape[2]
    real = real_tokens(nb, m)
    dq = sq_dists(vq, centroids[None])  # (B, H, M, C)
    dk = sq_dists(vk, centroids[None])
    tops = torch.tensor([int(v) for v in values], device=q.device)
    if pred.variant == "v1":
        cq = dq.argmin(dim=-1)
        dist = dk.transpose(-1, -2).gather(2, cq[..., None].expand(-1, -1, -1, m))
        allowed = real[:, None, None, :] & real[:, None, :, None]
        if batch.causal:
            allowed = allowed & torch.ones(m, m, dtype=torch.bool, device=q.device).tril()
        rank = _ranks(torch.where(allowed, dist, math.inf))
        blocks = torch.where(allowed, torch.bucketize(rank, tops, right=True), c_levels)
    else:
        # v2: (u, v) is an edge at top_k when some centroid has both among its top_k blocks.
        def member_levels(dist: torch.Tensor) -> torch.Tensor:
            dist = torch.where(real[:, None, :, None], dist, math.inf)
            rank = _ranks(dist.transpose(-1, -2))  # (B, H, C, M)
            return torch.where(real[:, None, None, :], torch.bucketize(rank, tops, right=True), c_levels)

        lq, lk = member_levels(dq), member_levels(dk)
        blocks = torch.maximum(lq[..., :, None], lk[..., None, :]).amin(dim=2)
    if pred.block_window > 0:
        pos = torch.arange(m, device=q.device)
        blocks = torch.where((pos[:, None] - pos[None, :]).abs() <= pred.block_window // 2, 0, blocks)
    blocks = torch.where(real[:, None, :, None] & real[:, None, None, :], blocks, c_levels)
    n = batch.shape[2]
    blocks = blocks.to(_level_dtype(c_levels))
    core = blocks.repeat_interleave(bsz, dim=-1).repeat_interleave(bsz, dim=-2)[..., :n, :n]
    return _Levels(core, shared_pattern(batch.lengths, n, pred.window, pred.global_tokens))


@dataclass(frozen=True)
class _Nested:
    param: str
    levels: Callable[[_Batch, Predictor, list[Any]], _Levels]
    descending: bool = False  # grid order in which the graphs grow
    usable: Callable[[_Batch], bool] = lambda batch: True


NESTED: dict[str, _Nested] = {
    "distance": _Nested("threshold", _distance_levels),
    "window": _Nested("window", _window_levels),
    "position": _Nested("window", _window_levels),
    "longformer": _Nested("num_global", _longformer_levels),
    "bigbird": _Nested("num_random", _bigbird_levels),
    # With a "match" context random matches another graph's edge counts: not one nested family.
    "random": _Nested("sparsity", _random_levels, descending=True, usable=lambda batch: "match" not in batch.context),
    "blocks": _Nested("top_k", _blocks_levels),
}
"""Methods whose grid parameter only adds edges as it grows: scored for the whole grid in one pass."""
_NESTED_CLASSES = {name: REGISTRY[name] for name in NESTED}


# ---------------------------------------------------------------------- dense kernels with shared work


_WORD_BITS = 31  # int32 words: their AND is about twice as fast as int64's


def _pack_ids(ids: torch.Tensor, n_ids: int) -> torch.Tensor:
    """``(B, H, W, N)`` int32 bit codes of group ids ``(B, H, G, N)`` (partition ``g`` takes bits
    ``g·n_ids .. g·n_ids + n_ids - 1``; id -1 = no group, no bit)."""
    b, h, g, n = ids.shape
    words = max(1, -(-g * n_ids // _WORD_BITS))
    has = ids >= 0
    bit = torch.arange(g, device=ids.device)[:, None] * n_ids + ids.clamp(min=0)
    value = torch.where(has, torch.ones_like(bit, dtype=torch.int32) << (bit % _WORD_BITS).to(torch.int32), 0)
    out = torch.zeros(b, h, words, n, dtype=torch.int32, device=ids.device)
    # Bits of different partitions never collide, so adding them is OR-ing them.
    return out.scatter_add_(2, bit // _WORD_BITS, value)


def _pack_members(member: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, N)`` int32 bit codes of ``(B, H, G, N)`` bool group memberships."""
    groups = member.shape[2]
    weights = (2 ** torch.arange(_WORD_BITS, device=member.device, dtype=torch.int64)).to(torch.int32)
    words = [
        (member[:, :, lo : lo + _WORD_BITS].to(torch.int32) * weights[: min(_WORD_BITS, groups - lo), None]).sum(
            dim=2, dtype=torch.int32)
        for lo in range(0, max(groups, 1), _WORD_BITS)
    ]
    return torch.stack(words, dim=2)


def _codes_share(cq: torch.Tensor, ck: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, N)``: query and key have a common bit (share a group), from :func:`_pack_ids` codes.

    One broadcast AND per 31 groups replaces one equality per partition or a matmul over the groups.
    """
    core = (cq[:, :, 0, :, None] & ck[:, :, 0, None, :]).bool()
    for w in range(1, cq.shape[2]):
        core |= (cq[:, :, w, :, None] & ck[:, :, w, None, :]).bool()
    return core


def _balanced_members(x: torch.Tensor, centroids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """:func:`~sparsefinder.predictors.baselines.balanced_membership`, from a partial sort.

    Each centroid takes its ``s = ⌈n/C⌉`` most similar real tokens, ties to the
    earlier position: the tokens above the s-th largest similarity, then the
    first tokens equal to it. ``topk`` finds that value at half the cost of the
    full stable argsort, and the result is the same set.
    """
    b, h, n, _ = x.shape
    c = centroids.shape[1]
    sim = torch.einsum("bhnd,hcd->bhcn", normalise(x), centroids.to(x.dtype))  # as the predictor computes it
    real = real_tokens(lengths, n)[:, None, None, :]
    sim = torch.where(real, sim, torch.tensor(float("-inf"), dtype=sim.dtype, device=x.device))
    size = (lengths + c - 1) // c
    kmax = int(size.max()) if size.numel() else 0
    if kmax == 0:
        return torch.zeros(b, h, c, n, dtype=torch.bool, device=x.device)
    top = sim.topk(kmax, dim=-1, sorted=True).values
    kth = top.gather(-1, (size - 1).clamp(min=0)[:, None, None, None].expand(b, h, c, 1))
    above = sim > kth
    tied = sim == kth
    need = size[:, None, None, None] - above.sum(dim=-1, keepdim=True)
    member = above | (tied & (tied.cumsum(dim=-1) <= need))
    return member & real & (size > 0)[:, None, None, None]


def _group_cost(gq: torch.Tensor, gk: torch.Tensor, n_groups: int, batch: _Batch) -> torch.Tensor:
    r"""Grouped cost :math:`\sum_{g, b} |Q_{g,b}| \cdot |K_{g,b}|` from ``(B, H, G, N)`` group ids (-1: none)."""
    if batch.causal:  # only pairs j <= i count: use the predictors' own membership form
        ids = torch.arange(n_groups, device=gq.device)
        b, h, g, n = gq.shape
        mq = (gq[:, :, :, None, :] == ids[:, None]).reshape(b, h, g * n_groups, n)
        mk = (gk[:, :, :, None, :] == ids[:, None]).reshape(b, h, g * n_groups, n)
        return grouped_cost(mq, mk, True)

    def sizes(ids: torch.Tensor) -> torch.Tensor:
        slot = torch.where(ids >= 0, ids, n_groups)  # padding goes to a spare slot
        out = torch.zeros(*ids.shape[:-1], n_groups + 1, dtype=torch.int64, device=ids.device)
        return out.scatter_add_(-1, slot, torch.ones_like(slot))[..., :n_groups]

    return (sizes(gq) * sizes(gk)).sum(dim=(-1, -2)).double()


def _bucketing_counts(batch: _Batch, pred: Predictor) -> Counts:
    q, k = batch.inputs(type(pred))
    n = batch.shape[2]
    if "ranks" not in batch.cache:
        # With one bin per position, equal_frequency_bins returns the ranks themselves (-1 on padding);
        # stored (B, H, r, N) so that each dimension is contiguous.
        batch.cache["ranks"] = tuple(equal_frequency_bins(x, batch.lengths, max(n, 1)).transpose(-1, -2).contiguous()
                                     for x in (q, k))
    rq, rk = batch.cache["ranks"]
    beta = pred.n_buckets
    size = ((batch.lengths + beta - 1) // beta).clamp(min=1)[:, None, None, None]
    bq, bk = rq // size, rk // size  # floor division keeps padding at -1
    core = _codes_share(_pack_ids(bq, beta), _pack_ids(bk, beta))
    edges, cost = _finish(core, _group_cost(bq, bk, beta, batch), batch, pred.window, pred.global_tokens)
    return _dense_counts(edges, cost, batch)


def _reformer_counts(batch: _Batch, pred: Predictor) -> Counts:
    q, k = batch.inputs(type(pred))
    b, h, n = batch.shape
    rot = pred.rotations(h, q.shape[-1]).to(q.device)
    real = batch.real[:, None, None, :]
    hq = torch.where(real, lsh_buckets(q, rot).transpose(-1, -2), -1)  # (B, H, R, N), -1 on padding
    hk = torch.where(real, lsh_buckets(k, rot).transpose(-1, -2), -1)
    core = _codes_share(_pack_ids(hq, pred.n_buckets), _pack_ids(hk, pred.n_buckets))
    edges, cost = _finish(core, _group_cost(hq, hk, pred.n_buckets, batch), batch, pred.window, pred.global_tokens)
    return _dense_counts(edges, cost, batch)


def _fitted_centroids(pred: Predictor, q: torch.Tensor) -> torch.Tensor:
    """The predictor's ``(H, C, r)`` centroids, checked against ``(B, H, N, r)`` inputs."""
    centroids = pred.centroids_
    assert centroids is not None
    if centroids.shape[0] != q.shape[1] or centroids.shape[2] != q.shape[3]:
        raise ValueError(f"centroids are {tuple(centroids.shape)} (H, C, r) but q is {tuple(q.shape)}")
    return centroids


def _routing_counts(batch: _Batch, pred: Predictor) -> Counts:
    q, k = batch.inputs(type(pred))
    centroids = _fitted_centroids(pred, q)
    centroids = centroids.to(q.device)
    mq = _balanced_members(q, centroids, batch.lengths)
    mk = _balanced_members(k, centroids, batch.lengths)
    core = _codes_share(_pack_members(mq), _pack_members(mk))
    edges, cost = _finish(core, grouped_cost(mq, mk, batch.causal), batch, pred.window, pred.global_tokens)
    return _dense_counts(edges, cost, batch)


def _kmeans_counts(batch: _Batch, pred: Predictor) -> Counts:
    q, k = batch.inputs(type(pred))
    centroids = _fitted_centroids(pred, q)
    n_clusters = centroids.shape[1]
    t = min(pred.top_t, n_clusters)
    key = ("kmeans", id(centroids), t == 1)
    if key not in batch.cache:  # distances to the centroids once per fit, for every top_t
        c = centroids.to(device=q.device, dtype=q.dtype)[None]
        dq, dk = sq_dists(q, c), sq_dists(k, c)
        # argmin returns the first minimum, as the predictor's stable argsort does.
        batch.cache[key] = (dq.argmin(dim=-1, keepdim=True), dk.argmin(dim=-1, keepdim=True)) if t == 1 else (
            torch.argsort(dq, dim=-1, stable=True), torch.argsort(dk, dim=-1, stable=True))
    oq, ok = batch.cache[key]
    if t == 1:  # one cluster per token
        real = batch.real[:, None, None, :]
        gq = torch.where(real, oq[..., 0][:, :, None, :], -1)  # (B, H, 1, N)
        gk = torch.where(real, ok[..., 0][:, :, None, :], -1)
        core = _codes_share(_pack_ids(gq, n_clusters), _pack_ids(gk, n_clusters))
        cost = _group_cost(gq, gk, n_clusters, batch)
    else:
        real = batch.real[:, None, :, None]

        def member(order: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(*order.shape[:-1], n_clusters, dtype=torch.bool, device=order.device)
            out.scatter_(-1, order[..., :t], True)
            return (out & real).transpose(-1, -2)  # (B, H, C, N)

        mq, mk = member(oq), member(ok)
        core = _codes_share(_pack_members(mq), _pack_members(mk))
        cost = grouped_cost(mq, mk, batch.causal)
    edges, total = _finish(core, cost, batch, pred.window, pred.global_tokens)
    return _dense_counts(edges, total, batch)


SHARED_DENSE: dict[str, Callable[[_Batch, Predictor], Counts]] = {
    "bucketing": _bucketing_counts,
    "kmeans": _kmeans_counts,
    "reformer": _reformer_counts,
    "routing": _routing_counts,
}
"""Dense kernels of one configuration that share per-batch work and avoid the predictors' matmuls."""
_SHARED_CLASSES = {name: REGISTRY[name] for name in SHARED_DENSE}


def _generic_counts(batch: _Batch, pred: Predictor) -> Counts:
    q, k = batch.inputs(type(pred))
    graph, cost = pred.predict_with_cost(q, k, batch.lengths, batch.causal, **batch.predictor_context())
    return _dense_counts(graph.edges, cost, batch)


# ---------------------------------------------------------------------- planning


@dataclass
class _Unit:
    """Configurations scored together on a batch: a nested group, or a single configuration."""

    configs: list[_Config]
    kind: str  # "nested", "shared" or "generic"

    def run(self, batch: _Batch) -> Counts:
        pred = self.configs[0].for_layer(batch.layer)
        method = self.configs[0].method
        if self.kind == "nested":
            spec = NESTED[method]
            if spec.usable(batch):
                values = [getattr(c.predictor, spec.param) for c in self.configs]
                return _nested_counts(spec.levels(batch, pred, values), len(values), batch)
            parts = [_generic_counts(batch, c.for_layer(batch.layer)) for c in self.configs]
            return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        if self.kind == "shared":
            return SHARED_DENSE[method](batch, pred)
        return _generic_counts(batch, pred)


def _state_digest(configs: Sequence[_Config]) -> str:
    """Fingerprint of a configuration's fitted tensors over all layers (equal fits may share a nested pass)."""
    c = configs[0]
    if c.fitted is None:
        return ""
    h = hashlib.sha256()
    for layer in sorted(c.fitted):
        for name, tensor in sorted(c.fitted[layer].state_dict().items()):
            h.update(f"{layer}:{name}:{tuple(tensor.shape)}".encode())
            h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def _plan(configs: list[_Config]) -> list[_Unit]:
    units: list[_Unit] = []
    groups: dict[tuple[str, str, str], list[_Config]] = {}
    for c in configs:
        cls = REGISTRY[c.method]
        if c.method in NESTED and cls is _NESTED_CLASSES[c.method]:
            spec = NESTED[c.method]
            rest = {k: v for k, v in c.predictor.get_params().items() if k != spec.param}
            key = (c.method, canonical_params(rest), _state_digest([c]))
            groups.setdefault(key, []).append(c)
        elif c.method in SHARED_DENSE and cls is _SHARED_CLASSES[c.method]:
            units.append(_Unit([c], "shared"))
        else:
            units.append(_Unit([c], "generic"))
    for (method, _, _), members in groups.items():
        spec = NESTED[method]
        members.sort(key=lambda c: getattr(c.predictor, spec.param), reverse=spec.descending)
        units.append(_Unit(members, "nested"))
    units.sort(key=lambda u: min(c.index for c in u.configs))
    return units


def _select_methods(
    methods: Sequence[str] | None, projections: Any, fitted: Mapping[str, Any] | None, context_keys: set[str]
) -> tuple[list[str], dict[str, str]]:
    explicit = methods is not None
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for m in ([m for m, c in REGISTRY.items() if c.default_sweep] if methods is None else list(methods)):
        if m not in REGISTRY:
            raise KeyError(f"unknown predictor {m!r}; known: {list(REGISTRY)}")
        cls = REGISTRY[m]
        reason = None
        missing = set(cls.context_keys) - SUPPLIED_CONTEXT - OPTIONAL_CONTEXT - context_keys
        if cls.needs_projections() and projections is None:
            reason = "needs projections"
        elif cls.requires_fit and not (fitted and m in fitted):
            reason = "needs fitted predictors (fit_predictors on a training store)"
        elif missing:
            reason = f"needs context {sorted(missing)} (give a context provider)"
        if reason is None:
            chosen.append(m)
        elif explicit:
            raise ValueError(f"cannot run {m}: it {reason}")
        else:
            skipped[m] = reason
    return chosen, skipped


def _build_configs(
    methods: list[str], grids: Mapping[str, list[dict[str, Any]]], fitted: Mapping[str, Any] | None,
    layers: list[int], seed: int,
) -> list[_Config]:
    configs: list[_Config] = []
    for m in methods:
        cls = REGISTRY[m]
        points = grids.get(m)
        if points is None:
            points = cls.grid()
        seen: set[str] = set()
        for point in points:
            key = canonical_params(point)
            if key in seen:
                raise ValueError(f"{m}: grid point {key} is listed twice")
            seen.add(key)
            template = get_predictor(m, **_config_params(m, point, seed))
            template._check_params()
            per_layer = None
            if cls.requires_fit:
                assert fitted is not None
                by_params = fitted[m]
                if key not in by_params:
                    raise ValueError(f"no fitted {m} for grid point {key}: fit it with the same grid "
                                     f"(fitted ones: {sorted(by_params)})")
                missing = [x for x in layers if x not in by_params[key]]
                if missing:
                    raise ValueError(f"fitted {m} {key} lacks layers {missing}")
                per_layer = {x: by_params[key][x] for x in layers}
                template = per_layer[layers[0]]
            configs.append(_Config(len(configs), m, dict(point), key, template, per_layer))
    return configs


# ---------------------------------------------------------------------- the sweep


def _digest(indices: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(list(indices), dtype="<i8").tobytes()).hexdigest()


def _store_info(store: ExtractionStore) -> dict[str, Any]:
    m = store.manifest
    keys = ("model", "weights_sha256", "base_checksum", "alpha", "causal", "corpus", "split", "num_sentences",
            "num_tokens", "num_layers", "num_heads", "head_dim", "created")
    info = {k: m.get(k) for k in keys}
    info["path"] = str(store.path)
    info["manifest_sha256"] = hashlib.sha256(json.dumps(m, sort_keys=True, default=str).encode()).hexdigest()
    return info


def _projection_info(projections: Any) -> dict[str, Any] | None:
    if projections is None:
        return None
    manifest = getattr(projections, "manifest", None) or {}
    keep = ("model", "weights_sha256", "corpus", "split", "seed", "rank", "shared", "layers", "tensors_sha256",
            "store_manifest_sha256", "train", "validation", "sparsefinder_version")
    info = {k: manifest[k] for k in keep if k in manifest}
    info.setdefault("rank", getattr(projections, "rank", None))
    info["class"] = type(projections).__name__
    return info


def run_sweep(
    store: ExtractionStore,
    projections: Any | None = None,
    methods: Sequence[str] | None = None,
    grids: Mapping[str, list[dict[str, Any]]] | None = None,
    layers: Sequence[int] | None = None,
    fitted: Mapping[str, Mapping[str, Mapping[int, Predictor]]] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    per_sentence: bool = False,
    context: ContextProvider | None = None,
    device: str | torch.device | None = None,
    threads: int | None = None,
) -> pd.DataFrame:
    """Score every configuration on every layer and head of ``store`` (see the module docstring).

    ``projections``: an object with ``project_queries(layer, q)`` /
    ``project_keys(layer, k)`` (``(B, H, N, d) -> (B, H, N, r)``), e.g.
    :class:`sparsefinder.training.projections.Projections`; ``methods``: names (default:
    every runnable one); ``grids``: ``{method: [grid point, ...]}`` overriding a
    method's :meth:`grid`; ``layers``: default all; ``fitted``: from
    :func:`fit_predictors` (same grids); ``seed``: for stochastic predictors;
    ``indices``: only these sentences of the store; ``per_sentence``: one row per
    sentence instead of the macro means; ``context``: a :class:`ContextProvider`
    for syntax/lexical; ``threads``: torch's intra-op threads during the sweep
    (restored afterwards; default: unchanged). The tensors of one batch are
    small (about a million elements), so extra threads gain little, and on a
    machine whose cores are busy with other work OpenMP threads wait on each
    other for whole scheduler slices: ``threads=1`` is then many times faster.
    Returns the table, with provenance in ``frame.attrs["sweep"]``.
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_projections(projections, store)
    context_keys = set(context.keys) if context is not None else set()
    chosen, skipped = _select_methods(methods, projections, fitted, context_keys)
    grids = dict(grids or {})
    unknown = set(grids) - set(REGISTRY)
    if unknown:
        raise KeyError(f"grids for unknown predictors {sorted(unknown)}")
    layer_ids = [store._layer_index(x) for x in (range(store.num_layers) if layers is None else layers)]
    if not layer_ids:
        raise ValueError("no layers to sweep")
    configs = _build_configs(chosen, grids, fitted, layer_ids, seed)
    units = _plan(configs)
    n_cfg, n_layers, heads = len(configs), len(layer_ids), store.num_heads

    ratio_sum = torch.zeros(n_cfg, n_layers, heads, len(RATIO_COLUMNS), dtype=torch.float64)
    count_sum = torch.zeros(n_cfg, n_layers, heads, len(COUNT_COLUMNS), dtype=torch.float64)
    sentences = torch.zeros(n_cfg, n_layers, heads, dtype=torch.int64)
    rows: list[tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray]] = []

    subset = None if indices is None else [int(i) for i in indices]
    n_sent = len(store) if subset is None else len(subset)
    need_projection = projections is not None and any(_uses_projection(REGISTRY[c.method], projections)
                                                      for c in configs)
    # One batch of sentences holds every layer, so what does not depend on the layer (random draws,
    # fixed patterns) is computed once per batch; memory still holds one batch, never the corpus.
    all_layers = n_layers > 1
    batches = store.iter_batches(None if all_layers else layer_ids[0], batch_size, indices=subset, order="length",
                                 device=device)
    bar = tqdm(total=n_layers * math.ceil(n_sent / batch_size), desc="sweep", unit="layer-batch",
               disable=not progress, dynamic_ncols=True)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    unit_index = [torch.tensor([c.index for c in unit.configs]) for unit in units]
    all_index = torch.arange(n_cfg)
    # Wall time per part (reading batches and projecting, each method's scoring, accumulating), for the record.
    timing: dict[str, float] = {"read+project": 0.0, **{m: 0.0 for m in chosen}, "accumulate": 0.0}
    clock = time.perf_counter
    try:
        with torch.no_grad():
            t = clock()
            for sb in batches:
                shared: dict[Any, Any] = {}
                first = sb.layer(layer_ids[0]) if isinstance(sb, StoredBatch) else sb
                extra_context = dict(context(first)) if context is not None else {}
                for li, layer in enumerate(layer_ids):
                    lb = sb.layer(layer) if isinstance(sb, StoredBatch) else sb
                    proj_q = proj_k = None
                    if need_projection:
                        proj_q, proj_k = _project(projections, layer, lb.queries, lb.keys)
                    batch = _Batch(
                        layer=layer, lengths=lb.lengths.long(), causal=lb.causal, gold=lb.gold.edges,
                        raw_q=lb.queries, raw_k=lb.keys, proj_q=proj_q, proj_k=proj_k, head_dim=store.head_dim,
                        sentence_ids=lb.indices, context=extra_context, shared=shared,
                    )
                    timing["read+project"] += clock() - t
                    b, h, _ = batch.shape
                    # Every configuration's counts of this batch and layer, scored in one vectorised step.
                    found: Counts = {key: torch.empty(n_cfg, b, h, dtype=torch.float64 if key == "cost" else
                                                      torch.int64, device=batch.lengths.device)
                                     for key in _COUNT_KEYS}
                    for unit, idx in zip(units, unit_index, strict=True):
                        idx = idx.to(batch.lengths.device)
                        t = clock()
                        counts = unit.run(batch)
                        for key in _COUNT_KEYS:
                            found[key][idx] = torch.broadcast_to(counts[key], (len(idx), b, h)).to(found[key].dtype)
                        timing[unit.configs[0].method] += clock() - t
                    t = clock()
                    _accumulate(found, batch, all_index, li, ratio_sum, count_sum, sentences,
                                rows if per_sentence else None, lb.indices)
                    timing["accumulate"] += clock() - t
                    bar.update(1)
                    t = clock()
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
        bar.close()

    if per_sentence:
        frame = _sentence_frame(rows, configs, layer_ids)
    else:
        frame = _aggregate_frame(configs, layer_ids, heads, ratio_sum, count_sum, sentences)
    frame.attrs["sweep"] = {
        "format": SWEEP_FORMAT,
        "format_version": SWEEP_FORMAT_VERSION,
        "per_sentence": per_sentence,
        "store": _store_info(store),
        "projections": _projection_info(projections),
        "fitted": getattr(fitted, "info", None) if fitted else None,
        "methods": chosen,
        "skipped": skipped,
        "configurations": {m: {c.key: c.predictor.get_params() for c in configs if c.method == m} for m in chosen},
        "layers": layer_ids,
        "sentences": n_sent,
        "indices_sha256": None if subset is None else _digest(subset),
        "seed": seed,
        "batch_size": batch_size,
        "seconds": round(time.perf_counter() - t0, 3),
        "seconds_by_part": {k: round(v, 3) for k, v in timing.items()},
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "sparsefinder_version": __version__,
    }
    return frame


def _accumulate(
    counts: Counts, batch: _Batch, idx: torch.Tensor, li: int, ratio_sum: torch.Tensor, count_sum: torch.Tensor,
    sentences: torch.Tensor, rows: list | None, sentence_ids: torch.Tensor,
) -> None:
    c = idx.shape[0]
    b, h, _ = batch.shape
    full = {
        "gold_edges": batch.gold_edges, "pred_edges": counts["pred_edges"], "hits": counts["hits"],
        "valid_pairs": batch.valid_pairs, "valid_queries": batch.valid_queries,
        "covered_queries": counts["covered_queries"], "cost": counts["cost"],
    }
    full = {k: torch.broadcast_to(v, (c, b, h)).cpu() for k, v in full.items()}
    ratios = _torch_ratios(**{k: full[k] for k in full if k != "cost"}, cost=full["cost"])
    r = torch.stack([ratios[name] for name in RATIO_COLUMNS], dim=-1)  # (C, B, H, 6)
    cnt = torch.stack([full[name].double() for name in COUNT_COLUMNS], dim=-1)  # (C, B, H, 7)
    has_pairs = full["valid_pairs"] > 0  # a sentence without pairs has NaN ratios and drops out of the means
    ratio_sum[idx, li] += torch.where(has_pairs[..., None], r, 0.0).sum(dim=1)
    count_sum[idx, li] += cnt.sum(dim=1)
    sentences[idx, li] += has_pairs.sum(dim=1)
    if rows is not None:
        rows.append((idx.numpy(), li, sentence_ids.cpu().numpy(), r.numpy(), cnt.numpy()))


def _config_columns(configs: list[_Config]) -> dict[str, np.ndarray]:
    return {
        "method": np.array([c.method for c in configs], dtype=object),
        "family": np.array([REGISTRY[c.method].family for c in configs], dtype=object),
        "params": np.array([c.key for c in configs], dtype=object),
    }


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for col in COUNT_COLUMNS:
        if col != "cost":
            frame[col] = frame[col].round().astype(np.int64)
    for col in CONFIG_COLUMNS:
        frame[col] = frame[col].astype(str)
    return frame


def _aggregate_frame(
    configs: list[_Config], layer_ids: list[int], heads: int, ratio_sum: torch.Tensor, count_sum: torch.Tensor,
    sentences: torch.Tensor,
) -> pd.DataFrame:
    n_cfg, n_layers = len(configs), len(layer_ids)
    per = n_layers * heads
    cols: dict[str, Any] = {k: np.repeat(v, per) for k, v in _config_columns(configs).items()}
    cols["layer"] = np.tile(np.repeat(np.asarray(layer_ids, dtype=np.int64), heads), n_cfg)
    cols["head"] = np.tile(np.arange(heads, dtype=np.int64), n_cfg * n_layers)
    n = sentences.reshape(-1).double()
    means = ratio_sum.reshape(-1, len(RATIO_COLUMNS)) / n[:, None]
    means[n == 0] = float("nan")
    for i, name in enumerate(RATIO_COLUMNS):
        cols[name] = means[:, i].numpy()
    cols["sentences"] = sentences.reshape(-1).numpy()
    sums = count_sum.reshape(-1, len(COUNT_COLUMNS))
    for i, name in enumerate(COUNT_COLUMNS):
        cols[name] = sums[:, i].numpy()
    frame = pd.DataFrame(cols, columns=list(SWEEP_COLUMNS))
    return _typed(frame)


def _sentence_frame(rows: list, configs: list[_Config], layer_ids: list[int]) -> pd.DataFrame:
    if not rows:
        return _typed(pd.DataFrame({c: [] for c in SENTENCE_COLUMNS}))
    parts = []
    names = _config_columns(configs)
    for idx, li, ids, r, cnt in rows:
        c, b, h, _ = r.shape
        cols: dict[str, Any] = {k: np.repeat(v[idx], b * h) for k, v in names.items()}
        cols["sentence"] = np.tile(np.repeat(ids.astype(np.int64), h), c)
        cols["layer"] = np.full(c * b * h, layer_ids[li], dtype=np.int64)
        cols["head"] = np.tile(np.arange(h, dtype=np.int64), c * b)
        cols["_config"] = np.repeat(idx, b * h)
        for i, name in enumerate(RATIO_COLUMNS):
            cols[name] = r[..., i].reshape(-1)
        for i, name in enumerate(COUNT_COLUMNS):
            cols[name] = cnt[..., i].reshape(-1)
        parts.append(pd.DataFrame(cols))
    frame = pd.concat(parts, ignore_index=True)
    frame = frame.sort_values(["_config", "sentence", "layer", "head"], kind="stable").drop(columns="_config")
    return _typed(frame.reset_index(drop=True)[list(SENTENCE_COLUMNS)])


# ---------------------------------------------------------------------- saving


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_sweep(frame: pd.DataFrame, path: str | os.PathLike[str], manifest: Mapping[str, Any] | None = None) -> Path:
    """Write ``frame`` as Parquet at ``path`` and its provenance as JSON next to it (``path`` with ``.json``).

    The sidecar holds ``frame.attrs["sweep"]`` (store, projections, fits,
    configurations, timing) updated by ``manifest``, the row count, the
    columns and the Parquet file's SHA-256. Returns ``path``.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {**dict(frame.attrs.get("sweep", {})), **dict(manifest or {})}
    plain = frame.copy()
    plain.attrs = {}  # provenance lives in the sidecar, in one place
    tmp = out.with_name(out.name + ".tmp")
    plain.to_parquet(tmp, index=False)
    os.replace(tmp, out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    side = {**info, "format": SWEEP_FORMAT, "format_version": SWEEP_FORMAT_VERSION, "rows": len(frame),
            "columns": list(frame.columns), "parquet_file": out.name, "parquet_sha256": digest}
    tmp_json = _sidecar(out).with_name(_sidecar(out).name + ".tmp")
    tmp_json.write_text(json.dumps(side, indent=1, sort_keys=True, default=_jsonable), encoding="utf-8")
    os.replace(tmp_json, _sidecar(out))
    return out


def load_sweep(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a table written by :func:`save_sweep`; its sidecar (if present) becomes ``frame.attrs["sweep"]``."""
    src = Path(path)
    frame = pd.read_parquet(src)
    missing = [c for c in CONFIG_COLUMNS + ("layer", "head") + RATIO_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{src} is not a sweep table: columns {missing} are missing")
    side = _sidecar(src)
    if side.is_file():
        info = json.loads(side.read_text(encoding="utf-8"))
        if info.get("format") != SWEEP_FORMAT:
            raise ValueError(f"{side} is not a sweep sidecar")
        frame.attrs["sweep"] = info
    return frame
