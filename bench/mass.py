"""What mass recall costs the sweep: the same sweep with and without it, in one run (docs/method.md §2.2).

The sweep recomputes each batch's gold probabilities from the stored q and k (closed-form 1.5-entmax on
the stored support) and adds one weighted histogram over the gold edges per configuration. This times
``run_sweep(mass=False)`` and ``run_sweep(mass=True)`` alternately (``--repeats`` each, the minimum
kept), on the paper's methods with the shipped projections and fitted centroids.

    .venv/bin/python bench/mass.py --store runs/val [--every 4] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.evaluation.sweep import run_sweep
from sparsefinder.results import load_fitted, load_projections

METHODS = ["distance", "bucketing", "kmeans", "blocks", "window", "bigbird", "longformer", "reformer", "routing",
           "strided", "position", "random"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="an extraction of the default model (sparsefinder extract)")
    p.add_argument("--projections", default="data/projections/minilm-entmax15")
    p.add_argument("--fitted", default="data/fitted/minilm-entmax15")
    p.add_argument("--every", type=int, default=4, help="every k-th sentence of the store")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    store = ExtractionStore.open(args.store)
    projections, fitted = load_projections(args.projections), load_fitted(args.fitted)
    indices = list(range(0, len(store), args.every))
    best: dict[bool, float] = {}
    parts: dict[bool, dict[str, float]] = {}
    for _ in range(args.repeats):
        for mass in (False, True):
            t = time.perf_counter()
            frame = run_sweep(store, projections, methods=METHODS, fitted=fitted, progress=False,
                              threads=args.threads, mass=mass, indices=indices)
            wall = time.perf_counter() - t
            if wall < best.get(mass, float("inf")):
                best[mass], parts[mass] = wall, frame.attrs["sweep"]["seconds_by_part"]
    info = frame.attrs["sweep"]["mass"]
    print(f"{len(indices)} sentences x {store.num_layers * store.num_heads} heads, {len(METHODS)} methods, "
          f"{args.threads} thread(s), best of {args.repeats}")
    print(f"sweep without mass recall: {best[False]:.1f}s; with: {best[True]:.1f}s "
          f"(+{best[True] / best[False] - 1:.0%}); probabilities (read+project): "
          f"{parts[False]['read+project']:.2f}s -> {parts[True]['read+project']:.2f}s")
    print(f"support check: {info}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"sentences": len(indices), "threads": args.threads, "seconds_without": best[False],
                       "seconds_with": best[True], "ratio": best[True] / best[False], "parts_without": parts[False],
                       "parts_with": parts[True], "mass": info}, f, indent=1)


if __name__ == "__main__":
    main()
