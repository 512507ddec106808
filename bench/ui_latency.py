"""Benchmark the dashboard in a real browser: a new text, and a head switch.

Starts ``streamlit run app/streamlit_app.py`` on a free port, opens the Explore
page in headless Chromium (Playwright, Debian ``/usr/bin/chromium``) and, for a
text of about 40 and one of about 400 tokens (one line, analysed as one item),
times two things many times:

- **new text**: a text the server has not seen is typed into the text area and
  submitted with the Analyse button; timed from the button's pointerdown to the
  moment the head heatmap of the new text is drawn (its title and key labels
  change). Every submission is a new variant (another first word, or the
  sentences in another order), so every one runs the model anew.
- **head switch**: another head is picked in the Head select; timed from the
  option's pointerdown to the moment the heatmap's title (drawn by Plotly in the
  browser) names the new head. Each head is picked once per text, so every
  switch computes and ships that head's heatmap anew (the model run of the
  text itself is shared, as in the app).

Prints median, 90th percentile and max of both per input, with the goals
(new text ≤ 250 ms at 40 tokens; head switch ≤ 300 ms at 40, ≤ 1 s at 400).

``--tokens N`` instead builds a tiny random Llama (4 layers × 8 heads, 2
key/value heads, ``max_position_embeddings`` ≥ 8192, as bench/long_inputs.py),
registers it in a temporary user catalogue (``SPARSEFINDER_CATALOGUE``), and
times head switches on one text of exactly N tokens (goal ≤ 1 s).

The intervals are measured inside the page (``performance.now()`` at the
pointerdown, and in a MutationObserver when the new heatmap appears), so
Playwright's polling does not count. Optionally a method is overlaid
(``--method window --params '{"window": 3}'``), which adds the predicted-graph marks.

    .venv/bin/python bench/ui_latency.py [--repeats 11] [--json out.json] [--method window --params '{"window":3}']
    .venv/bin/python bench/ui_latency.py --tokens 8192 [--repeats 7]
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
sys.path.insert(0, str(ROOT))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHORT = ("The committee said on Tuesday that the new rules, which were agreed after months of difficult talks "
         "between unions and employers, would take effect early next year across the whole of the country, they said.")
# First words of the short text's variants: one token each in MiniLM's vocabulary, so every variant has the
# same length and is new to the server's caches.
LEADS = ("The", "A", "Our", "This", "One", "That", "Each", "Their", "His", "Her", "Its", "Your", "Every", "Another",
         "No", "Any", "Some", "My", "Which", "What", "Whose")
GOALS_MS = {"new text": {"short": 250.0, "long": None}, "head switch": {"short": 300.0, "long": 1000.0}}
LONG_GOAL_MS = 1000.0


def long_sentences(model, target: int = 400) -> list[str]:
    """Default-corpus sentences whose join has ``target`` ± a few tokens."""
    from sparsefinder.corpora.readers import default_corpus

    parts: list[str] = []
    for sentence in default_corpus(split="validation").texts():
        if len(model.tokenizer(" ".join(parts + [sentence]))["input_ids"]) > target:
            break
        parts.append(sentence)
    return parts


def variants(kind: str, base, count: int) -> list[str]:
    """``count`` different texts of the same length: another first word (short) or a rotation of the sentences."""
    if kind == "short":
        words = SHORT.split(" ", 1)[1]
        return [f"{lead} {words}" for lead in LEADS[:count]]
    return [" ".join(base[k:] + base[:k]) for k in range(count)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log_path: Path, env_extra: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env_extra or {})}
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

# The head heatmap of a new text: a Plotly graph whose title names the head and whose key labels (and title)
# differ from the ones drawn before the submission. Its drawing is synchronous in Plotly.react, and a
# MutationObserver's callback runs after it, so the time is taken once the new cells are on screen.
WATCH_NEW = """want => {
    const sig = () => {
        for (const gd of document.querySelectorAll('.js-plotly-plot')) {
            const title = gd.querySelector('.gtitle');
            if (!title || !title.textContent.includes(want) || !gd.data) continue;
            const x = gd.data.length ? gd.data[gd.data.length - 1].x : null;
            return title.textContent + '|' + (x ? Array.from(x).join('|') : '');
        }
        return null;
    };
    const before = sig();
    window.__sfT0 = null;
    window.__sfT1 = null;
    const start = () => { if (window.__sfT0 === null) window.__sfT0 = performance.now(); };
    document.addEventListener('pointerdown', start, {capture: true, once: true});
    document.addEventListener('mousedown', start, {capture: true, once: true});
    const obs = new MutationObserver(() => {
        if (window.__sfT0 === null || window.__sfT1 !== null) return;
        const now = sig();
        if (now !== null && now !== before) {
            window.__sfT1 = performance.now();
            obs.disconnect();
        }
    });
    obs.observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


# Every websocket message the page receives: (arrival time, bytes). Registered before Streamlit's own
# handler, so the time is the arrival, not the end of its processing.
WS_HOOK = """(() => {
    const Native = window.WebSocket;
    window.__sfMsgs = [];
    window.__sfSent = [];
    const send = Native.prototype.send;
    Native.prototype.send = function (data) {
        window.__sfSent.push(performance.now());
        return send.call(this, data);
    };
    function Hooked(...args) {
        const ws = new Native(...args);
        ws.addEventListener('message', e => window.__sfMsgs.push(
            [performance.now(), e.data.byteLength ?? e.data.size ?? e.data.length ?? 0]));
        return ws;
    }
    Hooked.prototype = Native.prototype;
    for (const k of ['CONNECTING', 'OPEN', 'CLOSING', 'CLOSED']) Hooked[k] = Native[k];
    window.WebSocket = Hooked;
})()"""


def phases(pg) -> dict:
    """Where the last timed interval went, from the messages that arrived inside it: until the first
    (the click reaching the server, the rerun starting and its first delta), until the last (the script
    run and the transfer of its deltas), and after it until drawn (the browser's work); with the bytes."""
    t0, t1, msgs, sent = pg.evaluate(
        "() => [window.__sfT0, window.__sfT1, window.__sfMsgs || [], window.__sfSent || []]")
    inside = [(t, n) for t, n in msgs if t0 <= t <= t1]
    requests = sum(1 for t in sent if t0 <= t <= t1)
    if not inside:
        return {"to_first_msg": None, "msgs": None, "after_last_msg": None, "messages": 0, "kib": 0.0,
                "requests": requests}
    after = [t for t, _ in msgs if t >= t0]
    # last_msg: when the rerun's last message arrived (the page is complete), which may be after the heatmap
    return {"requests": requests, "last_msg": after[-1] - t0, "to_first_msg": inside[0][0] - t0,
            "msgs": inside[-1][0] - inside[0][0],
            "after_last_msg": t1 - inside[-1][0], "messages": len(inside),
            "kib": sum(n for _, n in inside) / 1024, "largest_kib": max(n for _, n in inside) / 1024}


def _elapsed(pg) -> float:
    t0, t1 = pg.evaluate("() => [window.__sfT0, window.__sfT1]")
    if t0 is None or t1 is None:
        raise RuntimeError("the in-page timer missed the click or the new heatmap")
    return (t1 - t0) / 1000.0


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
    return _elapsed(pg)


def submit_text(pg, text: str, layer: int, head: int) -> float:
    """Type ``text`` (not yet applied: a text area applies on blur or Ctrl+Enter) and click Analyse;
    seconds from the click to the new text's head heatmap."""
    wait_idle(pg)
    pg.get_by_role("textbox", name="Text to analyse").fill(text)
    pg.evaluate(WATCH_NEW, f"Layer {layer}, head {head}:")
    pg.get_by_role("button", name="Analyse", exact=True).click()
    pg.wait_for_function("() => window.__sfT1 !== null")
    wait_idle(pg)
    return _elapsed(pg)


def open_explore(pg, url: str, model: str, layer: int, method: str | None, params: str | None) -> None:
    query = f"model={quote(model)}&layer={layer}&head=0"
    if method:
        query += f"&method={quote(method)}&params={quote(params or '{}')}"
    pg.goto(f"{url}/?{query}")
    heatmap_title(pg, layer, 0).first.wait_for(state="visible")
    wait_idle(pg)
    # One item per line: the texts here are single lines, analysed whole (in the default "sentences"
    # mode a 400-token text would be a batch of short sentences, and the heatmap the first one's).
    pg.get_by_text("lines", exact=True).click()
    wait_idle(pg)


def shown_tokens(pg) -> int:
    """The Tokens metric of the page (the analysed item's length)."""
    value = pg.locator('[data-testid="stMetric"]').filter(has_text="Tokens").locator(
        '[data-testid="stMetricValue"]').inner_text()
    return int(value.replace(",", ""))


def summarise(ms_list: list[float]) -> dict:
    ms = sorted(ms_list)
    return {"n": len(ms), "median": statistics.median(ms), "p90": ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))],
            "max": ms[-1]}


def tiny_llama_catalogue(tmp: Path, tokens: int) -> tuple[str, Path, str]:
    """A tiny random Llama saved in ``tmp``, registered in a user catalogue there: (name, catalogue, text)."""
    from bench.long_inputs import build_tiny_llama, text_of_tokens
    from sparsefinder.model.user_catalogue import add_model

    model_dir = build_tiny_llama(tmp / "tiny-llama", max(tokens, 8192), layers=4, heads=8, hidden=64, kv_heads=2)
    catalogue = tmp / "models.json"
    add_model("bench-tiny-llama", model_dir, description="tiny random Llama (bench/ui_latency.py)",
              catalogue=catalogue)
    from transformers import AutoTokenizer

    text = text_of_tokens(AutoTokenizer.from_pretrained(model_dir), tokens)
    return "bench-tiny-llama", catalogue, text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=11, help="new texts and head switches per text "
                                                            "(head switches: at most heads - 1)")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--method", default=None, help="registered method to overlay (default: gold only)")
    ap.add_argument("--params", default=None, help="its hyperparameters as JSON")
    ap.add_argument("--tokens", type=int, default=None,
                    help="time head switches on one text of exactly this many tokens, on a tiny random Llama")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures and every timing here")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="ui-latency-"))
    env_extra: dict[str, str] = {}
    if args.tokens:
        name, catalogue, text = tiny_llama_catalogue(tmp, args.tokens)
        env_extra["SPARSEFINDER_CATALOGUE"] = str(catalogue)
        texts = {f"{args.tokens}": [text]}
        tokens = {f"{args.tokens}": args.tokens}
        num_heads, layer = 8, min(args.layer, 3)
        time_new = False
    else:
        from sparsefinder.model.catalogue import default_model_name
        from sparsefinder.model.entmax_model import load_model

        model = load_model(default_model_name())
        name, num_heads, layer = model.name, model.num_heads, args.layer
        # one more variant than timed: the first analysis of each page is not timed
        texts = {"short": variants("short", None, args.repeats + 1),
                 "long": variants("long", long_sentences(model), args.repeats + 1)}
        tokens = {k: len(model.tokenizer(v[0])["input_ids"]) for k, v in texts.items()}
        time_new = True
    repeats = min(args.repeats, num_heads - 1)

    log = tmp / "server.log"
    proc, url = start_server(log, env_extra)
    results: dict[str, dict[str, list[float]]] = {}
    shown: dict[str, int] = {}
    profile: dict[str, dict[str, list[dict]]] = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for kind, batch in texts.items():
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                pg = context.new_page()
                pg.add_init_script(WS_HOOK)
                pg.set_default_timeout(600_000)
                open_explore(pg, url, name, layer, args.method, args.params)
                first = submit_text(pg, batch[0], layer, 0)  # as a visitor would: the text is analysed once
                shown[kind] = shown_tokens(pg)
                results[kind] = {"new text": [], "head switch": []}
                for t in batch[1:] if time_new else []:
                    results[kind]["new text"].append(submit_text(pg, t, layer, 0))
                    profile.setdefault(kind, {}).setdefault("new text", []).append(phases(pg))
                for h in range(1, repeats + 1):
                    results[kind]["head switch"].append(switch_head(pg, layer, h))
                    profile.setdefault(kind, {}).setdefault("head switch", []).append(phases(pg))
                results[kind]["first analysis"] = [first]
                context.close()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)

    import torch

    print(f"model {name}, torch threads {torch.get_num_threads()}, layer {layer}, "
          f"overlay {args.method or 'none'} {args.params or ''}".rstrip())
    print(f"{'input':>6} {'tokens':>6} {'timed':>16} {'n':>3} {'median ms':>10} {'p90 ms':>8} {'max ms':>8} "
          f"{'goal ms':>8}")
    summary: dict = {}
    for kind, timings in results.items():
        for what, times in timings.items():
            if not times:
                continue
            s = summarise([1000 * t for t in times])
            goal = LONG_GOAL_MS if args.tokens and what == "head switch" else GOALS_MS.get(what, {}).get(kind)
            summary.setdefault(kind, {"tokens": shown[kind]})[what] = {**{k: round(v, 1) for k, v in s.items()},
                                                                       "goal": goal}
            print(f"{kind:>6} {shown[kind]:>6} {what:>16} {s['n']:>3} {s['median']:>10.0f} {s['p90']:>8.0f} "
                  f"{s['max']:>8.0f} {'' if goal is None else f'{goal:.0f}':>8}")
    print("median phases (ms, KiB): click -> first message | first -> last message | last message -> drawn "
          "[click -> the rerun's last message, drawn or not]")
    medians: dict = {}
    for kind, per in profile.items():
        for what, rows in per.items():
            med = {k: round(statistics.median(r[k] for r in rows), 1) for k in rows[0]
                   if all(r.get(k) is not None for r in rows)}
            medians.setdefault(kind, {})[what] = med
            print(f"{kind:>6} {what:>16}: {med.get('to_first_msg', '-')} | {med.get('msgs', '-')} | "
                  f"{med.get('after_last_msg', '-')} [{med.get('last_msg', '-')}]   "
                  f"({med.get('requests', 0):.0f} sent, "
                  f"{med.get('messages', 0):.0f} received, "
                  f"{med.get('kib', 0):.0f} KiB, largest {med.get('largest_kib', 0):.0f} KiB)")
    raw = {k: {w: [round(1000 * t, 1) for t in v] for w, v in d.items()} for k, d in results.items()}
    print(json.dumps(raw))
    if args.json:
        args.json.write_text(json.dumps({"model": name, "layer": layer, "method": args.method, "params": args.params,
                                         "torch_threads": torch.get_num_threads(), "summary": summary,
                                         "phases": medians,
                                         "ms": raw, "expected_tokens": tokens}, indent=1))
    bad = [k for k in shown if abs(shown[k] - tokens[k]) > 2]
    if bad:
        print(f"the page analysed other lengths than expected: {shown} vs {tokens}", file=sys.stderr)
        return 1
    errors = [line for line in log.read_text().splitlines() if "Traceback" in line or " ERROR " in line]
    if errors:
        print("server log has errors:\n" + "\n".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
