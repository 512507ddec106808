"""``cascade``: the stacked model scored only on a bounded candidate set per query (sub-quadratic)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from sparsefinder.graphs import real_tokens, valid_pair_mask
from sparsefinder.predictors.base import NotFittedError, register
from sparsefinder.predictors.clustering import sq_dists
from sparsefinder.predictors.constraints import Constraint, Int
from sparsefinder.predictors.learned.budgets import MAX_OFFSET, _lookup, token_hashes
from sparsefinder.predictors.learned.stacked import _combine, _global_rank, _Stacked


@register
class Cascade(_Stacked):
    r"""The stacked model scored only on a bounded set of cheap candidates per query: sub-quadratic.

    Candidates of query :math:`i` in head :math:`h` (at most
    :math:`M = 2b + 1 + g + 2 + m` per query, whatever :math:`n`):

    - the band :math:`|j - i| \le b` (``band``);
    - the :math:`g` (``n_global``) keys of the sentence with the largest token
      priors, and the first and last key;
    - at most :math:`m` (``max_cluster_keys``) keys from the clusters the
      query's cluster attends to, found through a two-level index. Queries and
      keys are clustered separately (``n_clusters`` k-means centroids each,
      per head, in the projected space): in a space trained to put a query
      near its keys the two still form separate clouds, so a shared
      clustering (the paper's) puts few gold pairs in one cluster. The
      affinity :math:`A_h[a, b]` is the training precision of (query cluster
      :math:`a`, key cluster :math:`b`). Query cluster :math:`a` lists the
      keys of its ``cluster_top`` key clusters of highest affinity, in that
      order, and within a key cluster nearest first to the query centroid
      :math:`\mu_a`, and keeps the first :math:`P` (``cluster_pool``): the
      *pool* of its queries (:meth:`cluster_lists`, :math:`O(C n \log n)` per
      head and sentence). Each query then takes the :math:`m` keys of its
      pool nearest to itself (:math:`O(P r + P \log P)` per query). For
      short sentences (at most :math:`m` keys in the attended clusters) that
      is every key of the attended clusters.

    Row-relative features are relative to the candidates. Cost per head:
    :math:`O(C n \log n + n P (r + \log P) + n M \log M)` (:meth:`support`),
    linear in :math:`n` for fixed :math:`C, P, M`, against :math:`O(n^2 d)` for
    :math:`q k^\top`. ``max_cluster_keys=0`` takes the whole pool and
    ``cluster_pool=0`` pools every key of the attended clusters; both 0 is the
    uncapped cascade (:math:`O(n^2 t / C)`).
    """

    name: ClassVar[str] = "cascade"
    input_space: ClassVar[str] = "projected"
    context_keys: ClassVar[tuple[str, ...]] = ("tokens",)
    fitted_tensors: ClassVar[tuple[str, ...]] = _Stacked.fitted_tensors + ("centroids_", "affinity_")

    constraints: ClassVar[dict[str, Constraint]] = {
        "band": Int(0), "n_global": Int(0), "n_clusters": Int(1), "cluster_top": Int(0),
        "max_cluster_keys": Int(0), "cluster_pool": Int(0),
    }

    def __init__(self, sparsity: float = 0.7, budget: str = "per_head", band: int = 4, n_global: int = 4,
                 n_clusters: int = 16, cluster_top: int = 4, max_cluster_keys: int = 32, cluster_pool: int = 128,
                 max_pairs: int = 60_000, prior_strength: float = 20.0, seed: int = 0, window: int = 0,
                 global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _fit_extra(self, q, k, lengths, gold, causal):
        from sparsefinder.predictors.clustering import fit_kmeans, make_generator

        gen = make_generator(int(np.random.SeedSequence([self.seed, 13]).generate_state(1)[0]))
        real = real_tokens(lengths, q.shape[2])
        cents = []
        for x in (q, k):
            pts = x.float().transpose(0, 1)[:, real]  # (H, T, r)
            if pts.shape[1] > 50_000:
                pts = pts[:, torch.randperm(pts.shape[1], generator=gen)[:50_000]]
            cents.append(fit_kmeans(pts, self.n_clusters, 20, gen).float())
        self.centroids_ = torch.stack(cents, 1)  # (H, 2, C, r): query centroids, key centroids
        H, C = q.shape[1], self.n_clusters
        pairs = torch.zeros(H, C * C, dtype=torch.float64)
        hits = torch.zeros(H, C * C, dtype=torch.float64)
        for start in range(0, q.shape[0], 64):
            sl = slice(start, start + 64)
            n = max(int(lengths[sl].max()), 1)
            valid = valid_pair_mask(lengths[sl], n, causal).expand(-1, H, n, n)
            unit = self.clusters(q[sl, :, :n], 0)[..., :, None] * C + self.clusters(k[sl, :, :n], 1)[..., None, :]
            flat = (torch.arange(H)[None, :, None, None] * C * C + unit)[valid]
            pairs += torch.bincount(flat, minlength=H * C * C).double().view(H, C * C)
            hits += torch.bincount(flat, weights=gold[sl, :, :n, :n][valid].double(),
                                   minlength=H * C * C).view(H, C * C)
        self.affinity_ = (hits / pairs.clamp(min=1)).view(H, C, C).float()

    def clusters(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """``(B, H, N)`` nearest query (``side=0``) or key (``side=1``) centroid of projected ``(B, H, N, r)``."""
        assert self.centroids_ is not None
        return sq_dists(x.float(), self.centroids_[None, :, side].float()).argmin(-1)

    def affinity_ranks(self) -> torch.Tensor:
        """``(H, C, C)`` rank of key cluster ``b`` in query cluster ``a``'s row (0: highest affinity; ties: lower b)."""
        assert self.affinity_ is not None
        order = torch.argsort(-self.affinity_, dim=-1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order).contiguous())
        return ranks

    def attended_clusters(self) -> torch.Tensor:
        """``(H, C, C)`` bool: the ``cluster_top`` key clusters of highest affinity for each query cluster."""
        return self.affinity_ranks() < min(self.cluster_top, self.affinity_.shape[-1])

    def cluster_lists(self, k: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, H, C, P)`` each query cluster's pool of keys (``-1``: none), in list order (class docstring).

        ``k``: projected keys ``(B, H, N, r)``; only real keys (``j < length``)
        are listed. :math:`O(C N \\log N)` per head and sentence.
        """
        assert self.centroids_ is not None
        B, H, N = k.shape[:3]
        C = self.centroids_.shape[2]
        top = min(self.cluster_top, C)
        m = N if self.cluster_pool == 0 else min(self.cluster_pool, N)
        if top == 0 or m == 0 or N == 0:
            return torch.full((B, H, C, 0), -1, dtype=torch.long)
        ck = self.clusters(k, 1)  # (B, H, N)
        ranks = self.affinity_ranks()  # (H, C, C)
        # rank_ak[b, h, a, j]: rank of key j's cluster in query cluster a's row.
        rank_ak = torch.gather(ranks[None].expand(B, H, C, C), 3, ck[:, :, None, :].expand(B, H, C, N))
        real = real_tokens(lengths, N)[:, None, None, :]
        eligible = (rank_ak < top) & real
        # Distances to the query centroids: the same per-dimension sum as sq_dists (bit-identical per sentence).
        dist = sq_dists(self.centroids_[None, :, 0].float().expand(B, H, C, k.shape[-1]), k.float())  # (B, H, C, N)
        # Lexicographic order (cluster rank, distance, position): stable sorts from the last key to the first.
        order = torch.sort(dist, dim=-1, stable=True).indices
        primary = torch.where(eligible, rank_ak, torch.full_like(rank_ak, C)).gather(-1, order)
        order = order.gather(-1, torch.sort(primary, dim=-1, stable=True).indices)[..., :m]
        return torch.where(eligible.gather(-1, order), order, torch.full_like(order, -1))

    def _candidates(self, q, k, lengths, causal, hashes):
        B, H, N = q.shape[:3]
        pos = torch.arange(N)
        band = ((pos[None, :] - pos[:, None]).abs() <= self.band)[None, None]
        ranks = _global_rank(self.key_hashes_, self.key_prior_, lengths, hashes)  # (B, H, N)
        glob = (ranks < self.n_global)[:, :, None, :]
        ends = ((pos[None] == 0) | (pos[None] == (lengths - 1)[:, None]))[:, None, None, :]
        near = self.nearest_in_pool(q, k, lengths)  # (B, H, N, m)
        linked = torch.zeros(B, H, N, N + 1, dtype=torch.bool)  # column N collects the -1 padding
        linked.scatter_(-1, torch.where(near >= 0, near, torch.full_like(near, N)), True)
        return band | glob | ends | linked[..., :N]

    def nearest_in_pool(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, m)`` the ``max_cluster_keys`` keys of each query's pool nearest to it (``-1``: none).

        Ties by order in the pool. :math:`O(N P r)` per head: never all pairs.
        """
        B, H, N, r = q.shape
        pool = self.cluster_lists(k, lengths)  # (B, H, C, P)
        P = pool.shape[-1]
        cq = self.clusters(q, 0)  # (B, H, N)
        mine = torch.gather(pool, 2, cq[..., None].expand(B, H, N, P))  # (B, H, N, P)
        m = P if self.max_cluster_keys == 0 else min(self.max_cluster_keys, P)
        if m == P:
            return mine
        kj = k.float()[torch.arange(B)[:, None, None, None], torch.arange(H)[None, :, None, None], mine.clamp(min=0)]
        d = torch.zeros(mine.shape, dtype=torch.float32)
        for e in range(r):  # in order, as sq_dists
            d += (q[..., None, e].float() - kj[..., e]) ** 2
        d = d.masked_fill(mine < 0, math.inf)
        # top-k, not a sort of the whole pool (4x faster); exact float ties at the m-th place are the only
        # case where the choice could depend on the layout: distances of distinct real vectors.
        near = torch.topk(d, m, dim=-1, largest=False, sorted=False).indices
        return torch.gather(mine, -1, torch.sort(near, dim=-1).values)

    def support(self, q: torch.Tensor, k: torch.Tensor, tokens: Sequence[str] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""One sentence's predicted graph without touching all pairs: ``(H, n, M)`` key indices and a keep mask.

        ``q``, ``k``: ``(H, n, r)`` projected vectors. Per query the band
        offsets, the global and end keys and the nearest keys of its pool
        (:meth:`nearest_in_pool`) are enumerated, deduplicated by a sort of each
        row, scored by the stacked model on those pairs only, and kept above
        the head's threshold: :math:`O(C n \log n + n P r + n M \log M)` with
        :math:`M = 2b + 3 + g + m`. The same edges as :meth:`predict` (without
        ``window``/``global_tokens``; non-causal).
        """
        if not self.is_fitted():
            raise NotFittedError("cascade is not fitted")
        H, n, r = q.shape
        lengths = torch.tensor([n])
        hashes = token_hashes(None if tokens is None else [tokens], 1, n)
        pos = torch.arange(n)
        offs = torch.arange(-self.band, self.band + 1)
        band = (pos[:, None] + offs[None, :]).expand(H, n, len(offs))
        ranks = _global_rank(self.key_hashes_, self.key_prior_, lengths, hashes)[0]  # (H, n)
        g = min(self.n_global, n)
        glob = torch.topk(-ranks, g, dim=-1).indices if g else torch.zeros(H, 0, dtype=torch.long)
        ends = torch.tensor([0, n - 1])
        fixed = torch.cat([glob, ends.expand(H, 2)], -1)[:, None, :].expand(H, n, g + 2)
        linked = self.nearest_in_pool(q[None], k[None], lengths)[0]  # (H, n, m)
        idx = torch.cat([band, fixed, linked], -1)
        idx = torch.where((idx >= 0) & (idx < n), idx, torch.full_like(idx, -1))
        idx, _ = torch.sort(idx, dim=-1)
        dup = torch.zeros_like(idx, dtype=torch.bool)
        dup[..., 1:] = idx[..., 1:] == idx[..., :-1]
        idx = idx.masked_fill(dup, -1)
        ok = idx >= 0
        safe = idx.clamp(min=0)
        # Features of the candidate pairs only (the order of STACKED_FEATURES).
        kj = k.float()[torch.arange(H)[:, None, None], safe]  # (H, n, M, r)
        d = torch.zeros(idx.shape, dtype=torch.float32)
        for e in range(r):  # in order, as sq_dists: the same distances as predict, bit for bit
            d += (q[:, :, None, e].float() - kj[..., e]) ** 2
        d = d.masked_fill(~ok, math.inf)
        row_min = d.amin(-1, keepdim=True)
        rank = torch.argsort(torch.argsort(d, dim=-1, stable=True), dim=-1)
        kp = _lookup(self.key_hashes_, self.key_prior_, hashes)[0].float()  # (H, n)
        qp = _lookup(self.query_hashes_, self.query_prior_, hashes)[0].float()
        off = (safe - pos[None, :, None]).clamp(-MAX_OFFSET, MAX_OFFSET) + MAX_OFFSET
        heads = torch.arange(H)[:, None, None]
        flag_q = torch.zeros(1, n, 1)
        feats = {
            "neg_dist": -d, "rel_dist": -(d - row_min), "log_rank": torch.log1p(rank.float()),
            "key_norm": k.float().pow(2).sum(-1)[heads, safe],
            "query_norm": q.float().pow(2).sum(-1)[:, :, None],
            "key_prior": kp[heads, safe],
            "query_prior": qp[:, :, None],
            "offset_prior": self.offset_prior_.float()[heads, off],
            "key_first": (safe == 0).float(), "key_last": (safe == n - 1).float(),
            "query_first": flag_q.index_fill(1, torch.tensor([0]), 1.0),
            "query_last": flag_q.index_fill(1, torch.tensor([n - 1]), 1.0),
            "log_length": torch.log(torch.tensor(float(n))),
        }
        z = _combine(feats, self.features, self.weight_, self.mean_, self.scale_, lambda v: v[:, None, None])
        keep = ok & (z >= self.head_thresholds()[:, None, None])
        return idx, keep
