#!/usr/bin/env bash
# Install everything (into .venv) and serve the dashboard on http://127.0.0.1:8501
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/streamlit run app/streamlit_app.py --server.address "${HOST:-127.0.0.1}" \
    --server.port "${PORT:-8501}" --server.headless true --browser.gatherUsageStats false
