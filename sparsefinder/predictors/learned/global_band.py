"""``global_band``: sub-quadratic global keys plus a learned band per head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from sparsefinder.graphs import valid_pair_mask
from sparsefinder.predictors.base import NotFittedError, register
from sparsefinder.predictors.learned.budgets import GLOBAL_RANKS, MAX_OFFSET, _BudgetPredictor, _Counts, token_hashes
from sparsefinder.predictors.learned.stacked import _global_rank

# ---------------------------------------------------------------------- sub-quadratic: global keys + band


@register
class GlobalBand(_BudgetPredictor):
    """Learned per-head diagonals (offsets) and global keys, kept in decreasing training precision (sub-quadratic)."""

    name: ClassVar[str] = "global_band"
    input_space: ClassVar[str] = "shape"
    context_keys: ClassVar[tuple[str, ...]] = ("tokens",)
    fitted_tensors: ClassVar[tuple[str, ...]] = (
        "thresholds_", "train_recall_", "key_hashes_", "key_prior_", "unit_precision_",
    )

    def __init__(self, sparsity: float = 0.7, budget: str = "per_head", prior_strength: float = 20.0,
                 seed: int = 0, window: int = 0, global_tokens: bool = False) -> None:
        self._init_params(locals())

    # unit_precision_ (H, U): diagonals j - i + K for |j - i| <= K, then global ranks 0..C-1, then first, last key.
    def _global_rank(self, lengths: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
        return _global_rank(self.key_hashes_, self.key_prior_, lengths, hashes)

    def _unit_ids(self, lengths: torch.Tensor, hashes: torch.Tensor, heads: int) -> list[torch.Tensor]:
        """Unit indices of each pair (-1: none): offset ``(N, N)``, global rank ``(B, H, 1, N)``, first/last key."""
        B, N = hashes.shape
        K2 = 2 * MAX_OFFSET + 1
        ranks = self._global_rank(lengths, hashes)
        rank_unit = torch.where(ranks < GLOBAL_RANKS, K2 + ranks, torch.full_like(ranks, -1))[:, :, None, :]
        pos = torch.arange(N)
        first = torch.where(pos == 0, K2 + GLOBAL_RANKS, -1)[None, None, None, :].expand(B, 1, 1, N)
        last = torch.where(pos[None] == (lengths - 1)[:, None], K2 + GLOBAL_RANKS + 1, -1)[:, None, None, :]
        # Only the 2K + 1 diagonals |j - i| <= K are units (a kernel enumerates each); farther pairs have none.
        rel = pos[None, :] - pos[:, None]
        diag = torch.where(rel.abs() <= MAX_OFFSET, rel + MAX_OFFSET, -1)
        return [diag[None, None], rank_unit, first, last]

    def _fit_model(self, q, k, lengths, gold, hashes, causal):
        B, H, N = q.shape[:3]
        counts = _Counts(H)
        for start in range(0, B, 64):
            sl = slice(start, start + 64)
            counts.add(gold[sl], lengths[sl], causal, hashes[sl])
        priors = counts.priors(float(self.prior_strength))
        self.key_hashes_, self.key_prior_ = priors["key_hashes"], priors["key_prior"]
        U = 2 * MAX_OFFSET + 1 + GLOBAL_RANKS + 2
        pairs = torch.zeros(H, U, dtype=torch.float64)
        hits = torch.zeros(H, U, dtype=torch.float64)
        for start in range(0, B, 64):
            sl = slice(start, start + 64)
            n = max(int(lengths[sl].max()), 1)
            valid = valid_pair_mask(lengths[sl], n, causal).expand(-1, H, n, n)
            g = gold[sl, :, :n, :n] & valid
            for ids in self._unit_ids(lengths[sl], hashes[sl, :n], H):
                ids = ids.expand(valid.shape)
                inside = valid & (ids >= 0)
                hidx = torch.arange(H)[None, :, None, None].expand(valid.shape)
                flat = (hidx * U + ids.clamp(min=0))[inside]
                pairs += torch.bincount(flat, minlength=H * U).double().view(H, U)
                hits += torch.bincount(flat, weights=g[inside].double(), minlength=H * U).view(H, U)
        self.unit_precision_ = (hits / pairs.clamp(min=1)).float()

    def _scores(self, q, k, lengths, causal, hashes):
        if self.unit_precision_ is None:
            raise NotFittedError("global_band is not fitted")
        B, H, N = q.shape[:3]
        prec = self.unit_precision_.double()
        z = torch.full((B, H, N, N), -1.0, dtype=torch.float64)
        for ids in self._unit_ids(lengths, hashes, H):
            ids = ids.expand(B, H, N, N)
            p = torch.gather(prec[None, :, None, :].expand(B, H, N, prec.shape[1]), -1, ids.clamp(min=0))
            z = torch.maximum(z, torch.where(ids >= 0, p, torch.full_like(p, -1.0)))
        return z

    def support(self, length: int, tokens: Sequence[str] | None = None) -> torch.Tensor:
        """``(H, n, M)`` key indices (``-1``: none) of one sentence's predicted graph, in :math:`O(n M)`.

        The sub-quadratic form of :meth:`predict` (without ``window`` and
        ``global_tokens``): per head, the offsets and global-key ranks whose
        precision clears the head's threshold, enumerated per query. (Causal
        masking, and the few pairs several units share, are left to the kernel.)
        """
        if not self.is_fitted():
            raise NotFittedError("global_band is not fitted")
        t = self.head_thresholds().float()
        prec = self.unit_precision_
        H = prec.shape[0]
        K2 = 2 * MAX_OFFSET + 1
        hashes = token_hashes(None if tokens is None else [tokens], 1, length)
        lengths = torch.tensor([length])
        chosen = prec >= t[:, None]  # (H, U)
        m_off = int(chosen[:, :K2].sum(1).max()) if H else 0
        m_glob = int(chosen[:, K2:].sum(1).max()) if H else 0
        pos = torch.arange(length)
        out = torch.full((H, length, m_off + m_glob), -1, dtype=torch.long)
        # Diagonals: key i + o for each chosen offset o.
        offs = torch.arange(-MAX_OFFSET, MAX_OFFSET + 1)
        for h in range(H):
            o = offs[chosen[h, :K2]]
            keys = pos[:, None] + o[None, :]
            keys = torch.where((keys >= 0) & (keys < length), keys, torch.full_like(keys, -1))
            out[h, :, : len(o)] = keys
        # Global keys: the top token priors (O(n log n) once per sentence and head), then first/last.
        ranks = self._global_rank(lengths, hashes)[0]  # (H, n)
        order = torch.argsort(ranks, dim=-1)  # position of rank 0, 1, ...
        for h in range(H):
            cols = []
            for c in range(GLOBAL_RANKS):
                if chosen[h, K2 + c] and c < length:
                    cols.append(int(order[h, c]))
            if chosen[h, K2 + GLOBAL_RANKS]:
                cols.append(0)
            if chosen[h, K2 + GLOBAL_RANKS + 1]:
                cols.append(length - 1)
            if cols:
                out[h, :, m_off: m_off + len(cols)] = torch.tensor(cols)[None, :]
        return out
