r"""``pages``: page-level support estimates from per-page key statistics (docs/method.md §9).

The keys of each (sentence, head) are cut into *pages* of ``page_size`` consecutive tokens
(the last page of a sentence may be shorter). Each page :math:`P` keeps the coordinate-wise
minimum :math:`\underline{k}_P`, maximum :math:`\overline{k}_P` and mean :math:`\mu_P` of its
keys, so a query meets a page through two cheap numbers instead of :math:`|P|` scores. With
:math:`s_{ij} = \gamma\, q_i \cdot k_j` (:math:`\gamma` = ``scaling``, default :math:`d^{-1/2}`)
and :math:`z_{ij} = (\alpha - 1)\, s_{ij}` (docs/method.md §1, §8):

- the *box bound* :math:`U_{iP} = (\alpha-1)\gamma \sum_e \max(q_{ie}\underline{k}_{Pe},\,
  q_{ie}\overline{k}_{Pe}) \ge \max_{j \in P} z_{ij}` (each coordinate of :math:`k_j` lies in
  :math:`[\underline{k}_{Pe}, \overline{k}_{Pe}]`, and :math:`x \mapsto q_e x` is monotone);
- the *page mean* :math:`M_{iP} = (\alpha-1)\gamma\, q_i \cdot \mu_P`, the mean of the page's
  :math:`z_{ij}` (by linearity), an estimate and no bound;
- the *estimate* :math:`E_{iP} = (1 - \sigma) U_{iP} + \sigma M_{iP}`, :math:`\sigma` = ``slack``
  in :math:`[0, 1]`: the box bound itself at :math:`\sigma = 0`, the page mean at :math:`\sigma = 1`.

**Superset variant** (``sparsity=None``). Each query scores its seed set :math:`S_i` exactly:
the keys of its own page and of the page of largest box bound. Their threshold
:math:`\tau_{S_i}` lower-bounds the row's :math:`\tau_i` (docs/method.md §8: adding keys only
raises :math:`\tau`), so

.. math::
    \hat G_i = \{j \in S_i : z_{ij} + m_i > \tau_{S_i}\}
        \;\cup\; \{j \in P : P \cap S_i = \emptyset,\ E_{iP} + m_i > \tau_{S_i}\}.

With ``slack = 0`` every pruned key has :math:`z_{ij} \le \tau_i`: :math:`\hat G` contains the
support (recall 1). :math:`m_i = (d + 8)\,\epsilon\,(\alpha-1)\gamma\,\|q_i\|\max_j\|k_j\|`
(:math:`\epsilon` of the inputs' dtype) is a worst-case rounding of one dot product, so the
superset holds for a gold graph computed in the inputs' precision, not just in exact
arithmetic. ``slack > 0`` prunes pages whose estimate, not bound, falls below
:math:`\tau_{S_i}`: an approximation that trades recall for sparsity, monotonically (the
estimate decreases with :math:`\sigma`, since :math:`M_{iP} \le U_{iP}`).

**Budgeted variant** (``sparsity`` = :math:`s`). No seed set: per query, pages are taken by
decreasing estimate :math:`E_{iP}` (ties: lower page first) while fewer than
:math:`b_i = \lceil (1 - s)\, n_i \rceil` keys are kept, :math:`n_i` the row's valid keys. Whole
pages are kept, so a row's sparsity is at most :math:`s`; a lower :math:`s` keeps a superset.

Valid pairs as everywhere: real tokens only (pages are cut per sentence, on its own length),
and :math:`j \le i` when causal (a page starting after :math:`i` is skipped, and the seed set and
the budget count only allowed keys). Everything is computed per sentence in float64 on the
sentence's own (unpadded) tensors, so a sentence gets the same graph alone or in any batch.

**Cost** per (sentence, head), in pairs scored (dot products of dimension :math:`d`): every
(query, page) with an allowed key costs 2 for the box bound (:math:`q^+ \cdot \overline{k}_P +
q^- \cdot \underline{k}_P`) plus 1 for the page mean when ``slack > 0``; the superset variant
adds the allowed pairs of the seed sets :math:`|S_i|` and the kept pairs outside them
(:math:`|\hat G_i \setminus S_i|`); the budgeted variant adds the kept pairs :math:`|\hat G_i|`.
The page statistics themselves (:math:`O(n d)` per head) are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from sparsefinder.kernels.exact_bounds import _lower, entmax_threshold
from sparsefinder.predictors.base import CoreResult, Predictor, register
from sparsefinder.predictors.constraints import Constraint, Int, Real

PAGE_SIZES: tuple[int, ...] = (2, 4, 8, 16, 32)
"""Default page sizes: small ones too, since the default corpus averages 29 tokens (a 32-token page is a sentence)."""
SLACKS: tuple[float, ...] = (0.0, 0.5, 0.75, 0.9, 1.0)
"""Default slacks of the superset variant (0: certified)."""
SPARSITIES: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95)
"""Default targets of the budgeted variant."""
BUDGET_SLACK = 0.5
"""The slack (ranking estimate) of the budgeted points of the default grid."""
BOUND_DOTS = 2
"""Pairs-equivalent of one box bound (two dot products with the page's max and min)."""


class PageStats:
    """One sentence's pages, for every head: ``(H, n_pages, d)`` min, max and mean of the keys, float64."""

    def __init__(self, k: torch.Tensor, page_size: int) -> None:
        heads, m, d = k.shape
        n_pages = -(-m // page_size)
        pad = n_pages * page_size - m
        member = torch.arange(n_pages * page_size, device=k.device) < m
        kp = torch.cat([k, k.new_zeros(heads, pad, d)], 1).reshape(heads, n_pages, page_size, d)
        mp = member.reshape(1, n_pages, page_size, 1)
        self.low = torch.where(mp, kp, math.inf).amin(2)
        self.high = torch.where(mp, kp, -math.inf).amax(2)
        self.count = member.reshape(n_pages, page_size).sum(-1)  # (n_pages,) keys per page
        self.mean = (kp * mp).sum(2) / self.count[None, :, None].to(k.dtype)
        self.n_pages = n_pages
        self.page_size = page_size

    def box_dots(self, q: torch.Tensor) -> torch.Tensor:
        r"""``(H, n_q, n_pages)``: :math:`\sum_e \max(q_e \underline{k}_e, q_e \overline{k}_e)`."""
        return q.clamp(min=0) @ self.high.transpose(1, 2) + q.clamp(max=0) @ self.low.transpose(1, 2)

    def mean_dots(self, q: torch.Tensor) -> torch.Tensor:
        """``(H, n_q, n_pages)``: :math:`q \\cdot \\mu_P`."""
        return q @ self.mean.transpose(1, 2)

    def allowed_keys(self, m: int, causal: bool) -> torch.Tensor:
        """``(m, n_pages)`` int64: the keys of each page that query ``i`` may attend to."""
        if not causal:
            return self.count[None, :].expand(m, self.n_pages)
        start = torch.arange(self.n_pages, device=self.count.device) * self.page_size
        i = torch.arange(m, device=self.count.device)[:, None]
        return (i + 1 - start[None, :]).clamp(min=0).minimum(self.count[None, :])


@register
class PagesPredictor(Predictor):
    r"""Page-level support estimates: a certified superset (``sparsity=None``) or a key budget per query.

    See the module docstring for :math:`U`, :math:`M`, :math:`E`, the seed sets and the cost.
    ``q``, ``k`` are the raw queries and keys (``input_space = "raw"``), as for
    :class:`~sparsefinder.predictors.exact.ExactBoundsPredictor`; ``alpha`` and ``scaling`` must
    be the model's (1.5 and :math:`d^{-1/2}` for the default model) for the superset to be one.
    """

    name: ClassVar[str] = "pages"
    family: ClassVar[str] = "baseline"
    input_space: ClassVar[str] = "raw"
    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"page_size": PAGE_SIZES, "slack": SLACKS}
    """The superset points; :meth:`grid` adds the budgeted ones (``sparsity`` in :data:`SPARSITIES`)."""
    constraints: ClassVar[dict[str, Constraint]] = {
        "page_size": Int(1),
        "slack": Real(0, 1, text="lie in [0, 1]"),
        "sparsity": Real(0, 1, text="be None or lie in [0, 1]"),
        "alpha": Real(1, 1e6, low_open=True, finite=True, text="be a finite number > 1"),
        "scaling": Real(0, low_open=True, finite=True, text="be a positive number or None"),
    }

    def __init__(self, page_size: int = 16, slack: float = 0.0, sparsity: float | None = None, alpha: float = 1.5,
                 scaling: float | None = None, window: int = 0, global_tokens: bool = False) -> None:
        self._init_params(locals())

    @classmethod
    def grid(cls) -> list[dict[str, Any]]:
        """Superset points (page size × slack), then budgeted points (page size × sparsity, slack 0.5)."""
        superset = [{"page_size": p, "slack": s, "sparsity": None} for p in PAGE_SIZES for s in SLACKS]
        budget = [{"page_size": p, "slack": BUDGET_SLACK, "sparsity": s} for p in PAGE_SIZES for s in SPARSITIES]
        return superset + budget

    def _check_params(self) -> None:
        # Real does not take None: check the optional ones with a stand-in, then restore them.
        saved = self.scaling, self.sparsity
        self.scaling = 1.0 if self.scaling is None else self.scaling
        self.sparsity = 0.0 if self.sparsity is None else self.sparsity
        try:
            super()._check_params()
        finally:
            self.scaling, self.sparsity = saved

    def _core(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool) -> CoreResult:
        batch, heads, n, d = q.shape
        edges = torch.zeros(batch, heads, n, n, dtype=torch.bool, device=q.device)
        cost = torch.zeros(batch, heads, dtype=torch.float64, device=q.device)
        gamma = d**-0.5 if self.scaling is None else float(self.scaling)
        eps = torch.finfo(q.dtype).eps
        for b in range(batch):
            m = int(lengths[b])
            if m == 0:
                continue
            # Contiguous float64 copies of the sentence alone: the same arithmetic in any batch.
            qb = q[b, :, :m].to(torch.float64).contiguous()
            kb = k[b, :, :m].to(torch.float64).contiguous()
            edges[b, :, :m, :m], cost[b] = self._sentence(qb, kb, causal, gamma, eps)
        return edges, lambda: cost

    def _sentence(self, q: torch.Tensor, k: torch.Tensor, causal: bool, gamma: float, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H, m, m)`` edges and ``(H,)`` cost of one sentence's float64 ``(H, m, d)`` q, k."""
        heads, m, d = q.shape
        alpha, slack, size = float(self.alpha), float(self.slack), int(self.page_size)
        gain = (alpha - 1.0) * gamma
        pages = PageStats(k, size)
        pos = torch.arange(m, device=q.device)
        page_of = pos // size  # (m,) page of each token
        allowed = pages.allowed_keys(m, causal)  # (m, P)
        has_key = allowed > 0
        upper = gain * pages.box_dots(q)  # (H, m, P)
        estimate = upper if slack == 0 else (1 - slack) * upper + slack * gain * pages.mean_dots(q)
        estimate = estimate.masked_fill(~has_key, -math.inf)
        dots = BOUND_DOTS + (slack > 0)
        bound_cost = dots * has_key.sum(-1).double().sum()  # the same for every head
        valid = torch.ones(m, m, dtype=torch.bool, device=q.device)
        if causal:
            valid = valid.tril()
        if self.sparsity is not None:
            return self._budget(estimate, allowed, page_of, valid, bound_cost)

        # Seed sets: the query's own page and the page of largest box bound, scored exactly.
        best = upper.masked_fill(~has_key, -math.inf).argmax(-1)  # (H, m)
        seed = (page_of[None, None, :] == page_of[None, :, None]) | (page_of[None, None, :] == best[..., None])
        seed &= valid
        z = gain * (q @ k.transpose(1, 2))  # (H, m, m); only seed entries are read before the final mask
        z_seed = z.masked_fill(~seed, -math.inf).reshape(heads * m, m)
        tau = _lower(entmax_threshold(z_seed, alpha), z_seed).reshape(heads, m)
        qn = q.norm(dim=-1)
        margin = (d + 8) * eps * gain * qn * k.norm(dim=-1).amax(-1, keepdim=True)  # (H, m)
        thr = (tau - margin)[..., None]
        keep_page = estimate > thr  # (H, m, P)
        kept = torch.where(seed, z > thr, keep_page.gather(-1, page_of.expand(heads, m, m))) & valid
        pairs = seed.sum((-1, -2)).double() + (kept & ~seed).sum((-1, -2)).double()
        return kept, pairs + bound_cost

    def _budget(self, estimate: torch.Tensor, allowed: torch.Tensor, page_of: torch.Tensor, valid: torch.Tensor,
                bound_cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole pages by decreasing estimate while the row holds fewer than its budget of keys."""
        heads, m, _ = estimate.shape
        assert self.sparsity is not None
        row_keys = allowed.sum(-1).double()  # (m,)
        # Rounded first, so that (1 - 0.7) * 10 = 3.0000000000000004 asks for 3 keys, not 4.
        budget = torch.ceil(torch.round((1.0 - float(self.sparsity)) * row_keys, decimals=9))
        order = torch.sort(estimate, dim=-1, descending=True, stable=True).indices  # (H, m, P)
        counts = allowed.expand(heads, m, -1).gather(-1, order).double()
        before = counts.cumsum(-1) - counts  # keys kept by the better pages
        take_sorted = (before < budget[None, :, None]) & (counts > 0)
        take = torch.zeros_like(take_sorted).scatter_(-1, order, take_sorted)  # (H, m, P)
        kept = take.gather(-1, page_of.expand(heads, m, m)) & valid
        return kept, kept.sum((-1, -2)).double() + bound_cost
