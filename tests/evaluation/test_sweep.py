"""The sweep engine against a straightforward per-sentence computation; Pareto fronts; saving; determinism."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefinder.corpora.extract import extract_corpus
from sparsefinder.corpora.store import ExtractionStore, LayerBatch
from sparsefinder.evaluation.pareto import best_recall_at, best_recall_table, front_mask, pareto_front
from sparsefinder.evaluation.sweep import (
    SENTENCE_COLUMNS,
    SWEEP_COLUMNS,
    EmbeddingContext,
    canonical_params,
    fit_predictors,
    load_sweep,
    run_sweep,
    save_sweep,
)
from sparsefinder.evaluation.sweep.dense import _balanced_members, _codes_share, _lsh_buckets, _pack_ids, _pack_members
from sparsefinder.metrics import COUNT_COLUMNS, RATIO_COLUMNS, aggregate, graph_metrics
from sparsefinder.model.entmax_model import load_model
from sparsefinder.predictors import REGISTRY, get_predictor
from sparsefinder.predictors.baselines import balanced_membership, lsh_buckets
from sparsefinder.predictors.clustering import sq_dists
from sparsefinder.training.projections import Projections
from tests.helpers import MASS_COLUMNS, MASS_TOLERANCE, assert_aggregates_match, grid_frame, stored_gold_probs

TEXTS = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "Hi.",
    "Sparse attention is interesting because entmax gives exact zeros to many keys.",
    "One two three four five six seven eight nine ten eleven twelve.",
    "Dogs bark.",
    "The committee said on Tuesday that the new rules would take effect next year.",
]


class WordContext:
    """Syntax context for tests: each word's head is the previous word (a chain), word ids from the store."""

    keys = ("word_heads", "word_ids")

    def __init__(self, store: ExtractionStore) -> None:
        self.store = store

    def sentence(self, i: int) -> dict[str, Any]:
        ids = self.store.sentence(i).word_ids
        words = max((w for w in ids if w is not None), default=-1) + 1
        return {"word_ids": ids, "word_heads": [w - 1 for w in range(words)]}

    def __call__(self, batch: LayerBatch) -> dict[str, Any]:
        per = [self.sentence(int(i)) for i in batch.indices]
        return {"word_ids": [p["word_ids"] for p in per], "word_heads": [p["word_heads"] for p in per]}


@pytest.fixture(scope="module", params=["bert", "gpt2", "modernbert"])
def setup(request, tiny_model_dir, tmp_path_factory):
    model = load_model(tiny_model_dir(request.param), device="cpu")
    out = tmp_path_factory.mktemp(f"sweep-{request.param}") / "store"
    extract_corpus(model, TEXTS, out, progress=False)
    store = ExtractionStore.open(out)
    proj = Projections(store.num_layers, store.num_heads, store.head_dim, rank=3, seed=0)
    embeddings = model.model.get_input_embeddings().weight.detach()
    return store, proj, embeddings


def _grids(store: ExtractionStore, proj: Projections) -> dict[str, list[dict[str, Any]]]:
    # Thresholds at quantiles of the actual squared distances, so every point is informative.
    batch = next(store.iter_batches(0, len(store)))
    d = sq_dists(proj.project_queries(0, batch.queries), proj.project_keys(0, batch.keys))
    real = batch.gold.valid_pairs().expand_as(d)
    qs = [round(float(torch.quantile(d[real].double(), p)), 3) for p in (0.2, 0.5, 0.8)]
    return {
        "distance": [{"threshold": t} for t in qs] + [{"threshold": qs[0], "window": 3, "global_tokens": True}],
        # 12 buckets x 3 dimensions and 10 buckets x 4 rounds need two 31-bit words of group codes.
        "bucketing": [{"n_buckets": b} for b in (2, 3, 5, 12)] + [{"n_buckets": 4, "window": 1}],
        "kmeans": [{"n_clusters": 2}, {"n_clusters": 3}, {"n_clusters": 3, "top_t": 2},
                   {"n_clusters": 4, "global_tokens": True}, {"n_clusters": 33, "top_t": 3}],
        "blocks": [{"top_k": 1}, {"top_k": 2}, {"top_k": 3}, {"top_k": 1, "variant": "v2"},
                   {"top_k": 2, "variant": "v2"}, {"top_k": 2, "block_size": 3, "n_clusters": 3, "block_window": 0}],
        "window": [{"window": w} for w in (0, 1, 3, 7)] + [{"window": 3, "global_tokens": True}],
        "bigbird": [{"num_random": r} for r in (0, 1, 3)] + [{"num_random": 2, "window": 0, "global_tokens": False}],
        "longformer": [{"num_global": g} for g in (0, 2, 3, 6)],
        "reformer": [{"n_buckets": 2}, {"n_buckets": 4, "n_rounds": 2}, {"n_buckets": 10}],
        "routing": [{"n_clusters": 2}, {"n_clusters": 3}, {"n_clusters": 33}],
        "strided": [{"stride": 2}, {"stride": 4}],
        "syntax": [{"hops": 1}, {"hops": 2}],
        "lexical": [{"sparsity": 0.5}, {"sparsity": 0.8}],
        "position": [{"window": 1}, {"window": 5}],
        "random": [{"sparsity": s} for s in (0.5, 0.8, 0.95)] + [{"sparsity": 0.7, "window": 3}],
        # Pages of 2-4 tokens: these sentences are short, so larger pages would hold whole sentences.
        "pages": [{"page_size": 2}, {"page_size": 3, "slack": 0.75}, {"page_size": 2, "slack": 0.5, "sparsity": 0.7},
                  {"page_size": 4, "sparsity": 0.5, "window": 3, "global_tokens": True}],
    }


class BothContexts:
    keys = ("embeddings", "word_heads", "word_ids")

    def __init__(self, store: ExtractionStore, embeddings: torch.Tensor) -> None:
        self.emb = EmbeddingContext(store, embeddings)
        self.words = WordContext(store)

    def __call__(self, batch: LayerBatch) -> dict[str, Any]:
        return {**self.emb(batch), **self.words(batch)}


def _reference(store, proj, fitted, method, point, layer, seed, embeddings) -> pd.DataFrame:
    """Straightforward: per sentence, build the graph with predict and score it with graph_metrics."""
    cls = REGISTRY[method]
    key = canonical_params(point)
    words = WordContext(store)
    rows = []
    for i in range(len(store)):
        s = store.sentence(i)
        q, k = s.queries(layer)[None], s.keys(layer)[None]
        if cls.input_space in ("projected", "any"):
            q, k = proj.project_queries(layer, q), proj.project_keys(layer, k)
        if cls.requires_fit:
            pred = fitted[method][key][layer]
        else:
            params = {"seed": seed} if "seed" in cls._param_names() else {}
            pred = get_predictor(method, **{**params, **point})
        ctx: dict[str, Any] = {"head_dim": store.head_dim, "sentence_ids": [i]}
        if method == "lexical":
            ctx["embeddings"] = [embeddings[torch.tensor(s.input_ids)]]
        if method == "syntax":
            w = words.sentence(i)
            ctx.update(word_ids=[w["word_ids"]], word_heads=[w["word_heads"]])
        graph, cost = pred.predict_with_cost(q, k, [s.length], store.causal, **ctx)
        m = graph_metrics(s.gold_graph(layer), graph, cost, probs=stored_gold_probs(store, i, layer))
        for h in range(store.num_heads):
            rows.append({"sentence": i, "head": h, **{c: float(m[c][0, h]) for c in RATIO_COLUMNS + COUNT_COLUMNS}})
    return pd.DataFrame(rows)


def test_sweep_equals_straightforward_computation(setup):
    store, proj, embeddings = setup
    grids = _grids(store, proj)
    fitted = fit_predictors(store, proj, grids=grids, seed=3, max_points=500)
    context = BothContexts(store, embeddings)
    kw = dict(grids=grids, fitted=fitted, batch_size=3, progress=False, seed=5, context=context)
    frame = run_sweep(store, proj, **kw)
    assert list(frame.columns) == list(SWEEP_COLUMNS)
    assert frame.attrs["sweep"]["skipped"] == {}
    assert set(frame["method"]) == {m for m, c in REGISTRY.items() if c.default_sweep}
    sentences = run_sweep(store, proj, per_sentence=True, **kw)
    assert list(sentences.columns) == list(SENTENCE_COLUMNS)
    assert len(sentences) == len(frame) * len(store)

    informative = 0
    for method, points in grids.items():
        for point in points:
            key = canonical_params(point)
            for layer in range(store.num_layers):
                ref = _reference(store, proj, fitted, method, point, layer, 5, embeddings)
                got = frame[(frame.method == method) & (frame.params == key) & (frame.layer == layer)]
                got = got.sort_values("head")
                assert len(got) == store.num_heads, (method, key)
                assert_aggregates_match(got, ref, "head", f"{method} {key} layer {layer}")
                assert (got["sentences"] == len(store)).all()
                per = sentences[(sentences.method == method) & (sentences.params == key) & (sentences.layer == layer)]
                per = per.sort_values(["sentence", "head"])
                ref = ref.sort_values(["sentence", "head"])
                for col in RATIO_COLUMNS + COUNT_COLUMNS:
                    tol = MASS_TOLERANCE if col in MASS_COLUMNS else dict(rtol=1e-12, atol=1e-12)
                    np.testing.assert_allclose(per[col].to_numpy(np.float64), ref[col].to_numpy(np.float64),
                                               **tol, err_msg=f"{method} {key} {layer} {col}")
                informative += bool(((got.recall > 0) & (got.recall < 1)).any())
    # The grids are not degenerate: most configurations find some but not all gold edges.
    assert informative > sum(len(p) for p in grids.values())

    # Per-sentence rows aggregate (metrics.aggregate, macro) back to the table.
    again = aggregate(sentences, by=("layer", "head"))
    merged = frame.merge(again, on=["method", "family", "params", "layer", "head"], suffixes=("", "_agg"))
    assert len(merged) == len(frame)
    for col in RATIO_COLUMNS + COUNT_COLUMNS + ("sentences",):
        np.testing.assert_allclose(merged[col].to_numpy(np.float64), merged[f"{col}_agg"].to_numpy(np.float64),
                                   rtol=1e-12, atol=1e-12)


def test_opt_in_exact_bounds_sweep_equals_straightforward_computation(setup):
    """``exact_bounds`` is not in a default sweep (slow); asked for, it scores as predict does: recall 1,
    cost = the pairs its kernel scored."""
    store, proj, embeddings = setup
    # Blocks of 2 keys, so the bounds prune on these short sentences (the cost differs from all pairs).
    grids = {"exact_bounds": [{"block_size": 2}, {"block_size": 4, "seed_window": 0, "seed_global": False}]}
    frame = run_sweep(store, None, methods=["exact_bounds"], grids=grids, batch_size=3, progress=False)
    assert set(frame["method"]) == {"exact_bounds"}
    for point in grids["exact_bounds"]:
        key = canonical_params(point)
        for layer in range(store.num_layers):
            ref = _reference(store, proj, {}, "exact_bounds", point, layer, 0, embeddings)
            got = frame[(frame.params == key) & (frame.layer == layer)].sort_values("head")
            assert_aggregates_match(got, ref, "head", f"exact_bounds {key} layer {layer}")
            if store.windows[layer] is None:
                # Exact for the layer's dense entmax; a sliding-window layer's mask is not given to the
                # predictor, so there its support is the unmasked row's (scored, not certified).
                assert (got["recall"] == 1).all() and (got["efficiency"] > 0).any()


@pytest.mark.parametrize("seed", range(4))
def test_fast_group_helpers_match_the_predictors(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([0, 1, 5, 9])
    # Few distinct values: many exact ties in the similarities.
    x = torch.randint(-1, 2, (4, 3, 9, 2), generator=g).float()
    centroids = torch.nn.functional.normalize(torch.randn(3, 5, 2, generator=g), dim=-1)
    assert torch.equal(_balanced_members(x, centroids, lengths), balanced_membership(x, centroids, lengths))
    # One centroid: up to 9 tokens per cluster, the topk path (5 centroids: at most 2, peeled maxima).
    one = centroids[:, :1]
    assert torch.equal(_balanced_members(x, one, lengths), balanced_membership(x, one, lengths))
    # LSH buckets: integer rotations, so the projections tie often (also +0 against -0).
    rot = torch.randint(-1, 2, (4, 3, 2, 5), generator=g).double()
    assert torch.equal(_lsh_buckets(x, rot), lsh_buckets(x, rot))
    # Bit codes over 2 words (40 groups) and over 3 words (70 groups) against explicit loops.
    for groups in (40, 70):
        mq = torch.rand(4, 3, groups, 9, generator=g) < 0.05
        mk = torch.rand(4, 3, groups, 9, generator=g) < 0.05
        want = torch.einsum("bhgi,bhgj->bhij", mq.float(), mk.float()) > 0
        assert torch.equal(_codes_share(_pack_members(mq), _pack_members(mk)), want)
    for parts in (6, 4):  # 6 partitions of 7 ids: two words; 4: one word (28 bits); -1 = none
        ids_q = torch.randint(-1, 7, (4, 3, parts, 9), generator=g)
        ids_k = torch.randint(-1, 7, (4, 3, parts, 9), generator=g)
        want = ((ids_q[:, :, :, :, None] == ids_k[:, :, :, None, :]) & (ids_q[:, :, :, :, None] >= 0)).any(dim=2)
        assert torch.equal(_codes_share(_pack_ids(ids_q, 7), _pack_ids(ids_k, 7)), want)


class Halve:
    """A stand-in projection: the first two coordinates of q and k (duck-typed, no manifest)."""

    rank = 2

    def __init__(self, store: ExtractionStore) -> None:
        self.num_layers, self.num_heads, self.head_dim = store.num_layers, store.num_heads, store.head_dim

    def project_queries(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return q[..., :2] * 0.5

    def project_keys(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        return k[..., :2] * 0.5


def test_default_methods_skip_what_cannot_run_and_explicit_requests_fail(setup):
    store = setup[0]
    grids = {"window": [{"window": 3}], "random": [{"sparsity": 0.5}], "strided": [{"stride": 2}],
             "reformer": [{"n_buckets": 2}], "longformer": [{"num_global": 2}], "bigbird": [{"num_random": 2}],
             "position": [{"window": 1}]}
    frame = run_sweep(store, None, grids=grids, layers=[0], progress=False)
    skipped = frame.attrs["sweep"]["skipped"]
    assert set(skipped) == {"distance", "bucketing", "kmeans", "blocks", "routing", "syntax", "lexical",
                            "distance_budget", "topk", "stacked", "priors", "cascade", "global_band"}
    # Opt-in methods are neither run nor listed as skipped by a default sweep.
    assert not {"stacked_mlp", "exact_bounds"} & (set(frame.method) | set(skipped))
    assert "projections" in skipped["distance"] and "fitted" in skipped["routing"] and "context" in skipped["syntax"]
    # Reformer runs on the raw queries and keys without projections; pages needs nothing either (its own grid).
    assert set(frame.method) == set(grids) | {"pages"}
    with pytest.raises(ValueError, match="needs projections"):
        run_sweep(store, None, methods=["distance"], progress=False)
    with pytest.raises(ValueError, match="fitted"):
        run_sweep(store, Halve(store), methods=["kmeans"], progress=False)
    with pytest.raises(ValueError, match="context"):
        run_sweep(store, Halve(store), methods=["lexical"], progress=False)
    fitted = fit_predictors(store, Halve(store), methods=["kmeans"], grids={"kmeans": [{"n_clusters": 2}]})
    with pytest.raises(ValueError, match="no fitted kmeans"):
        run_sweep(store, Halve(store), methods=["kmeans"], fitted=fitted, progress=False)
    # Grid points that differ only in what prediction uses share one fit.
    fitted = fit_predictors(store, Halve(store), methods=["blocks"], layers=[1],
                            grids={"blocks": [{"top_k": 1}, {"top_k": 3}, {"top_k": 1, "n_clusters": 2}]})
    by_params = fitted["blocks"]
    assert by_params['{"top_k":1}'][1].centroids_ is by_params['{"top_k":3}'][1].centroids_
    assert by_params['{"n_clusters":2,"top_k":1}'][1].centroids_.shape[1] == 2
    assert fitted.info["layers"] == [1]
    assert set(fitted.info["seconds_by_method"]) == {"blocks", "(load)"}
    bad = Halve(store)
    bad.num_heads += 1
    with pytest.raises(ValueError, match="num_heads"):
        run_sweep(store, bad, methods=["distance"], progress=False)


def test_same_seed_same_table_and_seed_matters(setup):
    store = setup[0]
    proj = Halve(store)
    grids = {"bigbird": [{"num_random": 1}, {"num_random": 2}], "random": [{"sparsity": 0.6}],
             "distance": [{"threshold": 0.5}, {"threshold": 2.0}], "bucketing": [{"n_buckets": 3}],
             "reformer": [{"n_buckets": 4}]}
    kw = dict(methods=list(grids), grids=grids, progress=False, batch_size=2)
    threads = torch.get_num_threads()
    a = run_sweep(store, proj, seed=1, threads=1, **kw)
    assert torch.get_num_threads() == threads  # restored
    b = run_sweep(store, proj, seed=1, **kw)
    pd.testing.assert_frame_equal(a, b)
    c = run_sweep(store, proj, seed=2, batch_size=5, **{k: v for k, v in kw.items() if k != "batch_size"})
    same_seed_other_batches = run_sweep(store, proj, seed=1, batch_size=5,
                                        **{k: v for k, v in kw.items() if k != "batch_size"})
    # Batching never changes the numbers (sentences draw by their own ids); the seed does.
    pd.testing.assert_frame_equal(a, same_seed_other_batches, check_exact=False, rtol=1e-12)
    stochastic = a.method.isin(["bigbird", "random", "reformer"])
    assert not np.allclose(a[stochastic].recall, c[stochastic].recall)
    np.testing.assert_allclose(a[~stochastic].recall, c[~stochastic].recall, rtol=1e-12)


def test_parquet_round_trip(setup, tmp_path):
    store = setup[0]
    frame = run_sweep(store, Halve(store), grids={"distance": [{"threshold": 1.0}]}, methods=["distance", "window"],
                      progress=False)
    path = save_sweep(frame, tmp_path / "out" / "sweep.parquet", manifest={"projections_dir": "somewhere"})
    back = load_sweep(path)
    pd.testing.assert_frame_equal(back, frame)
    info = back.attrs["sweep"]
    assert info["projections_dir"] == "somewhere"
    assert info["store"]["path"] == str(store.path) and info["store"]["weights_sha256"]
    assert info["rows"] == len(frame) and info["methods"] == ["distance", "window"]
    assert info["configurations"]["distance"]['{"threshold":1.0}']["threshold"] == 1.0
    side = json.loads(Path(tmp_path / "out" / "sweep.json").read_text())
    assert side["format"] == "sparsefinder-sweep"
    pd.testing.assert_frame_equal(load_sweep(path), back)


# ---------------------------------------------------------------------- Pareto fronts


def _brute_front(x: list[float], y: list[float]) -> list[bool]:
    out = []
    for i in range(len(x)):
        dominated = any(
            x[j] >= x[i] and y[j] >= y[i] and (x[j] > x[i] or y[j] > y[i]) for j in range(len(x)) if j != i
        )
        out.append(not dominated and not (math.isnan(x[i]) or math.isnan(y[i])))
    return out


points = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 5), st.sampled_from(["a", "b"]), st.integers(0, 1)),
    min_size=1, max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(points)
def test_front_mask_against_brute_force(pts):
    x = [p[0] / 5 for p in pts]
    y = [p[1] / 5 for p in pts]
    assert front_mask(np.array(x), np.array(y)).tolist() == _brute_front(x, y)


@settings(max_examples=40, deadline=None)
@given(points)
def test_pareto_front_per_group_against_brute_force(pts):
    # One configuration per point, scored on two heads of one layer with the same values per head.
    rows = []
    for n, (x, y, method, layer) in enumerate(pts):
        for head in (0, 1):
            rows.append({"method": method, "params": canonical_params({"i": n}), "layer": layer, "head": head,
                         **{c: 0.5 for c in RATIO_COLUMNS}, "sparsity": x / 5, "recall": y / 5})
    frame = pd.DataFrame(rows)
    for by in [("method",), (), ("method", "layer"), ("method", "layer", "head")]:
        out = pareto_front(frame, by=by)
        groups = list(by)
        keyed = out.groupby(groups, sort=False).indices.values() if groups else [np.arange(len(out))]
        for rows_idx in keyed:
            sub = out.iloc[rows_idx]
            assert sub.on_front.tolist() == _brute_front(sub.sparsity.tolist(), sub.recall.tolist())


def test_pareto_front_averages_over_heads_and_handles_nan():
    frame = pd.DataFrame({
        "method": ["m"] * 6, "params": ["a", "a", "b", "b", "c", "c"], "layer": [0] * 6, "head": [0, 1] * 3,
        "sparsity": [0.2, 0.4, 0.6, 0.6, np.nan, np.nan], "recall": [0.9, 0.7, 0.5, 0.7, 1.0, 1.0],
        **{c: 0.0 for c in RATIO_COLUMNS if c not in ("sparsity", "recall")},
    })
    out = pareto_front(frame).set_index("params")
    assert out.loc["a", "sparsity"] == pytest.approx(0.3) and out.loc["a", "recall"] == pytest.approx(0.8)
    assert out.on_front.to_dict() == {"a": True, "b": True, "c": False}  # c's mean sparsity is NaN
    per_head = pareto_front(frame, by=("method", "layer", "head"))
    head0 = per_head[per_head["head"] == 0].set_index("params").on_front.to_dict()
    assert head0 == {"a": True, "b": True, "c": False}
    head1 = per_head[per_head["head"] == 1].set_index("params").on_front.to_dict()
    assert head1 == {"a": False, "b": True, "c": False}  # b (0.6, 0.7) dominates a (0.4, 0.7)


def test_best_recall_at_against_manual():
    rng = np.random.default_rng(0)
    frame = grid_frame(("m1", "m2"), [f"p{p}" for p in range(6)], [(head // 2, head % 2) for head in range(3)],
                       lambda: {"sparsity": rng.uniform(0.3, 1.0), "recall": rng.uniform(),
                                **{c: 0.0 for c in RATIO_COLUMNS if c not in ("sparsity", "recall")}})
    for t in (0.5, 0.7, 0.9):
        got = best_recall_at(frame, t).set_index("method")
        for method in ("m1", "m2"):
            means = frame[frame.method == method].groupby("params")[["sparsity", "recall"]].mean()
            ok = means[means.sparsity >= t]
            if ok.empty:
                assert np.isnan(got.loc[method, "recall"]) and got.loc[method, "params"] is None or pd.isna(
                    got.loc[method, "params"])
            else:
                assert got.loc[method, "recall"] == pytest.approx(ok.recall.max())
                assert got.loc[method, "params"] == ok.recall.idxmax()
                assert got.loc[method, "sparsity"] >= t
        assert (got.min_sparsity == t).all()
    table = best_recall_table(frame)
    assert list(table.columns) == ["recall @ sparsity >= 0.5", "recall @ sparsity >= 0.7", "recall @ sparsity >= 0.9"]
    assert table.loc["m1", "recall @ sparsity >= 0.5"] == pytest.approx(best_recall_at(frame, 0.5).recall.iloc[0])
    # Recall can only drop as the sparsity demanded rises.
    values = table.to_numpy()
    finite = ~np.isnan(values)
    assert all(np.all(np.diff(row[ok]) <= 1e-12) for row, ok in zip(values, finite, strict=True))


def test_fast_paths_are_registered_by_class_and_planned():
    """Importing the sweep registers the nested and shared dense kernels; a method re-registered with
    another class under the same name would not inherit them (they are keyed by class)."""
    from sparsefinder.evaluation.sweep.batch import GROUPED, NESTED, SHARED_DENSE
    from sparsefinder.evaluation.sweep.configs import _Config
    from sparsefinder.evaluation.sweep.plan import _plan

    nested = {m for m, cls in REGISTRY.items() if cls in NESTED}
    shared = {m for m, cls in REGISTRY.items() if cls in SHARED_DENSE}
    learned = {"distance_budget", "topk", "stacked", "priors", "cascade", "global_band", "stacked_mlp"}
    assert nested == {"distance", "window", "position", "longformer", "bigbird", "random", "blocks"} | learned
    assert shared == {"bucketing", "kmeans", "reformer", "routing", "strided"}
    assert {m for m, cls in REGISTRY.items() if cls in GROUPED} == {"pages"}
    configs = [_Config(i, "window", {"window": w}, f"w{w}", get_predictor("window", window=w))
               for i, w in enumerate((1, 3, 5))]
    configs.append(_Config(3, "strided", {}, "s", get_predictor("strided")))
    configs.append(_Config(4, "syntax", {}, "y", get_predictor("syntax")))
    units = _plan(configs)
    assert [u.kind for u in units] == ["nested", "shared", "generic"] and len(units[0].configs) == 3
