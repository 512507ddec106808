r"""Reading interpretation tables: per-cluster statistics and the per-head views (docs/method.md §6).

:class:`~sparsefinder.evaluation.interpret.InterpretTables` holds the counts of a
whole corpus; everything here is a cheap selection or statistic of them: the
purity, entropy and POS information of clusters, the cluster × POS matrix and
cluster table of one head (:func:`cluster_pos_matrix`, :func:`cluster_table`),
its gold-edge distances (:func:`distance_histogram`) and POS pairs, the
one-row-per-head :func:`head_summary`, and the 2-D picture of one head's
projected queries and keys (:func:`pca_2d`, :func:`head_points`). The names
are importable from :mod:`sparsefinder.evaluation.interpret` too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from sparsefinder.corpora.words import MISSING, SPECIAL, UNALIGNED

if TYPE_CHECKING:
    from sparsefinder.evaluation.interpret import InterpretTables, SentenceLike

SIDES = ("query", "key")
#: Default clip of the relative-distance histogram: bins -D-1 (everything further left), -D … D, D+1.
MAX_DISTANCE = 16
#: Universal POS tags in the UD guidelines' order, then spaCy's whitespace tag and ours; other tags go after.
UPOS_ORDER = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
              "PUNCT", "SCONJ", "SYM", "VERB", "X", "SPACE", SPECIAL, UNALIGNED, MISSING)


class InterpretError(ValueError):
    """An interpretation artifact is missing or corrupt, or the inputs do not fit together."""


# --------------------------------------------------------------------------- per-cluster statistics


def tag_order(tags: Iterable[str]) -> list[str]:
    """``tags`` without duplicates, in :data:`UPOS_ORDER` then alphabetically (stable columns for tables)."""
    rank = {t: i for i, t in enumerate(UPOS_ORDER)}
    return sorted(set(tags), key=lambda t: (rank.get(t, len(rank)), t))


def purity(counts: np.ndarray) -> np.ndarray:
    """Row-wise share of the most frequent tag, :math:`\\max_t n_{ct} / \\sum_t n_{ct}` (NaN for an empty row)."""
    c = np.asarray(counts, dtype=float)
    size = c.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(size > 0, c.max(-1, initial=0.0) / np.where(size > 0, size, 1), np.nan)


def entropy(counts: np.ndarray) -> np.ndarray:
    """Row-wise entropy in bits of the tag distribution, :math:`-\\sum_t p_t \\log_2 p_t` (NaN for an empty row)."""
    c = np.asarray(counts, dtype=float)
    size = c.sum(-1, keepdims=True)
    p = c / np.where(size > 0, size, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1)), 0.0)
    return np.where(size[..., 0] > 0, terms.sum(-1), np.nan)


def pos_information(counts: np.ndarray) -> float:
    r"""Share of the tag entropy explained by the clusters, :math:`I(C; T) / H(T) \in [0, 1]`.

    ``counts`` is clusters × tags. Purity alone rewards clusters of the most
    frequent tag (nouns); this is 0 when every cluster has the corpus's tag
    mix and 1 when the cluster determines the tag. NaN without tokens, 0 with one tag.
    """
    c = np.asarray(counts, dtype=float)
    total = c.sum()
    if total == 0:
        return float("nan")
    h_t = float(entropy(c.sum(0)))
    if h_t == 0:
        return 0.0
    sizes = c.sum(1)
    h_t_given_c = float(np.nansum(sizes / total * entropy(c)))
    return max(0.0, (h_t - h_t_given_c) / h_t)


def proportions(matrix: pd.DataFrame) -> pd.DataFrame:
    """Each row divided by its sum (rows of empty clusters stay 0)."""
    size = matrix.sum(axis=1)
    return matrix.div(size.where(size > 0, 1), axis=0)


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``(H, T)`` index of the centroid nearest each of ``x`` ``(H, T, r)``; ``centroids`` ``(H, C, r)``.

    The k-means predictor's own top-1 assignment (ties: lowest index).
    """
    from sparsefinder.predictors.paper import top_centroids

    if x.dim() != 3 or centroids.dim() != 3 or x.shape[0] != centroids.shape[0] or x.shape[2] != centroids.shape[2]:
        raise InterpretError(f"points {tuple(x.shape)} (H, T, r) do not fit centroids "
                             f"{tuple(centroids.shape)} (H, C, r)")
    return top_centroids(x[None].float(), centroids.float(), 1)[0, ..., 0]


# --------------------------------------------------------------------------- per-head views


def _head(frame: pd.DataFrame, layer: int, head: int, n_clusters: int | None = None) -> pd.DataFrame:
    sel = (frame["layer"] == layer) & (frame["head"] == head)
    if n_clusters is not None:
        sel &= frame["n_clusters"] == n_clusters
    return frame[sel]


def _check_head(tables: InterpretTables, layer: int, head: int, n_clusters: int | None = None) -> None:
    if layer not in tables.layers or head not in tables.heads:
        raise InterpretError(f"no tables for layer {layer}, head {head} (layers {tables.layers}, "
                             f"heads {tables.heads})")
    if n_clusters is not None and n_clusters not in tables.n_clusters:
        raise InterpretError(f"no tables for {n_clusters} clusters (available: {tables.n_clusters})")


def cluster_pos_matrix(
    tables: InterpretTables, layer: int, head: int, n_clusters: int, side: str, normalise: bool = False
) -> pd.DataFrame:
    """Clusters ``0..C-1`` (rows) × POS tags (columns) of one head's queries or keys: counts, or row proportions."""
    if side not in SIDES:
        raise InterpretError(f"side must be one of {SIDES}, not {side!r}")
    _check_head(tables, layer, head, n_clusters)
    sel = _head(tables.counts, layer, head, n_clusters)
    sel = sel[sel["side"] == side]
    tags = tag_order(tables.counts["pos"].unique())
    m = sel.pivot_table(index="cluster", columns="pos", values="count", aggfunc="sum", fill_value=0)
    m = m.reindex(index=range(n_clusters), columns=tags, fill_value=0).astype(np.int64)
    m.index.name, m.columns.name = "cluster", "pos"
    return proportions(m) if normalise else m


def cluster_table(tables: InterpretTables, layer: int, head: int, n_clusters: int) -> pd.DataFrame:
    """Per cluster: size, majority tag, purity, entropy (queries and keys), top tokens, gold edges, cluster recall."""
    _check_head(tables, layer, head, n_clusters)
    out = pd.DataFrame({"cluster": range(n_clusters)})
    tops = _head(tables.top_tokens, layer, head, n_clusters)
    for side in SIDES:
        m = cluster_pos_matrix(tables, layer, head, n_clusters, side)
        values = m.to_numpy()
        out[f"{side}_size"] = values.sum(1)
        out[f"{side}_majority"] = [m.columns[i] if values[r].sum() else "" for r, i in enumerate(values.argmax(1))]
        out[f"{side}_purity"] = purity(values)
        out[f"{side}_entropy"] = entropy(values)
        t = tops[tops["side"] == side].sort_values(["cluster", "rank"])
        joined = t.groupby("cluster")["token"].agg(lambda s: " ".join(s))
        out[f"{side}_top_tokens"] = out["cluster"].map(joined).fillna("")
    edges = _head(tables.cluster_edges, layer, head, n_clusters).set_index("cluster")
    out["gold_edges"] = out["cluster"].map(edges["gold_edges"]).fillna(0).astype(np.int64)
    out["same_cluster"] = out["cluster"].map(edges["same_cluster"]).fillna(0).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["cluster_recall"] = np.where(out["gold_edges"] > 0, out["same_cluster"] / out["gold_edges"], np.nan)
    return out


def head_cluster_recall(tables: InterpretTables, layer: int, head: int, n_clusters: int) -> float:
    """Share of the head's gold edges whose query and key share a cluster (NaN without edges)."""
    _check_head(tables, layer, head, n_clusters)
    e = _head(tables.cluster_edges, layer, head, n_clusters)
    total = int(e["gold_edges"].sum())
    return float(e["same_cluster"].sum()) / total if total else float("nan")


def distance_histogram(tables: InterpretTables, layer: int, head: int) -> pd.DataFrame:
    """``distance`` (every bin from ``-D-1`` to ``D+1``), ``count``, ``share`` of the head's gold edges."""
    _check_head(tables, layer, head)
    md = int(tables.info.get("max_distance", MAX_DISTANCE))
    e = _head(tables.distances, layer, head).groupby("distance")["count"].sum()
    out = pd.DataFrame({"distance": np.arange(-md - 1, md + 2)})
    out["count"] = out["distance"].map(e).fillna(0).astype(np.int64)
    total = out["count"].sum()
    out["share"] = out["count"] / total if total else 0.0
    return out


def top_pos_pairs(tables: InterpretTables, layer: int | None = None, head: int | None = None,
                  k: int = 10) -> pd.DataFrame:
    """The ``k`` (query tag, key tag) pairs carrying most gold edges, of a head, a layer or every head."""
    p = tables.pos_pairs
    if layer is not None:
        p = p[p["layer"] == layer]
    if head is not None:
        p = p[p["head"] == head]
    g = p.groupby(["query_pos", "key_pos"], as_index=False)["count"].sum()
    total = g["count"].sum()
    g["share"] = g["count"] / total if total else 0.0
    return g.sort_values(["count", "query_pos", "key_pos"], ascending=[False, True, True]).head(k).reset_index(
        drop=True)


def head_predictability(sweep: pd.DataFrame, min_sparsity: float, methods: Sequence[str] | None = None
                        ) -> pd.DataFrame:
    """Per layer and head: the best recall of any configuration whose sparsity is ≥ ``min_sparsity``.

    ``sweep``: an aggregated sweep table (one row per method, params, layer,
    head). Ties go to the sparser configuration. Heads with no configuration
    sparse enough get NaN. Columns: layer, head, best_recall, method, params, sparsity.
    """
    from sparsefinder.evaluation.pareto import SPARSITY_EPS

    f = sweep if methods is None else sweep[sweep["method"].isin(list(methods))]
    heads = f[["layer", "head"]].drop_duplicates()
    ok = f[f["sparsity"] >= min_sparsity - SPARSITY_EPS]
    ok = ok.sort_values(["recall", "sparsity", "method", "params"], ascending=[False, False, True, True],
                        kind="stable")
    best = ok.drop_duplicates(["layer", "head"])[["layer", "head", "recall", "method", "params", "sparsity"]]
    out = heads.merge(best, on=["layer", "head"], how="left").rename(columns={"recall": "best_recall"})
    return out.sort_values(["layer", "head"]).reset_index(drop=True)


def head_summary(
    tables: InterpretTables,
    n_clusters: int,
    sweep: pd.DataFrame | None = None,
    min_sparsity: float = 0.9,
    near: int = 1,
) -> pd.DataFrame:
    """One row per layer and head: gold edges, share within ``|j − i| ≤ near``, mean ``|j − i|`` (clipped),
    the top POS pair, the size-weighted mean purity of query and key clusters and their
    :func:`pos_information`, the cluster recall at
    ``n_clusters``, and (with ``sweep``) the best recall at ``min_sparsity`` (:func:`head_predictability`)."""
    if n_clusters not in tables.n_clusters:
        raise InterpretError(f"no tables for {n_clusters} clusters (available: {tables.n_clusters})")
    d = tables.distances
    total = d.groupby(["layer", "head"])["count"].sum().rename("gold_edges")
    close = d[d["distance"].abs() <= near].groupby(["layer", "head"])["count"].sum()
    absd = (d["distance"].abs() * d["count"]).groupby([d["layer"], d["head"]]).sum()
    out = total.to_frame()
    out[f"share_within_{near}"] = close.reindex(out.index).fillna(0) / out["gold_edges"]
    out["mean_abs_distance"] = absd.reindex(out.index) / out["gold_edges"]
    pp = tables.pos_pairs.sort_values(["count", "query_pos", "key_pos"], ascending=[False, True, True])
    top = pp.drop_duplicates(["layer", "head"]).set_index(["layer", "head"])
    out["top_pos_pair"] = (top["query_pos"] + " → " + top["key_pos"]).reindex(out.index)
    out["top_pos_pair_share"] = top["count"].reindex(out.index) / out["gold_edges"]
    c = tables.counts[tables.counts["n_clusters"] == n_clusters]
    for side in SIDES:
        s = c[c["side"] == side]
        per = s.groupby(["layer", "head", "cluster"])["count"]
        # Size-weighted mean purity = Σ_c max_t n_ct / Σ_c n_c.
        mx = per.max().groupby(["layer", "head"]).sum()
        size = per.sum().groupby(["layer", "head"]).sum()
        out[f"{side}_purity"] = (mx / size).reindex(out.index)
        out[f"{side}_pos_info"] = pd.Series(
            {key: pos_information(g.pivot_table(index="cluster", columns="pos", values="count", aggfunc="sum",
                                                fill_value=0).to_numpy())
             for key, g in s.groupby(["layer", "head"])}, dtype=float).reindex(out.index)
    e = tables.cluster_edges[tables.cluster_edges["n_clusters"] == n_clusters].groupby(["layer", "head"])
    out["cluster_recall"] = (e["same_cluster"].sum() / e["gold_edges"].sum()).reindex(out.index)
    out = out.reset_index()
    if sweep is not None:
        best = head_predictability(sweep, min_sparsity)
        out = out.merge(best.rename(columns={"sparsity": "best_sparsity", "method": "best_method",
                                             "params": "best_params"}), on=["layer", "head"], how="left")
    return out


def head_grid(summary: pd.DataFrame, column: str) -> np.ndarray:
    """``(layers, heads)`` array of one :func:`head_summary` column (NaN where missing)."""
    layers = int(summary["layer"].max()) + 1
    heads = int(summary["head"].max()) + 1
    grid = np.full((layers, heads), np.nan)
    grid[summary["layer"].to_numpy(), summary["head"].to_numpy()] = summary[column].to_numpy(dtype=float)
    return grid


# --------------------------------------------------------------------------- 2-D view


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Principal-component coordinates of the rows of ``x`` ``(T, r)``: ``(coords (T, 2), components (2, r), mean)``.

    Signs are fixed (each component's largest-magnitude loading is positive)
    so the picture does not flip between runs; with ``r < 2`` or rank < 2 the
    missing coordinate is 0.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise InterpretError(f"need a non-empty (points, dims) array, got shape {x.shape}")
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = np.zeros((2, x.shape[1]))
    comps[: min(2, len(vt))] = vt[:2]
    for c in comps:
        if np.any(c):
            c *= np.sign(c[np.argmax(np.abs(c))])
    return (x - mean) @ comps.T, comps, mean


def head_points(
    sentences: Sequence[SentenceLike],
    tags: Sequence[Sequence[str]],
    projections: Any,
    layer: int,
    head: int,
    centroids: torch.Tensor | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One head's projected queries and keys in 2-D (PCA of the ``r``-dim projections, pooled).

    Returns ``(points, centres)``: points has sentence, position, token, pos,
    side, cluster (−1 without ``centroids`` ``(H, C, r)``), x, y; centres has
    cluster, x, y (the centroids in the same PCA coordinates; empty without).
    """
    rows, xs = [], []
    for b, (s, t) in enumerate(zip(sentences, tags, strict=True)):
        q, k = projections.project(layer, s.queries(layer).float(), s.keys(layer).float())
        for side, x in zip(SIDES, (q, k), strict=True):
            xh = x[head].detach().cpu()
            xs.append(xh)
            cl = (nearest_centroid(xh[None], centroids[head:head + 1]).numpy()[0] if centroids is not None
                  else np.full(len(xh), -1))
            rows.append(pd.DataFrame({"sentence": b, "position": np.arange(len(xh)), "token": s.tokens,
                                      "pos": list(t), "side": side, "cluster": cl}))
    pts = pd.concat(rows, ignore_index=True)
    coords, comps, mean = pca_2d(torch.cat(xs).numpy())
    pts["x"], pts["y"] = coords[:, 0], coords[:, 1]
    if centroids is None:
        centres = pd.DataFrame({"cluster": pd.Series(dtype=np.int64), "x": pd.Series(dtype=float),
                                "y": pd.Series(dtype=float)})
    else:
        cc = (centroids[head].double().numpy() - mean) @ comps.T
        centres = pd.DataFrame({"cluster": np.arange(len(cc)), "x": cc[:, 0], "y": cc[:, 1]})
    return pts, centres
