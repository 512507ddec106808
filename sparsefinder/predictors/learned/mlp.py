r"""``stacked_mlp``: the stacked predictor's features through a small per-head MLP instead of a logistic model.

Same inputs as ``stacked`` (:mod:`sparsefinder.predictors.learned.core`): the
features :data:`~sparsefinder.predictors.learned.core.STACKED_FEATURES` of a pair,
standardised per head (:math:`\tilde x_f = (x_f - \mu_{hf}) / \sigma_{hf}`), the
same seeded sample of training pairs, the same per-head thresholds calibrated
on the training curves. The score of head :math:`h` is a one-hidden-layer
network with a linear skip:

.. math::
    z = b_h + \sum_f w_{hf} \tilde x_f
        + \sum_{m=1}^{M} v_{hm} \tanh\Big(c_{hm} + \sum_f U_{hfm} \tilde x_f\Big),

:math:`M` = ``hidden``. The skip starts at the logistic fit of ``stacked``
(:func:`~sparsefinder.predictors.learned.core._fit_logistic` on the same sample) and
:math:`v = 0`, so training starts from the logistic model's loss and only has
to learn what a linear score cannot (an interaction such as an XOR of two
features). Then ``steps`` full-batch Adam steps (cosine-decayed learning rate
``lr``) minimise the mean pointwise cross-entropy plus
:math:`\lambda (\|w_h\|^2 + \|U_h\|^2 + \|v_h\|^2)` (``l2``; biases are not
penalised). All heads train at once as one batch (``U`` is ``(H, F, M)``): the
loss is a sum of per-head terms and Adam is elementwise, so each head's
trajectory is that of its own fit. Float32, initial :math:`U` drawn from a
``torch.Generator`` seeded by ``seed``: the same data and ``seed`` give the
same weights (on one machine and thread count).

Scoring never builds an ``(…, F)`` or ``(…, M)`` tensor: each hidden unit's
pre-activation is one :func:`~sparsefinder.predictors.learned.core._combine` pass
over the feature dictionary (standardisation folded into the weights), so
memory is a few ``(B, H, N, N)`` float32 tensors, and time :math:`O(M F)`
elementwise passes over the pairs (about :math:`M` times ``stacked``'s).

Fitted state (safetensors): ``stacked``'s tensors (priors, ``mean``,
``scale``, ``weight`` ``(H, F + 1)`` = the skip, bias last) plus ``w1``
``(H, F, M)``, ``b1`` ``(H, M)``, ``w2`` ``(H, M)``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from sparsefinder.predictors.base import NotFittedError, register
from sparsefinder.predictors.constraints import Constraint, Int, Real
from sparsefinder.predictors.learned.stacked import _combine, _fit_logistic, _per_head, _Stacked

ADAM_BETAS = (0.9, 0.999)


def fit_mlp(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, linear: torch.Tensor, hidden: int,
            steps: int, lr: float, l2: float, generator: torch.Generator, dtype: torch.dtype = torch.float32,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Per-head MLPs with a linear skip on standardised ``x`` ``(H, P, F)``, labels ``y`` ``(H, P)``.

    ``linear`` ``(H, F + 1)``: the skip's initial weights (bias last). Returns
    ``(skip (H, F + 1), w1 (H, F, M), b1 (H, M), w2 (H, M))`` in ``dtype`` (float32 for the
    predictor; float64 lets a test compare trajectories without float32 rounding)
    (module docstring). ``weight`` ``(H, P)`` weights each pair's loss (default 1).

    The gradient is written out (batched matmuls and in-place updates of one
    ``(H, P, M)`` buffer) rather than taken by autograd, whose extra ``(H, P, M)``
    temporaries cost about twice as much per step on one CPU thread.
    """
    H, P, F = x.shape
    M = hidden
    # U ~ N(0, 1/F): pre-activations of unit variance on standardised features (tanh not saturated).
    w1 = (torch.randn(H, F, M, generator=generator, dtype=torch.float64) / math.sqrt(max(F, 1))).to(dtype)
    b1 = torch.zeros(H, M, dtype=dtype)
    w2 = torch.zeros(H, M, dtype=dtype)  # starts as the logistic model exactly
    lin = linear[:, :F].to(dtype).clone()
    bias = linear[:, F].to(dtype).clone()
    if steps > 0 and P > 0:
        xf = x.to(dtype).contiguous()
        xt = xf.transpose(1, 2).contiguous()  # (H, F, P)
        yf = y.to(dtype)
        wt = torch.ones(H, P, dtype=dtype) if weight is None else weight.to(dtype)
        wt = wt / wt.sum(1, keepdim=True).clamp(min=1.0)  # weighted mean per head
        # No torch.use_deterministic_algorithms here: it is process-global, and the app fits on one
        # thread while others predict; these CPU ops (bmm, elementwise, Adam) are deterministic anyway.
        opt = torch.optim.Adam([lin, bias, w1, b1, w2], lr=lr, betas=ADAM_BETAS)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / steps)))
        for _ in range(steps):
            t = torch.baddbmm(b1[:, None, :], xf, w1).tanh_()  # (H, P, M)
            z = torch.bmm(t, w2[:, :, None])[..., 0] + torch.bmm(xf, lin[:, :, None])[..., 0] + bias[:, None]
            # d(mean cross-entropy)/dz; heads are independent, so each head's gradient is its own fit's.
            dz = (torch.sigmoid(z) - yf) * wt  # (H, P)
            w2.grad = torch.bmm(dz[:, None, :], t)[:, 0] + 2 * l2 * w2
            lin.grad = torch.bmm(xt, dz[:, :, None])[..., 0] + 2 * l2 * lin
            bias.grad = dz.sum(1)  # biases are not penalised
            # dz (1 - tanh^2), in place; the factor v_m of unit m comes out of the sums over pairs.
            s = t.mul_(t).sub_(1.0).mul_(-dz[..., None])
            w1.grad = torch.bmm(xt, s) * w2[:, None, :] + 2 * l2 * w1
            b1.grad = s.sum(1) * w2
            opt.step()
            sched.step()
    return torch.cat([lin, bias[:, None]], 1), w1, b1, w2


@register
class StackedMLP(_Stacked):
    """Per-head MLP (``hidden`` tanh units, linear skip) over ``stacked``'s standardised features (module docstring)."""

    default_sweep: ClassVar[bool] = False
    """Opt-in (``--methods stacked_mlp``): +0.005 recall over ``stacked`` for 5.5x its fit time (README)."""
    name: ClassVar[str] = "stacked_mlp"
    input_space: ClassVar[str] = "projected"
    context_keys: ClassVar[tuple[str, ...]] = ("tokens",)
    fitted_tensors: ClassVar[tuple[str, ...]] = _Stacked.fitted_tensors + ("w1_", "b1_", "w2_")

    hidden: int
    steps: int
    lr: float
    l2: float
    w1_: torch.Tensor | None = None
    b1_: torch.Tensor | None = None
    w2_: torch.Tensor | None = None

    constraints: ClassVar[dict[str, Constraint]] = {
        "hidden": Int(1), "steps": Int(0),
        "lr": Real(0, low_open=True, finite=True, text="be a finite number > 0"),
        "l2": Real(0, finite=True, text="be a finite number >= 0"),
    }

    def __init__(self, sparsity: float = 0.7, budget: str = "per_head", hidden: int = 16, steps: int = 300,
                 lr: float = 0.01, l2: float = 1e-4, max_pairs: int = 60_000, prior_strength: float = 20.0,
                 seed: int = 0, window: int = 0, global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _fit_weights(self, xz: torch.Tensor, y: torch.Tensor, inside: torch.Tensor) -> None:
        linear = _fit_logistic(xz, y, weight=inside)
        # Its own stream (not the sample's [seed, 11]): the sample stays stacked's whatever the init draws.
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, 17]).generate_state(1)[0]))
        skip, w1, b1, w2 = fit_mlp(xz, y, inside, linear, int(self.hidden), int(self.steps), float(self.lr),
                                   float(self.l2), gen)
        self.weight_, self.w1_, self.b1_, self.w2_ = skip, w1, b1, w2

    def _feature_logits(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.w1_ is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted")
        z = super()._feature_logits(feats)
        for m in range(self.w1_.shape[2]):  # one unit at a time: (B, H, N, N) tensors only, never (..., M) or (..., F)
            unit = torch.cat([self.w1_[:, :, m], self.b1_[:, m, None]], 1)  # (H, F + 1), bias last
            z = z + torch.tanh(_combine(feats, self.features, unit, self.mean_, self.scale_, _per_head)) \
                * _per_head(self.w2_[:, m].float())
        return z

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        super()._check_state(state)
        F, M = len(self.features), int(self.hidden)
        H = state["thresholds"].shape[0]
        want = {"w1": (H, F, M), "b1": (H, M), "w2": (H, M), "weight": (H, F + 1), "mean": (H, F), "scale": (H, F)}
        for name, shape in want.items():
            if tuple(state[name].shape) != shape:
                raise ValueError(f"{type(self).__name__} state {name} must be {shape} (H={H}, {F} features, "
                                 f"hidden={M}), got {tuple(state[name].shape)}")


__all__ = ["StackedMLP", "fit_mlp"]
