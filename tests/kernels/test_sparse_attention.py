"""Clustered entmax attention (kernels.sparse_attention) against brute-force dense masked attention."""

from __future__ import annotations

import pytest
import torch
from entmax import entmax15, entmax_bisect
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefinder.kernels.sparse_attention import clustered_entmax_attention, entmax15_fixed_point, predicted_graph
from sparsefinder.predictors import get_predictor
from sparsefinder.predictors.paper import top_centroids

NEG = torch.finfo(torch.float32).min
ATOL = 2e-6
# entmax_bisect's float32 bisection starts from a bracket that depends on the row length, so the
# same scores in a shorter or longer (masked) row differ by up to ~3e-6: a looser bound there.
ATOL_BISECT = 1e-5
# The fixed-point 1.5-entmax computes the threshold in another order than entmax15's sorted prefix sums:
# an entry exactly at the threshold may come out as 1e-14 instead of 0. Supports are compared above this.
TINY = 1e-10


def same_support(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a > TINY, b > TINY)


def _entmax_1d(s: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 1.0:
        return torch.softmax(s, dim=-1)
    if alpha == 1.5:
        return entmax15(s, dim=-1)
    return entmax_bisect(s, alpha=alpha, dim=-1)


def brute_force(q, k, v, qc, kc, window, alpha, scaling=None, pad=None, causal=False):
    """One query at a time: its candidate keys listed explicitly, entmax over that list only."""
    batch, heads, n_q, d = q.shape
    n_k = k.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    out = torch.zeros(batch, heads, n_q, v.shape[-1], dtype=torch.float64)
    probs = torch.zeros(batch, heads, n_q, n_k, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(n_q):
                cand = []
                for j in range(n_k):
                    same = int(qc[b, h, i]) >= 0 and int(qc[b, h, i]) == int(kc[b, h, j])
                    near = window > 0 and abs(i - j) <= window // 2
                    if (same or near) and not (pad is not None and pad[b, j]) and not (causal and j > i):
                        cand.append(j)
                if not cand:
                    continue
                s = (k[b, h, cand].float() @ q[b, h, i].float()) * scaling
                p = _entmax_1d(s, alpha)
                probs[b, h, i, cand] = p.double()
                out[b, h, i] = (p.double() @ v[b, h, cand].double())
    return out, probs


def dense_masked(q, k, v, graph, alpha, scaling=None):
    """Dense attention with the scores outside ``graph`` at the dtype's minimum (method §5); empty rows give 0."""
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    s = (q @ k.transpose(-1, -2)) * scaling
    s = s.masked_fill(~graph, NEG).masked_fill(~graph.any(-1, keepdim=True), 0.0)
    p = _entmax_1d(s, alpha) * graph
    return p @ v, p


def _inputs(seed, batch=2, heads=3, n=19, d=8, dv=5, clusters=4, n_k=None, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    n_k = n if n_k is None else n_k
    q = torch.randn(batch, heads, n, d, generator=g) * scale
    k = torch.randn(batch, heads, n_k, d, generator=g) * scale
    v = torch.randn(batch, heads, n_k, dv, generator=g)
    qc = torch.randint(-1, clusters, (batch, heads, n), generator=g)
    kc = torch.randint(-1, clusters, (batch, heads, n_k), generator=g)
    return q, k, v, qc, kc


def _check_against_brute(q, k, v, qc, kc, window, alpha, pad=None, causal=False, block_size=64, scaling=None):
    out, support = clustered_entmax_attention(q, k, v, qc, kc, window=window, alpha=alpha, scaling=scaling,
                                              key_padding_mask=pad, causal=causal, block_size=block_size,
                                              return_support=True)
    ref_out, ref_p = brute_force(q, k, v, qc, kc, window, alpha, scaling=scaling, pad=pad, causal=causal)
    assert out.shape == ref_out.shape and out.dtype == v.dtype
    assert support.shape == ref_p.shape and support.is_sparse
    atol = ATOL if alpha in (1.0, 1.5) else ATOL_BISECT
    assert torch.allclose(out.double(), ref_out, atol=atol, rtol=0)
    dense = support.to_dense().double()
    assert torch.allclose(dense, ref_p, atol=atol, rtol=0)
    if alpha == 1.5:  # exact solutions: the same exact zeros
        assert same_support(dense, ref_p)
    return out, support


@pytest.mark.parametrize("alpha", [1.5, 1.25, 2.0, 1.0])
@pytest.mark.parametrize("window", [0, 1, 4, 7])
def test_matches_brute_force(alpha: float, window: int) -> None:
    q, k, v, qc, kc = _inputs(seed=int(alpha * 100) + window)
    pad = torch.zeros(2, 19, dtype=torch.bool)
    pad[1, 14:] = True
    _check_against_brute(q, k, v, qc, kc, window, alpha, pad=pad, block_size=3)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [1, 2, 64])
def test_causal_and_block_size(causal: bool, block_size: int) -> None:
    q, k, v, qc, kc = _inputs(seed=7 + block_size, n=17)
    _check_against_brute(q, k, v, qc, kc, 3, 1.5, causal=causal, block_size=block_size, scaling=0.3)


def test_unequal_empty_and_singleton_clusters() -> None:
    # Cluster 0 is large, 1 a singleton, 2 has queries but no key, 3 keys but no query, -1 none.
    n = 16
    qc = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 2, 2, -1, -1, 0, 0, 2, 0])
    kc = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 3, 3, -1, -1, 3, 0])
    q, k, v, _, _ = _inputs(seed=3, batch=1, heads=1, n=n)
    for window in (0, 3):
        out, support = _check_against_brute(q, k, v, qc.view(1, 1, n), kc.view(1, 1, n), window, 1.5, block_size=4)
        if window == 0:
            # Queries of cluster 2 and unclustered ones have no candidate: zero output, empty row.
            isolated = torch.tensor([8, 9, 10, 11, 14])
            assert torch.all(out[0, 0, isolated] == 0)
            assert torch.all(support.to_dense()[0, 0, isolated] == 0)


def test_single_token_and_cross_lengths() -> None:
    q, k, v, qc, kc = _inputs(seed=5, n=1)
    for window in (0, 1, 5):
        _check_against_brute(q, k, v, qc.clamp(min=0), kc.clamp(min=0), window, 1.5)
    # n_q != n_k (cross attention positions), both directions; no key at all.
    for n_q, n_k in ((7, 12), (12, 7), (5, 0)):
        q, k, v, qc, kc = _inputs(seed=n_q, n=n_q, n_k=n_k)
        _check_against_brute(q, k, v, qc, kc, 5, 1.5, block_size=2)


def test_per_head_alpha() -> None:
    q, k, v, qc, kc = _inputs(seed=11)
    alpha = torch.tensor([1.5, 1.3, 2.0])
    out = clustered_entmax_attention(q, k, v, qc, kc, window=3, alpha=alpha, block_size=4)
    for h, a in enumerate(alpha.tolist()):
        ref, _ = brute_force(q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], qc[:, h : h + 1],
                             kc[:, h : h + 1], 3, a)
        assert torch.allclose(out[:, h : h + 1].double(), ref, atol=ATOL_BISECT, rtol=0)


def test_gradient_matches_dense_masked() -> None:
    q, k, v, qc, kc = _inputs(seed=13, n=11)
    graph = predicted_graph(qc, kc, window=3)
    grads = []
    for fn in ("sparse", "dense"):
        qq, kk, vv = (t.clone().double().requires_grad_(True) for t in (q, k, v))
        if fn == "sparse":
            out = clustered_entmax_attention(qq, kk, vv, qc, kc, window=3, block_size=3)
        else:
            out, _ = dense_masked(qq, kk, vv, graph, 1.5)
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()).sum().backward()
        grads.append([t.grad for t in (qq, kk, vv)])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


SHAPES = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 24), st.integers(1, 6))


@settings(max_examples=60, deadline=None)
@given(
    shape=SHAPES,
    clusters=st.integers(1, 6),
    window=st.integers(0, 9),
    causal=st.booleans(),
    padded=st.booleans(),
    block_size=st.integers(1, 9),
    alpha=st.sampled_from([1.5, 1.5, 1.2, 1.8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_invariants(shape, clusters, window, causal, padded, block_size, alpha, seed) -> None:
    batch, heads, n, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=g) * 3
    k = torch.randn(batch, heads, n, d, generator=g) * 3
    v = torch.randn(batch, heads, n, 3, generator=g)
    qc = torch.randint(-1, clusters, (batch, heads, n), generator=g)
    kc = torch.randint(-1, clusters, (batch, heads, n), generator=g)
    pad = None
    if padded:
        lengths = torch.randint(1, n + 1, (batch,), generator=g)
        pad = torch.arange(n)[None, :] >= lengths[:, None]
    out, support = clustered_entmax_attention(q, k, v, qc, kc, window=window, alpha=alpha, key_padding_mask=pad,
                                              causal=causal, block_size=block_size, return_support=True)
    graph = predicted_graph(qc, kc, window, pad, causal)
    p = support.to_dense()
    # Support inside the predicted graph; each row a distribution (or empty when it has no candidate).
    assert not bool((p > 0)[~graph].any())
    has = graph.any(-1)
    assert torch.allclose(p.sum(-1)[has], torch.ones(int(has.sum())), atol=1e-5)
    assert torch.all(p.sum(-1)[~has] == 0) and torch.all(out[~has] == 0)
    ref_out, ref_p = dense_masked(q, k, v, graph, alpha)
    assert torch.allclose(out, ref_out, atol=1e-5, rtol=0)
    assert torch.allclose(p, ref_p, atol=1e-5, rtol=0)
    if alpha == 1.5:
        assert same_support(p, ref_p)


def test_matches_kmeans_predictor_graph() -> None:
    """Cluster ids from a fitted KMeansPredictor (top_t = 1): same graph, and attention restricted to it."""
    g = torch.Generator().manual_seed(0)
    qp = torch.randn(2, 3, 14, 4, generator=g)
    kp = torch.randn(2, 3, 14, 4, generator=g)
    lengths = torch.tensor([14, 10])
    pred = get_predictor("kmeans", n_clusters=3, window=3).fit(qp, kp, lengths)
    graph = pred.predict(qp, kp, lengths).edges
    qc = top_centroids(qp, pred.centroids_, 1)[..., 0]
    kc = top_centroids(kp, pred.centroids_, 1)[..., 0]
    pad = torch.arange(14)[None, :] >= lengths[:, None]
    ours = predicted_graph(qc, kc, window=3, key_padding_mask=pad)
    real = ~pad[:, None, :, None] & ~pad[:, None, None, :]
    assert torch.equal(ours & real, graph & real)
    q, k, v, _, _ = _inputs(seed=1, n=14)
    out = clustered_entmax_attention(q, k, v, qc, kc, window=3, key_padding_mask=pad, block_size=4)
    ref, _ = dense_masked(q, k, v, graph & ~pad[:, None, None, :], 1.5)
    valid = ~pad[:, None, :].expand(-1, 3, -1)
    assert torch.allclose(out[valid], ref[valid], atol=ATOL, rtol=0)


def _devices() -> list:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", _devices())
def test_devices(device: str) -> None:
    q, k, v, qc, kc = _inputs(seed=17)
    pad = torch.zeros(2, 19, dtype=torch.bool)
    pad[0, 15:] = True
    cpu = clustered_entmax_attention(q, k, v, qc, kc, window=3, key_padding_mask=pad, block_size=4)
    args = [t.to(device) for t in (q, k, v, qc, kc)]
    out, support = clustered_entmax_attention(*args, window=3, key_padding_mask=pad.to(device), block_size=4,
                                              return_support=True)
    assert out.device.type == device and support.device.type == device
    assert torch.allclose(out.cpu(), cpu, atol=1e-5, rtol=0)


def test_bad_input() -> None:
    q, k, v, qc, kc = _inputs(seed=0)
    with pytest.raises(ValueError, match="must be \\(B, H, N, d\\)"):
        clustered_entmax_attention(q[0], k, v, qc, kc)
    with pytest.raises(ValueError, match="do not match"):
        clustered_entmax_attention(q, k[:, :2], v, qc, kc)
    with pytest.raises(ValueError, match="q_clusters"):
        clustered_entmax_attention(q, k, v, qc[..., :-1], kc)
    with pytest.raises(ValueError, match="integer cluster ids"):
        clustered_entmax_attention(q, k, v, qc.float(), kc)
    with pytest.raises(ValueError, match=">= -1"):
        clustered_entmax_attention(q, k, v, qc - 5, kc)
    with pytest.raises(ValueError, match="window"):
        clustered_entmax_attention(q, k, v, qc, kc, window=-1)
    with pytest.raises(ValueError, match="block_size"):
        clustered_entmax_attention(q, k, v, qc, kc, block_size=0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        clustered_entmax_attention(q, k, v, qc, kc, key_padding_mask=torch.zeros(2, 19))
    with pytest.raises(ValueError, match="per-head alpha"):
        clustered_entmax_attention(q, k, v, qc, kc, alpha=torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match="alpha"):
        clustered_entmax_attention(q, k, v, qc, kc, alpha=0.5)


# ---------------------------------------------------------------------- the fixed-point 1.5-entmax

ROW = st.lists(
    st.one_of(st.floats(-50, 50, allow_nan=False, width=32), st.sampled_from([0.0, 1.0, -1.0, 2.0, NEG, NEG / 2])),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(ROW, min_size=1, max_size=4), max_iter=st.sampled_from([0, 1, 2, 20]))
def test_fixed_point_matches_entmax15(rows: list[list[float]], max_iter: int) -> None:
    n = min(len(r) for r in rows)
    x = torch.tensor([r[:n] for r in rows], dtype=torch.float32)
    ref = entmax15(x, dim=-1)
    out = entmax15_fixed_point(x, max_iter=max_iter)  # few steps: uncertified rows take the fallback
    assert same_support(out, ref)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", [1e-4, 0.3, 1.0, 10.0, 1e3])
def test_fixed_point_adversarial(scale: float) -> None:
    g = torch.Generator().manual_seed(int(scale * 10))
    x = torch.randn(4, 50, 70, generator=g) * scale
    x[0] = torch.round(x[0] * 2 / scale) * scale / 2  # many exact ties
    x[1, :, 10:] = NEG  # masked tails
    x[2, :5] = 0.0  # all-equal rows
    x = x.double() if scale == 1.0 else x
    ref = entmax15(x, dim=-1)
    out = entmax15_fixed_point(x)
    assert out.dtype == x.dtype
    assert same_support(out, ref)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
