"""How the cost of ``Cascade.support`` grows with n, against q·kᵀ of the same layer (issue #7, goal 2).

Fits ``cascade`` (capped: the defaults, and optionally with its caps off) on
the first ``--train-sentences`` training sentences of one layer (listwise r = 8
projections), then times one sentence of n tokens (validation sentences
concatenated) for every n in ``--lengths``: ``support`` (all 12 heads,
projection excluded) and ``q @ k.T`` on the raw queries and keys; prints the
median of ``--repeats`` runs, the candidates per query (``M``) and the
fraction of all pairs scored.

    .venv/bin/python bench/cascade_scaling.py [--lengths 128,512,1024,2048] [--uncapped-up-to 512]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import median_ms

from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.predictors import get_predictor
from sparsefinder.training.projections import Projections


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default="runs/default/train")
    ap.add_argument("--val", default="runs/default/val")
    ap.add_argument("--projections", default="data/projections/minilm-entmax15-listwise-r8")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--train-sentences", type=int, default=300)
    ap.add_argument("--lengths", default="128,512,1024,2048")
    ap.add_argument("--uncapped-up-to", type=int, default=512, help="time the caps-off cascade up to this n")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, val = ExtractionStore.open(args.train), ExtractionStore.open(args.val)
    proj = Projections.load(args.projections, store=val)
    layer = args.layer
    tb = next(train.iter_batches(layer, args.train_sentences, indices=list(range(args.train_sentences))))
    with torch.no_grad():
        q, k = proj.project_queries(layer, tb.queries).float(), proj.project_keys(layer, tb.keys).float()
    preds = {"cascade": get_predictor("cascade"),
             "cascade, caps off": get_predictor("cascade", max_cluster_keys=0, cluster_pool=0)}
    for p in preds.values():
        p.fit(q, k, tb.lengths, gold=tb.gold, tokens=tb.tokens)
    print(f"layer {layer}, {val.num_heads} heads, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    print("| n | q·kᵀ ms | computation | ms | / q·kᵀ | candidates per query M | pairs scored / n² |")
    print("|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.lengths.split(",")]:
        toks: list[str] = []
        qs, ks = [], []
        i = 0
        while len(toks) < n:
            s = val.sentence(i % len(val))
            toks += s.tokens
            qs.append(s.queries(layer))
            ks.append(s.keys(layer))
            i += 1
        q_raw, k_raw = torch.cat(qs, 1)[:, :n].contiguous(), torch.cat(ks, 1)[:, :n].contiguous()
        toks = toks[:n]
        with torch.no_grad():
            qp = proj.project_queries(layer, q_raw[None]).float()[0]
            kp = proj.project_keys(layer, k_raw[None]).float()[0]
            base = median_ms(lambda a=q_raw, b=k_raw: torch.matmul(a, b.transpose(-1, -2)), args.repeats)
            for name, pred in preds.items():
                if name != "cascade" and n > args.uncapped_up_to:
                    continue
                ms = median_ms(lambda p=pred, a=qp, b=kp, t=toks: p.support(a, b, t), args.repeats)
                idx, _ = pred.support(qp, kp, toks)
                scored = float((idx >= 0).sum()) / (idx.shape[0] * n * n)
                print(f"| {n} | {base:.2f} | {name} support | {ms:.1f} | {ms / base:.1f} | {idx.shape[-1]} "
                      f"| {scored:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
