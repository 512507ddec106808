"""The Clusters & POS page, driven headlessly with AppTest: what it shows equals the library's tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("streamlit")

from streamlit.testing.v1 import AppTest  # noqa: E402

from sparsefinder.evaluation import interpret as itp  # noqa: E402
from sparsefinder.model.catalogue import default_model_name, get_spec  # noqa: E402
from tests.app.test_app import APP, TIMEOUT, decode, plotly_specs  # noqa: E402

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def shipped() -> itp.InterpretTables:
    path = get_spec(default_model_name()).artifact("interpret")
    if path is None or not path.is_dir():
        pytest.skip("the default model ships no interpretation tables")
    return itp.InterpretTables.load(path)


def clusters_app(model: str | None = None, **params) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.query_params["model"] = model or default_model_name()
    for k, v in params.items():
        at.query_params[k] = str(v)
    at.run()
    at.switch_page("views/clusters.py").run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at


def frame_with(at: AppTest, column: str) -> pd.DataFrame:
    """The one dataframe shown with ``column`` (AppTest does not expose dataframe keys)."""
    frames = [d.value for d in at.dataframe if column in d.value.columns]
    assert len(frames) == 1, [list(d.value.columns) for d in at.dataframe]
    return frames[0]


def heatmap_z(at: AppTest, side: str) -> tuple[np.ndarray, list[str], str]:
    specs = [s for s in plotly_specs(at) if s["layout"]["title"]["text"].startswith(f"{side.capitalize()} clusters")]
    assert len(specs) == 1, [s["layout"]["title"]["text"] for s in plotly_specs(at)]
    trace = specs[0]["data"][0]
    return np.asarray(decode(trace["z"]), dtype=float), list(trace["x"]), specs[0]["layout"]["title"]["text"]


def test_default_state_shows_the_shipped_tables(shipped):
    at = clusters_app(layer=2, head=5)
    assert at.title[0].value == "Clusters & POS"
    c = at.session_state["clusters_n"]
    assert c == 8 and at.session_state["layer"] == 2 and at.session_state["head"] == 5
    for side in itp.SIDES:
        z, cols, title = heatmap_z(at, side)
        want = itp.cluster_pos_matrix(shipped, 2, 5, c, side)
        assert cols == list(want.columns) and "layer 2 head 5" in title
        np.testing.assert_array_equal(z.reshape(want.shape), want.to_numpy())
    shown = frame_with(at, "query_top_tokens")
    want = itp.cluster_table(shipped, 2, 5, c)
    pd.testing.assert_frame_equal(shown.reset_index(drop=True), want, check_dtype=False)
    summary = frame_with(at, "share_within_1")
    assert len(summary) == 72 and summary["best_recall"].is_monotonic_decreasing
    ref = itp.head_summary(shipped, c).set_index(["layer", "head"])
    got = summary.set_index(["layer", "head"]).loc[ref.index]
    np.testing.assert_allclose(got["share_within_1"], ref["share_within_1"])
    np.testing.assert_allclose(got["query_pos_info"], ref["query_pos_info"])
    labels = [b.label for b in at.get("download_button")]
    assert len(labels) >= 8 and all(label.endswith("(CSV)") for label in labels)
    assert any(s["layout"]["title"]["text"].startswith("Layer 2, head 5") for s in plotly_specs(at))  # PCA view


def test_head_clusters_and_proportions_switch(shipped):
    at = clusters_app()
    at.selectbox(key="_clusters_head").set_value(3).run()
    at.selectbox(key="_w_clusters_n").set_value(4).run()
    at.radio(key="_w_clusters_values").set_value("proportions").run()
    assert not at.exception, at.exception
    layer = at.session_state["layer"]
    z, _, title = heatmap_z(at, "key")
    want = itp.cluster_pos_matrix(shipped, layer, 3, 4, "key", normalise=True)
    assert "proportions" in title and "head 3" in title
    np.testing.assert_allclose(z.reshape(want.shape), want.to_numpy())
    np.testing.assert_allclose(z.reshape(want.shape).sum(1)[want.sum(axis=1) > 0], 1.0)
    at.radio(key="_w_clusters_colour").set_value("pos").run()
    assert not at.exception, at.exception
    [pca] = [s for s in plotly_specs(at) if s["layout"]["title"]["text"].startswith(f"Layer {layer}, head 3")]
    names = {t["name"] for t in pca["data"]}
    assert "SPECIAL (query)" in names and "SPECIAL (key)" in names and "centroids" in names
    symbols = {t["name"].rsplit(" ", 1)[-1]: t["marker"]["symbol"] for t in pca["data"] if t["name"] != "centroids"}
    assert symbols == {"(query)": "circle", "(key)": "x"}


def test_current_text_matches_the_library(shipped):
    from sparsefinder.corpora.annotate import annotate
    from sparsefinder.evaluation.fitted import load_fitted
    from sparsefinder.model.entmax_model import load_model
    from sparsefinder.training.projections import Projections

    at = clusters_app(layer=1, head=0)
    at.radio(key="_w_clusters_scope").set_value("current text").run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    spec = get_spec(default_model_name())
    model = load_model(default_model_name())
    ex = model.extract([DEFAULT_TEXT])
    sentences = itp.extraction_sentences(ex)
    tags = itp.token_tags(sentences, annotate([DEFAULT_TEXT]))
    cents = itp.kmeans_centroids(load_fitted(spec.artifact("fitted")))
    tables = itp.interpret(sentences, tags, Projections.load(spec.artifact("projections")), {8: cents[8]})
    z, _, title = heatmap_z(at, "query")
    assert "current text" in title
    want = itp.cluster_pos_matrix(tables, 1, 0, 8, "query")
    np.testing.assert_array_equal(z.reshape(want.shape), want.to_numpy())
    assert z.sum() == len(ex.tokens[0])  # every token of the sentence, once
    shown = frame_with(at, "query_top_tokens")
    pd.testing.assert_frame_equal(shown.reset_index(drop=True), itp.cluster_table(tables, 1, 0, 8),
                                  check_dtype=False)
    # A new text recomputes the tables.
    at.text_input(key="_w_graph_text").input("Dogs bark.").run()
    assert not at.exception, at.exception
    z2, _, _ = heatmap_z(at, "query")
    assert z2.sum() == len(model.extract(["Dogs bark."]).tokens[0])


def test_saved_result_computes_and_caches_its_tables(monkeypatch, tmp_path):
    from sparsefinder.corpora.extract import extract_corpus
    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.evaluation.fitted import load_fitted
    from sparsefinder.model.entmax_model import load_model
    from sparsefinder.training.projections import Projections

    name = default_model_name()
    texts = ["The cat sat on the mat.", "Dogs bark at night in the city."]
    store_dir = tmp_path / "runs" / name / "mini" / "store"
    extract_corpus(load_model(name), texts, store_dir, progress=False)
    monkeypatch.setenv("SPARSEFINDER_RUNS", str(tmp_path / "runs"))
    at = clusters_app(layer=0, head=1)
    at.selectbox(key="_w_result").set_value("mini").run()
    assert not at.exception, at.exception
    assert any("no interpretation tables yet" in i.value for i in at.info)
    at.button(key="clusters_compute").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    saved = tmp_path / "runs" / name / "mini" / "interpret"
    assert (saved / "manifest.json").is_file()  # written beside the result: later sessions only read it
    spec = get_spec(name)
    store = ExtractionStore.open(store_dir)
    want = itp.interpret_store(store, Projections.load(spec.artifact("projections")),
                               load_fitted(spec.artifact("fitted")), n_clusters=[8])
    z, _, title = heatmap_z(at, "key")
    assert "corpus mini" in title
    np.testing.assert_array_equal(z.reshape(-1), itp.cluster_pos_matrix(want, 0, 1, 8, "key").to_numpy().reshape(-1))
    assert z.sum() == int(store.lengths().sum())


def test_model_without_centroids_gets_a_message():
    at = clusters_app(model="minilm-entmax15-untuned")
    assert any("no fitted k-means centroids" in i.value for i in at.info)
    assert not plotly_specs(at)
