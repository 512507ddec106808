"""Fitting every n_clusters at once (issue #17) against one fit per count, and Lloyd against scikit-learn.

The batched fits claim bit-identity with separate fits (the same seeded draws,
the same roundings, points summed in the same order), so those tests compare
with ``torch.equal``; in float64, so that they hold on any CPU vector width.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from sparsefinder.predictors import REGISTRY, get_predictor
from sparsefinder.predictors.clustering import (
    fit_kmeans,
    fit_kmeans_many,
    kmeans_plusplus,
    lloyd,
    make_generator,
    normalise,
    spherical_kmeans_many,
    spherical_kmeans_step,
)


def points(seed: int, heads: int = 3, n: int = 200, dim: int = 3) -> torch.Tensor:
    """Blobs of different spreads per head, so that heads converge after different numbers of iterations."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(heads, 5, dim))
    pick = rng.integers(0, 5, size=(heads, n))
    spread = np.array([0.3, 1.0, 3.0][:heads])[:, None, None]
    x = np.take_along_axis(centres, pick[..., None], axis=1) + spread * rng.normal(size=(heads, n, dim))
    return torch.from_numpy(x)


def lloyd_until_all_converge(x: torch.Tensor, centres: torch.Tensor, max_iter: int) -> torch.Tensor:
    """The previous rule: every head iterates until no head's assignment changes."""
    heads, _, dim = x.shape
    assign = None
    for _ in range(max_iter):
        new = ((x[:, :, None, :] - centres[:, None, :, :]) ** 2).sum(-1).argmin(-1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centres).scatter_add_(1, assign[..., None].expand(-1, -1, dim), x)
        counts = torch.zeros(heads, centres.shape[1], dtype=x.dtype).scatter_add_(1, assign, torch.ones_like(x[..., 0]))
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centres)
    return centres


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_iter", [1, 3, 100])
def test_lloyd_heads_stop_on_their_own_with_the_result_of_running_all_and_of_each_alone(seed, max_iter):
    x = points(seed)
    init = kmeans_plusplus(x, 6, make_generator(seed))
    got = lloyd(x, init, max_iter)
    assert torch.allclose(got, lloyd_until_all_converge(x, init, max_iter), rtol=0, atol=1e-12)
    for h in range(x.shape[0]):
        assert torch.equal(got[h : h + 1], lloyd(x[h : h + 1], init[h : h + 1], max_iter))
    assert torch.equal(init, kmeans_plusplus(x, 6, make_generator(seed)))  # the init is not modified


def test_lloyd_heads_do_converge_at_different_iterations():
    # The early stop above is exercised only if some head stops before the last one does.
    x = points(0)
    init = kmeans_plusplus(x, 6, make_generator(0))
    stops = []
    for h in range(x.shape[0]):
        n = next(i for i in range(1, 100) if torch.equal(lloyd(x[h : h + 1], init[h : h + 1], i),
                                                         lloyd(x[h : h + 1], init[h : h + 1], i + 1)))
        stops.append(n)
    assert len(set(stops)) > 1


@pytest.mark.parametrize("seed", [0, 3])
def test_fit_kmeans_many_equals_one_seeded_fit_per_count_whatever_the_grouping(seed):
    x = points(seed)
    counts = [2, 7, 4, 1]
    many = fit_kmeans_many(x, counts, 50, make_generator(seed))
    for c, got in zip(counts, many, strict=True):
        assert got.shape == (3, c, 3)
        assert torch.equal(got, fit_kmeans(x, c, 50, make_generator(seed)))
        assert torch.equal(got, fit_kmeans_many(x, [c], 50, make_generator(seed))[0])
    assert fit_kmeans_many(x, [], 50, make_generator(seed)) == []


@pytest.mark.parametrize("seed", [0, 1])
def test_lloyd_reaches_scikit_learns_inertia_from_the_same_init(seed):
    """Lloyd from the same k-means++ centres as scikit-learn's ``KMeans(init=centres, n_init=1)``.

    scikit-learn computes distances as :math:`\\|x\\|^2 - 2x\\cdot c + \\|c\\|^2`
    and we sum the squared differences, so the two only disagree on a point
    whose two nearest centres are within rounding (~1e-15 relative in
    float64): with ``tol=0`` both stop at the same fixed point, and the
    inertias agree to 1e-9 relative (a different fixed point would differ by
    far more than that).
    """
    x = points(seed)
    init = kmeans_plusplus(x, 6, make_generator(seed))
    ours = lloyd(x, init, 300)
    for h in range(x.shape[0]):
        xs = x[h].numpy()
        km = KMeans(n_clusters=6, init=init[h].numpy(), n_init=1, max_iter=300, tol=0.0, algorithm="lloyd").fit(xs)
        inertia = float(((xs[:, None, :] - ours[h].numpy()[None]) ** 2).sum(-1).min(-1).sum())
        assert inertia == pytest.approx(km.inertia_, rel=1e-9)
        assert np.allclose(np.sort(ours[h].numpy(), axis=0), np.sort(km.cluster_centers_, axis=0), atol=1e-9)


def spherical_alone(x: torch.Tensor, c: int, epochs: int, batch: int, decay: float, seed: int) -> torch.Tensor:
    """One count's run as Routing made it before: index each mini-batch, one step per batch."""
    gen = make_generator(seed)
    points_ = x.shape[1]
    centroids = x[:, torch.randperm(points_, generator=gen)[torch.arange(c) % points_]]
    for _ in range(epochs):
        perm = torch.randperm(points_, generator=gen)
        for lo in range(0, points_, batch):
            centroids = spherical_kmeans_step(centroids, x[:, perm[lo : lo + batch]], decay)
    return centroids


@pytest.mark.parametrize("n_points", [5, 120])  # 5: fewer points than the largest count (cycled starts, ties)
def test_spherical_kmeans_many_equals_each_count_alone(n_points):
    x = normalise(points(4, n=n_points))
    counts = [3, 1, 8]
    many = spherical_kmeans_many(x, counts, 2, 16, 0.8, make_generator(5))
    for c, got in zip(counts, many, strict=True):
        assert torch.equal(got, spherical_alone(x, c, 2, 16, 0.8, 5))
        assert torch.equal(got, spherical_kmeans_many(x, [c], 2, 16, 0.8, make_generator(5))[0])


@pytest.mark.parametrize("method", ["kmeans", "blocks", "routing"])
def test_fit_many_leaves_each_predictor_as_its_own_fit(method):
    torch.manual_seed(0)
    q, k = torch.randn(4, 2, 9, 3, dtype=torch.float64), torch.randn(4, 2, 9, 3, dtype=torch.float64)
    lengths = torch.tensor([9, 5, 1, 7])
    extra = {"max_points": 40} if method != "routing" else {"batch_points": 8}
    preds = [get_predictor(method, n_clusters=c, seed=2, **extra) for c in (6, 2, 4)]
    preds.append(get_predictor(method, n_clusters=4, seed=3, **extra))  # another seed: its own group
    preds.append(get_predictor(method, n_clusters=6, seed=2, window=3, **extra))  # prediction-only: the same fit
    REGISTRY[method].fit_many(preds, q, k, lengths)
    for pred in preds:
        alone = pred.clone().fit(q, k, lengths)
        assert torch.equal(pred.centroids_, alone.centroids_)
    assert not torch.equal(preds[2].centroids_, preds[3].centroids_)
    assert torch.equal(preds[0].centroids_, preds[4].centroids_)
    assert preds[1].centroids_.data_ptr() != preds[2].centroids_.data_ptr()  # own tensors
