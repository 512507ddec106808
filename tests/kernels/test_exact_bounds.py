"""Certified-exact sparse entmax attention (kernels.exact_bounds) against dense entmax computed in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from entmax import entmax15, entmax_bisect
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefinder.kernels.exact_bounds import entmax_threshold, exact_sparse_entmax_attention
from sparsefinder.metrics import graph_metrics
from sparsefinder.predictors import get_predictor

FAST = settings(max_examples=30, deadline=None)
ALPHAS = [1.5, 2.0, 1.25, 3.0]


def dense(q, k, v, alpha, pad=None, causal=False, scaling=None):
    """Dense float64 entmax attention; masked pairs at -1e6 (far below any threshold, finite for the sort)."""
    batch, heads, n_q, d = q.shape
    n_k = k.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    s = (q.double() @ k.double().transpose(-1, -2)) * scaling
    allowed = torch.ones(batch, 1, n_q, n_k, dtype=torch.bool)
    if pad is not None:
        allowed &= ~pad[:, None, None, :]
    if causal:
        allowed &= torch.ones(n_q, n_k, dtype=torch.bool).tril()
    s = s.masked_fill(~allowed, -1e6)
    p = entmax15(s, dim=-1) if alpha == 1.5 else entmax_bisect(s, alpha=alpha, dim=-1, n_iter=200)
    p = (p * allowed).masked_fill(~allowed.any(-1, keepdim=True), 0)
    return p @ v.double(), p


def mixture(rng, batch, heads, n, d, components, noise, n_k=None):
    n_k = n if n_k is None else n_k
    mu = rng.normal(size=(heads, components, d))
    mu *= math.sqrt(0.75 * d) / np.linalg.norm(mu, axis=-1, keepdims=True)

    def draw(m):
        z = rng.integers(0, components, size=(batch, heads, m))
        return np.take_along_axis(mu[None], z[..., None], axis=2) + noise * rng.normal(size=(batch, heads, m, d))

    return (torch.from_numpy(draw(n)), torch.from_numpy(draw(n_k)),
            torch.from_numpy(rng.normal(size=(batch, heads, n_k, 3))))


def check(q, k, v, alpha, pad=None, causal=False, **kw):
    res = exact_sparse_entmax_attention(q, k, v, alpha=alpha, key_padding_mask=pad, causal=causal, **kw)
    ref_out, ref_p = dense(q, k, v, alpha, pad, causal, kw.get("scaling"))
    assert (res.output - ref_out).abs().max() <= 1e-9
    got = res.support.to_dense()
    assert torch.equal(got > 0, ref_p > 0)
    assert (got - ref_p).abs().max() <= 1e-9
    n_k = k.shape[2]
    allowed = torch.ones(q.shape[0], 1, q.shape[2], n_k, dtype=torch.bool)
    if pad is not None:
        allowed &= ~pad[:, None, None, :]
    if causal:
        allowed &= torch.ones(q.shape[2], n_k, dtype=torch.bool).tril()
    valid = allowed.sum(dim=(-1, -2)).expand(res.pairs_scored.shape)
    # Every support pair was scored, and no pair is counted twice or outside the mask.
    assert bool((res.pairs_scored >= (got > 0).sum(dim=(-1, -2))).all()) and bool((res.pairs_scored <= valid).all())
    return res, valid


@given(st.integers(0, 10**6), st.sampled_from(ALPHAS), st.booleans(), st.integers(1, 40), st.integers(1, 40),
       st.sampled_from([1, 2, 5, 16]), st.integers(0, 5), st.booleans(),
       st.sampled_from([0.2, 1.0, 3.0]))
@FAST
def test_equals_dense_on_random_and_clustered_inputs(seed, alpha, causal, n_q, n_k, block, window, glob,
                                                      noise):
    rng = np.random.default_rng(seed)
    q, k, v = mixture(rng, 2, 2, n_q, 4, 3, noise, n_k=n_k)
    pad = torch.from_numpy(rng.random((2, n_k)) < 0.2)
    check(q, k, v, alpha, pad, causal, block_size=block, window=window, global_keys=glob)


@given(st.integers(0, 10**6), st.sampled_from(ALPHAS), st.booleans(), st.integers(1, 30), st.integers(0, 8))
@FAST
def test_adversarial_equal_keys_and_ties(seed, alpha, causal, n, distinct):
    """Equal keys (every score of a row tied: the support is the whole row) and few distinct values."""
    rng = np.random.default_rng(seed)
    q = torch.from_numpy(rng.integers(-2, 3, size=(1, 2, n, 3)).astype(float))
    if distinct == 0:
        k = torch.from_numpy(np.broadcast_to(rng.normal(size=(1, 2, 1, 3)), (1, 2, n, 3)).copy())
    else:
        k = torch.from_numpy(rng.integers(-distinct, distinct + 1, size=(1, 2, n, 3)).astype(float))
    v = torch.from_numpy(rng.normal(size=(1, 2, n, 2)))
    check(q, k, v, alpha, causal=causal, block_size=4)


def test_bounds_that_prune_nothing_degrade_to_dense_cost_not_to_a_wrong_answer():
    # Isotropic noise in d = 64 puts every block's Cauchy-Schwarz bound above the threshold.
    q, k, v = mixture(np.random.default_rng(0), 1, 2, 96, 64, 8, 1.0)
    res, valid = check(q, k, v, 1.5, block_size=8)
    assert bool((res.pairs_scored > 0.9 * valid).all())
    # Equal keys: every key is in every row's support, so everything must be scored.
    k = k[:, :, :1].expand_as(k).contiguous()
    res, valid = check(q, k, v, 1.5, block_size=8)
    assert torch.equal(res.pairs_scored, valid)


def test_tight_clusters_prune_most_pairs():
    q, k, v = mixture(np.random.default_rng(1), 1, 2, 256, 16, 16, 0.2)
    for causal in (False, True):
        res, valid = check(q, k, v, 1.5, causal=causal, block_size=8)
        assert bool((res.pairs_scored < 0.3 * valid).all()), res.pairs_scored / valid
        # One bound per query and key block: 256 / 8 blocks, plus at most one partial block per centroid (32).
        blocks = res.bound_evaluations / 256
        assert bool(((blocks >= 32) & (blocks <= 64) & (res.bound_evaluations % 256 == 0)).all())


def test_stopping_before_the_bounds_certify_is_wrong():
    """The rounds matter: the seed window alone misses most of the support (so the check above can fail)."""
    q, k, v = mixture(np.random.default_rng(2), 1, 1, 128, 16, 8, 0.3)
    early = exact_sparse_entmax_attention(q, k, v, max_rounds=0, block_size=8)
    full = exact_sparse_entmax_attention(q, k, v, block_size=8)
    ref, _ = dense(q, k, v, 1.5)
    assert (early.output - ref).abs().max() > 1e-2
    assert (full.output - ref).abs().max() <= 1e-9 and int(full.rounds.min()) >= 1


def test_extra_candidates_and_scaling():
    rng = np.random.default_rng(3)
    q, k, v = mixture(rng, 1, 2, 40, 8, 4, 0.5)
    cand = torch.from_numpy(rng.integers(-1, 40, size=(1, 2, 40, 6)))
    for alpha in (1.5, 2.0):
        check(q, k, v, alpha, candidates=cand, scaling=0.3, window=0, global_keys=False, block_size=4)


def test_float32_inputs_match_dense_float32_entmax():
    q, k, v = (x.float() for x in mixture(np.random.default_rng(4), 1, 3, 200, 32, 14, 0.5))
    res = exact_sparse_entmax_attention(q, k, v, block_size=16)
    p = entmax15(q @ k.transpose(-1, -2) * 32**-0.5, dim=-1)
    assert res.output.dtype == torch.float32
    assert (res.output - p @ v).abs().max() <= 1e-5
    # Supports agree except where a score lies within float32 rounding of the threshold.
    got = res.support.to_dense()
    differ = (got > 0) != (p > 0)
    assert int(differ.sum()) <= 2 and float(torch.cat([(got + p)[differ], torch.zeros(1)]).max()) < 1e-8


def test_rows_without_allowed_keys_are_zero():
    q, k, v = mixture(np.random.default_rng(5), 1, 1, 5, 4, 2, 1.0)
    res = exact_sparse_entmax_attention(q, k, v, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    assert not res.output.any() and res.support.values().numel() == 0 and int(res.pairs_scored.sum()) == 0


def test_bad_arguments():
    q = torch.zeros(1, 1, 3, 2)
    with pytest.raises(ValueError, match="alpha"):
        exact_sparse_entmax_attention(q, q, q, alpha=1.0)
    with pytest.raises(ValueError, match="block_size"):
        exact_sparse_entmax_attention(q, q, q, block_size=0)
    with pytest.raises(ValueError, match="match"):
        exact_sparse_entmax_attention(q, q[..., :1], q)


# --------------------------------------------------------------------------- the threshold and its lower bound


@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=20), st.sampled_from(ALPHAS),
       st.integers(0, 10**6))
@FAST
def test_threshold_of_a_subset_is_a_lower_bound(values, alpha, seed):
    z = torch.tensor(values, dtype=torch.float64)[None]
    keep = torch.from_numpy(np.random.default_rng(seed).random(z.shape[1]) < 0.5)
    sub = z.masked_fill(~keep[None], -math.inf)
    tau, tau_sub = entmax_threshold(z, alpha), entmax_threshold(sub, alpha)
    assert float(tau_sub) <= float(tau) + 1e-12
    # tau solves sum [z - tau]_+^(1/(alpha-1)) = 1, as entmax15 / entmax_bisect compute it.
    p = torch.clamp(z - tau[:, None], min=0).pow(1 / (alpha - 1))
    assert abs(float(p.sum()) - 1) <= 1e-9
    ref = entmax15(z / (alpha - 1), dim=-1) if alpha == 1.5 else entmax_bisect(z / (alpha - 1), alpha=alpha,
                                                                                  n_iter=200)
    assert (p - ref).abs().max() <= 1e-9


def test_threshold_of_an_empty_row_is_minus_infinity():
    z = torch.full((2, 3), -math.inf, dtype=torch.float64)
    assert torch.isneginf(entmax_threshold(z, 1.5)).all() and torch.isneginf(entmax_threshold(z, 1.3)).all()


# --------------------------------------------------------------------------- the predictor


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_predictor_graph_is_the_dense_support_and_cost_the_pairs_scored(causal, alpha):
    rng = np.random.default_rng(6)
    lengths = [30, 17, 1]
    q, k, _ = mixture(rng, 3, 2, 30, 8, 5, 0.4)
    pred = get_predictor("exact_bounds", alpha=alpha, block_size=4)
    graph, cost = pred.predict_with_cost(q, k, lengths, causal=causal)
    gold = torch.zeros_like(graph.edges)
    for b, m in enumerate(lengths):
        _, p = dense(q[b : b + 1, :, :m], k[b : b + 1, :, :m], q[b : b + 1, :, :m], alpha, causal=causal)
        gold[b, :, :m, :m] = p[0] > 0
    assert torch.equal(graph.edges, gold)
    metrics = graph_metrics(graph, graph, cost)
    assert bool((metrics["recall"] == 1).all())
    valid = graph.valid_pairs().sum(dim=(-1, -2)).double().expand_as(cost)
    assert bool((cost >= graph.num_edges().double()).all()) and bool((cost <= valid).all())
    assert bool((cost[:2] < valid[:2]).all())  # the bounds prune on these clusters
    with pytest.raises(ValueError, match="alpha"):
        get_predictor("exact_bounds", alpha=1.0).predict(q, k, lengths)
