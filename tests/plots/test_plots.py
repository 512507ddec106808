"""Heatmaps drawn in blocks for long inputs, and the predicted-graph overlay, against loops."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefinder.plots.heatmaps import MAX_SIDE, attention_heatmap, block_labels, block_reduce, block_size


def loop_reduce(a: np.ndarray, s: int, how: str) -> np.ndarray:
    n0, n1 = a.shape
    m0, m1 = -(-n0 // s), -(-n1 // s)
    out = np.zeros((m0, m1))
    for bi in range(m0):
        for bj in range(m1):
            tile = a[bi * s:(bi + 1) * s, bj * s:(bj + 1) * s].astype(float)
            out[bi, bj] = tile.max() if how == "max" else tile.sum()
    return out


@settings(max_examples=60, deadline=None)
@given(n0=st.integers(1, 23), n1=st.integers(1, 23), s=st.integers(1, 7), how=st.sampled_from(["max", "sum"]),
       seed=st.integers(0, 2**16))
def test_block_reduce_matches_a_loop(n0, n1, s, how, seed):
    a = np.random.default_rng(seed).random((n0, n1))
    a[a < 0.5] = 0
    np.testing.assert_allclose(block_reduce(a, s, how), loop_reduce(a, s, how))


@given(n=st.integers(1, 2000), side=st.integers(1, 200))
def test_block_size_fits_the_side(n, side):
    s = block_size(n, side)
    assert -(-n // s) <= side
    assert s == 1 or -(-n // (s - 1)) > side  # the smallest block that fits


def test_block_labels_are_unique_and_cover_every_token():
    tokens = ["the"] * 10
    labels = block_labels(tokens, 3)
    assert len(labels) == 4 and len(set(labels)) == 4
    assert labels[-1] == "the [9]" and labels[0] == "the…the [0–2]"


def outcome_codes_by_loop(gold: np.ndarray, pred: np.ndarray, s: int) -> np.ndarray:
    """Worst outcome per block: 2 FN, else 1 FP, else 0 TP, else NaN."""
    m = -(-gold.shape[0] // s)
    out = np.full((m, m), np.nan)
    for bi in range(m):
        for bj in range(m):
            g = gold[bi * s:(bi + 1) * s, bj * s:(bj + 1) * s]
            p = pred[bi * s:(bi + 1) * s, bj * s:(bj + 1) * s]
            if (g & ~p).any():
                out[bi, bj] = 2
            elif (~g & p).any():
                out[bi, bj] = 1
            elif (g & p).any():
                out[bi, bj] = 0
    return out


@pytest.mark.parametrize("n", [7, 40, MAX_SIDE, MAX_SIDE + 1, 512])
def test_overlay_codes_and_blocks(n):
    rng = np.random.default_rng(n)
    probs = rng.random((n, n))
    probs[probs < 0.7] = 0
    pred = rng.random((n, n)) < 0.25
    tokens = [f"t{i % 13}" for i in range(n)]
    fig = attention_heatmap(probs, tokens, pred=pred)
    s = block_size(n)
    side = -(-n // s)
    zero_trace, prob_trace, overlay = fig.data[:3]
    assert len(prob_trace.y) == side <= MAX_SIDE
    want_max = loop_reduce(probs, s, "max")
    shown = np.asarray(prob_trace.z, dtype=float)
    np.testing.assert_allclose(np.nan_to_num(shown), want_max)
    assert np.array_equal(np.isnan(shown), want_max == 0)
    np.testing.assert_array_equal(np.asarray(overlay.z, dtype=float), outcome_codes_by_loop(probs > 0, pred, s))
    assert len(fig.data) == 3  # no legend-only traces: the key is in the title
    gold = probs > 0
    for name, count in (("TP (gold & predicted)", (gold & pred).sum()), ("FP (predicted only)", (~gold & pred).sum()),
                        ("FN (missed gold edge)", (gold & ~pred).sum())):
        assert f"{name}: {int(count)}" in fig.layout.title.text
    if s > 1:
        assert "blocks of" in fig.layout.title.text
        np.testing.assert_array_equal(np.asarray(prob_trace.customdata), loop_reduce(gold, s, "sum").astype(int))


def test_heatmap_refuses_mismatched_prediction():
    with pytest.raises(ValueError, match="pred shape"):
        attention_heatmap(np.zeros((3, 3)), ["a", "b", "c"], pred=np.zeros((2, 2), bool))


@pytest.mark.parametrize("n", [7, MAX_SIDE + 37])
def test_pairs_the_mask_forbids_are_drawn_apart_from_exact_zeros(n):
    """A decoder's future keys (and a window's outside) are 'not allowed', never 'p = 0'; checked by loops."""
    from sparsefinder.plots.heatmaps import outcome_heatmap

    rng = np.random.default_rng(n)
    i, j = np.indices((n, n))
    allowed = (j <= i) & (i - j <= 5)  # a causal window of 6 keys
    probs = np.where(allowed & (rng.random((n, n)) < 0.5), rng.random((n, n)), 0.0)
    tokens = [f"t{k}" for k in range(n)]
    fig = attention_heatmap(probs, tokens, allowed=allowed)
    forbidden_trace, zero_trace, p_trace = fig.data
    assert forbidden_trace.name == "not allowed" and "mask" in forbidden_trace.hovertemplate
    s = block_size(n)
    m = -(-n // s)
    want_forbidden = np.zeros((m, m), bool)
    want_zero = np.zeros((m, m), bool)
    for bi in range(m):
        for bj in range(m):
            tile = (slice(bi * s, (bi + 1) * s), slice(bj * s, (bj + 1) * s))
            want_forbidden[bi, bj] = not allowed[tile].any()
            want_zero[bi, bj] = allowed[tile].any() and probs[tile].max() == 0
    np.testing.assert_array_equal(~np.isnan(np.asarray(forbidden_trace.z, float)), want_forbidden)
    np.testing.assert_array_equal(~np.isnan(np.asarray(zero_trace.z, float)), want_zero)
    assert not (~np.isnan(np.asarray(p_trace.z, float)) & want_forbidden).any()
    # Without a mask nothing is marked, as before.
    assert len(attention_heatmap(probs, tokens).data) == 2
    gold = probs > 0
    out = outcome_heatmap(gold, gold & (rng.random((n, n)) < 0.7), tokens, "t", allowed=allowed)
    shown = np.asarray(out.data[0].z, float)
    np.testing.assert_array_equal(np.isnan(shown), want_forbidden)
    assert out.data[1].name == "not allowed"
