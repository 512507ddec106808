"""AttentionGraph against brute-force loops over (b, h, i, j)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparsefinder.graphs import AttentionGraph, num_valid_pairs, valid_pair_mask, valid_query_mask

FAST = settings(max_examples=60, deadline=None)


@st.composite
def raw_batches(draw, max_b: int = 3, max_h: int = 3, max_n: int = 6, min_len: int = 0):
    """Random raw edges ``(B, H, N, N)`` (padding and future included), lengths and causal flag."""
    b = draw(st.integers(1, max_b))
    h = draw(st.integers(1, max_h))
    n = draw(st.integers(max(1, min_len), max_n))
    lengths = draw(st.lists(st.integers(min_len, n), min_size=b, max_size=b))
    causal = draw(st.booleans())
    edges = draw(hnp.arrays(np.bool_, (b, h, n, n)))
    return torch.from_numpy(edges.copy()), torch.tensor(lengths, dtype=torch.long), causal


def is_valid(i: int, j: int, length: int, causal: bool) -> bool:
    return i < length and j < length and (not causal or j <= i)


@given(raw_batches())
@FAST
def test_valid_pair_mask_matches_loops(batch):
    edges, lengths, causal = batch
    b_, _, n, _ = edges.shape
    mask = valid_pair_mask(lengths, n, causal)
    assert mask.shape == (b_, 1, n, n) and mask.dtype == torch.bool
    qmask = valid_query_mask(lengths, n)
    assert qmask.shape == (b_, 1, n)
    for b in range(b_):
        count = 0
        for i in range(n):
            assert bool(qmask[b, 0, i]) == (i < int(lengths[b]))
            for j in range(n):
                expected = is_valid(i, j, int(lengths[b]), causal)
                assert bool(mask[b, 0, i, j]) == expected
                count += expected
        assert int(num_valid_pairs(lengths, causal)[b]) == count


@given(raw_batches())
@FAST
def test_construction_drops_invalid_edges_and_counts(batch):
    edges, lengths, causal = batch
    graph = AttentionGraph(edges, lengths, causal)
    b_, h_, n, _ = edges.shape
    counts = graph.num_edges()
    sparsity = graph.sparsity()
    assert sparsity.dtype == torch.float64 and sparsity.shape == (b_, h_)
    for b in range(b_):
        length = int(lengths[b])
        pairs = sum(is_valid(i, j, length, causal) for i in range(n) for j in range(n))
        for h in range(h_):
            kept = 0
            for i in range(n):
                for j in range(n):
                    expected = bool(edges[b, h, i, j]) and is_valid(i, j, length, causal)
                    assert bool(graph.edges[b, h, i, j]) == expected
                    kept += expected
            assert int(counts[b, h]) == kept
            # Empty sentences have no pairs; the graph reports them as fully sparse.
            expected_sparsity = 1.0 - kept / pairs if pairs else 1.0
            assert float(sparsity[b, h]) == pytest.approx(expected_sparsity, abs=1e-12)


def test_causal_full_graph_has_zero_sparsity_and_triangular_pairs():
    n = 5
    graph = AttentionGraph(torch.ones(1, 2, n, n, dtype=torch.bool), torch.tensor([n]), causal=True)
    assert graph.num_edges().tolist() == [[n * (n + 1) // 2] * 2]
    assert torch.equal(graph.sparsity(), torch.zeros(1, 2, dtype=torch.float64))
    # The future (j > i) is never an edge.
    assert not graph.edges[0, :, 0, 1:].any()


@given(raw_batches(), st.data())
@FAST
def test_pack_unpack_round_trip(batch, data):
    edges, lengths, causal = batch
    graph = AttentionGraph(edges, lengths, causal)
    b = data.draw(st.integers(0, edges.shape[0] - 1))
    n_b = int(lengths[b])
    bits = graph.pack(b)
    assert bits.dtype == np.uint8 and bits.size == (graph.num_heads * n_b * n_b + 7) // 8
    back = AttentionGraph.unpack_sentence(bits, graph.num_heads, n_b)
    assert back.dtype == torch.bool and back.shape == (graph.num_heads, n_b, n_b)
    assert torch.equal(back, graph.edges[b, :, :n_b, :n_b])


@given(raw_batches())
@FAST
def test_edge_list_matches_loops(batch):
    edges, lengths, causal = batch
    graph = AttentionGraph(edges, lengths, causal)
    for b in range(edges.shape[0]):
        n_b = int(lengths[b])
        for h in range(edges.shape[1]):
            expected = [(i, j) for i in range(n_b) for j in range(n_b) if bool(graph.edges[b, h, i, j])]
            got = graph.edge_list(b, h)
            assert got.dtype == np.int32 and got.shape == (len(expected), 2)
            assert [tuple(r) for r in got.tolist()] == expected


@given(st.integers(1, 3), st.lists(st.integers(0, 5), min_size=1, max_size=4), st.booleans(), st.integers(0, 2**31))
@FAST
def test_from_sentences_pads(heads, sizes, causal, seed):
    gen = torch.Generator().manual_seed(seed)
    sentences = [torch.rand(heads, m, m, generator=gen) > 0.5 for m in sizes]
    graph = AttentionGraph.from_sentences(sentences, causal=causal)
    n = max(sizes)
    assert graph.edges.shape == (len(sizes), heads, n, n)
    assert graph.lengths.tolist() == sizes and graph.causal == causal
    for b, m in enumerate(sizes):
        for h in range(heads):
            for i in range(n):
                for j in range(n):
                    inside = i < m and j < m
                    expected = inside and bool(sentences[b][h, i, j]) and (not causal or j <= i)
                    assert bool(graph.edges[b, h, i, j]) == expected
        assert torch.equal(graph.sentence(b), graph.edges[b, :, :m, :m])


def test_from_sentences_rejects_mismatched_heads_and_shapes():
    with pytest.raises(ValueError, match="no sentences"):
        AttentionGraph.from_sentences([])
    # One head would otherwise broadcast silently over the batch's two heads.
    with pytest.raises(ValueError, match="sentence 1"):
        AttentionGraph.from_sentences([torch.ones(2, 3, 3), torch.ones(1, 2, 2)])
    with pytest.raises(ValueError, match="sentence 0"):
        AttentionGraph.from_sentences([torch.ones(3, 3)])
    with pytest.raises(ValueError, match="sentence 1"):
        AttentionGraph.from_sentences([torch.ones(2, 3, 3), torch.ones(2, 3, 2)])


@given(raw_batches(), st.data())
@FAST
def test_union_intersection_match_loops(batch, data):
    edges_a, lengths, causal = batch
    # Same batch for both operands: same shape and lengths, independent edges.
    edges_b = torch.from_numpy(data.draw(hnp.arrays(np.bool_, tuple(edges_a.shape))).copy())
    ga, gb = AttentionGraph(edges_a, lengths, causal), AttentionGraph(edges_b, lengths, causal)
    union, inter = ga | gb, ga & gb
    assert torch.equal(union.edges, ga.union(gb).edges) and torch.equal(inter.edges, ga.intersection(gb).edges)
    bb, hh, n, _ = edges_a.shape
    for s in range(bb):
        for h in range(hh):
            for i in range(n):
                for j in range(n):
                    x, y = bool(ga.edges[s, h, i, j]), bool(gb.edges[s, h, i, j])
                    assert bool(union.edges[s, h, i, j]) == (x or y)
                    assert bool(inter.edges[s, h, i, j]) == (x and y)
    assert union.causal == causal and torch.equal(union.lengths, lengths)


def test_union_rejects_incompatible_graphs():
    edges = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    base = AttentionGraph(edges, torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="shapes differ"):
        base | AttentionGraph(torch.ones(2, 2, 4, 4, dtype=torch.bool), torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="different sentences"):
        base & AttentionGraph(edges, torch.tensor([4, 3]))
    with pytest.raises(ValueError, match="different sentences"):
        base.union(AttentionGraph(edges, torch.tensor([4, 2]), causal=True))


def test_shape_and_length_validation():
    with pytest.raises(ValueError, match=r"\(B, H, N, N\)"):
        AttentionGraph(torch.ones(1, 3, 3, dtype=torch.bool), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"\(B, H, N, N\)"):
        AttentionGraph(torch.ones(1, 1, 3, 4, dtype=torch.bool), torch.tensor([3]))
    with pytest.raises(ValueError, match="one entry per sentence"):
        AttentionGraph(torch.ones(2, 1, 3, 3, dtype=torch.bool), torch.tensor([3]))
    with pytest.raises(ValueError, match="exceeds"):
        AttentionGraph(torch.ones(1, 1, 3, 3, dtype=torch.bool), torch.tensor([4]))
    with pytest.raises(ValueError, match="non-negative"):
        AttentionGraph(torch.ones(2, 1, 3, 3, dtype=torch.bool), torch.tensor([3, -1]))


@pytest.mark.parametrize("causal", [False, True])
def test_single_token(causal):
    graph = AttentionGraph(torch.ones(1, 2, 1, 1, dtype=torch.bool), torch.tensor([1]), causal)
    assert graph.n == 1 and graph.num_heads == 2
    assert int(num_valid_pairs(graph.lengths, causal)[0]) == 1
    assert graph.num_edges().tolist() == [[1, 1]]
    assert graph.sparsity().tolist() == [[0.0, 0.0]]
    assert graph.edge_list(0, 1).tolist() == [[0, 0]]
    assert torch.equal(AttentionGraph.unpack_sentence(graph.pack(0), 2, 1), torch.ones(2, 1, 1, dtype=torch.bool))
    empty = AttentionGraph(torch.zeros(1, 1, 1, 1, dtype=torch.bool), torch.tensor([1]), causal)
    assert empty.sparsity().tolist() == [[1.0]]
