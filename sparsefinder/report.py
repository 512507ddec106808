"""A study report: one standalone, offline HTML file for a model's result.

:func:`study_report` gathers what the dashboard shows of one result (:mod:`sparsefinder.results`) and an
optional extraction store, and returns one HTML document with, in order: the provenance of the model and
corpus, the gold sparsity per layer and head, each method's Pareto front, the heads ranked by
predictability, the clusters × parts-of-speech findings and the sparsity–accuracy curves. Under each
section is the command that reproduces it: the recorded arguments where a sidecar has them (``curves``),
else a command rebuilt from the sidecar's provenance. A section whose data is missing says so in one line.

plotly.js is inlined once, so the file opens with no network. The CLI's ``sparsefinder report`` and the
Pareto page's download button both call :func:`study_report`; :func:`write_report` writes it atomically.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sparsefinder import report_html as h
from sparsefinder import results as rs

#: Minimum sparsity of the head ranking (as the Clusters & POS page's default budget).
RANKING_SPARSITY = 0.9
#: Thresholds of the best-recall table (as the Pareto page's).
THRESHOLDS = (0.5, 0.7, 0.9)
#: Heads listed at each end of the ranking.
RANKED_HEADS = 10
SECTION_IDS = ("provenance", "gold-sparsity", "pareto", "head-ranking", "clusters-pos", "curves")


@dataclass
class ReportInputs:
    """What one report is made of; any part may be missing (None).

    ``model``: the model's name (a registered one, or a store's model directory); ``result``: its registered
    result, None for an unregistered model; ``store``: an extraction store; ``sweep`` / ``curves`` /
    ``interpret``: the tables (with their sidecars in ``attrs``) and where they came from.
    """

    model: str
    result: rs.Result | None = None
    store: Any = None
    sweep: pd.DataFrame | None = None
    sweep_paths: tuple[Path, ...] = ()
    curves: pd.DataFrame | None = None
    curves_path: Path | None = None
    interpret: Any = None
    interpret_path: Path | None = None


# -- gathering the inputs ------------------------------------------------------------------------
def _exists(path: str | Path | None, kind: str, is_dir: bool = False) -> Path | None:
    """``path`` as a Path, or FileNotFoundError (the CLI's one-line error) when it was given but is not there."""
    if path is None:
        return None
    p = Path(path)
    if not (p.is_dir() if is_dir else p.is_file()):
        raise FileNotFoundError(f"{kind} not found: {p}")
    return p


def _saved_result_of(model: str, store: Path, runs: Path | None) -> str | None:
    """The saved result whose store is ``store`` (so its sweep and curves go with it), else None."""
    for name in rs.result_choices(model, runs)[1:]:
        if rs.resolve_result(model, name, runs).store.resolve() == store.resolve():
            return name
    return None


def interpret_dir(model: str, result: rs.Result) -> Path | None:
    """Where ``result``'s interpretation tables are: the model's shipped ones, or beside a saved store."""
    from sparsefinder.evaluation.interpret import MANIFEST_FILE
    from sparsefinder.model.catalogue import get_spec

    path = get_spec(model).artifact("interpret") if result.is_default else Path(result.store).parent / "interpret"
    return path if path is not None and (path / MANIFEST_FILE).is_file() else None


def gather(model: str | None = None, result: str | None = None, store: str | Path | None = None,
           sweep: str | Path | None = None, curves: str | Path | None = None, interpret: str | Path | None = None,
           runs: Path | None = None) -> ReportInputs:
    """The inputs of a report: ``store`` and the explicit tables as given, the rest from the model's result.

    ``model`` defaults to the store's model, else the default model; ``result`` to the saved result the
    store belongs to, else the shipped one. Explicit paths that do not exist raise FileNotFoundError and an
    unknown model ValueError, before anything is read.
    """
    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.evaluation.approximate import load_curves
    from sparsefinder.evaluation.interpret import InterpretTables
    from sparsefinder.evaluation.sweep.table import load_sweep
    from sparsefinder.model.catalogue import default_model_name, load_registry

    store_dir = _exists(store, "store directory", is_dir=True)
    sweep_p, curves_p = _exists(sweep, "sweep table"), _exists(curves, "curves table")
    interpret_p = _exists(interpret, "interpretation tables directory", is_dir=True)
    opened = ExtractionStore.open(store_dir) if store_dir is not None else None
    registry = load_registry()
    name = model or (opened.manifest.get("model") if opened is not None else None) or default_model_name()
    found = None
    if name in registry:
        if result is None and store_dir is not None:
            result = _saved_result_of(name, store_dir, runs)
        found = rs.resolve_result(name, result or rs.SHIPPED, runs)
    elif model is not None and opened is None:
        raise ValueError(f"unknown model {name!r}: results belong to registered models (sparsefinder models)")
    out = ReportInputs(model=name, result=found, store=opened)
    if sweep_p is not None:
        out.sweep, out.sweep_paths = load_sweep(sweep_p), (sweep_p,)
    elif found is not None and rs.sweep_paths(found):
        out.sweep_paths = rs.sweep_paths(found)
        out.sweep = rs.load_sweeps(out.sweep_paths)
    out.curves_path = curves_p or (found.curves if found is not None else None)
    if out.curves_path is not None:
        out.curves = load_curves(out.curves_path)
    out.interpret_path = interpret_p or (interpret_dir(name, found) if found is not None else None)
    if out.interpret_path is not None:
        out.interpret = InterpretTables.load(out.interpret_path)
    return out


# -- numbers -------------------------------------------------------------------------------------
def store_gold_sparsity(store, batch_size: int = 64) -> np.ndarray:
    """``(layers, heads)``: per head the mean over the store's sentences of the gold sparsity 1 − |G|/|V|
    (a macro mean, as the sweep's ``gold_sparsity``); sentences without tokens are left out."""
    grid = np.zeros((store.num_layers, store.num_heads))
    for layer in range(store.num_layers):
        total, count = np.zeros(store.num_heads), 0
        for batch in store.iter_batches(layer, batch_size):
            real = (batch.gold.lengths > 0).cpu()
            s = batch.gold.sparsity().cpu()[real].numpy()
            total += s.sum(0)
            count += len(s)
        grid[layer] = total / count if count else np.nan
    return grid


def sweep_gold_sparsity(sweep: pd.DataFrame) -> np.ndarray:
    """``(layers, heads)`` gold sparsity of a sweep table's corpus (the same for every configuration)."""
    cells = sweep.groupby(["layer", "head"])["gold_sparsity"].mean().unstack("head").sort_index()
    return cells.sort_index(axis=1).to_numpy(dtype=np.float64)


def grid_frame(grid: np.ndarray) -> pd.DataFrame:
    """A layers × heads grid as a table: a ``layer`` column, then one column per head."""
    frame = pd.DataFrame(grid, columns=[f"h{i}" for i in range(grid.shape[1])])
    frame.insert(0, "layer", range(grid.shape[0]))
    return frame


# -- commands ------------------------------------------------------------------------------------
def _rel(path: str | Path | None) -> str | None:
    """``path`` relative to the working directory when under it (commands are run from the checkout)."""
    if path is None:
        return None
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _model_arg(inputs: ReportInputs) -> dict[str, Any]:
    return {"model": inputs.model}


def extract_command(manifest: dict, store_path: Path) -> str:
    """``sparsefinder extract`` rebuilt from a store's manifest (the default corpus as ``--corpus default``)."""
    corpus = str(manifest.get("corpus") or "")
    settings = manifest.get("settings") or {}
    args: dict[str, Any] = {
        "corpus": "default" if corpus.startswith("lee-news") else corpus or "CORPUS_FILE",
        "split": manifest.get("split") or "all", "model": manifest.get("model"), "out": _rel(store_path),
        "batch_size": settings.get("batch_size"), "shard_size": settings.get("shard_size"),
    }
    if isinstance(manifest.get("alpha"), int | float):
        args["alpha"] = manifest["alpha"]
    return h.command_line("extract", args)


def sweep_commands(inputs: ReportInputs) -> list[tuple[str, str]]:
    """``sparsefinder sweep`` per sweep table, rebuilt from its sidecar (sweeps record no argument list)."""
    out = []
    r = inputs.result
    for i, path in enumerate(inputs.sweep_paths):
        from sparsefinder.evaluation.sweep.table import load_sweep

        info = (inputs.sweep.attrs.get("sweep", {}) if i == 0 else load_sweep(path).attrs.get("sweep", {}))
        fitted = info.get("fitted") or {}
        projections = None
        if info.get("projections") and r is not None:
            projections = r.projections if i == 0 else r.learned_projections
        args = {"store": (info.get("store") or {}).get("path") or "STORE", "projections": _rel(projections),
                "fit_store": (fitted.get("store") or {}).get("path"), "max_points": fitted.get("max_points"),
                "methods": ",".join(info.get("methods") or []) or None, "seed": info.get("seed"),
                "batch_size": info.get("batch_size"), "threads": info.get("torch_threads"), "out": _rel(path)}
        out.append((f"the sweep table {Path(path).name} (rebuilt from its sidecar)", h.command_line("sweep", args)))
    return out


def _result_args(inputs: ReportInputs) -> dict[str, Any]:
    """``--model`` and ``--result`` of the table commands (pareto, clusters) for this result."""
    args = _model_arg(inputs)
    if inputs.result is not None and not inputs.result.is_default:
        args["result"] = inputs.result.name
    return args


# -- sections ------------------------------------------------------------------------------------
def provenance_section(inputs: ReportInputs, now: datetime) -> h.Section:
    """Model, weights and adapter, corpus, split, sentences and versions, from the manifests and sidecars."""
    from sparsefinder import __version__
    from sparsefinder.model.catalogue import load_registry

    spec = load_registry().get(inputs.model)
    rows: list[tuple[str, Any]] = [("model", inputs.model)]
    if spec is not None:
        rows += [("description", spec.description or None), ("weights", spec.path), ("adapter", spec.adapter),
                 ("alpha (catalogue)", spec.alpha)]
    rows += [("result", inputs.result.label if inputs.result is not None else None),
             ("report made", now.isoformat(timespec="seconds")), ("sparsefinder (report)", __version__)]
    body = h.key_values(rows, "provenance-model")
    sources: list[tuple[str, dict]] = []
    if inputs.store is not None:
        sources.append((f"store {_rel(inputs.store.path)}", inputs.store.manifest))
    sweep_info = inputs.sweep.attrs.get("sweep", {}) if inputs.sweep is not None else {}
    if sweep_info.get("store"):
        sources.append(("sweep corpus", {**sweep_info["store"], "sparsefinder_version":
                                         sweep_info.get("sparsefinder_version")}))
    if inputs.curves is not None:
        c = inputs.curves.attrs.get("curves", {})
        sources.append(("curves corpus", {"model": c.get("model"), "corpus": c.get("corpus"), "split": c.get("split"),
                                          "num_sentences": c.get("sentences")}))
    if inputs.interpret is not None:
        info = inputs.interpret.info
        sources.append(("interpretation corpus", {"model": info.get("model"), "corpus": info.get("corpus"),
                                                  "num_sentences": info.get("sentences"),
                                                  "num_tokens": info.get("tokens"), "path": info.get("store")}))
    if sources:
        keys = ("model", "corpus", "split", "num_sentences", "num_tokens", "alpha", "weights_sha256", "created",
                "sparsefinder_version", "path")
        # Strings: a column mixing counts and gaps would otherwise print as floats (14697.0000).
        frame = pd.DataFrame([{"source": what, **{k: _short(m.get(k)) for k in keys}} for what, m in sources],
                             dtype=object).fillna("–").astype(str)
        body += h.para("Corpora and weights each part of this report was computed on:") + h.table(frame)
    else:
        body += h.absent("No store, sweep, curves or interpretation tables: no corpus to describe.")
    cmds = [("the store", extract_command(inputs.store.manifest, inputs.store.path))] if inputs.store else []
    return h.Section("provenance", "Provenance", body, cmds)


def _short(value: Any) -> Any:
    """Long hashes cut to 16 characters (a fingerprint to compare, not to read)."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:16] + "…"
    return value


def gold_section(inputs: ReportInputs, figure: h.FigureEmbedder) -> h.Section:
    """Gold sparsity per layer and head: of the store's sentences, else of the sweep table's corpus."""
    from sparsefinder.plots.heatmaps import sparsity_heatmap

    if inputs.store is not None:
        grid, where = store_gold_sparsity(inputs.store), f"the store's {len(inputs.store)} sentences"
        cmds = [("the store", extract_command(inputs.store.manifest, inputs.store.path)),
                ("one text's grid", f"sparsefinder gold 'A sentence.' --model {shlex.quote(inputs.model)}")]
    elif inputs.sweep is not None:
        grid, where = sweep_gold_sparsity(inputs.sweep), "the sweep table's corpus"
        cmds = sweep_commands(inputs)
    else:
        return h.Section("gold-sparsity", "Gold sparsity per layer and head",
                         h.absent("No store and no sweep table: no gold sparsity to show (give --store)."))
    body = (h.para(f"Mean over {where} of 1 − |G|/|V| per head (G: the entmax support; V: the layer's valid "
                   f"pairs). Mean over all heads: {float(np.nanmean(grid)):.4f}.")
            + figure(sparsity_heatmap(grid), "gold-sparsity") + h.table(grid_frame(grid), 4, "gold-sparsity-table"))
    return h.Section("gold-sparsity", "Gold sparsity per layer and head", body, cmds)


def pareto_section(inputs: ReportInputs, figure: h.FigureEmbedder) -> h.Section:
    """Each method's Pareto front over all heads, its frontier configurations and the best-recall table."""
    from sparsefinder.evaluation.pareto import best_recall_table
    from sparsefinder.figures import sweep_fronts
    from sparsefinder.plots.heatmaps import pareto_figure
    from sparsefinder.predictors import REGISTRY

    title = "Pareto fronts: recall against sparsity"
    if inputs.sweep is None:
        return h.Section("pareto", title, h.absent("No sweep table for this result: run sparsefinder sweep."))
    front, where = sweep_fronts(inputs.sweep)
    fig = pareto_figure(front, title=f"Recall against sparsity ({where})")
    order = {m: i for i, m in enumerate(REGISTRY)}
    shown = ["method", "params", "sparsity", "recall", "mass_recall", "precision", "exact"]
    winners = front[front["on_front"]][[c for c in shown if c in front.columns]]
    winners = winners.sort_values(["method", "sparsity"], key=lambda c: c.map(order) if c.name == "method" else c,
                                  kind="stable")
    best = best_recall_table(inputs.sweep, thresholds=THRESHOLDS)
    if "mass_recall" in inputs.sweep and inputs.sweep["mass_recall"].notna().any():
        best = best.join(best_recall_table(inputs.sweep, thresholds=THRESHOLDS, y="mass_recall"))
    best = best.reset_index()
    body = (h.para(f"Every configuration's mean over heads and sentences; {len(winners)} of {len(front)} "
                   "configurations are on their method's front.") + figure(fig, "pareto")
            + "<h3>Frontier configurations</h3>" + h.table(winners, 4, "pareto-front-table")
            + "<h3>Best recall (and mass recall, the share of the gold probability kept) at a minimum "
              "sparsity</h3>" + h.table(best, 4, "best-recall-table"))
    cmds = [*sweep_commands(inputs), ("this figure and the frontier",
                                      h.command_line("pareto", {**_pareto_source(inputs), "figure": "pareto.html"}))]
    return h.Section("pareto", title, body, cmds)


def _pareto_source(inputs: ReportInputs) -> dict[str, Any]:
    """Where ``sparsefinder pareto`` reads the sweep: the result, or the table given explicitly."""
    if inputs.result is not None and inputs.sweep_paths == rs.sweep_paths(inputs.result):
        return _result_args(inputs)
    return {"sweep": _rel(inputs.sweep_paths[0])}


def ranking_section(inputs: ReportInputs, figure: h.FigureEmbedder) -> h.Section:
    """Heads ranked by predictability: the best recall of any swept configuration at sparsity ≥ 0.9."""
    from sparsefinder.evaluation.interpret import head_predictability
    from sparsefinder.plots.heatmaps import sparsity_heatmap

    title = "Head ranking by predictability"
    if inputs.sweep is None:
        return h.Section("head-ranking", title, h.absent("No sweep table for this result: no heads to rank."))
    s = RANKING_SPARSITY
    best = head_predictability(inputs.sweep, s)
    grid = best.pivot(index="layer", columns="head", values="best_recall").sort_index().sort_index(axis=1)
    ranked = best.sort_values(["best_recall", "layer", "head"], ascending=[False, True, True], na_position="last",
                              kind="stable").reset_index(drop=True)
    ranked.insert(0, "rank", range(1, len(ranked) + 1))
    n = min(RANKED_HEADS, len(ranked))
    fig = sparsity_heatmap(grid.to_numpy(float), title=f"Best recall at sparsity ≥ {s:g} per layer and head",
                           value_name="best recall")
    body = (h.para(f"Per head, the best recall of any swept configuration whose sparsity is ≥ {s:g} (as the "
                   "Clusters & POS page ranks heads); ties go to the sparser configuration.")
            + figure(fig, "head-ranking") + f"<h3>The {n} most predictable heads</h3>"
            + h.table(ranked.head(n), 4, "head-ranking-top"))
    if len(ranked) > n:
        body += f"<h3>The {min(n, len(ranked) - n)} least predictable heads</h3>" + h.table(
            ranked.tail(min(n, len(ranked) - n)), 4, "head-ranking-bottom")
    top = ranked.iloc[0]
    cmds = [*sweep_commands(inputs),
            ("the top head's Pareto front", h.command_line("pareto", {**_pareto_source(inputs),
                                                                      "layer": int(top["layer"]),
                                                                      "head": int(top["head"])},
                                                                     always=("layer", "head"))),
            ("the ranking (Python)", "python -c \"from sparsefinder.evaluation.sweep import load_sweep; "
             "from sparsefinder.evaluation.interpret import head_predictability; "
             f"print(head_predictability(load_sweep('{_rel(inputs.sweep_paths[0])}'), {s:g})"
             ".sort_values('best_recall', ascending=False).to_string())\"")]
    return h.Section("head-ranking", title, body, cmds)


def clusters_section(inputs: ReportInputs, figure: h.FigureEmbedder) -> h.Section:
    """Clusters × POS: the POS information of every head's query clusters, the most informative heads, the
    cluster × POS matrix of the top one and the POS pairs carrying most gold edges."""
    from sparsefinder.evaluation import interpret as itp
    from sparsefinder.figures import cluster_pos_figure, default_clusters
    from sparsefinder.plots.clusters import head_grid_heatmap

    title = "Clusters × parts of speech"
    tables = inputs.interpret
    if tables is None:
        return h.Section("clusters-pos", title,
                         h.absent("No interpretation tables for this result: run sparsefinder interpret."))
    c = default_clusters(tables)
    summary = itp.head_summary(tables, c)
    cols = ["layer", "head", "query_pos_info", "key_pos_info", "query_purity", "cluster_recall", "share_within_1",
            "top_pos_pair", "top_pos_pair_share"]
    top = summary.sort_values(["query_pos_info", "layer", "head"], ascending=[False, True, True], kind="stable")
    lead = top.iloc[0]
    layer, head = int(lead["layer"]), int(lead["head"])
    grid = itp.head_grid(summary, "query_pos_info")
    body = (h.para(f"k-means with C = {c} clusters on the projected queries and keys of "
                   f"{tables.info.get('sentences', '?')} sentences ({tables.info.get('tokens', '?')} tokens, tags "
                   f"from {tables.info.get('tag_source', '?')}). POS information is I(cluster; POS) / H(POS).")
            + figure(head_grid_heatmap(grid, f"POS information of the query clusters, C = {c}", "I(C;POS)/H(POS)",
                                       zmax=max(0.05, float(np.nanmax(grid)))), "clusters-grid")
            + f"<h3>The {min(RANKED_HEADS, len(top))} heads with the most POS-informative query clusters</h3>"
            + h.table(top[cols].head(RANKED_HEADS), 3, "clusters-top-heads")
            + figure(cluster_pos_figure(tables, layer, head, c, "query", proportions=True), "clusters-matrix")
            + "<h3>POS pairs carrying most gold edges (all heads)</h3>"
            + h.table(itp.top_pos_pairs(tables, k=10), 3, "clusters-pos-pairs"))
    info = tables.info
    r = inputs.result
    interpret_args = {"store": info.get("store") or "STORE", "projections": _rel(r.projections) if r else None,
                      "fitted": _rel(r.fitted) if r else None, "out": _rel(inputs.interpret_path),
                      "top_k": info.get("top_k"), "max_distance": info.get("max_distance")}
    source = _result_args(inputs) if inputs.result is not None and inputs.interpret_path == interpret_dir(
        inputs.model, inputs.result) else {"tables": _rel(inputs.interpret_path)}
    cmds = [("the interpretation tables (rebuilt from their manifest)", h.command_line("interpret", interpret_args)),
            ("the top head's clusters × POS", h.command_line("clusters", {
                **source, "layer": layer, "head": head, "clusters": c, "proportions": True,
                "figure": "clusters.html"}, always=("layer", "head")))]
    return h.Section("clusters-pos", title, body, cmds)


def curves_section(inputs: ReportInputs, figure: h.FigureEmbedder) -> h.Section:
    """The end task of the model run on predicted graphs against the sparsity (``sparsefinder curves``)."""
    from sparsefinder.plots.curves import sparsity_accuracy_figure

    title = "Sparsity–accuracy curves"
    frame = inputs.curves
    if frame is None or frame.empty:
        return h.Section("curves", title, h.absent("No sparsity–accuracy curves for this result: run "
                                                   "sparsefinder curves."))
    info = frame.attrs.get("curves", {})
    metric = "mlm_accuracy" if info.get("masked_lm") else "cos_mean"
    fig = sparsity_accuracy_figure(frame, metric=metric)
    shown = [c for c in ("method", "params", "layers", "sparsity", "recall", metric, "retrieval") if c in frame]
    body = (h.para(f"The model run with its entmax restricted to each method's predicted graph on "
                   f"{info.get('sentences', '?')} sentences of {info.get('corpus', '?')}; {metric} against "
                   "the sparsity of the restricted layers.") + figure(fig, "curves")
            + h.table(frame[shown], 4, "curves-table"))
    arguments = info.get("arguments")
    if arguments:
        cmds = [("these curves (their recorded arguments)", h.command_line("curves", arguments))]
    else:
        cmds = [("these curves", h.command_line("curves", {**_model_arg(inputs), "out": _rel(inputs.curves_path)}))]
    return h.Section("curves", title, body, cmds)


SECTIONS: tuple[Callable[..., h.Section], ...] = (gold_section, pareto_section, ranking_section, clusters_section,
                                                  curves_section)


def _guarded(make: Callable[..., h.Section], inputs: ReportInputs, figure: h.FigureEmbedder, sid: str,
             title: str) -> h.Section:
    """One section, or one line saying why it could not be made (a corrupt or mismatched table)."""
    from sparsefinder.evaluation.interpret import InterpretError

    try:
        return make(inputs, figure)
    except (InterpretError, KeyError, ValueError) as e:
        return h.Section(sid, title, h.absent(f"This section could not be made: {type(e).__name__}: {e}"))


# -- the document --------------------------------------------------------------------------------
def render(inputs: ReportInputs, now: datetime | None = None) -> str:
    """The HTML document of gathered ``inputs`` (see the module docstring for its sections)."""
    now = now or datetime.now(UTC)
    figure = h.FigureEmbedder()
    titles = ("Gold sparsity per layer and head", "Pareto fronts: recall against sparsity",
              "Head ranking by predictability", "Clusters × parts of speech", "Sparsity–accuracy curves")
    sections = [provenance_section(inputs, now)]
    sections += [_guarded(make, inputs, figure, sid, t)
                 for make, sid, t in zip(SECTIONS, SECTION_IDS[1:], titles, strict=True)]
    what = inputs.result.label if inputs.result is not None else "no registered result"
    return h.page(f"Study report: {inputs.model}", f"{what}; made {now.isoformat(timespec='seconds')} by "
                                                   "sparsefinder report.", sections)


def study_report(model: str | None = None, result: str | None = None, store: str | Path | None = None,
                 sweep: str | Path | None = None, curves: str | Path | None = None,
                 interpret: str | Path | None = None, runs: Path | None = None, now: datetime | None = None) -> str:
    """One standalone offline HTML document for a model's result (arguments as :func:`gather`)."""
    return render(gather(model, result, store, sweep, curves, interpret, runs), now)


def write_report(path: str | Path, document: str) -> Path:
    """Write ``document`` to ``path`` atomically: a temporary file beside it, then renamed over it."""
    out = Path(path)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"{out.name}: a study report is an HTML file; end the name in .html")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"no such directory: {out.parent}")
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(document)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the report from whoever it is shared with
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
