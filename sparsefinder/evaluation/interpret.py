r"""Interpretability of k-means heads: POS tags per cluster, gold-edge distances and POS pairs (docs/method.md §6).

For one layer and head with fitted centroids :math:`\mu_1, \ldots, \mu_C` (the
k-means predictor's, in the learned projected space), every real token gets a
query cluster :math:`c(q'_i) = \arg\min_c \|q'_i - \mu_c\|^2` and a key cluster
:math:`c(k'_j)` (ties: lowest index, as :class:`~sparsefinder.predictors.paper.KMeansPredictor`).
With each token's POS tag (spaCy or CoNLL-U words aligned to subwords,
:mod:`sparsefinder.corpora.annotate`; special tokens are their own tag ``SPECIAL``):

- ``counts[c, t]``: tokens of cluster ``c`` with tag ``t``, separately for
  queries and keys; ``size_c = Σ_t counts[c, t]``, proportions ``counts / size``.
- purity :math:`= \max_t p_{ct} \in [1/T_c, 1]` (:math:`T_c` tags present),
  entropy :math:`H_c = -\sum_t p_{ct} \log_2 p_{ct} \in [0, \log_2 T_c]` bits.
- cluster recall of cluster ``c``: of the gold edges (i, j) whose query lies in
  ``c``, the share whose key lies in ``c`` too — the k-means predictor's
  top-1 recall restricted to those queries; the head's cluster recall pools all
  clusters, :math:`|\{(i,j) \in G : c(q'_i) = c(k'_j)\}| / |G|` (micro, over the corpus).

Per head, independent of clusters: the signed relative distance ``j − i`` of
every gold edge (a histogram clipped at ``± max_distance``, the outer bins
counting everything beyond) and the (query tag, key tag) pairs of gold edges.
Heads whose edges sit at ``|j − i| ≤ 1`` are positional; heads whose clusters
are POS-pure group tokens by syntax.

Everything is kept as tidy long tables (:class:`InterpretTables`) for all layers,
heads and cluster counts at once, so a corpus is processed once and saved
(:meth:`InterpretTables.save`, Parquet + JSON manifest); the per-head views
(:func:`cluster_pos_matrix`, :func:`cluster_table`, :func:`distance_histogram`,
:func:`head_summary`, …) are cheap selections of them. :func:`pca_2d` and
:func:`head_points` give the 2-D view of one head's projected queries and keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import torch

from sparsefinder.corpora.annotate import MISSING, SPECIAL, UNALIGNED

if TYPE_CHECKING:  # only attributes are read; importing them pulls in transformers
    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.model.entmax_model import Extraction

FORMAT = "sparsefinder-interpret"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TABLES = ("counts", "top_tokens", "cluster_edges", "distances", "pos_pairs")
SIDES = ("query", "key")
#: Default clip of the relative-distance histogram: bins -D-1 (everything further left), -D … D, D+1.
MAX_DISTANCE = 16
TOP_TOKENS = 5
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


def kmeans_centroids(fitted: Mapping[str, Any]) -> dict[int, dict[int, torch.Tensor]]:
    """``{C: {layer: centroids (H, C, r)}}`` of the top-1 k-means entries of fitted predictors (:mod:`fitted_io`)."""
    out: dict[int, dict[int, torch.Tensor]] = {}
    for params, by_layer in (fitted.get("kmeans") or {}).items():
        p = json.loads(params)
        if p.get("top_t", 1) != 1:
            continue
        for layer, pred in by_layer.items():
            c = pred.centroids_
            if c is not None:
                out.setdefault(int(c.shape[1]), {})[int(layer)] = c.detach().float().cpu()
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- sentences


class SentenceLike(Protocol):
    """What :func:`interpret` reads of a sentence (a stored sentence, or :class:`ExtractedSentence`)."""

    tokens: list[str]

    def queries(self, layer: int) -> torch.Tensor: ...  # (H, n, d)
    def keys(self, layer: int) -> torch.Tensor: ...  # (H, n, d)
    def gold(self, layer: int) -> torch.Tensor: ...  # (H, n, n) bool


@dataclass
class ExtractedSentence:
    """Sentence ``index`` of an :class:`~sparsefinder.model.entmax_model.Extraction`, as a stored sentence."""

    extraction: Extraction
    index: int
    tokens: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = list(self.extraction.tokens[self.index])

    @property
    def length(self) -> int:
        return int(self.extraction.lengths[self.index])

    def queries(self, layer: int) -> torch.Tensor:
        return self.extraction.queries[layer][self.index, :, : self.length]

    def keys(self, layer: int) -> torch.Tensor:
        return self.extraction.keys[layer][self.index, :, : self.length]

    def gold(self, layer: int) -> torch.Tensor:
        n = self.length
        return self.extraction.gold(layer).edges[self.index, :, :n, :n]


def extraction_sentences(ex: Extraction) -> list[ExtractedSentence]:
    return [ExtractedSentence(ex, b) for b in range(len(ex.tokens))]


def token_tags(sources: Sequence[Any], words: Sequence[Sequence[Any]]) -> list[list[str]]:
    """UPOS of every token of each source (stored sentence or extraction, see :func:`annotate.token_annotations`).

    ``sources[i]`` is a stored sentence or an :class:`ExtractedSentence`; ``words[i]`` its word annotations.
    """
    from sparsefinder.corpora.annotate import token_annotations

    out = []
    for s, w in zip(sources, words, strict=True):
        src, idx = (s.extraction, s.index) if isinstance(s, ExtractedSentence) else (s, 0)
        out.append(token_annotations(src, w, index=idx).upos)
    return out


# --------------------------------------------------------------------------- corpus pass


@dataclass
class InterpretTables:
    """The tidy tables of one corpus (all layers, heads and cluster counts); see the module docstring.

    - ``counts``: layer, head, n_clusters, side, cluster, pos, count (non-zero cells only)
    - ``top_tokens``: layer, head, n_clusters, side, cluster, rank, token, count
    - ``cluster_edges``: layer, head, n_clusters, cluster, gold_edges (query in the cluster),
      same_cluster (key in it too)
    - ``distances``: layer, head, distance (``j − i``, clipped to ``±(max_distance + 1)``), count
    - ``pos_pairs``: layer, head, query_pos, key_pos, count (gold edges)
    """

    counts: pd.DataFrame
    top_tokens: pd.DataFrame
    cluster_edges: pd.DataFrame
    distances: pd.DataFrame
    pos_pairs: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_clusters(self) -> list[int]:
        return sorted(int(c) for c in self.cluster_edges["n_clusters"].unique())

    @property
    def layers(self) -> list[int]:
        return sorted(int(v) for v in self.distances["layer"].unique())

    @property
    def heads(self) -> list[int]:
        return sorted(int(v) for v in self.distances["head"].unique())

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """One Parquet file per table and ``manifest.json`` (format, version, ``info``)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            getattr(self, name).to_parquet(out / f"{name}.parquet", index=False)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "tables": list(TABLES), "info": self.info}
        (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> InterpretTables:
        root = Path(directory)
        try:
            manifest = json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise InterpretError(f"{root} holds no interpretation tables ({MANIFEST_FILE} is missing)") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InterpretError(f"{root / MANIFEST_FILE} is corrupt: {e}") from e
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise InterpretError(f"{root} is not a version-{FORMAT_VERSION} {FORMAT} directory")
        tables = {}
        for name in TABLES:
            try:
                tables[name] = pd.read_parquet(root / f"{name}.parquet")
            except Exception as e:  # missing or unreadable Parquet: one clear error
                raise InterpretError(f"table {name} of {root} is missing or unreadable: {e}") from e
        return cls(**tables, info=manifest.get("info", {}))


def _top_per_group(group: np.ndarray, token: np.ndarray, count: np.ndarray, k: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Mask of the ``k`` most frequent tokens per group (ties: smaller token code first), and every rank."""
    order = np.lexsort((token, -count, group))
    g = group[order]
    start = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
    rank = np.arange(len(g)) - np.repeat(start, np.diff(np.r_[start, len(g)]))
    keep = np.zeros(len(g), dtype=bool)
    keep[order[rank < k]] = True
    return keep, rank[np.argsort(order)]


def interpret(
    sentences: Sequence[SentenceLike],
    tags: Sequence[Sequence[str]],
    projections: Any,
    centroids: Mapping[int, Mapping[int, torch.Tensor]],
    layers: Sequence[int] | None = None,
    top_k: int = TOP_TOKENS,
    max_distance: int = MAX_DISTANCE,
    progress: Callable[[int, int], None] | None = None,
) -> InterpretTables:
    """All tables of :class:`InterpretTables` for ``sentences`` (their tokens' POS tags in ``tags``).

    ``projections``: a :class:`~sparsefinder.training.projections.Projections` (its
    ``project(layer, q, k)``); ``centroids``: ``{C: {layer: (H, C, r)}}``
    (:func:`kmeans_centroids`). ``layers``: default every layer of the
    projections that has centroids. ``progress(done, total)`` is called per layer.
    """
    if len(sentences) != len(tags):
        raise InterpretError(f"{len(sentences)} sentences but tags for {len(tags)}")
    if not sentences:
        raise InterpretError("no sentences to interpret")
    for i, (s, t) in enumerate(zip(sentences, tags, strict=True)):
        if len(s.tokens) != len(t):
            raise InterpretError(f"sentence {i} has {len(s.tokens)} tokens but {len(t)} tags")
    if top_k < 1 or max_distance < 0:
        raise InterpretError("top_k must be >= 1 and max_distance >= 0")
    if layers is None:
        layers = sorted({layer for by_layer in centroids.values() for layer in by_layer}
                        & set(getattr(projections, "layers", range(10**6))))
    layers = list(layers)

    flat_tags = [t for ts in tags for t in ts]
    tag_list = tag_order(flat_tags)
    tag_code = {t: i for i, t in enumerate(tag_list)}
    pos = np.array([tag_code[t] for t in flat_tags], dtype=np.int64)
    tok_codes, tok_list = pd.factorize(pd.Series([t for s in sentences for t in s.tokens]), sort=True)
    tok_codes = tok_codes.astype(np.int64)
    n_pos, n_tok = len(tag_list), max(len(tok_list), 1)
    offsets = np.cumsum([0] + [len(s.tokens) for s in sentences])
    n_bins = 2 * max_distance + 3
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in TABLES}

    for done, layer in enumerate(layers):
        qs, ks, eh, eq, ek = [], [], [], [], []
        for s, off in zip(sentences, offsets[:-1], strict=False):
            q, k = projections.project(layer, s.queries(layer).float(), s.keys(layer).float())
            qs.append(q.detach().cpu())
            ks.append(k.detach().cpu())
            h, i, j = np.nonzero(s.gold(layer).cpu().numpy())
            eh.append(h)
            eq.append(i + off)
            ek.append(j + off)
        q_all, k_all = torch.cat(qs, dim=1), torch.cat(ks, dim=1)  # (H, T, r)
        heads = q_all.shape[0]
        e_h, e_q, e_k = (np.concatenate(a).astype(np.int64) for a in (eh, eq, ek))

        # Relative distances and POS pairs of gold edges: one bincount per table for all heads.
        d = np.clip(e_k - e_q, -max_distance - 1, max_distance + 1) + max_distance + 1
        hist = np.bincount(e_h * n_bins + d, minlength=heads * n_bins).reshape(heads, n_bins)
        hh, bb = np.nonzero(hist)
        parts["distances"].append(pd.DataFrame({"layer": layer, "head": hh, "distance": bb - max_distance - 1,
                                                "count": hist[hh, bb]}))
        pairs = np.bincount((e_h * n_pos + pos[e_q]) * n_pos + pos[e_k],
                            minlength=heads * n_pos * n_pos).reshape(heads, n_pos, n_pos)
        hh, a, b = np.nonzero(pairs)
        parts["pos_pairs"].append(pd.DataFrame({"layer": layer, "head": hh, "query_pos": np.asarray(tag_list)[a],
                                                "key_pos": np.asarray(tag_list)[b], "count": pairs[hh, a, b]}))

        for n_clusters, by_layer in centroids.items():
            if layer not in by_layer:
                continue
            cents = by_layer[layer]
            assign = {side: nearest_centroid(x, cents).numpy().astype(np.int64)
                      for side, x in zip(SIDES, (q_all, k_all), strict=True)}
            head_idx = np.repeat(np.arange(heads), q_all.shape[1])
            for side in SIDES:
                c = assign[side].reshape(-1)
                grid = np.bincount((head_idx * n_clusters + c) * n_pos + np.tile(pos, heads),
                                   minlength=heads * n_clusters * n_pos).reshape(heads, n_clusters, n_pos)
                hh, cc, tt = np.nonzero(grid)
                parts["counts"].append(pd.DataFrame({
                    "layer": layer, "head": hh, "n_clusters": n_clusters, "side": side, "cluster": cc,
                    "pos": np.asarray(tag_list)[tt], "count": grid[hh, cc, tt]}))
                keys, cnt = np.unique((head_idx * n_clusters + c) * n_tok + np.tile(tok_codes, heads),
                                      return_counts=True)
                group, tok = keys // n_tok, keys % n_tok
                keep, rank = _top_per_group(group, tok, cnt, top_k)
                parts["top_tokens"].append(pd.DataFrame({
                    "layer": layer, "head": group[keep] // n_clusters, "n_clusters": n_clusters, "side": side,
                    "cluster": group[keep] % n_clusters, "rank": rank[keep],
                    "token": np.asarray(tok_list, dtype=object)[tok[keep]], "count": cnt[keep]}))
            qc = assign["query"][e_h, e_q]
            same = qc == assign["key"][e_h, e_k]
            gold = np.bincount(e_h * n_clusters + qc, minlength=heads * n_clusters)
            hits = np.bincount(e_h * n_clusters + qc, weights=same, minlength=heads * n_clusters)
            parts["cluster_edges"].append(pd.DataFrame({
                "layer": layer, "head": np.repeat(np.arange(heads), n_clusters), "n_clusters": n_clusters,
                "cluster": np.tile(np.arange(n_clusters), heads), "gold_edges": gold,
                "same_cluster": hits.astype(np.int64)}))
        if progress is not None:
            progress(done + 1, len(layers))

    tables = {}
    for name in TABLES:
        frame = pd.concat(parts[name], ignore_index=True) if parts[name] else pd.DataFrame()
        for col in ("layer", "head", "n_clusters", "cluster", "rank", "distance", "count", "gold_edges",
                    "same_cluster"):
            if col in frame.columns:
                frame[col] = frame[col].astype(np.int64)
        tables[name] = frame
    if tables["cluster_edges"].empty:
        tables["cluster_edges"] = pd.DataFrame({c: pd.Series(dtype=np.int64) for c in
                                                ("layer", "head", "n_clusters", "cluster", "gold_edges",
                                                 "same_cluster")})
    info = {"sentences": len(sentences), "tokens": int(offsets[-1]), "layers": layers,
            "n_clusters": sorted(int(c) for c in centroids), "top_k": top_k, "max_distance": max_distance,
            "tags": tag_list}
    return InterpretTables(**tables, info=info)


def interpret_store(
    store: ExtractionStore,
    projections: Any,
    fitted: Mapping[str, Any],
    corpus: Any = None,
    n_clusters: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    **kw: Any,
) -> InterpretTables:
    """:func:`interpret` over every sentence of an extraction store.

    Tags come from ``corpus`` (a CoNLL-U :class:`~sparsefinder.corpora.readers.Corpus`
    whose sentence ``i`` is the store's sentence ``i``) or else from spaCy.
    ``n_clusters`` restricts the cluster counts (default: every fitted one).
    """
    from sparsefinder.corpora.annotate import annotate, conllu_annotations

    sentences = [store.sentence(i) for i in range(len(store))]
    texts = [s.text for s in sentences]
    if corpus is not None:
        if len(corpus.sentences) < len(texts) or any(c.text != t for c, t in zip(corpus.sentences, texts,
                                                                                 strict=False)):
            raise InterpretError("the CoNLL-U corpus is not the store's (its sentences differ)")
        words = [conllu_annotations(corpus.sentences[i]) for i in range(len(texts))]
    else:
        words = annotate(texts)
    cents = kmeans_centroids(fitted)
    if n_clusters is not None:
        missing = sorted(set(n_clusters) - set(cents))
        if missing:
            raise InterpretError(f"no fitted k-means with {missing} clusters (fitted: {sorted(cents)})")
        cents = {c: cents[c] for c in n_clusters}
    if not cents:
        raise InterpretError("the fitted predictors hold no k-means centroids")
    tables = interpret(sentences, token_tags(sentences, words), projections, cents, progress=progress, **kw)
    tables.info.update(store=str(store.path), corpus=store.manifest.get("corpus"),
                       model=store.manifest.get("model"), tag_source="conllu" if corpus is not None else "spacy")
    return tables


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
