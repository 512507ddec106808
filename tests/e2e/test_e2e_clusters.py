"""End to end: the Clusters & POS page in headless Chromium shows the library's numbers.

The server, browser and page fixtures come from ``tests/browser_support.py``
through ``tests/conftest.py`` (one server for every e2e module).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from sparsefinder.evaluation import interpret as itp
from sparsefinder.model.catalogue import default_model_name, get_spec
from tests.e2e.test_e2e import CHROMIUM, screenshot, wait_idle

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

CHART_LABELS = """title => {
    const charts = [...document.querySelectorAll('[data-testid="stPlotlyChart"]')];
    const c = charts.find(c => (c.querySelector('.gtitle')?.textContent || '').startsWith(title));
    return c ? [...c.querySelectorAll('.heatmap-label')].map(t => t.textContent) : null;
}"""


def chart_labels(pg, title: str, timeout_ms: int = 240_000) -> list[str]:
    """The cell labels of the heatmap whose title starts with ``title`` (waits for it to be drawn)."""
    pg.wait_for_function(f"() => ({CHART_LABELS})({title!r})?.length > 0", timeout=timeout_ms)
    return pg.evaluate(CHART_LABELS, title)


def test_clusters_page_shows_the_library_counts(server, page):
    path = get_spec(default_model_name()).artifact("interpret")
    if path is None or not path.is_dir():
        pytest.skip("the default model ships no interpretation tables")
    tables = itp.InterpretTables.load(path)
    page.goto(f"{server}/clusters?layer=2&head=5")
    labels = chart_labels(page, "Query clusters × POS (counts), layer 2 head 5")
    want = itp.cluster_pos_matrix(tables, 2, 5, 8, "query")
    assert Counter(labels) == Counter(f"{v:.0f}" for v in want.to_numpy().reshape(-1))
    keys = chart_labels(page, "Key clusters × POS (counts), layer 2 head 5")
    want_keys = itp.cluster_pos_matrix(tables, 2, 5, 8, "key")
    assert Counter(keys) == Counter(f"{v:.0f}" for v in want_keys.to_numpy().reshape(-1))
    # The numbers a reader compares first: the largest cell of each side is on the page.
    assert f"{want.to_numpy().max():.0f}" in labels and f"{want_keys.to_numpy().max():.0f}" in keys
    page.get_by_text("Cluster recall of the head").first.wait_for()
    recall = itp.head_cluster_recall(tables, 2, 5, 8)
    assert page.get_by_text(f"{recall:.4f}").count() >= 1
    wait_idle(page)
    page.wait_for_function("() => document.querySelectorAll('[data-testid=\"stPlotlyChart\"]').length >= 6")
    screenshot(page, "clusters.png", height=3600, doc="clusters.png")
