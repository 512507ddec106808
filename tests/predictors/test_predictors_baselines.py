"""Window, BigBird, Longformer, Reformer, Routing and strided baselines against explicit loops."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_predictors_common import FAST, is_valid, loop_global, loop_shared_graph, loop_window, random_qk

from sparsefinder.predictors import get_predictor
from sparsefinder.predictors.base import sentence_rng
from sparsefinder.predictors.clustering import normalise, spherical_kmeans_step

batches = st.tuples(
    st.lists(st.integers(0, 9), min_size=1, max_size=3),
    st.integers(0, 2),
    st.booleans(),
    st.integers(0, 10**6),
)


def draw_batch(spec, dim: int = 3, ties: bool = False):
    lengths, extra, causal, seed = spec
    n = max(max(lengths) + extra, 1)
    q, k, lt = random_qk(lengths, n, heads=2, dim=dim, seed=seed, ties=ties)
    return q, k, lt, causal


def loop_pattern(lengths, n, heads, causal, member):
    """Edges ``member(b, h, i, j, length)`` over valid pairs, with loops."""
    out = np.zeros((len(lengths), heads, n, n), dtype=bool)
    for b, length in enumerate(lengths):
        for h in range(heads):
            for i in range(n):
                for j in range(n):
                    out[b, h, i, j] = is_valid(i, j, length, causal) and member(b, h, i, j, length)
    return out


# --------------------------------------------------------------------------- window


@given(batches, st.integers(0, 30), st.booleans())
@FAST
def test_window_matches_loops(spec, w, glob):
    q, k, lengths, causal = draw_batch(spec)
    graph = get_predictor("window", window=w, global_tokens=glob).predict(q, k, lengths, causal=causal)
    n = q.shape[2]

    def member(b, h, i, j, length):
        in_window = w > 0 and i - w // 2 <= j <= i + w // 2
        return in_window or (glob and loop_global(length, n)[i, j])

    assert np.array_equal(graph.edges.numpy(), loop_pattern(lengths.tolist(), n, 2, causal, member))


@given(batches)
@FAST
def test_window_of_at_least_2n_is_full_and_zero_is_empty(spec):
    q, k, lengths, causal = draw_batch(spec)
    n = q.shape[2]
    full = get_predictor("window", window=2 * n).predict(q, k, lengths, causal=causal)
    assert torch.equal(full.edges, full.valid_pairs().expand_as(full.edges))
    assert not get_predictor("window", window=0).predict(q, k, lengths, causal=causal).edges.any()


def test_window_one_is_the_diagonal_and_even_widths_round_down():
    q, k, lengths = random_qk([5], 5)
    one = get_predictor("window", window=1).predict(q, k, lengths).edges[0, 0]
    assert torch.equal(one, torch.eye(5, dtype=torch.bool))
    two = get_predictor("window", window=2).predict(q, k, lengths).edges
    three = get_predictor("window", window=3).predict(q, k, lengths).edges
    assert torch.equal(two, three)


# --------------------------------------------------------------------------- BigBird


def loop_bigbird(lengths, n, heads, causal, r, seed, w, glob, ids):
    out = np.zeros((len(lengths), heads, n, n), dtype=bool)
    for b, length in enumerate(lengths):
        if length == 0:
            continue
        u = sentence_rng(seed, b, length, ids).random((heads, length, length))
        fixed = loop_window(n, w) | (loop_global(length, n) if glob else False)
        for h in range(heads):
            for i in range(length):
                allowed = [j for j in range(length) if not fixed[i, j] and (not causal or j <= i)]
                chosen = sorted(allowed, key=lambda j: u[h, i, j])[:r]
                for j in range(length):
                    out[b, h, i, j] = is_valid(i, j, length, causal) and (fixed[i, j] or j in chosen)
    return out


@given(batches, st.integers(0, 6), st.integers(0, 5), st.sampled_from([0, 1, 3]), st.booleans(), st.booleans())
@FAST
def test_bigbird_matches_loops(spec, r, seed, w, glob, with_ids):
    q, k, lengths, causal = draw_batch(spec)
    ids = list(range(100, 100 + len(lengths))) if with_ids else None
    context = {"sentence_ids": ids} if with_ids else {}
    pred = get_predictor("bigbird", num_random=r, seed=seed, window=w, global_tokens=glob)
    graph = pred.predict(q, k, lengths, causal=causal, **context)
    expected = loop_bigbird(lengths.tolist(), q.shape[2], 2, causal, r, seed, w, glob, ids)
    assert np.array_equal(graph.edges.numpy(), expected)


def test_bigbird_draws_exactly_r_new_keys_per_query():
    q, k, lengths = random_qk([20, 11], 20)
    for r in (2, 4):
        pred = get_predictor("bigbird", num_random=r)
        graph = pred.predict(q, k, lengths)
        base = get_predictor("bigbird", num_random=0).predict(q, k, lengths)
        extra = (graph.edges & ~base.edges).sum(dim=-1)
        for b, n in enumerate([20, 11]):  # the global first/last rows already attend to everything
            assert (extra[b, :, 1 : n - 1] == r).all() and not extra[b, :, [0, n - 1]].any()
    # More random keys only add keys (the same draws, a longer prefix).
    small = get_predictor("bigbird", num_random=2).predict(q, k, lengths).edges
    large = get_predictor("bigbird", num_random=6).predict(q, k, lengths).edges
    assert not (small & ~large).any()


def test_bigbird_sentence_ids_decorrelate_equal_lengths():
    q, k, lengths = random_qk([12, 12], 12)
    pred = get_predictor("bigbird", num_random=2, window=0, global_tokens=False)
    same = pred.predict(q, k, lengths).edges
    assert torch.equal(same[0], same[1])  # without ids: a function of (seed, length) only
    diff = pred.predict(q, k, lengths, sentence_ids=[3, 4]).edges
    assert not torch.equal(diff[0], diff[1])
    with pytest.raises(ValueError, match="sentence_ids"):
        pred.predict(q, k, lengths, sentence_ids=[3])


# --------------------------------------------------------------------------- Longformer


@given(batches, st.integers(0, 12), st.sampled_from([0, 1, 3, 5]))
@FAST
def test_longformer_matches_loops(spec, g, w):
    q, k, lengths, causal = draw_batch(spec)
    graph = get_predictor("longformer", num_global=g, window=w).predict(q, k, lengths, causal=causal)

    def member(b, h, i, j, length):
        glob = set(range(math.ceil(g / 2))) | set(range(length - g // 2, length))
        return (w > 0 and abs(i - j) <= w // 2) or i in glob or j in glob

    assert np.array_equal(graph.edges.numpy(), loop_pattern(lengths.tolist(), q.shape[2], 2, causal, member))


def test_longformer_two_globals_are_first_and_own_last_token():
    q, k, lengths = random_qk([6, 3], 6)
    a = get_predictor("longformer", num_global=2, window=1).predict(q, k, lengths).edges
    b = get_predictor("window", window=1, global_tokens=True).predict(q, k, lengths).edges
    assert torch.equal(a, b)
    assert a[1, 0, 2, :3].all() and not a[1, 0, 5].any()  # sentence 1 ends at 2, not at the padded 5


# --------------------------------------------------------------------------- Reformer


def loop_lsh_bucket(x, rotation) -> int:
    d, half = rotation.shape
    proj = [sum(x[e] * rotation[e, c] for e in range(d)) for c in range(half)]
    values = proj + [-v for v in proj]
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first maximum


@given(batches, st.sampled_from([2, 4, 6]), st.integers(1, 3), st.integers(0, 5), st.booleans())
@FAST
def test_reformer_matches_loops(spec, n_buckets, rounds, seed, ties):
    q, k, lengths, causal = draw_batch(spec, ties=ties)
    pred = get_predictor("reformer", n_buckets=n_buckets, n_rounds=rounds, seed=seed)
    graph, cost = pred.predict_with_cost(q, k, lengths, causal=causal)
    rot = pred.rotations(2, q.shape[-1]).numpy()
    assert rot.shape == (rounds, 2, q.shape[-1], n_buckets // 2)
    qn, kn = q.numpy(), k.numpy()

    def shares(b: int, h: int, length: int) -> Callable[[int, int], int]:
        hq = [[loop_lsh_bucket(qn[b, h, i], rot[t, h]) for t in range(rounds)] for i in range(length)]
        hk = [[loop_lsh_bucket(kn[b, h, j], rot[t, h]) for t in range(rounds)] for j in range(length)]
        return lambda i, j: sum(hq[i][t] == hk[j][t] for t in range(rounds))

    edges, expected_cost = loop_shared_graph(q.shape[:3], lengths, causal, shares)
    assert np.array_equal(graph.edges.numpy(), edges)
    assert np.array_equal(cost.numpy(), expected_cost)


@given(batches, st.sampled_from([2, 4, 8]), st.integers(1, 3))
@FAST
def test_reformer_more_rounds_only_add_edges(spec, n_buckets, rounds):
    q, k, lengths, causal = draw_batch(spec)
    few = get_predictor("reformer", n_buckets=n_buckets, n_rounds=rounds).predict(q, k, lengths, causal=causal)
    many = get_predictor("reformer", n_buckets=n_buckets, n_rounds=rounds + 2).predict(q, k, lengths, causal=causal)
    assert not (few.edges & ~many.edges).any()


def test_reformer_buckets_are_scale_invariant():
    q, k, lengths = random_qk([8], 8, seed=3)
    pred = get_predictor("reformer", n_buckets=6, n_rounds=2)
    assert torch.equal(pred.predict(q, k, lengths).edges, pred.predict(3 * q, 0.5 * k, lengths).edges)


# --------------------------------------------------------------------------- Routing


def loop_balanced(x_rows, centroids, length):
    """Each centroid's top ⌈n/C⌉ tokens by cosine similarity (ties: earlier position)."""
    c_count = len(centroids)
    size = math.ceil(length / c_count) if length else 0
    groups = []
    for mu in centroids:
        sims = []
        for i in range(length):
            norm = math.sqrt(sum(v * v for v in x_rows[i]))
            unit = [v / max(norm, 1e-12) for v in x_rows[i]]
            sims.append(sum(unit[e] * mu[e] for e in range(len(mu))))
        groups.append(set(sorted(range(length), key=lambda i: -sims[i])[:size]))
    return groups


@given(batches, st.integers(1, 4), st.integers(0, 3))
@FAST
def test_routing_matches_loops(spec, n_clusters, seed):
    q, k, lengths, causal = draw_batch(spec)
    fit_lengths = torch.full_like(lengths, q.shape[2])
    pred = get_predictor("routing", n_clusters=n_clusters, seed=seed, batch_points=8).fit(q, k, fit_lengths)
    centroids = pred.centroids_.numpy()
    assert np.allclose(np.linalg.norm(centroids, axis=-1), 1.0)
    graph, cost = pred.predict_with_cost(q, k, lengths, causal=causal)
    qn, kn = q.numpy(), k.numpy()

    def shares(b: int, h: int, length: int) -> Callable[[int, int], int]:
        gq = loop_balanced(qn[b, h], centroids[h], length)
        gk = loop_balanced(kn[b, h], centroids[h], length)
        return lambda i, j: sum(i in gq[c] and j in gk[c] for c in range(n_clusters))

    edges, expected_cost = loop_shared_graph(q.shape[:3], lengths, causal, shares)
    assert np.array_equal(graph.edges.numpy(), edges)
    assert np.array_equal(cost.numpy(), expected_cost)


def test_routing_one_cluster_is_full_and_clusters_are_balanced():
    q, k, lengths = random_qk([10, 7], 10, seed=5)
    one = get_predictor("routing", n_clusters=1).fit(q, k, lengths).predict(q, k, lengths)
    assert torch.equal(one.edges, one.valid_pairs().expand_as(one.edges))
    pred = get_predictor("routing", n_clusters=3).fit(q, k, lengths)
    _, cost = pred.predict_with_cost(q, k, lengths)
    # Each of the 3 centroids takes ⌈n/3⌉ queries and ⌈n/3⌉ keys: cost C·⌈n/C⌉².
    assert cost[0].tolist() == [3 * 4 * 4] * 2 and cost[1].tolist() == [3 * 3 * 3] * 2


@pytest.mark.parametrize("seed", [0, 1])
def test_spherical_kmeans_step_matches_loops(seed):
    rng = np.random.default_rng(seed)
    cent = normalise(torch.from_numpy(rng.normal(size=(2, 3, 4))))
    x = normalise(torch.from_numpy(rng.normal(size=(2, 9, 4))))
    decay = 0.7
    got = spherical_kmeans_step(cent, x, decay).numpy()
    c, xs = cent.numpy(), x.numpy()
    for h in range(2):
        assign = [max(range(3), key=lambda j: (float(np.dot(xs[h, p], c[h, j])), -j)) for p in range(9)]
        for j in range(3):
            members = [xs[h, p] for p in range(9) if assign[p] == j]
            if not members:
                assert np.array_equal(got[h, j], c[h, j])
                continue
            moved = decay * c[h, j] + (1 - decay) * np.mean(members, axis=0)
            assert np.allclose(got[h, j], moved / np.linalg.norm(moved), atol=1e-12)


def test_routing_fit_finds_directional_clusters_and_is_seeded():
    rng = np.random.default_rng(0)
    dirs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    pts = dirs[rng.integers(0, 3, (4, 1, 30))] * rng.uniform(0.5, 3, (4, 1, 30, 1))
    pts = pts + 0.02 * rng.normal(size=pts.shape)
    q = torch.from_numpy(pts)
    lengths = [30] * 4
    a = get_predictor("routing", n_clusters=3, seed=2, epochs=5, batch_points=16).fit(q, q, lengths).centroids_
    b = get_predictor("routing", n_clusters=3, seed=2, epochs=5, batch_points=16).fit(q, q, lengths).centroids_
    assert torch.equal(a, b)
    best = (a[0].numpy() @ dirs.T).max(axis=0)  # every true direction has a centroid close to it
    assert (best > 0.95).all()


# --------------------------------------------------------------------------- strided


@given(batches, st.integers(1, 12), st.integers(0, 4))
@FAST
def test_strided_matches_loops(spec, stride, c):
    q, k, lengths, causal = draw_batch(spec)
    graph = get_predictor("strided", stride=stride, expressivity=c).predict(q, k, lengths, causal=causal)

    def member(b, h, i, j, length):
        same_block = i // stride == j // stride
        summary = j % stride in range(stride - min(c, stride), stride)
        return same_block or summary

    assert np.array_equal(graph.edges.numpy(), loop_pattern(lengths.tolist(), q.shape[2], 2, causal, member))


@pytest.mark.parametrize("n", [1, 2, 4, 5])
def test_strided_short_sentences_are_one_block(n):
    q, k, lengths = random_qk([n], n)
    graph = get_predictor("strided", stride=5).predict(q, k, lengths)
    assert graph.edges.all()


def test_strided_example():
    # ℓ = 4, c = 2: own block of 4, plus summary columns 2, 3, 6, 7.
    q, k, lengths = random_qk([9], 9)
    edges = get_predictor("strided", stride=4).predict(q, k, lengths).edges[0, 0]
    assert edges[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 6, 7]
    assert edges[8].nonzero().flatten().tolist() == [2, 3, 6, 7, 8]
