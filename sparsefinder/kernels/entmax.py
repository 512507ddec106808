r"""alpha-entmax over the last dimension, computed in float32.

.. math::
    \mathrm{entmax}_\alpha(s) = \arg\max_{p \in \Delta} \; p^\top s + H^T_\alpha(p),
    \qquad p_j = [(\alpha - 1) s_j - \tau]_+^{1/(\alpha-1)}

``alpha = 1.5`` has an exact solution; we compute it without a sort
(:func:`sparsefinder.kernels.entmax15.entmax15_fast`: a compiled sort-free kernel for
float32 CPU tensors, a partial top-k otherwise; same supports as :func:`entmax.entmax15`,
probabilities within 1e-6; see ``bench/entmax_speed.py`` for its speed);
other values, and per-head alpha tensors, use bisection on :math:`\tau`
(:func:`entmax.entmax_bisect`). ``alpha = 1`` is softmax.
"""

from __future__ import annotations

import torch
from entmax import entmax_bisect

from sparsefinder.kernels.entmax15 import entmax15_fast

Alpha = float | torch.Tensor


def check_alpha(alpha: Alpha | list, what: str = "alpha") -> None:
    """Refuse an alpha that is not a finite number >= 1 (1 is softmax), scalar or per head.

    NaN compares false with every bound, so ``alpha < 1`` alone lets it through and
    every probability becomes NaN; ``inf`` would silently mean argmax-free uniform rows.
    """
    try:
        values = torch.as_tensor(alpha, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{what} must be a finite number >= 1 (1 = softmax), got {alpha!r}") from None
    bad = values[~torch.isfinite(values) | (values < 1)]
    if values.numel() == 0 or bad.numel():
        shown = f"{float(bad[0]):g}" if bad.numel() else "an empty table"
        raise ValueError(f"{what} must be a finite number >= 1 (1 = softmax), got {shown}")


def is_scalar_alpha(alpha: Alpha, value: float) -> bool:
    if isinstance(alpha, torch.Tensor):
        return bool(alpha.numel() > 0 and torch.all(alpha == value))
    return float(alpha) == value


def entmax(scores: torch.Tensor, alpha: Alpha = 1.5, n_iter: int = 50) -> torch.Tensor:
    """alpha-entmax of ``scores`` over the last dim, in float32.

    ``alpha`` is a float (> 1, or exactly 1 for softmax) or a tensor that
    broadcasts against ``scores`` with its last dim of size 1 (e.g. ``(1, H, 1, 1)``
    for one alpha per head).
    """
    scores = scores.float()
    if is_scalar_alpha(alpha, 1.5):
        return entmax15_fast(scores, dim=-1)
    if is_scalar_alpha(alpha, 1.0):
        return torch.softmax(scores, dim=-1)
    check_alpha(alpha)
    if isinstance(alpha, torch.Tensor):
        if torch.any(alpha <= 1):
            raise ValueError("every alpha must be > 1 (use softmax for alpha = 1)")
        alpha = alpha.to(device=scores.device, dtype=torch.float32).expand(*scores.shape[:-1], 1)
    return entmax_bisect(scores, alpha=alpha, dim=-1, n_iter=n_iter)
