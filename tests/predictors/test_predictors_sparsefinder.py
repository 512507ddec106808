"""Sparsefinder's distance, bucketing, k-means and blocks predictors against explicit loops."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_predictors_common import FAST, is_valid, loop_shared_graph, random_qk

from sparsefinder.graphs import AttentionGraph
from sparsefinder.predictors import get_predictor
from sparsefinder.predictors.clustering import kmeans_plusplus, lloyd, make_generator, pool_tokens
from sparsefinder.predictors.paper import (
    block_gold,
    block_vectors,
    equal_frequency_bins,
    expand_blocks,
)

LENGTH_SETS = [([5, 3, 1], 5), ([1], 1), ([2, 2], 2), ([7, 4, 0], 7)]

batches = st.tuples(
    st.lists(st.integers(0, 7), min_size=1, max_size=3),
    st.integers(0, 2),  # extra padding
    st.integers(1, 4),  # projected dim r
    st.booleans(),  # causal
    st.booleans(),  # ties
    st.integers(0, 10**6),  # data seed
)


def draw_batch(spec):
    lengths, extra, dim, causal, ties, seed = spec
    n = max(max(lengths) + extra, 1)
    q, k, lt = random_qk(lengths, n, heads=2, dim=dim, seed=seed, ties=ties)
    return q, k, lt, causal


def sqdist(a, b) -> float:
    total = 0.0
    for e in range(len(a)):
        total += (a[e] - b[e]) ** 2
    return total


# --------------------------------------------------------------------------- distance


def loop_distance(q, k, lengths, t, causal):
    q, k = q.numpy(), k.numpy()
    b_, h_, n, _ = q.shape
    out = np.zeros((b_, h_, n, n), dtype=bool)
    for b in range(b_):
        for h in range(h_):
            for i in range(n):
                for j in range(n):
                    if is_valid(i, j, int(lengths[b]), causal):
                        out[b, h, i, j] = sqdist(q[b, h, i], k[b, h, j]) <= t
    return out


@given(batches, st.sampled_from([0.5, 1.0, 2.5, 5.0]))
@FAST
def test_distance_matches_loops(spec, t):
    q, k, lengths, causal = draw_batch(spec)
    pred = get_predictor("distance", threshold=t)
    graph, cost = pred.predict_with_cost(q, k, lengths, causal=causal, head_dim=16)
    assert np.array_equal(graph.edges.numpy(), loop_distance(q, k, lengths, t, causal))
    r = q.shape[-1]
    for b, n in enumerate(lengths.tolist()):
        pairs = n * (n + 1) // 2 if causal else n * n
        assert cost[b].tolist() == [pairs * r / 16] * 2


@given(batches, st.floats(0, 6), st.floats(0, 6))
@FAST
def test_distance_is_monotone_in_the_threshold(spec, t1, t2):
    q, k, lengths, causal = draw_batch(spec)
    lo, hi = sorted((t1, t2))
    small = get_predictor("distance", threshold=lo).predict(q, k, lengths, causal=causal).edges
    large = get_predictor("distance", threshold=hi).predict(q, k, lengths, causal=causal).edges
    assert not (small & ~large).any()


# --------------------------------------------------------------------------- bucketing


def loop_bins(values: list[float], n_bins: int) -> list[int]:
    n = len(values)
    order = sorted(range(n), key=lambda i: values[i])  # Python's sort is stable: ties by position
    size = max(math.ceil(n / n_bins), 1)
    bins = [0] * n
    for rank, i in enumerate(order):
        bins[i] = rank // size
    return bins


def loop_bucketing(q, k, lengths, beta, causal):
    """Edges and grouped cost: a pair costs once per dimension where it shares a bin."""
    q, k = q.numpy(), k.numpy()
    r = q.shape[3]

    def shares(b: int, h: int, m: int) -> Callable[[int, int], int]:
        bq = [loop_bins([q[b, h, i, e] for i in range(m)], beta) for e in range(r)]
        bk = [loop_bins([k[b, h, j, e] for j in range(m)], beta) for e in range(r)]
        return lambda i, j: sum(bq[e][i] == bk[e][j] for e in range(r))

    return loop_shared_graph(q.shape[:3], lengths, causal, shares)


@given(batches, st.integers(1, 9))
@FAST
def test_bucketing_matches_loops(spec, beta):
    q, k, lengths, causal = draw_batch(spec)
    graph, cost = get_predictor("bucketing", n_buckets=beta).predict_with_cost(q, k, lengths, causal=causal)
    edges, expected_cost = loop_bucketing(q, k, lengths, beta, causal)
    assert np.array_equal(graph.edges.numpy(), edges)
    assert np.array_equal(cost.numpy(), expected_cost)


@given(batches, st.integers(1, 9))
@FAST
def test_equal_frequency_bins_match_loops(spec, beta):
    q, _, lengths, _ = draw_batch(spec)
    bins = equal_frequency_bins(q, lengths, beta).numpy()
    for b, m in enumerate(lengths.tolist()):
        assert (bins[b, :, m:] == -1).all()
        for h in range(q.shape[1]):
            for e in range(q.shape[3]):
                assert list(bins[b, h, :m, e]) == loop_bins(q[b, h, :m, e].tolist(), beta)
                # Equal frequency: every bin but the last holds exactly ⌈n/β⌉ tokens.
                if m:
                    counts = np.bincount(bins[b, h, :m, e])
                    assert (counts[:-1] == math.ceil(m / beta)).all() and counts[-1] <= math.ceil(m / beta)


@given(batches)
@FAST
def test_bucketing_with_one_bucket_is_the_full_graph(spec):
    q, k, lengths, causal = draw_batch(spec)
    graph = get_predictor("bucketing", n_buckets=1).predict(q, k, lengths, causal=causal)
    assert torch.equal(graph.edges, graph.valid_pairs().expand_as(graph.edges))


@given(batches, st.integers(1, 9))
@FAST
def test_bucketing_gives_every_query_a_key(spec, beta):
    # Queries and keys of a sentence fill their bins equally, so each query's bin holds a key.
    q, k, lengths, _ = draw_batch(spec)
    graph = get_predictor("bucketing", n_buckets=beta).predict(q, k, lengths)
    rows = graph.edges.any(dim=-1)
    assert torch.equal(rows, graph.valid_queries().expand_as(rows))


def test_bucketing_with_more_buckets_than_tokens_pairs_equal_ranks():
    # n = 3 < β = 10: bins of size 1, so query of rank ρ meets only the key of rank ρ.
    q = torch.tensor([[[[0.3], [0.1], [0.2]]]], dtype=torch.float64)
    k = torch.tensor([[[[5.0], [7.0], [6.0]]]], dtype=torch.float64)
    edges = get_predictor("bucketing", n_buckets=10).predict(q, k, [3]).edges[0, 0]
    # query ranks: 1→0, 2→1, 0→2; key ranks: 0→0, 2→1, 1→2
    expected = torch.zeros(3, 3, dtype=torch.bool)
    expected[1, 0] = expected[2, 2] = expected[0, 1] = True
    assert torch.equal(edges, expected)


def test_bucketing_ties_are_broken_by_position():
    q = torch.zeros(1, 1, 4, 1, dtype=torch.float64)  # all equal: ranks follow positions
    k = torch.zeros(1, 1, 4, 1, dtype=torch.float64)
    edges = get_predictor("bucketing", n_buckets=2).predict(q, k, [4]).edges[0, 0]
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(edges, expected)


# --------------------------------------------------------------------------- k-means


def loop_top_sets(x, centroids, t):
    dists = [sqdist(x, c) for c in centroids]
    return set(sorted(range(len(centroids)), key=lambda c: dists[c])[:t])


def loop_cluster_graph(q, k, lengths, centroids, t, causal):
    q, k, centroids = q.numpy(), k.numpy(), centroids.numpy()

    def shares(b: int, h: int, m: int) -> Callable[[int, int], int]:
        sq = [loop_top_sets(q[b, h, i], centroids[h], t) for i in range(m)]
        sk = [loop_top_sets(k[b, h, j], centroids[h], t) for j in range(m)]
        return lambda i, j: len(sq[i] & sk[j])  # set intersection, not rank-aligned matching

    return loop_shared_graph(q.shape[:3], lengths, causal, shares)


@given(batches, st.integers(1, 4), st.integers(1, 4), st.integers(0, 3))
@FAST
def test_kmeans_matches_loops(spec, n_clusters, top_t, seed):
    q, k, lengths, causal = draw_batch(spec)
    if int(lengths.sum()) == 0:
        lengths = torch.full_like(lengths, q.shape[2])
    pred = get_predictor("kmeans", n_clusters=n_clusters, top_t=top_t, seed=seed).fit(q, k, lengths)
    assert pred.centroids_.shape == (2, n_clusters, q.shape[-1])
    graph, cost = pred.predict_with_cost(q, k, lengths, causal=causal)
    edges, expected_cost = loop_cluster_graph(q, k, lengths, pred.centroids_, top_t, causal)
    assert np.array_equal(graph.edges.numpy(), edges)
    assert np.array_equal(cost.numpy(), expected_cost)


def test_kmeans_top_t_uses_set_intersection_not_rank_alignment():
    # Query nearest c0 then c1; key nearest c1 then c0: rank-aligned matching misses the pair.
    centroids = torch.tensor([[[0.0], [1.0], [10.0]]], dtype=torch.float64)
    q = torch.tensor([[[[0.4]]]], dtype=torch.float64)
    k = torch.tensor([[[[0.6]]]], dtype=torch.float64)
    pred = get_predictor("kmeans", n_clusters=3, top_t=2).load_state_dict({"centroids": centroids})
    assert pred.predict(q, k, [1]).edges.item()
    assert not pred.set_params(top_t=1).predict(q, k, [1]).edges.item()


@given(batches, st.integers(1, 3))
@FAST
def test_kmeans_one_cluster_or_all_clusters_is_full(spec, n_clusters):
    q, k, lengths, causal = draw_batch(spec)
    lengths_fit = torch.full_like(lengths, q.shape[2])
    one = get_predictor("kmeans", n_clusters=1).fit(q, k, lengths_fit).predict(q, k, lengths, causal=causal)
    assert torch.equal(one.edges, one.valid_pairs().expand_as(one.edges))
    pred = get_predictor("kmeans", n_clusters=n_clusters, top_t=n_clusters).fit(q, k, lengths_fit)
    full = pred.predict(q, k, lengths, causal=causal)
    assert torch.equal(full.edges, full.valid_pairs().expand_as(full.edges))
    smaller = pred.clone(top_t=1).load_state_dict(pred.state_dict()).predict(q, k, lengths, causal=causal)
    assert not (smaller.edges & ~full.edges).any()


def loop_lloyd(x: np.ndarray, centres: np.ndarray, max_iter: int) -> np.ndarray:
    centres = centres.copy()
    assign = None
    for _ in range(max_iter):
        new = [min(range(len(centres)), key=lambda c: (sqdist(p, centres[c]), c)) for p in x]
        if new == assign:
            break
        assign = new
        for c in range(len(centres)):
            members = [x[p] for p in range(len(x)) if assign[p] == c]
            if members:
                centres[c] = np.mean(members, axis=0)
    return centres


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lloyd_matches_a_loop_implementation(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 30, 3))
    init = kmeans_plusplus(torch.from_numpy(x), 4, make_generator(seed))
    got = lloyd(torch.from_numpy(x), init, max_iter=50).numpy()
    for h in range(2):
        assert np.allclose(got[h], loop_lloyd(x[h], init[h].numpy(), 50), atol=1e-12)


def test_kmeans_plusplus_picks_data_points_and_distinct_ones_when_it_can():
    x = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [9.0, 1.0], [5.0, 5.0]]], dtype=torch.float64)
    for seed in range(5):
        centres = kmeans_plusplus(x, 3, make_generator(seed))[0]
        rows = {tuple(c.tolist()) for c in centres}
        assert rows == {(0.0, 0.0), (5.0, 5.0), (9.0, 1.0)}  # all three distinct points, each once
    four = kmeans_plusplus(x, 4, make_generator(0))[0]  # more clusters than distinct points: no crash
    assert all(tuple(c.tolist()) in {(0.0, 0.0), (5.0, 5.0), (9.0, 1.0)} for c in four)


def test_kmeans_recovers_separated_blobs_per_head():
    rng = np.random.default_rng(0)
    centres = np.array([[[-10.0, 0.0], [0.0, 10.0], [10.0, 0.0]], [[5.0, 5.0], [-5.0, -5.0], [5.0, -5.0]]])
    n = 60
    labels = rng.integers(0, 3, (2, 2, n))
    pts = np.take_along_axis(centres[None, :, :, :], labels[..., None], axis=2) + 0.1 * rng.normal(size=(2, 2, n, 2))
    q = torch.from_numpy(pts)
    fitted = get_predictor("kmeans", n_clusters=3, seed=1).fit(q, q, [n, n]).centroids_.numpy()
    for h in range(2):
        got = sorted(map(tuple, np.round(fitted[h])))
        assert got == sorted(map(tuple, centres[h]))


def test_fit_ignores_padding_and_is_seeded():
    q, k, lengths = random_qk([6, 3], 6, seed=4)
    a = get_predictor("kmeans", n_clusters=3, seed=5).fit(q, k, lengths).centroids_
    q2, k2 = q.clone(), k.clone()
    q2[1, :, 3:] = 1e6  # garbage on padding must not matter
    k2[1, :, 3:] = -1e6
    b = get_predictor("kmeans", n_clusters=3, seed=5).fit(q2, k2, lengths).centroids_
    assert torch.equal(a, b)
    c = get_predictor("kmeans", n_clusters=3, seed=6).fit(q, k, lengths).centroids_
    assert c.shape == a.shape


def test_pool_tokens_subsample_is_seeded_and_bounded():
    q, k, lengths = random_qk([6, 5], 6, seed=1)
    full = pool_tokens(q, k, lengths)
    assert full.shape == (2, 22, 3)
    sub = pool_tokens(q, k, lengths, max_points=7, generator=make_generator(3))
    again = pool_tokens(q, k, lengths, max_points=7, generator=make_generator(3))
    assert sub.shape == (2, 7, 3) and torch.equal(sub, again)
    rows = {tuple(r.tolist()) for r in full[0]}
    assert all(tuple(r.tolist()) in rows for r in sub[0])


@pytest.mark.parametrize("name", ["kmeans", "blocks"])
def test_centroids_round_trip_through_safetensors(name, tmp_path):
    q, k, lengths = random_qk([6, 4], 6, seed=2)
    pred = get_predictor(name, n_clusters=3).fit(q, k, lengths)
    save_file(pred.state_dict(), tmp_path / "c.safetensors")
    loaded = get_predictor(name, n_clusters=3).load_state_dict(load_file(tmp_path / "c.safetensors"))
    assert torch.equal(loaded.centroids_, pred.centroids_)
    assert torch.equal(loaded.predict(q, k, lengths).edges, pred.predict(q, k, lengths).edges)
    with pytest.raises(ValueError):
        get_predictor(name, n_clusters=4).load_state_dict(pred.state_dict())
    with pytest.raises(ValueError, match="lacks"):
        get_predictor(name, n_clusters=3).load_state_dict({})


def test_kmeans_rejects_centroids_of_another_shape():
    q, k, lengths = random_qk([4], 4, heads=2, dim=3)
    pred = get_predictor("kmeans", n_clusters=2).load_state_dict({"centroids": torch.zeros(3, 2, 3)})
    with pytest.raises(ValueError, match="centroids"):
        pred.predict(q, k, lengths)


# --------------------------------------------------------------------------- blocks


def loop_block_vec(x: np.ndarray, n: int, u: int, bs: int) -> np.ndarray:
    parts = [x[u * bs + s] if u * bs + s < n else np.zeros(x.shape[-1]) for s in range(bs)]
    return np.concatenate(parts)


def loop_blocks(q, k, lengths, centroids, bs, top_k, variant, block_window, causal):
    q, k, centroids = q.numpy(), k.numpy(), centroids.numpy()
    b_, h_, n, _ = q.shape
    edges = np.zeros((b_, h_, n, n), dtype=bool)
    for b in range(b_):
        m = int(lengths[b])
        nb = math.ceil(m / bs)
        for h in range(h_):
            vq = [loop_block_vec(q[b, h], m, u, bs) for u in range(nb)]
            vk = [loop_block_vec(k[b, h], m, v, bs) for v in range(nb)]
            mus = centroids[h]
            block = set()
            if variant == "v1":
                for u in range(nb):
                    c = min(range(len(mus)), key=lambda c: (sqdist(vq[u], mus[c]), c))
                    cands = [v for v in range(nb) if not causal or v <= u]
                    for v in sorted(cands, key=lambda v: sqdist(vk[v], mus[c]))[:top_k]:
                        block.add((u, v))
            else:
                for mu in mus:
                    top_q = sorted(range(nb), key=lambda u: sqdist(vq[u], mu))[:top_k]
                    top_k_blocks = sorted(range(nb), key=lambda v: sqdist(vk[v], mu))[:top_k]
                    block |= {(u, v) for u in top_q for v in top_k_blocks}
            for u in range(nb):
                for v in range(nb):
                    if block_window > 0 and abs(u - v) <= block_window // 2:
                        block.add((u, v))
            for i in range(m):
                for j in range(m):
                    edges[b, h, i, j] = is_valid(i, j, m, causal) and (i // bs, j // bs) in block
    return edges


@given(batches, st.integers(1, 3), st.integers(1, 3), st.integers(0, 4), st.sampled_from(["v1", "v2"]),
       st.sampled_from([0, 1, 3, 5]))
@FAST
def test_blocks_match_loops(spec, bs, n_clusters, top_k, variant, block_window):
    q, k, lengths, causal = draw_batch(spec)
    fit_lengths = torch.full_like(lengths, q.shape[2])
    pred = get_predictor("blocks", block_size=bs, n_clusters=n_clusters, top_k=top_k, variant=variant,
                         block_window=block_window, max_iter=20).fit(q, k, fit_lengths)
    assert pred.centroids_.shape == (2, n_clusters, bs * q.shape[-1])
    graph = pred.predict(q, k, lengths, causal=causal)
    expected = loop_blocks(q, k, lengths, pred.centroids_, bs, top_k, variant, block_window, causal)
    assert np.array_equal(graph.edges.numpy(), expected)


def test_blocks_v1_attends_exactly_k_blocks_per_query_block():
    q, k, lengths = random_qk([12], 12, seed=7)
    pred = get_predictor("blocks", block_size=3, n_clusters=2, top_k=2, block_window=0).fit(q, k, lengths)
    blocks = pred.block_edges(q, k, lengths, causal=False)
    assert (blocks.sum(dim=-1) == 2).all()


@given(batches, st.integers(1, 3))
@FAST
def test_block_vectors_and_expansion_match_loops(spec, bs):
    q, _, lengths, _ = draw_batch(spec)
    vec = block_vectors(q, lengths, bs).numpy()
    n = q.shape[2]
    assert vec.shape == (q.shape[0], 2, math.ceil(n / bs), bs * q.shape[-1])
    for b, m in enumerate(lengths.tolist()):
        for h in range(2):
            for u in range(vec.shape[2]):
                assert np.array_equal(vec[b, h, u], loop_block_vec(q[b, h].numpy(), m, u, bs))
    rng = np.random.default_rng(bs)
    block = torch.from_numpy(rng.random((1, 1, vec.shape[2], vec.shape[2])) < 0.5)
    tokens = expand_blocks(block, bs, n)[0, 0].numpy()
    for i in range(n):
        for j in range(n):
            assert tokens[i, j] == block[0, 0, i // bs, j // bs].item()


@given(st.lists(st.integers(0, 7), min_size=1, max_size=3), st.integers(1, 3), st.booleans(), st.integers(0, 99))
@FAST
def test_block_gold_is_any_edge_in_the_tile(lengths, bs, causal, seed):
    n = max(max(lengths), 1)
    rng = np.random.default_rng(seed)
    gold = AttentionGraph(torch.from_numpy(rng.random((len(lengths), 2, n, n)) < 0.2), torch.tensor(lengths), causal)
    blocks = block_gold(gold, bs)
    m = math.ceil(n / bs)
    assert blocks.edges.shape == (len(lengths), 2, m, m)
    for b, length in enumerate(lengths):
        assert int(blocks.lengths[b]) == math.ceil(length / bs)
        for h in range(2):
            for u in range(m):
                for v in range(m):
                    tile = any(gold.edges[b, h, i, j] for i in range(u * bs, min((u + 1) * bs, n))
                               for j in range(v * bs, min((v + 1) * bs, n)))
                    assert blocks.edges[b, h, u, v].item() == tile


@pytest.mark.parametrize("name", ["kmeans", "blocks", "routing"])
def test_changing_the_cluster_count_after_fit_asks_for_a_refit(name):
    q, k, lengths = random_qk([6], 6)
    pred = get_predictor(name, n_clusters=2).fit(q, k, lengths)
    pred.predict(q, k, lengths)
    with pytest.raises(ValueError, match="refit"):
        pred.set_params(n_clusters=3).predict(q, k, lengths)


def test_numpy_scalars_are_valid_hyperparameters():
    q, k, lengths = random_qk([4], 4)
    a = get_predictor("distance", threshold=np.float32(1.5)).predict(q, k, lengths).edges
    b = get_predictor("distance", threshold=1.5).predict(q, k, lengths).edges
    assert torch.equal(a, b)
    assert get_predictor("bucketing", n_buckets=np.int64(3)).predict(q, k, lengths).edges.any()
