r"""Sparse approximation at test time: run the model on predicted graphs and measure the end task.

docs/method.md §5. Every attention call of a chosen subset of layers runs entmax
*restricted* to a predicted graph :math:`\hat G` (scores outside it get the
mask value, so their probability is exactly zero):

.. math:: \tilde p_i = \alpha\text{-entmax}\big(s_i + \text{mask}_{\hat G_i}\big),

and the approximated activations flow on to later layers, so errors compound.
The predictor reads each layer's *live* queries and keys (those of the
approximated run), exactly as a sparse kernel would. A query whose predicted
row is empty attends to nothing (zero attention output; see
:func:`sparsefinder.model.attention.restrict_support`).

Per restricted layer we record, over valid pairs only (docs/method.md §2):

- ``sparsity`` :math:`1 - |\hat G| / |V|` of the graph actually used;
- ``recall`` :math:`|G \cap \hat G| / |G|` and ``exact`` (share of queries whose
  gold row is covered) against the *gold graph of the same scores*
  :math:`G = \operatorname{supp}\,\alpha\text{-entmax}(s)`, i.e. of the layer's
  own inputs in this run: where :math:`G_i \subseteq \hat G_i` the layer's output
  for query ``i`` is exact (sparse consistency);
- ``empty_rows``: share of real queries whose predicted row is empty.

Each is per (sentence, layer, head), then the mean over sentences, then over
heads and restricted layers. ``model_sparsity`` counts unrestricted layers as
dense: ``sparsity × |restricted layers| / L``.

The end task, against the exact (unrestricted) entmax model on the same input:

- embedding fidelity: cosine of the mean-pooled last hidden states per
  sentence, :math:`\cos(\tilde e_s, e_s)` (``cos_mean``, ``cos_min``);
- retrieval stability: share of sentences whose nearest neighbour among the
  *other* sentences (cosine) is the same under the approximated embeddings as
  under the exact ones (:func:`retrieval_stability`);
- for a model with a masked-LM head: masked-LM loss (mean cross-entropy over
  masked tokens) and accuracy on a seeded 15 % masking of the texts
  (:func:`mask_tokens`); exact and approximated runs see the same masked input.

:func:`sparsity_accuracy_curve` runs a method over its grid (and layer
subsets, e.g. ``"all"`` against ``"later"`` as in Breaking BERT) and returns one
row per configuration, with the exact model (``method="exact"``, sparsity 0) and
the gold oracle (``method="gold"``: the gold graph itself, exact outputs at the
gold sparsity) as reference points.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sparsefinder.evaluation.approximate_inputs import (  # noqa: F401 - the inputs' names stay importable from here
    GOLD,
    MASK_RATE,
    Batch,
    GraphFn,
    is_masked_lm,
    layers_label,
    mask_tokens,
    method_graphs,
    parse_layers,
    prepare_batches,
)
from sparsefinder.graphs import AttentionGraph
from sparsefinder.kernels.entmax import entmax
from sparsefinder.metrics import graph_metrics
from sparsefinder.model import attention
from sparsefinder.predictors.base import REGISTRY, Predictor
from sparsefinder.predictors.methods import params_key

CURVE_COLUMNS: tuple[str, ...] = (
    "method", "params", "layers", "sparsity", "model_sparsity", "recall", "exact", "empty_rows",
    "cos_mean", "cos_min", "retrieval", "mlm_loss", "mlm_accuracy", "sentences", "seconds",
)
"""Columns of :func:`sparsity_accuracy_curve`'s table, in order."""

METRICS: tuple[str, ...] = ("cos_mean", "cos_min", "retrieval", "mlm_loss", "mlm_accuracy")
"""End-task metrics (the y axis of a sparsity–accuracy curve)."""


# ---------------------------------------------------------------------- end-task metrics


def embedding_cosines(exact: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """``(S,)`` cosine of each sentence's approximated embedding to its exact one."""
    if exact.shape != approx.shape:
        raise ValueError(f"embedding shapes differ: {tuple(exact.shape)} vs {tuple(approx.shape)}")
    return torch.nn.functional.cosine_similarity(exact.double(), approx.double(), dim=-1)


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """``(S,)`` index of each sentence's nearest other sentence by cosine (ties: the lowest index)."""
    if embeddings.shape[0] < 2:
        raise ValueError("nearest neighbours need at least two sentences")
    unit = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(dim=-1)


def retrieval_stability(exact: torch.Tensor, approx: torch.Tensor) -> float:
    """Share of sentences whose nearest neighbour among the others is unchanged by the approximation."""
    if exact.shape != approx.shape:
        raise ValueError(f"embedding shapes differ: {tuple(exact.shape)} vs {tuple(approx.shape)}")
    return float((nearest_neighbours(exact) == nearest_neighbours(approx)).double().mean())


# ---------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """What one (approximated or exact) pass over the batches produced, in the order of ``texts``.

    ``embeddings``: ``(S, D)`` mean-pooled last hidden states; ``mlm_*``:
    per-sentence sums of cross-entropy, correct predictions and masked tokens
    (None without an MLM head); ``graph``: ``{name: (S, L, H)}`` float64 per
    restricted layer (NaN elsewhere) for ``sparsity``, ``recall``, ``exact``,
    ``empty_rows`` and ``gold_sparsity`` (of the same scores).
    """

    embeddings: torch.Tensor
    mlm_loss: torch.Tensor | None
    mlm_correct: torch.Tensor | None
    mlm_count: torch.Tensor | None
    graph: dict[str, np.ndarray]
    layers: tuple[int, ...]
    seconds: float


GRAPH_STATS = ("sparsity", "recall", "exact", "empty_rows", "gold_sparsity")


def run_approximation(
    model, batches: Sequence[Batch], graphs: GraphFn | None, layers: Sequence[int] = (),
    progress: bool = False, desc: str | None = None,
) -> RunResult:
    """Run ``model`` on ``batches`` with entmax of ``layers`` restricted to ``graphs`` (None: exact run).

    Thread-safe: the restriction lives in a context variable of the calling thread.
    """
    t0 = time.perf_counter()
    layers = tuple(sorted(set(int(x) for x in layers))) if graphs is not None else ()
    num_sent = sum(len(b.sentence_ids) for b in batches)
    L, H = model.num_layers, model.num_heads
    stats = {s: np.full((num_sent, L, H), np.nan) for s in GRAPH_STATS}
    emb_rows: dict[int, torch.Tensor] = {}
    mlm = is_masked_lm(model) and batches[0].mlm_positions is not None
    mlm_loss = torch.zeros(num_sent, dtype=torch.float64) if mlm else None
    mlm_correct = torch.zeros(num_sent, dtype=torch.float64) if mlm else None
    mlm_count = torch.zeros(num_sent, dtype=torch.float64) if mlm else None
    restricted = set(layers)
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        sids = batch.sentence_ids.numpy()
        lengths = batch.lengths

        def hook(layer: int, query: torch.Tensor, key: torch.Tensor, scores: torch.Tensor,
                 batch: Batch = batch, sids: np.ndarray = sids, lengths: torch.Tensor = lengths):
            if layer not in restricted:
                return None
            alpha = attention.module_alpha(model.attention_modules[layer])
            gold = AttentionGraph(entmax(scores.detach(), alpha) > 0, lengths.to(scores.device), model.causal)
            if graphs is GOLD:
                pred = gold
            else:
                edges = graphs(layer, query.detach().float(), key.detach().float(), batch).to(scores.device)
                n = scores.shape[-1]
                pred = AttentionGraph(edges.expand(scores.shape[0], scores.shape[1], n, n),
                                      lengths.to(edges.device), model.causal)
            m = graph_metrics(gold, pred)
            real_q = pred.valid_queries()[:, 0, :, None]  # (B, N, 1)
            empty = (~pred.edges.any(dim=-1) & real_q[..., 0][:, None]).sum(-1).double()
            for name, value in (("sparsity", m["sparsity"]), ("recall", m["recall"]), ("exact", m["exact"]),
                                ("empty_rows", empty / lengths.clamp(min=1)[:, None].double()),
                                ("gold_sparsity", m["gold_sparsity"])):
                stats[name][sids, layer] = value.detach().cpu().numpy()
            # Padding queries keep every key (the model's own mask hides padding keys), so their
            # outputs equal the exact run's; only real queries are restricted.
            return pred.edges | ~real_q[:, None]

        with torch.inference_mode():
            if graphs is not None:
                with attention.restrict_support(hook):
                    out = model.model(**batch.inputs, output_hidden_states=mlm)
            else:
                out = model.model(**batch.inputs, output_hidden_states=mlm)
        hidden = out.hidden_states[-1] if mlm else out.last_hidden_state
        mask = batch.inputs["attention_mask"].to(hidden.dtype)[..., None]
        pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu()
        for b, s in enumerate(sids.tolist()):
            emb_rows[s] = pooled[b]
        if mlm:
            logits = out.logits.float().cpu()
            pos = batch.mlm_positions
            ce = torch.nn.functional.cross_entropy(logits[pos], batch.mlm_targets[pos], reduction="none").double()
            hit = (logits[pos].argmax(-1) == batch.mlm_targets[pos]).double()
            row = torch.nonzero(pos)[:, 0]
            sid_t = torch.as_tensor(sids)[row]
            mlm_loss.index_add_(0, sid_t, ce)
            mlm_correct.index_add_(0, sid_t, hit)
            mlm_count.index_add_(0, sid_t, torch.ones_like(ce))
    embeddings = torch.stack([emb_rows[s] for s in range(num_sent)])
    return RunResult(embeddings, mlm_loss, mlm_correct, mlm_count, stats, layers, time.perf_counter() - t0)


def _layer_mean(values: np.ndarray, layers: Sequence[int]) -> float:
    """Mean over sentences (ignoring NaN: empty gold rows, empty sentences), then over heads and layers."""
    if not layers:
        return float("nan")
    sub = values[:, list(layers)]
    with warnings.catch_warnings():  # all-NaN columns (no gold edge anywhere) are expected
        warnings.simplefilter("ignore", RuntimeWarning)
        per_head = np.nanmean(sub, axis=0)
    return float(np.nanmean(per_head)) if np.isfinite(per_head).any() else float("nan")


def summarise_run(run: RunResult, reference: RunResult, num_layers: int) -> dict[str, float]:
    """One curve row's numbers: graph statistics of ``run`` and its end-task metrics against ``reference``."""
    cos = embedding_cosines(reference.embeddings, run.embeddings)
    row = {
        "sparsity": _layer_mean(run.graph["sparsity"], run.layers) if run.layers else 0.0,
        "recall": _layer_mean(run.graph["recall"], run.layers) if run.layers else 1.0,
        "exact": _layer_mean(run.graph["exact"], run.layers) if run.layers else 1.0,
        "empty_rows": _layer_mean(run.graph["empty_rows"], run.layers) if run.layers else 0.0,
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "retrieval": retrieval_stability(reference.embeddings, run.embeddings)
        if len(cos) >= 2 else float("nan"),
        "mlm_loss": float("nan"),
        "mlm_accuracy": float("nan"),
        "sentences": int(len(cos)),
        "seconds": float(run.seconds),
    }
    row["model_sparsity"] = row["sparsity"] * len(run.layers) / num_layers
    if run.mlm_loss is not None:
        count = float(run.mlm_count.sum())
        row["mlm_loss"] = float(run.mlm_loss.sum()) / max(count, 1.0)
        row["mlm_accuracy"] = float(run.mlm_correct.sum()) / max(count, 1.0)
    return row


# ---------------------------------------------------------------------- curves


def sparsity_accuracy_curve(
    model,
    texts: Sequence[str],
    methods: str | Sequence[str],
    grids: Mapping[str, Sequence[Mapping[str, Any]]] | Sequence[Mapping[str, Any]] | None = None,
    layers: Sequence[str | Sequence[int]] = ("all",),
    projections: Any = None,
    fitted: Mapping | None = None,
    artifacts: Callable[[str], tuple[Any, Mapping | None]] | None = None,
    learned: Mapping[str, Mapping[str, Mapping[int, Predictor]]] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    references: bool = True,
    progress: bool = False,
    batches: Sequence[Batch] | None = None,
) -> pd.DataFrame:
    """Sparsity against end-task accuracy of every configuration on ``texts`` (module docstring).

    ``methods``: registered predictor names; ``grids``: a list of grid points
    (one method) or ``{method: [point, ...]}`` (default: each method's own
    :meth:`~sparsefinder.predictors.base.Predictor.grid`); ``layers``: layer
    subsets (:func:`parse_layers`), each run separately; ``learned``:
    ``{method: {params: {layer: Predictor}}}`` of already fitted predictors run
    as given (e.g. learned windows), each on the layer subset it was learned for;
    ``artifacts``: ``method -> (projections, fitted)`` when methods run with different
    artifacts (:meth:`sparsefinder.results.ResultArtifacts.for_method`), else ``projections``
    and ``fitted`` serve every method; ``references``: add the ``exact`` and ``gold`` rows. Returns
    :data:`CURVE_COLUMNS` (``params`` as canonical JSON), provenance in
    ``frame.attrs["curves"]``.
    """
    t0 = time.perf_counter()
    methods = [methods] if isinstance(methods, str) else list(methods)
    if grids is None:
        grids = {}
    elif not isinstance(grids, Mapping):
        if len(methods) != 1:
            raise ValueError("a list of grid points needs exactly one method; give {method: points} otherwise")
        grids = {methods[0]: list(grids)}
    learned = dict(learned or {})
    for m in methods:
        if m not in REGISTRY and m not in learned:
            raise KeyError(f"unknown predictor {m!r}; known: {list(REGISTRY)} and learned {list(learned)}")
    L = model.num_layers
    subsets = [(layers_label(s, L), parse_layers(s, L)) for s in layers]
    if batches is None:
        need = {c for m in methods if m in REGISTRY for c in REGISTRY[m].context_keys}
        batches = prepare_batches(model, texts, batch_size, seed, syntax="word_heads" in need,
                                  lexical="embeddings" in need)
    configs: list[tuple[str, str, str, tuple[int, ...], GraphFn]] = []
    for m in methods:
        if m in learned:
            for key, by_layer in learned[m].items():
                for label, subset in subsets:
                    if set(subset) != set(by_layer):
                        continue  # learned jointly for another set of layers
                    configs.append((m, params_key(key), label, subset,
                                    method_graphs(m, predictors=by_layer, causal=model.causal)))
            continue
        points = grids.get(m, REGISTRY[m].grid())
        for point in points:
            proj, fit = artifacts(m) if artifacts is not None else (projections, fitted)
            fn = method_graphs(m, point, proj, fit, causal=model.causal)
            for label, subset in subsets:
                configs.append((m, params_key(point), label, subset, fn))
    reference = run_approximation(model, batches, None, progress=progress, desc="exact")
    rows = []
    if references:
        rows.append({"method": "exact", "params": "{}", "layers": "none",
                     **summarise_run(reference, reference, L)})
        for label, subset in subsets:
            run = run_approximation(model, batches, GOLD, subset, progress=progress,
                                    desc=f"gold {label}")
            rows.append({"method": "gold", "params": "{}", "layers": label, **summarise_run(run, reference, L)})
    bar = tqdm(configs, desc="configurations", disable=not progress)
    for m, key, label, subset, fn in bar:
        bar.set_postfix_str(f"{m} {key} {label}")
        run = run_approximation(model, batches, fn, subset)
        rows.append({"method": m, "params": key, "layers": label, **summarise_run(run, reference, L)})
    frame = pd.DataFrame(rows, columns=list(CURVE_COLUMNS))
    frame.attrs["curves"] = {
        "model": model.name, "num_layers": L, "num_heads": model.num_heads, "sentences": len(texts),
        "masked_lm": reference.mlm_loss is not None, "mask_rate": MASK_RATE, "seed": seed,
        "layers": {label: list(subset) for label, subset in subsets}, "seconds": time.perf_counter() - t0,
    }
    return frame


# ---------------------------------------------------------------------- persistence


def save_curves(frame: pd.DataFrame, path, manifest: Mapping[str, Any] | None = None):
    """Write the table as Parquet and a JSON sidecar (``frame.attrs["curves"]`` plus ``manifest``)."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    info = {**frame.attrs.get("curves", {}), **dict(manifest or {})}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def load_curves(path) -> pd.DataFrame:
    """Inverse of :func:`save_curves` (provenance back in ``attrs["curves"]``)."""
    from pathlib import Path

    path = Path(path)
    frame = pd.read_parquet(path)
    missing = set(CURVE_COLUMNS) - set(frame.columns)
    if missing:
        raise ValueError(f"{path} is not a curves table: it lacks {sorted(missing)}")
    side = path.with_suffix(".json")
    if side.is_file():
        frame.attrs["curves"] = json.loads(side.read_text(encoding="utf-8"))
    return frame


# ---------------------------------------------------------------------- grids

DEFAULT_METHODS: tuple[str, ...] = (
    "distance", "kmeans", "bucketing", "position", "random", "syntax",
    "stacked", "cascade", "distance_budget", "global_band",
)
"""The CLI's default methods: the Sparsefinder predictors, Breaking BERT's fixed masks and the learned
predictors (issue #7; each with the artifacts :meth:`~sparsefinder.results.ResultArtifacts.for_method`
gives it, skipped where the model ships none)."""


def thin_grid(points: Sequence[Mapping[str, Any]], k: int | None) -> list[dict[str, Any]]:
    """At most ``k`` grid points, evenly spaced over ``points`` (first and last kept); all when ``k`` is None."""
    points = [dict(p) for p in points]
    if k is None or k >= len(points):
        return points
    if k < 1:
        raise ValueError(f"points per method must be >= 1, got {k}")
    if k == 1:
        return [points[len(points) // 2]]
    idx = sorted({int(round(x)) for x in np.linspace(0, len(points) - 1, k)})
    return [points[i] for i in idx]


def target_grids(methods: Sequence[str], sparsities: Sequence[float]) -> dict[str, list[dict[str, Any]]]:
    """``{method: [{"sparsity": s}, ...]}`` for the ``methods`` whose target sparsity is a prediction-time knob.

    Those are the learned predictors (``sparsity`` in
    :attr:`~sparsefinder.predictors.base.Predictor.predict_only_params`): their fitted state holds each head's
    training curve, so any target runs from it (:func:`sparsefinder.predictors.methods.fitted_predictor`),
    not only the grid they were fitted at. Fixed masks with a ``sparsity`` (random, lexical) are left out:
    their grid is their own.
    """
    bad = [s for s in sparsities if not 0.0 <= float(s) <= 1.0]
    if bad or not sparsities:
        raise ValueError(f"target sparsities must be numbers in [0, 1], got {list(sparsities)}")
    points = [{"sparsity": float(s)} for s in dict.fromkeys(float(s) for s in sparsities)]
    return {m: [dict(p) for p in points] for m in methods
            if m in REGISTRY and "sparsity" in REGISTRY[m].predict_only_params}


def drop_below(frame: pd.DataFrame, level: float = 0.99, metric: str = "cos_mean", x: str = "sparsity",
               ) -> pd.DataFrame:
    """Per (method, layers): where ``metric`` first falls below ``level`` as ``x`` grows.

    The configurations are taken in order of ``x`` and joined by straight lines. ``last_above``: the largest
    ``x`` measured before the first configuration below ``level`` (NaN when the first one already is);
    ``drops_at``: the ``x`` where the line from that configuration to the next one crosses ``level``
    (linear interpolation between two grid points, not a measurement; NaN when no configuration falls
    below). Reference rows (exact, gold) are left out.
    """
    rows = frame[~frame["method"].isin(("exact", "gold")) & frame[metric].notna()]
    out = {}
    for (method, layers), group in rows.groupby(["method", "layers"], sort=False):
        g = group.sort_values(x, kind="stable")
        xs, ys = g[x].to_numpy(float), g[metric].to_numpy(float)
        below = np.flatnonzero(ys < level)
        if below.size == 0:
            out[(method, layers)] = {"last_above": float(xs[-1]), "drops_at": float("nan")}
        elif below[0] == 0:
            out[(method, layers)] = {"last_above": float("nan"), "drops_at": float("nan")}
        else:
            i = int(below[0])
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            at = x0 + (y0 - level) / (y0 - y1) * (x1 - x0)
            out[(method, layers)] = {"last_above": float(x0), "drops_at": float(at)}
    table = pd.DataFrame.from_dict(out, orient="index", columns=["last_above", "drops_at"])
    table.index = pd.MultiIndex.from_tuples(table.index, names=["method", "layers"])
    return table


def best_at(frame: pd.DataFrame, metric: str = "cos_mean", levels: Sequence[float] = (0.5, 0.7, 0.78),
            x: str = "sparsity", higher_is_better: bool = True) -> pd.DataFrame:
    """Per (method, layers): the best ``metric`` among configurations with ``x`` ≥ each level (NaN: none that sparse).

    A configuration within 5e-4 below a level counts as reaching it (masks built to a target
    sparsity round each sentence's edge count). Reference rows (exact, gold) are left out.
    """
    rows = frame[~frame["method"].isin(("exact", "gold")) & frame[metric].notna()]
    out = {}
    for (method, layers), group in rows.groupby(["method", "layers"], sort=False):
        cells = {}
        for level in levels:
            ok = group[group[x] >= level - 5e-4]
            if ok.empty:
                cells[f"{x} >= {level:g}"] = float("nan")
            else:
                cells[f"{x} >= {level:g}"] = float(ok[metric].max() if higher_is_better else ok[metric].min())
        out[(method, layers)] = cells
    table = pd.DataFrame.from_dict(out, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["method", "layers"])
    return table
