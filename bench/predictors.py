"""Recall at matched sparsity and cost of the learned predictors against the paper's recipe (issue #7), in one run.

1. Opens the default training and validation extractions (``--train``,
   ``--val``; make them with ``sparsefinder extract``), the paper's r = 4
   margin-loss projections (``--paper-projections``, the shipped ones) and r = 8
   listwise projections (``--projections``; trained on ``--train`` with
   :func:`sparsefinder.training.projections.train_projections` and saved there when missing).
2. Per layer, fits every learned predictor (:mod:`sparsefinder.predictors.learned.core`)
   on the training split, and a reference that thresholds the *true* scores
   q·k per head; scores every valid pair of the validation split with each.
3. Prints recall (mean over heads of the per-sentence macro recall) at matched
   mean sparsity 0.7 and 0.8 (:mod:`sparsefinder.predictors.learned.calibration`): with one threshold
   for every head (distances only), one budget for every head (each head
   calibrated to the sparsity), and per-head budgets allocated on the training
   curves; and the paper's fixed threshold grid (interpolated; "—" when the
   grid does not reach the sparsity).
4. Times, per sentence of n = 128 and 512 tokens (validation sentences
   concatenated) and all 72 heads on ``--threads`` torch threads: q·kᵀ alone,
   the gold computation (dense q·kᵀ, then ``entmax.entmax15``, then the support),
   and each predictor's ``predict`` (projection included), plus the
   sub-quadratic paths (``cascade.support``, ``global_band.support``).
5. ``pages`` (page-level support estimates, :mod:`sparsefinder.predictors.pages`; no fitting, raw q, k):
   its default grid swept on the validation split (:func:`sparsefinder.evaluation.sweep.run_sweep`), the best
   recall at mean sparsity >= each level with its efficiency (1 - pairs scored / n²), and its ``predict``
   time per sentence. ``--pages-only`` runs this part alone.

    .venv/bin/python bench/predictors.py [--layers 0,1,2,3,4,5] [--save-fitted DIR] [--json out.json]
    .venv/bin/python bench/predictors.py --pages-only [--levels 0.7,0.8,0.9] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from common import median_ms

from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.predictors import get_predictor
from sparsefinder.predictors.learned.budgets import GRID_POINTS, _BudgetPredictor
from sparsefinder.predictors.learned.calibration import (
    HeadCurve,
    allocate_budgets,
    recall_at_global_threshold,
    recall_at_sparsity,
    score_curves,
)
from sparsefinder.predictors.methods import params_key
from sparsefinder.training.projections import Projections, projection_manifest, train_projections

LEVELS = (0.7, 0.8)
PAPER_GRID = [0.5 * i for i in range(1, 11)]  # docs/method.md §4: t in {0.5, 1.0, ..., 5.0}


class TrueScores(_BudgetPredictor):
    """Reference, not a predictor: the true scores q·k of the raw queries and keys, thresholded per head."""

    name = "true_qk"
    input_space = "any"

    def _scores(self, q, k, lengths, causal, hashes):
        return (q.double() @ k.double().transpose(-1, -2))


# label, predictor name, constructor params, input ("paper" | "listwise" | "raw"), one-threshold row?
ROWS = [
    ("paper recipe: distance, r=4, margin (one threshold)", "distance_budget", {}, "paper", True),
    ("distance r=4 margin, threshold per head", "distance_budget", {}, "paper", False),
    ("distance r=8 listwise (one threshold)", "distance_budget", {}, "listwise", True),
    ("distance r=8 listwise, threshold per head", "distance_budget", {}, "listwise", False),
    ("per-query top-k, r=8 listwise", "topk", {}, "listwise", False),
    ("global_band: learned offsets + global keys (sub-quadratic)", "global_band", {}, "raw", False),
    ("priors: token + offset priors, no projection", "priors", {}, "raw", False),
    ("cascade: stacked on band/global/cluster candidates, r=8 (sub-quadratic)", "cascade", {}, "listwise", False),
    ("cascade, caps off (every key of the attended clusters; O(n²))", "cascade",
     {"max_cluster_keys": 0, "cluster_pool": 0}, "listwise", False),
    ("stacked: per-head logistic over cheap features, r=8", "stacked", {}, "listwise", False),
    ("stacked without the row-rank feature (row_rank=False, no sort), r=8", "stacked", {"row_rank": False},
     "listwise", False),
    ("stacked_mlp: per-head MLP (16 tanh units) over the same features, r=8", "stacked_mlp", {}, "listwise", False),
    ("reference: true q·k, threshold per head", "true_qk", {}, "raw", False),
]


def make(name: str, params: dict) -> _BudgetPredictor:
    if name == "true_qk":
        return TrueScores(**params)
    return get_predictor(name, **params)


def inputs(kind: str, layer: int, q: torch.Tensor, k: torch.Tensor, projs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "raw":
        return q, k
    with torch.no_grad():
        return projs[kind].project_queries(layer, q).float(), projs[kind].project_keys(layer, k).float()


def paper_grid_recall(curves: list[HeadCurve], sparsity: float) -> float | None:
    """Recall of the paper's fixed grid (one distance threshold for every head), interpolated at ``sparsity``."""
    pts = []
    for t in PAPER_GRID:  # score = -distance, so "distance <= t" is "score >= -t"
        dens = np.mean([c.density_at_threshold(-t) for c in curves])
        rec = np.mean([c.recall_at_threshold(-t) for c in curves])
        pts.append((1.0 - dens, rec))
    pts.sort()
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    if sparsity < xs.min() - 1e-9 or sparsity > xs.max() + 1e-9:
        return None
    return float(np.interp(sparsity, xs, ys))


def ensure_listwise(path: Path, train: ExtractionStore, val: ExtractionStore) -> Projections:
    if (path / "manifest.json").exists():
        return Projections.load(path, store=val)
    print(f"training r=8 listwise projections into {path} ...", flush=True)
    proj, history = train_projections(train, val_indices=val, rank=8, loss="listwise", progress=False, log=None)
    proj.save(path, projection_manifest(train, history["config"], history))
    print(f"  done in {history['seconds']:.0f}s", flush=True)
    return proj


def timing_inputs(val: ExtractionStore, n: int, layers: list[int]) -> tuple[list[str], dict[int, tuple]]:
    """Validation sentences concatenated to ``n`` tokens: tokens and each layer's ``(1, H, n, d)`` q, k."""
    toks: list[str] = []
    qs: dict[int, list] = {layer: [] for layer in layers}
    ks: dict[int, list] = {layer: [] for layer in layers}
    i = 0
    while len(toks) < n:
        s = val.sentence(i % len(val))
        toks += s.tokens
        for layer in layers:
            qs[layer].append(s.queries(layer))
            ks[layer].append(s.keys(layer))
        i += 1
    out = {layer: (torch.cat(qs[layer], 1)[None, :, :n].contiguous(), torch.cat(ks[layer], 1)[None, :, :n].contiguous())
           for layer in layers}
    return toks[:n], out


def time_costs(val: ExtractionStore, n: int, layers: list[int], projs: dict, fitted_models: dict,
               head_dim: int, dense_too: bool = True) -> list[tuple[str, float]]:
    """Median wall time (ms) per sentence of ``n`` tokens, all heads of ``layers``, of every computation."""
    import entmax

    toks, qk = timing_inputs(val, n, layers)
    lengths = torch.tensor([n])
    reps = 5 if n <= 128 else 3
    out: list[tuple[str, float]] = []

    def qk_alone() -> None:
        for layer in layers:
            q, k = qk[layer]
            torch.matmul(q, k.transpose(-1, -2))

    def gold() -> None:
        for layer in layers:
            q, k = qk[layer]
            p = entmax.entmax15(torch.matmul(q, k.transpose(-1, -2)) / head_dim ** 0.5, dim=-1)
            _ = p > 0

    def paper_distance() -> None:
        pred = get_predictor("distance", threshold=1.0)
        for layer in layers:
            qp, kp = inputs("paper", layer, *qk[layer], projs)
            pred.predict(qp, kp, lengths)

    def dense(kind: str, by_layer: dict) -> None:
        for layer in layers:
            qp, kp = inputs(kind, layer, *qk[layer], projs)
            by_layer[layer].predict(qp, kp, lengths, tokens=[toks])

    def sparse(name: str, kind: str, by_layer: dict) -> None:
        for layer in layers:
            if name == "cascade":
                qp, kp = inputs(kind, layer, *qk[layer], projs)
                by_layer[layer].support(qp[0], kp[0], toks)
            else:
                by_layer[layer].support(n, toks)

    with torch.no_grad():
        out.append(("q·kᵀ alone", median_ms(qk_alone, reps)))
        out.append(("gold: q·kᵀ + entmax15 + support", median_ms(gold, reps)))
        out.append(("paper distance r=4 (predict)", median_ms(paper_distance, reps)))
        for (name, kind, params), by_layer in fitted_models.items():
            if name == "true_qk":
                continue
            label = f"{name} ({kind}{'' if params == '{}' else ', ' + params})"
            if dense_too or name not in ("cascade", "global_band"):
                out.append((f"{label} predict, dense", median_ms(lambda k=kind, b=by_layer: dense(k, b), reps)))
            if name in ("cascade", "global_band"):
                out.append((f"{label} support, sparse",
                            median_ms(lambda m=name, k=kind, b=by_layer: sparse(m, k, b), reps)))
    return out


def pages_rows(val: ExtractionStore, layers: list[int], levels: tuple[float, ...], threads: int) -> dict:
    """``pages`` on its default grid: per level, the best mean-over-heads recall at mean sparsity >= level."""
    from sparsefinder.evaluation.pareto import best_recall_at
    from sparsefinder.evaluation.sweep import run_sweep

    t0 = time.perf_counter()
    frame = run_sweep(val, None, methods=["pages"], layers=layers, progress=False, threads=threads)
    seconds = time.perf_counter() - t0
    out: dict = {"sweep_seconds": seconds, "configurations": int(frame["params"].nunique()), "levels": {}}
    for level in levels:
        best = best_recall_at(frame, level).iloc[0]
        out["levels"][level] = None if not isinstance(best["params"], str) else {
            "params": best["params"], "recall": float(best["recall"]), "sparsity": float(best["sparsity"]),
            "exact": float(best["exact"]), "efficiency": float(best["efficiency"])}
    print(f"\npages (default grid, {out['configurations']} configurations, swept in {seconds:.0f}s): best recall at "
          "mean sparsity >= level (mean over heads)")
    print("| level | params | recall | sparsity | exact | efficiency |")
    print("|---|---|---|---|---|---|")
    for level, row in out["levels"].items():
        if row is None:
            print(f"| {level} | — | | | | |")
        else:
            print(f"| {level} | `{row['params']}` | {row['recall']:.3f} | {row['sparsity']:.3f} | {row['exact']:.3f} "
                  f"| {row['efficiency']:.3f} |")
    return out


def pages_time(val: ExtractionStore, n: int, layers: list[int]) -> list[tuple[str, float]]:
    """Median ms per sentence of ``n`` tokens, all heads of ``layers``, of ``pages`` predict (two variants)."""
    _, qk = timing_inputs(val, n, layers)
    lengths = torch.tensor([n])
    out = []
    for label, params in (("pages superset (page 16, slack 0)", {"page_size": 16}),
                          ("pages budget (page 4, sparsity 0.8)", {"page_size": 4, "slack": 0.5, "sparsity": 0.8})):
        pred = get_predictor("pages", **params)

        def run(p=pred) -> None:
            for layer in layers:
                p.predict(*qk[layer], lengths)

        with torch.no_grad():
            out.append((label, median_ms(run, 5 if n <= 128 else 3)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default="runs/default/train")
    ap.add_argument("--val", default="runs/default/val")
    ap.add_argument("--paper-projections", default="data/projections/minilm-entmax15")
    ap.add_argument("--projections", default="runs/learned/proj-listwise-r8")
    ap.add_argument("--layers", default=None, help="comma-separated layers (default all)")
    ap.add_argument("--train-sentences", type=int, default=None, help="first N training sentences (default all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lengths", default="128,512")
    ap.add_argument("--save-fitted", default=None, help="save the fitted learned predictors (evaluation.fitted)")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    ap.add_argument("--extra-projections", default=None,
                    help="comma-separated projection dirs: adds distance rows (one threshold, per head) for each")
    ap.add_argument("--distance-only", action="store_true", help="only the distance rows (and the reference)")
    ap.add_argument("--stacked-projections", default=None,
                    help="projections trained through the stacked loss (sparsefinder train --loss stacked): adds "
                         "stacked, cascade and distance rows on them")
    ap.add_argument("--levels", default="0.7,0.8", help="comma-separated target mean sparsities")
    ap.add_argument("--rows", default=None, help="comma-separated methods: only their rows (and the reference)")
    ap.add_argument("--pages-only", action="store_true", help="only the pages part (5. above)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global LEVELS
    LEVELS = tuple(float(x) for x in args.levels.split(","))
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    t_start = time.perf_counter()

    if args.pages_only:
        val = ExtractionStore.open(args.val)
        layers = list(range(val.num_layers)) if args.layers is None else [int(x) for x in args.layers.split(",")]
        pages = pages_rows(val, layers, LEVELS, args.threads)
        pages["cost_ms"] = [(n, label, ms) for n in [int(x) for x in args.lengths.split(",") if x]
                            for label, ms in pages_time(val, n, layers)]
        for n, label, ms in pages["cost_ms"]:
            print(f"n = {n}: {label}: {ms:.1f} ms ({len(layers)} layer(s) x {val.num_heads} heads)")
        if args.json:
            Path(args.json).write_text(json.dumps({"pages": pages, "layers": layers,
                                                   "threads": torch.get_num_threads()}, indent=1, default=str))
        return 0
    train, val = ExtractionStore.open(args.train), ExtractionStore.open(args.val)
    projs = {"paper": Projections.load(args.paper_projections, store=val),
             "listwise": ensure_listwise(Path(args.projections), train, val)}
    rows = list(ROWS)
    for i, path in enumerate([] if not args.extra_projections else args.extra_projections.split(",")):
        proj = Projections.load(path, store=val)
        kind = f"extra{i}"
        projs[kind] = proj
        loss = proj.manifest.get("config", {}).get("loss", "margin")
        rows.insert(4 + 2 * i, (f"distance r={proj.rank} {loss} [{path}] (one threshold)", "distance_budget", {},
                                kind, True))
        rows.insert(5 + 2 * i, (f"distance r={proj.rank} {loss} [{path}], threshold per head", "distance_budget", {},
                                kind, False))
    if args.stacked_projections:
        projs["joint"] = Projections.load(args.stacked_projections, store=val)
        at = next(i for i, r in enumerate(rows) if r[1] == "true_qk")
        rows[at:at] = [
            ("distance r=8, stacked-loss projections, threshold per head", "distance_budget", {}, "joint", False),
            ("cascade on stacked-loss projections (sub-quadratic)", "cascade", {}, "joint", False),
            ("stacked on projections trained through its own loss, r=8", "stacked", {}, "joint", False),
        ]
    if args.distance_only:
        rows = [r for r in rows if r[1] in ("distance_budget", "true_qk")]
    if args.rows:
        rows = [r for r in rows if r[1] in {*args.rows.split(","), "true_qk"}]
    layers = list(range(train.num_layers)) if args.layers is None else [int(x) for x in args.layers.split(",")]
    train_idx = list(range(len(train) if args.train_sentences is None else min(args.train_sentences, len(train))))
    print(f"training sentences: {len(train_idx)}, validation sentences: {len(val)}, layers {layers}", flush=True)

    curves: dict[int, list[HeadCurve]] = {i: [] for i in range(len(rows))}
    train_recall: dict[int, list[np.ndarray]] = {i: [] for i in range(len(rows))}
    fitted: dict[str, dict[str, dict[int, object]]] = {}
    fitted_models: dict[tuple[str, str, str], dict[int, _BudgetPredictor]] = {}
    fit_seconds: dict[str, float] = {}
    for layer in layers:
        t_layer = time.perf_counter()
        tb = next(train.iter_batches(layer, len(train_idx), indices=train_idx))
        vb = next(val.iter_batches(layer, len(val)))
        cache: dict[tuple[str, str, str], _BudgetPredictor] = {}
        for i, (_label, name, params, kind, _) in enumerate(rows):
            key = (name, kind, json.dumps(params, sort_keys=True))
            if key not in cache:
                t0 = time.perf_counter()
                q, k = inputs(kind, layer, tb.queries, tb.keys, projs)
                cache[key] = make(name, params).fit(q, k, tb.lengths, gold=tb.gold, tokens=tb.tokens)
                fit_seconds[f"{name}/{kind}"] = fit_seconds.get(f"{name}/{kind}", 0.0) + time.perf_counter() - t0
                qv, kv = inputs(kind, layer, vb.queries, vb.keys, projs)
                val_curves = score_curves(cache[key], qv, kv, vb.lengths, vb.gold.edges, vb.tokens)
                # Compressed (exact points nearest 10,001 densities): 72 heads x 12 rows of full curves overflow memory.
                cache[key].val_curves = [c.compress(10_001) for c in val_curves]  # type: ignore[attr-defined]
                fitted_models.setdefault(key, {})[layer] = cache[key]
                if (name != "true_qk" and kind == "listwise" or name in ("priors", "global_band")) and not params:
                    for s_ in (0.5, 0.6, 0.7, 0.8, 0.9):
                        pred = make(name, {**params, "sparsity": s_}).load_state_dict(cache[key].state_dict())
                        fitted.setdefault(name, {}).setdefault(params_key({"sparsity": s_}), {})[layer] = pred
            curves[i].extend(cache[key].val_curves)  # type: ignore[attr-defined]
            train_recall[i].append(cache[key].train_recall_.numpy())
        print(f"layer {layer}: fitted and scored in {time.perf_counter() - t_layer:.0f}s", flush=True)

    grid = np.linspace(0.0, 1.0, GRID_POINTS)
    results = []
    for i, (label, name, _params, kind, one_threshold) in enumerate(rows):
        row: dict = {"predictor": label, "method": name, "input": kind}
        table = np.concatenate(train_recall[i])  # (72, G)
        for s in LEVELS:
            if one_threshold:
                r, sp, _ = recall_at_global_threshold(curves[i], s)
                row[f"one_threshold@{s}"] = (r, sp)
                if kind == "paper":
                    row[f"paper_grid@{s}"] = paper_grid_recall(curves[i], s)
            else:
                row[f"one_budget@{s}"] = recall_at_sparsity(curves[i], s)
                dens = allocate_budgets(grid, table, 1.0 - s)
                row[f"per_head@{s}"] = recall_at_sparsity(curves[i], s, dens)
        results.append(row)

    def fmt(x) -> str:
        if x is None:
            return "—"
        if isinstance(x, tuple):
            return f"{x[0]:.3f}"
        return f"{x:.3f}"

    print("\nRecall at matched mean sparsity (mean over the heads of", f"{len(layers)} layer(s); validation split, "
          f"{len(val)} sentences)")
    heads = [f"{kind} @{s}" if i == 0 else f"@{s}" for kind in ("one threshold", "one budget every head",
                                                                  "per-head budgets") for i, s in enumerate(LEVELS)]
    print("| predictor | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    for row in results:
        cells = [fmt(row.get(f"one_threshold@{s}")) if f"one_threshold@{s}" in row else "" for s in LEVELS]
        cells += [fmt(row.get(f"one_budget@{s}")) if f"one_budget@{s}" in row else "" for s in LEVELS]
        cells += [fmt(row.get(f"per_head@{s}")) if f"per_head@{s}" in row else "" for s in LEVELS]
        print(f"| {row['predictor']} | " + " | ".join(cells) + " |")
    paper = results[0]
    print("paper's fixed grid t in {0.5, ..., 5.0} (interpolated): "
          + ", ".join(f"@{s} {fmt(paper.get(f'paper_grid@{s}'))}" for s in LEVELS))
    achieved = {row["predictor"]: {k: v[1] for k, v in row.items() if isinstance(v, tuple)} for row in results}
    worst = max(abs(sp - float(k.split("@")[1])) for a in achieved.values() for k, sp in a.items())
    print(f"largest |achieved mean sparsity - target| over all cells: {worst:.2e}")
    print("fit seconds (all layers): " + ", ".join(f"{k} {v:.0f}" for k, v in fit_seconds.items()), flush=True)

    # ---------------------------------------------------------------- cost per sentence
    cost_rows = []
    for n in [int(x) for x in args.lengths.split(",") if x]:
        rows_n = time_costs(val, n, layers, projs, fitted_models, train.head_dim)
        cost_rows += [(n, label, ms) for label, ms in rows_n]
        base = next(ms for label, ms in rows_n if label == "q·kᵀ alone")
        gold_ms = next(ms for label, ms in rows_n if label.startswith("gold"))
        print(f"\nCost per sentence of n = {n} tokens, {len(layers)} layer(s) x {train.num_heads} heads, "
              f"{torch.get_num_threads()} thread(s) (median of {5 if n <= 128 else 3}):")
        print("| computation | ms | / q·kᵀ | / gold |")
        print("|---|---|---|---|")
        for label, ms in rows_n:
            print(f"| {label} | {ms:.1f} | {ms / base:.2f} | {ms / gold_ms:.3f} |")
    pages = pages_rows(val, layers, LEVELS, args.threads)
    pages["cost_ms"] = [(n, label, ms) for n in [int(x) for x in args.lengths.split(",") if x]
                        for label, ms in pages_time(val, n, layers)]
    cascade_sizes = {}
    for (name, kind, params), by_layer in fitted_models.items():
        if name == "cascade":
            cascade_sizes[params] = sizes = {}
            for n in [int(x) for x in args.lengths.split(",") if x]:
                toks, qk = timing_inputs(val, n, layers)
                scored = 0
                for layer in layers:
                    qp, kp = inputs(kind, layer, *qk[layer], projs)
                    idx, keep = by_layer[layer].support(qp[0], kp[0], toks)
                    scored += int((idx >= 0).sum())
                sizes[n] = scored / (len(layers) * train.num_heads * n * n)
    for params, sizes in cascade_sizes.items():
        print(f"cascade {params}: candidate pairs scored / n² (mean over heads): "
              + ", ".join(f"n={n}: {v:.3f}" for n, v in sizes.items()))
    print(f"\ntotal bench time {time.perf_counter() - t_start:.0f}s", flush=True)

    if args.save_fitted:
        from sparsefinder.evaluation.fitted import save_fitted

        save_fitted(fitted, args.save_fitted, info={"train": args.train, "projections": args.projections,
                                                    "layers": layers, "sentences": len(train_idx)})
        print(f"saved fitted learned predictors to {args.save_fitted}")
    if args.json:
        Path(args.json).write_text(json.dumps({"recall": results, "cost_ms": cost_rows, "layers": layers,
                                               "threads": torch.get_num_threads(),
                                               "cascade_scored_fraction": cascade_sizes, "pages": pages},
                                              indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
