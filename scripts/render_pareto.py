"""Draw the default sweep's Pareto plot with the project's plotting code and save it as a PNG.

    .venv/bin/python scripts/render_pareto.py [SWEEP.parquet] [OUT_PREFIX]

The PNG is a screenshot of the standalone HTML taken by headless Chromium
(Playwright over Debian's /usr/bin/chromium), so no image-export package is needed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from sparsefinder.evaluation.pareto import pareto_front
from sparsefinder.evaluation.sweep import load_sweep
from sparsefinder.plots.heatmaps import pareto_figure

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "data/sweeps/minilm-entmax15-validation.parquet")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/pareto")
    frame = load_sweep(src)
    fig = pareto_figure(pareto_front(frame), title="Default model, validation split: recall vs sparsity")
    out.parent.mkdir(parents=True, exist_ok=True)
    # The standalone HTML embeds plotly.js (~5 MB): keep it out of the repository.
    html = Path(tempfile.mkdtemp()) / "pareto.html"
    fig.write_html(html, include_plotlyjs=True, full_html=True)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 920, "height": 620})
        page.goto(html.resolve().as_uri())
        page.wait_for_selector(".main-svg")
        page.screenshot(path=str(out.with_suffix(".png")))
        browser.close()
    print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
