"""Benchmark corpus extraction: the default model over the default corpus's validation split.

Prints sentences, tokens, wall time, sentences/s, tokens/s, bytes on disk, the
device and torch's thread count, then the read rate of one streaming pass over
one layer (what predictor training does). The store goes to a temporary
directory that is removed afterwards unless ``--out`` is given.

    .venv/bin/python bench/extract.py [--split validation] [--batch-size 32] [--limit N] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from common import load_default_model

from sparsefinder.corpora.extract import DEFAULT_SHARD_SIZE, extract_corpus
from sparsefinder.corpora.readers import default_corpus
from sparsefinder.corpora.store import ExtractionStore


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="validation", choices=["train", "validation", "all"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    p.add_argument("--limit", type=int, default=None, help="only the first N sentences")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--out", default=None, help="keep the store in this directory (default: a removed temp dir)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    corpus = default_corpus(None if args.split == "all" else args.split)
    texts = corpus.texts()[: args.limit] if args.limit else corpus.texts()
    t = time.perf_counter()
    model = load_default_model(args.device)
    load_s = time.perf_counter() - t

    tmp = None if args.out else tempfile.mkdtemp(prefix="sparsefinder-bench-")
    out = Path(args.out or tmp) / "store"
    try:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        extract_corpus(
            model, texts, out, batch_size=args.batch_size, dtype=args.dtype, shard_size=args.shard_size,
            progress=not args.no_progress, corpus_name=corpus.name, split=args.split, overwrite=bool(args.out),
        )
        wall = time.perf_counter() - t
        store = ExtractionStore.open(out)
        tokens = store.num_tokens
        size = sum(f.stat().st_size for f in out.iterdir())

        t = time.perf_counter()
        read = sum(len(b.indices) for b in store.iter_batches(layer=0, batch_size=args.batch_size))
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        store.check_model(model)
        check_s = time.perf_counter() - t

        gpu = f" ({torch.cuda.get_device_name(model.device)})" if model.device.type == "cuda" else ""
        print(f"model            {model.name}  ({model.num_layers} layers x {model.num_heads} heads, "
              f"head dim {store.head_dim}, alpha {store.manifest['alpha']})  loaded in {load_s:.1f} s")
        print(f"corpus           {corpus.name}  split {args.split}")
        print(f"sentences        {len(store)}")
        print(f"tokens           {tokens}  (mean {tokens / max(len(store), 1):.1f} per sentence)")
        print(f"wall time        {wall:.2f} s")
        print(f"sentences/s      {len(store) / wall:.1f}")
        print(f"tokens/s         {tokens / wall:.0f}")
        print(f"bytes on disk    {size:,}  ({size / 2**20:.1f} MiB, {len(store.manifest['shards'])} shard(s), "
              f"q/k {store.manifest['dtype']}, {size / max(tokens, 1):,.0f} B/token)")
        print(f"device           {model.device}{gpu}")
        print(f"torch threads    {torch.get_num_threads()}")
        print(f"batch size       {args.batch_size}")
        print(f"read one layer   {read} sentences in {read_s:.2f} s ({read / read_s:.0f} sentences/s, "
              f"iter_batches, batch {args.batch_size})")
        print(f"check_model      {check_s:.2f} s")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
