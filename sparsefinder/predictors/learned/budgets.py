"""Per-head budgets over fitted training curves: the learned predictors' shared base, token priors,
``distance_budget`` and ``topk`` (the family is described in :mod:`sparsefinder.predictors.learned`)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from sparsefinder.graphs import AttentionGraph, real_tokens, valid_pair_mask
from sparsefinder.predictors.base import CoreResult, NotFittedError, Predictor, register
from sparsefinder.predictors.clustering import sq_dists
from sparsefinder.predictors.constraints import Constraint, Int, Options, Real
from sparsefinder.predictors.learned.calibration import CurveAccumulator, allocate_budgets

GRID_POINTS = 201
"""Densities :math:`0, 0.005, \\ldots, 1` at which fitted thresholds and training recall are stored."""
MAX_OFFSET = 16
"""Relative offsets :math:`j - i` beyond :math:`\\pm K` share one prior (and one unit per side)."""
GLOBAL_RANKS = 8
"""Global-key units of ``global_band``: the keys of the sentence's ``C`` largest token priors."""
CURVE_SENTENCES = 600
"""Training sentences (seeded subsample) whose curves give the thresholds; enough for 0.5% density steps."""
BUDGETS = ("per_head", "uniform")
OUTSIDE = -1e9
"""Score of pairs a cascade never scores (outside its candidates): below every threshold the fit can produce."""

STACKED_FEATURES = ("neg_dist", "rel_dist", "log_rank", "key_norm", "query_norm", "key_prior", "query_prior",
                    "offset_prior", "key_first", "key_last", "query_first", "query_last", "log_length")
PRIOR_FEATURES = ("key_prior", "query_prior", "offset_prior", "key_first", "key_last", "query_first",
                  "query_last", "log_length")


def token_hashes(tokens: Sequence[Sequence[str]] | None, batch: int, n: int) -> torch.Tensor:
    """``(B, N)`` int64 CRC-32 of each token's UTF-8 text; -1 on padding (and everywhere without ``tokens``)."""
    out = torch.full((batch, n), -1, dtype=torch.long)
    if tokens is None:
        return out
    if len(tokens) != batch:
        raise ValueError(f"tokens must list {batch} sentences, got {len(tokens)}")
    for b, sent in enumerate(tokens):
        row = [zlib.crc32(str(t).encode("utf-8")) for t in list(sent)[:n]]
        if row:
            out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _lookup(table_keys: torch.Tensor, table_values: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
    """``(B, H, N)`` values of ``hashes`` ``(B, N)`` in a table (``keys`` ``(V,)`` sorted, ``values`` ``(H, V + 1)``).

    Unseen tokens (and padding) get the last column, the head's base value.
    """
    V = table_keys.shape[0]
    pos = torch.searchsorted(table_keys, hashes.clamp(min=0)).clamp(max=max(V - 1, 0))
    hit = (table_keys[pos] == hashes) & (hashes >= 0) if V else torch.zeros_like(hashes, dtype=torch.bool)
    idx = torch.where(hit, pos, torch.full_like(pos, V))
    return table_values[:, idx].permute(1, 0, 2)  # (B, H, N)


def _offsets(n: int) -> torch.Tensor:
    """``(N, N)`` index of the clipped offset :math:`\\mathrm{clip}(j - i, -K, K) + K`."""
    pos = torch.arange(n)
    return (pos[None, :] - pos[:, None]).clamp(-MAX_OFFSET, MAX_OFFSET) + MAX_OFFSET


def _row_ranks(dist: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank (0 = nearest) of each key among the query's valid keys by distance; ties by position."""
    d = dist.masked_fill(~valid, math.inf)
    order = torch.sort(d, dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(d.shape[-1]).expand_as(order).contiguous())
    return ranks


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


class _Counts:
    """Per-head counts of valid pairs and gold edges by key token, query token, offset and global-key rank."""

    def __init__(self, heads: int) -> None:
        self.heads = heads
        self.key_tok: dict[int, np.ndarray] = {}
        self.query_tok: dict[int, np.ndarray] = {}
        self.offset = np.zeros((2, heads, 2 * MAX_OFFSET + 1))
        self.total = np.zeros((2, heads))

    @staticmethod
    def _add_tokens(table: dict[int, np.ndarray], hashes: np.ndarray, pairs: np.ndarray, gold: np.ndarray) -> None:
        # hashes (T,), pairs (T,), gold (T, H): group by token.
        uniq, inv = np.unique(hashes, return_inverse=True)
        p = np.bincount(inv, weights=pairs, minlength=len(uniq))
        g = np.stack([np.bincount(inv, weights=gold[:, h], minlength=len(uniq)) for h in range(gold.shape[1])], 1)
        for u, pu, gu in zip(uniq.tolist(), p, g, strict=True):
            cur = table.get(u)
            if cur is None:
                table[u] = np.concatenate([[pu], gu])
            else:
                cur[0] += pu
                cur[1:] += gu

    def add(self, gold: torch.Tensor, lengths: torch.Tensor, causal: bool, hashes: torch.Tensor) -> None:
        B, H, N, _ = gold.shape
        valid = valid_pair_mask(lengths, N, causal)[:, 0]  # (B, N, N)
        g = gold & valid[:, None]
        real = real_tokens(lengths, N)
        col_pairs = valid.sum(1).double()  # (B, N): valid queries of each key
        col_gold = g.sum(2).double()  # (B, H, N)
        row_pairs = valid.sum(2).double()
        row_gold = g.sum(3).double()
        hk = hashes[real].numpy()
        self._add_tokens(self.key_tok, hk, col_pairs[real].numpy(), col_gold.permute(0, 2, 1)[real].numpy())
        self._add_tokens(self.query_tok, hk, row_pairs[real].numpy(), row_gold.permute(0, 2, 1)[real].numpy())
        off = _offsets(N).expand(B, N, N)[valid]
        self.offset[0] += np.bincount(off.numpy(), minlength=2 * MAX_OFFSET + 1)
        gv = g.permute(0, 2, 3, 1)[valid]  # (P, H)
        for h in range(H):
            self.offset[1, h] += np.bincount(off.numpy(), weights=gv[:, h].double().numpy(),
                                             minlength=2 * MAX_OFFSET + 1)
        self.total[0] += float(valid.sum())
        self.total[1] += g.sum(dim=(0, 2, 3)).double().numpy()

    def priors(self, strength: float) -> dict[str, torch.Tensor]:
        """Smoothed logit priors: token tables (sorted hashes, ``(H, V + 1)`` values) and ``(H, 2K + 1)`` offsets."""
        base = self.total[1] / max(self.total[0, 0], 1.0)  # (H,)
        out: dict[str, torch.Tensor] = {}
        for name, table in (("key", self.key_tok), ("query", self.query_tok)):
            keys = np.array(sorted(table), dtype=np.int64)
            counts = np.stack([table[k] for k in keys]) if len(keys) else np.zeros((0, self.heads + 1))
            p = (counts[:, 1:] + strength * base[None]) / (counts[:, :1] + strength)  # (V, H)
            values = np.concatenate([p.T, base[:, None]], axis=1)
            out[f"{name}_hashes"] = torch.from_numpy(keys)
            out[f"{name}_prior"] = _logit(torch.from_numpy(values)).float()
        p_off = (self.offset[1] + strength * base[:, None]) / (self.offset[0, 0][None] + strength)
        out["offset_prior"] = _logit(torch.from_numpy(p_off)).float()
        return out


class _BudgetPredictor(Predictor):
    """Shared machinery: per-head thresholds from training curves at a target mean sparsity (module docstring)."""

    family: ClassVar[str] = "learned"
    requires_fit: ClassVar[bool] = True
    fit_uses_gold: ClassVar[bool] = True
    # The target sparsity only picks thresholds on the fitted curves.
    predict_only_params: ClassVar[frozenset[str]] = frozenset({"sparsity", "budget"})
    """:func:`sparsefinder.evaluation.sweep.fit_predictors` passes ``gold`` (and ``tokens``) to :meth:`fit`."""
    context_keys: ClassVar[tuple[str, ...]] = ()
    own_tensors: ClassVar[tuple[str, ...]] = ()
    fitted_tensors: ClassVar[tuple[str, ...]] = ("thresholds_", "train_recall_")

    sparsity: float
    budget: str
    seed: int
    thresholds_: torch.Tensor | None = None
    train_recall_: torch.Tensor | None = None

    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"sparsity": (0.5, 0.6, 0.7, 0.8, 0.9)}
    """Target mean sparsity ∈ {0.5, 0.6, 0.7, 0.8, 0.9}."""
    constraints: ClassVar[dict[str, Constraint]] = {
        "sparsity": Real(0.0, 1.0, text="be a number in [0, 1]"), "budget": Options(BUDGETS), "seed": Int(0),
    }

    def __init__(self, sparsity: float = 0.7, budget: str = "per_head", seed: int = 0, window: int = 0,
                 global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        t, r = state["thresholds"], state["train_recall"]
        if t.dim() != 2 or t.shape[1] != GRID_POINTS or r.shape != t.shape:
            raise ValueError(f"thresholds and train_recall must be (H, {GRID_POINTS}), got {tuple(t.shape)}, "
                             f"{tuple(r.shape)}")

    # -- what subclasses define -------------------------------------------------------------
    def _fit_model(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, gold: torch.Tensor,
                   hashes: torch.Tensor, causal: bool) -> None:
        """Learn the scorer's own state (priors, weights) from padded training data."""

    def _scores(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool,
                hashes: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, N)`` float64 pair scores (any value on invalid pairs)."""
        raise NotImplementedError

    # -- fit / predict -----------------------------------------------------------------------
    def _fit(self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, gold: AttentionGraph | None,
             tokens: Sequence[Sequence[str]] | None = None, causal: bool | None = None, chunk: int = 32,
             **kw: Any) -> None:
        """Learn the scorer and the per-head score quantiles on padded training ``queries``/``keys`` and ``gold``.

        ``fit(..., tokens=...)`` passes each sentence's token strings (for the token priors); ``causal``
        defaults to ``gold.causal``; ``chunk`` sentences are scored at a time for the curves.
        """
        if gold is None:
            raise ValueError(f"{type(self).__name__} learns from the gold graphs: pass gold=AttentionGraph(...)")
        from sparsefinder.predictors.base import check_inputs

        q, k, lengths = check_inputs(queries, keys, lengths, same_dim=self.input_space != "shape")
        B, H, N = q.shape[:3]
        if tuple(gold.edges.shape) != (B, H, N, N):
            raise ValueError(f"gold must be (B, H, N, N) = {(B, H, N, N)}, got {tuple(gold.edges.shape)}")
        causal = gold.causal if causal is None else causal
        hashes = token_hashes(tokens, B, N)
        g = gold.edges.cpu()
        self._fit_model(q, k, lengths, g, hashes, causal)
        # Curves on a seeded subsample of sentences (memory: every valid pair of them, per head).
        rng = np.random.default_rng([self.seed, 7])
        pick = np.sort(rng.permutation(B)[:CURVE_SENTENCES]) if B > CURVE_SENTENCES else np.arange(B)
        acc = CurveAccumulator(H)
        for start in range(0, len(pick), chunk):
            idx = torch.from_numpy(pick[start:start + chunk])
            n = max(int(lengths[idx].max()), 1)
            z = self._scores(q[idx, :, :n], k[idx, :, :n], lengths[idx], causal, hashes[idx, :n])
            acc.add(z, g[idx, :, :n, :n], lengths[idx], causal)
        grid = np.linspace(0.0, 1.0, GRID_POINTS)
        thresholds, recall = [], []
        for curve in acc.curves():
            thresholds.append([curve.threshold_at_density(x) for x in grid])
            recall.append(curve.recall_at_density(grid))
        self.thresholds_ = torch.tensor(np.array(thresholds), dtype=torch.float64)
        self.train_recall_ = torch.tensor(np.array(recall), dtype=torch.float64)

    def scores(self, q: torch.Tensor, k: torch.Tensor | None, lengths: torch.Tensor | Sequence[int],
               causal: bool = False, tokens: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
        """``(B, H, N, N)`` float64 pair scores (what the thresholds apply to; any value on invalid pairs)."""
        from sparsefinder.predictors.base import check_inputs

        self._check_params()
        if not self.is_fitted():
            raise NotFittedError(f"{type(self).__name__} must be fitted before scores")
        q, k, lengths = check_inputs(q, k, lengths, same_dim=self.input_space != "shape")
        return self._scores(q, k, lengths, causal, token_hashes(tokens, q.shape[0], q.shape[2]))

    def head_densities(self) -> np.ndarray:
        """Per-head target densities for ``sparsity`` and ``budget`` (a pure function of the fitted curves)."""
        if self.train_recall_ is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted")
        H = self.train_recall_.shape[0]
        target = 1.0 - float(self.sparsity)
        if self.budget == "uniform":
            return np.full(H, target)
        grid = np.linspace(0.0, 1.0, GRID_POINTS)
        return allocate_budgets(grid, self.train_recall_.numpy(), target)

    def head_thresholds(self) -> torch.Tensor:
        """``(H,)`` score thresholds :math:`t_h`: the training score quantile at each head's density."""
        assert self.thresholds_ is not None
        # The allocation costs ~10 ms per call (a hull per head): memoised on the exact inputs it reads
        # (the fitted tensors by identity, so a refit or load_state_dict misses; a deterministic value,
        # so two threads filling it at once store the same thing).
        key = (float(self.sparsity), self.budget)
        memo = self.__dict__.get("_thresholds_memo")
        if memo is not None and memo[0] == key and memo[1] is self.thresholds_ and memo[2] is self.train_recall_:
            return memo[3].clone()
        grid = np.linspace(0.0, 1.0, GRID_POINTS)
        dens = self.head_densities()
        out = []
        for h, d in enumerate(dens):
            # Thresholds fall with density; take the grid point at or above d (never denser than asked).
            m = min(int(np.searchsorted(grid, d - 1e-12, side="left")), GRID_POINTS - 1)
            out.append(float(self.thresholds_[h, m]))
        value = torch.tensor(out, dtype=torch.float64)
        self.__dict__["_thresholds_memo"] = (key, self.thresholds_, self.train_recall_, value)
        return value.clone()

    def _core(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool,
              **context: Any) -> CoreResult:
        H = q.shape[1]
        if self.thresholds_ is not None and self.thresholds_.shape[0] != H:
            raise ValueError(f"{type(self).__name__} was fitted for {self.thresholds_.shape[0]} heads, got {H}")
        hashes = token_hashes(context.get("tokens"), q.shape[0], q.shape[2])
        z = self._scores(q, k, lengths, causal, hashes)
        t = self.head_thresholds().to(z.device)
        return (z >= t[None, :, None, None]) & (z > OUTSIDE), None


# ---------------------------------------------------------------------- distance and top-k


@register
class DistanceBudget(_BudgetPredictor):
    """Projected distance :math:`-\\|q'_i - k'_j\\|^2` with per-head calibrated thresholds (module docstring)."""

    name: ClassVar[str] = "distance_budget"
    input_space: ClassVar[str] = "projected"

    def _scores(self, q, k, lengths, causal, hashes):
        return -sq_dists(q.float(), k.float())


@register
class TopK(_BudgetPredictor):
    """Per-query top-k nearest keys in the projected space; k set per head by the budget (module docstring)."""

    name: ClassVar[str] = "topk"
    input_space: ClassVar[str] = "projected"

    def _scores(self, q, k, lengths, causal, hashes):
        d = sq_dists(q.float(), k.float()).double()
        valid = valid_pair_mask(lengths, q.shape[2], causal)
        ranks = _row_ranks(d, valid.expand_as(d))
        return -ranks.double() - d / (1.0 + d)

class TokenContext:
    """Sweep context provider of ``tokens`` (each sentence's token strings, from the store) for learned predictors."""

    keys: tuple[str, ...] = ("tokens",)

    def __call__(self, batch: Any) -> dict[str, Any]:
        return {"tokens": [list(t) for t in batch.tokens]}
