"""Fast paths for nested families: one pass scores every grid point of a method whose graphs grow with its parameter."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from sparsefinder.evaluation.sweep.batch import NESTED, _Batch, _level_dtype, _Levels, _Nested, _never
from sparsefinder.graphs import num_valid_pairs, real_tokens
from sparsefinder.predictors.base import (
    REGISTRY,
    Predictor,
    check_sentence_ids,
    edge_positions,
    global_token_mask,
    sentence_rng,
    shared_pattern,
    window_mask,
)
from sparsefinder.predictors.clustering import sq_dists
from sparsefinder.predictors.paper import (
    block_lengths,
    block_vectors,
)
from sparsefinder.predictors.patterns import edge_budget


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


# Registered by class (see batch.NESTED); the names are the registry's.
for _name, _spec in {
    "distance": _Nested("threshold", _distance_levels),
    "window": _Nested("window", _window_levels),
    "position": _Nested("window", _window_levels),
    "longformer": _Nested("num_global", _longformer_levels),
    "bigbird": _Nested("num_random", _bigbird_levels),
    # With a "match" context random matches another graph's edge counts: not one nested family.
    "random": _Nested("sparsity", _random_levels, descending=True, usable=lambda batch: "match" not in batch.context),
    "blocks": _Nested("top_k", _blocks_levels),
}.items():
    NESTED[REGISTRY[_name]] = _spec
