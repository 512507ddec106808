"""Block summaries of a head (long inputs drawn as blocks) against brute-force loops, and the figure drawn
from them against the one drawn from the full matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefinder.graphs import valid_pair_mask
from sparsefinder.model.blocks import allowed_block_counts, block_side, block_sum, head_blocks
from sparsefinder.plots.heatmaps import MAX_SIDE, attention_heatmap, block_attention_heatmap, block_size


def loop_blocks(p: np.ndarray, allowed: np.ndarray, s: int):
    """Largest p, gold edges and allowed pairs per block, one block at a time."""
    n = p.shape[0]
    m = -(-n // s)
    top, edges, ok = np.zeros((m, m), np.float32), np.zeros((m, m), int), np.zeros((m, m), int)
    for bi in range(m):
        for bj in range(m):
            tile = (slice(bi * s, min((bi + 1) * s, n)), slice(bj * s, min((bj + 1) * s, n)))
            top[bi, bj] = p[tile].max()
            edges[bi, bj] = sum(1 for v in p[tile].ravel() if v > 0)
            ok[bi, bj] = sum(1 for v in allowed[tile].ravel() if v)
    return top, edges, ok


def random_head(n: int, heads: int, seed: int, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    i, j = np.indices((n, n))
    allowed = (j <= i) if causal else np.ones((n, n), bool)
    p = np.where(allowed & (rng.random((heads, n, n)) < 0.3), rng.random((heads, n, n)), 0.0).astype(np.float32)
    return p, allowed


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), max_side=st.integers(1, 12), heads=st.integers(1, 3), causal=st.booleans(),
       seed=st.integers(0, 2**16))
def test_head_blocks_match_a_loop(n, max_side, heads, causal, seed):
    p, allowed = random_head(n, heads, seed, causal)
    s = block_side(n, max_side)
    assert s == block_size(n, max_side)  # the torch and the numpy side agree on the blocks
    top, edges = head_blocks(torch.from_numpy(p), s)
    counts = block_sum(torch.from_numpy(allowed), s).numpy()
    for h in range(heads):
        want_top, want_edges, want_allowed = loop_blocks(p[h], allowed, s)
        np.testing.assert_array_equal(top[h].numpy(), want_top)
        np.testing.assert_array_equal(edges[h].numpy(), want_edges)
        np.testing.assert_array_equal(counts, want_allowed)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 40), max_side=st.integers(1, 12), causal=st.booleans(),
       window=st.one_of(st.none(), st.integers(0, 10)))
def test_allowed_block_counts_match_a_loop_over_the_mask(n, max_side, causal, window):
    s = block_side(n, max_side)
    valid = valid_pair_mask(torch.tensor([n]), n, causal, window)[0, 0].numpy()
    _, _, want = loop_blocks(np.zeros((n, n), np.float32), valid, s)
    np.testing.assert_array_equal(allowed_block_counts(n, s, causal, window).numpy(), want)


def test_block_sum_is_exact_for_large_blocks():
    """A block of 86 × 86 pairs (8,192 tokens in 96 blocks) is counted exactly through the float pool."""
    n, s = 8192 // 4, 86
    rng = np.random.default_rng(0)
    mask = rng.random((n, n)) < 0.37
    got = block_sum(torch.from_numpy(mask), s).numpy()
    m = -(-n // s)
    pad = np.zeros((m * s, m * s), bool)
    pad[:n, :n] = mask
    np.testing.assert_array_equal(got, pad.reshape(m, s, m, s).sum(axis=(1, 3)))


@pytest.mark.parametrize("n, causal", [(9, True), (MAX_SIDE + 37, False), (3 * MAX_SIDE + 5, True)])
def test_block_figure_equals_the_full_matrix_figure(n, causal):
    """Drawn from its summary, a head looks as it does drawn from its (n, n) probabilities."""
    p, allowed = random_head(n, 1, n, causal)
    s = block_size(n)
    top, edges = head_blocks(torch.from_numpy(p), s)
    counts = block_sum(torch.from_numpy(allowed), s).numpy()
    tokens = [f"t{k}" for k in range(n)]
    full = attention_heatmap(p[0], tokens, title="t", allowed=allowed if causal else None)
    blocks = block_attention_heatmap(top[0].numpy(), edges[0].numpy(), counts, tokens, s, title="t")
    assert [t.name for t in blocks.data] == [t.name for t in full.data]
    for a, b in zip(full.data, blocks.data, strict=True):
        np.testing.assert_array_equal(np.asarray(a.z, float), np.asarray(b.z, float))
        assert list(a.x) == list(b.x) and list(a.y) == list(b.y)
        if a.customdata is not None:
            np.testing.assert_array_equal(np.asarray(a.customdata), np.asarray(b.customdata))
    assert blocks.layout.title.text == full.layout.title.text


def test_the_library_and_the_plots_cut_blocks_alike() -> None:
    # model.blocks and evaluation.analysis keep their own copies of the plots' block rule (plots sit on
    # the floor beside evaluation and import no torch code): the copies must not drift apart
    from sparsefinder.evaluation.analysis import HEAD_MAX_SIDE
    from sparsefinder.model.blocks import block_side

    assert HEAD_MAX_SIDE == MAX_SIDE
    for n in (1, 2, 95, 96, 97, 511, 512, 8192):
        assert block_side(n, MAX_SIDE) == block_size(n)
