"""Benchmark the sweep engine against a straightforward per-configuration loop, in one run.

1. Opens ``--store`` (an extracted corpus), or extracts the default validation
   split with the default model into a cache directory (reused next time).
2. Loads ``--projections``, or trains quick ones on the store's first
   sentences (for timing only; say so in any report).
3. Fits the methods that learn (k-means, blocks, Routing and the learned
   predictors of the default sweep) on ``--train-store``, printing the seconds
   per method (default store: the default training split, extracted into the
   cache like the validation split when ``--store`` is not given; with
   ``--store`` but no ``--train-store``, the swept store itself, which is fine
   for timing only). ``bench/fit.py`` times the centroid fits alone, against
   one fit per grid point.
4. Times :func:`sparsefinder.evaluation.sweep.run_sweep` over the full default grid, every
   layer and head, every sentence.
5. Times the straightforward implementation on ``--subset`` sentences spread
   evenly over the length distribution: for each sentence, layer and configuration, project that
   sentence's queries and keys, build the dense graph with ``predictor.predict``
   and score it with :func:`sparsefinder.metrics.graph_metrics` (nothing
   shared), checks that both give the same numbers on the subset, and prints
   the speed ratio per (configuration, sentence, layer).

    .venv/bin/python bench/sweep.py [--store DIR] [--projections DIR] [--subset 10] [--out sweep.parquet]
        [--json figures.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from common import load_default_model

from sparsefinder.corpora.store import ExtractionStore, StoreError
from sparsefinder.evaluation.pareto import best_recall_table
from sparsefinder.evaluation.sweep import canonical_params, default_grids, fit_predictors, run_sweep, save_sweep
from sparsefinder.metrics import RATIO_COLUMNS, graph_metrics
from sparsefinder.predictors import REGISTRY, get_predictor


def open_or_extract(path: str | None, progress: bool, split: str = "validation") -> ExtractionStore:
    """``path``, or the default corpus's ``split`` extracted with the default model into the cache (reused)."""
    if path:
        return ExtractionStore.open(path)
    from sparsefinder.corpora.extract import extract_corpus
    from sparsefinder.corpora.readers import cache_dir, default_corpus

    model = load_default_model()
    out = cache_dir() / "bench" / f"{model.name}-{split}-store"
    try:
        store = ExtractionStore.open(out)
        if store.manifest.get("complete"):
            store.check_model(model)
            print(f"store: reusing the cached extraction {out}")
            return store
    except StoreError:
        pass
    corpus = default_corpus(split)
    print(f"store: extracting {corpus.name} ({len(corpus.texts())} sentences) with {model.name} into {out}")
    t = time.perf_counter()
    extract_corpus(model, corpus, out, progress=progress, split=split, overwrite=True)
    print(f"store: extracted in {time.perf_counter() - t:.1f}s")
    return ExtractionStore.open(out)


def load_or_train_projections(path: str | None, store: ExtractionStore, quick: int, progress: bool):
    from sparsefinder.training.projections import Projections, train_projections

    if path:
        return Projections.load(path, store=store), f"loaded from {path}"
    n = min(quick, len(store))
    print(f"projections: none given, training QUICK projections (1 epoch on the store's first {n} sentences, "
          "for timing only)")
    t = time.perf_counter()
    proj, _ = train_projections(store, train_indices=range(n), epochs=1, progress=progress, log=None)
    return proj, f"quick: 1 epoch on the first {n} sentences of the swept store, {time.perf_counter() - t:.1f}s"


def straightforward(store, projections, fitted, grids, methods, layers, indices, seed):
    """Per sentence, layer and configuration: project, predict one dense graph, graph_metrics. Nothing shared."""
    out = {}
    for i in indices:
        s = store.sentence(int(i))
        for layer in layers:
            q_raw, k_raw = s.queries(layer)[None], s.keys(layer)[None]
            gold = s.gold_graph(layer)
            for m in methods:
                cls = REGISTRY[m]
                for point in grids[m]:
                    key = canonical_params(point)
                    if cls.requires_fit:
                        pred = fitted[m][key][layer]
                    else:
                        pred = get_predictor(m, **({"seed": seed} if "seed" in cls._param_names() else {}), **point)
                    q, k = q_raw, k_raw
                    if cls.input_space in ("projected", "any"):
                        q, k = projections.project_queries(layer, q), projections.project_keys(layer, k)
                    graph, cost = pred.predict_with_cost(q, k, [s.length], store.causal, head_dim=store.head_dim,
                                                         sentence_ids=[int(i)])
                    metrics = graph_metrics(gold, graph, cost)
                    out[(m, key, int(i), layer)] = np.stack([metrics[c][0].numpy() for c in RATIO_COLUMNS], -1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=None, help="an extracted store (default: extract the default validation split)")
    p.add_argument("--projections", default=None, help="a projections directory (default: train quick ones)")
    p.add_argument("--train-store", default=None,
                   help="store to fit k-means/blocks/routing on (default: the default train split when --store is "
                        "not given, else --store itself)")
    p.add_argument("--subset", type=int, default=20, help="sentences for the straightforward loop")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-points", type=int, default=5_000, help="points per head for fitting k-means/blocks")
    p.add_argument("--quick-sentences", type=int, default=64, help="sentences for quick projections")
    p.add_argument("--out", default=None, help="also save the sweep table (Parquet + JSON sidecar)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for everything here (default 1: batches are small, and on shared "
                        "cores OpenMP threads stall each other; 0 = leave torch's default)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as one JSON object to FILE")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    progress = not args.no_progress
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), {os.cpu_count()} CPUs visible, "
          f"load average {os.getloadavg()[0]:.2f} (other work on the machine slows both timings alike)")
    store = open_or_extract(args.store, progress)
    m = store.manifest
    print(f"store: {store.path}  model {m['model']}  corpus {m.get('corpus')!r} split {m.get('split')!r}  "
          f"{len(store)} sentences, {store.num_tokens} tokens, {store.num_layers} layers x {store.num_heads} heads")
    projections, proj_note = load_or_train_projections(args.projections, store, args.quick_sentences, progress)
    print(f"projections: rank {projections.rank}, {proj_note}")

    if args.train_store or not args.store:
        # The default protocol: fit on the training split, evaluate on the validation split.
        train = open_or_extract(args.train_store, progress, split="train")
        note = ""
    else:
        train, note = store, " (the swept store itself: timing only)"
    t = time.perf_counter()
    fitted = fit_predictors(train, projections, seed=args.seed, max_points=args.max_points, progress=progress)
    fit_wall = time.perf_counter() - t
    fit_parts = fitted.info["seconds_by_method"]
    print(f"fit: {', '.join(m for m in fit_parts if m != '(load)')} on {train.path}{note}: {fit_wall:.1f}s")
    print("fit seconds by method: " + ", ".join(f"{k} {v:.1f}" for k, v in fit_parts.items()))
    centroid_fit = sum(v for k, v in fit_parts.items() if k in ("kmeans", "blocks", "routing"))
    print(f"fit: k-means + blocks + routing {centroid_fit:.1f}s "
          f"({'under' if centroid_fit <= 60 else 'OVER'} the 60 s goal of issue #17)")

    # ---- the sweep engine, full grid
    t = time.perf_counter()
    frame = run_sweep(store, projections, fitted=fitted, batch_size=args.batch_size, progress=progress,
                      seed=args.seed)
    fast_wall = time.perf_counter() - t
    info = frame.attrs["sweep"]
    methods = info["methods"]
    grids = default_grids(methods)
    n_cfg = sum(len(g) for g in grids.values())
    layers = list(range(store.num_layers))
    units = n_cfg * len(store) * len(layers)
    print(f"\nsweep: {len(methods)} methods ({', '.join(methods)}), {n_cfg} configurations, "
          f"{store.num_layers * store.num_heads} heads, {len(store)} sentences; skipped: {info['skipped']}")
    print(f"sweep: {fast_wall:.1f}s wall, {n_cfg / fast_wall:.2f} configurations/s (all heads, all sentences), "
          f"{units / fast_wall:,.0f} configuration-sentence-layers/s, table {frame.shape}")

    parts = info["seconds_by_part"]
    print("sweep seconds by part: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))

    # ---- the straightforward loop, on a subset
    # Sentences at evenly spaced ranks of the length distribution, so that the per-sentence
    # extrapolation is fair (the cost of a graph grows with n²).
    by_length = np.argsort(store.lengths(), kind="stable")
    picks = np.unique(np.linspace(0, len(store) - 1, min(args.subset, len(store))).round().astype(int))
    subset = sorted(int(i) for i in by_length[picks])
    t = time.perf_counter()
    naive = straightforward(store, projections, fitted, grids, methods, layers, subset, args.seed)
    naive_wall = time.perf_counter() - t
    naive_units = n_cfg * len(subset) * len(layers)
    per_naive = naive_wall / naive_units
    per_fast = fast_wall / units
    print(f"straightforward: {naive_wall:.1f}s for {len(subset)} sentences x {n_cfg} configurations x "
          f"{len(layers)} layers = {naive_units:,} graphs, {per_naive * 1e3:.2f} ms each")
    print(f"straightforward, extrapolated to the full run: {per_naive * units:.0f}s "
          f"({per_naive * units / 60:.1f} min)")

    # Same numbers on the subset (sweep per sentence vs the loop).
    check = run_sweep(store, projections, fitted=fitted, batch_size=args.batch_size, progress=False,
                      seed=args.seed, indices=subset, per_sentence=True)
    check = check.sort_values(["method", "params", "sentence", "layer", "head"], kind="stable")
    groups = check.groupby(["method", "params", "sentence", "layer"], sort=False).indices
    ratios = check[list(RATIO_COLUMNS)].to_numpy()
    worst = 0.0
    for (mth, key, i, layer), values in naive.items():
        got = ratios[groups[(mth, key, i, layer)]]
        worst = max(worst, float(np.nanmax(np.abs(got - values))))
    print(f"agreement on the subset: max |sweep - straightforward| over all ratios = {worst:.3g}")

    ratio = per_naive / per_fast
    print(f"\nSPEED RATIO (per configuration-sentence-layer): {ratio:.1f}x "
          f"(sweep {per_fast * 1e6:.1f} us vs straightforward {per_naive * 1e6:.0f} us; "
          f"{'meets' if ratio >= 10 else 'MISSES'} the >= 10x goal of issue #17)")
    print(f"full grid x {store.num_layers * store.num_heads} heads x {len(store)} sentences: {fast_wall:.1f}s "
          f"({'under' if fast_wall <= 45 else 'OVER'} the 45 s goal of issue #17)")

    print("\nbest mean-over-heads recall at sparsity >= 0.5 / 0.7 / 0.9"
          + (" (quick projections: illustrative only)" if not args.projections else "")
          + (" (fits on the swept store: illustrative only)" if note else ""))
    print(best_recall_table(frame).round(3).to_string())
    if args.json:
        figures = {
            "torch_threads": torch.get_num_threads(), "fit_wall_s": round(fit_wall, 3),
            "fit_seconds_by_method": fit_parts, "centroid_fit_s": round(centroid_fit, 3),
            "sweep_wall_s": round(fast_wall, 3), "sweep_seconds_by_part": parts,
            "straightforward_wall_s": round(naive_wall, 3), "straightforward_graphs": naive_units,
            "speed_ratio": round(per_naive / per_fast, 3), "agreement_max_abs": worst,
        }
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1)
        print(f"figures written to {args.json}")
    if args.out:
        save_sweep(frame, args.out, {"projections_note": proj_note, "bench_wall_s": round(fast_wall, 3)})
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
