"""End to end: the study report opens from a file in headless Chromium with every request refused,
and each of its Plotly figures is drawn (plotly.js is inlined, nothing is fetched)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.test_e2e import CHROMIUM

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


def test_report_renders_offline(tmp_path, page):
    from sparsefinder.report import study_report, write_report

    out = write_report(tmp_path / "study.html", study_report("minilm-entmax15"))
    requests: list[str] = []

    def guard(route):
        requests.append(route.request.url)
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            route.abort()

    page.context.route("**/*", guard)
    page.goto(out.as_uri())
    divs = page.locator(".plotly-graph-div")
    assert divs.count() >= 6
    page.wait_for_function("() => [...document.querySelectorAll('.plotly-graph-div')]"
                           ".every(d => d.querySelector('.main-svg'))")
    assert page.locator(".plotly .main-svg").count() >= divs.count()
    outside = [u for u in requests if not u.startswith("file://")]
    assert not outside, f"the report asked for {outside}"
