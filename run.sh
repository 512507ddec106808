#!/usr/bin/env bash
# Install everything (into .venv) and serve the dashboard on http://127.0.0.1:8501
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/sparsefinder serve --host "${HOST:-127.0.0.1}" --port "${PORT:-8501}"
