r"""Recall at matched sparsity: per-head thresholds on a pair score, calibrated exactly, and budget allocation.

A *scorer* gives every valid pair :math:`(i, j)` of a sentence a real score
:math:`z_{ij}` (higher: more likely a gold edge). Keeping the pairs with
:math:`z_{ij} \ge t_h` in head :math:`h` gives a graph; the project's metrics
are *macro* means over sentences (docs/method.md §2), so with :math:`S` sentences,
:math:`V_s` valid pairs and :math:`G_s` gold edges in sentence :math:`s`,

.. math::
    \mathrm{sparsity}_h(t) = 1 - \frac{1}{S}\sum_s \frac{|\{(i,j) \in V_s : z_{ij} \ge t\}|}{V_s},
    \qquad
    \mathrm{recall}_h(t) = \frac{1}{S}\sum_s \frac{|\{(i,j) \in G_s : z_{ij} \ge t\}|}{G_s}.

Both are sums of per-pair weights :math:`w_p = 1/(S V_s)` (density) and
:math:`u_p = [p \in G]/(S G_s)` (recall) over the kept pairs. Sorting a head's
pairs by decreasing score and taking cumulative sums of both weights gives its
whole recall–density curve (:class:`HeadCurve`): keeping the first :math:`m`
pairs is exactly the threshold :math:`t = z_{(m)}`. A density between two
consecutive pairs is reached by linear interpolation (the expected value when
the boundary pair is kept with that probability), so a calibrated head lands
within one edge of its target; pairs with equal scores enter together and are
interpolated as one step (random tie-breaking in expectation).

*Budgets.* "Recall at matched mean sparsity :math:`s`" (mean over heads) is
reported three ways:

- one threshold for every head (:func:`recall_at_global_threshold`, only
  meaningful when scores are comparable across heads, e.g. distances);
- one budget for every head: each head calibrated to sparsity :math:`s`;
- per-head budgets :math:`d_h` (densities) with :math:`\frac1H\sum_h d_h = 1 - s`,
  chosen on *training* curves to maximise :math:`\sum_h R_h(d_h)`
  (:func:`allocate_budgets`: greedy over the segments of each head's upper
  concave hull, sorted by slope, which is optimal for concave curves), then
  applied on the evaluation split by calibrating each head to its own
  :math:`d_h` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparsefinder.graphs import num_valid_pairs, valid_pair_mask

__all__ = [
    "CurveAccumulator",
    "HeadCurve",
    "allocate_budgets",
    "concave_hull",
    "recall_at_global_threshold",
    "recall_at_sparsity",
]


@dataclass
class HeadCurve:
    """One head's recall–density curve over a set of sentences (see the module docstring).

    ``density[m]``, ``recall[m]``: mean over sentences after keeping the pairs of
    the first ``m`` tie groups in decreasing score order (``density[0] = 0``);
    ``threshold[m]`` the score of group ``m`` (``threshold[0] = +inf``).
    ``recall_floor`` is the recall of sentences without gold edges (counted as 1).
    """

    density: np.ndarray
    recall: np.ndarray
    threshold: np.ndarray

    @classmethod
    def from_pairs(cls, score: np.ndarray, density_w: np.ndarray, recall_w: np.ndarray,
                   recall_floor: float = 0.0) -> HeadCurve:
        score = np.asarray(score, np.float64)
        order = np.argsort(-score, kind="stable")
        s = score[order]
        cd = np.cumsum(np.asarray(density_w, np.float64)[order])
        cr = np.cumsum(np.asarray(recall_w, np.float64)[order])
        # Keep only the last pair of each tie group: equal scores enter together.
        last = np.ones(len(s), bool)
        if len(s) > 1:
            last[:-1] = s[1:] != s[:-1]
        return cls(
            density=np.concatenate([[0.0], cd[last]]),
            recall=np.concatenate([[recall_floor], cr[last] + recall_floor]),
            threshold=np.concatenate([[np.inf], s[last]]),
        )

    def recall_at_density(self, density: float | np.ndarray) -> np.ndarray:
        """Recall when calibrated to mean density ``density`` (linear between tie groups)."""
        return np.interp(density, self.density, self.recall)

    def threshold_at_density(self, density: float) -> float:
        """The score threshold whose kept set first reaches ``density`` (calibration of a deployed predictor)."""
        m = int(np.searchsorted(self.density, density - 1e-12, side="left"))
        return float(self.threshold[min(m, len(self.threshold) - 1)])

    def density_at_threshold(self, t: float | np.ndarray) -> np.ndarray:
        """Mean density of keeping every pair with score ``>= t``."""
        # threshold is decreasing; count the groups with threshold >= t.
        m = np.searchsorted(-self.threshold, -np.asarray(t, np.float64), side="right") - 1
        return self.density[np.clip(m, 0, len(self.density) - 1)]

    def recall_at_threshold(self, t: float | np.ndarray) -> np.ndarray:
        m = np.searchsorted(-self.threshold, -np.asarray(t, np.float64), side="right") - 1
        return self.recall[np.clip(m, 0, len(self.recall) - 1)]

    def compress(self, points: int = 4001) -> HeadCurve:
        """The same curve keeping only the groups nearest to ``points`` equally spaced densities (and both ends).

        Kept points are exact points of the curve, so thresholds stay exact
        calibrations; between them recall is interpolated linearly. Memory drops
        from one entry per distinct score to ``points``.
        """
        if len(self.density) <= points:
            return self
        idx = np.searchsorted(self.density, np.linspace(0.0, self.density[-1], points))
        idx = np.unique(np.clip(np.concatenate([[0], idx, idx - 1, [len(self.density) - 1]]), 0,
                                len(self.density) - 1))
        return HeadCurve(self.density[idx], self.recall[idx], self.threshold[idx])

    def on_grid(self, points: int = 201) -> tuple[np.ndarray, np.ndarray]:
        """``(densities, recalls)`` on ``points`` equally spaced densities in [0, 1] (for :func:`allocate_budgets`)."""
        grid = np.linspace(0.0, 1.0, points)
        return grid, self.recall_at_density(grid)


class CurveAccumulator:
    """Collect ``(score, density weight, recall weight)`` of every valid pair, per head, batch by batch.

    Weights need the number of sentences :math:`S`; they are stored per
    sentence (:math:`1/V_s`, :math:`1/G_s`) and divided by :math:`S` in
    :meth:`curves`. Sentences without a valid pair are skipped (they have no
    sparsity), as in :func:`sparsefinder.metrics.aggregate`.
    """

    def __init__(self, num_heads: int) -> None:
        self.num_heads = int(num_heads)
        self._parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(num_heads)]
        self._sentences = 0
        self._no_gold = np.zeros(num_heads)

    def add(self, scores: torch.Tensor, gold: torch.Tensor, lengths: torch.Tensor, causal: bool = False) -> None:
        """``scores`` ``(B, H, N, N)`` (any real dtype), ``gold`` ``(B, H, N, N)`` bool, ``lengths`` ``(B,)``."""
        B, H, N, _ = scores.shape
        if H != self.num_heads or gold.shape != scores.shape:
            raise ValueError(f"expected (B, {self.num_heads}, N, N) scores and gold, got {tuple(scores.shape)} "
                             f"and {tuple(gold.shape)}")
        lengths = torch.as_tensor(lengths).long().cpu()
        valid = valid_pair_mask(lengths, N, causal)[:, 0]  # (B, N, N)
        pairs = num_valid_pairs(lengths, causal).double()
        gold = gold.cpu() & valid[:, None]
        g_count = gold.sum(dim=(-1, -2)).double()  # (B, H)
        scores = scores.detach().cpu().double()
        keep = pairs > 0
        self._sentences += int(keep.sum())
        v = valid & keep[:, None, None]
        dw_full = (1.0 / pairs.clamp(min=1))[:, None, None].expand(B, N, N)[v].numpy()
        for h in range(H):
            gs = g_count[:, h]
            self._no_gold[h] += float(((gs == 0) & keep).sum())
            z = scores[:, h][v].numpy()
            rw = (gold[:, h].double() / gs.clamp(min=1)[:, None, None])[v].numpy()
            self._parts[h].append((z, dw_full, rw))

    @property
    def sentences(self) -> int:
        """Sentences with at least one valid pair added so far."""
        return self._sentences

    def curves(self) -> list[HeadCurve]:
        """One :class:`HeadCurve` per head over every sentence added so far."""
        S = self._sentences
        if S == 0:
            raise ValueError("no sentence with a valid pair was added")
        out = []
        for h in range(self.num_heads):
            z, dw, rw = (np.concatenate([p[i] for p in self._parts[h]]) for i in range(3))
            out.append(HeadCurve.from_pairs(z, dw / S, rw / S, recall_floor=self._no_gold[h] / S))
        return out


def pair_chunks(lengths: torch.Tensor, pairs: int = 400_000) -> list[slice]:
    """Consecutive sentence slices holding at most ``pairs`` padded pairs per head (at least one sentence each).

    Bounds the memory of scoring ``(B, H, N, N)`` at a time: a batch of long
    inputs gets a few sentences per slice, a batch of short ones many.
    """
    lengths = torch.as_tensor(lengths)
    out, start = [], 0
    while start < len(lengths):
        stop = start + 1
        while stop < len(lengths) and (stop + 1 - start) * int(lengths[start:stop + 1].max()) ** 2 <= pairs:
            stop += 1
        out.append(slice(start, stop))
        start = stop
    return out


def score_curves(predictor: Any, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor,
                 gold: torch.Tensor, tokens: Sequence[Sequence[str]] | None = None, causal: bool = False,
                 pairs: int = 400_000) -> list[HeadCurve]:
    """Per-head curves of a fitted scorer (``predictor.scores``, e.g. a learned predictor) on padded data.

    ``queries``/``keys`` ``(B, H, N, r)`` as the predictor takes them, ``gold``
    ``(B, H, N, N)`` bool; scored in :func:`pair_chunks` (the curves do not
    depend on the chunking: each sentence's scores are its own).
    """
    acc = CurveAccumulator(queries.shape[1])
    with torch.no_grad():
        for sl in pair_chunks(lengths, pairs):
            n = max(int(lengths[sl].max()), 1)
            z = predictor.scores(queries[sl, :, :n], keys[sl, :, :n], lengths[sl], causal=causal,
                                 tokens=None if tokens is None else tokens[sl])
            acc.add(z, gold[sl, :, :n, :n], lengths[sl], causal)
    return acc.curves()


def recall_at_sparsity(curves: Sequence[HeadCurve], sparsity: float,
                       densities: Sequence[float] | np.ndarray | None = None) -> tuple[float, float]:
    """``(mean recall, mean sparsity)`` over heads, each head calibrated to its own density.

    ``densities``: per-head target densities (from :func:`allocate_budgets`);
    default: every head at ``1 - sparsity`` (one budget for every head).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    d = np.full(len(curves), 1.0 - sparsity) if densities is None else np.asarray(densities, np.float64)
    if d.shape != (len(curves),):
        raise ValueError(f"need one density per head ({len(curves)}), got {d.shape}")
    rec = np.array([c.recall_at_density(x) for c, x in zip(curves, d, strict=True)])
    dens = np.array([np.clip(x, 0.0, c.density[-1]) for c, x in zip(curves, d, strict=True)])
    return float(rec.mean()), float(1.0 - dens.mean())


def recall_at_global_threshold(curves: Sequence[HeadCurve], sparsity: float) -> tuple[float, float, float]:
    """One threshold ``t`` for every head such that the mean over heads of sparsity is ``sparsity``.

    Mean density is a non-increasing step function of ``t``; the threshold is
    found among all heads' group scores and the last step is interpolated
    linearly (like :meth:`HeadCurve.recall_at_density`). Returns
    ``(mean recall, mean sparsity, t)``.
    """
    target = 1.0 - sparsity
    cand = np.unique(np.concatenate([c.threshold[1:] for c in curves]))[::-1]  # decreasing
    dens = np.mean([c.density_at_threshold(cand) for c in curves], axis=0)  # non-decreasing
    rec = np.mean([c.recall_at_threshold(cand) for c in curves], axis=0)
    dens = np.concatenate([[0.0], dens])
    rec = np.concatenate([[np.mean([c.recall[0] for c in curves])], rec])
    m = int(np.searchsorted(dens, target, side="left"))
    m = min(max(m, 1), len(dens) - 1)
    lo, hi = dens[m - 1], dens[m]
    f = 0.0 if hi == lo else (target - lo) / (hi - lo)
    f = float(np.clip(f, 0.0, 1.0))
    r = rec[m - 1] + f * (rec[m] - rec[m - 1])
    d = lo + f * (hi - lo)
    return float(r), float(1.0 - d), float(cand[m - 1])


def concave_hull(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the upper concave hull of points sorted by increasing ``x`` (first and last included)."""
    hull: list[int] = []
    for i in range(len(x)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # Drop b when it lies on or below the segment a → i.
            if (y[b] - y[a]) * (x[i] - x[a]) <= (y[i] - y[a]) * (x[b] - x[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return np.asarray(hull)


def allocate_budgets(grid: np.ndarray, recall: np.ndarray, mean_density: float) -> np.ndarray:
    r"""Per-head densities :math:`d_h` with mean ``mean_density`` maximising :math:`\sum_h \hat R_h(d_h)`.

    ``grid`` ``(G,)`` increasing densities starting at 0, ``recall`` ``(H, G)``
    each head's (training) recall there; :math:`\hat R_h` is the upper concave
    hull of head :math:`h`'s points. Every head starts at density 0; hull
    segments of all heads are taken in decreasing slope (recall per unit of
    density), the last one partly, until the budget :math:`H \cdot` ``mean_density``
    is spent. For concave curves this greedy is optimal (exchange argument).
    """
    grid = np.asarray(grid, np.float64)
    recall = np.asarray(recall, np.float64)
    H = recall.shape[0]
    if recall.ndim != 2 or recall.shape[1] != len(grid) or grid[0] != 0.0:
        raise ValueError("recall must be (H, G) over a density grid starting at 0")
    if not 0.0 <= mean_density <= grid[-1]:
        raise ValueError(f"mean_density must lie in [0, {grid[-1]}], got {mean_density}")
    segments = []  # (slope, head, width)
    for h in range(H):
        idx = concave_hull(grid, recall[h])
        for a, b in zip(idx[:-1], idx[1:], strict=True):
            width = grid[b] - grid[a]
            segments.append(((recall[h, b] - recall[h, a]) / width, h, width))
    # Stable sort on slope only keeps each head's segments in order (its slopes are decreasing).
    segments.sort(key=lambda s: -s[0])
    budget = H * mean_density
    out = np.zeros(H)
    for _, h, width in segments:
        if budget <= 0:
            break
        take = min(width, budget)
        out[h] += take
        budget -= take
    return out
