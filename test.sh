#!/usr/bin/env bash
# Install everything (into .venv, plus chromium for the browser tests), lint, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check sparsefinder app tests bench experiments setup.py
.venv/bin/hadolint Dockerfile
# Strict: a broken link or a docstring reference that no longer resolves fails the run.
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict -q
.venv/bin/python -m pytest -q "$@"
