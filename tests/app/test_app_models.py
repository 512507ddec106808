"""The Compare models page: two registered models, or one model at two alphas, against the library (#15)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")

from streamlit.testing.v1 import AppTest  # noqa: E402

from sparsefinder.evaluation.compare_models import compare_extractions  # noqa: E402
from sparsefinder.model.entmax_model import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TEXT = "The quick brown fox jumps over the lazy dog."


def _page(model: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=300)
    at.query_params["model"] = model
    at.run()
    at.switch_page("views/models.py").run()
    assert not at.exception, at.exception
    return at


def _summary(at: AppTest) -> list[float]:
    return [float(m.value) for m in at.metric]


def _charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


@pytest.fixture()
def catalogue(tiny_model_dir, tmp_path, monkeypatch):
    from sparsefinder.model.user_catalogue import add_model

    monkeypatch.setenv("SPARSEFINDER_CATALOGUE", str(tmp_path / "user.json"))
    add_model("tiny-bert", tiny_model_dir("bert"), alpha=1.5)
    return tiny_model_dir("bert")


def test_one_model_at_two_alphas_equals_the_library(catalogue):
    at = _page("tiny-bert")
    at.selectbox(key="_w_models_other").select("tiny-bert").run()
    at.number_input(key="_w_models_alpha_b").set_value(2.0).run()
    assert not at.exception and not at.error
    want = compare_extractions(load_model(str(catalogue), alpha=1.5).extract([TEXT]),
                               load_model(str(catalogue), alpha=2.0).extract([TEXT]))
    got = _summary(at)
    np.testing.assert_allclose(got, [want["sparsity_a"].mean(), want["sparsity_b"].mean(), want["jaccard"].mean()],
                               atol=5e-5)
    assert got[2] < 1
    table = at.dataframe[0].value
    np.testing.assert_allclose(table["jaccard"].to_numpy(), want["jaccard"].to_numpy(), rtol=0, atol=1e-12)
    titles = [c["layout"]["title"]["text"] for c in _charts(at)]
    assert any("α 2" in t for t in titles) and any("α 1.5" in t for t in titles)


def test_distilled_against_untuned_default_model():
    at = _page("minilm-entmax15")
    assert at.selectbox(key="_w_models_other").value == "minilm-entmax15-untuned"
    assert not at.error
    want = compare_extractions(load_model("minilm-entmax15").extract([TEXT]),
                               load_model("minilm-entmax15-untuned").extract([TEXT]))
    np.testing.assert_allclose(_summary(at), [want["sparsity_a"].mean(), want["sparsity_b"].mean(),
                                              want["jaccard"].mean()], atol=5e-5)
    heads = [c for c in _charts(at) if "layer 0, head 0" in c["layout"]["title"]["text"]]
    assert len(heads) == 2


def test_models_that_cannot_be_paired_give_a_message(catalogue, tiny_model_dir, monkeypatch):
    from sparsefinder.model.user_catalogue import add_model

    add_model("tiny-modernbert", tiny_model_dir("modernbert"))
    at = _page("tiny-bert")
    at.selectbox(key="_w_models_other").select("tiny-modernbert").run()
    assert not at.exception
    assert any("differ in shape" in e.value or "tokenise" in e.value for e in at.error)
