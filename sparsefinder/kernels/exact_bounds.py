r"""Certified-exact sparse alpha-entmax attention: score only the key blocks that *could* be in the support.

Scores, thresholds and the support, as dense attention defines them (docs/method.md §1):

.. math::
    s_{ij} = \gamma\, q_i \cdot k_j, \qquad z_{ij} = (\alpha - 1)\, s_{ij}, \qquad
    p_{ij} = [z_{ij} - \tau_i]_+^{1/(\alpha-1)}, \qquad \textstyle\sum_j p_{ij} = 1,

with :math:`\gamma` = ``scaling`` (default :math:`d^{-1/2}`), as :func:`entmax.entmax15`
(which halves its input) and :func:`entmax.entmax_bisect` (which multiplies by
:math:`\alpha - 1`) compute them.

**The lower bound** (proof in docs/method.md §8). For a subset :math:`S` of a row's keys let
:math:`\tau_S` solve :math:`\sum_{j \in S} [z_j - \tau]_+^{1/(\alpha-1)} = 1`. Adding keys can only
raise it: :math:`\tau_S \le \tau_T` for :math:`S \subseteq T`, so :math:`\tau_S \le \tau_i`. Every
key with :math:`z_{ij} \le \tau_S` is provably outside the support, and so is every key of a
block :math:`B` (centre :math:`c_B`, radius :math:`r_B = \max_{j \in B} \|k_j - c_B\|`) when

.. math:: U_{iB} = (\alpha - 1)\,\gamma\,(q_i \cdot c_B + \|q_i\|\, r_B) \;\ge\; \max_{j \in B} z_{ij}

is :math:`\le \tau_S` (Cauchy–Schwarz).

**The iteration**, per (sentence, head):

1. *Blocks.* Keys are clustered (a few Lloyd steps from evenly spaced keys,
   :math:`\lceil 2\sqrt{n_k}\rceil` centroids) and each cluster is cut into blocks of at most
   ``block_size`` keys.
2. *Seed.* Each query scores its cheap candidates :math:`S_0` (keys within ``window``, the
   first and last valid key with ``global_keys``, and any ``candidates`` given, e.g. the
   cascade predictor's :meth:`~sparsefinder.predictors.learned.cascade.Cascade.support`),
   and :math:`\tau_{\mathrm{lb}} = \tau_{S_0}`.
3. *Rounds.* Block :math:`B` is *needed* by query :math:`i` while :math:`U_{iB} + m_i > \tau_{\mathrm{lb}, i}`
   (:math:`m_i`: the rounding margin below). Each round scores, per query, its needed
   unscored blocks of largest bound (1, 2, 4, … per round: best first, so the query's own
   cluster usually comes first and raises :math:`\tau_{\mathrm{lb}}` before the others are
   looked at), keeps the keys above :math:`\tau_{\mathrm{lb}}` in a per-query *active set*, and
   recomputes :math:`\tau_{\mathrm{lb}}` over it. It stops when no block is needed. The
   (query, block) pairs of a round are grouped by block, so each block's keys meet all the
   queries that need it in one batched matmul (rows padded to a power of two; padding is
   computed but not counted as scored).
4. *Exact finish.* The active set then holds every key with :math:`z > \tau_{\mathrm{lb}}`, a
   superset of the support: 1.5-entmax on it by the project's exact kernel
   (:func:`~sparsefinder.kernels.entmax15.entmax15_fast`, sort-equivalent), other alpha by
   bisection in float64 (below), and :math:`o_i = \sum_j p_{ij} v_j`.

When the bounds prune nothing (equal keys, isotropic clusters in high dimension) every tile
gets scored: the result degrades to dense cost, never to a wrong answer.

**Robustness.** Thresholds are computed in float64 on the computed scores :math:`\tilde z`.
:math:`\tau_{\mathrm{lb}}` is lowered by :math:`10^{-12}(1 + \max|\tilde z|)` (float64 rounding of
the prefix sums). A block is skipped only when :math:`U_{iB} + m_i \le \tau_{\mathrm{lb}, i}` with
:math:`m_i = (d + 8)\,\epsilon\,(\alpha-1)\gamma\,\|q_i\| \max_j \|k_j\|` (:math:`\epsilon` of the
score dtype): a worst-case bound on the rounding of one computed dot product, so an unscored
key's *computed* score is below the threshold too. For :math:`\alpha \ne 1.5` (and 2, closed
form) the threshold is bisected 80 times in float64 on :math:`[\max z - 1, \max z - m^{1-\alpha}]`;
the lower end is kept, so its error is below :math:`2^{-80}` (far under float64's resolution of
:math:`\tau`): a key within that of :math:`\tau` would get :math:`p \le 2^{-80/(\alpha-1)}`, and
the support is otherwise decided exactly in float64.

**Cost.** ``pairs_scored``: the distinct valid (query, key) pairs whose score was computed
(seed pairs plus scored tiles). ``bound_evaluations``: query × block bounds, :math:`n_q n_k /`
``block_size`` dot products with centres (plus the clustering, :math:`O(n^{1.5} d)`), reported
apart because they are not pairs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from sparsefinder.kernels.entmax15 import entmax15_fast

DEFAULT_BLOCK_SIZE = 32
KMEANS_STEPS = 4
BISECT_STEPS = 80
ROW_CHUNK = 1 << 16  # query rows gathered per batched matmul (bounds the copies' memory)


class ExactAttention(NamedTuple):
    """What :func:`exact_sparse_entmax_attention` returns."""

    output: torch.Tensor
    """``(B, H, N_q, d_v)`` in ``v``'s dtype."""
    support: torch.Tensor
    """Sparse COO ``(B, H, N_q, N_k)``: the non-zero probabilities (float64)."""
    pairs_scored: torch.Tensor
    """``(B, H)`` int64: distinct valid (query, key) pairs whose score was computed."""
    bound_evaluations: torch.Tensor
    """``(B, H)`` int64: query × key-block bounds evaluated."""
    rounds: torch.Tensor
    """``(B, H)`` int64: rounds of tile scoring until no block could hold a support key."""


# ---------------------------------------------------------------------- thresholds (float64)


def entmax_threshold(z: torch.Tensor, alpha: float) -> torch.Tensor:
    r"""``(rows,)`` float64 :math:`\tau` with :math:`\sum_j [z_j - \tau]_+^{1/(\alpha-1)} = 1` over ``z`` ``(rows, m)``.

    ``z`` is float64 with ``-inf`` on empty slots; an empty row gives ``-inf``. Alpha 1.5 and 2
    by the sort-based closed forms (entmax15's and sparsemax's prefix formulas), others by
    bisection (the lower end of the final bracket, module docstring).
    """
    rows, m = z.shape
    if m == 0:
        return torch.full((rows,), -math.inf, dtype=torch.float64, device=z.device)
    top = z.amax(-1)
    empty = torch.isinf(top)
    top = torch.where(empty, torch.zeros_like(top), top)
    # Slots below max - 1 never reach the support (tau >= max z - 1 since p_max <= 1) and do not
    # change the prefix formulas: the empty ones go there, finite.
    zf = torch.where(torch.isinf(z), (top - 2)[:, None].expand_as(z), z)
    if alpha in (1.5, 2.0):
        zs, _ = torch.sort(zf - top[:, None], dim=-1, descending=True)
        rho = torch.arange(1, m + 1, device=z.device, dtype=torch.float64)
        mean = zs.cumsum(-1) / rho
        if alpha == 1.5:
            ss = rho * ((zs**2).cumsum(-1) / rho - mean**2)
            tau = mean - torch.sqrt(torch.clamp((1 - ss) / rho, min=0))
        else:
            tau = mean - 1 / rho
        support = (tau <= zs).sum(-1, keepdim=True).clamp(min=1)
        tau = tau.gather(-1, support - 1).squeeze(-1) + top
    else:
        beta = 1.0 / (alpha - 1.0)
        lo = top - 1.0
        hi = top - float(m) ** (1.0 - alpha)
        for _ in range(BISECT_STEPS):
            mid = (lo + hi) / 2
            f = torch.clamp(zf - mid[:, None], min=0).pow(beta).sum(-1)
            big = f >= 1
            lo = torch.where(big, mid, lo)
            hi = torch.where(big, hi, mid)
        tau = lo
    return torch.where(empty, torch.full_like(tau, -math.inf), tau)


def _lower(tau: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A certified lower bound of the threshold from its float64 value (prefix-sum rounding)."""
    scale = torch.where(torch.isinf(z), torch.zeros_like(z), z).abs().amax(-1) if z.shape[-1] else 0.0
    return tau - 1e-12 * (1 + scale)


# ---------------------------------------------------------------------- blocks


def _kmeans(x: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded Lloyd steps on ``x`` ``(n, d)``: ``(centroids (C, d), assignment (n,))``; init at evenly spaced rows."""
    n = x.shape[0]
    cent = x[torch.linspace(0, n - 1, n_clusters, device=x.device).round().long()].clone()
    assign = torch.zeros(n, dtype=torch.long, device=x.device)
    for _ in range(KMEANS_STEPS):
        assign = (x @ cent.T - 0.5 * (cent * cent).sum(-1)).argmax(-1)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=n_clusters).to(x.dtype)
        cent = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], cent)
    return cent, (x @ cent.T - 0.5 * (cent * cent).sum(-1)).argmax(-1)


def _cut(items: torch.Tensor, groups: torch.Tensor, size: int) -> torch.Tensor:
    """``items`` (n,) cut into rows of ``size``, each row within one group (padded with -1): ``(rows, size)``.

    A block that straddled two clusters would have the radius of both.
    """
    n = items.shape[0]
    if n == 0:
        return torch.full((1, size), -1, dtype=torch.long, device=items.device)
    order = torch.sort(groups, stable=True).indices
    items, groups = items[order], groups[order]
    counts = torch.bincount(groups)
    per = -(-counts // size)  # blocks per group
    first_block = torch.cumsum(per, 0) - per
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n, device=items.device) - start[groups]
    out = torch.full((int(per.sum()), size), -1, dtype=torch.long, device=items.device)
    out[first_block[groups] + slot // size, slot % size] = items
    return out


# ---------------------------------------------------------------------- one head


class _Head:
    """The iteration of the module docstring for one (sentence, head); attributes are its results."""

    def __init__(self, q, k, kvalid, alpha, scaling, window, global_keys, candidates, causal,
                 block_size, max_rounds) -> None:
        self.alpha = alpha
        nq, d = q.shape
        nk = k.shape[0]
        dev = q.device
        self.nq, self.nk = nq, nk
        self.causal = causal
        self.kvalid = kvalid
        self.gain = (alpha - 1.0) * scaling  # z = gain * (q . k)
        self.q, self.k = q, k
        eps = torch.finfo(q.dtype).eps
        valid_idx = kvalid.nonzero().squeeze(-1)
        nkv = valid_idx.numel()
        q64 = q.double()
        qn = q64.norm(dim=-1)
        kmax = float(k[valid_idx].double().norm(dim=-1).max()) if nkv else 0.0
        self.margin = (d + 8) * eps * abs(self.gain) * qn * kmax + 1e-300
        self.pairs_tiles = 0
        self.rounds = 0

        # Blocks of similar keys.
        kv = k[valid_idx].double()
        # 2 sqrt(n) centroids: more than the clusters there are, so that Lloyd's few steps rarely merge two.
        n_cl = max(1, min(nkv, math.ceil(2 * math.sqrt(max(nkv, 1))))) if nkv else 1
        if nkv:
            _, assign = _kmeans(kv, n_cl)
        else:
            assign = valid_idx
        self.kblocks = _cut(valid_idx, assign, block_size)  # (nb, bk)
        self.kb = k[self.kblocks.clamp(min=0)]  # (nb, bk, d): each block contiguous for the matmuls
        self.kok = (self.kblocks >= 0) & kvalid[self.kblocks.clamp(min=0)]
        nb = self.kblocks.shape[0]
        self.k_block_of = torch.full((nk,), -1, dtype=torch.long, device=dev)
        flat = self.kblocks.reshape(-1)
        self.k_block_of[flat[flat >= 0]] = torch.arange(flat.numel(), device=dev)[flat >= 0] // block_size

        # Block centres and radii (float64), and the bounds U (nq, nb).
        members = self.kblocks >= 0
        kb = k.double()[self.kblocks.clamp(min=0)] * members[..., None]
        centre = kb.sum(1) / members.sum(1).clamp(min=1)[:, None]
        radius = ((kb - centre[:, None]) * members[..., None]).norm(dim=-1).amax(-1)
        self.bound = self.gain * (q64 @ centre.T + qn[:, None] * radius[None, :])
        if not nkv:
            self.bound.fill_(-math.inf)
        if causal:  # a block whose first key lies after the query cannot hold an allowed key
            first = torch.where(members, self.kblocks, torch.full_like(self.kblocks, nk)).amin(-1)
            self.bound.masked_fill_(first[None, :] > torch.arange(nq, device=dev)[:, None], -math.inf)
        self.bound_evals = nq * nb
        # Blocks by decreasing bound, per query. The bounds are fixed and the threshold only rises, so the
        # blocks a query still needs are always a prefix of this order: a pointer replaces a top-k per round.
        self.sorted_bound, self.order = torch.sort(self.bound, dim=-1, descending=True, stable=True)
        self.taken = torch.zeros(nq, dtype=torch.long, device=dev)  # blocks scored: order[i, :taken[i]]
        self.finite = torch.isfinite(self.sorted_bound).sum(-1)  # blocks with an allowed key

        self._seed(window, global_keys, candidates, valid_idx)
        t = 1
        while max_rounds is None or self.rounds < max_rounds:
            if not self._round(t):
                break
            self.rounds += 1
            t *= 2

    # -- the pieces

    def _allowed(self, qi: torch.Tensor, kj: torch.Tensor) -> torch.Tensor:
        ok = (kj >= 0) & (qi >= 0)
        ok &= self.kvalid[kj.clamp(min=0)]
        if self.causal:
            ok &= kj <= qi
        return ok

    def _seed(self, window, global_keys, candidates, valid_idx) -> None:
        nq, dev = self.nq, self.q.device
        pos = torch.arange(nq, device=dev)
        cols = []
        if window > 0:
            half = window // 2
            cols.append(pos[:, None] + torch.arange(-half, half + 1, device=dev)[None, :])
        if global_keys and valid_idx.numel():
            cols.append(torch.stack([valid_idx[0], valid_idx[-1]]).expand(nq, 2))
        if candidates is not None:
            cols.append(candidates.long())
        idx = torch.cat(cols, -1) if cols else torch.zeros(nq, 0, dtype=torch.long, device=dev)
        idx = torch.where((idx >= 0) & (idx < self.nk), idx, torch.full_like(idx, -1))
        idx = torch.where(self._allowed(pos[:, None].expand_as(idx), idx), idx, torch.full_like(idx, -1))
        idx, _ = torch.sort(idx, dim=-1)
        dup = torch.zeros_like(idx, dtype=torch.bool)
        dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
        idx, _ = torch.sort(idx.masked_fill(dup, -1), dim=-1)  # sorted: _merge looks keys up in it
        s = torch.einsum("nd,nmd->nm", self.q, self.k[idx.clamp(min=0)]).double() * (self.gain / (self.alpha - 1))
        self.seed_idx = idx
        self.act_idx = idx
        self.act_s = s.masked_fill(idx < 0, -math.inf)
        self.tau_lb = torch.full((nq,), -math.inf, dtype=torch.float64, device=dev)
        self._update()

    def _update(self) -> None:
        """Recompute the lower bound over the active set (no key twice: :meth:`_merge` drops seed keys), then
        drop the keys at or below it, compacting each row to the front (a cumsum, no sort)."""
        idx, s = self.act_idx, self.act_s.masked_fill(self.act_idx < 0, -math.inf)
        z = s * (self.alpha - 1)
        self.tau_lb = torch.maximum(self.tau_lb, _lower(entmax_threshold(z, self.alpha), z))
        keep = z > self.tau_lb[:, None]
        width = int(keep.sum(-1).max()) if keep.numel() else 0
        pos = torch.where(keep, keep.long().cumsum(-1) - 1, torch.full_like(idx, width))
        out_idx = torch.full((idx.shape[0], width + 1), -1, dtype=torch.long, device=idx.device)
        out_s = torch.full((idx.shape[0], width + 1), -math.inf, dtype=torch.float64, device=idx.device)
        self.act_idx = out_idx.scatter_(-1, pos, torch.where(keep, idx, -1))[:, :width]
        self.act_s = out_s.scatter_(-1, pos, torch.where(keep, s, -math.inf))[:, :width]

    def _round(self, t: int) -> bool:
        """Score each query's next ``t`` needed blocks (largest bound first); False when none is needed."""
        # needed[i]: blocks whose bound + margin exceeds the lower bound, a prefix of order[i] (descending).
        thr = (self.tau_lb - self.margin).contiguous()
        needed = torch.searchsorted(-self.sorted_bound, -thr[:, None], side="left").squeeze(-1)
        # A block with no allowed key (bound -inf) is never needed.
        needed = torch.minimum(needed, self.finite)
        upto = torch.minimum(needed, self.taken + t)
        count = (upto - self.taken).clamp(min=0)
        if not bool((count > 0).any()):
            return False
        qi = torch.repeat_interleave(torch.arange(self.nq, device=count.device), count)
        offs = torch.arange(qi.numel(), device=qi.device) - (torch.cumsum(count, 0) - count)[qi]
        blocks = self.order[qi, self.taken[qi] + offs]
        self.taken = torch.maximum(self.taken, upto)
        # Group the (query, block) pairs by block; blocks with the same power-of-two count share one bmm.
        order = torch.sort(blocks, stable=True).indices
        qi, blocks = qi[order], blocks[order]
        counts = torch.bincount(blocks, minlength=self.kb.shape[0])
        slot = torch.arange(qi.numel(), device=qi.device) - (torch.cumsum(counts, 0) - counts)[blocks]
        width = torch.where(counts > 0, 2 ** torch.ceil(torch.log2(counts.clamp(min=1).double())).long(), 0)
        # The lower bound in the dot-product domain (gain > 0), lowered past the dtype's rounding.
        dot_thr = self.tau_lb / self.gain
        dot_thr = (dot_thr - dot_thr.abs() * 1e-5 - 1e-30).to(self.q.dtype)
        new_q, new_k, new_s = [], [], []
        for w in torch.unique(width[width > 0]).tolist():
            members = (width == w).nonzero().squeeze(-1)
            step = max(1, ROW_CHUNK // w)
            for start in range(0, members.numel(), step):
                mb = members[start:start + step]
                rank = torch.full((self.kb.shape[0],), -1, dtype=torch.long, device=qi.device)
                rank[mb] = torch.arange(mb.numel(), device=qi.device)
                sel = rank[blocks] >= 0
                table = torch.full((mb.numel(), w), -1, dtype=torch.long, device=qi.device)
                table[rank[blocks[sel]], slot[sel]] = qi[sel]
                sc = torch.bmm(self.q[table.clamp(min=0)], self.kb[mb].transpose(1, 2))  # (nb_w, w, bk) dots
                kbl, rok, kok = self.kblocks[mb], table >= 0, self.kok[mb]
                ok = rok[:, :, None] & kok[:, None, :]
                if self.causal:
                    ok &= kbl[:, None, :] <= table[:, :, None]
                    self.pairs_tiles += int(ok.sum())
                else:
                    self.pairs_tiles += int((rok.sum(1) * kok.sum(1)).sum())
                # A superset of the survivors in the dots' dtype, then the exact test in float64.
                ib, r, c = (ok & (sc > dot_thr[table.clamp(min=0)][:, :, None])).nonzero(as_tuple=True)
                q_sel, k_sel = table[ib, r], kbl[ib, c]
                s_sel = sc[ib, r, c].double() * (self.gain / (self.alpha - 1))
                keep = s_sel * (self.alpha - 1) > self.tau_lb[q_sel]
                new_q.append(q_sel[keep])
                new_k.append(k_sel[keep])
                new_s.append(s_sel[keep])
        self._merge(torch.cat(new_q), torch.cat(new_k), torch.cat(new_s))
        return True

    def _merge(self, qi: torch.Tensor, kj: torch.Tensor, s: torch.Tensor) -> None:
        """Add the flat (query, key, score) triples to the per-query active tables, then :meth:`_update`.

        A seed key is already in the table (scored again inside a block): it is dropped here.
        """
        if qi.numel() and self.seed_idx.shape[1]:
            seed = self.seed_idx[qi]
            at = torch.searchsorted(seed, kj[:, None]).clamp(max=seed.shape[1] - 1)
            fresh = seed.gather(-1, at).squeeze(-1) != kj
            qi, kj, s = qi[fresh], kj[fresh], s[fresh]
        if qi.numel():
            counts = torch.bincount(qi, minlength=self.nq)
            width = int(counts.max())
            order = torch.sort(qi, stable=True).indices
            qi, kj, s = qi[order], kj[order], s[order]
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(qi.numel(), device=qi.device) - starts[qi]
            add_idx = torch.full((self.nq, width), -1, dtype=torch.long, device=qi.device)
            add_s = torch.full((self.nq, width), -math.inf, dtype=torch.float64, device=qi.device)
            add_idx[qi, slot] = kj
            add_s[qi, slot] = s
            self.act_idx = torch.cat([self.act_idx, add_idx], -1)
            self.act_s = torch.cat([self.act_s, add_s], -1)
        self._update()

    def pairs_scored(self) -> int:
        """Distinct valid pairs scored: the tiles' plus the seed pairs outside every scored tile."""
        seed = self.seed_idx
        if seed.numel() == 0:
            return self.pairs_tiles
        kb = self.k_block_of[seed.clamp(min=0)]
        rank = torch.empty_like(self.order).scatter_(
            -1, self.order, torch.arange(self.order.shape[1], device=seed.device).expand_as(self.order).contiguous())
        inside = (rank.gather(-1, kb.clamp(min=0)) < self.taken[:, None]) & (kb >= 0)
        return self.pairs_tiles + int(((seed >= 0) & ~inside).sum())

    def probabilities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key index, p)`` tables over the final active set (a superset of the support), exact."""
        idx, s = self.act_idx, self.act_s
        if idx.shape[1] == 0:
            return idx, s
        if self.alpha == 1.5:
            # The project's exact kernel on the scores themselves (empty slots at the dtype's minimum, as
            # transformers masks), so the result is what dense entmax15 computes on the full row.
            x = self.q.dtype
            lowest = torch.finfo(x).min
            sx = torch.where(idx >= 0, s.to(x), torch.full_like(s, lowest, dtype=x))
            p = entmax15_fast(sx).double()
        else:
            z = s * (self.alpha - 1)
            tau = entmax_threshold(z, self.alpha)
            p = torch.clamp(z - tau[:, None], min=0).pow(1.0 / (self.alpha - 1))
            p = p / p.sum(-1, keepdim=True).clamp(min=1e-300)
        p = torch.where(idx >= 0, p, torch.zeros_like(p))
        return idx, p


# ---------------------------------------------------------------------- public


def exact_sparse_entmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: float = 1.5,
    scaling: float | None = None,
    window: int = 3,
    global_keys: bool = True,
    candidates: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_rounds: int | None = None,
) -> ExactAttention:
    r"""Alpha-entmax attention equal to the dense one, scoring only the key blocks its bounds cannot exclude.

    ``q`` ``(B, H, N_q, d)``, ``k`` ``(B, H, N_k, d)``, ``v`` ``(B, H, N_k, d_v)``; ``alpha > 1``
    (a float); ``scaling`` defaults to :math:`d^{-1/2}`. Seed candidates (speed only, never the
    result): keys with :math:`|i - j| \le \lfloor w/2 \rfloor` (``window``; 0: none), the first and
    last valid key (``global_keys``), and ``candidates`` ``(B, H, N_q, M)`` key indices (``-1``:
    none). ``key_padding_mask`` ``(B, N_k)`` bool, True on padding keys; ``causal``: only
    :math:`j \le i`. A query with no allowed key gets a zero output and an empty row.
    ``max_rounds`` (tests only) stops the iteration early, which voids the guarantee.

    Scores are computed in the inputs' dtype (float32 or float64), thresholds in float64; the
    result equals dense entmax attention on the same scores (module docstring).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, d); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if scaling is not None and not (isinstance(scaling, int | float) and 0 < scaling < math.inf):
        raise ValueError(f"scaling must be a positive number, got {scaling!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (1 < alpha < math.inf):
        raise ValueError(f"alpha must be a finite number > 1 (softmax has no zeros to skip), got {alpha!r}")
    for name, val, low in (("window", window, 0), ("block_size", block_size, 1)):
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            raise ValueError(f"{name} must be an int >= {low}, got {val!r}")
    batch, heads, n_q, d = q.shape
    n_k, d_v = k.shape[2], v.shape[-1]
    if candidates is not None and tuple(candidates.shape[:3]) != (batch, heads, n_q):
        raise ValueError(f"candidates must be (B, H, N_q, M), got {tuple(candidates.shape)}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, n_k):
        raise ValueError(f"key_padding_mask must be (B, N_k) = {(batch, n_k)}, got {tuple(key_padding_mask.shape)}")
    alpha = float(alpha)
    if scaling is None:
        scaling = d**-0.5
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    out = torch.zeros(batch, heads, n_q, d_v, dtype=torch.float64, device=dev)
    pairs = torch.zeros(batch, heads, dtype=torch.long)
    bounds = torch.zeros(batch, heads, dtype=torch.long)
    rounds = torch.zeros(batch, heads, dtype=torch.long)
    ind, vals = [], []
    for b in range(batch):
        kvalid = torch.ones(n_k, dtype=torch.bool, device=dev)
        if key_padding_mask is not None:
            kvalid = ~key_padding_mask[b].to(dev)
        for h in range(heads):
            cand = None if candidates is None else candidates[b, h]
            head = _Head(q[b, h].to(dtype), k[b, h].to(dtype), kvalid, alpha, float(scaling), window, global_keys,
                         cand, causal, block_size, max_rounds)
            idx, p = head.probabilities()
            if idx.shape[1]:
                vb = v[b, h].to(dtype)
                out[b, h] = torch.bmm(p.to(dtype)[:, None, :], vb[idx.clamp(min=0)])[:, 0].double()
            nz = (p > 0).nonzero(as_tuple=True)
            ind.append(torch.stack([torch.full_like(nz[0], b), torch.full_like(nz[0], h), nz[0], idx[nz]]))
            vals.append(p[nz])
            pairs[b, h] = head.pairs_scored()
            bounds[b, h] = head.bound_evals
            rounds[b, h] = head.rounds
    indices = torch.cat(ind, 1) if ind else torch.zeros(4, 0, dtype=torch.long, device=dev)
    values = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float64, device=dev)
    support = torch.sparse_coo_tensor(indices, values, size=(batch, heads, n_q, n_k),
                                      check_invariants=False).coalesce()
    return ExactAttention(out.to(v.dtype), support, pairs, bounds, rounds)
