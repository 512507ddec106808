"""End to end: the dashboard makes no request to any host but its own server (it must work offline),
and its favicon is the local ``app/favicon.png``, not a font host's icon.

The server, browser and page fixtures come from ``tests/browser_support.py``
through ``tests/conftest.py`` (one server for every e2e module).
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.e2e.test_e2e import CHROMIUM, ROOT, wait_idle

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

LOCAL = {"127.0.0.1", "localhost", "::1"}
LOCAL_SCHEMES = {"data", "blob", "about"}
FAVICON = """() => [...document.querySelectorAll('link[rel~="icon"], link[rel="shortcut icon"]')].map(l => l.href)"""


def test_pages_request_only_the_local_server_and_the_favicon_is_ours(server, page):
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))

    # Anything non-local is refused at once (the machine is offline anyway), so a stray request is
    # recorded instead of hanging the page; the assertion below is what fails.
    def guard(route):
        url = urlparse(route.request.url)
        if url.scheme in LOCAL_SCHEMES or url.hostname in LOCAL:
            route.continue_()
        else:
            route.abort()

    page.context.route("**/*", guard)
    for path, ready in (("/", "Explore gold attention"), ("/pareto", "Pareto"), ("/about", "About")):
        page.goto(server + path)
        page.get_by_text(ready).first.wait_for()
        wait_idle(page)
    page.wait_for_timeout(1500)  # late requests: the favicon, fonts, icons

    outside = sorted({u for u in requests if urlparse(u).scheme not in LOCAL_SCHEMES
                      and urlparse(u).hostname not in LOCAL})
    assert not outside, f"requests to non-local hosts: {outside}"
    assert len(requests) > 10  # the recorder saw the page's own traffic

    icons = page.evaluate(FAVICON)
    assert icons, "the page declares no favicon"
    for href in icons:
        assert urlparse(href).hostname in LOCAL, href
        with urllib.request.urlopen(href, timeout=10) as r:
            assert r.read() == (ROOT / "app" / "favicon.png").read_bytes()
