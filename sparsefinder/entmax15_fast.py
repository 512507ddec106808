r"""Exact 1.5-entmax over the last dimension with a partial sort (top-k) instead of a full sort.

.. math::
    \mathrm{entmax}_{1.5}(s) = \arg\max_{p \in \Delta} \; p^\top s + H^T_{1.5}(p),
    \qquad p_j = [z_j - \tau]_+^2, \quad z = (s - \max_i s_i) / 2,

where :math:`\tau` is the unique value with :math:`\sum_j [z_j - \tau]_+^2 = 1`.

Sort-based solution (Peters et al., 2019). With :math:`z_{(1)} \ge z_{(2)} \ge \dots`
sorted and, for each prefix length :math:`\rho`,

.. math::
    \mu_\rho = \tfrac{1}{\rho} \sum_{i \le \rho} z_{(i)}, \quad
    \sigma^2_\rho = \tfrac{1}{\rho} \sum_{i \le \rho} z_{(i)}^2 - \mu_\rho^2, \quad
    \tau_\rho = \mu_\rho - \sqrt{\big[(1 - \rho\,\sigma^2_\rho)/\rho\big]_+},

the support size is :math:`\rho^\star = |\{\rho : \tau_\rho \le z_{(\rho)}\}|` (a prefix)
and :math:`\tau = \tau_{\rho^\star}`.

Partial sort. Only the :math:`k` largest entries are needed as long as the support has
fewer than :math:`k` elements: the prefix statistics of the top-:math:`k` are the ones of the
full sort, and if :math:`\tau_k > z_{(k)}` (the smallest candidate gets zero) then every entry
outside the candidates (all :math:`\le z_{(k)}`) gets zero too, so :math:`\tau` is exact.
Rows where the candidates are all in the support (:math:`\rho^\star = k < n`) are unresolved;
only those rows are solved again with :math:`4k` candidates (or a full sort once
:math:`4k \ge n / 2`). The arithmetic is the one of :func:`entmax.entmax15` on the same
sorted prefix, so supports and probabilities agree with it (bit for bit on CPU in practice).

Backward (same as :class:`entmax.activations.Entmax15Function`): with
:math:`g_j = \sqrt{p_j}` (:math:`= 1/\Psi''(p_j)` on the support),

.. math::
    \frac{\partial L}{\partial s} = g \odot \frac{\partial L}{\partial p}
        - \frac{\langle g, \partial L / \partial p \rangle}{\sum_j g_j}\, g .

(the factor :math:`1/2` of :math:`z = s/2` cancels against the :math:`2` of :math:`d[\cdot]_+^2`.)
"""

from __future__ import annotations

import torch
from torch.autograd import Function

DEFAULT_K = 32


def _tau_support_sorted(zs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`(\tau, \rho^\star)` from candidates ``zs`` sorted descending on the last dim.

    Same formulas and operation order as :func:`entmax.activations._entmax_threshold_and_support`.
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
    r"""Row maxima, threshold and support size of 1.5-entmax over the last dim of ``x``.

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


def _entmax15_from_threshold(x: torch.Tensor, m: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    r""":math:`p = [(x - m)/2 - \tau]_+^2`, in place on one fresh buffer."""
    y = torch.sub(x, m)
    y.mul_(0.5)
    y.sub_(tau)
    y.clamp_(min=0)
    y.square_()
    return y


def _entmax15_backward(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    r""":math:`g \odot dy - (\langle g, dy \rangle / \textstyle\sum g)\, g` with :math:`g = \sqrt{p}`."""
    gppr = y.sqrt()
    dx = dy * gppr
    q = dx.sum(-1, keepdim=True) / gppr.sum(-1, keepdim=True)
    dx -= q * gppr
    return dx


class Entmax15FastFunction(Function):
    r"""Autograd function of :func:`entmax15_fast` over the last dim (see the module docstring).

    forward: :math:`(m, \tau) \leftarrow` top-k threshold search, :math:`p = [(x-m)/2 - \tau]_+^2`.
    backward: :math:`dx = \sqrt{p} \odot dp - \frac{\langle \sqrt{p}, dp\rangle}{\sum_j \sqrt{p_j}} \sqrt{p}`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int = DEFAULT_K) -> torch.Tensor:  # type: ignore[override]
        m, tau, _ = entmax15_threshold(x, k=k)
        y = _entmax15_from_threshold(x, m, tau)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return _entmax15_backward(y, dy), None


def entmax15_fast(x: torch.Tensor, dim: int = -1, k: int = DEFAULT_K) -> torch.Tensor:
    r"""Exact 1.5-entmax of ``x`` along ``dim``, like :func:`entmax.entmax15`, without a full sort.

    .. math::
        p = [(x - \max x)/2 - \tau]_+^2, \qquad \textstyle\sum_j p_j = 1.

    ``k`` is the initial number of candidates per row (a little above the expected
    support size is fastest); any ``k >= 1`` gives the exact result. Keeps the dtype of
    ``x``; differentiable (the backward of :class:`Entmax15FastFunction`).
    """
    if x.shape[-1] == 0:
        return x.clone()
    last = dim in (-1, x.dim() - 1)
    xt = x if last else x.transpose(dim, -1)
    y = Entmax15FastFunction.apply(xt, k)
    return y if last else y.transpose(dim, -1)
