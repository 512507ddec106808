r"""Summaries of a sweep table and Pareto fronts of recall against sparsity.

A configuration (method, grid point) is on the front when no other
configuration has both higher-or-equal sparsity and higher-or-equal recall
with at least one strictly higher. Fronts are taken over the means over heads
(:func:`summarise`), overall or per layer or per head (``by``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from sparsefinder.metrics import CONFIG_COLUMNS, COUNT_COLUMNS, RATIO_COLUMNS
from sparsefinder.predictors.base import REGISTRY


def summarise(frame: pd.DataFrame, by: Sequence[str] = ("method",)) -> pd.DataFrame:
    """Mean over heads (and layers, sentences) per configuration and ``by`` group.

    Input: an aggregated sweep table, or a per-sentence one (then first the
    macro mean over sentences per layer and head, docs/method.md §2). ``by`` may name
    ``layer`` and ``head`` to keep that resolution. With every head scored on
    the same sentences, the mean over heads of the per-head macro means is the
    the method reference's overall mean. Output: the configuration columns, ``by``, the ratio
    means, ``heads`` (rows averaged) and the summed counts.
    """
    if "sentence" in frame.columns:
        from sparsefinder.metrics import aggregate

        frame = aggregate(frame, by=("layer", "head"))
    config = [c for c in CONFIG_COLUMNS if c in frame.columns]
    keys = list(dict.fromkeys(config + [c for c in by if c not in config]))
    counts = [c for c in COUNT_COLUMNS if c in frame.columns]
    grouped = frame.groupby(keys, sort=True, dropna=False)
    out = grouped[list(RATIO_COLUMNS)].mean()
    out["heads"] = grouped.size()
    if counts:
        out = out.join(grouped[counts].sum(min_count=1))  # unknown mass stays NaN
    return out.reset_index()


def front_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Points not dominated (higher ``x`` and higher ``y`` are better); NaN points are never on the front.

    ``a`` dominates ``b`` when ``a.x >= b.x``, ``a.y >= b.y`` and one is strict;
    equal points do not dominate each other. O(n log n).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = ~(np.isnan(x) | np.isnan(y))
    out = np.zeros(len(x), dtype=bool)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return out
    order = idx[np.lexsort((-y[idx], -x[idx]))]  # x descending, then y descending
    best = -np.inf  # best y among points of strictly larger x
    start = 0
    while start < len(order):
        stop = start
        while stop < len(order) and x[order[stop]] == x[order[start]]:
            stop += 1
        group = order[start:stop]
        top = y[group[0]]
        for i in group:
            out[i] = y[i] == top and top > best
        best = max(best, top)
        start = stop
    return out


def pareto_front(
    frame: pd.DataFrame, x: str = "sparsity", y: str = "recall", by: Sequence[str] = ("method",)
) -> pd.DataFrame:
    """Configurations on the recall–sparsity Pareto front, within each ``by`` group.

    Points are configurations (``method``, ``params``), averaged as in
    :func:`summarise` over everything not in ``by``: ``by=("method",)`` gives
    each method's front over the mean of all heads; ``("method", "layer")`` per
    layer; ``("method", "layer", "head")`` per head; ``()`` one front over all
    methods. Returns the summary with a boolean ``on_front`` column.
    """
    out = summarise(frame, by=by)
    groups = [c for c in by if c in out.columns]
    mask = np.zeros(len(out), dtype=bool)
    xs, ys = out[x].to_numpy(np.float64), out[y].to_numpy(np.float64)
    if groups:
        for rows in out.groupby(groups, sort=False, dropna=False).indices.values():
            mask[rows] = front_mask(xs[rows], ys[rows])
    else:
        mask = front_mask(xs, ys)
    out["on_front"] = mask
    return out


SPARSITY_EPS = 5e-4
"""Slack on ``min_sparsity``: masks built to a target sparsity (lexical, random) round each sentence's
edge count, so their mean lands within a few 1e-5 of the target; such a configuration counts as reaching it."""


def best_recall_at(
    frame: pd.DataFrame,
    min_sparsity: float,
    x: str = "sparsity",
    y: str = "recall",
    by: Sequence[str] = ("method",),
) -> pd.DataFrame:
    """The best configuration per ``by`` group: highest mean ``y`` among those with mean ``x`` ≥ ``min_sparsity``.

    Default: per method, recall at a minimum sparsity. Means are over heads
    (:func:`summarise`). Ties go to the sparser, then to the first ``params``
    in sort order. A group with no configuration sparse enough gets a row with
    NaN values and no ``params``. Columns: ``by``,
    ``min_sparsity``, ``params``, the ratio means of that configuration.
    """
    summary = summarise(frame, by=by)
    groups = [c for c in by if c in summary.columns]
    keep = summary[summary[x] >= min_sparsity - SPARSITY_EPS]
    keep = keep.sort_values([y, x, "params"], ascending=[False, False, True], kind="stable")
    best = keep.drop_duplicates(subset=groups, keep="first") if groups else keep.head(1)
    cols = groups + ["params"] + list(RATIO_COLUMNS)
    best = best[cols]
    if groups:
        every = summary[groups].drop_duplicates()
        best = every.merge(best, on=groups, how="left")
    elif best.empty:
        best = pd.DataFrame({c: [np.nan] for c in cols}).astype({"params": object})
        best["params"] = None
    best.insert(len(groups), "min_sparsity", float(min_sparsity))
    return best.sort_values(groups, kind="stable").reset_index(drop=True) if groups else best.reset_index(drop=True)


def best_recall_table(
    frame: pd.DataFrame, thresholds: Sequence[float] = (0.5, 0.7, 0.9), y: str = "recall"
) -> pd.DataFrame:
    """Methods × thresholds: the best mean ``y`` at mean sparsity ≥ each threshold (:func:`best_recall_at`)."""
    parts = [best_recall_at(frame, t, y=y) for t in thresholds]
    long = pd.concat(parts, ignore_index=True)
    table = long.pivot(index="method", columns="min_sparsity", values=y)
    table.columns = [f"{y} @ sparsity >= {t:g}" for t in table.columns]
    order = [m for m in REGISTRY if m in table.index] + [m for m in table.index if m not in REGISTRY]
    return table.loc[order]
