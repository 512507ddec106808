"""What each ``sparsefinder`` subcommand does; :mod:`sparsefinder.cli` parses the arguments and calls these.

Each command takes the parsed arguments and returns the exit code; errors are raised and turned into one
line (exit 2 for what was asked, 1 for the work failing) by :func:`sparsefinder.cli.main`.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np

from sparsefinder import cli_figures as figures


def _load_corpus(args):
    from sparsefinder.corpora import readers as corpus

    if args.corpus == "default":
        return corpus.default_corpus(split=None if args.split == "all" else args.split, seed=args.seed)
    path = Path(args.corpus)
    # Checked before reading: a huge file, a directory or /dev/zero must not be read into memory first.
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a regular file" if path.exists() else f"{path}: no such file")
    size = path.stat().st_size
    if size > corpus.MAX_BYTES:
        raise ValueError(f"{path.name}: {size:,} bytes, more than the limit of {corpus.MAX_BYTES:,}")
    return corpus.read_corpus(path.read_bytes(), path.name)


def cmd_models(args) -> int:
    """List the catalogue (shipped, then the user's), or add/remove a user entry."""
    from sparsefinder.model import user_catalogue
    from sparsefinder.model.catalogue import default_model_name, load_registry

    if args.action == "add":
        where = user_catalogue.add_model(args.name, args.path, alpha=args.alpha, adapter=args.adapter,
                                         description=args.description, task=args.task)
        print(f"added {args.name} to {where}")
        return 0
    if args.action == "remove":
        print(f"removed {args.name} from {user_catalogue.remove_model(args.name)}")
        return 0
    default = default_model_name()
    for name, spec in load_registry().items():
        mark = "*" if name == default else " "
        alpha = "own" if spec.alpha is None else spec.alpha
        print(f"{mark} {name:28s} alpha={alpha}  [{spec.source}]  {spec.description}")
    return 0


def cmd_results(args) -> int:
    """The model's results (shipped, then saved) and the methods each can draw on new text."""
    from sparsefinder import results as rs
    from sparsefinder.model.catalogue import load_registry

    if args.model not in load_registry():
        raise ValueError(f"unknown model {args.model!r}: results belong to registered models (sparsefinder models)")
    runs = Path(args.runs) if args.runs else None
    for name in rs.result_choices(args.model, runs):
        result = rs.resolve_result(args.model, name, runs)
        found = rs.result_artifacts(result)
        held = [k for k in ("store", "projections", "fitted", "sweep", "curves") if getattr(result, k) is not None]
        print(f"{result.label}: {', '.join(held) or 'no artifacts'}")
        print(f"  methods: {', '.join(found.available_methods()) or 'none'}")
        if found.learned[1] is not None:
            print(f"  note: {found.learned[1]}")
    return 0


def _input_texts(args) -> list[str]:
    """The non-empty texts of the ``text`` argument (or standard input), one per line with ``--lines``."""
    text = args.text if args.text is not None else sys.stdin.read()
    return [t for t in (text.splitlines() if args.lines else [text]) if t.strip()]


def _extract(model, texts: list[str]):
    """``model.extract(texts)``, its warnings (truncation) printed as one line each on standard error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = model.extract(texts)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return ex


def cmd_gold(args) -> int:
    from sparsefinder.model.entmax_model import load_model

    texts = _input_texts(args)
    if not texts:
        print("error: no text given", file=sys.stderr)
        return 2
    model = load_model(args.model, alpha=args.alpha, device=args.device)
    ex = _extract(model, texts)
    grid = [[float(v) for v in ex.gold(layer).sparsity().mean(0)] for layer in range(ex.num_layers)]
    if args.figure:
        figures.write_figure(args, figures.gold_figure(args, ex))
    if args.json:
        print(json.dumps({"model": model.name, "tokens": ex.tokens, "gold_sparsity": grid}))
        return 0
    print(f"model {model.name}  alpha {model.alpha}  causal {model.causal}  tokens {ex.lengths.tolist()}")
    print("gold sparsity (mean over the given texts), rows = layers, columns = heads")
    print("layer " + " ".join(f"h{h:<4d}" for h in range(ex.num_heads)))
    for layer, row in enumerate(grid):
        print(f"{layer:5d} " + " ".join(f"{v:.3f}" for v in row))
    return 0


#: OpenMP's wait policy for the dashboard's server (app/streamlit_app.py says why).
PASSIVE_OMP = "PASSIVE"


def cmd_serve(args) -> int:
    """The dashboard: ``streamlit run app/streamlit_app.py`` from the source checkout, offline, headless.

    The process becomes Streamlit's (``exec``), so signals and the exit code are the server's. The menu lists
    the shipped catalogue and your own (``sparsefinder models add``; ``$SPARSEFINDER_CATALOGUE``).
    """
    import os

    root = Path(__file__).resolve().parent.parent
    app = root / "app" / "streamlit_app.py"
    if not app.is_file():
        raise ValueError(f"the dashboard needs the source checkout ({app} is missing): run it from a clone")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    os.environ.setdefault("OMP_WAIT_POLICY", PASSIVE_OMP)  # see app/streamlit_app.py
    os.chdir(root)  # .streamlit/config.toml (upload cap, error details hidden) is read from here
    cmd = [sys.executable, "-m", "streamlit", "run", "app/streamlit_app.py", "--server.address", args.host,
           "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    sys.stdout.flush()
    os.execv(sys.executable, cmd)
    return 0  # not reached


def cmd_predict(args) -> int:
    """One predictor on a text: per layer (means over heads and texts) recall, mass recall, precision,
    sparsity, exact and the output error of entmax restricted to its graph."""
    from sparsefinder import results as rs
    from sparsefinder.evaluation.analysis import predict_batch
    from sparsefinder.metrics import HEAD_METRICS
    from sparsefinder.model.catalogue import load_registry
    from sparsefinder.model.entmax_model import load_model

    texts = _input_texts(args)
    if not texts:
        print("error: no text given", file=sys.stderr)
        return 2
    model = load_model(args.model, alpha=args.alpha, device=args.device)
    projections = fitted = None
    if model.name in load_registry():  # a registered model's result holds projections and fitted state
        artifacts = rs.result_artifacts(rs.resolve_result(model.name, args.result), model)
        if reason := artifacts.unsupported(args.method):
            raise ValueError(f"{args.method} cannot run with the {args.result} result: {reason}")
        projections, fitted = artifacts.for_method(args.method)
    ex = _extract(model, texts)
    params = args.params
    if params is None:  # the configuration the dashboard starts at (a fitted one for the fitted methods)
        sweep = rs.load_result_sweep(rs.resolve_result(model.name, args.result)) \
            if model.name in load_registry() else None
        params = rs.default_params(args.method, rs.params_options(args.method, sweep))
    pred = predict_batch(ex, args.method, params, projections=projections, fitted=fitted)
    names = list(HEAD_METRICS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a layer of empty texts only: NaN, shown as such
        per_layer = {m: np.nanmean(pred.metrics[m], axis=(0, 2)) for m in names}
        overall = {m: float(np.nanmean(pred.metrics[m])) for m in names}
    if args.json:
        print(json.dumps({"model": model.name, "method": args.method, "params": params,
                          "layers": [{m: float(per_layer[m][layer]) for m in names} for layer in range(ex.num_layers)],
                          "mean": overall}))
        return 0
    print(f"{args.method} {params} on {len(texts)} text(s), model {model.name}; "
          "means over heads (docs/method.md §2)")
    print("layer " + " ".join(f"{m:>12s}" for m in names))
    for layer in range(ex.num_layers):
        print(f"{layer:5d} " + " ".join(f"{per_layer[m][layer]:12.4f}" for m in names))
    print(" mean " + " ".join(f"{overall[m]:12.4f}" for m in names))
    return 0


def cmd_compare_models(args) -> int:
    """Per-head gold sparsity of two models (or two alphas) and the Jaccard overlap of their gold graphs."""
    from sparsefinder.evaluation.compare_models import compare_extractions, compare_stores

    if args.store_a or args.store_b:
        if not (args.store_a and args.store_b) or args.text:
            raise ValueError("give a text, or both --store-a and --store-b (two stores of one corpus)")
        from sparsefinder.corpora.store import ExtractionStore

        frame = compare_stores(ExtractionStore.open(args.store_a), ExtractionStore.open(args.store_b))
    else:
        from sparsefinder.model.catalogue import default_model_name
        from sparsefinder.model.entmax_model import load_model

        args.a = args.a or default_model_name()
        text = args.text if args.text is not None else sys.stdin.read()
        texts = [t for t in text.splitlines() if t.strip()]
        if not texts:
            raise ValueError("no text given")
        a = load_model(args.a, alpha=args.alpha_a, device=args.device)
        b = load_model(args.b or args.a, alpha=args.alpha_b, device=args.device)
        frame = compare_extractions(a.extract(texts), b.extract(texts))
    if args.json:
        print(frame.to_json(orient="records", double_precision=15))
        return 0
    means = frame[["sparsity_a", "sparsity_b", "jaccard"]].mean()
    print(f"mean over heads: gold sparsity A {means['sparsity_a']:.4f}  B {means['sparsity_b']:.4f}  "
          f"Jaccard {means['jaccard']:.4f}")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def cmd_extract(args) -> int:
    from sparsefinder.corpora.extract import extract_corpus
    from sparsefinder.model.entmax_model import load_model

    corpus = _load_corpus(args)
    texts = corpus.texts()[: args.limit] if args.limit else corpus.texts()
    if args.engine == "ray":
        from sparsefinder.distributed.ray_extract import extract_corpus_ray

        if args.compute_dtype:
            raise ValueError("--compute-dtype is for the local engine; Ray workers load the model in its own dtype")
        out = extract_corpus_ray(
            args.model, texts, Path(args.out), alpha=args.alpha, device=args.device, batch_size=args.batch_size,
            dtype=args.dtype,
            shard_size=args.shard_size, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker, address=args.address, corpus_name=corpus.name, split=args.split,
            overwrite=args.overwrite, resume=args.resume,
        )
        print(f"wrote {len(texts)} sentences of {corpus.name} to {out}")
        return 0
    if args.resume:
        raise ValueError("--resume continues an interrupted --engine ray extraction; the local engine restarts "
                         "(--overwrite)")
    model = load_model(args.model, alpha=args.alpha, device=args.device, compute_dtype=args.compute_dtype)
    out = extract_corpus(
        model, texts, Path(args.out), batch_size=args.batch_size, dtype=args.dtype, progress=True,
        corpus_name=corpus.name, split=args.split, overwrite=args.overwrite,
        **({"shard_size": args.shard_size} if args.shard_size else {}),
    )
    print(f"wrote {len(texts)} sentences of {corpus.name} to {out}")
    return 0


def cmd_train(args) -> int:
    import numpy as np

    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.training.projections import projection_manifest, train_projections

    store = ExtractionStore.open(args.store)
    if args.loss == "stacked":
        return _train_stacked(args, store)
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
        loss=args.loss,
    )
    proj.save(Path(args.out), projection_manifest(store, history["config"], history))
    print(f"saved projections (r={args.rank}) to {args.out}")
    return 0


def _train_stacked(args, store) -> int:
    from sparsefinder.training.projections import Projections, projection_manifest
    from sparsefinder.training.stacked import train_stacked_projections

    if not args.init:
        raise SystemExit("--loss stacked fine-tunes existing projections: give --init DIR (e.g. listwise ones)")
    init = Projections.load(args.init, store=store)
    proj, history = train_stacked_projections(store, init, steps=args.steps, lr=args.lr, seed=args.seed)
    history["config"]["init_dir"] = str(args.init)
    proj.save(Path(args.out), projection_manifest(store, history["config"], history))
    print(f"saved projections (r={proj.rank}, trained through the stacked loss from {args.init}) to {args.out} "
          f"in {history['seconds']:.0f}s")
    return 0


def cmd_sweep(args) -> int:
    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.evaluation.fitted import load_fitted, save_fitted
    from sparsefinder.evaluation.pareto import best_recall_table, pareto_front
    from sparsefinder.evaluation.sweep import fit_predictors, run_sweep, save_sweep
    from sparsefinder.predictors.base import expand_methods
    from sparsefinder.training.projections import Projections

    store = ExtractionStore.open(args.store)
    projections = Projections.load(args.projections, store=store) if args.projections else None
    methods = expand_methods(args.methods) if args.methods else None
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
    # Some methods need context the store lacks (dependency trees, input embeddings); build it only
    # when one of them can run, since spaCy and the model take seconds to load.
    from sparsefinder.predictors import REGISTRY

    wanted = set(REGISTRY) if methods is None else set(methods) & set(REGISTRY)
    needed = {key for m in wanted for key in REGISTRY[m].context_keys}
    syntax, lexical = "word_heads" in needed, "embeddings" in needed
    if args.context == "spacy" and (syntax or lexical):
        from sparsefinder.corpora.annotate import sweep_context

        context, notes = sweep_context(store, syntax=syntax, lexical=lexical)
        for note in notes:
            print(f"note: {note}")
    # The learned predictors' token priors read each sentence's token strings (already in the store).
    from sparsefinder.predictors.learned.budgets import TokenContext

    if "tokens" in needed:
        if context is None:
            context = TokenContext()
        else:
            from sparsefinder.corpora.annotate import CombinedContext

            context = CombinedContext(context, TokenContext())
    if args.engine == "ray":
        from sparsefinder.distributed.ray_sweep import run_sweep_ray

        frame = run_sweep_ray(args.store, projections, methods=methods, fitted=fitted, batch_size=args.batch_size,
                              seed=args.seed, context=context, threads=args.threads or 1, address=args.address,
                              workers=args.workers, cpus_per_task=args.cpus_per_worker)
    else:
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
    print(winners[["method", "params", "sparsity", "recall", "mass_recall"]].round(3).to_string(index=False))
    print(best_recall_table(frame).round(3).to_string())
    if args.figure:
        from sparsefinder.plots.heatmaps import pareto_figure

        figures.write_figure(args, pareto_figure(front, title="Recall against sparsity (all layers and heads)"))
    return 0


def cmd_interpret(args) -> int:
    import time

    from sparsefinder.corpora.readers import read_conllu
    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.evaluation.fitted import load_fitted
    from sparsefinder.evaluation.interpret import head_summary, interpret_store
    from sparsefinder.training.projections import Projections

    store = ExtractionStore.open(args.store)
    projections = Projections.load(args.projections, store=store)
    fitted = load_fitted(args.fitted)
    corpus = None
    if args.conllu:
        path = Path(args.conllu)
        corpus = read_conllu(path.read_bytes(), path.name)
    clusters = [int(c) for c in args.clusters.split(",")] if args.clusters else None
    start = time.perf_counter()
    tables = interpret_store(store, projections, fitted, corpus=corpus, n_clusters=clusters, top_k=args.top_k,
                             max_distance=args.max_distance,
                             progress=lambda done, total: print(f"layer {done}/{total}", flush=True))
    tables.info["seconds"] = round(time.perf_counter() - start, 2)
    tables.save(args.out)
    print(f"wrote {', '.join(f'{len(getattr(tables, t))} {t}' for t in ('counts', 'top_tokens', 'pos_pairs'))} "
          f"rows to {args.out} in {tables.info['seconds']} s")
    c = args.summary_clusters if args.summary_clusters in tables.n_clusters else tables.n_clusters[0]
    summary = head_summary(tables, c)
    cols = ["layer", "head", "share_within_1", "query_purity", "query_pos_info", "key_pos_info", "cluster_recall",
            "top_pos_pair"]
    print(f"most positional heads (share of gold edges at |j - i| <= 1), {c} clusters:")
    print(summary.sort_values("share_within_1", ascending=False)[cols].head(5).round(3).to_string(index=False))
    print(f"most POS-informative query clusters (I(cluster; POS) / H(POS)), {c} clusters:")
    print(summary.sort_values("query_pos_info", ascending=False)[cols].head(5).round(3).to_string(index=False))
    if args.figure:
        from sparsefinder.evaluation.interpret import head_grid
        from sparsefinder.plots.clusters import head_grid_heatmap

        figures.write_figure(args, head_grid_heatmap(
            head_grid(summary, "query_pos_info"), f"POS information of the query clusters ({c} clusters)",
            "I(cluster; POS) / H(POS)"))
    return 0


def cmd_distill(args) -> int:
    from sparsefinder.corpora import readers as corpus_mod
    from sparsefinder.model.catalogue import get_spec
    from sparsefinder.model.distill import DistillConfig, distill

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


def _corpus_texts_model(args):
    """``curves``/``windows``: torch threads set, the corpus, its first ``--limit`` texts, the model."""
    import torch

    from sparsefinder.model.entmax_model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = _load_corpus(args)
    texts = corpus.texts()[: args.limit] if args.limit else corpus.texts()
    return corpus, texts, load_model(args.model, alpha=args.alpha, device=args.device, task=args.task)


def cmd_curves(args) -> int:

    from sparsefinder.evaluation import approximate as ap
    from sparsefinder.plots.curves import sparsity_accuracy_figure

    corpus, texts, model = _corpus_texts_model(args)
    found = _curve_artifacts(args, model)
    if args.methods:
        from sparsefinder.predictors.base import expand_methods

        methods = expand_methods(args.methods)
    else:  # the defaults that can run with this model's artifacts
        methods = []
        for m in ap.DEFAULT_METHODS:
            # syntax reads parses that the curves compute themselves (prepare_batches), not the dashboard's context
            reason = None if m == "syntax" else found.unsupported(m)
            if reason:
                print(f"note: skipping {m}: {reason}")
            else:
                methods.append(m)
    learned = {}
    if args.windows:
        from sparsefinder.evaluation.windows import learned_methods

        learned = learned_methods(args.windows.split(","))
        methods += list(learned)
    from sparsefinder.predictors import REGISTRY

    grids = {m: ap.thin_grid(REGISTRY[m].grid(), args.points) for m in methods if m in REGISTRY}
    if args.sparsities:
        grids.update(ap.target_grids(methods, _floats(args.sparsities, "--sparsities")))
    print(f"{len(texts)} sentences of {corpus.name}; methods {methods}; layers {args.layers}")
    layers = args.layers.split(";") if ";" in args.layers else args.layers.split(",")
    if args.engine == "ray":
        from sparsefinder.distributed.ray_sweep import curves_ray

        frame = curves_ray(args.model, texts, methods, grids, layers=layers, artifacts=found.for_method,
                           learned=learned, batch_size=args.batch_size, seed=args.seed, alpha=args.alpha,
                           device=args.device, task=args.task, threads=args.threads or 1, address=args.address,
                           cpus_per_task=args.cpus_per_worker, gpus_per_task=args.gpus_per_worker)
    else:
        frame = ap.sparsity_accuracy_curve(model, texts, methods, grids, layers=layers, artifacts=found.for_method,
                                           learned=learned, batch_size=args.batch_size, seed=args.seed,
                                           progress=True)
    manifest = {"arguments": {k: v for k, v in vars(args).items() if k != "func"}, "corpus": corpus.name,
                "split": args.split}
    path = ap.save_curves(frame, args.out, manifest)
    metric = args.metric or ("mlm_accuracy" if frame.attrs["curves"]["masked_lm"] else "cos_mean")
    fig = sparsity_accuracy_figure(frame, metric=metric)
    plot = Path(args.plot) if args.plot else Path(args.out).with_suffix(".html")
    plot.parent.mkdir(parents=True, exist_ok=True)  # after minutes of work, a missing folder is not an error
    fig.write_html(str(plot), include_plotlyjs=True)
    figures.write_figure(args, fig)
    if args.png:
        figures.write_figure(args, fig, args.png)
    show = ["method", "params", "layers", "sparsity", "recall", "cos_mean", "cos_min", "retrieval"]
    if frame.attrs["curves"]["masked_lm"]:
        show += ["mlm_loss", "mlm_accuracy"]
    print(frame[show].round(3).to_string(index=False))
    print(f"best {metric} at each sparsity level of the restricted layers:")
    print(ap.best_at(frame, metric, higher_is_better=metric != "mlm_loss").round(3).to_string())
    if metric != "mlm_loss":
        print(f"where {metric} first drops below 0.99 (sparsity of the restricted layers; drops_at interpolated "
              f"linearly between grid points):")
        print(ap.drop_below(frame, 0.99, metric).round(3).to_string())
    print(f"wrote {len(frame)} rows to {path} and the plot of {metric} to {plot}")
    return 0


def cmd_windows(args) -> int:

    from sparsefinder.evaluation.windows import WindowConfig, mean_width, save_windows, train_windows, windows_key

    corpus, texts, model = _corpus_texts_model(args)
    runs = {}
    for subset in args.layers.split(";") if ";" in args.layers else args.layers.split(","):
        for lam in (float(x) for x in args.lambdas.split(",")):
            config = WindowConfig(sparsity_weight=lam, tau=args.tau, init_radius=args.init_radius, lr=args.lr,
                                  epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                                  global_tokens=args.global_tokens)
            w = train_windows(model, texts, config, layers=subset, progress=True)
            runs[windows_key(w, subset)] = w
            last = w.history[-1]
            print(f"layers {subset} lambda {lam}: mean radius {mean_width(w):.2f}, soft density "
                  f"{last['density']:.3f}, task loss {last['task']:.4f}; radii per layer "
                  f"{[w.widths()[layer].tolist() for layer in w.layers]}")
    save_windows(runs, args.out, {"corpus": corpus.name, "split": args.split, "sentences": len(texts),
                                  "arguments": {k: v for k, v in vars(args).items() if k != "func"}})
    print(f"saved {len(runs)} learned windows to {args.out}")
    return 0


def _floats(text: str, flag: str) -> list[float]:
    """A comma-separated list of numbers (a usage error names ``flag``)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def _curve_artifacts(args, model):
    """The artifacts ``curves`` runs with: the registered model's result (``--result``, default the shipped
    one), with ``--projections`` / ``--fitted`` replacing its own when given (:mod:`sparsefinder.results`)."""
    from sparsefinder import results as rs
    from sparsefinder.model.catalogue import load_registry

    if args.model in load_registry():
        result = rs.resolve_result(args.model, args.result)
    else:  # a local model directory has no shipped result
        result = rs.Result(name=rs.SHIPPED, is_default=True, store=None, projections=None, fitted=None, sweep=None)
    return rs.result_artifacts(rs.override_result(result, args.projections, args.fitted), model)
