r"""Fast path for ``pages``: every grid point of a batch from one set of page statistics per page size.

:class:`~sparsefinder.predictors.pages.PagesPredictor` works per sentence on the sentence's own
float64 tensors (its graph must not depend on the batch), one grid point at a time. This kernel
computes once what the grid points share, and only the parts whose rounding could depend on the
tensor layout per sentence, exactly as the predictor does:

- per sentence (the predictor's own calls on the same shapes, hence the same bits): the float64
  copies of :math:`q` and :math:`k`, :math:`q k^\top`, the norms; per page size :math:`p` the page
  statistics and the dot products of the box bound :math:`U` and of the page mean :math:`M`;
- the entmax thresholds :math:`\tau_{S_i}` of the seed sets, row by row, so rows of one width are
  stacked into one call whatever their sentence and page size (:func:`_seed_thresholds`);
- over the padded batch, for all sentences at once: everything elementwise (the estimate
  :math:`E = (1 - \sigma) U + \sigma M` per slack :math:`\sigma`, the seed sets, the margins, the
  comparisons :math:`E > \tau_{S_i} - m_i` for every slack at once) and the budgeted variant's sort
  of each row's pages by :math:`E` (padding pages are :math:`-\infty` and sort last, stably, so the
  real pages keep their order), shared by every sparsity, whose budgets are one broadcast.

Elementwise IEEE operations round the same whatever the shape, so the padded batch gives the
predictor's values wherever a sentence's tensors have them. Outside the seed sets both variants
keep whole pages, so the graphs are never built: edges, hits and covered queries are sums over
(query, page) pairs of the allowed and the gold keys per page, exact integers
(:func:`_page_counts`), and the mass is summed at the gold edges as everywhere in the sweep.
"""

from __future__ import annotations

import math

import torch

from sparsefinder.evaluation.sweep.batch import (
    _COUNT_KEYS,
    _FLOAT_KEYS,
    GROUPED,
    Counts,
    _Batch,
    _dense_counts,
    _finish,
    _last_sum,
)
from sparsefinder.kernels.exact_bounds import _lower, entmax_threshold
from sparsefinder.predictors.base import Predictor, check_inputs
from sparsefinder.predictors.pages import BOUND_DOTS, PagesPredictor, PageStats


def _allowed(lengths: torch.Tensor, n: int, size: int, causal: bool) -> torch.Tensor:
    """``(B, N, P)`` :meth:`PageStats.allowed_keys` of every sentence, 0 on padding pages."""
    n_pages = -(-n // size)
    start = torch.arange(n_pages, device=lengths.device) * size
    count = (lengths[:, None] - start[None, :]).clamp(min=0, max=size)  # (B, P) keys per page
    if not causal:
        return count[:, None, :].expand(-1, n, -1)
    i = torch.arange(n, device=lengths.device)[:, None]
    return (i + 1 - start[None, :]).clamp(min=0)[None].minimum(count[:, None, :])


class _PageSize:
    """Per-sentence dot products of one page size (and gain), gathered into padded batch tensors."""

    def __init__(self, b: int, h: int, n: int, size: int, alpha: float, gamma: float, device: torch.device) -> None:
        self.size, self.alpha, self.gain = size, alpha, (alpha - 1.0) * gamma
        n_pages = -(-n // size)
        self.box = torch.zeros(b, h, n, n_pages, dtype=torch.float64, device=device)
        self.mean = torch.zeros(b, h, n, n_pages, dtype=torch.float64, device=device)
        self.tau = torch.zeros(b, h, n, dtype=torch.float64, device=device)


def _page_sums(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(…, N, P)`` int32: True entries of a bool ``(…, N, N)`` tensor per page of ``size`` keys."""
    n = x.shape[-1]
    n_pages = -(-n // size)
    u = torch.nn.functional.pad(x.view(torch.uint8), (0, n_pages * size - n))
    return u.reshape(*x.shape[:-1], n_pages, size).sum(dim=-1, dtype=torch.int32)


_HALF = 16  # bits of the allowed-key count in a packed page weight (sentences are far shorter than 2^15)


def _page_counts(batch: _Batch, keep: torch.Tensor, pairs: torch.Tensor | None, weights: torch.Tensor,
                 gold_at: torch.Tensor | None) -> Counts:
    """Counts of ``C`` graphs that keep the allowed keys of page ``P`` of query ``i`` where ``keep`` ``(C, B, H, N, P)``
    (real queries only), plus the pairs ``pairs`` ``(B, H, N, N)`` (valid, none in a kept page) for every graph.
    ``weights`` ``(B, H, N, P)`` int32 packs the allowed keys of each (query, page) in its low
    :data:`_HALF` bits and its gold keys above them: one product and one sum give both row counts
    (exact: a row's sums stay below 2^15 each). ``gold_at`` is the flat (sentence, head, query, page)
    index of each gold edge.

    The edges are never built: edges, hits and covered queries are sums over pages (exact integers), and the
    mass sums each graph's gold probabilities at its gold edges in row-major order, as :func:`_dense_counts`.
    """
    c = keep.shape[0]
    b, h, n = batch.shape
    k = keep.view(torch.uint8)
    packed = (k * weights).sum(dim=-1, dtype=torch.int32)  # (C, B, H, N)
    row_pred = packed & ((1 << _HALF) - 1)
    row_hits = packed >> _HALF
    if pairs is not None:
        row_pred = row_pred + _last_sum(pairs, 1)
        row_hits = row_hits + _last_sum(pairs & batch.gold, 1)
    hits = row_hits.sum(dim=-1).long()
    covered = _last_sum((row_hits == batch.row_gold[None]) & batch.real[None, :, None, :], 1).long()
    pred = row_pred.sum(dim=-1).long()
    if gold_at is None:
        mass = torch.full((c, b, h), float("nan"), dtype=torch.float64, device=hits.device)
    else:
        at = keep.reshape(c, -1)[:, gold_at]  # (C, gold edges)
        if pairs is not None:
            at = at | pairs.reshape(-1)[batch.gold_index][None]
        key = batch.gold_segment[None] + torch.arange(c, device=at.device)[:, None] * (b * h)
        mass = torch.bincount(key.reshape(-1), weights=(batch.gold_p[None] * at).reshape(-1),
                              minlength=c * b * h).reshape(c, b, h)
    return {"pred_edges": pred, "hits": hits, "covered_queries": covered, "mass_hits": mass}


def _group_counts(batch: _Batch, preds: list[PagesPredictor], g: _PageSize, z: torch.Tensor, qn: torch.Tensor,
                  kmax: torch.Tensor, d: int, eps: float, seed: tuple[torch.Tensor, torch.Tensor] | None) -> Counts:
    r"""``(C, B, H)`` counts of ``preds`` (one page size and gain) over the padded batch; ``z`` = gain · q k^T.

    Both variants keep whole pages outside the seed sets, so each graph is a ``(C, B, H, N, P)``
    page mask (and, for the superset variant, the seed pairs that pass :math:`z > \tau_S - m`):
    the counts come from page sums (:func:`_page_counts`); only a configuration with window or
    global-token edges builds its dense graph (their union is not per page).
    """
    b, h, n = batch.shape
    dev = z.device
    real = batch.real[:, None, :, None]  # (B, 1, N, 1) real queries
    allowed = _allowed(batch.lengths, n, g.size, batch.causal)[:, None] * real  # (B, 1, N, P), 0 on padding
    has_key = allowed > 0
    page_of = torch.arange(n, device=dev) // g.size
    gold_pages = _page_sums(batch.gold, g.size)  # (B, H, N, P) gold keys of each query in each page
    gold_at = None
    if batch.probs is not None:  # (sentence, head, query, page) of each gold edge
        gold_at = batch.gold_index // n * allowed.shape[-1] + page_of[batch.gold_index % n]
    if n >= 1 << (_HALF - 1):
        raise ValueError(f"pages kernel: sentences of {n} tokens do not fit its packed counts")
    weights = allowed.to(torch.int32) + (gold_pages << _HALF)  # (B, H, N, P), see _page_counts
    gain = g.gain
    upper = gain * g.box
    slacks = sorted({float(p.slack) for p in preds})
    estimate = {}
    for s in slacks:
        e = upper if s == 0 else (1 - s) * upper + s * gain * g.mean
        estimate[s] = e.masked_fill(~has_key, -math.inf)
    # Bound cost per sentence: (query, page) pairs with an allowed key, over the real queries.
    keys_with_page = _last_sum(has_key, 2).double()  # (B, 1)
    n_pages = allowed.shape[-1]
    out = {key: torch.empty(len(preds), b, h, dtype=torch.float64 if key in _FLOAT_KEYS else torch.int64,
                            device=dev) for key in _COUNT_KEYS}

    def emit(rows: list[int], keep: torch.Tensor, pairs: torch.Tensor | None, scored: torch.Tensor,
             bounds: torch.Tensor) -> None:
        """Counts of ``rows``; cost = the predictor's pairs scored (``scored`` plus the kept pairs outside
        ``pairs``, the pairs it scored anyway) plus ``bounds`` (C, 1, 1) bound dot products per (query, page)."""
        counts = _page_counts(batch, keep, pairs, weights, gold_at)
        outside = counts["pred_edges"] if pairs is None else counts["pred_edges"] - _last_sum(pairs, 2)
        cost = (scored + outside).double() + bounds * keys_with_page
        counts["cost"] = cost
        for j, i in enumerate(rows):
            p = preds[i]
            if p.window > 0 or p.global_tokens:  # the predictor's tail (Predictor._run) on the dense graph
                edges = keep[j].gather(-1, page_of.expand(b, h, n, n)) & batch.valid
                if pairs is not None:
                    edges = edges | pairs
                e, c = _finish(edges, cost[j], batch, p.window, p.global_tokens)
                one = _dense_counts(e, c, batch)
                for key in _COUNT_KEYS:
                    out[key][i] = one[key][0]
            else:
                for key in _COUNT_KEYS:
                    out[key][i] = counts[key][j].to(out[key].dtype)

    superset = [i for i, p in enumerate(preds) if p.sparsity is None]
    if superset:
        assert seed is not None
        seeds, best = seed
        margin = (d + 8) * eps * gain * qn * kmax  # (B, H, N)
        thr = (g.tau - margin)[..., None]
        seed_pairs = seeds & (z > thr)  # the seed keys it keeps (seeds are valid pairs)
        # Pages outside the seed sets (the query's own page and the page of largest bound).
        pages = torch.arange(n_pages, device=dev)
        outside = (pages != page_of[:, None]) & (pages != best[..., None])  # (B, H, N, P)
        sl = [float(preds[i].slack) for i in superset]
        keep = torch.stack([estimate[s] > thr for s in sl]) & outside  # (S, B, H, N, P)
        dots = torch.tensor([BOUND_DOTS + (s > 0) for s in sl], dtype=torch.float64, device=dev)
        # The predictor's cost: every seed pair scored, the kept pairs outside the seeds, the bounds.
        emit(superset, keep, seed_pairs, _last_sum(seeds, 2).long(), dots[:, None, None])

    row_keys = allowed.sum(-1).double()  # (B, 1, N)
    for s in slacks:  # the budgeted variant: one sort per slack, every sparsity from it
        budgeted = [i for i, p in enumerate(preds) if p.sparsity is not None and float(p.slack) == s]
        if not budgeted:
            continue
        order = torch.sort(estimate[s], dim=-1, descending=True, stable=True).indices  # (B, H, N, P)
        counts = allowed.expand(b, h, n, -1).gather(-1, order).double()
        before = counts.cumsum(-1) - counts
        # Rounded first, as the predictor does (so that 0.3 * 10 asks for 3 keys, not 4).
        budget = torch.stack([torch.ceil(torch.round((1.0 - float(preds[i].sparsity)) * row_keys, decimals=9))
                              for i in budgeted])  # (T, B, 1, N)
        take_sorted = (before[None] < budget[..., None]) & (counts > 0)[None]  # (T, B, H, N, P)
        take = torch.zeros_like(take_sorted).scatter_(-1, order.expand_as(take_sorted), take_sorted)
        bounds = torch.full((len(budgeted), 1, 1), float(BOUND_DOTS + (s > 0)), dtype=torch.float64, device=dev)
        emit(budgeted, take, None, torch.zeros((), dtype=torch.long, device=dev), bounds)
    return out


def _seeds(batch: _Batch, g: _PageSize) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, H, N, N)`` seed sets: the query's own page and the page ``best`` ``(B, H, N)`` of largest box
    bound (the first on ties)."""
    n = batch.shape[2]
    has_key = _allowed(batch.lengths, n, g.size, batch.causal)[:, None] > 0
    best = (g.gain * g.box).masked_fill(~has_key, -math.inf).argmax(-1)  # (B, H, N)
    page_of = torch.arange(n, device=best.device) // g.size
    seed = (page_of[None, None, None, :] == page_of[None, None, :, None]) | (page_of[None, None, None, :] ==
                                                                              best[..., None])
    return seed & batch.valid, best


def _seed_rows(z: torch.Tensor, best: torch.Tensor, size: int, valid: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, 2 size)`` the seed scores ``z`` of each query: its own page's keys, then the best
    page's, -inf on invalid pairs (past the sentence, after the query when causal) and on the second
    copy when the best page is its own: the entries of the seed set, each once."""
    b, h, n = best.shape
    off = torch.arange(size, device=z.device)
    own_page = torch.arange(n, device=z.device) // size
    other = best[..., None] * size + off  # (B, H, N, size)
    own = (own_page[:, None] * size + off).expand_as(other)
    idx = torch.cat([own, other], dim=-1).clamp(max=n - 1)
    keep = torch.cat([own < n, (other < n) & (best != own_page)[..., None]], dim=-1)
    keep &= valid.expand(b, h, n, n).gather(-1, idx)
    return z.gather(-1, idx).masked_fill(~keep, -math.inf)


def _seed_thresholds(batch: _Batch, sizes: dict[tuple[int, float, float], _PageSize],
                     seeds: dict[tuple[int, float, float], tuple[torch.Tensor, torch.Tensor]],
                     scaled: dict[float, torch.Tensor],
                     sentences: list[tuple[int, int]]) -> None:
    r"""Fill each page size's ``tau``: the certified entmax threshold :math:`\tau_{S_i}` of every seed set.

    The threshold works row by row, so rows of one width are stacked into one call: every page size
    and every sentence of one length. For :math:`\alpha \in \{1.5, 2\}` it sorts each row and takes
    prefix sums; scores at or below :math:`\max - 2` (the row's -inf slots among them) never enter
    the support (for a prefix holding the maximum and such a score :math:`z_k`, the prefix formula's
    :math:`\tau_k > z_k`), and the scores above sort first in any row holding them, so the seed
    scores alone (:func:`_seed_rows`, width :math:`2p` instead of :math:`n`) give the same prefix
    sums and the same bits. Other :math:`\alpha` bisect over sums of the whole row: full rows.
    """
    b, h, n = batch.shape
    dev = batch.lengths.device
    full: dict[int, list[tuple[int, float, float]]] = {}  # length -> page sizes scored on full rows
    for key, (_, best) in seeds.items():
        g = sizes[key]
        width = 2 * g.size
        short = g.alpha in (1.5, 2.0)
        for _, m in sentences:
            if not short or m <= width:
                full.setdefault(m, [])
                if key not in full[m]:
                    full[m].append(key)
        if short:
            rows_of = (batch.lengths > width)[:, None, None] & batch.real[:, None, :]  # (B, 1, N)
            rows_of = rows_of.expand(b, h, n)
            if bool(rows_of.any()):
                rows = _seed_rows(scaled[g.gain], best, g.size, batch.valid)[rows_of]  # (R, 2p)
                g.tau[rows_of] = _lower(entmax_threshold(rows, g.alpha), rows)
    same_length: dict[int, list[int]] = {}
    for i, m in sentences:
        same_length.setdefault(m, []).append(i)
    for m, keys in full.items():
        ids = torch.tensor(same_length[m], device=dev)
        for alpha in sorted({key[1] for key in keys}):
            # A page of at least m keys holds the whole sentence: the seed set is every valid key, the
            # same rows for every such page size of one gain, scored once.
            same: dict[tuple[float, float] | tuple[int, float, float], list[tuple[int, float, float]]] = {}
            for key in keys:
                if key[1] == alpha:
                    same.setdefault((key[1], key[2]) if m <= key[0] else key, []).append(key)
            group = [members[0] for members in same.values()]
            rows = torch.cat([scaled[sizes[key].gain][ids, :, :m, :m].masked_fill(~seeds[key][0][ids, :, :m, :m],
                                                                                  -math.inf).reshape(-1, m)
                              for key in group])
            tau = _lower(entmax_threshold(rows, alpha), rows).reshape(len(group), len(ids), h, m)
            for j, members in enumerate(same.values()):
                for key in members:
                    sizes[key].tau[ids, :, :m] = tau[j]


def _pages_counts(batch: _Batch, preds: list[Predictor]) -> Counts:
    """Counts of every ``pages`` configuration in ``preds`` on one batch (module docstring)."""
    b, h, n = batch.shape
    q, k = batch.inputs(type(preds[0]))
    q, k, lengths = check_inputs(q, k, batch.lengths)
    d = q.shape[-1]
    eps = torch.finfo(q.dtype).eps
    dev = q.device
    groups: dict[tuple[int, float, float], list[int]] = {}
    for i, p in enumerate(preds):
        assert isinstance(p, PagesPredictor)
        p._check_params()
        gamma = d**-0.5 if p.scaling is None else float(p.scaling)
        groups.setdefault((int(p.page_size), float(p.alpha), gamma), []).append(i)
    sizes = {key: _PageSize(b, h, n, key[0], key[1], key[2], dev) for key in groups}
    qk = torch.zeros(b, h, n, n, dtype=torch.float64, device=dev)
    qn = torch.zeros(b, h, n, dtype=torch.float64, device=dev)
    kmax = torch.zeros(b, h, 1, dtype=torch.float64, device=dev)
    sentences = [(i, m) for i, m in enumerate(lengths.tolist()) if m]
    for i, m in sentences:
        # The predictor's inputs: contiguous float64 copies of the sentence alone.
        qb = q[i, :, :m].to(torch.float64).contiguous()
        kb = k[i, :, :m].to(torch.float64).contiguous()
        qk[i, :, :m, :m] = qb @ kb.transpose(1, 2)
        qn[i, :, :m] = qb.norm(dim=-1)
        kmax[i] = kb.norm(dim=-1).amax(-1, keepdim=True)
        stats: dict[int, PageStats] = {}
        for g in sizes.values():
            pages = stats.get(g.size)
            if pages is None:  # one set of page statistics per page size, whatever the gain
                pages = stats[g.size] = PageStats(kb, g.size)
            g.box[i, :, :m, : pages.n_pages] = pages.box_dots(qb)
            g.mean[i, :, :m, : pages.n_pages] = pages.mean_dots(qb)
    # The predictor's z = gain * (q k^T), once per distinct gain (elementwise: the same bits).
    scaled = {g.gain: g.gain * qk for g in sizes.values()}
    need_seed = {key: any(preds[i].sparsity is None for i in idx) for key, idx in groups.items()}
    seeds = {key: _seeds(batch, g) for key, g in sizes.items() if need_seed[key]}
    if seeds:
        _seed_thresholds(batch, sizes, seeds, scaled, sentences)
    out = {key: torch.empty(len(preds), b, h, dtype=torch.float64 if key in _FLOAT_KEYS else torch.int64,
                            device=dev) for key in _COUNT_KEYS}
    for key, idx in groups.items():
        counts = _group_counts(batch, [preds[i] for i in idx], sizes[key], scaled[sizes[key].gain], qn, kmax, d, eps,
                               seeds.get(key))
        rows = torch.tensor(idx, device=dev)
        for name in _COUNT_KEYS:
            out[name][rows] = counts[name]
    return out


GROUPED[PagesPredictor] = _pages_counts
