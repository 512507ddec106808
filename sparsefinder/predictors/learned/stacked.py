"""The stacked per-head models: pair features, a per-head logistic model on them (``stacked``),
and its prior-only variant (``priors``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from sparsefinder.graphs import real_tokens, valid_pair_mask
from sparsefinder.predictors.base import NotFittedError, register
from sparsefinder.predictors.clustering import sq_dists
from sparsefinder.predictors.constraints import Bool, Constraint, Int, Real
from sparsefinder.predictors.learned.budgets import (
    OUTSIDE,
    PRIOR_FEATURES,
    STACKED_FEATURES,
    _BudgetPredictor,
    _Counts,
    _lookup,
    _offsets,
    _row_ranks,
)

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


def _per_head(v: torch.Tensor) -> torch.Tensor:
    """An ``(H,)`` vector as ``(1, H, 1, 1)``, to broadcast against ``(B, H, N, N)`` features."""
    return v[None, :, None, None]


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
        z = _combine(feats, self.features, w, self.mean_, self.scale_, _per_head)
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
        z = self._feature_logits(feats)
        B, N = q.shape[0], q.shape[2]
        z = z.expand(B, H, N, N).double()
        if cand is not None:
            z = z.masked_fill(~cand, OUTSIDE)
        return z

    def _feature_logits(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float32 logits of the features of :func:`_feature_dict`, broadcastable to ``(B, H, N, N)``."""
        return _combine(feats, self.features, self.weight_, self.mean_, self.scale_, _per_head)

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
