"""Dashboard features across pages: the sidebar method overlay on Explore, the active
result (shipped or saved by the Corpus page), offline HTML figure downloads and
long inputs drawn as blocks. Values are checked against the library run directly."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("streamlit")

from tests.app.test_app import (  # noqa: E402
    DEFAULT_TEXT,
    GOOD_TXT,
    MASS,
    RATIOS,
    decode,
    default_load_error,  # noqa: F401 (fixture)
    head_figure,
    lib,  # noqa: F401 (fixture)
    library_head_metrics,
    make_app,
    plotly_specs,
    shown_metrics,
    upload,
)

METHOD, PARAMS = "window", json.dumps({"window": 3}, separators=(",", ":"))


def library_recall_grid(model, text: str, method: str, params: str) -> np.ndarray:
    """``(L, H)`` recall of ``method`` on ``text``, from the predictors and metrics directly."""
    from sparsefinder.metrics import graph_metrics
    from sparsefinder.predictors import get_predictor

    ex = model.extract([text])
    pred = get_predictor(method, **json.loads(params))
    rows = []
    for layer in range(ex.num_layers):
        q, k = ex.queries[layer].float(), ex.keys[layer].float()
        rows.append(graph_metrics(ex.gold(layer), pred.predict(q, k, ex.lengths))["recall"][0].numpy())
    return np.stack(rows)


def explore_with_method(lib, method=METHOD, params=PARAMS, **qp):  # noqa: F811
    at = make_app(lib.name, method=method, params=params, **qp)
    assert not at.exception, at.exception
    return at


def test_sidebar_method_from_url_and_head_metrics(lib):  # noqa: F811
    at = explore_with_method(lib, layer=2, head=5)
    assert at.selectbox(key="_w_method").value == METHOD
    assert at.selectbox(key="_w_params").value == PARAMS
    assert at.query_params["method"] == METHOD and at.query_params["params"] == PARAMS
    want = library_head_metrics(lib, DEFAULT_TEXT, 2, 5, METHOD, PARAMS)
    got = shown_metrics(at)
    assert set(got) == set(RATIOS + MASS)
    for r in RATIOS + MASS:
        assert got[r] == pytest.approx(want[r], abs=6e-5), r


def test_overlay_marks_are_the_outcomes(lib):  # noqa: F811
    from sparsefinder.predictors import get_predictor

    at = explore_with_method(lib, layer=1, head=3)
    fig = head_figure(at)
    names = [t.get("name") for t in fig["data"]]
    overlay = fig["data"][names.index("prediction")]
    code = decode(overlay["z"]).astype(float)
    ex = lib.extract([DEFAULT_TEXT])
    gold = ex.probs[1][0, 3].numpy() > 0
    pred = get_predictor(METHOD, window=3).predict(ex.queries[1].float(), ex.keys[1].float(),
                                                   ex.lengths).edges[0, 3].numpy()
    # brute force: one code per cell, 0 TP, 1 FP, 2 FN, none for pairs in neither graph
    n = gold.shape[0]
    for i in range(n):
        for j in range(n):
            want = 0 if gold[i, j] and pred[i, j] else 1 if pred[i, j] else 2 if gold[i, j] else None
            if want is None:
                assert np.isnan(code[i, j]), (i, j)
            else:
                assert code[i, j] == want, (i, j)
    title = fig["layout"]["title"]["text"]
    assert f"TP (gold & predicted): {int((gold & pred).sum())}" in title
    assert f"FN (missed gold edge): {int((gold & ~pred).sum())}" in title


def test_overview_coloured_by_method_recall(lib):  # noqa: F811
    at = explore_with_method(lib)
    at.radio(key="_w_overview").set_value("method recall").run()
    assert not at.exception, at.exception
    want = library_recall_grid(lib, DEFAULT_TEXT, METHOD, PARAMS)
    table = at.dataframe[0].value.to_numpy(dtype=float)
    np.testing.assert_allclose(table, want, atol=1e-6)
    spec = next(s for s in plotly_specs(at) if "Recall of window" in s["layout"]["title"]["text"])
    np.testing.assert_allclose(decode(spec["data"][0]["z"]).astype(float), want, atol=1e-6)


def test_unknown_method_in_url_falls_back(lib):  # noqa: F811
    at = make_app(lib.name, method="no-such-method", params="{}")
    assert not at.exception, at.exception
    assert at.selectbox(key="_w_method").value == "(gold only)"
    assert "method" not in at.query_params


def test_sentence_from_the_active_corpus(lib):  # noqa: F811
    from sparsefinder.corpora.readers import default_corpus

    at = make_app(lib.name)
    at.radio(key="_w_source").set_value("sentence from the active corpus").run()
    assert not at.exception, at.exception
    texts = default_corpus(split="validation").texts()
    box = at.selectbox(key="_w_corpus_sentence")
    assert len(box.options) == len(texts)
    box.select(4).run()
    assert not at.exception, at.exception
    ex = lib.extract([texts[4]])
    assert at.metric[1].value == str(int(ex.lengths[0]))
    want = np.stack([ex.gold(layer).sparsity()[0].numpy() for layer in range(ex.num_layers)])
    np.testing.assert_allclose(at.dataframe[0].value.to_numpy(dtype=float), want, atol=1e-6)


def test_long_input_is_drawn_in_blocks(lib):  # noqa: F811
    from sparsefinder.plots.heatmaps import MAX_SIDE

    at = make_app(lib.name)
    long_text = " ".join(["word"] * 300 + ["and", "more", "words"] * 100)
    at.text_area(key="_w_text").input(long_text).run()
    assert not at.exception, at.exception
    fig = head_figure(at)
    side = len(fig["data"][1]["y"])
    assert side <= MAX_SIDE
    ex = lib.extract([long_text])
    n = int(ex.lengths[0])
    assert n == lib.max_length and side == -(-n // -(-n // MAX_SIDE))
    assert any("drawn as blocks" in c.value for c in at.caption)


def test_figure_downloads_are_standalone_html(lib):  # noqa: F811
    from app import state
    from sparsefinder.plots.heatmaps import sparsity_heatmap

    at = make_app(lib.name)
    labels = [b.label for b in at.get("download_button")]
    assert labels.count("Download the figure (HTML)") == 2 and "Download the table (CSV)" in labels
    html = state.figure_html(sparsity_heatmap(np.full((2, 3), 0.5))).decode("utf-8")
    assert html.lstrip().lower().startswith("<!doctype html>") and "Plotly.newPlot" in html
    # plotly.js is inlined: no script is fetched from a CDN, so the file opens offline
    assert re.search(r"<script[^>]*\bsrc=", html) is None
    assert len(html) > 1_000_000


def test_figure_download_formats_are_made_only_on_click(lib, monkeypatch):  # noqa: F811
    from app import state

    drawn = []
    monkeypatch.setattr(state, "figure_bytes", lambda fig, fmt, style="default": drawn.append(fmt) or b"")
    at = make_app(lib.name)
    at.selectbox(key="head_html_format").set_value("PDF").run()
    at.toggle(key="head_html_style").set_value(True).run()
    assert not at.exception, at.exception
    labels = [b.label for b in at.get("download_button")]
    assert "Download the figure (PDF)" in labels and "Download the figure (HTML)" in labels  # the overview's
    # kaleido takes seconds per image: nothing is drawn until a button is clicked
    assert drawn == []
    # without a browser to draw images, only HTML is offered, and the select says why
    monkeypatch.setattr(state, "image_export_problem", lambda: "image export needs Chromium (apt-get install chromium)")
    at = make_app(lib.name)
    select = at.selectbox(key="head_html_format")
    assert select.options == ["HTML (interactive)"] and "needs Chromium" in select.help


def test_saved_result_is_used_by_the_other_pages(lib, monkeypatch, tmp_path):  # noqa: F811
    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.evaluation.fitted import load_fitted
    from sparsefinder.evaluation.pareto import pareto_front
    from sparsefinder.evaluation.sweep import load_sweep

    monkeypatch.setenv("SPARSEFINDER_RUNS", str(tmp_path / "runs"))
    at = make_app(lib.name)
    at.switch_page("views/corpus.py").run()
    at = upload(at, "s.txt", GOOD_TXT * 4)
    at.text_input(key="corpus_result").set_value("tiny").run()
    at.button(key="corpus_extract").click().run()
    at.button(key="corpus_sweep").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    out = tmp_path / "runs" / lib.name / "tiny"
    assert load_fitted(out / "fitted")  # the sweep's centroids are saved with the result
    assert "saved: tiny" in at.selectbox(key="_w_result").options
    at.selectbox(key="_w_result").set_value("tiny").run()
    assert at.query_params["result"] == "tiny"

    at.switch_page("views/pareto.py").run()
    assert not at.exception, at.exception
    want = pareto_front(load_sweep(out / "sweep.parquet"))
    want = want[want["on_front"]]
    front = at.dataframe[0].value
    assert sorted(zip(front["method"], front["params"], strict=True)) == sorted(
        zip(want["method"], want["params"], strict=True))

    at.switch_page("views/explore.py").run()
    at.radio(key="_w_source").set_value("sentence from the active corpus").run()
    assert not at.exception, at.exception
    assert len(at.selectbox(key="_w_corpus_sentence").options) == len(ExtractionStore.open(out / "store"))

    # a link with the result reproduces it; one naming a result that does not exist falls back
    again = make_app(lib.name, result="tiny")
    assert again.selectbox(key="_w_result").value == "tiny"
    missing = make_app(lib.name, result="nope")
    assert not missing.exception and missing.selectbox(key="_w_result").value == "shipped"


def test_pareto_page_shows_the_sparsity_accuracy_curves(lib):  # noqa: F811
    from sparsefinder.evaluation.approximate import load_curves
    from sparsefinder.model.catalogue import load_registry

    path = load_registry()[lib.name].artifact("curves")
    if path is None or not path.is_file():
        pytest.skip(f"{lib.name} ships no curves")
    curves = load_curves(path)
    at = make_app(lib.name)
    at.switch_page("views/pareto.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="curves_metric").value == "cos_mean"
    at.selectbox(key="curves_metric").set_value("retrieval").run()
    at.multiselect(key="curves_layers").set_value(["later"]).run()
    assert not at.exception, at.exception
    spec = next(s for s in plotly_specs(at) if "retrieval" in s["layout"]["title"]["text"])
    traces = {t["name"]: t for t in spec["data"]}
    method = next(m for m in curves["method"] if m not in ("exact", "gold"))
    rows = curves[(curves["method"] == method) & (curves["layers"] == "later")].sort_values("sparsity")
    shown = traces[f"{method} (later layers)"]
    np.testing.assert_allclose(decode(shown["x"]).astype(float), rows["sparsity"].to_numpy(), atol=1e-9)
    np.testing.assert_allclose(decode(shown["y"]).astype(float), rows["retrieval"].to_numpy(), atol=1e-9)
    assert not any("(all layers)" in name for name in traces)
    table = next(d.value for d in at.dataframe if "model_sparsity" in d.value.columns)
    assert set(table["layers"]) <= {"later", "none"}
    assert len(table) == int(curves["layers"].isin(["later", "none"]).sum())
    # The learned predictors' curves are on the page too (issue #15 §5), and narrowing the methods keeps theirs.
    learned = [m for m in ("stacked", "cascade", "distance_budget", "global_band") if m in set(curves["method"])]
    if not learned:
        return
    assert set(learned) <= set(at.multiselect(key="curves_methods").options)
    at.multiselect(key="curves_methods").set_value(learned).run()
    assert not at.exception, at.exception
    spec = next(s for s in plotly_specs(at) if "retrieval" in s["layout"]["title"]["text"])
    assert {t["name"] for t in spec["data"] if t["name"].endswith("(later layers)")
            and not t["name"].startswith("gold")} == {f"{m} (later layers)" for m in learned}
    table = next(d.value for d in at.dataframe if "model_sparsity" in d.value.columns)
    assert set(table["method"]) <= {*learned, "exact", "gold"}


def test_pareto_shows_the_shipped_learned_predictors_beside_the_paper(lib):  # noqa: F811
    from sparsefinder.evaluation.sweep import load_sweep
    from sparsefinder.model.catalogue import load_registry

    spec = load_registry()[lib.name]
    path = spec.artifact("learned_sweep")
    if path is None or not path.is_file():
        pytest.skip(f"{lib.name} ships no learned sweep")
    learned = set(load_sweep(path)["method"])
    paper = set(load_sweep(spec.artifact("sweep"))["method"])
    at = make_app(lib.name)
    at.switch_page("views/pareto.py").run()
    assert not at.exception, at.exception
    spec_ = next(s for s in plotly_specs(at) if "Recall against sparsity" in s["layout"]["title"]["text"])
    shown = {t["name"] for t in spec_["data"] if "(dominated)" not in t["name"]}
    assert (learned - paper) <= shown and paper <= shown
    # a learned point is drawn on the sentence with the learned predictors' own projections and fitted state
    if not learned_fitted_shipped(lib):
        pytest.skip(f"{lib.name} ships no learned fitted state")
    stacked = next(o for o in at.selectbox(key="_w_pareto_config").options if o.startswith("stacked "))
    at.selectbox(key="_w_pareto_config").set_value(stacked.replace(" ", "|", 1)).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    layer, head = at.session_state["layer"], at.session_state["head"]
    want = library_head_metrics(lib, DEFAULT_TEXT, layer, head, "stacked", stacked.split(" ", 1)[1])
    got = shown_metrics(at)
    for r in RATIOS:
        assert got[r] == pytest.approx(want[r], abs=6e-5), r


# -- the learned predictors (fitted on their own projections) on a typed sentence --------------------------
LEARNED_TEXT = "The committee approved the new budget after a long debate in March."


def learned_fitted_shipped(lib) -> bool:  # noqa: F811
    from sparsefinder.model.catalogue import load_registry

    spec = load_registry()[lib.name]
    path = spec.artifact("learned_fitted")
    return path is not None and path.is_dir() and spec.artifact("learned_projections") is not None


@pytest.fixture()
def learned(lib):  # noqa: F811
    if not learned_fitted_shipped(lib):
        pytest.skip(f"{lib.name} ships no learned fitted state")
    return lib


def library_learned(model, text: str, method: str, params: str) -> tuple[np.ndarray, np.ndarray]:
    """``(gold, pred)``, each ``(L, H, n, n)`` bool: gold is the support of the probabilities; pred the shipped
    learned fitted state loaded with ``load_fitted``, q and k projected with the listwise projections and
    ``predict`` given the tokens (not the app's helper)."""
    import torch

    from sparsefinder.evaluation.fitted import load_fitted
    from sparsefinder.model.catalogue import load_registry
    from sparsefinder.training.projections import Projections

    spec = load_registry()[model.name]
    proj = Projections.load(spec.artifact("learned_projections"), model=model)
    by_layer = next(v for p, v in load_fitted(spec.artifact("learned_fitted"))[method].items()
                    if json.loads(p) == json.loads(params))
    ex = model.extract([text])
    n = int(ex.lengths[0])
    gold, pred = [], []
    for layer in range(ex.num_layers):
        q = proj.project_queries(layer, ex.queries[layer].float()).float()
        k = proj.project_keys(layer, ex.keys[layer].float()).float()
        with torch.no_grad():
            graph = by_layer[layer].predict(q, k, ex.lengths, tokens=[list(ex.tokens[0])])
        pred.append(graph.edges[0, :, :n, :n].numpy())
        gold.append(ex.probs[layer][0, :, :n, :n].numpy() > 0)
    return np.stack(gold), np.stack(pred)


def brute_metrics(gold: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """One head's ratios over its ``n × n`` pairs (a bidirectional model: every pair is valid)."""
    tp, g, p = int((gold & pred).sum()), int(gold.sum()), int(pred.sum())
    return {"recall": tp / g if g else 1.0, "precision": tp / p if p else 1.0, "sparsity": 1 - p / gold.size,
            "exact": float(np.mean([(gold[i] <= pred[i]).all() for i in range(len(gold))]))}


@pytest.mark.parametrize("method", ["stacked", "cascade"])
def test_explore_draws_a_learned_method_on_a_typed_sentence(learned, method):
    from tests.app.test_app import analyse

    params = '{"sparsity":0.7}'  # the learned sweep's canonical key; the shipped file may space it differently
    at = explore_with_method(learned, method=method, params=params, layer=3, head=4)
    assert method in at.selectbox(key="_w_method").options
    assert at.selectbox(key="_w_method").value == method and at.selectbox(key="_w_params").value == params
    at = analyse(at, LEARNED_TEXT)
    assert not at.error, [e.value for e in at.error]
    golds, preds = library_learned(learned, LEARNED_TEXT, method, params)
    gold, pred = golds[3, 4], preds[3, 4]
    want = brute_metrics(gold, pred)
    got = shown_metrics(at)
    for r in RATIOS:
        assert got[r] == pytest.approx(want[r], abs=6e-5), r
    # the overlay's marks are this graph's outcomes, cell by cell
    fig = head_figure(at)
    names = [t.get("name") for t in fig["data"]]
    code = decode(fig["data"][names.index("prediction")]["z"]).astype(float)
    expect = np.where(gold & pred, 0.0, np.where(pred, 1.0, np.where(gold, 2.0, np.nan)))
    np.testing.assert_array_equal(code, expect)
    assert pred.sum() < pred.size  # the learned method drops pairs: the comparison is not trivially all-TP

    # the overview's recall grid: every layer and head, same independent path
    at.radio(key="_w_overview").set_value("method recall").run()
    assert not at.exception, at.exception
    grid = np.array([[brute_metrics(g, p)["recall"] for g, p in zip(gl, pl, strict=True)]
                     for gl, pl in zip(golds, preds, strict=True)])
    np.testing.assert_allclose(at.dataframe[0].value.to_numpy(dtype=float), grid, atol=1e-6)


def test_compare_draws_learned_and_paper_methods(learned):
    at = make_app(learned.name)
    at.switch_page("views/compare.py").run()
    at.text_input(key="_w_graph_text").input(LEARNED_TEXT).run()
    at.multiselect(key="_w_compare_methods").set_value(["stacked", "cascade", "kmeans"]).run()
    at.selectbox(key="_w_layer").set_value(2).run()
    at.selectbox(key="_w_head").set_value(9).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value.set_index("method")
    for method in ("stacked", "cascade"):
        params = table.loc[method, "params"]
        assert params == at.selectbox(key=f"_w_compare_params_{method}").value
        golds, preds = library_learned(learned, LEARNED_TEXT, method, params)
        want = brute_metrics(golds[2, 9], preds[2, 9])
        for r in RATIOS:
            assert table.loc[method, r] == pytest.approx(want[r], abs=1e-9), (method, r)
    want = library_head_metrics(learned, LEARNED_TEXT, 2, 9, "kmeans", table.loc["kmeans", "params"])
    for r in RATIOS:
        assert table.loc["kmeans", r] == pytest.approx(want[r], abs=1e-9), r


def test_missing_learned_fitted_state_leaves_the_app_working(learned, monkeypatch, tmp_path):
    """A data directory without the learned fitted state: the learned methods are not offered or drawn, the
    pages say why, and the paper's methods still draw."""
    from sparsefinder.model.catalogue import data_dir

    data = tmp_path / "data"
    data.mkdir()
    for entry in data_dir().iterdir():
        if entry.name != "fitted":
            (data / entry.name).symlink_to(entry)
    (data / "fitted").mkdir()
    for entry in (data_dir() / "fitted").iterdir():
        if not entry.name.endswith("-learned"):
            (data / "fitted" / entry.name).symlink_to(entry)
    monkeypatch.setenv("SPARSEFINDER_DATA", str(data))

    at = explore_with_method(learned, method="stacked", params='{"sparsity":0.7}')
    assert "stacked" not in at.selectbox(key="_w_method").options
    assert at.selectbox(key="_w_method").value == "(gold only)"
    assert "kmeans" in at.selectbox(key="_w_method").options
    assert any("learned predictors' fitted state is missing" in c.value for c in at.sidebar.caption)

    at.switch_page("views/pareto.py").run()
    assert not at.exception, at.exception
    method = at.selectbox(key="_w_pareto_config").value.split("|", 1)[0]
    assert method not in ("stacked", "cascade", "priors", "topk", "distance_budget", "global_band")
    stacked = next(o for o in at.selectbox(key="_w_pareto_config").options if o.startswith("stacked "))
    at.selectbox(key="_w_pareto_config").set_value(stacked.replace(" ", "|", 1)).run()
    assert not at.exception, at.exception
    assert any("must be fitted" in i.value and "fitted state is missing" in i.value for i in at.info)

    at.switch_page("views/compare.py").run()
    at.multiselect(key="_w_compare_methods").set_value(["cascade", "kmeans"]).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value.set_index("method")
    assert np.isnan(table.loc["cascade", "recall"])
    assert any("cascade" in i.value and "fitted state is missing" in i.value for i in at.info)
    want = library_head_metrics(learned, DEFAULT_TEXT, at.session_state["layer"], at.session_state["head"],
                                "kmeans", table.loc["kmeans", "params"])
    for r in RATIOS:
        assert table.loc["kmeans", r] == pytest.approx(want[r], abs=1e-9), r
