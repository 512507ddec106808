#!/usr/bin/env bash
# Rebuild every shipped artifact of the default model, reproducibly (seed 0):
# the entmax adapter, the projections, the fitted predictors, the validation sweep and its Pareto plot.
#   scripts/build_defaults.sh            # everything (about 25 min on 2 CPU cores)
#   SKIP_DISTILL=1 scripts/build_defaults.sh   # keep the shipped adapter
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
sf=.venv/bin/sparsefinder
model=minilm-entmax15
runs=${RUNS:-runs/default}

[ -n "${SKIP_DISTILL:-}" ] || $sf distill --out "data/adapters/$model"
$sf extract --model "$model" --split train --out "$runs/train" --overwrite
$sf extract --model "$model" --split validation --out "$runs/val" --overwrite
$sf train --store "$runs/train" --val-store "$runs/val" --out "data/projections/$model"
$sf sweep --store "$runs/val" --projections "data/projections/$model" --fit-store "$runs/train" \
    --save-fitted "data/fitted/$model" --max-points 20000 --threads 1 \
    --out "data/sweeps/$model-validation.parquet"
.venv/bin/python scripts/render_pareto.py "data/sweeps/$model-validation.parquet" docs/pareto
