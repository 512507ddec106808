"""Interpretability tables (POS per k-means cluster, gold-edge distances, POS pairs) against brute-force loops."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefinder.evaluation.interpret import (
    SIDES,
    ExtractedSentence,
    InterpretError,
    InterpretTables,
    cluster_pos_matrix,
    cluster_table,
    distance_histogram,
    entropy,
    extraction_sentences,
    head_cluster_recall,
    head_grid,
    head_points,
    head_predictability,
    head_summary,
    interpret,
    interpret_store,
    kmeans_centroids,
    pca_2d,
    pos_information,
    proportions,
    purity,
    tag_order,
    top_pos_pairs,
)
from sparsefinder.training.projections import Projections
from tests.helpers import grid_frame

TAGS = ["NOUN", "VERB", "DET", "SPECIAL", "ADJ"]
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog"]


@dataclass
class FakeSentence:
    """A sentence with the stored-sentence interface: random q, k and a random gold graph per layer."""

    tokens: list[str]
    q: list[torch.Tensor]  # per layer (H, n, d)
    k: list[torch.Tensor]
    g: list[torch.Tensor]  # per layer (H, n, n) bool

    def queries(self, layer: int) -> torch.Tensor:
        return self.q[layer]

    def keys(self, layer: int) -> torch.Tensor:
        return self.k[layer]

    def gold(self, layer: int) -> torch.Tensor:
        return self.g[layer]


def synthetic(seed: int, n_sentences: int = 4, layers: int = 2, heads: int = 3, d: int = 6, r: int = 2,
              clusters: tuple[int, ...] = (2, 3), max_len: int = 9):
    rng = np.random.default_rng(seed)
    sentences, tags = [], []
    for _ in range(n_sentences):
        n = int(rng.integers(1, max_len + 1))
        tokens = [WORDS[i] for i in rng.integers(0, len(WORDS), n)]
        sentences.append(FakeSentence(
            tokens,
            [torch.tensor(rng.normal(size=(heads, n, d)), dtype=torch.float32) for _ in range(layers)],
            [torch.tensor(rng.normal(size=(heads, n, d)), dtype=torch.float32) for _ in range(layers)],
            [torch.tensor(rng.random((heads, n, n)) < 0.4) for _ in range(layers)],
        ))
        tags.append([TAGS[i] for i in rng.integers(0, len(TAGS), n)])
    proj = Projections(layers, heads, d, r, seed=seed)
    cents = {c: {layer: torch.tensor(rng.normal(size=(heads, c, r)), dtype=torch.float32) for layer in range(layers)}
             for c in clusters}
    return sentences, tags, proj, cents


# --------------------------------------------------------------------------- brute force


def nearest(x: list[float], cents: torch.Tensor) -> int:
    best, best_d = 0, math.inf
    for c in range(cents.shape[0]):
        dist = sum((float(a) - float(b)) ** 2 for a, b in zip(x, cents[c].tolist(), strict=True))
        if dist < best_d:  # strict: ties keep the lowest index
            best, best_d = c, dist
    return best


def brute(sentences, tags, proj, cents, top_k=2, max_distance=2):
    counts, tops, edges, dists, pairs = Counter(), {}, Counter(), Counter(), Counter()
    layers = sorted({layer for by in cents.values() for layer in by})
    for layer in layers:
        for s, t in zip(sentences, tags, strict=True):
            q, k = proj.project(layer, s.queries(layer), s.keys(layer))
            gold = s.gold(layer)
            heads, n = gold.shape[0], gold.shape[1]
            for h in range(heads):
                for i in range(n):
                    for j in range(n):
                        if gold[h, i, j]:
                            dd = max(-max_distance - 1, min(max_distance + 1, j - i))
                            dists[(layer, h, dd)] += 1
                            pairs[(layer, h, t[i], t[j])] += 1
                for c, by in cents.items():
                    cq = [nearest(q[h, i].tolist(), by[layer][h]) for i in range(n)]
                    ck = [nearest(k[h, i].tolist(), by[layer][h]) for i in range(n)]
                    for side, cl in (("query", cq), ("key", ck)):
                        for i in range(n):
                            counts[(layer, h, c, side, cl[i], t[i])] += 1
                            tops.setdefault((layer, h, c, side, cl[i]), Counter())[s.tokens[i]] += 1
                    for i in range(n):
                        for j in range(n):
                            if gold[h, i, j]:
                                edges[(layer, h, c, cq[i], "gold")] += 1
                                edges[(layer, h, c, cq[i], "same")] += int(cq[i] == ck[j])
    top_rows = {}
    for key, counter in tops.items():
        ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
        for rank, (tok, cnt) in enumerate(ranked):
            top_rows[(*key, rank)] = (tok, cnt)
    return counts, top_rows, edges, dists, pairs


def as_counter(frame: pd.DataFrame, keys: list[str], value: str = "count") -> Counter:
    return Counter({tuple(r[:-1]): r[-1] for r in frame[keys + [value]].itertuples(index=False)})


def check_against_brute(sentences, tags, proj, cents, top_k=2, max_distance=2) -> InterpretTables:
    tables = interpret(sentences, tags, proj, cents, top_k=top_k, max_distance=max_distance)
    counts, tops, edges, dists, pairs = brute(sentences, tags, proj, cents, top_k, max_distance)
    assert as_counter(tables.counts, ["layer", "head", "n_clusters", "side", "cluster", "pos"]) == counts
    got_tops = {tuple(r[:6]): (r[6], r[7]) for r in tables.top_tokens[
        ["layer", "head", "n_clusters", "side", "cluster", "rank", "token", "count"]].itertuples(index=False)}
    assert got_tops == tops
    ce = tables.cluster_edges
    got_edges = Counter()
    for r in ce.itertuples(index=False):
        got_edges[(r.layer, r.head, r.n_clusters, r.cluster, "gold")] += r.gold_edges
        got_edges[(r.layer, r.head, r.n_clusters, r.cluster, "same")] += r.same_cluster
    assert +got_edges == +edges  # unary + drops zero entries
    assert as_counter(tables.distances, ["layer", "head", "distance"]) == dists
    assert as_counter(tables.pos_pairs, ["layer", "head", "query_pos", "key_pos"]) == pairs
    return tables


# --------------------------------------------------------------------------- tables vs loops


def test_tables_match_brute_force_loops():
    tables = check_against_brute(*synthetic(0), top_k=2, max_distance=2)
    assert tables.n_clusters == [2, 3] and tables.layers == [0, 1] and tables.heads == [0, 1, 2]
    assert tables.info["tags"] == tag_order(TAGS)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), top_k=st.integers(1, 4), max_distance=st.integers(0, 4))
def test_tables_match_brute_force_property(seed, top_k, max_distance):
    check_against_brute(*synthetic(seed, n_sentences=3, max_len=7), top_k=top_k, max_distance=max_distance)


def test_ties_go_to_the_lowest_centroid():
    sentences, tags, proj, _ = synthetic(1, layers=1, heads=1, d=2, r=2)
    # Two identical centroids: every point is equally near both, so everything lands in cluster 0.
    same = {2: {0: torch.zeros(1, 2, 2)}}
    tables = interpret(sentences, tags, proj, same)
    assert set(tables.counts["cluster"]) == {0}


# --------------------------------------------------------------------------- per-head views


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=6), min_size=1, max_size=6).filter(
    lambda rows: len({len(r) for r in rows}) == 1))
def test_purity_entropy_and_proportions_bounds(rows):
    m = np.array(rows)
    p, h = purity(m), entropy(m)
    props = proportions(pd.DataFrame(m)).to_numpy()
    for r, row in enumerate(m):
        present = int((row > 0).sum())
        if present == 0:
            assert np.isnan(p[r]) and np.isnan(h[r]) and np.all(props[r] == 0)
            continue
        assert 1 / present - 1e-12 <= p[r] <= 1 + 1e-12
        assert 1 / m.shape[1] - 1e-12 <= p[r]
        assert -1e-12 <= h[r] <= math.log2(present) + 1e-12
        assert props[r].sum() == pytest.approx(1.0)
        # Independent formulas: the largest share, and the entropy term by term.
        shares = [v / row.sum() for v in row]
        assert p[r] == pytest.approx(max(shares))
        assert h[r] == pytest.approx(-sum(s * math.log2(s) for s in shares if s > 0))
        if present == 1:
            assert p[r] == 1 and h[r] == 0


def mutual_information_share(m: np.ndarray) -> float:
    """I(C; T) / H(T) from the joint distribution, term by term."""
    total = m.sum()
    pc, pt = m.sum(1) / total, m.sum(0) / total
    mi = sum(m[c, t] / total * math.log2((m[c, t] / total) / (pc[c] * pt[t]))
             for c in range(m.shape[0]) for t in range(m.shape[1]) if m[c, t])
    ht = -sum(p * math.log2(p) for p in pt if p > 0)
    return mi / ht if ht > 0 else 0.0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 10_000))
def test_pos_information_matches_the_joint_distribution(clusters, n_tags, seed):
    m = np.random.default_rng(seed).integers(0, 6, size=(clusters, n_tags))
    if m.sum() == 0:
        assert np.isnan(pos_information(m))
        return
    got = pos_information(m)
    assert 0 <= got <= 1 + 1e-12
    assert got == pytest.approx(mutual_information_share(m), abs=1e-9)
    assert pos_information(np.eye(3) * 4) == pytest.approx(1.0)  # the cluster determines the tag
    assert pos_information(np.ones((3, 4))) == pytest.approx(0.0)  # every cluster has the same mix


def test_cluster_views_match_brute_force():
    sentences, tags, proj, cents = synthetic(3, n_sentences=5)
    tables = interpret(sentences, tags, proj, cents, top_k=3)
    counts, tops, edges, dists, _ = brute(sentences, tags, proj, cents, top_k=3,
                                          max_distance=tables.info["max_distance"])
    layer, head, c = 1, 2, 3
    for side in SIDES:
        m = cluster_pos_matrix(tables, layer, head, c, side)
        assert list(m.index) == list(range(c)) and list(m.columns) == tag_order(TAGS)
        for cl in range(c):
            for t in TAGS:
                assert m.loc[cl, t] == counts[(layer, head, c, side, cl, t)]
        props = cluster_pos_matrix(tables, layer, head, c, side, normalise=True)
        sizes = m.sum(axis=1)
        assert np.allclose(props.sum(axis=1)[sizes > 0], 1.0)
    table = cluster_table(tables, layer, head, c)
    total_gold = total_same = 0
    for cl in range(c):
        row = table.iloc[cl]
        g, s = edges[(layer, head, c, cl, "gold")], edges[(layer, head, c, cl, "same")]
        total_gold, total_same = total_gold + g, total_same + s
        assert row["gold_edges"] == g and row["same_cluster"] == s
        assert (np.isnan(row["cluster_recall"]) if g == 0 else row["cluster_recall"] == pytest.approx(s / g))
        q = [counts[(layer, head, c, "query", cl, t)] for t in TAGS]
        assert row["query_size"] == sum(q)
        if sum(q):
            assert row["query_purity"] == pytest.approx(max(q) / sum(q))
        expect = " ".join(tops[(layer, head, c, "query", cl, r)][0] for r in range(3)
                          if (layer, head, c, "query", cl, r) in tops)
        assert row["query_top_tokens"] == expect
    assert head_cluster_recall(tables, layer, head, c) == pytest.approx(total_same / total_gold)
    hist = distance_histogram(tables, layer, head)
    md = tables.info["max_distance"]
    assert list(hist["distance"]) == list(range(-md - 1, md + 2))
    assert list(hist["count"]) == [dists[(layer, head, d)] for d in range(-md - 1, md + 2)]
    assert hist["share"].sum() == pytest.approx(1.0)
    with pytest.raises(InterpretError, match="layer 7"):
        cluster_table(tables, 7, 0, c)
    with pytest.raises(InterpretError, match="5 clusters"):
        cluster_pos_matrix(tables, 0, 0, 5, "query")
    with pytest.raises(InterpretError, match="side"):
        cluster_pos_matrix(tables, 0, 0, 2, "value")


def test_head_summary_and_pos_pairs_match_loops():
    sentences, tags, proj, cents = synthetic(4, n_sentences=5)
    tables = interpret(sentences, tags, proj, cents)
    counts, _, edges, dists, pairs = brute(sentences, tags, proj, cents, max_distance=tables.info["max_distance"])
    summary = head_summary(tables, 3)
    assert len(summary) == 2 * 3
    for r in summary.itertuples(index=False):
        total = sum(v for (la, h, _), v in dists.items() if (la, h) == (r.layer, r.head))
        near = sum(v for (la, h, d), v in dists.items() if (la, h) == (r.layer, r.head) and abs(d) <= 1)
        assert r.gold_edges == total and r.share_within_1 == pytest.approx(near / total)
        mx = size = 0
        for cl in range(3):
            row = [counts[(r.layer, r.head, 3, "key", cl, t)] for t in TAGS]
            mx, size = mx + max(row), size + sum(row)
        assert r.key_purity == pytest.approx(mx / size)
        joint = np.array([[counts[(r.layer, r.head, 3, "query", cl, t)] for t in TAGS] for cl in range(3)])
        assert r.query_pos_info == pytest.approx(mutual_information_share(joint), abs=1e-9)
        gold = sum(edges[(r.layer, r.head, 3, cl, "gold")] for cl in range(3))
        same = sum(edges[(r.layer, r.head, 3, cl, "same")] for cl in range(3))
        assert r.cluster_recall == pytest.approx(same / gold)
        mine = {(a, b): v for (la, h, a, b), v in pairs.items() if (la, h) == (r.layer, r.head)}
        best = max(mine.values())
        assert r.top_pos_pair_share == pytest.approx(best / total)
        assert tuple(r.top_pos_pair.split(" → ")) in {k for k, v in mine.items() if v == best}
    grid = head_grid(summary, "share_within_1")
    assert grid.shape == (2, 3)
    assert grid[1, 2] == summary.set_index(["layer", "head"]).loc[(1, 2), "share_within_1"]
    pp = top_pos_pairs(tables, layer=0, head=1, k=3)
    mine = sorted(((v, a, b) for (la, h, a, b), v in pairs.items() if (la, h) == (0, 1)),
                  key=lambda x: (-x[0], x[1], x[2]))[:3]
    assert [(r.count, r.query_pos, r.key_pos) for r in pp.itertuples(index=False)] == mine
    everything = top_pos_pairs(tables, k=1000)
    assert everything["count"].sum() == sum(pairs.values()) and everything["share"].sum() == pytest.approx(1)


def test_head_predictability_matches_a_loop():
    rng = np.random.default_rng(0)
    frame = grid_frame(("kmeans", "window"), [f'{{"p":{p}}}' for p in range(4)],
                       [(layer, head) for layer in range(2) for head in range(3)],
                       lambda: {"recall": float(rng.random()), "sparsity": float(rng.random())})
    rows = frame.to_dict("records")
    best = head_predictability(frame, 0.6)
    assert len(best) == 6
    for r in best.itertuples(index=False):
        ok = [x for x in rows if (x["layer"], x["head"]) == (r.layer, r.head) and x["sparsity"] >= 0.6 - 5e-4]
        if not ok:
            assert np.isnan(r.best_recall)
            continue
        top = max(ok, key=lambda x: (x["recall"], x["sparsity"]))
        assert (r.best_recall, r.method, r.params) == (top["recall"], top["method"], top["params"])
    assert head_predictability(frame, 2.0)["best_recall"].isna().all()
    only = head_predictability(frame, 0.0, methods=["window"])
    assert set(only["method"]) == {"window"}


# --------------------------------------------------------------------------- PCA and points


def test_pca_matches_the_covariance_eigenvectors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)) @ np.diag([3.0, 2.0, 0.5, 0.1]) + 5
    coords, comps, mean = pca_2d(x)
    cov = np.cov(x.T)
    vals, vecs = np.linalg.eigh(cov)
    top = vecs[:, ::-1][:, :2]
    for c in range(2):
        v = top[:, c] * np.sign(top[np.argmax(np.abs(top[:, c])), c])  # the documented sign rule
        np.testing.assert_allclose(comps[c], v, atol=1e-8)
        np.testing.assert_allclose(coords[:, c], (x - x.mean(0)) @ v, atol=1e-8)
    assert coords[:, 0].var() >= coords[:, 1].var()
    one_dim, comps1, _ = pca_2d(rng.normal(size=(5, 1)))
    assert np.all(one_dim[:, 1] == 0) and comps1.shape == (2, 1)
    with pytest.raises(InterpretError):
        pca_2d(np.zeros((0, 3)))


def test_head_points_clusters_and_centres():
    sentences, tags, proj, cents = synthetic(5, n_sentences=3)
    pts, centres = head_points(sentences, tags, proj, layer=1, head=2, centroids=cents[3][1])
    n = sum(len(s.tokens) for s in sentences)
    assert len(pts) == 2 * n and set(pts["side"]) == set(SIDES) and len(centres) == 3
    for r in pts.itertuples(index=False):
        s = sentences[r.sentence]
        q, k = proj.project(1, s.queries(1), s.keys(1))
        x = (q if r.side == "query" else k)[2, r.position].tolist()
        assert r.cluster == nearest(x, cents[3][1][2]) and r.token == s.tokens[r.position]
        assert r.pos == tags[r.sentence][r.position]
    # The PCA keeps the centroids in the same coordinates: distances in 2-D never exceed those in r-D.
    assert np.isfinite(centres[["x", "y"]].to_numpy()).all()
    bare, none = head_points(sentences, tags, proj, 1, 2)
    assert set(bare["cluster"]) == {-1} and none.empty


def test_bad_inputs_get_clear_errors():
    sentences, tags, proj, cents = synthetic(6)
    with pytest.raises(InterpretError, match="tags for"):
        interpret(sentences, tags[:-1], proj, cents)
    with pytest.raises(InterpretError, match="tokens but"):
        interpret(sentences, [t[:-1] if i == 0 else t for i, t in enumerate(tags)], proj, cents)
    with pytest.raises(InterpretError, match="no sentences"):
        interpret([], [], proj, cents)
    bad = {2: {0: torch.zeros(3, 2, 5)}}  # r = 5 centroids for r = 2 projections
    with pytest.raises(InterpretError, match="do not fit"):
        interpret(sentences, tags, proj, bad)


def test_save_and_load_round_trip(tmp_path):
    tables = interpret(*synthetic(7))
    out = tables.save(tmp_path / "t")
    back = InterpretTables.load(out)
    for name in ("counts", "top_tokens", "cluster_edges", "distances", "pos_pairs"):
        pd.testing.assert_frame_equal(getattr(back, name), getattr(tables, name))
    assert back.info == tables.info
    with pytest.raises(InterpretError, match="missing"):
        InterpretTables.load(tmp_path / "nothing")
    (out / "counts.parquet").write_bytes(b"not parquet")
    with pytest.raises(InterpretError, match="counts"):
        InterpretTables.load(out)
    (out / "manifest.json").write_text("{", encoding="utf-8")
    with pytest.raises(InterpretError, match="corrupt"):
        InterpretTables.load(out)


# --------------------------------------------------------------------------- real tiny model, store and CLI


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    from sparsefinder.corpora.extract import extract_corpus
    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.evaluation.sweep import fit_predictors
    from sparsefinder.model.entmax_model import load_model
    from sparsefinder.training.projections import projection_manifest

    model = load_model(str(tiny_model_dir("bert")), device="cpu")
    texts = ["The cat sat on the mat.", "Dogs bark loudly at night while the cats sleep.",
             "It isn't state-of-the-art, and I can't pay 3,000.50 dollars."]
    root = tmp_path_factory.mktemp("interpret")
    store = ExtractionStore.open(extract_corpus(model, texts, root / "store", progress=False))
    proj = Projections(store.num_layers, store.num_heads, store.head_dim, 2, seed=0)
    proj.save(root / "proj", projection_manifest(store, {"rank": 2, "shared": True, "seed": 0}, {}))
    fitted = fit_predictors(store, proj, methods=["kmeans"], grids={"kmeans": [{"n_clusters": 2},
                                                                               {"n_clusters": 3}]})
    return model, store, proj, fitted, root, texts


def test_extraction_and_store_give_the_same_tables(tiny):
    from sparsefinder.corpora.annotate import annotate

    model, store, proj, fitted, _, texts = tiny
    cents = kmeans_centroids(fitted)
    assert sorted(cents) == [2, 3] and cents[3][0].shape == (store.num_heads, 3, 2)
    from_store = interpret_store(store, proj, fitted)
    ex = model.extract(texts)
    sentences = extraction_sentences(ex)
    assert isinstance(sentences[0], ExtractedSentence)
    from sparsefinder.evaluation.interpret import token_tags

    tags = token_tags(sentences, annotate(texts))
    assert tags[0][0] == "SPECIAL" and tags[0][-1] == "SPECIAL" and "NOUN" in tags[0]
    from_ex = interpret(sentences, tags, proj, cents)
    for name in ("counts", "top_tokens", "cluster_edges", "distances", "pos_pairs"):
        pd.testing.assert_frame_equal(getattr(from_ex, name), getattr(from_store, name))
    # Every real token is counted once per head, side and cluster count.
    n_tokens = int(store.lengths().sum())
    per = from_store.counts.groupby(["layer", "head", "n_clusters", "side"])["count"].sum()
    assert (per == n_tokens).all()
    gold = sum(int(store.sentence(i).gold(0).sum()) for i in range(len(store)))
    assert from_store.distances[from_store.distances["layer"] == 0]["count"].sum() == gold
    only = interpret_store(store, proj, fitted, n_clusters=[3])
    assert only.n_clusters == [3]
    with pytest.raises(InterpretError, match="no fitted k-means"):
        interpret_store(store, proj, fitted, n_clusters=[5])


def test_cli_interpret(tiny, capsys):
    from sparsefinder.cli import main
    from sparsefinder.evaluation.fitted import save_fitted

    _, store, proj, fitted, root, _ = tiny
    save_fitted(fitted, root / "fitted")
    out = root / "tables"
    assert main(["interpret", "--store", str(store.path), "--projections", str(root / "proj"), "--fitted",
                 str(root / "fitted"), "--out", str(out), "--clusters", "3", "--summary-clusters", "3",
                 "--figure", str(root / "pos.html")]) == 0
    printed = capsys.readouterr().out
    assert "most positional heads" in printed and "most POS-informative query clusters" in printed
    assert "POS information of the query clusters (3 clusters)" in (root / "pos.html").read_text(encoding="utf-8")
    # the clusters subcommand reads the tables just written and draws one head
    assert main(["clusters", "--tables", str(out), "--layer", "0", "--head", "1", "--side", "key",
                 "--figure", str(root / "head.html")]) == 0
    assert "key clusters × POS (counts), layer 0 head 1, 3 clusters" in capsys.readouterr().out
    html = (root / "head.html").read_text(encoding="utf-8")  # plotly's JSON writes × as \u00d7
    assert "Key clusters \\u00d7 POS (counts), layer 0 head 1, 3 clusters" in html
    tables = InterpretTables.load(out)
    ref = interpret_store(store, proj, fitted, n_clusters=[3])
    pd.testing.assert_frame_equal(tables.counts, ref.counts)
    assert tables.info["tag_source"] == "spacy" and tables.info["sentences"] == len(store)
    assert main(["interpret", "--store", str(store.path), "--projections", str(root / "proj"), "--fitted",
                 str(root / "fitted"), "--out", str(out), "--clusters", "7"]) == 2
    assert "7" in capsys.readouterr().err
