r"""The Sparsefinder predictors (Treviso et al. 2022): distance, bucketing, k-means and blocks.

All four work in the learned low-dimensional space: ``q``/``k`` are the
projected queries and keys :math:`q'_i = W_h q_i`, :math:`k'_j = W_h k_j`,
``(B, H, N, r)`` (:attr:`~sparsefinder.predictors.base.Predictor.input_space`
``"projected"``). Each ORs in the optional window and global tokens of
:mod:`sparsefinder.predictors.base`.

- :class:`DistancePredictor`: :math:`(i, j) \in \hat G \iff \|q'_i - k'_j\|^2 \le t`.
- :class:`BucketingPredictor`: equal-frequency bins per projected dimension;
  an edge where a query and a key share a bin in at least one dimension.
- :class:`KMeansPredictor`: centroids per head fitted on training data;
  an edge where the top-t centroid sets of a query and a key intersect.
- :class:`BlocksPredictor`: the same on contiguous blocks of ``b`` tokens
  (BigBird-like, with clusters in place of random blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from sparsefinder.graphs import AttentionGraph, real_tokens
from sparsefinder.predictors.base import (
    CentroidPredictor,
    CoreResult,
    Predictor,
    grouped_cost,
    register,
    shared_group_edges,
)
from sparsefinder.predictors.clustering import pooled_kmeans, pooled_kmeans_many, sq_dists
from sparsefinder.predictors.constraints import Constraint, Int, Options, Real, check_int

# ---------------------------------------------------------------------- distance


@register
class DistancePredictor(Predictor):
    r"""Threshold on the squared distance in the projected space.

    .. math:: \hat G = \{(i, j) : \|q'_i - k'_j\|^2 \le t\}

    Cost: a real kernel still scores every valid pair, but in ``r`` instead of
    ``d`` dimensions, so the core cost is :math:`|V| \cdot r / d` pairs-equivalent
    (:math:`|V| = n^2`, or :math:`n(n+1)/2` when causal). ``d``, the model's head
    dimension, is the context argument ``head_dim`` (needed for the cost only).
    """

    name: ClassVar[str] = "distance"
    family: ClassVar[str] = "sparsefinder"
    input_space: ClassVar[str] = "projected"
    context_keys: ClassVar[tuple[str, ...]] = ("head_dim",)

    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"threshold": tuple(0.5 * i for i in range(1, 11))}
    """:math:`t \\in \\{0.5, 1.0, \\ldots, 5.0\\}`."""
    constraints: ClassVar[dict[str, Constraint]] = {"threshold": Real()}

    def __init__(self, threshold: float = 1.0, window: int = 0, global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _core(
        self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool, head_dim: int | None = None
    ) -> CoreResult:
        edges = sq_dists(q, k) <= self.threshold

        def cost() -> torch.Tensor:
            if head_dim is None:
                raise ValueError("the distance cost needs the model's head dimension: pass head_dim=d")
            d = check_int(head_dim, "head_dim", minimum=1)
            pairs = lengths * (lengths + 1) // 2 if causal else lengths * lengths
            per_sentence = pairs.double() * q.shape[-1] / d
            return per_sentence[:, None].expand(q.shape[0], q.shape[1])

        return edges, cost


# ---------------------------------------------------------------------- bucketing


def equal_frequency_bins(x: torch.Tensor, lengths: torch.Tensor, n_bins: int) -> torch.Tensor:
    r"""``(B, H, N, r)`` int64 bin of each real token in each dimension; ``-1`` on padding.

    Per sentence, head and dimension ``e``, the ``n`` real tokens are ranked by
    :math:`x_{\cdot e}` (a stable sort: equal values keep position order, so ties
    are deterministic) and rank :math:`\rho` goes to bin :math:`\lfloor \rho / s \rfloor`,
    :math:`s = \lceil n / \beta \rceil`. For :math:`n < \beta`, :math:`s = 1`: each
    token gets its own bin (``n`` bins, not β).
    """
    batch, heads, n, dim = x.shape
    real = real_tokens(lengths, n)  # (B, N)
    order = torch.argsort(x, dim=2, stable=True)
    # Stable-sort again on the padding flag: real tokens first, in value order.
    pad = (~real)[:, None, :, None].expand(batch, heads, n, dim)
    order = order.gather(2, torch.argsort(pad.gather(2, order).to(torch.int8), dim=2, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(2, order, torch.arange(n, device=x.device)[None, None, :, None].expand_as(order))
    size = (lengths + n_bins - 1) // n_bins
    bins = ranks // size.clamp(min=1)[:, None, None, None]
    return bins.masked_fill(pad, -1)


def bin_membership(bins: torch.Tensor, n_bins: int) -> torch.Tensor:
    """``(B, H, r·β, N)`` bool: token in (dimension, bin) group, from :func:`equal_frequency_bins`."""
    batch, heads, n, dim = bins.shape
    ids = torch.arange(n_bins, device=bins.device)
    member = bins.permute(0, 1, 3, 2)[:, :, :, None, :] == ids[None, None, None, :, None]  # (B, H, r, β, N)
    return member.reshape(batch, heads, dim * n_bins, n)


@register
class BucketingPredictor(Predictor):
    r"""Equal-frequency quantisation of each projected dimension (:func:`equal_frequency_bins`).

    With :math:`f_e(x)` the bin of ``x`` in dimension ``e`` (queries ranked among
    the sentence's queries, keys among its keys):

    .. math:: \hat G = \{(i, j) : \exists e \le r,\ f_e(q'_i) = f_e(k'_j)\}

    Cost: the grouped computation scores, for every dimension and bin, all
    queries × keys of the bin: :math:`\sum_{e, b} |Q_{e,b}| \cdot |K_{e,b}|` valid
    pairs (a pair sharing bins in several dimensions counts once per dimension).
    """

    name: ClassVar[str] = "bucketing"
    family: ClassVar[str] = "sparsefinder"
    input_space: ClassVar[str] = "projected"

    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"n_buckets": range(2, 21, 2)}
    """:math:`\\beta \\in \\{2, 4, \\ldots, 20\\}`."""
    constraints: ClassVar[dict[str, Constraint]] = {"n_buckets": Int(1)}

    def __init__(self, n_buckets: int = 4, window: int = 0, global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _core(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool) -> CoreResult:
        bq = equal_frequency_bins(q, lengths, self.n_buckets)
        bk = equal_frequency_bins(k, lengths, self.n_buckets)
        batch, heads, n, dim = bq.shape
        edges = torch.zeros(batch, heads, n, n, dtype=torch.bool, device=q.device)
        for e in range(dim):
            edges |= (bq[..., :, None, e] == bk[..., None, :, e]) & (bq[..., :, None, e] >= 0)

        def cost() -> torch.Tensor:
            return grouped_cost(bin_membership(bq, self.n_buckets), bin_membership(bk, self.n_buckets), causal)

        return edges, cost


# ---------------------------------------------------------------------- k-means

KMEANS_FIT: dict[str, Constraint] = {"max_iter": Int(0), "max_points": Int(1, optional=True), "seed": Int(0)}
"""Constraints on the fitting hyperparameters shared by k-means and blocks (:func:`~.clustering.pooled_kmeans`)."""


def top_centroids(x: torch.Tensor, centroids: torch.Tensor, top_t: int) -> torch.Tensor:
    """``(B, H, N, t)`` indices of the ``t`` centroids nearest each point (ties: lowest index first).

    ``x`` is ``(B, H, N, D)``, ``centroids`` ``(H, C, D)``.
    """
    d = sq_dists(x, centroids[None].to(x.dtype))
    return torch.argsort(d, dim=-1, stable=True)[..., : min(top_t, centroids.shape[1])]


def centroid_membership(x: torch.Tensor, centroids: torch.Tensor, top_t: int, lengths: torch.Tensor) -> torch.Tensor:
    """``(B, H, C, N)`` bool: token in the top-t set of centroid ``c`` (False on padding)."""
    idx = top_centroids(x, centroids, top_t)
    batch, heads, n, _ = x.shape
    member = torch.zeros(batch, heads, n, centroids.shape[1], dtype=torch.bool, device=x.device)
    member.scatter_(-1, idx, True)
    member &= real_tokens(lengths, n)[:, None, :, None]
    return member.transpose(-1, -2)


@register
class KMeansPredictor(CentroidPredictor):
    r"""Clustering of the projected space with centroids fitted per head.

    :meth:`fit` pools the real projected queries and keys of the training
    batch per head and runs k-means (k-means++ seeding, then Lloyd) with
    ``n_clusters`` = C centroids: :attr:`centroids_` ``(H, C, r)``. At prediction,
    :math:`c_t(x)` is the set of the ``top_t`` centroids nearest ``x``, and

    .. math:: \hat G = \{(i, j) : c_t(q'_i) \cap c_t(k'_j) \ne \emptyset\}

    (with ``top_t = 1``: :math:`c(q'_i) = c(k'_j)`). Cost: the grouped computation
    :math:`\sum_c |Q_c| \cdot |K_c|` valid pairs, where :math:`Q_c` holds the
    queries whose top-t set contains ``c``.

    ``seed`` drives the k-means++ seeding and the subsample of at most
    ``max_points`` pooled points per head. One instance serves one layer.
    """

    name: ClassVar[str] = "kmeans"
    predict_only_params: ClassVar[frozenset[str]] = frozenset({"top_t"})
    family: ClassVar[str] = "sparsefinder"
    input_space: ClassVar[str] = "projected"
    stochastic: ClassVar[bool] = True

    constraints: ClassVar[dict[str, Constraint]] = {"n_clusters": Int(1), "top_t": Int(1), **KMEANS_FIT}

    def __init__(self, n_clusters: int = 4, top_t: int = 1, max_iter: int = 100, max_points: int | None = 100_000,
                 seed: int = 0, window: int = 0, global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _fit_centroids(self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return pooled_kmeans(queries, keys, lengths, self.n_clusters, self.max_iter, self.max_points, self.seed)

    def _fit_centroids_many(self, cluster_counts: Sequence[int], queries: torch.Tensor, keys: torch.Tensor,
                            lengths: torch.Tensor) -> list[torch.Tensor]:
        # One pooling, subsample and k-means++ seeding for every count (pooled_kmeans_many).
        return pooled_kmeans_many(queries, keys, lengths, cluster_counts, self.max_iter, self.max_points, self.seed)

    def _members(self, x: torch.Tensor, centroids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return centroid_membership(x, centroids, self.top_t, lengths)


# ---------------------------------------------------------------------- blocks


def block_vectors(x: torch.Tensor, lengths: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(B, H, ⌈N/b⌉, b·r)``: the ``b`` projections of each block of contiguous tokens, concatenated.

    Positions past a sentence's end (padding, and the missing tail of its last,
    partial block) contribute zero vectors.
    """
    batch, heads, n, dim = x.shape
    n_blocks = -(-n // block_size)
    x = x * real_tokens(lengths, n)[:, None, :, None]
    x = torch.nn.functional.pad(x, (0, 0, 0, n_blocks * block_size - n))
    return x.reshape(batch, heads, n_blocks, block_size * dim)


def block_lengths(lengths: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blocks per sentence, :math:`\\lceil n_b / b \\rceil`."""
    return (lengths + block_size - 1) // block_size


def expand_blocks(block_edges: torch.Tensor, block_size: int, n: int) -> torch.Tensor:
    r"""Token edges ``(…, N, N)`` from block edges ``(…, ⌈N/b⌉, ⌈N/b⌉)``.

    :math:`(i, j)` is an edge iff :math:`(\lfloor i/b \rfloor, \lfloor j/b \rfloor)` is a block edge.
    """
    out = block_edges.repeat_interleave(block_size, dim=-1).repeat_interleave(block_size, dim=-2)
    return out[..., :n, :n]


def block_gold(gold: AttentionGraph, block_size: int) -> AttentionGraph:
    """Gold block graph: a block edge iff any gold edge lies inside its ``b × b`` tile.

    Its lengths are the block counts :math:`\\lceil n_b / b \\rceil`; it is
    non-causal (a causal diagonal tile holds valid pairs on both sides).
    """
    batch, heads, n, _ = gold.edges.shape
    n_blocks = -(-n // block_size)
    pad = n_blocks * block_size - n
    edges = torch.nn.functional.pad(gold.edges.to(torch.uint8), (0, pad, 0, pad))
    tiles = edges.reshape(batch, heads, n_blocks, block_size, n_blocks, block_size).amax(dim=(3, 5)).bool()
    return AttentionGraph(tiles, block_lengths(gold.lengths.long(), block_size), causal=False)


@register
class BlocksPredictor(CentroidPredictor):
    r"""Sparsefinder on contiguous blocks of ``block_size`` = b tokens (BigBird-like, clusters for random blocks).

    A sentence of ``n`` tokens has :math:`m = \lceil n/b \rceil` blocks; a block's
    vector concatenates its ``b`` projected tokens (:func:`block_vectors`, zeros
    past the end). :meth:`fit` clusters the pooled query and key block vectors
    of the training data per head (k-means++ then Lloyd, C = ``n_clusters``):
    :attr:`centroids_` ``(H, C, b·r)``. With :math:`\delta_c(x) = \|x - \mu_c\|^2`
    and k = ``top_k`` (the number of attended blocks):

    - ``variant="v1"`` (default): query block ``u`` goes to its nearest centroid
      :math:`c(u)` and attends the k key blocks nearest to :math:`\mu_{c(u)}`
      (ties: lower block index; causal: only key blocks :math:`v \le u` compete):

      .. math:: \hat B = \{(u, v) : v \in \operatorname{top}_k\{\delta_{c(u)}(K_v)\}\}.

    - ``variant="v2"``: each centroid takes its k nearest query blocks and its k
      nearest key blocks; :math:`\hat B = \bigcup_c \operatorname{top}_k^Q(c) \times \operatorname{top}_k^K(c)`.

    Both add the block window :math:`|u - v| \le \lfloor w_b/2 \rfloor`
    (``block_window`` = :math:`w_b`, 3 as in the paper's figure; 0 for none).
    Block edges expand to every token pair of their tile (:func:`expand_blocks`),
    then the token-level ``window``/``global_tokens`` are OR-ed in as for every
    method. Cost: a block-sparse kernel computes each selected tile once, so it
    is :math:`|\hat G|` (the default). The gold block graph for training block
    projections is :func:`block_gold`.
    """

    name: ClassVar[str] = "blocks"
    predict_only_params: ClassVar[frozenset[str]] = frozenset({"top_k", "variant", "block_window"})
    family: ClassVar[str] = "sparsefinder"
    input_space: ClassVar[str] = "projected"
    stochastic: ClassVar[bool] = True

    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"top_k": range(2, 21, 2)}
    """``top_k`` ∈ {2, 4, …, 20}, as BigBird's number of random blocks (the paper's baseline grid)."""
    constraints: ClassVar[dict[str, Constraint]] = {
        "top_k": Int(0), "block_size": Int(1), "n_clusters": Int(1), "block_window": Int(0), **KMEANS_FIT,
        "variant": Options(("v1", "v2"), text="be 'v1' or 'v2'"),
    }

    def __init__(self, top_k: int = 2, block_size: int = 2, n_clusters: int = 4, variant: str = "v1",
                 block_window: int = 3, max_iter: int = 100, max_points: int | None = 100_000, seed: int = 0,
                 window: int = 0, global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        c = state["centroids"]
        if c.dim() != 3 or c.shape[1] != self.n_clusters or c.shape[2] % self.block_size:
            raise ValueError(f"centroids must be (H, C = {self.n_clusters}, b·r) with b = {self.block_size}, "
                             f"got {tuple(c.shape)}")

    def _fit_centroids(self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b = self.block_size
        bq, bk = block_vectors(queries, lengths, b), block_vectors(keys, lengths, b)
        return pooled_kmeans(bq, bk, block_lengths(lengths, b), self.n_clusters, self.max_iter, self.max_points,
                             self.seed)

    def _fit_centroids_many(self, cluster_counts: Sequence[int], queries: torch.Tensor, keys: torch.Tensor,
                            lengths: torch.Tensor) -> list[torch.Tensor]:
        b = self.block_size
        bq, bk = block_vectors(queries, lengths, b), block_vectors(keys, lengths, b)
        return pooled_kmeans_many(bq, bk, block_lengths(lengths, b), cluster_counts, self.max_iter, self.max_points,
                                  self.seed)

    def block_edges(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool) -> torch.Tensor:
        """``(B, H, M, M)`` predicted block edges, ``M = ⌈N/b⌉`` (before expansion to tokens)."""
        b = self.block_size
        centroids = self._fitted_centroids(q, b * q.shape[3]).to(q.dtype)
        nb = block_lengths(lengths, b)
        vq, vk = block_vectors(q, lengths, b), block_vectors(k, lengths, b)
        m = vq.shape[2]
        real = real_tokens(nb, m)  # (B, M)
        dq = sq_dists(vq, centroids[None])  # (B, H, M, C)
        dk = sq_dists(vk, centroids[None])
        inf = torch.tensor(float("inf"), dtype=dq.dtype, device=dq.device)
        kk = min(self.top_k, m)
        if self.variant == "v1":
            cq = dq.argmin(dim=-1)  # (B, H, M)
            # dist[b, h, u, v] = δ_{c(u)}(K_v)
            dist = dk.transpose(-1, -2).gather(2, cq[..., None].expand(-1, -1, -1, m))
            allowed = real[:, None, None, :] & real[:, None, :, None]
            if causal:
                allowed = allowed & torch.ones(m, m, dtype=torch.bool, device=q.device).tril()
            dist = torch.where(allowed, dist, inf)
            order = torch.argsort(dist, dim=-1, stable=True)[..., :kk]
            edges = torch.zeros(dist.shape, dtype=torch.bool, device=q.device)
            edges.scatter_(-1, order, True)
            edges &= allowed
        else:
            dq = torch.where(real[:, None, :, None], dq, inf)
            dk = torch.where(real[:, None, :, None], dk, inf)
            mq = self._top_members(dq, kk, real)
            mk = self._top_members(dk, kk, real)
            edges = shared_group_edges(mq, mk)
        if self.block_window > 0:
            pos = torch.arange(m, device=q.device)
            edges = edges | ((pos[:, None] - pos[None, :]).abs() <= self.block_window // 2)
        return edges & real[:, None, :, None] & real[:, None, None, :]

    @staticmethod
    def _top_members(dist: torch.Tensor, kk: int, real: torch.Tensor) -> torch.Tensor:
        """``(B, H, C, M)``: the ``kk`` real blocks nearest each centroid."""
        order = torch.argsort(dist.transpose(-1, -2), dim=-1, stable=True)[..., :kk]  # (B, H, C, kk)
        member = torch.zeros(*order.shape[:-1], dist.shape[2], dtype=torch.bool, device=dist.device)
        member.scatter_(-1, order, True)
        return member & real[:, None, None, :]

    def _core(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool) -> CoreResult:
        return expand_blocks(self.block_edges(q, k, lengths, causal), self.block_size, q.shape[2]), None
