r"""Experiment: train the projection through the stacked model's loss (does it beat listwise + frozen?).

The product trains the r = 8 projection alone (:func:`sparsefinder.training.projections.listwise_loss`),
freezes it, then fits :class:`~sparsefinder.predictors.learned.core.Stacked` (a
per-head logistic model over features of the projected :math:`q', k'`) by
Newton's method. Here, per layer:

1. **Baseline**: ``Stacked`` fitted on the listwise-r8 projected training
   queries/keys (with tokens), scored on every validation pair.
2. **Joint** (:func:`sparsefinder.training.stacked.train_layer`, as ``train --loss stacked``):
   start from the listwise-r8 weights :math:`W_h, b_h` and the
   baseline's logistic weights :math:`w_h` (standardisation :math:`\mu_h,
   \sigma_h` frozen), and minimise with Adam

   .. math::
       \mathcal{L} = \frac{1}{H |S|} \sum_h \sum_{(i,j) \in S}
       \mathrm{BCE}\bigl(z_{hij}(W_h, b_h, w_h),\ y_{hij}\bigr)
       + \lambda\, \mathcal{L}_{\text{listwise}}(W, b),

   :math:`z` the stacked logit (:meth:`~sparsefinder.predictors.learned.core.Stacked.logits` of the projected
   vectors: ``neg_dist``, ``rel_dist`` (row minimum over valid keys, a
   subgradient through ``amin``), ``key_norm`` and ``query_norm`` carry
   gradients into :math:`W, b`; ``log_rank``, the priors and flags are
   constants), :math:`S` a seeded sample of the valid pairs of a mini-batch of
   sentences. Then ``Stacked`` is re-fitted from scratch (Newton, the product's
   thresholds and calibration) on the new projection.
3. Recall with per-head budgets at matched mean sparsity 0.7 and 0.8 over the
   heads of ``--layers`` on the validation split, computed as in
   ``bench/predictors.py`` (training curves allocate the budgets); the same
   for ``distance_budget`` on both projections, the side effect on the other
   predictors that share the projection artifact.

    .venv/bin/python experiments/stacked_projection.py \
        [--layers 0,3] [--steps 300] [--listwise-weight 0.0] [--freeze-bias]
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from common import experiment_parser

from sparsefinder.corpora.store import ExtractionStore, LayerBatch
from sparsefinder.graphs import valid_pair_mask
from sparsefinder.predictors.learned.budgets import GRID_POINTS, DistanceBudget, _BudgetPredictor, token_hashes
from sparsefinder.predictors.learned.calibration import (
    HeadCurve,
    allocate_budgets,
    pair_chunks,
    recall_at_sparsity,
    score_curves,
)
from sparsefinder.predictors.learned.stacked import Stacked
from sparsefinder.training.projections import Projections, project
from sparsefinder.training.stacked import train_layer

LEVELS = (0.7, 0.8)


def projected(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, r)`` float32: the shared map of ``params`` (as ``Projections.layer_parameters`` gives it)."""
    return project(x, params["weight_q"], params["bias_q"]).float()


def fit_and_score(pred: _BudgetPredictor, params: dict[str, torch.Tensor], tb: LayerBatch, vb: LayerBatch
                  ) -> tuple[_BudgetPredictor, list[HeadCurve]]:
    """``pred`` fitted (product defaults) on projected training data; its validation curves per head."""
    with torch.no_grad():
        pred.fit(projected(params, tb.queries), projected(params, tb.keys), tb.lengths, gold=tb.gold,
                 tokens=tb.tokens)
        qv, kv = projected(params, vb.queries), projected(params, vb.keys)
    return pred, score_curves(pred, qv, kv, vb.lengths, vb.gold.edges, vb.tokens)


def stacked_bce(pred: Stacked, weight: torch.Tensor, qp: torch.Tensor, kp: torch.Tensor, lengths: torch.Tensor,
                hashes: torch.Tensor, gold: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """Mean BCE of the stacked logit (``weight`` ``(H, F + 1)``, ``pred``'s priors and standardisation) on ``take``.

    ``take`` ``(B, N, N)`` selects pairs (the same in every head); ``gold`` ``(B, H, N, N)`` bool.
    """
    z = pred.logits(qp, kp, lengths, hashes, weight=weight).permute(1, 0, 2, 3)[:, take]  # (H, P)
    y = gold.permute(1, 0, 2, 3)[:, take].float()
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y)


def val_bce(pred: Stacked, params: dict[str, torch.Tensor], vb: LayerBatch) -> float:
    """Pair-weighted mean BCE of ``pred`` (its own Newton weights) on every valid validation pair."""
    total, count = 0.0, 0
    hashes = token_hashes(vb.tokens, vb.queries.shape[0], vb.queries.shape[2])
    with torch.no_grad():
        for sl in pair_chunks(vb.lengths):
            n = int(vb.lengths[sl].max())
            qp, kp = projected(params, vb.queries[sl, :, :n]), projected(params, vb.keys[sl, :, :n])
            take = valid_pair_mask(vb.lengths[sl], n, False)[:, 0]
            p = int(take.sum()) * vb.queries.shape[1]
            total += float(stacked_bce(pred, pred.weight_, qp, kp, vb.lengths[sl], hashes[sl, :n],
                                       vb.gold.edges[sl, :, :n, :n], take)) * p
            count += p
    return total / max(count, 1)


def fit_and_record(stage: str, params: dict[str, torch.Tensor], tb: LayerBatch, vb: LayerBatch,
                   curves: dict[str, list[HeadCurve]], table: dict[str, list[np.ndarray]],
                   bce: dict[str, list[float]]) -> Stacked:
    """``Stacked`` fitted on ``params``, its curves, training recall and validation BCE added under ``stage``.

    ``DistanceBudget`` (threshold per head) is fitted and recorded too, under ``dist_`` + ``stage``: it is the other
    consumer of the projection, so a change of the projection has a side effect on it.
    """
    stacked, c = fit_and_score(Stacked(), params, tb, vb)
    curves[stage] += c
    table[stage].append(stacked.train_recall_.numpy())
    dist, c = fit_and_score(DistanceBudget(), params, tb, vb)
    curves[f"dist_{stage}"] += c
    table[f"dist_{stage}"].append(dist.train_recall_.numpy())
    bce[stage].append(val_bce(stacked, params, vb))
    return stacked


def main() -> int:
    ap = experiment_parser(__doc__)
    ap.add_argument("--train-sentences", type=int, default=None, help="first N training sentences (default all)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16, help="sentences per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam rate of the projection")
    ap.add_argument("--lr-head", type=float, default=1e-2, help="Adam rate of the logistic weights")
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of each mini-batch's valid pairs sampled")
    ap.add_argument("--listwise-weight", type=float, default=0.0, help="lambda of the listwise regulariser")
    ap.add_argument("--stacked-weight", type=float, default=1.0,
                    help="weight of the stacked BCE (0 with --listwise-weight > 0: a listwise-only control)")
    ap.add_argument("--freeze-bias", action="store_true", help="keep the projection bias at its listwise value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"torch threads: {torch.get_num_threads()}; command: {' '.join(sys.argv)}", flush=True)
    t_start = time.perf_counter()

    train, val = ExtractionStore.open(args.train), ExtractionStore.open(args.val)
    proj = Projections.load(args.projections, store=val)
    layers = [int(x) for x in args.layers.split(",")]
    train_idx = list(range(len(train) if args.train_sentences is None else min(args.train_sentences, len(train))))
    print(f"training sentences: {len(train_idx)}, validation sentences: {len(val)}, layers {layers}, "
          f"steps {args.steps} x {args.batch} sentences, lr {args.lr}/{args.lr_head}, keep {args.keep}, "
          f"listwise weight {args.listwise_weight}, stacked weight {args.stacked_weight}, "
          f"bias {'frozen' if args.freeze_bias else 'trained'}", flush=True)

    rows = ("baseline", "joint", "dist_baseline", "dist_joint")
    curves: dict[str, list[HeadCurve]] = {r: [] for r in rows}
    table: dict[str, list[np.ndarray]] = {r: [] for r in rows}
    bce: dict[str, list[float]] = {"baseline": [], "joint": []}
    train_seconds = 0.0
    for layer in layers:
        t0 = time.perf_counter()
        tb = next(train.iter_batches(layer, len(train_idx), indices=train_idx))
        vb = next(val.iter_batches(layer, len(val)))
        params0 = proj.layer_parameters(layer)
        base = fit_and_record("baseline", params0, tb, vb, curves, table, bce)
        print(f"layer {layer}: baseline fitted and scored in {time.perf_counter() - t0:.0f}s, "
              f"validation BCE {bce['baseline'][-1]:.4f}", flush=True)
        t1 = time.perf_counter()
        params, losses = train_layer(params0, base, tb, layer, args.steps, args.batch, args.lr, args.lr_head,
                                     args.keep, args.seed, freeze_bias=args.freeze_bias,
                                     listwise_weight=args.listwise_weight, stacked_weight=args.stacked_weight)
        dt = time.perf_counter() - t1
        train_seconds += dt
        print(f"layer {layer}: joint training {dt:.0f}s, training loss per 50 steps "
              + " ".join(f"{x:.4f}" for x in losses), flush=True)
        t2 = time.perf_counter()
        fit_and_record("joint", params, tb, vb, curves, table, bce)
        print(f"layer {layer}: re-fitted and scored in {time.perf_counter() - t2:.0f}s, "
              f"validation BCE {bce['joint'][-1]:.4f}", flush=True)

    grid = np.linspace(0.0, 1.0, GRID_POINTS)
    heads = len(curves["baseline"])
    print(f"\nRecall with per-head budgets at matched mean sparsity ({heads} heads, layers {layers}; validation "
          f"split, {len(val)} sentences; budgets allocated on the training curves)")
    print("| projection | @0.7 | @0.8 | validation BCE (Newton re-fit) |")
    print("|---|---|---|---|")
    rec: dict[str, dict[float, float]] = {}
    joint_label = f"listwise r=8 + joint {args.stacked_weight} x stacked BCE + {args.listwise_weight} x listwise"
    for name, label in (("baseline", "stacked: listwise r=8, frozen (baseline)"),
                        ("joint", f"stacked: {joint_label}"),
                        ("dist_baseline", "distance_budget (side effect): listwise r=8"),
                        ("dist_joint", f"distance_budget (side effect): {joint_label}")):
        tab = np.concatenate(table[name])
        rec[name] = {s: recall_at_sparsity(curves[name], s, allocate_budgets(grid, tab, 1.0 - s))[0] for s in LEVELS}
        b = f"{np.mean(bce[name]):.4f}" if bce.get(name) else "—"
        print(f"| {label} | {rec[name][0.7]:.4f} | {rec[name][0.8]:.4f} | {b} |")
    print("stacked, joint - baseline: " + ", ".join(f"@{s} {rec['joint'][s] - rec['baseline'][s]:+.4f}"
                                                    for s in LEVELS))
    print("distance_budget, joint - baseline: " + ", ".join(
        f"@{s} {rec['dist_joint'][s] - rec['dist_baseline'][s]:+.4f}" for s in LEVELS))
    print(f"joint training time {train_seconds:.0f}s ({len(layers)} layer(s), {torch.get_num_threads()} thread(s)); "
          f"total {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
