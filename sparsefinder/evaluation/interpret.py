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
:func:`head_summary`, …, in :mod:`sparsefinder.evaluation.interpret_views`) are
cheap selections of them. :func:`pca_2d` and
:func:`head_points` give the 2-D view of one head's projected queries and keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import torch

from sparsefinder.evaluation.interpret_views import (  # noqa: F401 - the views' names stay importable from here
    MAX_DISTANCE,
    SIDES,
    UPOS_ORDER,
    InterpretError,
    cluster_pos_matrix,
    cluster_table,
    distance_histogram,
    entropy,
    head_cluster_recall,
    head_grid,
    head_points,
    head_predictability,
    head_summary,
    nearest_centroid,
    pca_2d,
    pos_information,
    proportions,
    purity,
    tag_order,
    top_pos_pairs,
)

if TYPE_CHECKING:  # only attributes are read; importing them pulls in transformers
    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.model.entmax_model import Extraction

FORMAT = "sparsefinder-interpret"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TABLES = ("counts", "top_tokens", "cluster_edges", "distances", "pos_pairs")
TOP_TOKENS = 5


# --------------------------------------------------------------------------- fitted centroids


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
    from sparsefinder.corpora.words import annotate, conllu_annotations

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
