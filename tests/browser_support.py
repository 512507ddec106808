"""Browser-test support: the Streamlit server and headless Chromium fixtures, shared by every e2e module.

``tests/conftest.py`` imports the fixtures from here, so one server and one
browser serve the whole session however many e2e modules run. The server's log
goes to ``tests/artifacts/streamlit-server.log`` and must never contain a
traceback or an error line.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

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
    errors = [line for line in log.splitlines() if " ERROR " in line or line.startswith("ERROR")]
    assert not errors, "the server logged errors:\n" + "\n".join(errors[-20:])


@contextmanager
def streamlit_server(log_path: Path = SERVER_LOG) -> Iterator[tuple[str, subprocess.Popen]]:
    """``sparsefinder serve`` (``streamlit run app/streamlit_app.py``) on a free local port, its output in ``log_path``.

    Yields the base URL and the server process (for its resident memory); the
    server is stopped on exit. Checking the log is the caller's.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    # Through the CLI, as a user starts it: every browser test also checks `sparsefinder serve`.
    cmd = [sys.executable, "-m", "sparsefinder.cli", "serve", "--port", str(port), "--host", "127.0.0.1"]
    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def text() -> str:
        return log_path.read_text(encoding="utf-8", errors="replace")

    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}:\n{text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200 and r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not answer {url}/_stcore/health in {STARTUP_S}s")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def tree_rss(pid: int) -> int:
    """Resident memory in bytes of process ``pid`` and all its descendants (psutil, else ``/proc``)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        root = psutil.Process(pid)
        total = 0
        for proc in (root, *root.children(recursive=True)):
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:  # a child that ended while we counted
                pass
        return total
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # the command name (field 2) may hold spaces and parentheses: the fields after its last ')'
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo.extend(c for c, parent in parents.items() if parent == p and c not in tree)
    total = 0
    for p in tree:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024  # kB
    return total


@pytest.fixture(scope="session")
def server():
    """Base URL of ``streamlit run app/streamlit_app.py`` on a free local port."""
    with streamlit_server(SERVER_LOG) as (url, _proc):
        yield url
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


