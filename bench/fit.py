"""Benchmark fitting the centroid methods (k-means, blocks, Routing) against one fit per grid point, in one run.

For each layer of ``--train-store``: project its queries and keys once, then
time, in turn on the same tensors,

- the straightforward fit: one fit per ``n_clusters`` of the default grid, each
  pooling and subsampling the points, seeding k-means++ and running Lloyd until
  every head has converged (Routing: its own shuffled passes, indexing each
  mini-batch), with the distance sum allocating fresh tensors: the algorithm
  as it stood before issue #17, kept here as the reference;
- :meth:`~sparsefinder.predictors.base.CentroidPredictor.fit_many`, as
  :func:`~sparsefinder.evaluation.sweep.fit_predictors` calls it (every count at
  once: one pooling and seeding, per-head early stop, shared Routing passes);

checks that both give the same centroids (bit for bit) and prints the seconds
per method and the ratio. Other work on the machine slows both alike.

    .venv/bin/python bench/fit.py --train-store runs/train --projections data/projections/minilm-entmax15
        [--layers 0,1] [--max-points 5000] [--threads 1] [--json figures.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.evaluation.sweep.configs import _project
from sparsefinder.evaluation.sweep.fit import _pad_cat
from sparsefinder.predictors import REGISTRY, get_predictor
from sparsefinder.predictors.clustering import kmeans_plusplus, make_generator, normalise, pool_tokens
from sparsefinder.predictors.paper import block_lengths, block_vectors
from sparsefinder.training.projections import Projections

METHODS = ("kmeans", "blocks", "routing")


def reference_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(*a.shape[:-1], b.shape[-2], dtype=torch.promote_types(a.dtype, b.dtype))
    for e in range(a.shape[-1]):
        out += (a[..., :, None, e] - b[..., None, :, e]) ** 2
    return out


def reference_lloyd(x: torch.Tensor, centres: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Every head iterates until no head's assignment changes."""
    heads, _, dim = x.shape
    assign = None
    for _ in range(max_iter):
        new_assign = reference_sq_dists(x, centres).argmin(dim=-1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(centres).scatter_add_(1, assign[..., None].expand(-1, -1, dim), x)
        counts = torch.zeros(heads, centres.shape[1], dtype=x.dtype).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=x.dtype))
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centres)
    return centres


def reference_kmeans(q, k, lengths, n_clusters: int, max_iter: int, max_points: int | None, seed: int):
    gen = make_generator(seed)
    x = pool_tokens(q, k, lengths, max_points, gen)
    return reference_lloyd(x, kmeans_plusplus(x, n_clusters, gen), max_iter)


def reference_routing(q, k, lengths, pred) -> torch.Tensor:
    x = normalise(pool_tokens(q, k, lengths))
    points = x.shape[1]
    gen = make_generator(pred.seed)
    centroids = x[:, torch.randperm(points, generator=gen)[torch.arange(pred.n_clusters) % points]]
    heads, clusters, dim = centroids.shape
    for _ in range(pred.epochs):
        perm = torch.randperm(points, generator=gen)
        for lo in range(0, points, pred.batch_points):
            xb = x[:, perm[lo : lo + pred.batch_points]]
            assign = torch.einsum("hmd,hcd->hmc", xb, centroids).argmax(dim=-1)
            sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(-1, -1, dim), xb)
            counts = torch.zeros(heads, clusters, dtype=x.dtype).scatter_add_(
                1, assign, torch.ones_like(assign, dtype=x.dtype))
            mean = sums / counts.clamp(min=1)[..., None]
            moved = normalise(pred.decay * centroids + (1 - pred.decay) * mean)
            centroids = torch.where(counts[..., None] > 0, moved, centroids)
    return centroids


def reference_fit(method: str, pred, q, k, lengths) -> torch.Tensor:
    if method == "kmeans":
        return reference_kmeans(q, k, lengths, pred.n_clusters, pred.max_iter, pred.max_points, pred.seed)
    if method == "blocks":
        b = pred.block_size
        return reference_kmeans(block_vectors(q, lengths, b), block_vectors(k, lengths, b), block_lengths(lengths, b),
                                pred.n_clusters, pred.max_iter, pred.max_points, pred.seed)
    return reference_routing(q, k, lengths, pred)


def predictors(method: str, max_points: int, seed: int) -> list:
    """One instance per distinct fit of the default grid (blocks: its top_k grid shares one fit)."""
    names = set(REGISTRY[method]._param_names())
    extra = {"seed": seed} | ({"max_points": max_points} if "max_points" in names else {})
    if method == "blocks":
        return [get_predictor(method, **extra)]
    return [get_predictor(method, **point, **extra) for point in REGISTRY[method].grid()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-store", required=True)
    p.add_argument("--projections", required=True)
    p.add_argument("--layers", default=None, help="comma-separated (default: all)")
    p.add_argument("--max-points", type=int, default=5_000, help="as bench/sweep.py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as one JSON object to FILE")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    store = ExtractionStore.open(args.train_store)
    proj = Projections.load(args.projections, store=store)
    layers = range(store.num_layers) if args.layers is None else [int(x) for x in args.layers.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.2f}; "
          f"{store.path}: {len(store)} sentences, {store.num_tokens} tokens, max_points {args.max_points}")
    seconds = {m: {"reference": 0.0, "fit_many": 0.0} for m in METHODS}
    identical = True
    for layer in layers:
        qs, ks, ls = [], [], []
        for batch in store.iter_batches(layer, 32, order="length"):
            qp, kp = _project(proj, layer, batch.queries, batch.keys)
            qs.append(qp), ks.append(kp), ls.append(batch.lengths)
        q, k, lengths = _pad_cat(qs).float(), _pad_cat(ks).float(), torch.cat(ls).long()
        for m in METHODS:
            preds = predictors(m, args.max_points, args.seed)
            t = time.perf_counter()
            ref = [reference_fit(m, pr, q, k, lengths) for pr in preds]
            seconds[m]["reference"] += time.perf_counter() - t
            t = time.perf_counter()
            REGISTRY[m].fit_many(preds, q, k, lengths)
            seconds[m]["fit_many"] += time.perf_counter() - t
            same = all(torch.equal(r, pr.centroids_) for r, pr in zip(ref, preds, strict=True))
            identical &= same
            print(f"layer {layer} {m:8s} reference {seconds[m]['reference']:7.1f}s  fit_many "
                  f"{seconds[m]['fit_many']:6.1f}s (cumulative)  identical {same}", flush=True)
    total_ref = sum(v["reference"] for v in seconds.values())
    total_new = sum(v["fit_many"] for v in seconds.values())
    for m, v in seconds.items():
        print(f"{m:8s} reference {v['reference']:7.1f}s  fit_many {v['fit_many']:6.1f}s  "
              f"ratio {v['reference'] / v['fit_many']:.2f}x")
    print(f"TOTAL    reference {total_ref:7.1f}s  fit_many {total_new:6.1f}s  ratio {total_ref / total_new:.2f}x  "
          f"({len(list(layers))} layers; centroids identical: {identical})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"seconds": seconds, "total_reference_s": round(total_ref, 3),
                       "total_fit_many_s": round(total_new, 3), "identical": identical,
                       "layers": list(layers), "max_points": args.max_points}, fh, indent=1)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
