r"""Fast path for ``pages``: every grid point of a sentence from one set of page statistics.

:class:`~sparsefinder.predictors.pages.PagesPredictor` works per sentence on the sentence's own
float64 tensors (its graph must not depend on the batch), one grid point at a time. This kernel keeps
that loop and those exact operations (the same matmuls and sorts on the same shapes, so the same
bits), and computes once what the grid points share:

- per sentence: the float64 copies of :math:`q`, :math:`k` and :math:`q k^\top`;
- per page size :math:`p` (and :math:`\alpha`, :math:`\gamma`): the page statistics, the box bounds
  :math:`U`, the page means :math:`M`, and for the superset variant the seed sets :math:`S_i`, their
  entmax thresholds :math:`\tau_{S_i}` (a sort per row: the costly part) and the margins :math:`m_i`;
- per slack :math:`\sigma`: the estimate :math:`E = (1 - \sigma) U + \sigma M`, and for the budgeted
  variant the sort of each row's pages by :math:`E`, shared by every sparsity.

What remains per grid point (:math:`E > \tau_{S_i} - m_i` for each slack; the budget prefix for each
sparsity) is one broadcast over the slacks or sparsities of a page size. The edges of a page size's
configurations land in one ``(C, B, H, N, N)`` tensor, scored by :func:`_dense_counts_many`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sparsefinder.evaluation.sweep.batch import (
    _COUNT_KEYS,
    _FLOAT_KEYS,
    GROUPED,
    Counts,
    _Batch,
    _dense_counts_many,
    _finish,
)
from sparsefinder.kernels.exact_bounds import _lower, entmax_threshold
from sparsefinder.predictors.base import Predictor, check_inputs
from sparsefinder.predictors.pages import BOUND_DOTS, PagesPredictor, PageStats


def _sentence(q: torch.Tensor, k: torch.Tensor, qk: torch.Tensor, preds: Sequence[PagesPredictor], size: int,
              alpha: float, gamma: float, eps: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, H, m, m)`` edges and ``(C, H)`` costs of one sentence for ``preds``, all of page size ``size``.

    ``q``, ``k``: the sentence's float64 ``(H, m, d)``; ``qk`` = ``q @ k^T``. The arithmetic of
    :meth:`PagesPredictor._sentence`, line for line, with the shared parts computed once.
    """
    heads, m, d = q.shape
    gain = (alpha - 1.0) * gamma
    pages = PageStats(k, size)
    page_of = torch.arange(m, device=q.device) // size
    allowed = pages.allowed_keys(m, causal)  # (m, P)
    has_key = allowed > 0
    upper = gain * pages.box_dots(q)  # (H, m, P)
    slacks = sorted({float(p.slack) for p in preds})
    mean = pages.mean_dots(q) if any(s != 0 for s in slacks) else None
    estimate = {}
    for s in slacks:
        e = upper if s == 0 else (1 - s) * upper + s * gain * mean
        estimate[s] = e.masked_fill(~has_key, -math.inf)
    keys_with_page = has_key.sum(-1).double().sum()
    valid = torch.ones(m, m, dtype=torch.bool, device=q.device)
    if causal:
        valid = valid.tril()
    edges = torch.empty(len(preds), heads, m, m, dtype=torch.bool, device=q.device)
    cost = torch.empty(len(preds), heads, dtype=torch.float64, device=q.device)

    superset = [i for i, p in enumerate(preds) if p.sparsity is None]
    if superset:
        best = upper.masked_fill(~has_key, -math.inf).argmax(-1)  # (H, m)
        seed = (page_of[None, None, :] == page_of[None, :, None]) | (page_of[None, None, :] == best[..., None])
        seed &= valid
        z = gain * qk
        z_seed = z.masked_fill(~seed, -math.inf).reshape(heads * m, m)
        tau = _lower(entmax_threshold(z_seed, alpha), z_seed).reshape(heads, m)
        qn = q.norm(dim=-1)
        margin = (d + 8) * eps * gain * qn * k.norm(dim=-1).amax(-1, keepdim=True)  # (H, m)
        thr = (tau - margin)[..., None]
        sl = [float(preds[i].slack) for i in superset]
        keep_page = torch.stack([estimate[s] for s in sl]) > thr  # (S, H, m, P)
        inside = keep_page.gather(-1, page_of.expand(len(sl), heads, m, m))
        kept = torch.where(seed, z > thr, inside) & valid
        pairs = seed.sum((-1, -2)).double() + (kept & ~seed).sum((-1, -2)).double()
        dots = torch.tensor([BOUND_DOTS + (s > 0) for s in sl], dtype=torch.float64, device=q.device)
        edges[superset] = kept
        cost[superset] = pairs + (dots * keys_with_page)[:, None]

    row_keys = allowed.sum(-1).double()  # (m,)
    for s in slacks:  # the budgeted variant: one sort per slack, every sparsity from it
        budgeted = [i for i, p in enumerate(preds) if p.sparsity is not None and float(p.slack) == s]
        if not budgeted:
            continue
        order = torch.sort(estimate[s], dim=-1, descending=True, stable=True).indices  # (H, m, P)
        counts = allowed.expand(heads, m, -1).gather(-1, order).double()
        before = counts.cumsum(-1) - counts
        # Rounded first, as the predictor does (its comment: 0.3 * 10 must ask for 3 keys).
        budget = torch.stack([torch.ceil(torch.round((1.0 - float(preds[i].sparsity)) * row_keys, decimals=9))
                              for i in budgeted])  # (T, m)
        take_sorted = (before[None] < budget[:, None, :, None]) & (counts > 0)[None]  # (T, H, m, P)
        take = torch.zeros_like(take_sorted).scatter_(-1, order.expand_as(take_sorted), take_sorted)
        kept = take.gather(-1, page_of.expand(len(budgeted), heads, m, m)) & valid
        edges[budgeted] = kept
        cost[budgeted] = kept.sum((-1, -2)).double() + (BOUND_DOTS + (s > 0)) * keys_with_page
    return edges, cost


def _pages_counts(batch: _Batch, preds: list[Predictor]) -> Counts:
    """Counts of every ``pages`` configuration in ``preds`` on one batch (module docstring)."""
    b, h, n = batch.shape
    q, k = batch.inputs(type(preds[0]))
    q, k, lengths = check_inputs(q, k, batch.lengths)
    d = q.shape[-1]
    eps = torch.finfo(q.dtype).eps
    groups: dict[tuple[int, float, float], list[int]] = {}
    for i, p in enumerate(preds):
        assert isinstance(p, PagesPredictor)
        p._check_params()
        gamma = d**-0.5 if p.scaling is None else float(p.scaling)
        groups.setdefault((int(p.page_size), float(p.alpha), gamma), []).append(i)
    # The predictor's per-sentence inputs: contiguous float64 copies of the sentence alone.
    sentences = []
    for i, m in enumerate(lengths.tolist()):
        if m:
            qb = q[i, :, :m].to(torch.float64).contiguous()
            kb = k[i, :, :m].to(torch.float64).contiguous()
            sentences.append((i, m, qb, kb, qb @ kb.transpose(1, 2)))
    out = {key: torch.empty(len(preds), b, h, dtype=torch.float64 if key in _FLOAT_KEYS else torch.int64,
                            device=q.device) for key in _COUNT_KEYS}
    for (size, alpha, gamma), idx in groups.items():
        members = [preds[i] for i in idx]
        edges = torch.zeros(len(idx), b, h, n, n, dtype=torch.bool, device=q.device)
        cost = torch.zeros(len(idx), b, h, dtype=torch.float64, device=q.device)
        for i, m, qb, kb, qk in sentences:
            edges[:, i, :, :m, :m], cost[:, i] = _sentence(qb, kb, qk, members, size, alpha, gamma, eps, batch.causal)
        for j, p in enumerate(members):
            if p.window > 0 or p.global_tokens:  # the predictor's tail (Predictor._run): window/global edges
                e, c = _finish(edges[j], cost[j], batch, p.window, p.global_tokens)
                edges[j], cost[j] = e.expand(b, h, n, n), c
        counts = _dense_counts_many(edges, cost, batch)
        rows = torch.tensor(idx, device=q.device)
        for key in _COUNT_KEYS:
            out[key][rows] = counts[key].to(out[key].dtype)
    return out


GROUPED[PagesPredictor] = _pages_counts
