#!/usr/bin/env bash
# Create or reuse .venv and install sparsefinder with its pinned dependencies.
# Usage: scripts/setup.sh [--dev]   (--dev adds the test tools and Debian's chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SPARSEFINDER_VENV:-.venv}
REQ=requirements.txt
[ "${1:-}" = "--dev" ] && REQ=requirements-dev.txt

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.sparsefinder-$(cat requirements.txt "$REQ" pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q -r "$REQ"
    "$VENV/bin/python" -m pip install -q --no-deps -e .
    touch "$stamp"
fi

if [ "$REQ" = requirements-dev.txt ] && [ ! -x /usr/bin/chromium ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
