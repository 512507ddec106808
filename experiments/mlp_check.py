"""Quick check: ``stacked`` (per-head logistic) against ``stacked_mlp`` (per-head MLP) on a few layers.

Fits both on the training store with the r = 8 listwise projections, scores
every valid pair of the validation store, and prints the validation recall
(mean over heads of the per-sentence macro recall) at matched mean sparsity
with per-head budgets allocated on the training curves
(:func:`sparsefinder.predictors.learned.calibration.allocate_budgets`), over all heads of the layers
together, plus the training recall at the same densities and fit times.

    .venv/bin/python experiments/mlp_check.py [--layers 0,3] [--levels 0.7,0.8] [--threads 1]
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from common import experiment_parser

from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.predictors import get_predictor
from sparsefinder.predictors.learned.budgets import GRID_POINTS
from sparsefinder.predictors.learned.calibration import allocate_budgets, recall_at_sparsity, score_curves
from sparsefinder.training.projections import Projections


def main() -> int:
    ap = experiment_parser(__doc__)
    ap.add_argument("--levels", default="0.7,0.8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    levels = [float(x) for x in args.levels.split(",")]
    train, val = ExtractionStore.open(args.train), ExtractionStore.open(args.val)
    proj = Projections.load(args.projections, store=val)
    methods = {"stacked": {}, "stacked_mlp": {"hidden": args.hidden, "steps": args.steps}}
    curves: dict[str, list] = {m: [] for m in methods}
    train_recall: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    seconds: dict[str, float] = dict.fromkeys(methods, 0.0)
    print(f"torch threads {torch.get_num_threads()}; train {len(train)} sentences, val {len(val)}; layers {layers}",
          flush=True)
    for layer in layers:
        tb = next(train.iter_batches(layer, len(train)))
        vb = next(val.iter_batches(layer, len(val)))
        with torch.no_grad():
            q, k = proj.project_queries(layer, tb.queries).float(), proj.project_keys(layer, tb.keys).float()
            qv, kv = proj.project_queries(layer, vb.queries).float(), proj.project_keys(layer, vb.keys).float()
        for name, params in methods.items():
            t0 = time.perf_counter()
            pred = get_predictor(name, **params).fit(q, k, tb.lengths, gold=tb.gold, tokens=tb.tokens)
            seconds[name] += time.perf_counter() - t0
            curves[name].extend(score_curves(pred, qv, kv, vb.lengths, vb.gold.edges, vb.tokens))
            train_recall[name].append(pred.train_recall_.numpy())
            print(f"layer {layer} {name}: fitted in {seconds[name]:.0f}s (cumulative), scored "
                  f"in {time.perf_counter() - t0:.0f}s", flush=True)
    grid = np.linspace(0.0, 1.0, GRID_POINTS)
    print(f"\nper-head-budget recall at matched mean sparsity, {len(curves['stacked'])} heads (layers {layers})")
    print(f"{'method':<14}" + "".join(f"  val@{s}  (sparsity)  train@{s}" for s in levels) + "  fit s")
    for name in methods:
        table = np.concatenate(train_recall[name])
        cells = []
        for s in levels:
            dens = allocate_budgets(grid, table, 1.0 - s)
            r, sp = recall_at_sparsity(curves[name], s, dens)
            tr = float(np.mean([np.interp(d, grid, row) for d, row in zip(dens, table, strict=True)]))
            cells.append(f"  {r:.4f}  ({sp:.3f})     {tr:.4f}  ")
        print(f"{name:<14}" + "".join(cells) + f"  {seconds[name]:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
