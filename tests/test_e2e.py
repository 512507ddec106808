"""End to end: the real Streamlit server, driven by headless Chromium through Playwright.

The server runs as a subprocess on a free port; its log goes to
``tests/artifacts/streamlit-server.log`` and must never contain a traceback.
Screenshots land in ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from sparsefinder.adapter import AdapterMismatchError
from sparsefinder.model import load_model
from sparsefinder.registry import default_model_name, load_registry

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
SERVER_LOG = ARTIFACTS / "streamlit-server.log"
FOX = "The quick brown fox jumps over the lazy dog."
OTHER = "Colorless green ideas sleep furiously."
STARTUP_S = 180  # importing torch and loading the model on 2 shared cores
WAIT_MS = 240_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


# -- server and browser ----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_log() -> str:
    return SERVER_LOG.read_text(encoding="utf-8", errors="replace") if SERVER_LOG.exists() else ""


def _assert_clean_log() -> None:
    log = _server_log()
    assert "Traceback" not in log, f"the server logged a traceback:\n{log[-4000:]}"


@pytest.fixture(scope="session")
def server():
    """Base URL of ``streamlit run app/streamlit_app.py`` on a free local port."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [
        sys.executable, "-m", "streamlit", "run", "app/streamlit_app.py",
        "--server.headless", "true",
        "--server.port", str(port),
        "--server.address", "127.0.0.1",
        "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    log = open(SERVER_LOG, "w", encoding="utf-8")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}:\n{_server_log()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200 and r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not answer {url}/_stcore/health in {STARTUP_S}s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
    _assert_clean_log()


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    yield pg
    context.close()


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


def screenshot(pg, name: str, height: int = 2400) -> None:
    """Streamlit scrolls inside its own container, so grow the viewport to catch the whole page."""
    size = pg.viewport_size
    pg.set_viewport_size({"width": size["width"], "height": height})
    pg.wait_for_timeout(800)
    pg.screenshot(path=str(ARTIFACTS / name))
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
    m = pg.locator('[data-testid="stMetric"]').filter(has_text=label)
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
    screenshot(page, "explore.png")
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
    screenshot(page, "about.png")
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
    screenshot(page, "pareto-clicked.png", height=3000)
    _assert_clean_log()


def test_compare_page(server, page, lib):
    model, _ = lib
    page.goto(f"{server}/compare?model={model.name}")
    page.get_by_text("Layer 0, head 0").first.wait_for()
    wait_idle(page)
    charts = page.locator('[data-testid="stPlotlyChart"]')
    deadline = time.monotonic() + 120
    while charts.count() < 4 and time.monotonic() < deadline:
        page.wait_for_timeout(300)
    assert charts.count() >= 4
    screenshot(page, "compare.png", height=2600)
    _assert_clean_log()
