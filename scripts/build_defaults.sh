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
# The shipped projections and sweep are the paper's recipe (margin loss, r = 4, the paper's methods);
# the learned predictors (listwise loss, the CLI's default) get their own projections, sweep and fitted state below.
paper=sparsefinder,baseline,pattern  # families: each stands for its default-sweep methods
$sf train --loss margin --store "$runs/train" --val-store "$runs/val" --out "data/projections/$model"
$sf sweep --store "$runs/val" --projections "data/projections/$model" --fit-store "$runs/train" \
    --methods "$paper" --save-fitted "data/fitted/$model" --max-points 20000 --threads 1 \
    --out "data/sweeps/$model-validation.parquet"
# The learned predictors (issue #7), on listwise r = 8 projections, swept beside the paper's methods on the
# Pareto page; their fitted state (deduplicated, a few MB) lets Explore/Compare draw them on new text.
$sf train --loss listwise --rank 8 --store "$runs/train" --val-store "$runs/val" --out "data/projections/$model-listwise-r8"
$sf sweep --store "$runs/val" --projections "data/projections/$model-listwise-r8" --fit-store "$runs/train" \
    --methods learned --threads 1 \
    --save-fitted "data/fitted/$model-learned" --out "data/sweeps/$model-learned-validation.parquet"
# Page-level support estimates (docs/method.md §9): raw q, k, nothing to fit; drawn beside the others on the Pareto page.
$sf sweep --store "$runs/val" --methods pages --threads 1 --out "data/sweeps/$model-pages-validation.parquet"
# Projections trained through the stacked model's loss (the best stacked predictor; for stacked/cascade only).
$sf train --loss stacked --init "data/projections/$model-listwise-r8" --store "$runs/train" --val-store "$runs/val" \
    --out "data/projections/$model-stacked-r8"
$sf interpret --store "$runs/val" --projections "data/projections/$model" --fitted "data/fitted/$model" \
    --out "data/interpret/$model-validation"
.venv/bin/python scripts/render_pareto.py "data/sweeps/$model-validation.parquet" docs/pareto
# Sparsity-accuracy curves (entmax restricted to predicted graphs, 200 validation sentences), with learned windows
# and the learned predictors (stacked, cascade, distance_budget, global_band: listwise r = 8 projections and the
# learned fitted state above) at the target sparsities --sparsities (any target runs from their one fit per layer).
for glob in "" --global-tokens; do
    $sf windows --model "$model" --split train --limit 240 --lambdas 0.1,0.3,1,3 --layers all,later $glob \
        --threads 1 --out "data/curves/$model-windows${glob:+-global}"
done
$sf curves --model "$model" --limit 200 --points 6 --sparsities 0.4,0.5,0.55,0.6,0.65,0.7,0.72,0.73,0.75,0.8,0.9,0.95 --threads 1 \
    --windows "data/curves/$model-windows,data/curves/$model-windows-global" \
    --out "data/curves/$model-validation.parquet" --plot "$runs/curves.html" --png "data/curves/$model-validation.png"
