"""Benchmark the dashboard's head switch in a real browser.

Starts ``streamlit run app/streamlit_app.py`` on a free port, opens the Explore
page in headless Chromium (Playwright, Debian ``/usr/bin/chromium``), analyses a
text of about 40 and one of about 400 tokens, and then, many times, picks
another head in the Head select and times the interval from the option click
to the moment the heatmap's title (drawn by Plotly in the browser) names the
new head. Prints median, 90th percentile and max per input, with the goals
(≤ 300 ms at 40 tokens, ≤ 1 s at 400 tokens).

The interval is measured inside the page (``performance.now()`` at the
option's pointerdown, and in a MutationObserver when the new title appears),
so Playwright's polling does not count. Each head is picked once per text, so every timed switch computes and ships
that head's heatmap anew (the model run of the text itself is shared, as in
the app). Optionally a method is overlaid (``--method window --params
'{"window": 3}'``), which adds the predicted-graph marks.

    .venv/bin/python bench/ui_latency.py [--repeats 11] [--method window --params '{"window":3}']
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHORT = ("The committee said on Tuesday that the new rules, which were agreed after months of difficult talks "
         "between unions and employers, would take effect early next year across the whole of the country, they said.")
GOALS_MS = {"short": 300.0, "long": 1000.0}


def long_text(model, target: int = 400) -> str:
    """Default-corpus sentences joined until the text has ``target`` ± a few tokens."""
    from sparsefinder.corpora.readers import default_corpus

    parts: list[str] = []
    for sentence in default_corpus(split="validation").texts():
        candidate = " ".join(parts + [sentence])
        if len(model.tokenizer(candidate)["input_ids"]) > target:
            break
        parts.append(sentence)
    return " ".join(parts)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "streamlit", "run", "app/streamlit_app.py", "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"streamlit exited:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("streamlit did not start")


def wait_idle(pg) -> None:
    pg.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden")


def heatmap_title(pg, layer: int, head: int):
    """The head heatmap's title as drawn by Plotly (an SVG text element), for this layer and head."""
    return pg.locator(".st-key-head_heatmap .gtitle, [data-testid='stPlotlyChart'] .gtitle").filter(
        has_text=f"Layer {layer}, head {head}:")


WATCH = """want => {
    window.__sfT0 = null;
    window.__sfT1 = null;
    const start = () => { if (window.__sfT0 === null) window.__sfT0 = performance.now(); };
    document.addEventListener('pointerdown', start, {capture: true, once: true});
    document.addEventListener('mousedown', start, {capture: true, once: true});
    const shown = () => [...document.querySelectorAll('.gtitle')].some(el => el.textContent.includes(want));
    const obs = new MutationObserver(() => {
        if (window.__sfT0 !== null && window.__sfT1 === null && shown()) {
            window.__sfT1 = performance.now();
            obs.disconnect();
        }
    });
    obs.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def switch_head(pg, layer: int, head: int) -> float:
    """Open the Head select, click ``head``; seconds until the heatmap's title names it."""
    option = pg.get_by_role("option", name=str(head), exact=True)
    for attempt in range(5):  # a rerun still in flight can close a list that just opened
        wait_idle(pg)
        try:
            pg.get_by_role("combobox", name="Head", exact=True).click(timeout=10_000)
            option.wait_for(state="visible", timeout=10_000)
            # Timed inside the page: from the option's pointerdown to the DOM mutation that puts the
            # new title into Plotly's SVG (Playwright's own waits poll, which would add ~100 ms).
            pg.evaluate(WATCH, f"Layer {layer}, head {head}:")
            option.click(timeout=5_000)
            break
        except Exception:
            if attempt == 4:
                raise
            pg.keyboard.press("Escape")
    heatmap_title(pg, layer, head).first.wait_for(state="visible")
    t0, t1 = pg.evaluate("() => [window.__sfT0, window.__sfT1]")
    if t0 is None or t1 is None:
        raise RuntimeError("the in-page timer missed the click or the new title")
    return (t1 - t0) / 1000.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=11, help="head switches per text (at most heads - 1)")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--method", default=None, help="registered method to overlay (default: gold only)")
    ap.add_argument("--params", default=None, help="its hyperparameters as JSON")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from sparsefinder.model.catalogue import default_model_name
    from sparsefinder.model.entmax_model import load_model

    model = load_model(default_model_name())
    texts = {"short": SHORT, "long": long_text(model)}
    tokens = {k: len(model.tokenizer(t)["input_ids"]) for k, t in texts.items()}
    repeats = min(args.repeats, model.num_heads - 1)

    log = Path(tempfile.mkdtemp(prefix="ui-latency-")) / "server.log"
    proc, url = start_server(log)
    results: dict[str, list[float]] = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for kind, text in texts.items():
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                pg = context.new_page()
                pg.set_default_timeout(240_000)
                query = f"model={model.name}&layer={args.layer}&head=0"
                if args.method:
                    query += f"&method={quote(args.method)}&params={quote(args.params or '{}')}"
                pg.goto(f"{url}/?{query}")
                box = pg.get_by_role("textbox", name="Text to analyse")
                box.fill(text)
                pg.get_by_role("button", name="Analyse", exact=True).click()
                heatmap_title(pg, args.layer, 0).first.wait_for(state="visible")
                wait_idle(pg)
                # the text is analysed once (as a visitor would); each head below is a new heatmap
                results[kind] = [switch_head(pg, args.layer, h) for h in range(1, repeats + 1)]
                context.close()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)

    import torch

    print(f"model {model.name}, torch threads {torch.get_num_threads()}, layer {args.layer}, "
          f"overlay {args.method or 'none'} {args.params or ''}".rstrip())
    print(f"{'input':>6} {'tokens':>6} {'switches':>8} {'median ms':>10} {'p90 ms':>8} {'max ms':>8} {'goal ms':>8}")
    for kind, times in results.items():
        ms = sorted(1000 * t for t in times)
        p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
        print(f"{kind:>6} {tokens[kind]:>6} {len(ms):>8} {statistics.median(ms):>10.0f} {p90:>8.0f} "
              f"{ms[-1]:>8.0f} {GOALS_MS[kind]:>8.0f}")
    print(json.dumps({k: [round(1000 * t, 1) for t in v] for k, v in results.items()}))
    errors = [line for line in log.read_text().splitlines() if "Traceback" in line or " ERROR " in line]
    if errors:
        print("server log has errors:\n" + "\n".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
