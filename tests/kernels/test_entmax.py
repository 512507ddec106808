"""Exact 1.5-entmax (:mod:`sparsefinder.kernels.entmax15`) against :func:`entmax.entmax15` and a brute force.

Both backends are checked: the compiled sort-free kernel (float32 on CPU) and the top-k
torch path (any dtype). Contract: supports identical to ``entmax15``, probabilities
within 1e-6, same gradients.
"""

from __future__ import annotations

import pytest
import torch
from entmax import entmax15
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefinder.kernels import entmax15 as ef
from sparsefinder.kernels import entmax15_c
from sparsefinder.kernels.entmax15 import entmax15_fast, entmax15_threshold, kernel_available

NEG = torch.finfo(torch.float32).min
BACKENDS = [
    "torch",
    pytest.param("kernel", marks=pytest.mark.skipif(not kernel_available(), reason="no C compiler")),
]


def _check(x: torch.Tensor, k: int = 32, backend: str = "auto") -> torch.Tensor:
    ref = entmax15(x, dim=-1)
    out = entmax15_fast(x, k=k, backend=backend)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out > 0, ref > 0), "supports differ"
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    assert torch.allclose(out.sum(-1), torch.ones_like(out.sum(-1)), atol=1e-4)
    return out


def _brute_force(z_row: list[float]) -> tuple[float, list[float]]:
    """tau of sum_j [z_j - tau]_+^2 = 1 by 200 bisection steps in Python floats (no sort, no torch)."""
    lo, hi = max(z_row) - 1.0, max(z_row)
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(max(z - mid, 0.0) ** 2 for z in z_row) >= 1.0:
            lo = mid
        else:
            hi = mid
    return lo, [max(z - lo, 0.0) ** 2 for z in z_row]


ROW = st.lists(
    st.one_of(
        st.floats(-50, 50, allow_nan=False, width=32),
        st.sampled_from([0.0, 1.0, -1.0, 2.0, 1e-3, NEG, NEG / 2]),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(ROW, min_size=1, max_size=4),
    k=st.integers(1, 40),
    dtype=st.sampled_from(["f32", "f64"]),
    backend=st.sampled_from(["auto", "torch"]),
)
def test_matches_entmax15_random_rows(rows: list[list[float]], k: int, dtype: str, backend: str) -> None:
    n = min(len(r) for r in rows)
    x = torch.tensor([r[:n] for r in rows], dtype=torch.float32)
    if dtype == "f64":
        x = x.double()
    _check(x, k, backend)


@settings(max_examples=80, deadline=None)
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
        x = torch.round(x * 2 / scale) * scale / 2  # many exact ties, some of them at the boundary
    mask = torch.rand(3, 5, n, generator=g) < masked
    x = x + mask.float() * NEG
    _check(x, k, "auto")
    _check(x, k, "torch")
    _check(x.double(), k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 7, 128, 513])
def test_special_rows(n: int, backend: str) -> None:
    rows = [
        torch.zeros(n),  # flat: full support
        torch.full((n,), NEG),  # fully masked row: uniform, like entmax15
        torch.linspace(0, 1e-3, n),  # nearly flat
        torch.cat([torch.tensor([100.0]), torch.zeros(n - 1)]),  # very peaked
        torch.cat([torch.tensor([3.0]), torch.full((n - 1,), NEG)]),  # all masked but one
        torch.arange(n, dtype=torch.float32) % 3,  # ties at the top
        torch.cat([torch.tensor([2.0]), torch.zeros(n - 1)]),  # z = (0, -1, ...): p = 0 exactly at the boundary
    ]
    x = torch.stack(rows)
    for k in (1, 4, 32, 64):
        _check(x, k, backend)
    if backend == "torch":
        _check(x.double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_boundary_ties_are_recomputed(backend: str) -> None:
    # z = (0, 0, -.25 x8, -.5 x23, ...): tau = -.5 exactly, so the 23 entries at -.5 get p = 0;
    # any rounding of tau puts them in or out: such rows must go to entmax15 itself.
    row = torch.tensor([2.0] * 2 + [1.5] * 8 + [1.0] * 23 + [0.0] * 40)
    x = torch.stack([row, row.flip(0), torch.linspace(-3, 3, 73)])
    # float32: the contract is the support of ``entmax15`` computed on this machine, which on some
    # CPUs (AVX-512 BLAS paths) gives the 23 boundary entries tiny positive values.
    _check(x, 32, backend)
    # Exact arithmetic is checked where it holds: in float64 every quantity here is a short dyadic
    # number, so tau = -.5 exactly and the support is the 10 entries above it on every CPU.
    exact = entmax15_fast(x.double(), k=32, backend="torch")
    assert torch.equal(exact > 0, entmax15(x.double(), dim=-1) > 0)
    assert int((exact[0] > 0).sum()) == 10
    if backend == "kernel":
        _, flagged = ef._kernel_forward(x.contiguous())
        assert flagged is not None and flagged.tolist() == [True, True, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_against_brute_force(backend: str) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(6, 40, generator=g) * s for s in (0.1, 1.0, 4.0)])
    out = entmax15_fast(x, backend=backend)
    z = ((x - x.amax(-1, keepdim=True)) / 2).double()
    for i in range(x.shape[0]):
        tau, p = _brute_force(z[i].tolist())
        assert torch.allclose(out[i].double(), torch.tensor(p, dtype=torch.float64), atol=1e-6)
        gap = (z[i] - tau).abs().min().item()
        if gap > 1e-5:  # away from ties with tau the supports must agree
            assert torch.equal(out[i] > 0, torch.tensor(p) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_four_dims_attention_like(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 3, 97, 16
    q, kk = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    s = q @ kk.transpose(-1, -2) / d**0.5
    causal = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    s = s.masked_fill(causal, NEG)
    for k in (1, 8, 32, 200):
        _check(s, k, backend)


@pytest.mark.skipif(not kernel_available(), reason="no C compiler")
def test_kernel_rows_split_over_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # split over two threads (uneven chunks); the split must not change a row
    monkeypatch.setattr(ef, "_MIN_PARALLEL", 1 << 10)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(67, 2049, generator=g) * 3
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = _check(x, backend="kernel")
        torch.set_num_threads(1)
        one = entmax15_fast(x, backend="kernel")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.skipif(not kernel_available(), reason="no C compiler")
@pytest.mark.parametrize("threads", [1, 2])
def test_openmp_and_posix_thread_builds_agree(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    # the two ways of sharing rows among threads (torch's OpenMP pool, or the kernel's own
    # POSIX threads) compute each row alone, so they must give the same bits
    monkeypatch.setattr(ef, "_MIN_PARALLEL", 1 << 10)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 5, 129, 257, generator=g) * 2
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        builds = [ef._kernel_forward(x, openmp=o) for o in (True, False)]
    finally:
        torch.set_num_threads(before)
    (a, fa), (b, fb) = builds
    assert torch.equal(a, b)
    assert (fa is None and fb is None) or torch.equal(fa, fb)


@pytest.mark.skipif(not kernel_available(), reason="no C compiler")
@pytest.mark.parametrize("scale", [1e-4, 0.1, 1.0, 5.0, 100.0])
def test_redone_rows_are_entmax15_bit_for_bit(scale: float) -> None:
    # the flagged rows' redo (entmax15's float32 steps in C, torch's own sqrt) must give entmax15's
    # bits exactly, on ties, dtype-min masks and flat rows too: those rows are flagged because an
    # entry sits at entmax15's threshold
    g = torch.Generator().manual_seed(int(scale * 1e4) % 997)
    for n in (1, 2, 7, 64, 333, 700):
        x = torch.randn(48, n, generator=g) * scale
        x[::3] = torch.round(x[::3] * 2) / 2
        x[1::5, n // 2:] = torch.finfo(torch.float32).min
        x[2::7] = 0.0
        y = torch.full_like(x, -1.0)
        ef._redo_rows(x, y, torch.ones(48, dtype=torch.bool))
        assert torch.equal(y, entmax15(x, dim=-1))


@pytest.mark.skipif(not kernel_available(), reason="no C compiler")
def test_generic_kernel_matches() -> None:
    # the plain-C build (CPUs without AVX-512) on the same hard rows
    g = torch.Generator().manual_seed(7)
    n = 75
    x = torch.randn(40, n, generator=g) * torch.tensor([1e-4, 0.1, 1.0, 5.0, 100.0]).repeat(8)[:, None]
    x[::3] = torch.round(x[::3] * 2) / 2  # ties
    x[1::4, 5:] = NEG  # masked tails
    x = torch.cat([x, torch.zeros(1, n), torch.full((1, n), NEG)])
    y, flagged = ef._kernel_forward(x, generic=True)
    if flagged is not None:
        y[flagged] = entmax15(x[flagged], dim=-1)
    ref = entmax15(x, dim=-1)
    assert torch.equal(y > 0, ref > 0)
    assert torch.allclose(y, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dim_argument(backend: str) -> None:
    x = torch.randn(4, 9, 6, generator=torch.Generator().manual_seed(1))
    out = entmax15_fast(x, dim=1, k=2, backend=backend)
    assert torch.allclose(out, entmax15(x, dim=1), atol=1e-6)
    assert torch.equal(out > 0, entmax15(x, dim=1) > 0)


def test_threshold_support_size() -> None:
    x = torch.randn(10, 200, generator=torch.Generator().manual_seed(2)) * 3
    m, tau, support = entmax15_threshold(x, k=4)
    p = torch.clamp((x - m) / 2 - tau, min=0) ** 2
    assert torch.allclose(p.sum(-1), torch.ones(10), atol=1e-5)
    assert torch.equal(support.squeeze(-1), (p > 0).sum(-1))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k must be"):
        entmax15_fast(torch.zeros(2, 3), k=0)
    with pytest.raises(ValueError, match="backend"):
        entmax15_fast(torch.zeros(2, 3), backend="gpu")
    with pytest.raises(ValueError, match="float32"):
        entmax15_fast(torch.zeros(2, 3, dtype=torch.float64), backend="kernel")


def test_falls_back_without_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    x = torch.randn(5, 50, generator=torch.Generator().manual_seed(6)) * 2
    monkeypatch.setenv("SPARSEFINDER_CACHE", str(tmp_path))  # no kernel built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(entmax15_c.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    entmax15_c.load_kernel.cache_clear()
    try:
        assert not kernel_available()
        _check(x)  # the torch path
        with pytest.raises(RuntimeError, match="not available"):
            entmax15_fast(x, backend="kernel")
        monkeypatch.setenv("SPARSEFINDER_ENTMAX_KERNEL", "0")
        entmax15_c.load_kernel.cache_clear()
        assert not kernel_available()
    finally:
        entmax15_c.load_kernel.cache_clear()


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
    for dtype, atol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):  # float32: the kernel
        a = x.to(dtype).clone().requires_grad_()
        b = x.to(dtype).clone().requires_grad_()
        entmax15(a, dim=-1).backward(dy.to(dtype))
        entmax15_fast(b, k=k).backward(dy.to(dtype))
        assert torch.allclose(a.grad, b.grad, atol=atol)
