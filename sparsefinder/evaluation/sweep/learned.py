r"""Fast path for the learned budget predictors: one pair score per batch, every target sparsity from it.

A learned budget predictor (:class:`~sparsefinder.predictors.learned.budgets._BudgetPredictor`:
``distance_budget``, ``topk``, ``stacked``, ``priors``, ``cascade``, ``global_band``) keeps pair
:math:`(i, j)` of head :math:`h` at target sparsity :math:`s` iff

.. math:: z_{hij} \ge t_h(s) \quad\text{and}\quad z_{hij} > \mathrm{OUTSIDE},

where the scores :math:`z` do not depend on :math:`s` (a predict-only parameter: it only picks the
head's threshold :math:`t_h(s)` on the fitted curves). So the scores, the costly part (features,
row sorts, a cascade's candidates), are computed once per batch and layer for the whole grid.

Per head the kept sets only grow as the threshold falls: with the head's thresholds sorted in
decreasing order :math:`t_h^{(0)} \ge \dots \ge t_h^{(C-1)}`, the grid is one nested family per head.
The level of a pair is :math:`\#\{p : \lnot(z \ge t_h^{(p)})\}` (:math:`C`, never, when
:math:`z \le \mathrm{OUTSIDE}`), and the pair is an edge at sorted position :math:`p` iff its level
is at most :math:`p`. The order differs between heads (a per-head budget moves the heads' densities
differently), so :attr:`_Levels.position` maps each grid point back from its head's sorted position.
"""

from __future__ import annotations

import torch

from sparsefinder.evaluation.sweep.batch import NESTED, _Batch, _level_dtype, _Levels, _Nested, _never
from sparsefinder.predictors.base import REGISTRY, Predictor, check_inputs, shared_pattern
from sparsefinder.predictors.learned.budgets import OUTSIDE, _BudgetPredictor, token_hashes


def head_thresholds(pred: Predictor) -> torch.Tensor:
    """``(H,)`` float64 thresholds of one configuration (memoised on the fitted predictor itself)."""
    assert isinstance(pred, _BudgetPredictor)
    return pred.head_thresholds()


def _budget_levels(batch: _Batch, pred: Predictor, values: list[torch.Tensor]) -> _Levels:
    """Per-head levels of the grid ``values`` (each configuration's ``(H,)`` thresholds), module docstring."""
    assert isinstance(pred, _BudgetPredictor)
    b, h, n = batch.shape
    q, k = batch.inputs(type(pred))
    q, k, lengths = check_inputs(q, k, batch.lengths, same_dim=pred.input_space != "shape")
    if pred.thresholds_ is not None and pred.thresholds_.shape[0] != h:
        raise ValueError(f"{type(pred).__name__} was fitted for {pred.thresholds_.shape[0]} heads, got {h}")
    # As Predictor._run passes it: only methods that declare "tokens" see the token strings.
    tokens = batch.context.get("tokens") if "tokens" in pred.context_keys else None
    z = pred._scores(q, k, lengths, batch.causal, token_hashes(tokens, b, n))
    c = len(values)
    thresholds = torch.stack([t.to(device=z.device, dtype=torch.float64) for t in values], dim=1)  # (H, C)
    # Decreasing thresholds = growing graphs; stable, so equal thresholds keep grid order.
    ordered, order = torch.sort(thresholds, dim=-1, descending=True, stable=True)
    position = torch.empty_like(order)
    position.scatter_(-1, order, torch.arange(c, device=order.device).expand_as(order).contiguous())
    dtype = _level_dtype(c)
    core = torch.zeros(z.shape, dtype=dtype, device=z.device)
    for p in range(c):
        # The predictor's own comparison, z >= t (same dtypes, same promotion); NaN never passes.
        core += (~(z >= ordered[:, p][None, :, None, None])).to(dtype)
    core = torch.maximum(core, _never(z > OUTSIDE, c, dtype))
    return _Levels(core, shared_pattern(batch.lengths, n, pred.window, pred.global_tokens), position=position)


# Registered by class (see batch.NESTED), for every registered subclass of the budget base.
# A subclass that changes how scores become edges (its own _core) keeps the generic path.
for _cls in REGISTRY.values():
    if issubclass(_cls, _BudgetPredictor) and _cls._core is _BudgetPredictor._core:
        NESTED[_cls] = _Nested("sparsity", _budget_levels, value=head_thresholds)
