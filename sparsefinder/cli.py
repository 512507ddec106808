"""``sparsefinder`` command line: list models, analyse text, extract corpora, distil the default model."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _alpha(value: str) -> float:
    a = float(value)
    if a < 1:
        raise argparse.ArgumentTypeError("alpha must be >= 1")
    return a


def _load_corpus(args):
    from sparsefinder import corpus

    if args.corpus == "default":
        return corpus.default_corpus(split=None if args.split == "all" else args.split, seed=args.seed)
    path = Path(args.corpus)
    return corpus.read_corpus(path.read_bytes(), path.name)


def cmd_models(args) -> int:
    from sparsefinder.registry import default_model_name, load_registry

    default = default_model_name()
    for name, spec in load_registry().items():
        mark = "*" if name == default else " "
        print(f"{mark} {name:28s} alpha={spec.alpha}  {spec.description}")
    return 0


def cmd_gold(args) -> int:
    from sparsefinder.model import load_model

    text = args.text if args.text is not None else sys.stdin.read()
    texts = [t for t in (text.splitlines() if args.lines else [text]) if t.strip()]
    if not texts:
        print("error: no text given", file=sys.stderr)
        return 2
    model = load_model(args.model, alpha=args.alpha, device=args.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = model.extract(texts)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    grid = [[float(v) for v in ex.gold(layer).sparsity().mean(0)] for layer in range(ex.num_layers)]
    if args.json:
        print(json.dumps({"model": model.name, "tokens": ex.tokens, "gold_sparsity": grid}))
        return 0
    print(f"model {model.name}  alpha {model.alpha}  causal {model.causal}  tokens {ex.lengths.tolist()}")
    print("gold sparsity (mean over the given texts), rows = layers, columns = heads")
    print("layer " + " ".join(f"h{h:<4d}" for h in range(ex.num_heads)))
    for layer, row in enumerate(grid):
        print(f"{layer:5d} " + " ".join(f"{v:.3f}" for v in row))
    return 0


def cmd_extract(args) -> int:
    from sparsefinder.extract import extract_corpus
    from sparsefinder.model import load_model

    corpus = _load_corpus(args)
    texts = corpus.texts()[: args.limit] if args.limit else corpus.texts()
    model = load_model(args.model, alpha=args.alpha, device=args.device)
    out = extract_corpus(
        model, texts, Path(args.out), batch_size=args.batch_size, progress=True,
        corpus_name=corpus.name, split=args.split, overwrite=args.overwrite,
    )
    print(f"wrote {len(texts)} sentences of {corpus.name} to {out}")
    return 0


def cmd_train(args) -> int:
    import numpy as np

    from sparsefinder.projections import projection_manifest, train_projections
    from sparsefinder.store import ExtractionStore

    store = ExtractionStore.open(args.store)
    train_idx, val = None, None
    if args.val_store:
        val = ExtractionStore.open(args.val_store)
    else:  # hold out a seeded tenth of the training store
        perm = np.random.default_rng(args.seed).permutation(len(store))
        cut = max(1, len(store) // 10)
        val, train_idx = sorted(perm[:cut].tolist()), sorted(perm[cut:].tolist())
    proj, history = train_projections(
        store, train_indices=train_idx, val_indices=val, rank=args.rank, shared=not args.separate,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
    )
    proj.save(Path(args.out), projection_manifest(store, history["config"], history))
    print(f"saved projections (r={args.rank}) to {args.out}")
    return 0


def cmd_sweep(args) -> int:
    from sparsefinder.fitted_io import load_fitted, save_fitted
    from sparsefinder.projections import Projections
    from sparsefinder.store import ExtractionStore
    from sparsefinder.sweep import best_recall_table, fit_predictors, pareto_front, run_sweep, save_sweep

    store = ExtractionStore.open(args.store)
    projections = Projections.load(args.projections, store=store) if args.projections else None
    methods = args.methods.split(",") if args.methods else None
    fitted = None
    if args.fitted:
        fitted = load_fitted(args.fitted)
    elif args.fit_store:
        print(f"fitting the learned predictors on {args.fit_store}")
        fitted = fit_predictors(ExtractionStore.open(args.fit_store), projections, methods=methods,
                                seed=args.seed, max_points=args.max_points, progress=True)
        if args.save_fitted:
            save_fitted(fitted, args.save_fitted)
            print(f"saved fitted predictors to {args.save_fitted}")
    context = None
    # Syntax and lexical need context the store lacks (dependency trees, input embeddings); build it only
    # when one of them can run, since spaCy and the model take seconds to load.
    want = {"syntax", "lexical"} if methods is None else {"syntax", "lexical"} & set(methods)
    if args.context == "spacy" and want:
        from sparsefinder.annotate import sweep_context

        context, notes = sweep_context(store, syntax="syntax" in want, lexical="lexical" in want)
        for note in notes:
            print(f"note: {note}")
    frame = run_sweep(store, projections, methods=methods, fitted=fitted, batch_size=args.batch_size,
                      progress=True, seed=args.seed, threads=args.threads, context=context)
    path = save_sweep(frame, args.out)
    skipped = frame.attrs.get("sweep", {}).get("skipped")
    if skipped:
        print(f"skipped: {skipped}")
    print(f"wrote {len(frame)} rows to {path}")
    front = pareto_front(frame, by=())
    winners = front[front["on_front"]].sort_values("sparsity")
    print(f"overall Pareto front (mean over heads), {len(winners)} of {len(front)} configurations:")
    print(winners[["method", "params", "sparsity", "recall"]].round(3).to_string(index=False))
    print(best_recall_table(frame).round(3).to_string())
    return 0


def cmd_distill(args) -> int:
    from sparsefinder import corpus as corpus_mod
    from sparsefinder.distill import DistillConfig, distill
    from sparsefinder.registry import get_spec

    spec = get_spec(args.base)
    train = corpus_mod.default_corpus("train", seed=args.seed)
    val = corpus_mod.default_corpus("validation", seed=args.seed)
    train_texts = train.texts()[: args.limit] if args.limit else train.texts()
    config = DistillConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, sparsity_weight=args.sparsity_weight,
        alpha=args.alpha, seed=args.seed, rank=None if args.rank <= 0 else args.rank,
    )
    manifest = distill(
        spec.resolve_path(), train_texts, val.texts(), Path(args.out), config,
        provenance={
            "base_package": spec.path,
            "corpus": corpus_mod.DEFAULT_CORPUS_NAME,
            "train_split": train.name,
            "eval_split": val.name,
            "split_seed": args.seed,
        },
    )
    print(json.dumps(manifest["fidelity"], indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsefinder", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--model", default=None, help="registered model name or a local model directory")
        sp.add_argument("--alpha", type=_alpha, default=None, help="entmax alpha (default: the model's)")
        sp.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")

    sp = sub.add_parser("models", help="list the registered models")
    sp.set_defaults(func=cmd_models)

    sp = sub.add_parser("gold", help="gold sparsity of every layer and head for a text")
    sp.add_argument("text", nargs="?", help="text to analyse (default: standard input)")
    sp.add_argument("--lines", action="store_true", help="treat each line as a separate text")
    sp.add_argument("--json", action="store_true")
    model_args(sp)
    sp.set_defaults(func=cmd_gold)

    sp = sub.add_parser("extract", help="extract queries, keys and gold graphs of a corpus to disk")
    sp.add_argument("--corpus", default="default", help="'default' (Lee news) or a .txt/.csv/.tsv/.conllu file")
    sp.add_argument("--split", default="validation", choices=["train", "validation", "all"])
    sp.add_argument("--seed", type=int, default=0, help="seed of the default corpus's split")
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--limit", type=int, default=None, help="only the first N sentences")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing extraction in --out")
    model_args(sp)
    sp.set_defaults(func=cmd_extract)

    sp = sub.add_parser("train", help="learn the per-head projections on an extracted corpus")
    sp.add_argument("--store", required=True, help="extraction of the training split (sparsefinder extract)")
    sp.add_argument("--val-store", default=None, help="extraction of the validation split (default: hold out 10%%)")
    sp.add_argument("--out", required=True, help="output directory (projections.safetensors + manifest.json)")
    sp.add_argument("--rank", type=int, default=4)
    sp.add_argument("--separate", action="store_true", help="separate W_Q and W_K instead of one shared map")
    sp.add_argument("--epochs", type=int, default=3)
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--lr", type=float, default=1e-3)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("sweep", help="every predictor over its grid on an extracted corpus, per layer and head")
    sp.add_argument("--store", required=True, help="extraction to evaluate on (e.g. the validation split)")
    sp.add_argument("--projections", default=None, help="projections directory (sparsefinder train)")
    sp.add_argument("--fit-store", default=None, help="extraction to fit k-means/blocks/routing on (training split)")
    sp.add_argument("--fitted", default=None, help="load fitted predictors from this directory instead of fitting")
    sp.add_argument("--save-fitted", default=None, help="save the fitted predictors to this directory")
    sp.add_argument("--max-points", type=int, default=20_000, help="points per head for fitting centroids")
    sp.add_argument("--methods", default=None, help="comma-separated predictor names (default: all runnable)")
    sp.add_argument("--out", required=True, help="output Parquet file (a JSON sidecar is written beside it)")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--threads", type=int, default=None, help="torch threads for the sweep")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--context", default="spacy", choices=["none", "spacy"],
                    help="context of the syntax and lexical masks: 'spacy' parses the texts with spaCy and takes "
                         "the input embeddings of the store's model; 'none' skips both masks")
    sp.set_defaults(func=cmd_sweep)

    sp = sub.add_parser("distill", help="fine-tune the attention of an entmax copy of a softmax model")
    sp.add_argument("--base", default="minilm-entmax15-untuned", help="registered model whose weights to tune")
    sp.add_argument("--out", default="data/adapters/minilm-entmax15")
    sp.add_argument("--epochs", type=int, default=5)
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--lr", type=float, default=3e-4)
    sp.add_argument("--sparsity-weight", type=float, default=0.05, help="weight of the Tsallis-entropy penalty")
    sp.add_argument("--alpha", type=_alpha, default=1.5)
    sp.add_argument("--rank", type=int, default=64, help="rank of the stored deltas (0 = full)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--limit", type=int, default=None, help="train on the first N training sentences")
    sp.set_defaults(func=cmd_distill)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own tqdm bars report progress; transformers' per-load weight bar is noise here.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if getattr(args, "model", "unset") is None:
        from sparsefinder.registry import default_model_name

        args.model = default_model_name()
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
