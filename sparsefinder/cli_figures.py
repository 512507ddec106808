"""The CLI's figures: ``--figure FILE`` / ``--style`` on every subcommand that draws, and the two
subcommands that only read shipped or saved tables and draw them (``pareto``, ``clusters``, ``report``).

Kept out of :mod:`sparsefinder.cli` so that module stays the parser and the corpus/model commands;
every figure is written by :func:`sparsefinder.plots.export.save_figure`, as the dashboard's downloads.
"""

from __future__ import annotations

import argparse
import sys
import time


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
    # With --json, stdout is the JSON document alone.
    print(f"wrote {out} ({out.stat().st_size:,} bytes, {time.perf_counter() - start:.1f} s)",
          file=sys.stderr if getattr(args, "json", False) else sys.stdout)


def gold_figure(args: argparse.Namespace, ex):
    """``gold``'s figure: the layers × heads gold sparsity of the first text, or with ``--layer``/``--head``
    one of its heads (entmax probabilities, exact zeros in grey)."""
    from sparsefinder.figures import head_figure, overview_figure

    if args.layer is None and args.head is None:
        return overview_figure(ex)
    return head_figure(ex, args.layer or 0, args.head or 0)


def cmd_pareto(args: argparse.Namespace) -> int:
    """Each method's Pareto front of recall against sparsity from a sweep table (default: the model's)."""
    from sparsefinder.evaluation.sweep import load_sweep
    from sparsefinder.figures import result_sweep, sweep_fronts
    from sparsefinder.plots.heatmaps import pareto_figure

    frame = load_sweep(args.sweep) if args.sweep else result_sweep(args.model, args.result)
    methods = args.methods.split(",") if args.methods else None
    if args.head is not None and args.layer is None:
        raise ValueError("--head needs --layer")
    front, where = sweep_fronts(frame, args.layer, args.head, methods)
    winners = front[front["on_front"]].sort_values(["method", "sparsity"])
    print(f"Pareto fronts ({where}), {len(winners)} of {len(front)} configurations:")
    print(winners[["method", "params", "sparsity", "recall", "mass_recall"]].round(3).to_string(index=False))
    write_figure(args, pareto_figure(front, title=f"Recall against sparsity ({where})"))
    return 0


def cmd_clusters(args: argparse.Namespace) -> int:
    """One head's k-means clusters × parts of speech from interpretation tables (default: the model's)."""
    from sparsefinder.evaluation import interpret as itp
    from sparsefinder.figures import cluster_pos_figure, default_clusters, result_interpretation

    tables = itp.InterpretTables.load(args.tables) if args.tables else result_interpretation(args.model, args.result)
    c = args.clusters if args.clusters is not None else default_clusters(tables)
    m = itp.cluster_pos_matrix(tables, args.layer, args.head, c, args.side, normalise=args.proportions)
    values = "proportions" if args.proportions else "counts"
    print(f"{args.side} clusters × POS ({values}), layer {args.layer} head {args.head}, {c} clusters:")
    print(m.round(3).to_string())
    write_figure(args, cluster_pos_figure(tables, args.layer, args.head, c, args.side, args.proportions))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """One standalone offline HTML study report of a store and/or a model's result (sparsefinder.report)."""
    from pathlib import Path

    from sparsefinder.report import study_report, write_report

    if not args.out.lower().endswith((".html", ".htm")):  # checked before minutes of reading
        raise ValueError(f"--out {args.out}: a study report is an HTML file; end the name in .html")
    if not (args.store or args.report_model or args.sweep or args.curves or args.interpret):
        raise ValueError("nothing to report: give --store DIR and/or --model NAME (or --sweep/--curves/--interpret)")
    start = time.perf_counter()
    document = study_report(model=args.report_model, result=args.result, store=args.store, sweep=args.sweep,
                            curves=args.curves, interpret=args.interpret,
                            runs=Path(args.runs) if args.runs else None)
    out = write_report(args.out, document)
    print(f"wrote {out} ({out.stat().st_size:,} bytes, {time.perf_counter() - start:.1f} s)")
    return 0


def add_report_parser(sub) -> None:
    """The ``report`` subcommand: its own ``--model`` (default: the store's model, not the default model)."""
    sp = sub.add_parser("report", help="one standalone offline HTML study report of a store and a model's result")
    sp.add_argument("--store", default=None, help="extraction store: provenance and gold sparsity of its corpus")
    sp.add_argument("--model", dest="report_model", default=None,
                    help="registered model whose results to report (default: the store's model, else the default)")
    sp.add_argument("--result", default=None,
                    help="the model's result: 'shipped' or a saved result's name (default: the store's, else shipped)")
    sp.add_argument("--runs", default=None, help="saved results' folder (default: $SPARSEFINDER_RUNS or runs/ui)")
    sp.add_argument("--sweep", default=None, help="sweep Parquet file instead of the result's")
    sp.add_argument("--curves", default=None, help="curves Parquet file (sparsefinder curves) instead of the result's")
    sp.add_argument("--interpret", default=None, help="interpretation tables directory instead of the result's")
    sp.add_argument("--out", required=True, help="output HTML file (written atomically)")
    sp.set_defaults(func=cmd_report)


def add_table_parsers(sub, model_args) -> None:
    """The ``pareto``, ``clusters`` and ``report`` subcommands (read tables, print them, draw them)."""
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
    add_report_parser(sub)
