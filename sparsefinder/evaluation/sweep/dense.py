"""Fast paths for dense kernels that share work across grid points (bucketing, Reformer, Routing, k-means)."""

from __future__ import annotations

import torch

from sparsefinder.evaluation.sweep.batch import SHARED_DENSE, Counts, _Batch, _dense_counts, _finish
from sparsefinder.graphs import real_tokens
from sparsefinder.predictors.base import (
    REGISTRY,
    Predictor,
    grouped_cost,
)
from sparsefinder.predictors.baselines import strided_mask
from sparsefinder.predictors.clustering import normalise, sq_dists
from sparsefinder.predictors.paper import (
    equal_frequency_bins,
)

_WORD_BITS = 31  # int32 words: their AND is about twice as fast as int64's


def _pack_ids(ids: torch.Tensor, n_ids: int) -> torch.Tensor:
    """``(B, H, W, N)`` int32 bit codes of group ids ``(B, H, G, N)`` (partition ``g`` takes bits
    ``g·n_ids .. g·n_ids + n_ids - 1``; id -1 = no group, no bit)."""
    b, h, g, n = ids.shape
    words = max(1, -(-g * n_ids // _WORD_BITS))
    # int32 throughout: ids and bit positions are small, and the elementwise work moves half the bytes.
    ids = ids.to(torch.int32)
    bit = torch.arange(g, device=ids.device, dtype=torch.int32)[:, None] * n_ids + ids.clamp(min=0)
    value = torch.where(ids >= 0, torch.ones_like(bit) << (bit % _WORD_BITS), 0)
    # Bits of different partitions never collide, so adding them is OR-ing them (at most 2^31 - 1).
    if words == 1:
        return value.sum(dim=2, keepdim=True, dtype=torch.int32)
    out = torch.zeros(b, h, words, n, dtype=torch.int32, device=ids.device)
    return out.scatter_add_(2, (bit // _WORD_BITS).long(), value)


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


_PEEL_MAX = 4  # up to this many tokens per cluster, peeling maxima beats topk (one row-wide max per step)


def _kth_largest(x: torch.Tensor, size: torch.Tensor, kmax: int) -> torch.Tensor:
    """``(B, H, C, 1)``: the ``size[b]``-th largest entry of each row of ``x`` ``(B, H, C, N)``, duplicates
    counted (what ``topk(...).values[size - 1]`` gives), for ``size <= kmax``.

    Each step takes the row's maximum and removes all its copies; the value at which the count of
    removed entries first reaches ``size`` is the answer. At most ``kmax`` steps of a fast max, where
    ``topk`` walks each short row at a high per-row cost.
    """
    want = size[:, None, None, None]
    kth = torch.full((*x.shape[:-1], 1), float("-inf"), dtype=x.dtype, device=x.device)
    found = want <= 0  # empty sentences: any value (their memberships are dropped)
    found = found.expand(kth.shape).clone()
    taken = torch.zeros(kth.shape, dtype=torch.int32, device=x.device)
    for _ in range(kmax):
        top = x.amax(dim=-1, keepdim=True)
        same = x == top
        taken += same.view(torch.uint8).sum(dim=-1, keepdim=True, dtype=torch.int32)
        hit = ~found & (taken >= want)
        kth = torch.where(hit, top, kth)
        found |= hit
        if bool(found.all()):
            break
        x = x.masked_fill(same, float("-inf"))
    return kth


def _balanced_members(x: torch.Tensor, centroids: torch.Tensor, lengths: torch.Tensor,
                      unit: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`~sparsefinder.predictors.baselines.balanced_membership`, from a partial sort.

    Each centroid takes its ``s = ⌈n/C⌉`` most similar real tokens, ties to the
    earlier position: the tokens above the s-th largest similarity, then the
    first tokens equal to it. ``topk`` finds that value at half the cost of the
    full stable argsort, and the result is the same set. ``unit``: ``normalise(x)`` when already computed.
    """
    b, h, n, _ = x.shape
    c = centroids.shape[1]
    unit = normalise(x) if unit is None else unit
    sim = torch.einsum("bhnd,hcd->bhcn", unit, centroids.to(x.dtype))  # as the predictor computes it
    real = real_tokens(lengths, n)[:, None, None, :]
    sim = torch.where(real, sim, torch.tensor(float("-inf"), dtype=sim.dtype, device=x.device))
    size = (lengths + c - 1) // c
    kmax = int(size.max()) if size.numel() else 0
    if kmax == 0:
        return torch.zeros(b, h, c, n, dtype=torch.bool, device=x.device)
    if kmax <= _PEEL_MAX:
        kth = _kth_largest(sim, size, kmax)
    else:
        top = sim.topk(kmax, dim=-1, sorted=True).values
        kth = top.gather(-1, (size - 1).clamp(min=0)[:, None, None, None].expand(b, h, c, 1))
    above = sim > kth
    tied = sim == kth
    # Bool sums and cumsums through uint8 views into int32: several times faster on CPU, exact.
    need = size[:, None, None, None] - above.view(torch.uint8).sum(dim=-1, keepdim=True, dtype=torch.int32)
    member = above | (tied & (tied.view(torch.uint8).cumsum(dim=-1, dtype=torch.int32) <= need))
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


def _lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    r""":func:`~sparsefinder.predictors.baselines.lsh_buckets` without the concatenation.

    The first maximum of :math:`[p; -p]` (``p`` = the same projections) is the first maximum of
    ``p`` when :math:`\max p \ge \max(-p) = -\min p` (the first half wins ties), else ``β/2``
    plus the first minimum of ``p``: two reductions over ``β/2`` instead of one over ``β`` and a copy.
    """
    proj = torch.einsum("bhnd,rhdk->bhnrk", x, rotations.to(x.dtype))  # as lsh_buckets computes it
    top, first_max = proj.max(dim=-1)
    low, first_min = proj.min(dim=-1)
    return torch.where(top >= -low, first_max, first_min + proj.shape[-1])


def _reformer_counts(batch: _Batch, pred: Predictor) -> Counts:
    q, k = batch.inputs(type(pred))
    b, h, n = batch.shape
    rot = pred.rotations(h, q.shape[-1]).to(q.device)
    real = batch.real[:, None, None, :]
    hq = torch.where(real, _lsh_buckets(q, rot).transpose(-1, -2), -1)  # (B, H, R, N), -1 on padding
    hk = torch.where(real, _lsh_buckets(k, rot).transpose(-1, -2), -1)
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
    key = ("unit", type(pred).reads_projections(batch.proj_q is not None))
    if key not in batch.cache:  # the normalised vectors once per batch and layer, for every cluster count
        batch.cache[key] = (normalise(q), normalise(k))
    uq, uk = batch.cache[key]
    mq = _balanced_members(q, centroids, batch.lengths, uq)
    mk = _balanced_members(k, centroids, batch.lengths, uk)
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


def _strided_counts(batch: _Batch, pred: Predictor) -> Counts:
    """The fixed pattern scored as one head for all (the predictor expands it to every head first)."""
    core = strided_mask(batch.shape[2], pred.stride, pred.expressivity, batch.lengths.device)[None, None]
    edges, cost = _finish(core, None, batch, pred.window, pred.global_tokens)
    return _dense_counts(edges, cost, batch)


# Dense kernels of one configuration that share per-batch work and avoid the predictors' matmuls,
# registered by class (see batch.SHARED_DENSE).
for _name, _kernel in {
    "bucketing": _bucketing_counts,
    "kmeans": _kmeans_counts,
    "reformer": _reformer_counts,
    "routing": _routing_counts,
    "strided": _strided_counts,
}.items():
    SHARED_DENSE[REGISTRY[_name]] = _kernel
