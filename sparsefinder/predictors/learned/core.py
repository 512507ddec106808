r"""Learned predictors with per-head budgets: beyond the paper's one-threshold-for-all recipe (issue #7).

Every predictor here *scores* each valid pair :math:`(i, j)` of a head
(higher: more likely a gold edge) and keeps, in head :math:`h`, the pairs with
:math:`z_{ij} \ge t_h`. The thresholds come from the training split:

- ``fit`` computes the scores of the training sentences and, per head, the
  recall–density curve (:class:`sparsefinder.predictors.learned.calibration.HeadCurve`); it stores
  the score quantile :math:`t_h(g)` and the training recall :math:`R_h(g)` at
  :data:`GRID_POINTS` densities :math:`g \in [0, 1]`;
- ``predict`` turns the target mean ``sparsity`` :math:`s` into per-head
  densities: ``budget="per_head"`` allocates them on the training curves
  (:func:`sparsefinder.predictors.learned.calibration.allocate_budgets`: mean density
  :math:`1 - s`, maximum summed recall), ``budget="uniform"`` gives every head
  :math:`1 - s`; then :math:`t_h = t_h(g_h)`.

So ``sparsity`` is a prediction-time knob: one fit serves the whole grid.

The scorers (all inputs ``(B, H, N, r)``; ``tokens`` is optional context, a
list of each sentence's token strings; without it every token counts as unseen):

- ``distance_budget``: :math:`z = -\|q'_i - k'_j\|^2` (the paper's distance
  predictor with calibrated per-head thresholds);
- ``topk``: per-query top-k nearest keys, :math:`z = -\mathrm{rank}_i(j) - \frac{D_{ij}}{1 + D_{ij}}`
  (the rank of key :math:`j` among query :math:`i`'s valid keys by distance;
  the second term only breaks ties between rows, so a threshold keeps the
  :math:`k` nearest keys of every query, and the :math:`(k+1)`-th of the rows
  where it is closest);
- ``priors``: a per-head logistic model over token-identity and relative-offset
  priors and position flags only (no projection; ``input_space = "shape"``);
- ``stacked``: a per-head logistic model over cheap pair features
  (:data:`STACKED_FEATURES`: projected distance, its value relative to the
  row's nearest key, its rank in the row, the squared norms of :math:`k'_j`
  and :math:`q'_i` (with the distance they give the dot product
  :math:`q'_i \cdot k'_j`), the priors, position flags, sentence length),
  fitted by Newton's method on the pointwise cross-entropy of a seeded sample
  of training pairs (a threshold per head ranks pairs across rows, which a
  pointwise loss calibrates directly);
- ``cascade``: sub-quadratic. The stacked model scored only on a bounded
  number of cheap candidates per query (a band of offsets, the sentence's
  global keys, at most ``max_cluster_keys`` keys of the key clusters the
  query's cluster attends to most): :meth:`Cascade.support` never touches
  all :math:`n^2` pairs;
- ``global_band``: sub-quadratic. Per head, *units* of edges that are cheap to
  enumerate: each relative offset :math:`o = j - i \in [-K, K]` (a diagonal),
  each *global key* rank :math:`c < C` (the key with the :math:`c`-th largest
  token prior of the sentence: [CLS], the full stop, ...), and the first and
  last key. The score of a pair is the best training precision of the units
  that contain it, :math:`z_{ij} = \max_{u \ni (i, j)} \mathrm{prec}_h(u)`, so
  thresholding keeps whole units in decreasing precision. A kernel enumerates
  :math:`O(n (|O_h| + |C_h|))` pairs per head (:meth:`GlobalBand.support`),
  never all :math:`n^2`.

Token priors: with :math:`c_h(t)` valid pairs whose key has token :math:`t` and
:math:`g_h(t)` of them gold, :math:`\mathrm{logit}\,\frac{g_h(t) + m p_h}{c_h(t) + m}`
(:math:`p_h` the head's gold density, :math:`m` = ``prior_strength``);
likewise per query token and per clipped offset. Tokens are keyed by a CRC-32
of their UTF-8 text, so the fitted state is tensors only (safetensors).
"""

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
from sparsefinder.predictors.constraints import Bool, Constraint, Int, Options, Real
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

    constraints: ClassVar[dict[str, Constraint]] = {
        "sparsity": Real(0.0, 1.0, text="be a number in [0, 1]"), "budget": Options(BUDGETS), "seed": Int(0),
    }

    def __init__(self, sparsity: float = 0.7, budget: str = "per_head", seed: int = 0, window: int = 0,
                 global_tokens: bool = False) -> None:
        self._init_params(locals())

    @classmethod
    def grid(cls) -> list[dict[str, Any]]:
        return [{"sparsity": s} for s in (0.5, 0.6, 0.7, 0.8, 0.9)]

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
    def fit(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        lengths: torch.Tensor,
        gold: AttentionGraph | None = None,
        tokens: Sequence[Sequence[str]] | None = None,
        causal: bool | None = None,
        chunk: int = 32,
        **kw: Any,
    ) -> _BudgetPredictor:
        """Learn the scorer and the per-head score quantiles on padded training ``queries``/``keys`` and ``gold``."""
        self._check_params()
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
        return self

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


# ---------------------------------------------------------------------- stacked per-head models


def _pair_features(names: Sequence[str], q: torch.Tensor | None, k: torch.Tensor | None, lengths: torch.Tensor,
                   causal: bool, hashes: torch.Tensor, priors: dict[str, torch.Tensor], heads: int,
                   candidates: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H, N, N, F)`` float32 features ``names`` (see :data:`STACKED_FEATURES`), stacked (for fitting)."""
    B, N = hashes.shape
    feats = _feature_dict(names, q, k, lengths, causal, hashes, priors, heads, candidates)
    return torch.stack([feats[n].expand(B, heads, N, N) for n in names], dim=-1)


def _combine(feats: dict[str, torch.Tensor], names: Sequence[str], weight: torch.Tensor, mean: torch.Tensor,
             scale: torch.Tensor, view: Any) -> torch.Tensor:
    r"""Logit :math:`b_h + \sum_f w_{hf} (x_f - \mu_{hf}) / \sigma_{hf}` with the standardisation folded in.

    Float32, one feature at a time in ``names`` order, each feature broadcast
    from its own shape (a key prior is one row per sentence): no
    ``(…, F)`` tensor, and the same bits whatever the batch or layout
    (``view`` reshapes an ``(H,)`` vector to broadcast against the features).
    """
    F = len(names)
    wf = (weight[:, :F].double() / scale.double()).float()
    bias = (weight[:, F].double() - (weight[:, :F].double() * mean.double() / scale.double()).sum(1)).float()
    z = view(bias)
    for i, name in enumerate(names):
        z = z + feats[name] * view(wf[:, i])
    return z


def _feature_dict(names: Sequence[str], q: torch.Tensor | None, k: torch.Tensor | None, lengths: torch.Tensor,
                  causal: bool, hashes: torch.Tensor, priors: dict[str, torch.Tensor], heads: int,
                  candidates: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Float32 features ``names`` (see :data:`STACKED_FEATURES`), each broadcastable to ``(B, H, N, N)``.

    Row-relative features (``rel_dist``, ``log_rank``) are relative to the
    valid keys of the row, or to its ``candidates`` ``(B, H, N, N)`` when given.
    """
    B, N = hashes.shape
    valid = valid_pair_mask(lengths, N, causal).expand(B, heads, N, N)
    if candidates is not None:
        valid = valid & candidates
    out: dict[str, torch.Tensor] = {}
    if q is not None and k is not None and ({"neg_dist", "rel_dist", "log_rank"} & set(names)):
        d = sq_dists(q.float(), k.float())
        row_min = d.masked_fill(~valid, math.inf).amin(-1, keepdim=True)
        row_min = torch.where(torch.isfinite(row_min), row_min, torch.zeros_like(row_min))
        out["neg_dist"] = -d
        out["rel_dist"] = -(d - row_min)
        if "log_rank" in names:
            out["log_rank"] = torch.log1p(_row_ranks(d, valid).float())
    if q is not None and k is not None and "key_norm" in names:
        out["key_norm"] = k.float().pow(2).sum(-1)[:, :, None, :]
        out["query_norm"] = q.float().pow(2).sum(-1)[:, :, :, None]
    if "key_prior" in names:
        out["key_prior"] = _lookup(priors["key_hashes"], priors["key_prior"], hashes)[:, :, None, :].float()
    if "query_prior" in names:
        out["query_prior"] = _lookup(priors["query_hashes"], priors["query_prior"], hashes)[:, :, :, None].float()
    if "offset_prior" in names:
        out["offset_prior"] = priors["offset_prior"][:, _offsets(N)][None].float()
    pos = torch.arange(N)
    last = (lengths - 1)[:, None]
    flags = {
        "key_first": (pos == 0)[None, None, None, :].expand(B, 1, 1, N),
        "key_last": (pos[None] == last)[:, None, None, :],
        "query_first": (pos == 0)[None, None, :, None].expand(B, 1, N, 1),
        "query_last": (pos[None] == last)[:, None, :, None],
    }
    for name, flag in flags.items():
        if name in names:
            out[name] = flag.float()
    if "log_length" in names:
        out["log_length"] = torch.log(lengths.clamp(min=1).float())[:, None, None, None]
    return out


class _Stacked(_BudgetPredictor):
    """A per-head logistic model over :attr:`features` (fitted by L-BFGS on a seeded sample of training pairs)."""

    features: ClassVar[tuple[str, ...]] = STACKED_FEATURES
    fitted_tensors: ClassVar[tuple[str, ...]] = (
        "thresholds_", "train_recall_", "key_hashes_", "key_prior_", "query_hashes_", "query_prior_",
        "offset_prior_", "mean_", "scale_", "weight_",
    )

    max_pairs: int
    prior_strength: float

    constraints: ClassVar[dict[str, Constraint]] = {
        "max_pairs": Int(1), "prior_strength": Real(0, low_open=True, text="be > 0"),
    }

    def _priors(self) -> dict[str, torch.Tensor]:
        return {"key_hashes": self.key_hashes_, "key_prior": self.key_prior_, "query_hashes": self.query_hashes_,
                "query_prior": self.query_prior_, "offset_prior": self.offset_prior_}

    def _fit_model(self, q, k, lengths, gold, hashes, causal):
        x, y, inside = self._sample_pairs(q, k, lengths, gold, hashes, causal)
        self.mean_ = x.mean(1).float()
        # Population std: one training pair (a one-token sentence) must give 0, not NaN, before the clamp.
        self.scale_ = x.std(1, correction=0).clamp(min=1e-6).float()
        xz = (x - self.mean_[:, None].double()) / self.scale_[:, None].double()
        self._fit_weights(xz, y, inside)

    def logits(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, hashes: torch.Tensor,
               causal: bool = False, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, H, N, N)`` float32 logits of the fitted per-head model, differentiable in ``q``, ``k`` and ``weight``.

        ``weight`` (default the fitted ``weight_``) replaces the logistic weights;
        the priors and the standardisation are the fitted ones; ``hashes`` from
        :func:`token_hashes`. What :mod:`sparsefinder.training.stacked` trains the projection through.
        """
        w = self.weight_ if weight is None else weight
        H = w.shape[0]
        cand = self._candidates(q, k, lengths, causal, hashes)
        feats = _feature_dict(self.features, q, k, lengths, causal, hashes, self._priors(), H, cand)
        z = _combine(feats, self.features, w, self.mean_, self.scale_, lambda v: v[None, :, None, None])
        return z.expand(q.shape[0], H, q.shape[2], k.shape[2])

    def _fit_weights(self, xz: torch.Tensor, y: torch.Tensor, inside: torch.Tensor) -> None:
        """Fit the scorer on standardised features ``xz`` ``(H, P, F)``, labels and candidate weights ``(H, P)``."""
        self.weight_ = _fit_logistic(xz, y, weight=inside).float()

    def _sample_pairs(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, gold: torch.Tensor,
                      hashes: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fit the priors (and :meth:`_fit_extra`), then a seeded sample ``(x, y, inside)`` float64 of training pairs.

        ``x`` ``(H, P, F)`` features, ``y`` ``(H, P)`` gold, ``inside`` ``(H, P)``
        whether the pair is a candidate (pairs outside are never scored, so they
        do not train the model either).
        """
        B, H, N = q.shape[:3]
        counts = _Counts(H)
        for start in range(0, B, 64):
            sl = slice(start, start + 64)
            counts.add(gold[sl], lengths[sl], causal, hashes[sl])
        for name, value in counts.priors(float(self.prior_strength)).items():
            setattr(self, f"{name}_", value)
        self._fit_extra(q, k, lengths, gold, causal)
        # A seeded sample of valid pairs, per head: from a seeded subset of sentences holding about
        # 3 x max_pairs pairs (features of every training pair would cost more than they add), a third each.
        total = float(counts.total[0, 0])
        rng = np.random.default_rng([self.seed, 11])
        n_sent = min(B, max(1, math.ceil(3 * self.max_pairs * B / max(total, 1.0))))
        subset = np.sort(rng.permutation(B)[:n_sent])
        sub_pairs = float(valid_pair_mask(lengths[subset], N, causal).sum())
        keep = min(1.0, self.max_pairs / max(sub_pairs, 1.0))
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        ws: list[torch.Tensor] = []
        for start in range(0, n_sent, 32):
            sl = torch.from_numpy(subset[start:start + 32])
            n = max(int(lengths[sl].max()), 1)
            cand = self._candidates(q[sl, :, :n], k[sl, :, :n], lengths[sl], causal, hashes[sl, :n])
            f = _pair_features(self.features, q[sl, :, :n], k[sl, :, :n], lengths[sl], causal, hashes[sl, :n],
                               self._priors(), H, cand)
            valid = valid_pair_mask(lengths[sl], n, causal)[:, 0]
            take = valid & (torch.rand(valid.shape, generator=gen) < keep)
            xs.append(f.permute(1, 0, 2, 3, 4)[:, take])  # (H, P, F)
            ys.append(gold[sl][:, :, :n, :n].permute(1, 0, 2, 3)[:, take])
            ws.append(torch.ones(H, int(take.sum()), dtype=torch.bool) if cand is None
                      else cand.permute(1, 0, 2, 3)[:, take])
        return torch.cat(xs, 1).double(), torch.cat(ys, 1).double(), torch.cat(ws, 1).double()

    def _fit_extra(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, gold: torch.Tensor,
                   causal: bool) -> None:
        """Fit what the candidates need (after the priors, before the model)."""

    def _candidates(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool,
                    hashes: torch.Tensor) -> torch.Tensor | None:
        """``(B, H, N, N)`` pairs the model scores (``None``: every valid pair)."""
        return None

    def _scores(self, q, k, lengths, causal, hashes):
        if self.weight_ is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted")
        H = self.weight_.shape[0]
        cand = self._candidates(q, k, lengths, causal, hashes)
        feats = _feature_dict(self.features, q, k, lengths, causal, hashes, self._priors(), H, cand)
        z = _combine(feats, self.features, self.weight_, self.mean_, self.scale_, lambda v: v[None, :, None, None])
        B, N = q.shape[0], q.shape[2]
        z = z.expand(B, H, N, N).double()
        if cand is not None:
            z = z.masked_fill(~cand, OUTSIDE)
        return z

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        super()._check_state(state)
        F = len(self.features)
        if state["weight"].shape[-1] != F + 1 or state["mean"].shape[-1] != F:
            raise ValueError(f"{type(self).__name__} state is for another feature set (expects {F} features)")


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-4, iters: int = 25,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""``(H, F + 1)`` weights (bias last) of per-head logistic regressions on ``x`` ``(H, P, F)``, ``y`` ``(H, P)``.

    Minimises the (``weight``-weighted, default 1) mean cross-entropy plus
    :math:`\lambda \|w_{1..F}\|^2` by Newton's method (iteratively reweighted
    least squares): with :math:`F \le 12` features the :math:`(F+1)^2` Hessian
    is tiny, so each step is one pass over the pairs. Stops when the step is
    below 1e-10 or after ``iters`` steps.
    """
    H, P, F = x.shape
    wt = torch.ones(H, P, dtype=torch.float64) if weight is None else weight.double()
    norm = wt.sum(1).clamp(min=1.0)[:, None]
    X = torch.cat([x.double(), torch.ones(H, P, 1, dtype=torch.float64)], -1)  # (H, P, F + 1)
    ridge = torch.full((F + 1,), 2 * l2, dtype=torch.float64)
    ridge[F] = 1e-9  # the bias is not penalised (a whisker keeps the Hessian invertible)
    w = torch.zeros(H, F + 1, dtype=torch.float64)
    for _ in range(iters if P else 0):
        z = (X * w[:, None, :]).sum(-1)
        p = torch.sigmoid(z)
        grad = (X * ((p - y.double()) * wt)[..., None]).sum(1) / norm + ridge * w
        s = (p * (1 - p) * wt)[..., None]
        hess = (X * s).transpose(1, 2) @ X / norm[..., None] + torch.diag(ridge)
        step = torch.linalg.solve(hess, grad)
        w = w - step
        if float(step.abs().max()) < 1e-10:
            break
    return w


@register
class Stacked(_Stacked):
    """Per-head logistic model over projected distance, its row-relative value and rank, and priors.

    ``row_rank=False`` drops the rank of the key in its row (``log_rank``), the
    one feature that needs a sort of every row: on the default model 3.3x
    cheaper at n = 512 (below the gold computation's cost) for 0.000 / 0.002
    less recall at sparsity 0.7 / 0.8 (README).
    """

    name: ClassVar[str] = "stacked"
    input_space: ClassVar[str] = "projected"
    context_keys: ClassVar[tuple[str, ...]] = ("tokens",)

    constraints: ClassVar[dict[str, Constraint]] = {"row_rank": Bool(text="be True or False")}

    def __init__(self, sparsity: float = 0.7, budget: str = "per_head", max_pairs: int = 60_000,
                 prior_strength: float = 20.0, row_rank: bool = True, seed: int = 0, window: int = 0,
                 global_tokens: bool = False) -> None:
        self._init_params(locals())

    @property  # type: ignore[override]
    def features(self) -> tuple[str, ...]:
        return STACKED_FEATURES if self.row_rank else tuple(f for f in STACKED_FEATURES if f != "log_rank")


@register
class Priors(_Stacked):
    """Token-identity and relative-offset priors and position flags only: no projection (module docstring)."""

    name: ClassVar[str] = "priors"
    input_space: ClassVar[str] = "shape"
    context_keys: ClassVar[tuple[str, ...]] = ("tokens",)
    features: ClassVar[tuple[str, ...]] = PRIOR_FEATURES

    def __init__(self, sparsity: float = 0.7, budget: str = "per_head", max_pairs: int = 60_000,
                 prior_strength: float = 20.0, seed: int = 0, window: int = 0, global_tokens: bool = False) -> None:
        self._init_params(locals())


def _global_rank(key_hashes: torch.Tensor, key_prior: torch.Tensor, lengths: torch.Tensor,
                 hashes: torch.Tensor) -> torch.Tensor:
    """``(B, H, N)`` rank of each real key by its token prior in the sentence (ties: earlier first)."""
    B, N = hashes.shape
    prior = _lookup(key_hashes, key_prior, hashes).double()  # (B, H, N)
    real = real_tokens(lengths, N)[:, None, :]
    prior = prior.masked_fill(~real, -math.inf)
    order = torch.sort(-prior, dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(N).expand_as(order).contiguous())
    return ranks


@register
class Cascade(_Stacked):
    r"""The stacked model scored only on a bounded set of cheap candidates per query: sub-quadratic.

    Candidates of query :math:`i` in head :math:`h` (at most
    :math:`M = 2b + 1 + g + 2 + m` per query, whatever :math:`n`):

    - the band :math:`|j - i| \le b` (``band``);
    - the :math:`g` (``n_global``) keys of the sentence with the largest token
      priors, and the first and last key;
    - at most :math:`m` (``max_cluster_keys``) keys from the clusters the
      query's cluster attends to, found through a two-level index. Queries and
      keys are clustered separately (``n_clusters`` k-means centroids each,
      per head, in the projected space): in a space trained to put a query
      near its keys the two still form separate clouds, so a shared
      clustering (the paper's) puts few gold pairs in one cluster. The
      affinity :math:`A_h[a, b]` is the training precision of (query cluster
      :math:`a`, key cluster :math:`b`). Query cluster :math:`a` lists the
      keys of its ``cluster_top`` key clusters of highest affinity, in that
      order, and within a key cluster nearest first to the query centroid
      :math:`\mu_a`, and keeps the first :math:`P` (``cluster_pool``): the
      *pool* of its queries (:meth:`cluster_lists`, :math:`O(C n \log n)` per
      head and sentence). Each query then takes the :math:`m` keys of its
      pool nearest to itself (:math:`O(P r + P \log P)` per query). For
      short sentences (at most :math:`m` keys in the attended clusters) that
      is every key of the attended clusters.

    Row-relative features are relative to the candidates. Cost per head:
    :math:`O(C n \log n + n P (r + \log P) + n M \log M)` (:meth:`support`),
    linear in :math:`n` for fixed :math:`C, P, M`, against :math:`O(n^2 d)` for
    :math:`q k^\top`. ``max_cluster_keys=0`` takes the whole pool and
    ``cluster_pool=0`` pools every key of the attended clusters; both 0 is the
    uncapped cascade (:math:`O(n^2 t / C)`).
    """

    name: ClassVar[str] = "cascade"
    input_space: ClassVar[str] = "projected"
    context_keys: ClassVar[tuple[str, ...]] = ("tokens",)
    fitted_tensors: ClassVar[tuple[str, ...]] = _Stacked.fitted_tensors + ("centroids_", "affinity_")

    constraints: ClassVar[dict[str, Constraint]] = {
        "band": Int(0), "n_global": Int(0), "n_clusters": Int(1), "cluster_top": Int(0),
        "max_cluster_keys": Int(0), "cluster_pool": Int(0),
    }

    def __init__(self, sparsity: float = 0.7, budget: str = "per_head", band: int = 4, n_global: int = 4,
                 n_clusters: int = 16, cluster_top: int = 4, max_cluster_keys: int = 32, cluster_pool: int = 128,
                 max_pairs: int = 60_000, prior_strength: float = 20.0, seed: int = 0, window: int = 0,
                 global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _fit_extra(self, q, k, lengths, gold, causal):
        from sparsefinder.predictors.clustering import fit_kmeans, make_generator

        gen = make_generator(int(np.random.SeedSequence([self.seed, 13]).generate_state(1)[0]))
        real = real_tokens(lengths, q.shape[2])
        cents = []
        for x in (q, k):
            pts = x.float().transpose(0, 1)[:, real]  # (H, T, r)
            if pts.shape[1] > 50_000:
                pts = pts[:, torch.randperm(pts.shape[1], generator=gen)[:50_000]]
            cents.append(fit_kmeans(pts, self.n_clusters, 20, gen).float())
        self.centroids_ = torch.stack(cents, 1)  # (H, 2, C, r): query centroids, key centroids
        H, C = q.shape[1], self.n_clusters
        pairs = torch.zeros(H, C * C, dtype=torch.float64)
        hits = torch.zeros(H, C * C, dtype=torch.float64)
        for start in range(0, q.shape[0], 64):
            sl = slice(start, start + 64)
            n = max(int(lengths[sl].max()), 1)
            valid = valid_pair_mask(lengths[sl], n, causal).expand(-1, H, n, n)
            unit = self.clusters(q[sl, :, :n], 0)[..., :, None] * C + self.clusters(k[sl, :, :n], 1)[..., None, :]
            flat = (torch.arange(H)[None, :, None, None] * C * C + unit)[valid]
            pairs += torch.bincount(flat, minlength=H * C * C).double().view(H, C * C)
            hits += torch.bincount(flat, weights=gold[sl, :, :n, :n][valid].double(),
                                   minlength=H * C * C).view(H, C * C)
        self.affinity_ = (hits / pairs.clamp(min=1)).view(H, C, C).float()

    def clusters(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """``(B, H, N)`` nearest query (``side=0``) or key (``side=1``) centroid of projected ``(B, H, N, r)``."""
        assert self.centroids_ is not None
        return sq_dists(x.float(), self.centroids_[None, :, side].float()).argmin(-1)

    def affinity_ranks(self) -> torch.Tensor:
        """``(H, C, C)`` rank of key cluster ``b`` in query cluster ``a``'s row (0: highest affinity; ties: lower b)."""
        assert self.affinity_ is not None
        order = torch.argsort(-self.affinity_, dim=-1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order).contiguous())
        return ranks

    def attended_clusters(self) -> torch.Tensor:
        """``(H, C, C)`` bool: the ``cluster_top`` key clusters of highest affinity for each query cluster."""
        return self.affinity_ranks() < min(self.cluster_top, self.affinity_.shape[-1])

    def cluster_lists(self, k: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, H, C, P)`` each query cluster's pool of keys (``-1``: none), in list order (class docstring).

        ``k``: projected keys ``(B, H, N, r)``; only real keys (``j < length``)
        are listed. :math:`O(C N \\log N)` per head and sentence.
        """
        assert self.centroids_ is not None
        B, H, N = k.shape[:3]
        C = self.centroids_.shape[2]
        top = min(self.cluster_top, C)
        m = N if self.cluster_pool == 0 else min(self.cluster_pool, N)
        if top == 0 or m == 0 or N == 0:
            return torch.full((B, H, C, 0), -1, dtype=torch.long)
        ck = self.clusters(k, 1)  # (B, H, N)
        ranks = self.affinity_ranks()  # (H, C, C)
        # rank_ak[b, h, a, j]: rank of key j's cluster in query cluster a's row.
        rank_ak = torch.gather(ranks[None].expand(B, H, C, C), 3, ck[:, :, None, :].expand(B, H, C, N))
        real = real_tokens(lengths, N)[:, None, None, :]
        eligible = (rank_ak < top) & real
        # Distances to the query centroids: the same per-dimension sum as sq_dists (bit-identical per sentence).
        dist = sq_dists(self.centroids_[None, :, 0].float().expand(B, H, C, k.shape[-1]), k.float())  # (B, H, C, N)
        # Lexicographic order (cluster rank, distance, position): stable sorts from the last key to the first.
        order = torch.sort(dist, dim=-1, stable=True).indices
        primary = torch.where(eligible, rank_ak, torch.full_like(rank_ak, C)).gather(-1, order)
        order = order.gather(-1, torch.sort(primary, dim=-1, stable=True).indices)[..., :m]
        return torch.where(eligible.gather(-1, order), order, torch.full_like(order, -1))

    def _candidates(self, q, k, lengths, causal, hashes):
        B, H, N = q.shape[:3]
        pos = torch.arange(N)
        band = ((pos[None, :] - pos[:, None]).abs() <= self.band)[None, None]
        ranks = _global_rank(self.key_hashes_, self.key_prior_, lengths, hashes)  # (B, H, N)
        glob = (ranks < self.n_global)[:, :, None, :]
        ends = ((pos[None] == 0) | (pos[None] == (lengths - 1)[:, None]))[:, None, None, :]
        near = self.nearest_in_pool(q, k, lengths)  # (B, H, N, m)
        linked = torch.zeros(B, H, N, N + 1, dtype=torch.bool)  # column N collects the -1 padding
        linked.scatter_(-1, torch.where(near >= 0, near, torch.full_like(near, N)), True)
        return band | glob | ends | linked[..., :N]

    def nearest_in_pool(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, m)`` the ``max_cluster_keys`` keys of each query's pool nearest to it (``-1``: none).

        Ties by order in the pool. :math:`O(N P r)` per head: never all pairs.
        """
        B, H, N, r = q.shape
        pool = self.cluster_lists(k, lengths)  # (B, H, C, P)
        P = pool.shape[-1]
        cq = self.clusters(q, 0)  # (B, H, N)
        mine = torch.gather(pool, 2, cq[..., None].expand(B, H, N, P))  # (B, H, N, P)
        m = P if self.max_cluster_keys == 0 else min(self.max_cluster_keys, P)
        if m == P:
            return mine
        kj = k.float()[torch.arange(B)[:, None, None, None], torch.arange(H)[None, :, None, None], mine.clamp(min=0)]
        d = torch.zeros(mine.shape, dtype=torch.float32)
        for e in range(r):  # in order, as sq_dists
            d += (q[..., None, e].float() - kj[..., e]) ** 2
        d = d.masked_fill(mine < 0, math.inf)
        # top-k, not a sort of the whole pool (4x faster); exact float ties at the m-th place are the only
        # case where the choice could depend on the layout: distances of distinct real vectors.
        near = torch.topk(d, m, dim=-1, largest=False, sorted=False).indices
        return torch.gather(mine, -1, torch.sort(near, dim=-1).values)

    def support(self, q: torch.Tensor, k: torch.Tensor, tokens: Sequence[str] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""One sentence's predicted graph without touching all pairs: ``(H, n, M)`` key indices and a keep mask.

        ``q``, ``k``: ``(H, n, r)`` projected vectors. Per query the band
        offsets, the global and end keys and the nearest keys of its pool
        (:meth:`nearest_in_pool`) are enumerated, deduplicated by a sort of each
        row, scored by the stacked model on those pairs only, and kept above
        the head's threshold: :math:`O(C n \log n + n P r + n M \log M)` with
        :math:`M = 2b + 3 + g + m`. The same edges as :meth:`predict` (without
        ``window``/``global_tokens``; non-causal).
        """
        if not self.is_fitted():
            raise NotFittedError("cascade is not fitted")
        H, n, r = q.shape
        lengths = torch.tensor([n])
        hashes = token_hashes(None if tokens is None else [tokens], 1, n)
        pos = torch.arange(n)
        offs = torch.arange(-self.band, self.band + 1)
        band = (pos[:, None] + offs[None, :]).expand(H, n, len(offs))
        ranks = _global_rank(self.key_hashes_, self.key_prior_, lengths, hashes)[0]  # (H, n)
        g = min(self.n_global, n)
        glob = torch.topk(-ranks, g, dim=-1).indices if g else torch.zeros(H, 0, dtype=torch.long)
        ends = torch.tensor([0, n - 1])
        fixed = torch.cat([glob, ends.expand(H, 2)], -1)[:, None, :].expand(H, n, g + 2)
        linked = self.nearest_in_pool(q[None], k[None], lengths)[0]  # (H, n, m)
        idx = torch.cat([band, fixed, linked], -1)
        idx = torch.where((idx >= 0) & (idx < n), idx, torch.full_like(idx, -1))
        idx, _ = torch.sort(idx, dim=-1)
        dup = torch.zeros_like(idx, dtype=torch.bool)
        dup[..., 1:] = idx[..., 1:] == idx[..., :-1]
        idx = idx.masked_fill(dup, -1)
        ok = idx >= 0
        safe = idx.clamp(min=0)
        # Features of the candidate pairs only (the order of STACKED_FEATURES).
        kj = k.float()[torch.arange(H)[:, None, None], safe]  # (H, n, M, r)
        d = torch.zeros(idx.shape, dtype=torch.float32)
        for e in range(r):  # in order, as sq_dists: the same distances as predict, bit for bit
            d += (q[:, :, None, e].float() - kj[..., e]) ** 2
        d = d.masked_fill(~ok, math.inf)
        row_min = d.amin(-1, keepdim=True)
        rank = torch.argsort(torch.argsort(d, dim=-1, stable=True), dim=-1)
        kp = _lookup(self.key_hashes_, self.key_prior_, hashes)[0].float()  # (H, n)
        qp = _lookup(self.query_hashes_, self.query_prior_, hashes)[0].float()
        off = (safe - pos[None, :, None]).clamp(-MAX_OFFSET, MAX_OFFSET) + MAX_OFFSET
        heads = torch.arange(H)[:, None, None]
        flag_q = torch.zeros(1, n, 1)
        feats = {
            "neg_dist": -d, "rel_dist": -(d - row_min), "log_rank": torch.log1p(rank.float()),
            "key_norm": k.float().pow(2).sum(-1)[heads, safe],
            "query_norm": q.float().pow(2).sum(-1)[:, :, None],
            "key_prior": kp[heads, safe],
            "query_prior": qp[:, :, None],
            "offset_prior": self.offset_prior_.float()[heads, off],
            "key_first": (safe == 0).float(), "key_last": (safe == n - 1).float(),
            "query_first": flag_q.index_fill(1, torch.tensor([0]), 1.0),
            "query_last": flag_q.index_fill(1, torch.tensor([n - 1]), 1.0),
            "log_length": torch.log(torch.tensor(float(n))),
        }
        z = _combine(feats, self.features, self.weight_, self.mean_, self.scale_, lambda v: v[:, None, None])
        keep = ok & (z >= self.head_thresholds()[:, None, None])
        return idx, keep


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


class TokenContext:
    """Sweep context provider of ``tokens`` (each sentence's token strings, from the store) for learned predictors."""

    keys: tuple[str, ...] = ("tokens",)

    def __call__(self, batch: Any) -> dict[str, Any]:
        return {"tokens": [list(t) for t in batch.tokens]}
