"""Breaking BERT's syntax, lexical, position and random masks against explicit loops."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_predictors_common import FAST, is_valid, random_qk

from sparsefinder.graphs import AttentionGraph
from sparsefinder.predictors import get_predictor
from sparsefinder.predictors.base import sentence_rng
from sparsefinder.predictors.patterns import tree_hops

# --------------------------------------------------------------------------- syntax


@st.composite
def parsed_sentences(draw, max_words: int = 6):
    """A random dependency forest over words, a token → word map with special tokens and subwords."""
    words = draw(st.integers(0, max_words))
    heads = []
    for w in range(words):
        # A head among earlier words, or a root (-1 or itself): a forest, so several trees are tested.
        heads.append(draw(st.sampled_from([-1, w] + list(range(w)))))
    ids: list[int | None] = [None]
    for w in range(words):
        ids += [w] * draw(st.integers(1, 2))
    if draw(st.booleans()):
        ids.append(None)
    return heads, ids


def bfs_hops(heads: list[int]) -> list[list[float]]:
    w = len(heads)
    nbrs: list[set[int]] = [set() for _ in range(w)]
    for child, head in enumerate(heads):
        if head >= 0 and head != child:
            nbrs[child].add(head)
            nbrs[head].add(child)
    dist = [[math.inf] * w for _ in range(w)]
    for s in range(w):
        dist[s][s] = 0
        todo = deque([s])
        while todo:
            u = todo.popleft()
            for v in nbrs[u]:
                if dist[s][v] == math.inf:
                    dist[s][v] = dist[s][u] + 1
                    todo.append(v)
    return dist


@given(st.lists(parsed_sentences(), min_size=1, max_size=3), st.integers(0, 4), st.integers(0, 2), st.booleans())
@FAST
def test_syntax_matches_bfs(sentences, hops, extra, causal):
    heads = [s[0] for s in sentences]
    ids = [s[1] for s in sentences]
    lengths = [len(x) for x in ids]
    n = max(lengths) + extra
    q, k, lt = random_qk(lengths, n)
    graph = get_predictor("syntax", hops=hops).predict(q, k, lt, causal=causal, word_heads=heads, word_ids=ids)
    for b, length in enumerate(lengths):
        dist = bfs_hops(heads[b])
        for i in range(n):
            for j in range(n):
                linked = i == j or (
                    i < length and j < length and ids[b][i] is not None and ids[b][j] is not None
                    and dist[ids[b][i]][ids[b][j]] <= hops
                )
                assert graph.edges[b, 0, i, j].item() == (is_valid(i, j, length, causal) and linked)
    if not causal:  # symmetric
        assert torch.equal(graph.edges, graph.edges.transpose(-1, -2))


def test_syntax_example_with_special_tokens_and_subwords():
    # [CLS] the cat sat [SEP]; "cat" is two subword tokens. the → cat → sat (root).
    ids = [None, 0, 1, 1, 2, None]
    heads = [1, 2, -1]
    q, k, lengths = random_qk([6], 6)
    edges = get_predictor("syntax", hops=1).predict(q, k, lengths, word_heads=[heads], word_ids=[ids]).edges[0, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for i, j in [(1, 2), (1, 3), (2, 3), (2, 4), (3, 4)]:
        expected[i, j] = expected[j, i] = True
    expected |= torch.eye(6, dtype=torch.bool)  # special tokens: only their self loop
    assert torch.equal(edges, expected)
    two = get_predictor("syntax", hops=2).predict(q, k, lengths, word_heads=[heads], word_ids=[ids]).edges[0, 0]
    assert two[1, 4] and two[4, 1] and not two[0, 1]
    glob = get_predictor("syntax", global_tokens=True).predict(q, k, lengths, word_heads=[heads], word_ids=[ids])
    assert glob.edges[0, 0, 0].all() and glob.edges[0, 0, :, 5].all()


def test_tree_hops_accepts_both_root_conventions_and_rejects_bad_heads():
    assert np.array_equal(tree_hops([-1, 0], 1), tree_hops([0, 0], 1))
    with pytest.raises(ValueError, match="head"):
        tree_hops([0, 5], 1)


def test_syntax_needs_its_context():
    q, k, lengths = random_qk([3], 3)
    with pytest.raises(ValueError, match="word_heads"):
        get_predictor("syntax").predict(q, k, lengths)
    with pytest.raises(ValueError, match="word_ids"):
        get_predictor("syntax").predict(q, k, lengths, word_heads=[[-1]], word_ids=[[0, 0]])


# --------------------------------------------------------------------------- lexical


def loop_lexical(emb, lengths, n, sparsity, causal):
    out = np.zeros((len(lengths), 1, n, n), dtype=bool)
    for b, length in enumerate(lengths):
        unit = []
        for i in range(length):
            norm = math.sqrt(sum(v * v for v in emb[b][i]))
            unit.append([v / max(norm, 1e-12) for v in emb[b][i]])
        pairs = [(i, j) for i in range(length) for j in range(length) if is_valid(i, j, length, causal)]
        sim = {(i, j): round(sum(a * c for a, c in zip(unit[i], unit[j], strict=True)), 9) for (i, j) in pairs}
        budget = round((1 - sparsity) * len(pairs))
        for i, j in sorted(pairs, key=lambda p: (-sim[p], p))[:budget]:
            out[b, 0, i, j] = True
    return out


@given(st.lists(st.integers(0, 7), min_size=1, max_size=3), st.sampled_from([0.0, 0.3, 0.5, 0.8, 0.9, 1.0]),
       st.booleans(), st.integers(0, 10**6))
@FAST
def test_lexical_matches_loops(lengths, sparsity, causal, seed):
    n = max(max(lengths), 1)
    rng = np.random.default_rng(seed)
    vocab = rng.normal(size=(4, 3))  # a tiny vocabulary: repeated tokens have identical embeddings
    emb = [vocab[rng.integers(0, 4, length)] for length in lengths]
    q, k, lt = random_qk(lengths, n)
    pred = get_predictor("lexical", sparsity=sparsity)
    graph = pred.predict(q, k, lt, causal=causal, embeddings=[torch.from_numpy(e) for e in emb])
    expected = loop_lexical([e.tolist() for e in emb], lengths, n, sparsity, causal)
    assert np.array_equal(graph.edges.numpy(), np.broadcast_to(expected, graph.edges.shape))
    padded = torch.zeros(len(lengths), n, 3, dtype=torch.float64)
    for b, e in enumerate(emb):
        padded[b, : len(e)] = torch.from_numpy(e)
    assert torch.equal(pred.predict(q, k, lt, causal=causal, embeddings=padded).edges, graph.edges)


@given(st.lists(st.integers(1, 7), min_size=1, max_size=3), st.floats(0, 1), st.floats(0, 1), st.booleans())
@FAST
def test_lexical_hits_its_sparsity_and_is_nested(lengths, s1, s2, causal):
    n = max(lengths)
    emb = torch.randn(len(lengths), n, 4, generator=torch.Generator().manual_seed(0))
    q, k, lt = random_qk(lengths, n)
    lo, hi = sorted((s1, s2))
    dense = get_predictor("lexical", sparsity=lo).predict(q, k, lt, causal=causal, embeddings=emb)
    sparse = get_predictor("lexical", sparsity=hi).predict(q, k, lt, causal=causal, embeddings=emb)
    assert not (sparse.edges & ~dense.edges).any()
    pairs = torch.tensor([(m * (m + 1) // 2) if causal else m * m for m in lengths])
    assert torch.equal(sparse.num_edges()[:, 0], torch.round((1 - hi) * pairs.double()).long())


# --------------------------------------------------------------------------- position


@given(st.lists(st.integers(0, 8), min_size=1, max_size=3), st.integers(0, 20), st.booleans())
@FAST
def test_position_is_the_window(lengths, w, causal):
    n = max(max(lengths), 1)
    q, k, lt = random_qk(lengths, n)
    graph = get_predictor("position", window=w).predict(q, k, lt, causal=causal)
    for b, length in enumerate(lengths):
        for i in range(n):
            for j in range(n):
                expected = is_valid(i, j, length, causal) and w > 0 and abs(i - j) <= w // 2
                assert graph.edges[b, 0, i, j].item() == expected


# --------------------------------------------------------------------------- random


def loop_random(lengths, n, heads, causal, budget, seed, ids):
    out = np.zeros((len(lengths), heads, n, n), dtype=bool)
    for b, length in enumerate(lengths):
        if length == 0:
            continue
        u = sentence_rng(seed, b, length, ids).random((heads, length, length))
        for h in range(heads):
            pairs = [(i, j) for i in range(length) for j in range(length) if is_valid(i, j, length, causal)]
            for i, j in sorted(pairs, key=lambda p: u[h, p[0], p[1]])[: budget[b][h]]:
                out[b, h, i, j] = True
    return out


@given(st.lists(st.integers(0, 7), min_size=1, max_size=3), st.sampled_from([0.0, 0.5, 0.78, 0.9, 1.0]),
       st.booleans(), st.integers(0, 5), st.booleans())
@FAST
def test_random_matches_loops(lengths, sparsity, causal, seed, with_ids):
    n = max(max(lengths), 1)
    q, k, lt = random_qk(lengths, n, heads=3)
    ids = [7 * b + 1 for b in range(len(lengths))] if with_ids else None
    context = {"sentence_ids": ids} if with_ids else {}
    graph = get_predictor("random", sparsity=sparsity, seed=seed).predict(q, k, lt, causal=causal, **context)
    budget = []
    for length in lengths:
        pairs = length * (length + 1) // 2 if causal else length * length
        budget.append([round((1 - sparsity) * pairs)] * 3)
    assert np.array_equal(graph.edges.numpy(), loop_random(lengths, n, 3, causal, budget, seed, ids))
    assert graph.num_edges().tolist() == budget


def test_random_matches_another_graphs_per_head_edge_counts():
    lengths = [6, 4]
    q, k, lt = random_qk(lengths, 6, heads=2)
    rng = np.random.default_rng(0)
    for causal in (False, True):
        other = AttentionGraph(torch.from_numpy(rng.random((2, 2, 6, 6)) < 0.3), lt, causal)
        pred = get_predictor("random", seed=3)
        graph = pred.predict(q, k, lt, causal=causal, match=other)
        assert torch.equal(graph.num_edges(), other.num_edges())
        counts = pred.predict(q, k, lt, causal=causal, match=other.num_edges()).edges
        assert torch.equal(counts, graph.edges)
        expected = loop_random(lengths, 6, 2, causal, other.num_edges().tolist(), 3, None)
        assert np.array_equal(graph.edges.numpy(), expected)
    with pytest.raises(ValueError, match="different sentences"):
        pred.predict(q, k, lt, causal=False, match=AttentionGraph(other.edges, torch.tensor([5, 4]), False))
    with pytest.raises(ValueError, match="exceeds"):
        pred.predict(q, k, lt, match=torch.tensor([[40, 1], [1, 1]]))


@given(st.lists(st.integers(1, 8), min_size=1, max_size=2), st.floats(0, 1), st.floats(0, 1))
@FAST
def test_random_sparser_masks_are_subsets(lengths, s1, s2):
    n = max(lengths)
    q, k, lt = random_qk(lengths, n)
    lo, hi = sorted((s1, s2))
    dense = get_predictor("random", sparsity=lo).predict(q, k, lt).edges
    sparse = get_predictor("random", sparsity=hi).predict(q, k, lt).edges
    assert not (sparse & ~dense).any()


def test_random_is_uniform_over_pairs():
    # Every valid pair is drawn about equally often over many seeds.
    q, k, lengths = random_qk([5], 5, heads=1)
    counts = torch.zeros(5, 5)
    seeds = 400
    for seed in range(seeds):
        counts += get_predictor("random", sparsity=0.8, seed=seed).predict(q, k, lengths).edges[0, 0].double()
    freq = counts / seeds  # expected 5/25 = 0.2 per pair
    assert (freq - 0.2).abs().max() < 0.08
