"""``sparsefinder`` command line: list models, analyse text, extract corpora, distil the default model."""

from __future__ import annotations

import argparse
import os
import sys

from sparsefinder import cli_figures as figures
from sparsefinder.cli_commands import (  # the parser looks them up here, so a test can patch them
    cmd_compare_models,
    cmd_curves,
    cmd_distill,
    cmd_extract,
    cmd_gold,
    cmd_interpret,
    cmd_models,
    cmd_predict,
    cmd_results,
    cmd_serve,
    cmd_sweep,
    cmd_train,
    cmd_windows,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _alpha(value: str) -> float:
    from sparsefinder.kernels.entmax import check_alpha

    try:
        a = float(value)
        check_alpha(a)
    except ValueError as e:
        msg = str(e) if "finite" in str(e) else f"alpha must be a number, got {value!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return a


def _device(value: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a CUDA device only where there is one."""
    import torch

    if value == "auto":
        return value
    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {value!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {value}: no CUDA device is available here (use auto or cpu)")
    return value


def _store_dtype(value: str) -> str:
    """Stored q/k dtype of ``extract``: float32 (exact) or float16 (half the disk)."""
    from sparsefinder.corpora.extract import _store_dtype as check

    try:
        return check(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be float32 or float16, got {value!r}") from None


def _compute_dtype(value: str) -> str:
    """The dtype a model computes in (entmax itself stays float32)."""
    from sparsefinder.model.entmax_model import COMPUTE_DTYPES, resolve_compute_dtype

    try:
        dtype = resolve_compute_dtype(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(COMPUTE_DTYPES)}, got {value!r}") from None
    return next(name for name, d in COMPUTE_DTYPES.items() if d == dtype)


_ARTIFACT_HELP = {
    "store": "extraction of the corpus (sparsefinder extract)",
    "projections": "projections directory (sparsefinder train)",
    "fitted": "fitted predictors directory (sparsefinder sweep --save-fitted)",
}


def artifact_args(sp: argparse.ArgumentParser, *flags: str, required: tuple[str, ...] = (), **helps: str) -> None:
    """The artifact folders a subcommand reads (``--store``, ``--projections``, ``--fitted``), named alike
    everywhere; ``helps`` says what a folder is for in this subcommand."""
    for flag in flags:
        key = flag.lstrip("-")
        sp.add_argument(flag, required=flag in required, default=None, help=helps.get(key, _ARTIFACT_HELP[key]))


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return n


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = -1.0
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value!r}")
    return x


def engine_args(sp: argparse.ArgumentParser) -> None:
    """``--engine local|ray`` and the Ray cluster's flags (sparsefinder.distributed; docs/cluster.md)."""
    sp.add_argument("--engine", default="local", choices=["local", "ray"],
                    help="local (default): this process; ray: Ray workers (pip install 'sparsefinder[ray]')")
    sp.add_argument("--address", default=None,
                    help="--engine ray: 'auto' (this machine's cluster), ray://HOST:10001, default a local Ray")
    sp.add_argument("--workers", type=_positive, default=1, help="--engine ray: parallel workers")
    sp.add_argument("--cpus-per-worker", type=_fraction, default=None,
                    help="--engine ray: CPUs each worker holds (default: a share that leaves Ray Data room)")
    sp.add_argument("--gpus-per-worker", type=_fraction, default=None,
                    help="--engine ray: GPUs each worker holds (default 1 where the cluster has GPUs, else 0)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsefinder", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--model", default=None, help="registered model name or a local model directory")
        sp.add_argument("--alpha", type=_alpha, default=None, help="entmax alpha (default: the model's)")
        sp.add_argument("--device", type=_device, default="auto", help="auto (cuda if available), cpu or cuda")

    sp = sub.add_parser("models", help="list the registered models; add or remove your own")
    sp.set_defaults(func=cmd_models, action="list")
    msub = sp.add_subparsers(dest="action")
    add = msub.add_parser("add", help="add a local model directory to your catalogue (checked first)")
    add.add_argument("name")
    add.add_argument("path", help="a transformers model directory (config.json, weights, tokenizer)")
    add.add_argument("--alpha", type=_alpha, default=None, help="entmax alpha (default: the model's own, else 1.5)")
    add.add_argument("--adapter", default=None, help="an adapter directory (sparsefinder distill)")
    add.add_argument("--description", default="")
    add.add_argument("--task", default="base", help="base or masked-lm")
    rm = msub.add_parser("remove", help="remove a model from your catalogue")
    rm.add_argument("name")

    sp = sub.add_parser("gold", help="gold sparsity of every layer and head for a text")
    sp.add_argument("text", nargs="?", help="text to analyse (default: standard input)")
    sp.add_argument("--lines", action="store_true", help="treat each line as a separate text")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--layer", type=int, default=None, help="with --figure: draw this layer's head (default 0)")
    sp.add_argument("--head", type=int, default=None, help="with --figure: draw this head of the first text")
    figures.add_figure_args(sp, "the layers × heads gold sparsity, or one head with --layer/--head,")
    model_args(sp)
    sp.set_defaults(func=cmd_gold)

    sp = sub.add_parser("serve", help="serve the dashboard (from a source checkout), offline")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sp.add_argument("--port", type=int, default=8501)
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("predict", help="a predictor on a text: recall, mass recall, output error … per layer")
    sp.add_argument("text", nargs="?", help="text to analyse (default: standard input)")
    sp.add_argument("--method", required=True, help="a registered predictor (sparsefinder results lists them)")
    sp.add_argument("--params", default=None, help='its parameters as JSON, e.g. \'{"window": 2}\' (default: its own)')
    sp.add_argument("--result", default="shipped",
                    help="the model's result whose projections and fitted state the method uses")
    sp.add_argument("--lines", action="store_true", help="treat each line as a separate text")
    sp.add_argument("--json", action="store_true")
    model_args(sp)
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser("compare-models", help="two models or two alphas: per-head gold sparsity and the "
                                               "Jaccard overlap of their gold graphs")
    sp.add_argument("text", nargs="?", help="text, one item per line (default: standard input)")
    sp.add_argument("--a", default=None, help="model A: registered name or model directory (default: the default)")
    sp.add_argument("--b", default=None, help="model B (default: model A, at --alpha-b)")
    sp.add_argument("--alpha-a", type=_alpha, default=None, help="alpha of A (default: its own)")
    sp.add_argument("--alpha-b", type=_alpha, default=None, help="alpha of B (default: its own)")
    sp.add_argument("--store-a", default=None, help="corpus level: a store of model A (sparsefinder extract)")
    sp.add_argument("--store-b", default=None, help="corpus level: a store of the same corpus by model B")
    sp.add_argument("--device", type=_device, default="auto")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_compare_models)

    sp = sub.add_parser("extract", help="extract queries, keys and gold graphs of a corpus to disk")
    sp.add_argument("--corpus", default="default", help="'default' (Lee news) or a .txt/.csv/.tsv/.conllu file")
    sp.add_argument("--split", default="validation", choices=["train", "validation", "all"])
    sp.add_argument("--seed", type=int, default=0, help="seed of the default corpus's split")
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--limit", type=int, default=None, help="only the first N sentences")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing extraction in --out")
    sp.add_argument("--shard-size", type=_positive, default=None, help="sentences per shard (default 1024)")
    sp.add_argument("--resume", action="store_true", help="--engine ray: continue an interrupted extraction in --out")
    sp.add_argument("--dtype", type=_store_dtype, default="float32",
                    help="stored queries/keys: float32 (exact, default) or float16 (half the disk)")
    sp.add_argument("--compute-dtype", type=_compute_dtype, default=None,
                    help="dtype the model runs in: float32, bfloat16 or float16 (e.g. bfloat16 on a GPU; default "
                         "the checkpoint's); entmax and the gold graph stay float32; local engine only")
    engine_args(sp)
    model_args(sp)
    sp.set_defaults(func=cmd_extract)

    sp = sub.add_parser("results", help="the model's results (shipped and saved) and the methods each can draw")
    sp.add_argument("--runs", default=None, help="saved results' folder (default: $SPARSEFINDER_RUNS or runs/ui)")
    sp.set_defaults(func=cmd_results)
    model_args(sp)

    sp = sub.add_parser("train", help="learn the per-head projections on an extracted corpus")
    sp.add_argument("--store", required=True, help="extraction of the training split (sparsefinder extract)")
    sp.add_argument("--val-store", default=None, help="extraction of the validation split (default: hold out 10%%)")
    sp.add_argument("--out", required=True, help="output directory (projections.safetensors + manifest.json)")
    sp.add_argument("--rank", type=int, default=4)
    sp.add_argument("--loss", default="listwise", choices=["margin", "listwise", "stacked"],
                    help="listwise (default): cross-entropy of each query over its keys against the gold support; "
                         "margin: the paper's hinge with sampled negatives (--loss margin reproduces the paper); "
                         "stacked: fine-tune --init projections through the stacked predictor's loss")
    sp.add_argument("--init", default=None, help="--loss stacked: the projections to start from")
    sp.add_argument("--steps", type=int, default=300, help="--loss stacked: Adam steps per layer")
    sp.add_argument("--separate", action="store_true", help="separate W_Q and W_K instead of one shared map")
    sp.add_argument("--epochs", type=int, default=3)
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--lr", type=float, default=1e-3)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", type=_device, default="cpu")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("sweep", help="every predictor over its grid on an extracted corpus, per layer and head")
    artifact_args(sp, "--store", "--projections", "--fitted", required=("--store",),
                  store="extraction to evaluate on (e.g. the validation split)",
                  fitted="load fitted predictors from this directory instead of fitting")
    sp.add_argument("--fit-store", default=None, help="extraction to fit k-means/blocks/routing on (training split)")
    sp.add_argument("--save-fitted", default=None, help="save the fitted predictors to this directory")
    sp.add_argument("--max-points", type=int, default=20_000, help="points per head for fitting centroids")
    sp.add_argument("--methods", default=None,
                    help="comma-separated predictor or family names, e.g. 'sparsefinder,baseline,pattern' "
                         "(default: all runnable)")
    sp.add_argument("--out", required=True, help="output Parquet file (a JSON sidecar is written beside it)")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--threads", type=int, default=None, help="torch threads for the sweep")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--context", default="spacy", choices=["none", "spacy"],
                    help="context of the syntax and lexical masks: 'spacy' parses the texts with spaCy and takes "
                         "the input embeddings of the store's model; 'none' skips both masks")
    figures.add_figure_args(sp, "the overall Pareto figure")
    engine_args(sp)
    sp.set_defaults(func=cmd_sweep)

    sp = sub.add_parser("interpret", help="POS tags per k-means cluster, gold-edge distances and POS pairs per head")
    artifact_args(sp, "--store", "--projections", "--fitted", required=("--store", "--projections", "--fitted"),
                  fitted="fitted predictors with k-means centroids (sweep --save-fitted)")
    sp.add_argument("--out", required=True, help="output directory (Parquet tables + manifest.json)")
    sp.add_argument("--conllu", default=None, help="take POS tags from this CoNLL-U file (the store's corpus) "
                                                   "instead of spaCy")
    sp.add_argument("--clusters", default=None, help="comma-separated cluster counts (default: every fitted one)")
    sp.add_argument("--top-k", type=int, default=5, help="most frequent tokens kept per cluster")
    sp.add_argument("--max-distance", type=int, default=16, help="clip of the relative-distance histogram")
    sp.add_argument("--summary-clusters", type=int, default=8, help="cluster count of the printed summary")
    figures.add_figure_args(sp, "the layers × heads POS information of the query clusters")
    sp.set_defaults(func=cmd_interpret)

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

    sp = sub.add_parser("curves", help="sparsity against end-task accuracy with entmax restricted to predicted graphs")
    sp.add_argument("--corpus", default="default", help="'default' (Lee news) or a .txt/.csv/.tsv/.conllu file")
    sp.add_argument("--split", default="validation", choices=["train", "validation", "all"])
    sp.add_argument("--seed", type=int, default=0, help="seed of the corpus split, the MLM masking and random masks")
    sp.add_argument("--limit", type=int, default=None, help="only the first N sentences")
    sp.add_argument("--task", default=None, choices=["base", "masked-lm"], help="model head (default: the model's)")
    sp.add_argument("--methods", default=None,
                    help="comma-separated predictors (default: distance,kmeans,bucketing,position,random,syntax "
                         "and the learned stacked,cascade,distance_budget,global_band, those the artifacts can run)")
    sp.add_argument("--points", type=int, default=None, help="at most N evenly spaced grid points per method")
    sp.add_argument("--sparsities", default=None,
                    help="comma-separated target sparsities of the learned predictors (stacked, cascade, "
                         "distance_budget, global_band, ...; any value in [0, 1], run from their fitted state), "
                         "replacing their grid and --points; the other methods keep theirs")
    sp.add_argument("--layers", default="all,later",
                    help="layer subsets, each run separately: all, later, earlier, or e.g. '3-5' "
                         "(separate subsets with ';' when one contains a comma)")
    sp.add_argument("--result", default="shipped",
                    help="the model's result whose artifacts are used: 'shipped' or a saved result's name")
    sp.add_argument("--projections", default=None, help="projections directory (default: the result's)")
    sp.add_argument("--fitted", default=None, help="fitted predictors directory (default: the result's)")
    sp.add_argument("--windows", default=None,
                    help="comma-separated directories of learned windows (sparsefinder windows --out) to add")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--threads", type=int, default=None, help="torch threads")
    sp.add_argument("--metric", default=None, help="metric of the plot (default: cos_mean, or mlm_accuracy)")
    sp.add_argument("--out", required=True, help="output Parquet file (a JSON sidecar is written beside it)")
    sp.add_argument("--plot", default=None, help="output HTML plot (default: --out with .html)")
    sp.add_argument("--png", default=None, help="also save the plot as this PNG (as --figure FILE.png)")
    figures.add_figure_args(sp, "the plot")
    engine_args(sp)
    sp.set_defaults(func=cmd_curves)
    model_args(sp)

    sp = sub.add_parser("windows", help="learn a window size per head under a sparsity penalty (Breaking BERT)")
    sp.add_argument("--corpus", default="default", help="'default' (Lee news) or a .txt/.csv/.tsv/.conllu file")
    sp.add_argument("--split", default="train", choices=["train", "validation", "all"])
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--limit", type=int, default=None, help="only the first N sentences")
    sp.add_argument("--task", default=None, choices=["base", "masked-lm"], help="model head (default: the model's)")
    sp.add_argument("--lambdas", default="0.01,0.03,0.1,0.3", help="comma-separated sparsity weights")
    sp.add_argument("--layers", default="all,later", help="layer subsets, each learned separately (as for curves)")
    sp.add_argument("--tau", type=float, default=1.0, help="temperature of the soft window")
    sp.add_argument("--init-radius", type=float, default=12.0)
    sp.add_argument("--global-tokens", action="store_true",
                    help="the first and last token attend and are attended to by everything (outside the window)")
    sp.add_argument("--lr", type=float, default=1.0, help="Adam's rate, decaying linearly to 0")
    sp.add_argument("--epochs", type=int, default=3)
    sp.add_argument("--batch-size", type=int, default=16)
    sp.add_argument("--threads", type=int, default=None, help="torch threads")
    sp.add_argument("--out", required=True, help="output directory (windows.safetensors + manifest.json)")
    sp.set_defaults(func=cmd_windows)
    model_args(sp)
    figures.add_table_parsers(sub, model_args)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own tqdm bars report progress; transformers' per-load weight bar is noise here.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if getattr(args, "model", "unset") is None:
        from sparsefinder.model.catalogue import default_model_name

        args.model = default_model_name()
    try:
        figures.check_figure_args(args)
        return int(args.func(args) or 0)
    except (FileNotFoundError, KeyError, ValueError) as e:  # what was asked for is wrong: a usage error
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:  # the work itself failed
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
