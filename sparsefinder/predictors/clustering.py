r"""Batched, seeded clustering over heads: k-means (k-means++ and Lloyd) and online spherical k-means.

All functions take points of every head at once, ``(H, P, D)``, and return
``(H, C, D)`` centroids; randomness comes only from the ``torch.Generator``
passed in. Shared by the k-means and blocks predictors (:mod:`.paper`)
and the Routing Transformer baseline (:mod:`.baselines`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from sparsefinder.graphs import real_tokens


def sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""``(..., P, C)`` squared distances :math:`\sum_e (a_{pe} - b_{ce})^2` of ``(..., P, D)`` and ``(..., C, D)``.

    Summed one dimension at a time in order, not through
    :math:`\|a\|^2 + \|b\|^2 - 2a\cdot b`: the result is then exactly a loop's,
    so thresholds and nearest neighbours do not flip on rounding. The terms go
    through one reused buffer, in place (the same roundings as fresh tensors,
    without allocating and faulting in two ``(..., P, C)`` tensors per dimension).
    """
    if a.shape[-1] == 0:
        return torch.zeros(*a.shape[:-1], b.shape[-2], dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    # b's coordinates as contiguous rows: the broadcast subtraction then runs along a contiguous inner dim.
    bt = b.movedim(-1, 0).contiguous()  # (D, ..., C)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):  # training: no in-place, no out=
        out = (a[..., :, None, 0] - bt[0][..., None, :]).square()
        for e in range(1, a.shape[-1]):
            out = out + (a[..., :, None, e] - bt[e][..., None, :]).square()
        return out
    out = (a[..., :, None, 0] - bt[0][..., None, :]).pow_(2)
    if a.shape[-1] > 1:
        term = torch.empty_like(out)
        for e in range(1, a.shape[-1]):
            out += torch.sub(a[..., :, None, e], bt[e][..., None, :], out=term).pow_(2)
    return out


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def pool_tokens(
    queries: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    max_points: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(H, P, D)``: the real queries and keys of a padded ``(B, H, N, D)`` batch, pooled per head.

    With ``max_points``, a seeded uniform subsample of ``max_points`` points
    (the same positions for every head) bounds the cost of fitting.
    """
    n = queries.shape[2]
    real = real_tokens(lengths.to(queries.device), n)
    # (H, T, D): boolean indexing over the (B, N) dims of a (H, B, N, D) view.
    q = queries.transpose(0, 1)[:, real]
    k = keys.transpose(0, 1)[:, real]
    x = torch.cat([q, k], dim=1)
    if max_points is not None and x.shape[1] > max_points:
        idx = torch.randperm(x.shape[1], generator=generator, device=generator.device if generator else "cpu")
        x = x[:, idx[:max_points].to(x.device)]
    return x


def kmeans_plusplus(x: torch.Tensor, n_clusters: int, generator: torch.Generator) -> torch.Tensor:
    r"""k-means++ seeding (Arthur & Vassilvitskii 2007) for each head of ``x`` ``(H, P, D)``.

    The first centre is uniform; each next one is drawn with probability
    :math:`D(x)^2 / \sum_y D(y)^2`, :math:`D` the distance to the nearest centre
    so far. When all remaining points coincide with centres (:math:`\sum D^2 = 0`)
    the draw is uniform, so fewer distinct points than clusters still works.
    """
    heads, points, _ = x.shape
    if points == 0:
        raise ValueError("no points to cluster")
    rows = torch.arange(heads, device=x.device)
    first = torch.randint(points, (heads,), generator=generator, device=generator.device).to(x.device)
    centres = [x[rows, first]]
    d2 = sq_dists(x, centres[0][:, None, :])[..., 0]
    for _ in range(1, n_clusters):
        weights = d2.double().clamp(min=0)
        weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, torch.ones_like(weights))
        idx = torch.multinomial(weights.to(generator.device), 1, generator=generator)[:, 0].to(x.device)
        centre = x[rows, idx]
        centres.append(centre)
        d2 = torch.minimum(d2, sq_dists(x, centre[:, None, :])[..., 0])
    return torch.stack(centres, dim=1)


def lloyd(x: torch.Tensor, centres: torch.Tensor, max_iter: int) -> torch.Tensor:
    r"""Lloyd's iterations for each head: assign to the nearest centre, move centres to their means.

    A head stops after ``max_iter`` iterations or when none of its assignments
    changes. A centre that loses all its points stays where it is. Ties go to
    the lowest centre index.

    Heads stop independently: once a head's assignment repeats, its centres are
    a fixed point (the same points summed in the same order give the same
    means, bit for bit), so dropping it from the batch leaves the result equal
    to running every head until the slowest one converges, and to running each
    head alone. Only the heads still moving are computed (about 0.6 of the
    work on the default model's projections).
    """
    out = centres.clone()
    rows = torch.arange(x.shape[0], device=x.device)  # the heads still moving
    xa, ca = x, centres
    assign = None
    for _ in range(max_iter):
        new_assign = sq_dists(xa, ca).argmin(dim=-1)  # (H', P)
        if assign is not None:
            moving = (new_assign != assign).any(dim=-1)
            if not bool(moving.all()):
                rows, xa, ca, new_assign = rows[moving], xa[moving], ca[moving], new_assign[moving]
                if rows.numel() == 0:
                    break
        assign = new_assign
        ca = _cluster_means(xa, ca, assign)
        out[rows] = ca
    return out


def _cluster_means(x: torch.Tensor, centres: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """``(H, C, D)``: each centre moved to the mean of its assigned points of ``x``; empty ones stay."""
    heads, clusters = centres.shape[:2]
    sums = torch.zeros_like(centres).scatter_add_(1, assign[..., None].expand(-1, -1, x.shape[-1]), x)
    counts = torch.zeros(heads, clusters, dtype=x.dtype, device=x.device)
    counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=x.dtype))
    return torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centres)


def fit_kmeans(x: torch.Tensor, n_clusters: int, max_iter: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ then Lloyd, per head: ``(H, P, D) -> (H, C, D)``."""
    return lloyd(x, kmeans_plusplus(x, n_clusters, generator), max_iter)


def fit_kmeans_many(x: torch.Tensor, cluster_counts: Sequence[int], max_iter: int,
                    generator: torch.Generator) -> list[torch.Tensor]:
    """:func:`fit_kmeans` for each of ``cluster_counts`` from the same generator state, seeded once.

    k-means++ draws its centres one after another, so the seeding of ``C``
    centres is the first ``C`` of the seeding of ``max(cluster_counts)`` (the
    same draws from the same state): one seeding serves every count, and the
    result for each count equals ``fit_kmeans`` run alone from a copy of
    ``generator``. ``generator`` ends in the state after the largest seeding.
    """
    if not cluster_counts:
        return []
    init = kmeans_plusplus(x, max(cluster_counts), generator)
    return [lloyd(x, init[:, :c], max_iter) for c in cluster_counts]


def pooled_kmeans(queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, n_clusters: int, max_iter: int,
                  max_points: int | None, seed: int) -> torch.Tensor:
    """:func:`fit_kmeans` on the pooled real points of ``(B, H, N, D)`` queries and keys (:func:`pool_tokens`).

    One ``torch.Generator(seed)`` draws the subsample of ``max_points``, then the k-means++ seeding.
    """
    return pooled_kmeans_many(queries, keys, lengths, [n_clusters], max_iter, max_points, seed)[0]


def pooled_kmeans_many(queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor,
                       cluster_counts: Sequence[int], max_iter: int, max_points: int | None,
                       seed: int) -> list[torch.Tensor]:
    """:func:`pooled_kmeans` for each of ``cluster_counts``: one pooling and subsample, one seeding.

    Equal to one :func:`pooled_kmeans` call per count (:func:`fit_kmeans_many`).
    """
    gen = make_generator(seed)
    return fit_kmeans_many(pool_tokens(queries, keys, lengths, max_points, gen), cluster_counts, max_iter, gen)


def normalise(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Unit vectors along the last dim (a zero vector stays zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def spherical_kmeans_step(centroids: torch.Tensor, x: torch.Tensor, decay: float) -> torch.Tensor:
    r"""One online (mini-batch EMA) spherical k-means update, per head (Roy et al. 2021, Routing Transformer).

    ``centroids`` ``(H, C, D)`` unit vectors, ``x`` ``(H, m, D)`` unit vectors.
    Each point goes to the centroid of largest cosine :math:`\mu_c^\top x`
    (ties: lowest index); a centroid with assigned points :math:`X_c` moves to

    .. math:: \mu_c \leftarrow \frac{\lambda \mu_c + (1-\lambda)\,\bar x_c}{\|\lambda \mu_c + (1-\lambda)\,\bar x_c\|},
        \qquad \bar x_c = \frac{1}{|X_c|} \sum_{x \in X_c} x,

    and one without points is left unchanged.
    """
    return _spherical_step(centroids, x, decay)


def _spherical_step(centroids: torch.Tensor, x: torch.Tensor, decay: float,
                    bounds: Sequence[int] | None = None) -> torch.Tensor:
    """:func:`spherical_kmeans_step` on ``(H, ΣC, D)`` centroids made of independent consecutive sets.

    Set ``g`` is centroids ``bounds[g]:bounds[g+1]`` (default: one set). Each
    point is assigned once per set, to the best centroid of that set. The
    similarities of all sets come from one product and are the ones each set's
    own step computes, and each centroid's sum adds its points in the same
    order, so every set's update is its own step's.
    """
    heads, total, dim = centroids.shape
    bounds = [0, total] if bounds is None else bounds
    sim = torch.einsum("hmd,hcd->hmc", x, centroids)  # (H, m, ΣC)
    sets = len(bounds) - 1
    if sets == 1:
        assign = sim.argmax(dim=-1)  # ties: the lowest index
    else:
        # (H, m·G), point-major: each centroid sums its points in point order, as alone.
        best = torch.stack([sim[..., lo:hi].argmax(dim=-1) for lo, hi in itertools.pairwise(bounds)], dim=-1)
        assign = (best + torch.tensor(bounds[:-1], device=x.device)).reshape(heads, -1)
        x = x[:, :, None, :].expand(-1, -1, sets, -1).reshape(heads, -1, dim)
    sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(-1, -1, dim), x)
    counts = torch.zeros(heads, total, dtype=x.dtype, device=x.device)
    counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=x.dtype))
    mean = sums / counts.clamp(min=1)[..., None]
    moved = normalise(decay * centroids + (1 - decay) * mean)
    return torch.where(counts[..., None] > 0, moved, centroids)


def spherical_kmeans_many(x: torch.Tensor, cluster_counts: Sequence[int], epochs: int, batch_points: int,
                          decay: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Routing's online spherical k-means of ``x`` ``(H, P, D)`` (unit vectors) for each of ``cluster_counts``.

    For one count ``C``: start from the points at the first ``C`` positions of a
    seeded permutation (cycled when ``P < C``), then ``epochs`` passes, each over a
    fresh seeded permutation in mini-batches of ``batch_points``
    (:func:`spherical_kmeans_step`). The permutations do not depend on ``C``, so
    every count is run in the same passes, as one set of consecutive centroids
    (:func:`_spherical_step`), and each result equals the count's own run from a
    copy of ``generator``.
    """
    if not cluster_counts:
        return []
    points = x.shape[1]
    if points == 0:
        raise ValueError("no points to cluster")
    start = torch.randperm(points, generator=generator).to(x.device)
    # Each count's starting points, its centroids a consecutive set (H, ΣC, D).
    centroids = torch.cat([x[:, start[torch.arange(c, device=x.device) % points]] for c in cluster_counts], dim=1)
    bounds = [0, *itertools.accumulate(cluster_counts)]
    for _ in range(epochs):
        # One gather per pass; the mini-batches are then slices (the same points as indexing each).
        shuffled = x[:, torch.randperm(points, generator=generator).to(x.device)]
        for lo in range(0, points, batch_points):
            centroids = _spherical_step(centroids, shuffled[:, lo : lo + batch_points], decay, bounds)
    return [part.clone() for part in centroids.split(list(cluster_counts), dim=1)]
