"""The CLI's figures: ``--figure FILE`` / ``--style`` on every subcommand that draws, and the two
subcommands that only read shipped or saved tables and draw them (``pareto``, ``clusters``).

Kept out of :mod:`sparsefinder.cli` so that module stays the parser and the corpus/model commands;
every figure is written by :func:`sparsefinder.plots.export.save_figure`, as the dashboard's downloads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_figure_args(sp: argparse.ArgumentParser, what: str) -> None:
    """``--figure FILE`` (format from the suffix) and ``--style`` for a subcommand that draws ``what``."""
    from sparsefinder.plots.export import FORMATS, STYLES

    sp.add_argument("--figure", default=None, metavar="FILE",
                    help=f"save {what} to FILE; the suffix sets the format ({', '.join(FORMATS)})")
    sp.add_argument("--style", default="default", choices=STYLES,
                    help="figure style: default (as the dashboard) or paper (print fonts, Okabe-Ito colours)")


def check_figure_args(args: argparse.Namespace) -> None:
    """Reject a ``--figure`` suffix that is no format (or a ``--png`` that is no .png) before any work
    (ValueError: the CLI's exit 2)."""
    from sparsefinder.plots.export import figure_format

    if getattr(args, "figure", None):
        figure_format(args.figure)
    png = getattr(args, "png", None)
    if png and figure_format(png) != "png":
        raise ValueError(f"--png {png}: the file must end in .png")


def write_figure(args: argparse.Namespace, fig, path: str | None = None) -> None:
    """Save ``fig`` to ``path`` (default ``--figure``) in ``--style``, and say where and how long it took."""
    path = path or getattr(args, "figure", None)
    if not path:
        return
    from sparsefinder.plots.export import save_figure

    start = time.perf_counter()
    out = save_figure(fig, path, style=getattr(args, "style", "default"))
    print(f"wrote {out} ({out.stat().st_size:,} bytes, {time.perf_counter() - start:.1f} s)")


def gold_figure(args: argparse.Namespace, ex, grid: list[list[float]]):
    """``gold``'s figure: the layers × heads gold sparsity, or with ``--layer``/``--head`` one head of the
    first text (its entmax probabilities, exact zeros in grey)."""
    from sparsefinder.evaluation.analysis import head_probabilities
    from sparsefinder.plots.heatmaps import attention_heatmap, sparsity_heatmap

    if args.layer is None and args.head is None:
        return sparsity_heatmap(grid, title="Gold sparsity per layer and head")
    layer, head = args.layer or 0, args.head or 0
    if not (0 <= layer < ex.num_layers and 0 <= head < ex.num_heads):
        raise ValueError(f"layer {layer}, head {head}: the model has {ex.num_layers} layers × {ex.num_heads} heads")
    probs = head_probabilities(ex, 0, layer, head)
    title = f"Layer {layer}, head {head}: entmax probabilities (gold sparsity {grid[layer][head]:.3f})"
    return attention_heatmap(probs, list(ex.tokens[0]), title=title)


def _model_result(args):
    from sparsefinder import results as rs
    from sparsefinder.model.catalogue import load_registry

    if args.model not in load_registry():
        raise ValueError(f"unknown model {args.model!r}: give a registered model (sparsefinder models) "
                         "or the table itself")
    return rs.resolve_result(args.model, args.result)


def cmd_pareto(args: argparse.Namespace) -> int:
    """Each method's Pareto front of recall against sparsity from a sweep table (default: the model's)."""
    from sparsefinder import results as rs
    from sparsefinder.evaluation.pareto import pareto_front
    from sparsefinder.evaluation.sweep import load_sweep
    from sparsefinder.plots.heatmaps import pareto_figure

    if args.sweep:
        frame = load_sweep(args.sweep)
    else:
        result = _model_result(args)
        frame = rs.load_result_sweep(result)
        if frame is None:
            raise ValueError(f"{result.label} has no sweep table: run sparsefinder sweep, or give --sweep FILE")
    if args.methods:
        from sparsefinder.predictors.base import expand_methods

        frame = frame[frame["method"].isin(expand_methods(args.methods))]
    by, where = ("method",), "all layers and heads"
    if args.layer is not None:
        frame, by, where = frame[frame["layer"] == args.layer], ("method", "layer"), f"layer {args.layer}"
    if args.head is not None:
        if args.layer is None:
            raise ValueError("--head needs --layer")
        frame, by = frame[frame["head"] == args.head], ("method", "layer", "head")
        where += f", head {args.head}"
    if frame.empty:
        raise ValueError(f"no sweep rows for {where}" + (f" and methods {args.methods}" if args.methods else ""))
    front = pareto_front(frame, by=by)
    winners = front[front["on_front"]].sort_values(["method", "sparsity"])
    print(f"Pareto fronts ({where}), {len(winners)} of {len(front)} configurations:")
    print(winners[["method", "params", "sparsity", "recall"]].round(3).to_string(index=False))
    write_figure(args, pareto_figure(front, title=f"Recall against sparsity ({where})"))
    return 0


def cmd_clusters(args: argparse.Namespace) -> int:
    """One head's k-means clusters × parts of speech from interpretation tables (default: the model's)."""
    from sparsefinder.evaluation import interpret as itp
    from sparsefinder.plots.clusters import cluster_pos_heatmap

    if args.tables:
        path = Path(args.tables)
    else:
        result = _model_result(args)
        if not result.is_default:
            path = Path(result.store).parent / "interpret"
        else:
            from sparsefinder.model.catalogue import get_spec

            path = get_spec(args.model).artifact("interpret")
        if path is None or not (path / itp.MANIFEST_FILE).is_file():
            raise ValueError(f"{result.label} has no interpretation tables: run sparsefinder interpret, "
                             "or give --tables DIR")
    tables = itp.InterpretTables.load(path)
    default = 8 if 8 in tables.n_clusters else tables.n_clusters[0]  # as interpret's printed summary
    n_clusters = args.clusters if args.clusters is not None else default
    m = itp.cluster_pos_matrix(tables, args.layer, args.head, n_clusters, args.side, normalise=args.proportions)
    values = "proportions" if args.proportions else "counts"
    print(f"{args.side} clusters × POS ({values}), layer {args.layer} head {args.head}, {n_clusters} clusters:")
    print(m.round(3).to_string())
    title = f"{args.side.capitalize()} clusters × POS ({values}), layer {args.layer} head {args.head}"
    write_figure(args, cluster_pos_heatmap(m, title, proportions=args.proportions))
    return 0


def add_table_parsers(sub, model_args) -> None:
    """The ``pareto`` and ``clusters`` subcommands (read tables, print them, draw them)."""
    sp = sub.add_parser("pareto", help="each method's Pareto front of recall against sparsity from a sweep table")
    sp.add_argument("--sweep", default=None, help="sweep Parquet file (default: the model's result's sweep)")
    sp.add_argument("--result", default="shipped", help="the model's result: 'shipped' or a saved result's name")
    sp.add_argument("--methods", default=None, help="comma-separated predictor or family names (default: all)")
    sp.add_argument("--layer", type=int, default=None, help="only this layer (default: means over all)")
    sp.add_argument("--head", type=int, default=None, help="only this head of --layer")
    add_figure_args(sp, "the Pareto figure")
    sp.set_defaults(func=cmd_pareto)
    model_args(sp)

    sp = sub.add_parser("clusters", help="one head's k-means clusters × parts of speech (sparsefinder interpret)")
    sp.add_argument("--tables", default=None, help="interpretation tables directory (default: the model's)")
    sp.add_argument("--result", default="shipped", help="the model's result: 'shipped' or a saved result's name")
    sp.add_argument("--layer", type=int, default=0)
    sp.add_argument("--head", type=int, default=0)
    sp.add_argument("--clusters", type=int, default=None, help="cluster count (default: 8 if the tables have it)")
    sp.add_argument("--side", default="query", choices=["query", "key"])
    sp.add_argument("--proportions", action="store_true", help="row proportions instead of token counts")
    add_figure_args(sp, "the clusters × POS heatmap")
    sp.set_defaults(func=cmd_clusters)
    model_args(sp)
