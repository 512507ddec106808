"""End to end: the real Streamlit server, driven by headless Chromium through Playwright.

The server runs as a subprocess on a free port; its log goes to
``tests/artifacts/streamlit-server.log`` and must never contain a traceback.
Screenshots land in ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import os
import time
from importlib import metadata
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from sparsefinder.model.adapter import AdapterMismatchError
from sparsefinder.model.catalogue import default_model_name, load_registry
from sparsefinder.model.entmax_model import load_model
from tests.browser_support import (  # noqa: E402,F401 (fixtures are registered in conftest)
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    FOX,
    OTHER,
    ROOT,
    SERVER_LOG,
    STARTUP_S,
    WAIT_MS,
    _assert_clean_log,
    _server_log,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def lib():
    """The model the app should be able to use: the default when its adapter exists."""
    try:
        return load_model(default_model_name()), None
    except (AdapterMismatchError, FileNotFoundError) as e:
        fallback = next(n for n in load_registry() if n != default_model_name())
        return load_model(fallback), f"{type(e).__name__}: {e}"


# -- helpers ---------------------------------------------------------------------------
def library_grid(model, text: str) -> np.ndarray:
    ex = model.extract([text])
    return np.stack([ex.gold(layer).sparsity()[0].numpy() for layer in range(ex.num_layers)])


def formatted(grid: np.ndarray) -> list[list[str]]:
    return [[f"{v:.4f}" for v in row] for row in grid]


#: ``SPARSEFINDER_DOCS_SCREENSHOTS=1 pytest -m browser`` also writes the README's page screenshots to docs/.
DOCS = ROOT / "docs"
DOCS_SHOTS = os.environ.get("SPARSEFINDER_DOCS_SCREENSHOTS") == "1"


def screenshot(pg, name: str, height: int = 2400, doc: str | None = None) -> None:
    """Streamlit scrolls inside its own container, so grow the viewport to catch the whole page."""
    size = pg.viewport_size
    pg.set_viewport_size({"width": size["width"], "height": height})
    pg.wait_for_timeout(800)
    pg.screenshot(path=str(ARTIFACTS / name))
    if doc is not None and DOCS_SHOTS:
        pg.screenshot(path=str(DOCS / doc))
    pg.set_viewport_size(size)


READ_TABLE = """sel => {
    const t = document.querySelector(sel);
    if (!t) return null;
    const cells = tr => [...tr.querySelectorAll('th, td')].map(c => c.innerText.trim());
    return {head: [...t.querySelectorAll('thead tr')].map(cells),
            body: [...t.querySelectorAll('tbody tr')].map(cells)};
}"""


def read_table(pg, container_key: str) -> dict | None:
    return pg.evaluate(READ_TABLE, f".st-key-{container_key} table")


def wait_for_table(pg, expected: list[list[str]], timeout_s: float = 240) -> list[list[str]]:
    """Poll the plain gold-sparsity table until it shows ``expected`` (rows without the layer index)."""
    deadline = time.monotonic() + timeout_s
    values = None
    while time.monotonic() < deadline:
        expander = pg.get_by_text("Values as a plain table")
        if expander.count() and not pg.locator(".st-key-gold_table table").is_visible():
            expander.first.click()
        table = read_table(pg, "gold_table")
        if table and table["body"]:
            values = [row[1:] for row in table["body"]]
            if values == expected:
                # header: the layer index, then head 0..11; rows: layers 0..5
                assert table["head"][0][1:] == [f"head {h}" for h in range(len(expected[0]))]
                assert [row[0] for row in table["body"]] == [str(i) for i in range(len(expected))]
                return values
        pg.wait_for_timeout(500)
    raise AssertionError(f"the page's gold sparsity table never matched the library:\n{values}\n!=\n{expected}")


def heatmap_labels(pg) -> list[str]:
    """The values printed in the cells of the gold-sparsity heatmap."""
    return pg.evaluate(
        """() => {
            const charts = [...document.querySelectorAll('[data-testid="stPlotlyChart"]')];
            const c = charts.find(c => c.innerText.includes('Gold sparsity per layer and head')
                                     || (c.querySelector('.gtitle')?.textContent || '').includes('Gold sparsity'));
            return c ? [...c.querySelectorAll('.heatmap-label')].map(t => t.textContent) : [];
        }"""
    )


def text_box(pg):
    return pg.get_by_role("textbox", name="Text to analyse")


def combo(pg, label: str):
    return pg.get_by_role("combobox", name=label, exact=True)


def analyse(pg, text: str) -> None:
    text_box(pg).fill(text)
    pg.get_by_role("button", name="Analyse", exact=True).click()


def wait_idle(pg) -> None:
    """Wait until Streamlit is not running the script (its status widget is gone)."""
    pg.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden")


def choose(pg, label: str, option: str, tries: int = 5) -> None:
    """Pick ``option`` in the selectbox ``label``; retried, as a rerun can close an open list."""
    for attempt in range(tries):
        wait_idle(pg)
        combo(pg, label).click()
        item = pg.get_by_role("option", name=option, exact=True)
        try:
            item.wait_for(state="visible", timeout=10_000)
            item.click(timeout=10_000)
            return
        except Exception:
            if attempt == tries - 1:
                raise
            pg.keyboard.press("Escape")


def wait_for_table_in(pg, container_key: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        table = read_table(pg, container_key)
        if table and table["body"]:
            return table
        pg.wait_for_timeout(300)
    raise AssertionError(f"no table in the container {container_key!r}")


def metric(pg, label: str) -> str:
    root = getattr(pg, "page", pg)  # a Locator's `has` is matched inside each metric: build it from the page
    label_el = root.locator('[data-testid="stMetricLabel"]').get_by_text(label, exact=True)
    m = pg.locator('[data-testid="stMetric"]').filter(has=label_el)
    return m.locator('[data-testid="stMetricValue"]').inner_text().strip()


# -- tests -----------------------------------------------------------------------------
def test_explore_shows_the_library_values(server, page, lib):
    model, default_error = lib
    if default_error:  # the default's adapter is missing: the page says so instead of crashing
        page.goto(server + "/")
        page.get_by_text(f"Could not load model {default_model_name()}").wait_for()
        screenshot(page, "explore-default-model-error.png", height=1000)

    page.goto(f"{server}/?model={model.name}")
    text_box(page).wait_for()
    assert text_box(page).input_value() == FOX

    # another sentence first, so the fox sentence below is a real change of input
    other = library_grid(model, OTHER)
    analyse(page, OTHER)
    wait_for_table(page, formatted(other))

    fox = library_grid(model, FOX)
    assert fox.shape == (6, 12)
    analyse(page, FOX)
    shown = wait_for_table(page, formatted(fox))
    assert len(shown) * len(shown[0]) == 72
    np.testing.assert_allclose(np.array(shown, dtype=float), fox, atol=5e-5 + 1e-12)

    page.get_by_text("Gold sparsity per layer and head").first.wait_for()
    # the heatmap's cells print the same values to 2 decimals (JavaScript rounds halves up: 0.625 -> 0.63)
    labels = heatmap_labels(page)
    assert len(labels) == 72
    np.testing.assert_allclose(np.array(labels, dtype=float), fox.ravel(), atol=0.005 + 1e-9)
    assert metric(page, "Mean gold sparsity") == f"{fox.mean():.4f}"
    assert metric(page, "Tokens") == "12"
    screenshot(page, "explore.png", doc="explore.png")
    _assert_clean_log()


def test_head_selection_is_in_the_url(server, page, lib):
    model, _ = lib
    page.goto(f"{server}/?model={model.name}")
    page.get_by_text("Layer 0, head 0: entmax probabilities").wait_for()
    wait_idle(page)
    choose(page, "Layer", "4")
    page.get_by_text("Layer 4, head 0: entmax probabilities").wait_for()
    choose(page, "Head", "7")
    page.get_by_text("Layer 4, head 7: entmax probabilities").wait_for()
    deadline = time.monotonic() + 30
    while parse_qs(urlparse(page.url).query).get("head") != ["7"] and time.monotonic() < deadline:
        page.wait_for_timeout(300)
    params = parse_qs(urlparse(page.url).query)
    assert params == {"model": [model.name], "layer": ["4"], "head": ["7"]}
    link = page.url

    # the copied link reproduces the view in a fresh session
    fresh = page.context.new_page()
    fresh.set_default_timeout(WAIT_MS)
    fresh.goto(link)
    fresh.get_by_text("Layer 4, head 7: entmax probabilities").wait_for()
    assert combo(fresh, "Layer").input_value() == "4"
    assert combo(fresh, "Head").input_value() == "7"
    screenshot(fresh, "explore-layer4-head7.png")
    fresh.close()
    _assert_clean_log()


def test_about_page(server, page, lib):
    model, _ = lib
    page.goto(f"{server}/?model={model.name}")
    text_box(page).wait_for()
    page.get_by_role("link", name="About").click()
    page.get_by_text("Library versions").wait_for()
    page.wait_for_url("**/about*")
    versions = wait_for_table_in(page, "versions")
    shown = {row[0]: row[1] for row in versions["body"]}
    for pkg in ("sparsefinder", "torch", "transformers", "entmax", "streamlit"):
        assert shown[pkg] == metadata.version(pkg)
    body = page.inner_text("body")
    assert model.name in body and "1.5" in body
    assert ("No adapter" in body) == (not model.adapter_manifest)
    screenshot(page, "about.png", height=1800, doc="dashboard-about.png")
    _assert_clean_log()


def pareto_chart(pg):
    return pg.locator('[data-testid="stPlotlyChart"]').filter(has_text="Recall against sparsity").first


def test_pareto_page_and_point_click(server, page, lib):
    model, _ = lib
    if load_registry()[model.name].artifact("sweep") is None:
        pytest.skip(f"{model.name} ships no sweep")
    page.goto(f"{server}/pareto?model={model.name}")
    chart = pareto_chart(page)
    chart.wait_for(state="visible")
    assert chart.locator(".scatterlayer .point").count() > 10
    page.get_by_text("Frontier configurations").wait_for()
    page.get_by_text("predicted vs gold").first.wait_for()
    wait_idle(page)
    for label in ("Recall", "Precision", "Sparsity", "Exact"):
        assert 0.0 <= float(metric(page, label)) <= 1.0
    screenshot(page, "pareto.png", height=3000)

    # clicking a point of the chart selects that configuration
    before = combo(page, "Configuration").input_value()
    points = chart.locator(".scatterlayer .trace:first-child .point")
    target = points.nth(points.count() // 2)
    target.scroll_into_view_if_needed()
    target.click(force=True)
    deadline = time.monotonic() + 60
    while combo(page, "Configuration").input_value() == before and time.monotonic() < deadline:
        page.wait_for_timeout(300)
    after = combo(page, "Configuration").input_value()
    assert after != before, "clicking a Pareto point did not select its configuration"
    method = after.split(" ", 1)[0]
    page.get_by_text(f"{method} {after.split(' ', 1)[1]}, layer").first.wait_for()
    screenshot(page, "pareto-clicked.png", height=3000, doc="dashboard-pareto.png")
    _assert_clean_log()


def wait_for_charts(pg, count: int, seconds: float = 120) -> None:
    """Until the page shows at least ``count`` Plotly charts (they are drawn one after another)."""
    charts = pg.locator('[data-testid="stPlotlyChart"]')
    deadline = time.monotonic() + seconds
    while charts.count() < count and time.monotonic() < deadline:
        pg.wait_for_timeout(300)
    assert charts.count() >= count


def test_compare_page(server, page, lib):
    model, _ = lib
    page.goto(f"{server}/compare?model={model.name}")
    page.get_by_text("Layer 0, head 0").first.wait_for()
    wait_idle(page)
    wait_for_charts(page, 4)
    screenshot(page, "compare.png", height=2600, doc="dashboard-compare.png")
    _assert_clean_log()


def test_compare_models_page(server, page, lib):
    """Distilled default model against its untuned copy: summary, three grids and two heads drawn."""
    model, _ = lib
    page.goto(f"{server}/models?model={model.name}")
    page.get_by_text("Jaccard overlap").first.wait_for(timeout=240_000)
    wait_idle(page)
    wait_for_charts(page, 5)
    assert page.get_by_text("minilm-entmax15-untuned").count() >= 1
    screenshot(page, "models.png", height=2600, doc="dashboard-models.png")
    _assert_clean_log()


def test_explore_method_overlay_and_switch(server, page, lib):
    """The sidebar's method overlays its graph on the head heatmap; switching it updates the numbers."""
    import json as _json

    from sparsefinder.metrics import graph_metrics
    from sparsefinder.predictors import get_predictor

    model, _ = lib
    ex = model.extract([FOX])

    def expected(method: str, params: dict, layer: int, head: int) -> dict[str, str]:
        graph = get_predictor(method, **params).predict(ex.queries[layer].float(), ex.keys[layer].float(), ex.lengths)
        m = graph_metrics(ex.gold(layer), graph)
        return {r: f"{float(m[r][0, head]):.4f}" for r in ("recall", "precision", "sparsity", "exact")}

    w3 = _json.dumps({"window": 3}, separators=(",", ":"))
    page.goto(f"{server}/?model={model.name}&layer=2&head=5&method=window&params={w3}")
    page.get_by_text("Layer 2, head 5: entmax probabilities and window").wait_for()
    wait_idle(page)
    want = expected("window", {"window": 3}, 2, 5)
    for label in ("Recall", "Precision", "Sparsity", "Exact"):
        assert metric(page.locator(".st-key-head_metrics"), label) == want[label.lower()], label
    screenshot(page, "explore-method.png", height=2600, doc="dashboard-explore-method.png")

    choose(page, "Method", "strided")
    page.get_by_text("Layer 2, head 5: entmax probabilities and strided").wait_for()
    wait_idle(page)
    params = _json.loads(combo(page, "Hyperparameters").input_value())
    want = expected("strided", params, 2, 5)
    deadline = time.monotonic() + 60
    while metric(page.locator(".st-key-head_metrics"), "Recall") != want["recall"] and time.monotonic() < deadline:
        page.wait_for_timeout(300)
    for label in ("Recall", "Precision", "Sparsity", "Exact"):
        assert metric(page.locator(".st-key-head_metrics"), label) == want[label.lower()], label
    assert parse_qs(urlparse(page.url).query).get("method") == ["strided"]
    _assert_clean_log()


def test_corpus_upload(server, page, lib, tmp_path):
    model, _ = lib
    page.goto(f"{server}/corpus?model={model.name}")
    page.get_by_text("upload a file").click()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait\n")
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(bad))
    alert = page.locator('[data-testid="stAlert"]').filter(has_text="file is not UTF-8")
    alert.first.wait_for()
    good = tmp_path / "three.txt"
    good.write_text("The cat sat on the mat.\nDogs bark at night in the city.\nA small bird sings every morning.\n")
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(good))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if metric(page, "Sentences") == "3":
                break
        except Exception:
            pass
        page.wait_for_timeout(300)
    assert metric(page, "Sentences") == "3" and metric(page, "Words") == "19"
    assert alert.count() == 0  # the error went away with the good file
    screenshot(page, "corpus.png", height=1800, doc="dashboard-corpus.png")
    _assert_clean_log()


LOAD_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Colorless green ideas sleep furiously.",
    "A stitch in time saves nine.",
    "The committee will meet again on Tuesday to discuss the budget.",
    "She sells sea shells by the sea shore.",
    "Rain is expected across the north of the country tonight.",
    "Two players were injured in the first half of the match.",
    "Scientists found water ice near the moon's south pole.",
)


def test_eight_concurrent_sessions_see_their_own_results(server, browser, lib):
    """Eight browser sessions analyse eight texts at once on one server: each sees its own numbers."""
    model, error = lib
    if error:
        pytest.skip(error)
    expected = {t: formatted(library_grid(model, t)) for t in LOAD_TEXTS}
    assert len({str(v) for v in expected.values()}) == len(LOAD_TEXTS)  # results that tell sessions apart
    contexts = [browser.new_context(viewport={"width": 1400, "height": 1000}) for _ in LOAD_TEXTS]
    try:
        pages = [c.new_page() for c in contexts]
        for pg in pages:
            pg.set_default_timeout(WAIT_MS)
            pg.goto(f"{server}/?model={model.name}", wait_until="commit")
        for pg in pages:
            text_box(pg).wait_for()
        # all eight submit before any result is awaited, so their runs overlap on the server's threads
        for pg, text in zip(pages, LOAD_TEXTS, strict=True):
            analyse(pg, text)
        for pg, text in zip(pages, LOAD_TEXTS, strict=True):
            wait_for_table(pg, expected[text])
        # once every session has finished, each still shows its own text's result and token count
        for pg, text in zip(pages, LOAD_TEXTS, strict=True):
            assert [row[1:] for row in read_table(pg, "gold_table")["body"]] == expected[text]
            assert metric(pg, "Tokens") == str(len(model.extract([text]).tokens[0]))
            assert text_box(pg).input_value() == text
    finally:
        for c in contexts:
            c.close()
    _assert_clean_log()
