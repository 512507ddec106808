"""The dashboard on the models researchers study now (#13): a tiny Llama and a tiny ModernBERT added to the
user's catalogue, served by their own server. Explore draws a decoder's future keys and a local layer's
outside as 'not allowed' (white), apart from exact zeros (grey); the numbers equal the library's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sparsefinder.model.entmax_model import load_model
from tests.browser_support import ARTIFACTS, CHROMIUM, streamlit_server
from tests.e2e.test_e2e import screenshot, wait_idle

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]
LOG = ARTIFACTS / "streamlit-architectures.log"


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    from sparsefinder.model.user_catalogue import add_model

    catalogue = tmp_path_factory.mktemp("catalogue") / "models.json"
    add_model("tiny-llama", tiny_model_dir("llama"), description="tiny random Llama (GQA)", catalogue=catalogue)
    add_model("tiny-modernbert", tiny_model_dir("modernbert"), description="tiny random ModernBERT",
              catalogue=catalogue)
    add_model("tiny-llama-long", tiny_model_dir("llama-long"), description="tiny random Llama, 2,048 positions",
              catalogue=catalogue)
    old = os.environ.get("SPARSEFINDER_CATALOGUE")
    os.environ["SPARSEFINDER_CATALOGUE"] = str(catalogue)  # the server reads the user's catalogue from it
    try:
        with streamlit_server(LOG) as (url, _):
            yield url, catalogue
    finally:
        if old is None:
            os.environ.pop("SPARSEFINDER_CATALOGUE", None)
        else:
            os.environ["SPARSEFINDER_CATALOGUE"] = old


def _head_spec(page) -> dict:
    """The head heatmap's figure as the page received it (Plotly's JSON in the DOM)."""
    specs = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(
        el => JSON.stringify({title: el.layout.title.text,
            data: el.data.map(t => ({name: t.name, z: t.z}))}))""")
    heads = [json.loads(s) for s in specs if "entmax probabilities" in json.loads(s)["title"]]
    assert len(heads) == 1
    return heads[0]


def _matrix(z) -> np.ndarray:
    """A heatmap's z as the browser holds it: nested lists (NaN as null) or a typed array ``{dtype, bdata, shape}``."""
    if isinstance(z, dict) and "bdata" in z:
        import base64

        out = np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"])).astype(float)
        return out.reshape([int(v) for v in str(z["shape"]).split(",")])
    return np.array([[np.nan if v is None else v for v in row] for row in z], dtype=float)


@pytest.mark.parametrize("model, layer, head, allowed", [
    ("tiny-llama", 1, 2, lambda i, j, n: j <= i),
    ("tiny-modernbert", 1, 0, lambda i, j, n: abs(i - j) <= 2),
])
def test_explore_draws_the_pairs_a_layer_forbids(served, browser, tiny_model_dir, model, layer, head, allowed):
    url, _ = served
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.set_default_timeout(240_000)
    page.goto(f"{url}/?model={model}&layer={layer}&head={head}")
    page.get_by_text(f"Layer {layer}, head {head}: entmax probabilities").wait_for()
    wait_idle(page)
    spec = _head_spec(page)
    assert [t["name"] for t in spec["data"]] == ["not allowed", "zero", "p"]
    family = {"tiny-llama": "llama", "tiny-modernbert": "modernbert"}[model]
    probs = load_model(str(tiny_model_dir(family))).extract(["The quick brown fox jumps over the lazy dog."])
    want = probs.probs[layer][0, head].numpy()
    n = want.shape[0]
    forbidden = ~np.array([[allowed(i, j, n) for j in range(n)] for i in range(n)])
    shown_forbidden = ~np.isnan(_matrix(spec["data"][0]["z"]))
    np.testing.assert_array_equal(shown_forbidden, forbidden)
    shown_p = _matrix(spec["data"][2]["z"])
    np.testing.assert_allclose(np.nan_to_num(shown_p), want, rtol=1e-5, atol=1e-6)
    screenshot(page, f"explore-{model}.png", height=2200, doc=f"dashboard-explore-{model}.png")
    page.context.close()
    log = LOG.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def test_explore_draws_a_long_text_in_blocks(served, browser, tiny_model_dir):
    """#13 item 6: a text above LONG_INPUT_TOKENS, typed in the page, is analysed from its gold bits and its
    head drawn in the browser as blocks: the library's HeadView, the decoder's future blocks white."""
    from sparsefinder.evaluation import analysis as an
    from tests.e2e.test_e2e import analyse
    from tests.helpers import LONG_TEXT

    url, _ = served
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.set_default_timeout(240_000)
    page.goto(f"{url}/?model=tiny-llama-long&layer=1&head=2")
    page.get_by_text("Layer 1, head 2: entmax probabilities").wait_for()
    wait_idle(page)
    page.get_by_text("lines", exact=True).click()
    wait_idle(page)
    analyse(page, LONG_TEXT)
    page.locator(".gtitle").filter(has_text="drawn as blocks of").wait_for()
    wait_idle(page)
    spec = _head_spec(page)
    assert [t["name"] for t in spec["data"]] == ["not allowed", "zero", "p"]
    ex = an.extract_for_view(load_model(str(tiny_model_dir("llama-long"))), [LONG_TEXT])
    view = an.head_view(ex, 0, 1, 2)
    assert view.size > 1 and f"{view.n} tokens drawn as blocks of {view.size}" in spec["title"]
    np.testing.assert_array_equal(~np.isnan(_matrix(spec["data"][0]["z"])), view.allowed == 0)
    np.testing.assert_array_equal(np.nan_to_num(_matrix(spec["data"][2]["z"])),
                                  np.where(view.edges > 0, view.top, 0).astype(float))
    assert page.get_by_text(f"{view.n} tokens are drawn as blocks of {view.size}").count() == 1
    screenshot(page, "explore-long.png", height=2200, doc="dashboard-explore-long.png")
    page.context.close()
    log = LOG.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
