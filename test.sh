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
# The numerical packages again on another CPU code path (SSE4.2 BLAS, one thread): an assertion that
# depends on the vector width or the thread count fails here before it fails on another machine.
if [ $# -eq 0 ]; then
    MKL_ENABLE_INSTRUCTIONS=SSE4_2 OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider \
        tests/kernels tests/predictors tests/training tests/test_metrics.py tests/test_graphs.py tests/test_mass.py
fi
