r"""Batched, seeded clustering over heads: k-means (k-means++ and Lloyd) and online spherical k-means.

All functions take points of every head at once, ``(H, P, D)``, and return
``(H, C, D)`` centroids; randomness comes only from the ``torch.Generator``
passed in. Shared by the k-means and blocks predictors (:mod:`.paper`)
and the Routing Transformer baseline (:mod:`.baselines`).
"""

from __future__ import annotations

import torch

from sparsefinder.graphs import real_tokens


def sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""``(..., P, C)`` squared distances :math:`\sum_e (a_{pe} - b_{ce})^2` of ``(..., P, D)`` and ``(..., C, D)``.

    Summed one dimension at a time in order, not through
    :math:`\|a\|^2 + \|b\|^2 - 2a\cdot b`: the result is then exactly a loop's,
    so thresholds and nearest neighbours do not flip on rounding.
    """
    out = torch.zeros(*a.shape[:-1], b.shape[-2], dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    for e in range(a.shape[-1]):
        out += (a[..., :, None, e] - b[..., None, :, e]) ** 2
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

    Stops after ``max_iter`` iterations or when no assignment changes. A
    centre that loses all its points stays where it is. Ties go to the lowest
    centre index.
    """
    heads, _, dim = x.shape
    assign = None
    for _ in range(max_iter):
        new_assign = sq_dists(x, centres).argmin(dim=-1)  # (H, P)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(centres).scatter_add_(1, assign[..., None].expand(-1, -1, dim), x)
        counts = torch.zeros(heads, centres.shape[1], dtype=x.dtype, device=x.device)
        counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=x.dtype))
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centres)
    return centres


def fit_kmeans(x: torch.Tensor, n_clusters: int, max_iter: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ then Lloyd, per head: ``(H, P, D) -> (H, C, D)``."""
    return lloyd(x, kmeans_plusplus(x, n_clusters, generator), max_iter)


def pooled_kmeans(queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, n_clusters: int, max_iter: int,
                  max_points: int | None, seed: int) -> torch.Tensor:
    """:func:`fit_kmeans` on the pooled real points of ``(B, H, N, D)`` queries and keys (:func:`pool_tokens`).

    One ``torch.Generator(seed)`` draws the subsample of ``max_points``, then the k-means++ seeding.
    """
    gen = make_generator(seed)
    return fit_kmeans(pool_tokens(queries, keys, lengths, max_points, gen), n_clusters, max_iter, gen)


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
    heads, clusters, dim = centroids.shape
    assign = torch.einsum("hmd,hcd->hmc", x, centroids).argmax(dim=-1)
    sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(-1, -1, dim), x)
    counts = torch.zeros(heads, clusters, dtype=x.dtype, device=x.device)
    counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=x.dtype))
    mean = sums / counts.clamp(min=1)[..., None]
    moved = normalise(decay * centroids + (1 - decay) * mean)
    return torch.where(counts[..., None] > 0, moved, centroids)
