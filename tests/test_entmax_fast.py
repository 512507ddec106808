"""Exact top-k 1.5-entmax (:mod:`sparsefinder.entmax15_fast`) against :func:`entmax.entmax15`."""

from __future__ import annotations

import pytest
import torch
from entmax import entmax15
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefinder.entmax15_fast import entmax15_fast, entmax15_threshold

NEG = torch.finfo(torch.float32).min


def _check(x: torch.Tensor, k: int) -> None:
    ref = entmax15(x, dim=-1)
    out = entmax15_fast(x, k=k)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out > 0, ref > 0), "supports differ"
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    assert torch.allclose(out.sum(-1), torch.ones_like(out.sum(-1)), atol=1e-4)


ROW = st.lists(
    st.one_of(
        st.floats(-50, 50, allow_nan=False, width=32),
        st.sampled_from([0.0, 1.0, -1.0, 2.0, 1e-3, NEG, NEG / 2]),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(ROW, min_size=1, max_size=4), k=st.integers(1, 40), dtype=st.sampled_from(["f32", "f64"]))
def test_matches_entmax15_random_rows(rows: list[list[float]], k: int, dtype: str) -> None:
    n = min(len(r) for r in rows)
    x = torch.tensor([r[:n] for r in rows], dtype=torch.float32)
    if dtype == "f64":
        x = x.double()
    _check(x, k)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 300),
    scale=st.sampled_from([1e-4, 0.1, 1.0, 5.0, 100.0]),
    masked=st.floats(0, 0.9),
    ties=st.booleans(),
    k=st.sampled_from([1, 2, 8, 32, 64]),
)
def test_matches_entmax15_adversarial(seed: int, n: int, scale: float, masked: float, ties: bool, k: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, n, generator=g) * scale
    if ties:
        x = torch.round(x * 2 / scale) * scale / 2  # many exact ties
    mask = torch.rand(3, 5, n, generator=g) < masked
    x = x + mask.float() * NEG
    _check(x, k)
    _check(x.double(), k)


@pytest.mark.parametrize("n", [1, 2, 7, 128, 513])
@pytest.mark.parametrize("k", [1, 4, 32, 64])
def test_special_rows(n: int, k: int) -> None:
    rows = [
        torch.zeros(n),  # flat: full support
        torch.full((n,), NEG),  # fully masked row: uniform, like entmax15
        torch.linspace(0, 1e-3, n),  # nearly flat
        torch.cat([torch.tensor([100.0]), torch.zeros(n - 1)]),  # very peaked
        torch.cat([torch.tensor([3.0]), torch.full((n - 1,), NEG)]),  # all masked but one
        torch.arange(n, dtype=torch.float32) % 3,  # ties at the top
    ]
    x = torch.stack(rows)
    _check(x, k)
    _check(x.double(), k)


def test_four_dims_attention_like() -> None:
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 3, 97, 16
    q, kk = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    s = q @ kk.transpose(-1, -2) / d**0.5
    causal = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    s = s.masked_fill(causal, NEG)
    for k in (1, 8, 32, 200):
        _check(s, k)
    out = entmax15_fast(s)
    assert torch.equal(out, entmax15(s, dim=-1))  # same arithmetic on the same sorted prefix


def test_dim_argument() -> None:
    x = torch.randn(4, 9, 6, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(entmax15_fast(x, dim=1, k=2), entmax15(x, dim=1), atol=1e-6)


def test_threshold_support_size() -> None:
    x = torch.randn(10, 200, generator=torch.Generator().manual_seed(2)) * 3
    m, tau, support = entmax15_threshold(x, k=4)
    p = torch.clamp((x - m) / 2 - tau, min=0) ** 2
    assert torch.allclose(p.sum(-1), torch.ones(10), atol=1e-5)
    assert torch.equal(support.squeeze(-1), (p > 0).sum(-1))


def test_bad_k() -> None:
    with pytest.raises(ValueError):
        entmax15_fast(torch.zeros(2, 3), k=0)


@pytest.mark.parametrize("k", [1, 3, 64])
def test_gradcheck(k: int) -> None:
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 12, generator=g, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: entmax15_fast(t, k=k), (x,))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 60), k=st.integers(1, 16))
def test_backward_matches_entmax15(seed: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, n, generator=g, dtype=torch.float64) * 3
    dy = torch.randn(4, n, generator=g, dtype=torch.float64)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    entmax15(a, dim=-1).backward(dy)
    entmax15_fast(b, k=k).backward(dy)
    assert torch.allclose(a.grad, b.grad, atol=1e-10)
