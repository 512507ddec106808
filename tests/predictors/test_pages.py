"""``pages``: against plain loops, the superset property against entmax15, budget and slack monotonicity."""

from __future__ import annotations

import math

import entmax
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefinder.predictors import get_predictor
from sparsefinder.predictors.pages import PagesPredictor, PageStats

FAST = settings(max_examples=30, deadline=None)
AMBIGUOUS = 1e-9
"""Pairs whose deciding quantity lies this close to its threshold are not compared with the loops: the loops
bisect τ in Python floats (error ~1e-15 here), the predictor uses the sort-based formula, and only an exact
tie could tell them apart."""


def qk(lengths: list[int], n: int, heads: int = 2, dim: int = 4, seed: int = 0, scale: float = 2.0,
       dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, k (garbage on padding), scaled so that rows are sparse and pages prune."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lengths), heads, n, dim, generator=g, dtype=torch.float64) * scale
    k = torch.randn(len(lengths), heads, n, dim, generator=g, dtype=torch.float64) * scale
    return q.to(dtype), k.to(dtype), torch.tensor(lengths)


def bisect_tau(z: list[float]) -> float:
    """τ with Σ [z_j − τ]_+² = 1 (1.5-entmax), by bisection in Python floats: independent of the predictor's sort."""
    lo, hi = max(z) - 1.0, max(z)
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(max(x - mid, 0.0) ** 2 for x in z) >= 1:
            lo = mid
        else:
            hi = mid
    return lo


def loop_pages(q, k, lengths, causal, page_size, slack, sparsity):
    """The module docstring's definition, pair by pair: ``(edges, cost, ambiguous)`` as numpy arrays."""
    b_, h_, n, d = q.shape
    q, k = q.double().numpy(), k.double().numpy()
    gain = 0.5 / math.sqrt(d)
    eps = float(np.finfo(np.float64).eps)
    edges = np.zeros((b_, h_, n, n), dtype=bool)
    ambiguous = np.zeros_like(edges)
    cost = np.zeros((b_, h_))
    for b in range(b_):
        m = int(lengths[b])
        pages = [list(range(s, min(s + page_size, m))) for s in range(0, m, page_size)]
        for h in range(h_):
            kmax = max((math.sqrt(sum(x * x for x in k[b, h, j])) for j in range(m)), default=0.0)
            for i in range(m):
                allowed = [[j for j in page if not causal or j <= i] for page in pages]
                usable = [p for p, keys in enumerate(allowed) if keys]
                upper, estimate = {}, {}
                for p in usable:
                    ub = sum(max(q[b, h, i, e] * min(k[b, h, j, e] for j in pages[p]),
                                 q[b, h, i, e] * max(k[b, h, j, e] for j in pages[p])) for e in range(d))
                    mean = sum(q[b, h, i, e] * sum(k[b, h, j, e] for j in pages[p]) / len(pages[p])
                               for e in range(d))
                    upper[p] = gain * ub
                    estimate[p] = (1 - slack) * upper[p] + slack * gain * mean
                cost[b, h] += (2 + (slack > 0)) * len(usable)
                z = {j: gain * float(q[b, h, i] @ k[b, h, j]) for p in usable for j in allowed[p]}
                if sparsity is not None:
                    budget = math.ceil(round((1 - sparsity) * sum(len(a) for a in allowed), 9))
                    kept = 0
                    for p in sorted(usable, key=lambda p: (-estimate[p], p)):
                        if kept < budget:
                            for j in allowed[p]:
                                edges[b, h, i, j] = True
                            kept += len(allowed[p])
                        others = [estimate[x] for x in usable if x != p]
                        if any(abs(estimate[p] - o) < AMBIGUOUS for o in others):
                            ambiguous[b, h, i, pages[p]] = True
                    cost[b, h] += kept
                    continue
                own = i // page_size
                best = max(usable, key=lambda p: (upper[p], -p))
                seed = sorted(set(allowed[own]) | set(allowed[best]))
                tau = bisect_tau([z[j] for j in seed])
                margin = (d + 8) * eps * gain * math.sqrt(sum(x * x for x in q[b, h, i])) * kmax
                cost[b, h] += len(seed)
                for p in usable:
                    for j in allowed[p]:
                        x = z[j] if j in seed else estimate[p]
                        edges[b, h, i, j] = x + margin > tau
                        ambiguous[b, h, i, j] = abs(x + margin - tau) < AMBIGUOUS
                        cost[b, h] += edges[b, h, i, j] and j not in seed
    return edges, cost, ambiguous


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("page_size", "slack", "sparsity"),
                         [(1, 0.0, None), (3, 0.0, None), (4, 0.5, None), (3, 1.0, None), (16, 0.0, None),
                          (3, 0.0, 0.7), (2, 0.5, 0.5), (4, 1.0, 0.9), (3, 0.25, 0.0), (3, 0.0, 1.0)])
def test_matches_loops(causal, page_size, slack, sparsity):
    q, k, lengths = qk([9, 6, 0, 1], 9, seed=page_size)
    pred = get_predictor("pages", page_size=page_size, slack=slack, sparsity=sparsity)
    graph, cost = pred.predict_with_cost(q, k, lengths, causal)
    edges, ref_cost, ambiguous = loop_pages(q, k, lengths, causal, page_size, slack, sparsity)
    assert ambiguous.mean() < 0.05  # the comparison is not vacuous
    got = graph.edges.numpy()
    np.testing.assert_array_equal(got[~ambiguous], edges[~ambiguous])
    if not ambiguous.any():
        np.testing.assert_array_equal(cost.numpy(), ref_cost)
    if sparsity is None and 0 < slack:  # something got pruned, something kept
        assert 0 < got.sum() < graph.valid_pairs().expand_as(graph.edges).sum()


def gold_support(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool) -> torch.Tensor:
    """The dense 1.5-entmax support over the valid pairs, by the ``entmax`` package, in the inputs' dtype."""
    n, d = q.shape[2], q.shape[3]
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    pos = torch.arange(n)
    valid = (pos[None, :, None] < lengths[:, None, None]) & (pos[None, None, :] < lengths[:, None, None])
    if causal:
        valid &= pos[:, None] >= pos[None, :]
    # The dtype's most negative finite value (as transformers masks), never -inf (docs/method.md §1).
    s = s.masked_fill(~valid[:, None], torch.finfo(s.dtype).min)
    return (entmax.entmax15(s, dim=-1) > 0) & valid[:, None]


@FAST
@given(seed=st.integers(0, 10_000), page_size=st.integers(1, 9), causal=st.booleans(),
       lengths=st.lists(st.integers(0, 14), min_size=1, max_size=3), double=st.booleans(),
       scale=st.sampled_from([0.5, 2.0, 6.0]))
def test_slack_zero_is_a_superset_of_the_entmax15_support(seed, page_size, causal, lengths, double, scale):
    q, k, lt = qk(lengths, 14, heads=2, dim=6, seed=seed, scale=scale,
                  dtype=torch.float64 if double else torch.float32)
    graph = get_predictor("pages", page_size=page_size).predict(q, k, lt, causal)
    gold = gold_support(q, k, lt, causal)
    assert not (gold & ~graph.edges).any()  # recall 1, in float32 too (the rounding margin)


def test_superset_prunes_on_peaked_rows():
    # Large scores make rows sparse: the certified variant must then keep far fewer than all pairs.
    q, k, lengths = qk([64], 64, heads=2, dim=4, seed=1, scale=4.0)
    graph = get_predictor("pages", page_size=8).predict(q, k, lengths)
    gold = gold_support(q, k, lengths, False)
    assert not (gold & ~graph.edges).any()
    assert graph.edges.double().mean() < 0.8


@FAST
@given(seed=st.integers(0, 10_000), page_size=st.integers(1, 6), causal=st.booleans(),
       lengths=st.lists(st.integers(0, 12), min_size=1, max_size=3))
def test_more_slack_or_sparsity_only_removes_edges(seed, page_size, causal, lengths):
    q, k, lt = qk(lengths, 12, seed=seed)
    previous = None
    for slack in (0.0, 0.3, 0.7, 1.0):
        edges = get_predictor("pages", page_size=page_size, slack=slack).predict(q, k, lt, causal).edges
        if previous is not None:
            assert not (edges & ~previous).any()
        previous = edges
    previous = None
    rows = lt.clamp(min=0)
    for sparsity in (0.0, 0.3, 0.6, 0.9, 1.0):
        edges = get_predictor("pages", page_size=page_size, sparsity=sparsity, slack=0.5).predict(q, k, lt,
                                                                                                 causal).edges
        if previous is not None:
            assert not (edges & ~previous).any()
        previous = edges
        # Each real row keeps at least its budget (whole pages: maybe more), and a page more than needed never.
        for b, m in enumerate(rows.tolist()):
            for i in range(m):
                allowed = i + 1 if causal else m
                kept = int(edges[b, :, i].sum(-1).min())
                assert kept >= math.ceil(round((1 - sparsity) * allowed, 9))
                assert kept < math.ceil(round((1 - sparsity) * allowed, 9)) + page_size or kept == allowed
    assert not previous.any()  # sparsity 1: nothing


@FAST
@given(seed=st.integers(0, 10_000), page_size=st.integers(1, 7), m=st.integers(1, 15))
def test_box_bound_is_an_upper_bound_and_the_mean_is_the_mean(seed, page_size, m):
    q, k, _ = qk([m], m, heads=2, dim=5, seed=seed)
    stats = PageStats(k[0], page_size)
    dots = q[0] @ k[0].transpose(-1, -2)  # (H, m, m)
    box, mean = stats.box_dots(q[0]), stats.mean_dots(q[0])
    for p in range(stats.n_pages):
        page = dots[..., p * page_size:(p + 1) * page_size]
        assert (box[..., p] >= page.amax(-1) - 1e-12).all()
        torch.testing.assert_close(mean[..., p], page.mean(-1), rtol=1e-12, atol=1e-12)


def test_one_page_keeps_the_row_support_exactly_and_costs_the_row():
    # A page covering the sentence is its own seed set: the kept keys are those above the exact τ.
    q, k, lengths = qk([7], 7, seed=3, scale=3.0)
    graph, cost = get_predictor("pages", page_size=7).predict_with_cost(q, k, lengths)
    assert torch.equal(graph.edges, gold_support(q, k, lengths, False))
    assert cost.tolist() == [[7 * 7 + 2 * 7] * 2]  # all pairs scored once, one box bound per query


@pytest.mark.parametrize("params", [{"page_size": 0}, {"slack": 1.5}, {"slack": -0.1}, {"sparsity": 1.2},
                                    {"alpha": 1.0}, {"scaling": 0.0}, {"page_size": 2.0}])
def test_bad_hyperparameters_fail_at_predict(params):
    pred = get_predictor("pages", **params)
    q, k, lengths = qk([3], 3)
    with pytest.raises(ValueError):
        pred.predict(q, k, lengths)


def test_default_grid_has_both_variants_and_valid_points():
    grid = PagesPredictor.grid()
    assert {p["page_size"] for p in grid} == {2, 4, 8, 16, 32}
    assert any(p["sparsity"] is None and p["slack"] == 0 for p in grid)  # the certified superset
    assert {p["sparsity"] for p in grid if p["sparsity"] is not None} == {0.5, 0.7, 0.8, 0.9, 0.95}
    for point in grid:
        get_predictor("pages", **point)._check_params()
