"""sparsefinder.figures: a model's figures and tables in one call, against the library calls they stand for."""

from __future__ import annotations

import numpy as np
import pytest

import sparsefinder as sf
from sparsefinder.evaluation.analysis import head_probabilities


@pytest.fixture(scope="module")
def ex(tiny_model_dir):
    model = sf.load_model(str(tiny_model_dir("bert")), device="cpu")
    return model.extract(["The quick brown fox jumps over the lazy dog.", "A second, longer sentence follows."])


def test_overview_is_the_gold_sparsity_of_the_sentence(ex):
    fig = sf.overview_figure(ex, sentence=1)
    want = np.stack([ex.gold(layer).sparsity()[1].numpy() for layer in range(ex.num_layers)])
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), want, rtol=1e-6)
    pred = sf.predict_batch(ex, "window", {"window": 1})
    recall = sf.overview_figure(ex, sentence=1, prediction=pred)
    np.testing.assert_allclose(np.asarray(recall.data[0].z, dtype=float), pred.metrics["recall"][1])
    with pytest.raises(ValueError, match="sentence 2: the extraction has 2"):
        sf.overview_figure(ex, sentence=2)


def test_head_figure_draws_the_probabilities_and_the_prediction(ex):
    fig = sf.head_figure(ex, layer=1, head=0)
    probs = head_probabilities(ex, 0, 1, 0)
    zero, positive = (np.asarray(t.z, dtype=float) for t in fig.data[:2])
    np.testing.assert_array_equal(np.isnan(positive), probs == 0)  # exact zeros only in the grey trace
    np.testing.assert_allclose(positive[probs > 0], probs[probs > 0], rtol=1e-6)
    assert list(fig.data[0].y)[0] == "[CLS]" and not np.isnan(zero[probs == 0]).any()
    pred = sf.predict_batch(ex, "window", {"window": 1})
    overlay = sf.head_figure(ex, 1, 0, prediction=pred)
    gold, edges = probs > 0, pred.edges(0, 1, probs.shape[0])[0]
    assert overlay.layout.meta["overlay_counts"] == {
        "TP": int((gold & edges).sum()), "FP": int((~gold & edges).sum()), "FN": int((gold & ~edges).sum())}
    with pytest.raises(ValueError, match="layer 9, head 0: the model has"):
        sf.head_figure(ex, 9, 0)


def test_compare_methods_is_the_mean_of_predict_batch(ex):
    table = sf.compare_methods(ex, {"window": {"window": 1}, "random": '{"sparsity":0.5}'})
    assert table["method"].tolist() == ["window", "random"]
    assert table["params"].tolist() == ['{"window":1}', '{"sparsity":0.5}']
    want = sf.predict_batch(ex, "window", {"window": 1}).metrics
    for k in ("recall", "precision", "sparsity", "exact"):
        assert table.loc[0, k] == pytest.approx(float(np.nanmean(want[k])))
    assert sf.compare_methods(ex, ["window"])["params"].tolist() == [""]


def test_shipped_sweep_fronts_and_figure():
    sweep = sf.result_sweep()  # the default model's shipped result, the learned table merged in
    assert {"distance", "stacked"} <= set(sweep["method"])
    front, where = sf.sweep_fronts(sweep, layer=2, head=3, methods=["distance", "window"])
    assert where == "layer 2, head 3" and set(front["method"]) == {"distance", "window"}
    want = sf.pareto_front(sweep[(sweep["layer"] == 2) & (sweep["head"] == 3)
                                 & sweep["method"].isin(["distance", "window"])], by=("method", "layer", "head"))
    assert front["recall"].tolist() == want["recall"].tolist()
    fig = sf.sweep_pareto_figure(sweep, methods=["distance"])
    assert fig.layout.title.text == "Recall against sparsity (all layers and heads)"
    on = front[(front["method"] == "distance") & front["on_front"]]
    assert len(on) > 0
    with pytest.raises(ValueError, match="a head needs its layer"):
        sf.sweep_fronts(sweep, head=3)
    with pytest.raises(ValueError, match="no sweep rows for layer 99"):
        sf.sweep_fronts(sweep, layer=99)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        sf.result_sweep("nope")


def test_shipped_clusters_figure():
    from sparsefinder.evaluation import interpret as itp

    tables = sf.result_interpretation()
    fig = sf.cluster_pos_figure(tables, layer=2, head=3, proportions=True)
    m = itp.cluster_pos_matrix(tables, 2, 3, 8, "query", normalise=True)
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), m.to_numpy(dtype=float))
    assert "8 clusters" in fig.layout.title.text


def test_head_figure_of_a_decoder_marks_the_future_apart(tiny_model_dir):
    model = sf.load_model(str(tiny_model_dir("gpt2")), device="cpu")
    ex = model.extract(["The quick brown fox jumps."])
    fig = sf.head_figure(ex, layer=0, head=0)
    n = int(ex.lengths[0])
    hovers = [t.hovertemplate or "" for t in fig.data]
    assert any("not allowed by this layer's mask" in h for h in hovers)  # j > i: a causal layer's future keys
    pred = sf.predict_batch(ex, "window", {"window": n})  # every allowed pair
    counts = sf.head_figure(ex, 0, 0, prediction=pred).layout.meta["overlay_counts"]
    gold = head_probabilities(ex, 0, 0, 0) > 0
    past = np.tril(np.ones((n, n), dtype=bool))
    edges = pred.edges(0, 0, n)[0]
    # the marks count the past pairs only: TP every gold edge, FP the past pairs outside the gold graph
    assert counts["FP"] == int((edges & past & ~gold).sum())
    assert counts["TP"] == int(gold.sum()) and counts["FN"] == 0
