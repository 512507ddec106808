"""Benchmark corpus extraction: the default model over the default corpus's validation split.

Prints sentences, tokens, wall time, sentences/s, tokens/s, bytes on disk, the
device and torch's thread count, then the read rate of one streaming pass over
one layer (what predictor training does). The store goes to a temporary
directory that is removed afterwards unless ``--out`` is given.

``--engine ray --workers 1,2`` also runs the Ray engine (sparsefinder.distributed) on a local
Ray with each worker count, in the same run, on the same texts and shard size, against the
single-process path with the same torch thread count as one Ray worker (so the stores are
bit-identical, which is checked): sentences/s and tokens/s of each, and Ray's overhead at one
worker (end to end: both include loading the model; starting Ray itself is not counted).
Timings on a shared machine are noisy; run it twice.

``--long`` measures long inputs instead (bench/long_inputs.py): a tiny random Llama extracts one text of
n = 512, 2048, 8192 tokens in the normal mode (float probabilities kept) and the gold-bits mode, each in a
fresh subprocess with one torch thread: wall time, peak RSS, and that both give the same gold graph.

    .venv/bin/python bench/extract.py [--split validation] [--batch-size 32] [--limit N] [--device auto]
    .venv/bin/python bench/extract.py --engine ray --workers 1,2 --limit 256 --shard-size 32 [--json]
    .venv/bin/python bench/extract.py --long [--sizes 512,2048,8192] [--modes forward,normal,bits] [--json]
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--repeat", type=int, default=1,
                   help="--engine ray: the texts K times over (the fixed start-up cost amortised on a larger corpus)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--out", default=None, help="keep the store in this directory (default: a removed temp dir)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--engine", default="local", choices=["local", "ray"], help="ray: compare with the Ray engine")
    p.add_argument("--workers", default="1,2", help="--engine ray: comma-separated worker counts")
    p.add_argument("--json", action="store_true", help="--engine ray, --long: print the figures as one JSON object")
    p.add_argument("--long", action="store_true", help="long inputs: normal vs gold-bits mode (bench/long_inputs.py)")
    p.add_argument("--sizes", default="512,2048,8192", help="--long: comma-separated token counts")
    p.add_argument("--modes", default="forward,normal,bits",
                   help="--long: forward (the plain eager forward, the reference), normal and/or bits")
    p.add_argument("--layers", type=int, default=4, help="--long: layers of the tiny Llama")
    p.add_argument("--heads", type=int, default=8, help="--long: query heads of the tiny Llama")
    p.add_argument("--kv-heads", type=int, default=2, help="--long: key/value heads of the tiny Llama")
    p.add_argument("--hidden", type=int, default=64, help="--long: hidden size of the tiny Llama")
    p.add_argument("--max-gb", type=float, default=12.0, help="--long: address-space cap of each child (GiB)")
    p.add_argument("--child-timeout", type=float, default=900.0, help="--long: seconds per child")
    args = p.parse_args(argv)
    if args.long:
        return bench_long(args)
    if args.engine == "ray":
        return bench_ray(args)

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


def bench_long(args: argparse.Namespace) -> int:
    import long_inputs

    sizes = [int(n) for n in args.sizes.split(",")]
    modes = args.modes.split(",")
    if any(n < 8 for n in sizes) or not set(modes) <= {"forward", "normal", "bits"}:
        raise SystemExit("error: --sizes are token counts >= 8 and --modes is forward, normal and/or bits")
    result = long_inputs.run(sizes, modes, args.layers, args.heads, args.hidden, args.max_gb, args.child_timeout,
                             args.kv_heads)
    if args.json:
        print(json.dumps(result))
    else:
        long_inputs.print_table(result)
    return 0


def bench_ray(args: argparse.Namespace) -> int:
    from sparsefinder.distributed.cluster import connect
    from sparsefinder.distributed.ray_extract import extract_corpus_ray

    workers = [int(w) for w in args.workers.split(",")]
    corpus = default_corpus(None if args.split == "all" else args.split)
    texts = corpus.texts()[: args.limit] if args.limit else corpus.texts()
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    texts = texts * args.repeat
    ray, _ = connect(None, num_cpus=os.cpu_count())  # workers import the driver's sparsefinder
    tmp = Path(tempfile.mkdtemp(prefix="sparsefinder-bench-"))
    rows = []
    try:
        # One torch thread, as one Ray worker of under one CPU runs with: the same bytes, a fair comparison.
        torch.set_num_threads(1)
        t = time.perf_counter()
        model = load_default_model(args.device)
        t_load = time.perf_counter()
        extract_corpus(model, texts, tmp / "single", batch_size=args.batch_size, dtype=args.dtype,
                       shard_size=args.shard_size, progress=not args.no_progress)
        single = time.perf_counter() - t
        local_extract_s = time.perf_counter() - t_load
        store = ExtractionStore.open(tmp / "single")
        tokens, name = store.num_tokens, model.name
        size = sum(f.stat().st_size for f in (tmp / "single").iterdir())
        local_hashes = [e["sha256"] for e in store.manifest["shards"]]
        del store
        shutil.rmtree(tmp / "single")  # only its hashes are compared: a repeated corpus fills the disk otherwise
        rows.append({"engine": "local", "workers": 1, "seconds": single,
                     "startup_seconds": round(single - local_extract_s, 2),
                     "steady_sentences_per_s": round(len(texts) / local_extract_s, 2)})
        for w in workers:
            t = time.perf_counter()
            out = extract_corpus_ray(name, texts, tmp / f"ray{w}", device=args.device, batch_size=args.batch_size,
                                     dtype=args.dtype, shard_size=args.shard_size, workers=w,
                                     progress=not args.no_progress)
            wall = time.perf_counter() - t
            engine = json.loads((out / "manifest.json").read_text())["settings"]["engine"]
            # Steady state: the workers' own time on their shards (model loaded, actors up), shared by w workers.
            busy = engine["worker_seconds"] / w
            steady = len(texts) / busy if busy > 0 else None
            same = [e["sha256"] for e in json.loads((out / "manifest.json").read_text())["shards"]] == local_hashes
            shutil.rmtree(out)
            rows.append({"engine": "ray", "workers": w, "seconds": wall, "identical_to_local": same,
                         "steady_sentences_per_s": None if steady is None else round(steady, 2),
                         "startup_seconds": round(wall - busy, 2)})
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        r["sentences_per_s"] = round(len(texts) / r["seconds"], 2)
        r["tokens_per_s"] = round(tokens / r["seconds"], 1)
        r["seconds"] = round(r["seconds"], 2)
    one = next((r for r in rows if r["engine"] == "ray" and r["workers"] == 1), None)
    local_rate = rows[0]["steady_sentences_per_s"]
    steady_overhead = None
    if one is not None and one["steady_sentences_per_s"]:
        steady_overhead = round(local_rate / one["steady_sentences_per_s"] - 1, 3)
    result = {
        "model": name, "sentences": len(texts), "repeat": args.repeat, "tokens": tokens, "shard_size": args.shard_size,
        "batch_size": args.batch_size, "device": args.device, "cpus": os.cpu_count(), "torch_threads_per_worker": 1,
        "bytes_on_disk": size, "bytes_per_sentence": round(size / len(texts)),
        "local_seconds_per_sentence": round(1 / local_rate, 4),
        "ray_overhead_1_worker": None if one is None else round(one["seconds"] / rows[0]["seconds"] - 1, 3),
        "ray_steady_overhead_1_worker": steady_overhead,
        "runs": rows,
        "note": "seconds: end to end, model loading included; steady: the workers' time writing shards, "
                "divided among them (local: extraction without loading the model); the rest of Ray's wall time is "
                "startup_seconds; shared machine, noisy",
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model {name}; {len(texts)} sentences, {tokens} tokens; shard size {args.shard_size}, batch "
          f"{args.batch_size}; {os.cpu_count()} CPUs; 1 torch thread per worker")
    print(f"{'engine':8s} {'workers':>7s} {'seconds':>8s} {'sent/s':>8s} {'tokens/s':>9s} {'startup s':>9s} "
          f"{'steady sent/s':>13s}  identical")
    for r in rows:
        print(f"{r['engine']:8s} {r['workers']:7d} {r['seconds']:8.2f} {r['sentences_per_s']:8.2f} "
              f"{r['tokens_per_s']:9.1f} {r.get('startup_seconds', '-'):>9} {r.get('steady_sentences_per_s', '-'):>13}"
              f"  {r.get('identical_to_local', '-')}")
    if one is not None:
        print(f"ray overhead at 1 worker: {100 * result['ray_overhead_1_worker']:+.1f}% end to end, "
              + (f"{100 * steady_overhead:+.1f}% in the steady state" if steady_overhead is not None else "")
              + " (goal <= 15%)")
    print(f"store: {size:,} bytes, {result['bytes_per_sentence']:,} B/sentence; local "
          f"{result['local_seconds_per_sentence']} s/sentence (noisy: the machine is shared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
