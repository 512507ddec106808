"""Graph metrics and their aggregation against brute-force loops over (b, h, i, j)."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparsefinder.graphs import AttentionGraph
from sparsefinder.kernels.entmax import entmax
from sparsefinder.metrics import (
    COUNT_COLUMNS,
    FLOAT_COUNT_COLUMNS,
    FRAME_COLUMNS,
    RATIO_COLUMNS,
    aggregate,
    gold_sparsity_grid,
    graph_metrics,
    metrics_frame,
    per_sentence_frame,
)

FAST = settings(max_examples=60, deadline=None)
INT_COUNTS = [c for c in COUNT_COLUMNS if c not in FLOAT_COUNT_COLUMNS]


# --------------------------------------------------------------------------- brute force


def valid_pairs_of(length: int, n: int, causal: bool) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(n) if i < length and j < length and (not causal or j <= i)]


def brute_metrics(gold_raw, pred_raw, lengths, causal, cost=None, probs=None) -> dict[str, np.ndarray]:
    """The docs/method.md §2 metrics with explicit loops; raw edges may include padding and the future.

    Without ``probs`` the mass columns are NaN (unknown)."""
    gold_raw, pred_raw = np.asarray(gold_raw), np.asarray(pred_raw)
    b_, h_, n, _ = gold_raw.shape
    out = {c: np.zeros((b_, h_)) for c in RATIO_COLUMNS + COUNT_COLUMNS}
    for b in range(b_):
        length = int(lengths[b])
        pairs = valid_pairs_of(length, n, causal)
        for h in range(h_):
            gold = {(i, j) for (i, j) in pairs if gold_raw[b, h, i, j]}
            pred = {(i, j) for (i, j) in pairs if pred_raw[b, h, i, j]}
            hits = len(gold & pred)
            covered = 0
            for i in range(length):
                row_gold = {j for (q, j) in gold if q == i}
                row_pred = {j for (q, j) in pred if q == i}
                covered += row_gold <= row_pred
            c = len(pred) if cost is None else float(cost[b][h])
            if probs is None:
                mass = kept = math.nan
            else:
                mass = sum(float(probs[b, h, i, j]) for (i, j) in pairs)
                kept = sum(float(probs[b, h, i, j]) for (i, j) in pred)
            counts = dict(gold_edges=len(gold), pred_edges=len(pred), hits=hits, valid_pairs=len(pairs),
                          valid_queries=length, covered_queries=covered, cost=c, gold_mass=mass, mass_hits=kept)
            for k, v in counts.items():
                out[k][b, h] = v
            if not pairs:
                ratios = dict.fromkeys(RATIO_COLUMNS, math.nan)
            else:
                ratios = dict(
                    recall=hits / len(gold) if gold else 1.0,
                    precision=hits / len(pred) if pred else (1.0 if not gold else 0.0),
                    sparsity=1 - len(pred) / len(pairs),
                    gold_sparsity=1 - len(gold) / len(pairs),
                    exact=covered / length,
                    efficiency=1 - c / len(pairs),
                    mass_recall=math.nan if math.isnan(mass) else (kept / mass if mass > 0 else 1.0),
                )
            for k, v in ratios.items():
                out[k][b, h] = v
    return out


def assert_metrics_equal(got: dict[str, torch.Tensor], expected: dict[str, np.ndarray]) -> None:
    for c in RATIO_COLUMNS + FLOAT_COUNT_COLUMNS:
        assert got[c].dtype == torch.float64, c
        np.testing.assert_allclose(got[c].numpy(), expected[c], rtol=0, atol=1e-12, equal_nan=True, err_msg=c)
    for c in INT_COUNTS:
        assert got[c].dtype == torch.int64, c
        np.testing.assert_array_equal(got[c].numpy(), expected[c], err_msg=c)


def assert_same_metrics(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for c in a:
        np.testing.assert_array_equal(a[c].numpy(), b[c].numpy(), err_msg=c)


# --------------------------------------------------------------------------- strategies


@st.composite
def graph_pairs(draw, max_b: int = 3, max_h: int = 3, max_n: int = 6):
    """Raw gold and predicted edges over one random right-padded batch (lengths 0..N, N ≥ 1)."""
    b = draw(st.integers(1, max_b))
    h = draw(st.integers(1, max_h))
    n = draw(st.integers(1, max_n))
    lengths = draw(st.lists(st.integers(0, n), min_size=b, max_size=b))
    causal = draw(st.booleans())
    gold = draw(hnp.arrays(np.bool_, (b, h, n, n)))
    pred = draw(hnp.arrays(np.bool_, (b, h, n, n)))
    return gold, pred, np.array(lengths), causal


def to_graph(raw: np.ndarray, lengths: np.ndarray, causal: bool) -> AttentionGraph:
    return AttentionGraph(torch.from_numpy(np.array(raw, dtype=bool)), torch.from_numpy(lengths).long(), causal)


# --------------------------------------------------------------------------- graph_metrics


@given(graph_pairs())
@FAST
def test_metrics_match_brute_force(case):
    gold, pred, lengths, causal = case
    got = graph_metrics(to_graph(gold, lengths, causal), to_graph(pred, lengths, causal))
    assert_metrics_equal(got, brute_metrics(gold, pred, lengths, causal))


@given(graph_pairs(), st.integers(0, 2**31 - 1))
@FAST
def test_mass_recall_matches_brute_force(case, seed):
    """Any non-negative weights on the gold edges (and garbage on padding, as a model's padding rows have)."""
    gold, pred, lengths, causal = case
    rng = np.random.default_rng(seed)
    probs = rng.random(gold.shape) * gold  # zero off the gold graph; padding rows may carry weight
    got = graph_metrics(to_graph(gold, lengths, causal), to_graph(pred, lengths, causal), probs=torch.from_numpy(probs))
    expected = brute_metrics(gold, pred, lengths, causal, probs=probs)
    for c in ("gold_mass", "mass_hits", "mass_recall"):
        # Summation order differs (torch reduction vs a Python loop): equal to rounding.
        np.testing.assert_allclose(got[c].numpy(), expected[c], rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=c)


@given(graph_pairs(), st.data())
@FAST
def test_cost_only_changes_efficiency(case, data):
    gold, pred, lengths, causal = case
    b_, h_ = gold.shape[:2]
    cost = np.array(data.draw(hnp.arrays(np.float64, (b_, h_), elements=st.floats(0, 50))))
    g, p = to_graph(gold, lengths, causal), to_graph(pred, lengths, causal)
    got = graph_metrics(g, p, torch.from_numpy(cost))
    assert_metrics_equal(got, brute_metrics(gold, pred, lengths, causal, cost))
    default = graph_metrics(g, p)
    for c in RATIO_COLUMNS + COUNT_COLUMNS:
        if c not in ("efficiency", "cost"):
            np.testing.assert_array_equal(got[c].numpy(), default[c].numpy(), err_msg=c)


def test_cost_broadcasts_and_is_validated():
    g = AttentionGraph(torch.ones(2, 3, 4, 4, dtype=torch.bool), torch.tensor([4, 2]))
    # A per-sentence (B, 1) cost applies to every head.
    got = graph_metrics(g, g, torch.tensor([[8.0], [2.0]]))
    np.testing.assert_allclose(got["efficiency"].numpy(), [[0.5] * 3, [0.5] * 3])
    with pytest.raises(ValueError, match="broadcast"):
        graph_metrics(g, g, torch.ones(3, 3))
    with pytest.raises(ValueError, match="non-negative"):
        graph_metrics(g, g, -torch.ones(2, 3))


@given(graph_pairs())
@FAST
def test_superset_prediction_has_full_recall_and_exact(case):
    gold, pred, lengths, causal = case
    got = graph_metrics(to_graph(gold, lengths, causal), to_graph(gold | pred, lengths, causal))
    has_pairs = got["valid_pairs"] > 0
    assert torch.all(got["recall"][has_pairs] == 1.0)
    assert torch.all(got["exact"][has_pairs] == 1.0)
    assert torch.equal(got["covered_queries"], got["valid_queries"])
    assert torch.equal(got["hits"], got["gold_edges"])


@given(graph_pairs())
@FAST
def test_ratios_lie_in_unit_interval(case):
    gold, pred, lengths, causal = case
    probs = torch.from_numpy(np.random.default_rng(0).random(gold.shape) * gold)
    got = graph_metrics(to_graph(gold, lengths, causal), to_graph(pred, lengths, causal), probs=probs)
    has_pairs = got["valid_pairs"] > 0
    for c in RATIO_COLUMNS:
        values = got[c][has_pairs]
        assert torch.all((values >= 0) & (values <= 1)), c
        # Undefined exactly where the sentence is empty.
        assert torch.all(torch.isnan(got[c][~has_pairs])), c


@given(graph_pairs(), st.data())
@FAST
def test_adding_edges_is_monotone(case, data):
    gold, pred, lengths, causal = case
    more = pred | data.draw(hnp.arrays(np.bool_, pred.shape))
    g = to_graph(gold, lengths, causal)
    before = graph_metrics(g, to_graph(pred, lengths, causal))
    after = graph_metrics(g, to_graph(more, lengths, causal))
    has_pairs = before["valid_pairs"] > 0
    assert torch.all(after["recall"][has_pairs] >= before["recall"][has_pairs])
    assert torch.all(after["exact"][has_pairs] >= before["exact"][has_pairs])
    assert torch.all(after["sparsity"][has_pairs] <= before["sparsity"][has_pairs])
    assert torch.all(after["efficiency"][has_pairs] <= before["efficiency"][has_pairs])
    assert torch.equal(after["gold_sparsity"].nan_to_num(-1), before["gold_sparsity"].nan_to_num(-1))


@given(graph_pairs(), st.data())
@FAST
def test_padding_and_future_never_count(case, data):
    gold, pred, lengths, causal = case
    b_, h_, n, _ = gold.shape
    reference = graph_metrics(to_graph(gold, lengths, causal), to_graph(pred, lengths, causal))

    # Junk edges everywhere outside the valid pairs change nothing.
    junk_g = data.draw(hnp.arrays(np.bool_, gold.shape))
    junk_p = data.draw(hnp.arrays(np.bool_, gold.shape))
    valid = np.zeros(gold.shape[-2:] + (b_,), dtype=bool)
    for b in range(b_):
        for i, j in valid_pairs_of(int(lengths[b]), n, causal):
            valid[i, j, b] = True
    valid = np.moveaxis(valid, -1, 0)[:, None]
    gold_j = np.where(valid, gold, junk_g)
    pred_j = np.where(valid, pred, junk_p)
    got = graph_metrics(to_graph(gold_j, lengths, causal), to_graph(pred_j, lengths, causal))
    assert_same_metrics(got, reference)

    # Appending padding positions (with junk edges) to the batch changes nothing either.
    extra = data.draw(st.integers(1, 3))
    wide_g = data.draw(hnp.arrays(np.bool_, (b_, h_, n + extra, n + extra)))
    wide_p = data.draw(hnp.arrays(np.bool_, (b_, h_, n + extra, n + extra)))
    wide_g[:, :, :n, :n] = gold
    wide_p[:, :, :n, :n] = pred
    got = graph_metrics(to_graph(wide_g, lengths, causal), to_graph(wide_p, lengths, causal))
    assert_same_metrics(got, reference)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_causal_denominators_are_triangular(n):
    lengths = torch.tensor([n])
    full = torch.ones(1, 1, n, n, dtype=torch.bool)
    diag = torch.eye(n, dtype=torch.bool)[None, None]
    causal = graph_metrics(AttentionGraph(diag, lengths, True), AttentionGraph(full, lengths, True))
    assert int(causal["valid_pairs"]) == n * (n + 1) // 2
    assert int(causal["pred_edges"]) == n * (n + 1) // 2
    assert float(causal["sparsity"]) == 0.0
    assert float(causal["gold_sparsity"]) == pytest.approx(1 - n / (n * (n + 1) / 2))
    assert float(causal["precision"]) == pytest.approx(n / (n * (n + 1) / 2))
    dense = graph_metrics(AttentionGraph(diag, lengths), AttentionGraph(full, lengths))
    assert int(dense["valid_pairs"]) == n * n
    assert float(dense["gold_sparsity"]) == pytest.approx(1 - 1 / n)


@given(graph_pairs())
@FAST
def test_gold_against_itself_is_perfect(case):
    gold, _, lengths, causal = case
    g = to_graph(gold, lengths, causal)
    got = graph_metrics(g, g)
    has_pairs = got["valid_pairs"] > 0
    for c in ("recall", "precision", "exact"):
        assert torch.all(got[c][has_pairs] == 1.0), c
    assert torch.equal(got["sparsity"][has_pairs], got["gold_sparsity"][has_pairs])
    assert torch.equal(got["sparsity"][has_pairs], g.sparsity()[has_pairs])


def test_empty_set_conventions():
    lengths = torch.tensor([3])
    empty = AttentionGraph(torch.zeros(1, 1, 3, 3, dtype=torch.bool), lengths)
    one = AttentionGraph(torch.zeros(1, 1, 3, 3, dtype=torch.bool).index_fill(-1, torch.tensor([0]), True), lengths)
    # Empty prediction of empty gold: perfect.
    m = graph_metrics(empty, empty)
    assert (float(m["recall"]), float(m["precision"]), float(m["exact"]), float(m["sparsity"])) == (1, 1, 1, 1)
    # Empty prediction of a non-empty gold: nothing found, nothing right.
    m = graph_metrics(one, empty)
    assert (float(m["recall"]), float(m["precision"]), float(m["exact"])) == (0, 0, 0)
    # Non-empty prediction of an empty gold: recall 1 (nothing missed), precision 0.
    m = graph_metrics(empty, one)
    assert (float(m["recall"]), float(m["precision"]), float(m["exact"])) == (1, 0, 1)


def test_empty_sentence_is_nan_and_counts_zero():
    g = AttentionGraph(torch.ones(2, 1, 2, 2, dtype=torch.bool), torch.tensor([0, 2]))
    m = graph_metrics(g, g, probs=torch.full((2, 1, 2, 2), 0.5))
    for c in RATIO_COLUMNS:
        assert math.isnan(float(m[c][0, 0])) and not math.isnan(float(m[c][1, 0])), c
    for c in COUNT_COLUMNS:
        assert float(m[c][0, 0]) == 0, c


def test_different_batches_raise():
    edges = torch.ones(2, 2, 4, 4, dtype=torch.bool)
    gold = AttentionGraph(edges, torch.tensor([4, 3]))
    with pytest.raises(ValueError, match="different batches: edge shapes"):
        graph_metrics(gold, AttentionGraph(torch.ones(2, 2, 5, 5, dtype=torch.bool), torch.tensor([4, 3])))
    with pytest.raises(ValueError, match="different batches: edge shapes"):
        graph_metrics(gold, AttentionGraph(torch.ones(2, 1, 4, 4, dtype=torch.bool), torch.tensor([4, 3])))
    with pytest.raises(ValueError, match="different batches: lengths"):
        graph_metrics(gold, AttentionGraph(edges, torch.tensor([4, 2])))
    with pytest.raises(ValueError, match="different batches: causal"):
        graph_metrics(gold, AttentionGraph(edges, torch.tensor([4, 3]), causal=True))


# --------------------------------------------------------------------------- frames and aggregation


def random_lengths(gen: torch.Generator, b: int, n: int) -> torch.Tensor:
    lengths = torch.randint(0, n + 1, (b,), generator=gen)
    lengths[0] = n  # at least one sentence fills the batch
    return lengths


def random_batch(gen: torch.Generator, b: int, h: int, n: int, causal: bool, p_gold: float, p_pred: float,
                 lengths: torch.Tensor | None = None):
    lengths = random_lengths(gen, b, n) if lengths is None else lengths
    gold = AttentionGraph(torch.rand(b, h, n, n, generator=gen) < p_gold, lengths, causal)
    pred = AttentionGraph(torch.rand(b, h, n, n, generator=gen) < p_pred, lengths, causal)
    return gold, pred


def test_per_sentence_frame_rows_match_tensors():
    gen = torch.Generator().manual_seed(1)
    by_layer, graphs = {}, {}
    lengths = random_lengths(gen, 3, 5)
    for layer in (0, 3):
        gold, pred = random_batch(gen, 3, 2, 5, causal=False, p_gold=0.3, p_pred=0.5, lengths=lengths)
        graphs[layer] = (gold, pred)
        by_layer[layer] = graph_metrics(gold, pred)
    ids = [10, 11, 12]
    frame = per_sentence_frame(by_layer, ids, extra={"method": "window", "param": 3})
    assert list(frame.columns) == ["sentence", "layer", "head", "method", "param"] + list(FRAME_COLUMNS[3:])
    assert len(frame) == 2 * 3 * 2
    assert frame[["sentence", "layer", "head"]].duplicated().sum() == 0
    for row in frame.itertuples(index=False):
        b = ids.index(row.sentence)
        m = by_layer[row.layer]
        assert row.method == "window" and row.param == 3
        for c in RATIO_COLUMNS + COUNT_COLUMNS:
            expected = float(m[c][b, row.head])
            got = getattr(row, c)
            assert (math.isnan(got) and math.isnan(expected)) or got == expected, c
    for c in INT_COUNTS:
        assert frame[c].dtype == np.int64, c
    # metrics_frame is the same thing straight from graphs.
    direct = metrics_frame([graphs[0][0], graphs[3][0]], [graphs[0][1], graphs[3][1]], torch.tensor(ids),
                           layers=[0, 3], extra={"method": "window", "param": 3})
    pd.testing.assert_frame_equal(direct, frame)


def test_frame_input_validation():
    gold, pred = random_batch(torch.Generator().manual_seed(0), 2, 1, 3, False, 0.5, 0.5)
    m = graph_metrics(gold, pred)
    with pytest.raises(ValueError, match="sentence ids"):
        per_sentence_frame({0: m}, [1, 2, 3])
    with pytest.raises(ValueError, match="clash"):
        per_sentence_frame({0: m}, [1, 2], extra={"recall": 1})
    with pytest.raises(ValueError, match="scalar"):
        per_sentence_frame({0: m}, [1, 2], extra={"method": [1, 2]})
    with pytest.raises(ValueError, match="predicted layers"):
        metrics_frame([gold], [], [1, 2])


def build_frame(seed: int, causal: bool, methods=("a",)) -> pd.DataFrame:
    """Several batches × layers × methods, with some empty sentences among them."""
    gen = torch.Generator().manual_seed(seed)
    frames, next_id = [], 0
    for batch in range(3):
        b = 2 + batch
        ids = list(range(next_id, next_id + b))
        next_id += b
        golds, preds, probs = [], [], []
        # One batch of sentences: every layer sees the same lengths.
        lengths = random_lengths(gen, b, 6)
        if batch == 1:
            lengths[-2:] = torch.tensor([0, 1])  # an empty sentence and a single token
        for _ in range(2):
            g, p = random_batch(gen, b, 3, 6, causal, 0.3, 0.4, lengths)
            golds.append(g)
            preds.append(p)
            probs.append(torch.rand(g.edges.shape, generator=gen, dtype=torch.float64) * g.edges)
        for method in methods:
            shuffled = [AttentionGraph(p.edges.flip(-1), p.lengths, causal) if method == "b" else p for p in preds]
            frames.append(metrics_frame(golds, shuffled, ids, extra={"method": method}, probs=probs))
    return pd.concat(frames, ignore_index=True)


def manual_macro(frame: pd.DataFrame, keys: list[str]) -> dict[tuple, dict[str, float]]:
    """Per group: mean over each sentence's rows, then mean over sentences, skipping NaN sentences."""
    per: dict[tuple, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in frame.to_dict("records"):
        per[tuple(row[k] for k in keys)][row["sentence"]].append(row)
    out = {}
    for group, sentences in per.items():
        res = {}
        for c in RATIO_COLUMNS:
            sentence_means = []
            for rows in sentences.values():
                vals = [r[c] for r in rows if not math.isnan(r[c])]
                if vals:
                    sentence_means.append(sum(vals) / len(vals))
            res[c] = sum(sentence_means) / len(sentence_means) if sentence_means else math.nan
        for c in COUNT_COLUMNS:
            res[c] = sum(r[c] for rows in sentences.values() for r in rows)
        res["sentences"] = sum(1 for rows in sentences.values() if any(r["valid_pairs"] > 0 for r in rows))
        out[group] = res
    return out


def manual_micro(frame: pd.DataFrame, keys: list[str]) -> dict[tuple, dict[str, float]]:
    sums: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in frame.to_dict("records"):
        for c in COUNT_COLUMNS:
            sums[tuple(row[k] for k in keys)][c] += row[c]
    out = {}
    for group, s in sums.items():
        pairs, gold, pred, hits = s["valid_pairs"], s["gold_edges"], s["pred_edges"], s["hits"]
        out[group] = dict(
            recall=hits / gold if gold else 1.0,
            precision=hits / pred if pred else (1.0 if not gold else 0.0),
            sparsity=1 - pred / pairs,
            gold_sparsity=1 - gold / pairs,
            exact=s["covered_queries"] / s["valid_queries"],
            efficiency=1 - s["cost"] / pairs,
            mass_recall=s["mass_hits"] / s["gold_mass"] if s["gold_mass"] else 1.0,
        )
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("by", [("layer", "head"), ("layer",), ()])
def test_aggregate_macro_and_micro_match_manual(by, causal):
    frame = build_frame(seed=7, causal=causal)
    assert (frame["valid_pairs"] == 0).any()  # empty sentences are exercised
    keys = ["method", *by]
    for micro, manual in ((False, manual_macro(frame, keys)), (True, manual_micro(frame, keys))):
        agg = aggregate(frame, by=by, micro=micro)
        assert list(agg.columns) == keys + list(RATIO_COLUMNS) + list(COUNT_COLUMNS) + ["sentences"]
        assert len(agg) == len(manual)
        for row in agg.to_dict("records"):
            expected = manual[tuple(row[k] for k in keys)]
            for c in expected:
                assert row[c] == pytest.approx(expected[c], abs=1e-12), (micro, c)


def test_aggregate_per_layer_weighs_sentence_heads_equally_and_keeps_settings_apart():
    frame = build_frame(seed=3, causal=False, methods=("a", "b"))
    per_layer = aggregate(frame, by=("layer",))
    assert len(per_layer) == 2 * 2  # methods × layers, never mixed
    valid = frame[frame["valid_pairs"] > 0]
    for row in per_layer.to_dict("records"):
        cell = valid[(valid["method"] == row["method"]) & (valid["layer"] == row["layer"])]
        # Every sentence has all heads, so the two-stage mean is the flat mean over (sentence, head).
        assert row["recall"] == pytest.approx(cell["recall"].mean(), abs=1e-12)
        assert row["sentences"] == cell["sentence"].nunique()
    # The overall mean equals the mean of per-head means when every (layer, head) sees the same sentences.
    per_head = aggregate(frame, by=("layer", "head"))
    overall = aggregate(frame, by=())
    for method in ("a", "b"):
        o = overall[overall["method"] == method].iloc[0]
        h = per_head[per_head["method"] == method]
        assert o["sparsity"] == pytest.approx(h["sparsity"].mean(), abs=1e-12)
    # The two methods do differ, so keeping them apart matters.
    assert not np.allclose(overall["recall"].to_numpy()[0], overall["recall"].to_numpy()[1])


def test_aggregate_two_stage_mean_with_missing_heads():
    frame = build_frame(seed=5, causal=False)
    # Drop heads 1 and 2 of one sentence: its single remaining head must weigh
    # as much as any other sentence's mean over three heads.
    target = int(frame.loc[frame["valid_pairs"] > 0, "sentence"].iloc[0])
    frame = frame[~((frame["sentence"] == target) & (frame["head"] > 0))]
    keys = ["method", "layer"]
    manual = manual_macro(frame, keys)
    agg = aggregate(frame, by=("layer",))
    for row in agg.to_dict("records"):
        assert row["precision"] == pytest.approx(manual[(row["method"], row["layer"])]["precision"], abs=1e-12)
    flat = frame[frame["valid_pairs"] > 0].groupby("layer")["precision"].mean()
    assert not np.allclose(agg["precision"].to_numpy(), flat.to_numpy())


def test_aggregate_by_sentence_is_the_mean_over_heads():
    frame = build_frame(seed=2, causal=True)
    agg = aggregate(frame, by=("sentence", "layer"))
    for row in agg.to_dict("records"):
        cell = frame[(frame["sentence"] == row["sentence"]) & (frame["layer"] == row["layer"])]
        assert len(cell) == 3
        expected = cell["exact"].mean()
        assert (math.isnan(row["exact"]) and math.isnan(expected)) or row["exact"] == pytest.approx(expected)


def test_aggregate_rejects_frames_without_metrics():
    with pytest.raises(ValueError, match="lacks"):
        aggregate(pd.DataFrame({"layer": [0], "head": [0]}))


# --------------------------------------------------------------------------- gold sparsity grid


class FakeExtraction:
    def __init__(self, graphs):
        self.graphs = graphs

    @property
    def num_layers(self) -> int:
        return len(self.graphs)

    def gold(self, layer: int) -> AttentionGraph:
        return self.graphs[layer]


@pytest.mark.parametrize("causal", [False, True])
def test_gold_sparsity_grid_matches_loops(causal):
    gen = torch.Generator().manual_seed(11)
    lengths = torch.tensor([5, 0, 1, 2])
    golds = [random_batch(gen, 4, 3, 5, causal, 0.4, 0.5, lengths)[0] for _ in range(2)]
    expected = np.zeros((2, 3))
    for layer, g in enumerate(golds):
        for h in range(3):
            values = []
            for b in range(4):
                length = int(g.lengths[b])
                pairs = valid_pairs_of(length, 5, causal)
                if pairs:  # empty sentences have no sparsity
                    values.append(1 - sum(bool(g.edges[b, h, i, j]) for i, j in pairs) / len(pairs))
            expected[layer, h] = sum(values) / len(values)
    grid = gold_sparsity_grid(golds)
    assert grid.shape == (2, 3) and grid.dtype == np.float64
    np.testing.assert_allclose(grid, expected, atol=1e-12)
    np.testing.assert_allclose(gold_sparsity_grid({0: golds[0], 1: golds[1]}), expected, atol=1e-12)
    np.testing.assert_allclose(gold_sparsity_grid(FakeExtraction(golds)), expected, atol=1e-12)
    # From a frame with two settings, the second over sentence 0 only: each sentence's gold counts once.
    frames = [metrics_frame(golds, golds, [0, 1, 2, 3], extra={"m": m}) for m in ("x", "y")]
    frame = pd.concat([frames[0], frames[1][frames[1]["sentence"] == 0]])
    np.testing.assert_allclose(gold_sparsity_grid(frame), expected, atol=1e-12)
    with pytest.raises(ValueError, match="no graphs"):
        gold_sparsity_grid([])


# --------------------------------------------------------------------------- real entmax graphs


@pytest.mark.parametrize("causal", [False, True])
def test_entmax_gold_graph_and_sparse_consistency(causal):
    """Entmax restricted to a prediction that covers a gold row reproduces that row exactly (docs/method.md §2)."""
    gen = torch.Generator().manual_seed(0)
    b_, h_, n = 3, 2, 9
    lengths = torch.tensor([9, 5, 2])
    mask_value = torch.finfo(torch.float32).min
    allowed = AttentionGraph(torch.ones(b_, 1, n, n, dtype=torch.bool), lengths, causal).valid_pairs()
    # Padding queries still need a row to normalise: let them see the real keys, as transformers does.
    keys_real = (torch.arange(n)[None, :] < lengths[:, None])[:, None, None, :]
    allowed_scores = allowed | (keys_real & ~allowed.any(-1, keepdim=True))
    scores = (3.0 * torch.randn(b_, h_, n, n, generator=gen)).masked_fill(~allowed_scores, mask_value)
    probs = entmax(scores, alpha=1.5)
    gold = AttentionGraph(probs > 0, lengths, causal)
    assert torch.equal(gold.edges, (probs > 0) & allowed)

    self_metrics = graph_metrics(gold, gold)
    # Rows of 1 or 2 real tokens may be dense; the long sentence must be sparse.
    assert torch.all(self_metrics["gold_sparsity"][0] > 0)
    assert torch.all(self_metrics["gold_sparsity"] >= 0)

    # A superset prediction, then one gold key removed from one real query per (b, h).
    pred_edges = gold.edges | (torch.rand(b_, h_, n, n, generator=gen) < 0.3)
    broken = set()
    for b in range(b_):
        for h in range(h_):
            i = int(torch.randint(0, int(lengths[b]), (1,), generator=gen))
            j = int(gold.edges[b, h, i].nonzero()[0])
            pred_edges[b, h, i, j] = False
            broken.add((b, h, i))
    pred = AttentionGraph(pred_edges, lengths, causal)
    restricted = entmax(scores.masked_fill(~pred.edges, mask_value), alpha=1.5)

    m = graph_metrics(gold, pred)
    for b in range(b_):
        for h in range(h_):
            same_rows = 0
            for i in range(int(lengths[b])):
                covered = all(bool(pred.edges[b, h, i, j]) for j in range(n) if bool(gold.edges[b, h, i, j]))
                assert covered == ((b, h, i) not in broken)
                if covered:
                    assert torch.equal(restricted[b, h, i], probs[b, h, i]), (b, h, i)
                else:
                    assert not torch.allclose(restricted[b, h, i], probs[b, h, i])
                same_rows += bool(torch.equal(restricted[b, h, i], probs[b, h, i]))
            # exact is the fraction of queries whose restricted output is the dense one.
            assert float(m["exact"][b, h]) == pytest.approx(same_rows / int(lengths[b]))
            assert float(m["recall"][b, h]) < 1.0
