r"""Baselines of the Sparsefinder paper: fixed and learned sparse-attention patterns of efficient transformers.

- :class:`WindowPredictor`: :math:`|i - j| \le \lfloor w/2 \rfloor`.
- :class:`BigBirdPredictor`: window 3, global first/last, ``r`` random keys per query (Zaheer et al. 2020).
- :class:`LongformerPredictor`: window + ``G`` global positions (Beltagy et al. 2020).
- :class:`ReformerPredictor`: angular LSH of the shared query/key space (Kitaev et al. 2020).
- :class:`RoutingPredictor`: balanced online spherical k-means (Roy et al. 2021).
- :class:`StridedPredictor`: the fixed pattern of the Sparse Transformer (Child et al. 2019).

Reformer and Routing hash or cluster whatever vectors they are given
(``input_space = "any"``); the paper runs them on the projected q', k'. The
fixed patterns use only the shape of ``q``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from sparsefinder.graphs import real_tokens
from sparsefinder.predictors.base import (
    BandPredictor,
    CentroidPredictor,
    CoreResult,
    Predictor,
    check_sentence_ids,
    edge_positions,
    global_token_mask,
    grouped_cost,
    register,
    sentence_rng,
    shared_group_edges,
    star_mask,
    window_mask,
)
from sparsefinder.predictors.clustering import make_generator, normalise, pool_tokens, spherical_kmeans_many
from sparsefinder.predictors.constraints import Constraint, Int, Real

# ---------------------------------------------------------------------- window


@register
class WindowPredictor(BandPredictor):
    r"""A band around the diagonal: :math:`\hat G = \{(i, j) : |i - j| \le \lfloor w/2 \rfloor\}`.

    ``w = 0`` is the empty graph (the grid's sparsity-1 end point); ``w = 1``
    the diagonal; even ``w`` equals ``w + 1``. Causal: :math:`i - \lfloor w/2 \rfloor \le j \le i`.
    """

    name: ClassVar[str] = "window"
    family: ClassVar[str] = "baseline"


# ---------------------------------------------------------------------- BigBird


@register
class BigBirdPredictor(Predictor):
    r"""BigBird's token-level pattern: window, global first/last token, and ``r`` random keys per query.

    The window (default ``w = 3``) and global tokens (default on) are the shared
    patterns. Each real query ``i`` then draws ``num_random`` = r keys uniformly
    without replacement among the valid keys it does not already attend to
    (causal: :math:`j \le i`), or all of them if fewer remain, as BigBird draws
    its random blocks outside the window and global blocks.

    Randomness: one ``numpy`` generator per sentence, ``default_rng([seed, n])``
    (``[seed, n, id]`` with the context ``sentence_ids``), draws an
    ``(H, n, n)`` uniform matrix; each query keeps its r allowed keys of lowest
    value. A sentence thus gets the same keys alone or in any padded batch.
    """

    name: ClassVar[str] = "bigbird"
    family: ClassVar[str] = "baseline"
    stochastic: ClassVar[bool] = True
    context_keys: ClassVar[tuple[str, ...]] = ("sentence_ids",)

    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"num_random": range(2, 21, 2)}
    """:math:`r \\in \\{2, 4, \\ldots, 20\\}`."""
    constraints: ClassVar[dict[str, Constraint]] = {"num_random": Int(0), "seed": Int(0)}

    def __init__(self, num_random: int = 3, seed: int = 0, window: int = 3, global_tokens: bool = True) -> None:
        self._init_params(locals())

    def _core(
        self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool, sentence_ids: Any = None
    ) -> CoreResult:
        batch, heads, n = q.shape[:3]
        ids = check_sentence_ids(sentence_ids, batch)
        edges = torch.zeros(batch, heads, n, n, dtype=torch.bool, device=q.device)
        taken = torch.zeros(n, n, dtype=torch.bool, device=q.device)
        if self.window > 0:
            taken = window_mask(n, self.window, q.device)
        for b in range(batch):
            nb = int(lengths[b])
            if nb == 0 or self.num_random == 0:
                continue
            rng = sentence_rng(self.seed, b, nb, ids)
            u = torch.from_numpy(rng.random((heads, nb, nb))).to(q.device)
            allowed = ~taken[:nb, :nb]
            if self.global_tokens:
                allowed = allowed & ~global_token_mask(lengths[b : b + 1], n)[0, 0, :nb, :nb]
            if causal:
                allowed = allowed & torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
            u = torch.where(allowed, u, torch.tensor(float("inf"), dtype=u.dtype, device=q.device))
            pick = torch.argsort(u, dim=-1, stable=True)[..., : self.num_random]
            chosen = torch.zeros(heads, nb, nb, dtype=torch.bool, device=q.device)
            chosen.scatter_(-1, pick, True)
            edges[b, :, :nb, :nb] = chosen & allowed
        return edges, None


# ---------------------------------------------------------------------- Longformer


@register
class LongformerPredictor(Predictor):
    r"""Longformer: sliding window plus ``G`` = ``num_global`` global positions.

    The global positions are each sentence's first :math:`\lceil G/2 \rceil` and
    its own last :math:`\lfloor G/2 \rfloor` real tokens (so ``G = 2`` is the first
    and last token, as with ``global_tokens``; they overlap when :math:`G \ge n`).
    A global position attends to every token and every token attends to it
    (Longformer's symmetric global attention). Window default ``w = 3``.
    """

    name: ClassVar[str] = "longformer"
    family: ClassVar[str] = "baseline"

    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"num_global": range(2, 21, 2)}
    """:math:`G \\in \\{2, 4, \\ldots, 20\\}`."""
    constraints: ClassVar[dict[str, Constraint]] = {"num_global": Int(0)}

    def __init__(self, num_global: int = 2, window: int = 3, global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _core(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool) -> CoreResult:
        g = self.num_global
        positions = edge_positions(lengths, q.shape[2], (g + 1) // 2, g // 2)
        return star_mask(positions), None


# ---------------------------------------------------------------------- Reformer


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    r"""``(B, H, N, R)`` angular-LSH bucket of each vector in each round.

    ``x`` is ``(B, H, N, D)``, ``rotations`` ``(R, H, D, β/2)``; the bucket in
    round ``ρ`` is :math:`\arg\max([x R_\rho; -x R_\rho])` (ties: lowest index).
    """
    proj = torch.einsum("bhnd,rhdk->bhnrk", x, rotations.to(x.dtype))
    return torch.cat([proj, -proj], dim=-1).argmax(dim=-1)


@register
class ReformerPredictor(Predictor):
    r"""Reformer's LSH attention graph, without its chunking.

    Queries and keys are hashed together (the concatenated set
    :math:`\{q'_i\} \cup \{k'_j\}`, as Reformer shares them) with random
    rotations :math:`R_\rho \in \mathbb{R}^{r \times \beta/2}`, one per round
    ``ρ`` and head, drawn from ``torch.Generator(seed)`` with i.i.d. N(0, 1)
    entries; :math:`h_\rho(x) = \arg\max([x R_\rho; -x R_\rho])` (:func:`lsh_buckets`).

    .. math:: \hat G = \{(i, j) : \exists \rho,\ h_\rho(q'_i) = h_\rho(k'_j)\}

    ``n_buckets`` = β must be even. Cost: :math:`\sum_\rho \sum_b |Q_{\rho,b}| \cdot |K_{\rho,b}|`.
    """

    name: ClassVar[str] = "reformer"
    family: ClassVar[str] = "baseline"
    input_space: ClassVar[str] = "any"
    stochastic: ClassVar[bool] = True

    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"n_buckets": range(2, 21, 2)}
    """:math:`\\beta \\in \\{2, 4, \\ldots, 20\\}` buckets (``n_rounds`` fixed)."""
    constraints: ClassVar[dict[str, Constraint]] = {"n_buckets": Int(2), "n_rounds": Int(1), "seed": Int(0)}

    def __init__(
        self, n_buckets: int = 4, n_rounds: int = 4, seed: int = 0, window: int = 0, global_tokens: bool = False
    ) -> None:
        self._init_params(locals())

    def _check_params(self) -> None:
        super()._check_params()
        if self.n_buckets % 2:
            raise ValueError(f"n_buckets must be even (argmax over [xR; -xR]), got {self.n_buckets}")

    def rotations(self, heads: int, dim: int) -> torch.Tensor:
        """``(R, H, D, β/2)`` random rotations of this seed (independent of the batch).

        Drawn one round at a time, so the first rounds do not depend on
        ``n_rounds``: more rounds only add edges.
        """
        gen = make_generator(self.seed)
        shape = (heads, dim, self.n_buckets // 2)
        return torch.stack([torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(self.n_rounds)])

    def _core(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool) -> CoreResult:
        rot = self.rotations(q.shape[1], q.shape[3]).to(q.device)
        hq, hk = lsh_buckets(q, rot), lsh_buckets(k, rot)  # (B, H, N, R)
        batch, heads, n, rounds = hq.shape
        real = real_tokens(lengths, n)[:, None, None, None, :]
        ids = torch.arange(self.n_buckets, device=q.device)[None, None, None, :, None]
        # (B, H, R, β, N) memberships, flattened to groups (round, bucket).
        mq = (hq.permute(0, 1, 3, 2)[:, :, :, None, :] == ids) & real
        mk = (hk.permute(0, 1, 3, 2)[:, :, :, None, :] == ids) & real
        mq = mq.reshape(batch, heads, rounds * self.n_buckets, n)
        mk = mk.reshape(batch, heads, rounds * self.n_buckets, n)
        return shared_group_edges(mq, mk), lambda: grouped_cost(mq, mk, causal)


# ---------------------------------------------------------------------- Routing Transformer


def balanced_membership(x: torch.Tensor, centroids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    r"""``(B, H, C, N)``: each centroid's top :math:`\lceil n/C \rceil` real tokens by cosine similarity.

    ``x`` ``(B, H, N, D)`` (normalised here), ``centroids`` ``(H, C, D)`` unit
    vectors. Ties go to the earlier position. A token may be in several
    clusters or in none.
    """
    batch, heads, n, _ = x.shape
    c = centroids.shape[1]
    sim = torch.einsum("bhnd,hcd->bhcn", normalise(x), centroids.to(x.dtype))
    real = real_tokens(lengths, n)[:, None, None, :]
    sim = torch.where(real, sim, torch.tensor(float("-inf"), dtype=sim.dtype, device=x.device))
    order = torch.argsort(sim, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(n, device=x.device).expand_as(order))
    size = (lengths + c - 1) // c
    return (ranks < size[:, None, None, None]) & real


@register
class RoutingPredictor(CentroidPredictor):
    r"""Routing Transformer: balanced online spherical k-means over normalised queries and keys.

    :meth:`fit` pools the normalised training queries and keys per head
    (:math:`\{q'_i/\|q'_i\|\} \cup \{k'_j/\|k'_j\|\}`), starts from ``n_clusters`` = C
    points drawn without replacement (``torch.Generator(seed)``), and makes
    ``epochs`` seeded shuffled passes of mini-batches of ``batch_points``, each an
    EMA update with ``decay`` λ (:func:`~.clustering.spherical_kmeans_step`):
    :attr:`centroids_` ``(H, C, r)`` unit vectors. At prediction each centroid
    takes its top :math:`\lceil n/C \rceil` queries and, separately, keys of the
    sentence by cosine similarity (:func:`balanced_membership`), and

    .. math:: \hat G = \{(i, j) : \exists c,\ i \in Q_c,\ j \in K_c\}.

    Cost: :math:`\sum_c |Q_c| \cdot |K_c|` valid pairs.
    """

    name: ClassVar[str] = "routing"
    family: ClassVar[str] = "baseline"
    input_space: ClassVar[str] = "any"
    stochastic: ClassVar[bool] = True

    constraints: ClassVar[dict[str, Constraint]] = {
        "n_clusters": Int(1), "epochs": Int(0), "batch_points": Int(1), "seed": Int(0),
        "decay": Real(0, 1, text="lie in [0, 1]"),
    }

    def __init__(
        self,
        n_clusters: int = 4,
        decay: float = 0.9,
        epochs: int = 3,
        batch_points: int = 256,
        seed: int = 0,
        window: int = 0,
        global_tokens: bool = False,
    ) -> None:
        self._init_params(locals())

    def _fit_centroids(self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self._fit_centroids_many([self.n_clusters], queries, keys, lengths)[0]

    def _fit_centroids_many(self, cluster_counts: Sequence[int], queries: torch.Tensor, keys: torch.Tensor,
                            lengths: torch.Tensor) -> list[torch.Tensor]:
        # Every count in the same seeded passes (spherical_kmeans_many): one pooling, one shuffle per epoch.
        x = normalise(pool_tokens(queries, keys, lengths))  # (H, P, D)
        return spherical_kmeans_many(x, cluster_counts, self.epochs, self.batch_points, self.decay,
                                     make_generator(self.seed))

    def _members(self, x: torch.Tensor, centroids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return balanced_membership(x, centroids, lengths)


# ---------------------------------------------------------------------- Sparse Transformer


def strided_mask(n: int, stride: int, expressivity: int, device: torch.device | str | None = None) -> torch.Tensor:
    r"""``(N, N)`` fixed pattern of Child et al. (2019, §4.2, "fixed" attention pattern), both heads merged.

    .. math::
        A^{(1)} = \{(i, j) : \lfloor j/\ell \rfloor = \lfloor i/\ell \rfloor\}, \qquad
        A^{(2)} = \{(i, j) : j \bmod \ell \in \{\ell - c, \ldots, \ell - 1\}\},

    :math:`\hat G = A^{(1)} \cup A^{(2)}`: each token sees its own block of ℓ
    and the last ``c`` "summary" positions of every block. (The paper's causal
    model then keeps :math:`j \le i`; for an encoder the same sets are used
    without that restriction.) ``c > ℓ`` is clamped to ℓ.
    """
    pos = torch.arange(n, device=device)
    same_block = (pos[:, None] // stride) == (pos[None, :] // stride)
    summary = (pos % stride) >= stride - min(expressivity, stride)
    return same_block | summary[None, :]


@register
class StridedPredictor(Predictor):
    r"""OpenAI Sparse Transformer, fixed pattern (:func:`strided_mask`): stride ℓ, expressivity c = 2.

    For :math:`n \le \ell` the whole sentence is one block, so the graph is full.
    """

    name: ClassVar[str] = "strided"
    family: ClassVar[str] = "baseline"

    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"stride": range(4, 21, 2)}
    """:math:`\\ell \\in \\{4, 6, \\ldots, 20\\}`."""
    constraints: ClassVar[dict[str, Constraint]] = {"stride": Int(1), "expressivity": Int(0)}

    def __init__(self, stride: int = 8, expressivity: int = 2, window: int = 0, global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _core(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool) -> CoreResult:
        return strided_mask(q.shape[2], self.stride, self.expressivity, q.device)[None, None], None
