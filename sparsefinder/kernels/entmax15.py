r"""Exact 1.5-entmax over the last dimension without a full sort.

.. math::
    \mathrm{entmax}_{1.5}(s) = \arg\max_{p \in \Delta} \; p^\top s + H^T_{1.5}(p),
    \qquad p_j = [z_j - \tau]_+^2, \quad z = (s - \max_i s_i) / 2,

where :math:`\tau` is the unique value with :math:`f(\tau) = \sum_j [z_j - \tau]_+^2 - 1 = 0`.
Since :math:`z_{\max} = 0`, :math:`f(-1) \ge 0`, so :math:`\tau \ge -1`: only entries with
:math:`z_j > -1` (the *candidates*; about a fifth of an attention row at n = 512) can be in
the support.

Sort-free solve (the compiled kernel, float32 on CPU). Per row: one pass for the max, one
pass that writes :math:`z`, compacts the candidates and sums :math:`[z_j + 1]_+` and its
square (float), giving one Newton step (2. below) from :math:`t = -1`, backed off by
:math:`10^{-3}` to cover float rounding: :math:`t_0`. Candidates :math:`\le t_0 - 10^{-3}`
are dropped; then, on the remaining candidates only, in double precision, iterate from
:math:`t_0` with the statistics of :math:`S_t = \{j : z_j > t\}` (:math:`c = |S_t|`,
:math:`s_1 = \sum (z_j - t)`, :math:`s_2 = \sum (z_j - t)^2`); if :math:`f(t) < 0` (the
back-off was not enough) the row is flagged (below):

1. exactness check: the smaller root of :math:`\sum_{S_t} (z_j - t - \delta)^2 = 1`,
   :math:`\delta = (s_1 - \sqrt{s_1^2 - c\,(s_2 - 1)})/c`; if :math:`t + \delta \le \min_{S_t} z_j`,
   then :math:`f(t+\delta) = 0` (every entry of :math:`S_t` stays positive, every other
   one is :math:`\le t`) and :math:`\tau = t + \delta` exactly;
2. otherwise a Newton step on :math:`h(t) = \lVert [z - t]_+ \rVert_2`, convex and
   decreasing with :math:`h(\tau) = 1`: :math:`t \leftarrow t + (s_2 - \sqrt{s_2})/s_1`.
   From :math:`t \le \tau`, Newton on a convex decreasing function stays :math:`\le \tau`
   and increases, so :math:`S_t` always contains the support and shrinks to it (2-3 passes
   over the few candidates left at n = 512; the first two steps also drop candidates
   :math:`\le t - 10^{-3}`); :math:`h` is linear on a fixed support, which is why it
   converges much faster than Newton on :math:`f` (Michelot-style iterations on the
   quadratic alone overshoot: from a superset its root is an *upper* bound).

Agreement with :func:`entmax.entmax15`. That function computes :math:`\tau` in float32
from a sorted prefix (and torch's vectorised ``sqrt`` is not correctly rounded), so its
:math:`\tau` differs from the exact one by a few 1e-7. Rows where some :math:`z_j` lies
within :math:`2\cdot10^{-6} + 10^{-6}/(\bar z_S - \tau)` of :math:`\tau` (ten times an
estimate of that error, :math:`10^{-7} + 10^{-7}/(\bar z_S - \tau)`, from the float32 rounding
of its prefix means, :math:`\bar z_S` the mean over the support; ties at the boundary,
:math:`z_j = \tau` exactly, land here) are *flagged* and
recomputed with :func:`entmax.entmax15` itself; in every other row both computations
put each entry on the same side of :math:`\tau`, so supports are identical and
probabilities differ by < 1e-6 (the kernel is the closer of the two to the float64
solution). Flagged rows are rare (0.05 % at n = 512, 0.2 % at 2048 on attention scores).

Fallback (double inputs, non-CPU tensors, no C compiler, or
``SPARSEFINDER_ENTMAX_KERNEL=0``): the torch path, a partial sort (top-:math:`k`) with the
arithmetic of :func:`entmax.entmax15` on the sorted prefix. Only the :math:`k` largest
entries are needed while the support has fewer than :math:`k` elements; rows whose
support fills all :math:`k` candidates are solved again with :math:`4k` (or a full sort).
Ties at the boundary can make the float count of ``entmax15`` differ from a prefix, so
rows with an entry within 1e-5 of :math:`\tau` are also recomputed with ``entmax15``.

The kernel is C, compiled with the system C compiler on first use; how, and how it shares rows
among threads: :mod:`sparsefinder.kernels.entmax15_c`.

Backward (same as :class:`entmax.activations.Entmax15Function`): with
:math:`g_j = \sqrt{p_j}` (:math:`= 1/\Psi''(p_j)` on the support),

.. math::
    \frac{\partial L}{\partial s} = g \odot \frac{\partial L}{\partial p}
        - \frac{\langle g, \partial L / \partial p \rangle}{\sum_j g_j}\, g .

(the factor :math:`1/2` of :math:`z = s/2` cancels against the :math:`2` of :math:`d[\cdot]_+^2`.)
"""

from __future__ import annotations

import numpy as np
import torch
from entmax import entmax15
from torch.autograd import Function

from sparsefinder.kernels.entmax15_c import kernel_available, load_kernel

DEFAULT_K = 32
BACKENDS = ("auto", "kernel", "torch")
# Torch path: an entry this close to tau may sit on the other side of entmax15's float tau.
_TORCH_PATH_NEAR = 1e-5
# Scores per extra thread: below this the hand-off to a pool thread (which, on a busy
# machine, waits to be scheduled) costs more than it saves (12 x 128 x 128 runs in one).
_MIN_PARALLEL = 1 << 19
_CHUNK = 1 << 15  # scores per chunk handed to a thread

def _kernel_forward(x: torch.Tensor, generic: bool = False,
                    openmp: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(p, flagged rows or None)`` from the compiled kernel; ``x`` float32, contiguous, CPU."""
    lib = load_kernel(generic, openmp)
    assert lib is not None
    n = x.shape[-1]
    rows = x.numel() // n
    y = torch.empty_like(x)
    flag = torch.empty(rows, dtype=torch.uint8)
    workers = max(1, min(torch.get_num_threads(), rows, x.numel() // _MIN_PARALLEL))
    chunk = max(1, rows if workers == 1 else _CHUNK // n)
    flagged = lib.entmax15(x.data_ptr(), y.data_ptr(), flag.data_ptr(), rows, n, workers, chunk)
    if flagged < 0:
        raise MemoryError("entmax15 kernel: out of memory")
    return y, (flag.view(x.shape[:-1]).bool() if flagged else None)


def _tau_support_sorted(zs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`(\tau, \rho^\star)` from candidates ``zs`` sorted descending on the last dim.

    Same formulas and operation order as :func:`entmax.activations._entmax_threshold_and_support`:
    with prefix means :math:`\mu_\rho`, :math:`\sigma^2_\rho` of the sorted :math:`z`,
    :math:`\tau_\rho = \mu_\rho - \sqrt{[(1 - \rho\sigma^2_\rho)/\rho]_+}` and
    :math:`\rho^\star = |\{\rho : \tau_\rho \le z_{(\rho)}\}|`.
    Returns ``tau`` (``(..., 1)``, dtype of ``zs``) and the support size (``(..., 1)``, long).
    """
    k = zs.shape[-1]
    rho = torch.arange(1, k + 1, device=zs.device, dtype=zs.dtype)
    mean = zs.cumsum(-1) / rho
    mean_sq = (zs**2).cumsum(-1) / rho
    ss = rho * (mean_sq - mean**2)
    delta = (1 - ss) / rho
    tau = mean - torch.sqrt(torch.clamp(delta, 0))
    support = (tau <= zs).sum(-1, keepdim=True)
    return tau.gather(-1, support - 1), support


def entmax15_threshold(x: torch.Tensor, k: int = DEFAULT_K) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Row maxima, threshold and support size of 1.5-entmax over the last dim of ``x`` (torch path).

    Returns ``(m, tau, support)``, each ``(..., 1)``: :math:`m = \max_j x_j`,
    :math:`\tau` in the scaled space :math:`z = (x - m)/2`, so that
    :math:`p = [(x - m)/2 - \tau]_+^2`, and the support size :math:`\rho^\star`
    (long; it counts entries with :math:`z_j \ge \tau`, which may include exact zeros,
    as in :mod:`entmax`).

    Starts with the top-``k`` candidates of every row; rows whose support fills all
    ``k`` candidates are solved again, alone, with ``4k`` candidates or a full sort.
    """
    n = x.shape[-1]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    full = k >= n
    if full:
        cand, _ = torch.sort(x, dim=-1, descending=True)
    else:
        cand, _ = torch.topk(x, k=k, dim=-1, sorted=True)
    m = cand[..., :1]
    zs = (cand - m) / 2
    tau, support = _tau_support_sorted(zs)
    if not full:
        unsolved = support.squeeze(-1) == k
        if bool(unsolved.any()):
            next_k = n if 8 * k >= n else 4 * k
            _, tau_u, support_u = entmax15_threshold(x[unsolved], k=next_k)
            tau[unsolved] = tau_u
            support[unsolved] = support_u
    return m, tau, support


def _torch_forward(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""``(p, flagged rows or None)`` by the top-k path; flagged: an entry within 1e-5 of :math:`\tau`."""
    m, tau, _ = entmax15_threshold(x, k=k)
    y = torch.sub(x, m)
    y.mul_(0.5)
    y.sub_(tau)
    flagged = (y.abs() < _TORCH_PATH_NEAR).any(-1)
    y.clamp_(min=0)
    y.square_()
    return y, (flagged if bool(flagged.any()) else None)


def _use_kernel(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    fits = x.dtype == torch.float32 and x.device.type == "cpu"
    if backend == "kernel":
        if not fits:
            raise ValueError(f"the compiled kernel takes float32 CPU tensors, got {x.dtype} on {x.device}")
        if not kernel_available():
            raise RuntimeError("the compiled entmax15 kernel is not available (no C compiler, or disabled)")
        return True
    return fits and kernel_available()


def _entmax15_backward(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    r""":math:`g \odot dy - (\langle g, dy \rangle / \textstyle\sum g)\, g` with :math:`g = \sqrt{p}`."""
    gppr = y.sqrt()
    dx = dy * gppr
    q = dx.sum(-1, keepdim=True) / gppr.sum(-1, keepdim=True)
    dx -= q * gppr
    return dx


def _forward(x: torch.Tensor, k: int, backend: str) -> torch.Tensor:
    """The forward pass over the last dim: the kernel or the top-k path, flagged rows by ``entmax15``."""
    if _use_kernel(x, backend):
        x = x.contiguous()
        y, flagged = _kernel_forward(x)
        if flagged is not None:
            _redo_rows(x, y, flagged)
        return y
    y, flagged = _torch_forward(x, k)
    if flagged is not None:
        y[flagged] = entmax15(x[flagged], dim=-1)
    return y


def _redo_rows(x: torch.Tensor, y: torch.Tensor, flagged: torch.Tensor, generic: bool = False) -> None:
    """Rows ``flagged`` of ``y`` recomputed in place with the arithmetic of :func:`entmax.entmax15`.

    Bit for bit what ``entmax15(x[flagged])`` gives (its float32 steps in C, its square root by
    ``torch.sqrt`` itself), in three calls instead of its two dozen torch ops: with two threads each
    of those forks torch's thread pool, which cost more than the kernel's own pass over the scores.
    """
    lib = load_kernel(generic)
    assert lib is not None
    n = x.shape[-1]
    idx = torch.from_numpy(np.flatnonzero(flagged.reshape(-1).numpy()).astype(np.int64))
    nf = len(idx)
    zs, mean, delta = (torch.empty(nf, n) for _ in range(3))
    lib.fixup_prepare(x.data_ptr(), idx.data_ptr(), nf, n, zs.data_ptr(), mean.data_ptr(), delta.data_ptr())
    root = torch.sqrt(delta)
    bad = torch.zeros(nf, dtype=torch.uint8)
    lib.fixup_finish(x.data_ptr(), idx.data_ptr(), nf, n, zs.data_ptr(), mean.data_ptr(), root.data_ptr(),
                     y.data_ptr(), bad.data_ptr())
    if bool(bad.any()):  # an empty support (NaN scores): whatever entmax15 itself does
        rows = idx[bad.bool()]
        y.view(-1, n)[rows] = entmax15(x.reshape(-1, n)[rows], dim=-1)


class Entmax15FastFunction(Function):
    r"""Autograd function of :func:`entmax15_fast` over the last dim (see the module docstring).

    forward: :math:`\tau` by the kernel or the top-k path, :math:`p = [(x-m)/2 - \tau]_+^2`,
    flagged rows by :func:`entmax.entmax15`.
    backward: :math:`dx = \sqrt{p} \odot dp - \frac{\langle \sqrt{p}, dp\rangle}{\sum_j \sqrt{p_j}} \sqrt{p}`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int = DEFAULT_K, backend: str = "auto") -> torch.Tensor:  # type: ignore[override]
        y = _forward(x, k, backend)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return _entmax15_backward(y, dy), None, None


def entmax15_fast(x: torch.Tensor, dim: int = -1, k: int = DEFAULT_K, backend: str = "auto") -> torch.Tensor:
    r"""Exact 1.5-entmax of ``x`` along ``dim``, like :func:`entmax.entmax15`, without a full sort.

    .. math::
        p = [(x - \max x)/2 - \tau]_+^2, \qquad \textstyle\sum_j p_j = 1.

    Same supports as :func:`entmax.entmax15`, probabilities within 1e-6. ``backend``:
    ``"auto"`` (the compiled sort-free kernel for float32 CPU tensors when it builds,
    else the top-k torch path), ``"kernel"`` or ``"torch"`` to force one. ``k`` is the
    initial number of candidates per row of the torch path (any ``k >= 1`` is exact).
    Keeps the dtype of ``x``; differentiable (the backward of :class:`Entmax15FastFunction`).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if x.shape[-1] == 0:
        return x.clone()
    last = dim in (-1, x.dim() - 1)
    xt = x if last else x.transpose(dim, -1)
    if torch.is_grad_enabled() and xt.requires_grad:
        y = Entmax15FastFunction.apply(xt, k, backend)
    else:  # inference (the extraction, the sweep): no autograd node to build
        y = _forward(xt, k, backend)
    return y if last else y.transpose(dim, -1)
