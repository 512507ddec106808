"""The sweep itself: stream the store, score every configuration, aggregate."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

# Imported for what they register: the fast paths (batch.NESTED, batch.SHARED_DENSE, batch.GROUPED).
import sparsefinder.evaluation.sweep.dense  # noqa: F401
import sparsefinder.evaluation.sweep.learned  # noqa: F401
import sparsefinder.evaluation.sweep.nested  # noqa: F401
import sparsefinder.evaluation.sweep.pages  # noqa: F401
from sparsefinder import __version__
from sparsefinder.corpora.context import ContextProvider
from sparsefinder.corpora.store import ExtractionStore, StoredBatch
from sparsefinder.evaluation.sweep.batch import _COUNT_KEYS, _FLOAT_KEYS, Counts, _Batch
from sparsefinder.evaluation.sweep.configs import (
    SENTENCE_COLUMNS,
    SWEEP_COLUMNS,
    SWEEP_FORMAT,
    SWEEP_FORMAT_VERSION,
    _check_projections,
    _Config,
    _digest,
    _project,
    _projection_info,
    _store_info,
    _uses_projection,
)
from sparsefinder.evaluation.sweep.plan import _build_configs, _plan, _select_methods
from sparsefinder.metrics import CONFIG_COLUMNS, COUNT_COLUMNS, FLOAT_COUNT_COLUMNS, RATIO_COLUMNS, _torch_ratios
from sparsefinder.predictors.base import REGISTRY, Predictor


def run_sweep(
    store: ExtractionStore,
    projections: Any | None = None,
    methods: Sequence[str] | None = None,
    grids: Mapping[str, list[dict[str, Any]]] | None = None,
    layers: Sequence[int] | None = None,
    fitted: Mapping[str, Mapping[str, Mapping[int, Predictor]]] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    per_sentence: bool = False,
    context: ContextProvider | None = None,
    device: str | torch.device | None = None,
    threads: int | None = None,
    mass: bool = True,
) -> pd.DataFrame:
    """Score every configuration on every layer and head of ``store`` (see the module docstring).

    ``projections``: an object with ``project_queries(layer, q)`` /
    ``project_keys(layer, k)`` (``(B, H, N, d) -> (B, H, N, r)``), e.g.
    :class:`sparsefinder.training.projections.Projections`; ``methods``: names (default:
    every runnable one); ``grids``: ``{method: [grid point, ...]}`` overriding a
    method's :meth:`grid`; ``layers``: default all; ``fitted``: from
    :func:`fit_predictors` (same grids); ``seed``: for stochastic predictors;
    ``indices``: only these sentences of the store; ``per_sentence``: one row per
    sentence instead of the macro means; ``context``: a :class:`ContextProvider`
    for syntax/lexical; ``threads``: torch's intra-op threads during the sweep
    (restored afterwards; default: unchanged). The tensors of one batch are
    small (about a million elements), so extra threads gain little, and on a
    machine whose cores are busy with other work OpenMP threads wait on each
    other for whole scheduler slices: ``threads=1`` is then many times faster.
    ``mass``: also score mass recall, with the gold probabilities recomputed from the
    stored q and k (:meth:`ExtractionStore.gold_probabilities`); ``False`` leaves the
    mass columns NaN. Where the recomputed supports disagree with the stored gold
    graphs on more than :data:`MASS_MISMATCH_LIMIT` of the gold edges (a store
    whose scaling was not recorded and is not :math:`d^{-1/2}`), the mass columns are
    NaN too, and ``attrs["sweep"]["mass"]`` says why.
    Returns the table, with provenance in ``frame.attrs["sweep"]``.
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_projections(projections, store)
    context_keys = set(context.keys) if context is not None else set()
    chosen, skipped = _select_methods(methods, projections, fitted, context_keys)
    grids = dict(grids or {})
    unknown = set(grids) - set(REGISTRY)
    if unknown:
        raise KeyError(f"grids for unknown predictors {sorted(unknown)}")
    layer_ids = [store._layer_index(x) for x in (range(store.num_layers) if layers is None else layers)]
    if not layer_ids:
        raise ValueError("no layers to sweep")
    configs = _build_configs(chosen, grids, fitted, layer_ids, seed)
    units = _plan(configs)
    n_cfg, n_layers, heads = len(configs), len(layer_ids), store.num_heads

    ratio_sum = torch.zeros(n_cfg, n_layers, heads, len(RATIO_COLUMNS), dtype=torch.float64)
    count_sum = torch.zeros(n_cfg, n_layers, heads, len(COUNT_COLUMNS), dtype=torch.float64)
    sentences = torch.zeros(n_cfg, n_layers, heads, dtype=torch.int64)
    rows: list[tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray]] = []

    subset = None if indices is None else [int(i) for i in indices]
    n_sent = len(store) if subset is None else len(subset)
    need_projection = projections is not None and any(_uses_projection(REGISTRY[c.method], projections)
                                                      for c in configs)
    # One batch of sentences holds every layer, so what does not depend on the layer (random draws,
    # fixed patterns) is computed once per batch; memory still holds one batch, never the corpus.
    all_layers = n_layers > 1
    batches = store.iter_batches(None if all_layers else layer_ids[0], batch_size, indices=subset, order="length",
                                 device=device)
    bar = tqdm(total=n_layers * math.ceil(n_sent / batch_size), desc="sweep", unit="layer-batch",
               disable=not progress, dynamic_ncols=True)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    unit_index = [torch.tensor([c.index for c in unit.configs]) for unit in units]
    all_index = torch.arange(n_cfg)
    # Wall time per part (reading batches and projecting, each method's scoring, accumulating), for the record.
    timing: dict[str, float] = {"read+project": 0.0, **{m: 0.0 for m in chosen}, "accumulate": 0.0}
    clock = time.perf_counter
    mismatched = gold_total = 0
    try:
        with torch.no_grad():
            t = clock()
            for sb in batches:
                shared: dict[Any, Any] = {}
                first = sb.layer(layer_ids[0]) if isinstance(sb, StoredBatch) else sb
                extra_context = dict(context(first)) if context is not None else {}
                for li, layer in enumerate(layer_ids):
                    lb = sb.layer(layer) if isinstance(sb, StoredBatch) else sb
                    proj_q = proj_k = None
                    if need_projection:
                        proj_q, proj_k = _project(projections, layer, lb.queries, lb.keys)
                    probs = None
                    if mass:
                        probs, bad = store.gold_probabilities(lb)
                        mismatched += bad
                        gold_total += int(lb.gold.edges.sum())
                    batch = _Batch(
                        layer=layer, lengths=lb.lengths.long(), causal=lb.causal, gold=lb.gold.edges,
                        raw_q=lb.queries, raw_k=lb.keys, proj_q=proj_q, proj_k=proj_k, head_dim=store.head_dim,
                        sentence_ids=lb.indices, context=extra_context, shared=shared, window=lb.gold.window,
                        probs=probs,
                    )
                    timing["read+project"] += clock() - t
                    b, h, _ = batch.shape
                    # Every configuration's counts of this batch and layer, scored in one vectorised step.
                    found: Counts = {key: torch.empty(n_cfg, b, h, dtype=torch.float64 if key in _FLOAT_KEYS else
                                                      torch.int64, device=batch.lengths.device)
                                     for key in _COUNT_KEYS}
                    for unit, idx in zip(units, unit_index, strict=True):
                        idx = idx.to(batch.lengths.device)
                        t = clock()
                        counts = unit.run(batch)
                        for key in _COUNT_KEYS:
                            found[key][idx] = torch.broadcast_to(counts[key], (len(idx), b, h)).to(found[key].dtype)
                        timing[unit.configs[0].method] += clock() - t
                    t = clock()
                    _accumulate(found, batch, all_index, li, ratio_sum, count_sum, sentences,
                                rows if per_sentence else None, lb.indices)
                    timing["accumulate"] += clock() - t
                    bar.update(1)
                    t = clock()
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
        bar.close()

    if per_sentence:
        frame = _sentence_frame(rows, configs, layer_ids)
    else:
        frame = _aggregate_frame(configs, layer_ids, heads, ratio_sum, count_sum, sentences)
    mass_info = _mass_info(store, mass, mismatched, gold_total)
    if not mass_info["scored"]:
        frame[["mass_recall", "gold_mass", "mass_hits"]] = float("nan")
    frame.attrs["sweep"] = {
        "format": SWEEP_FORMAT,
        "format_version": SWEEP_FORMAT_VERSION,
        "per_sentence": per_sentence,
        "store": _store_info(store),
        "projections": _projection_info(projections),
        "fitted": getattr(fitted, "info", None) if fitted else None,
        "methods": chosen,
        "skipped": skipped,
        "configurations": {m: {c.key: c.predictor.get_params() for c in configs if c.method == m} for m in chosen},
        "layers": layer_ids,
        "sentences": n_sent,
        "indices_sha256": None if subset is None else _digest(subset),
        "seed": seed,
        "batch_size": batch_size,
        "seconds": round(time.perf_counter() - t0, 3),
        "seconds_by_part": {k: round(v, 3) for k, v in timing.items()},
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "mass": mass_info,
        "sparsefinder_version": __version__,
    }
    return frame


MASS_MISMATCH_LIMIT = 1e-3
"""Largest share of gold edges whose recomputed support may differ from the stored one (ties at the
threshold, float16 stores) before mass recall is withheld as untrustworthy."""


def _mass_info(store: ExtractionStore, wanted: bool, mismatched: int, gold_total: int) -> dict[str, Any]:
    share = mismatched / gold_total if gold_total else 0.0
    info: dict[str, Any] = {"scored": wanted, "support_mismatch": share,
                            "scaling": "recorded" if store.score_settings(0)["recorded"] else "assumed d^-1/2"}
    if wanted and share > MASS_MISMATCH_LIMIT:
        info.update(scored=False, reason=f"the probabilities recomputed from the stored q and k disagree with the "
                                         f"stored gold graphs on {share:.2%} of the gold edges")
    return info


def _accumulate(
    counts: Counts, batch: _Batch, idx: torch.Tensor, li: int, ratio_sum: torch.Tensor, count_sum: torch.Tensor,
    sentences: torch.Tensor, rows: list | None, sentence_ids: torch.Tensor,
) -> None:
    c = idx.shape[0]
    b, h, _ = batch.shape
    full = {
        "gold_edges": batch.gold_edges, "pred_edges": counts["pred_edges"], "hits": counts["hits"],
        "valid_pairs": batch.valid_pairs, "valid_queries": batch.valid_queries,
        "covered_queries": counts["covered_queries"], "cost": counts["cost"],
        "gold_mass": batch.gold_mass, "mass_hits": counts["mass_hits"],
    }
    full = {k: torch.broadcast_to(v, (c, b, h)).cpu() for k, v in full.items()}
    ratios = _torch_ratios(**full)
    r = torch.stack([ratios[name] for name in RATIO_COLUMNS], dim=-1)  # (C, B, H, ratios)
    cnt = torch.stack([full[name].double() for name in COUNT_COLUMNS], dim=-1)  # (C, B, H, counts)
    has_pairs = full["valid_pairs"] > 0  # a sentence without pairs has NaN ratios and drops out of the means
    ratio_sum[idx, li] += torch.where(has_pairs[..., None], r, 0.0).sum(dim=1)
    count_sum[idx, li] += cnt.sum(dim=1)
    sentences[idx, li] += has_pairs.sum(dim=1)
    if rows is not None:
        rows.append((idx.numpy(), li, sentence_ids.cpu().numpy(), r.numpy(), cnt.numpy()))


def _config_columns(configs: list[_Config]) -> dict[str, np.ndarray]:
    return {
        "method": np.array([c.method for c in configs], dtype=object),
        "family": np.array([REGISTRY[c.method].family for c in configs], dtype=object),
        "params": np.array([c.key for c in configs], dtype=object),
    }


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for col in COUNT_COLUMNS:
        if col not in FLOAT_COUNT_COLUMNS:
            frame[col] = frame[col].round().astype(np.int64)
    for col in CONFIG_COLUMNS:
        frame[col] = frame[col].astype(str)
    return frame


def _aggregate_frame(
    configs: list[_Config], layer_ids: list[int], heads: int, ratio_sum: torch.Tensor, count_sum: torch.Tensor,
    sentences: torch.Tensor,
) -> pd.DataFrame:
    n_cfg, n_layers = len(configs), len(layer_ids)
    per = n_layers * heads
    cols: dict[str, Any] = {k: np.repeat(v, per) for k, v in _config_columns(configs).items()}
    cols["layer"] = np.tile(np.repeat(np.asarray(layer_ids, dtype=np.int64), heads), n_cfg)
    cols["head"] = np.tile(np.arange(heads, dtype=np.int64), n_cfg * n_layers)
    n = sentences.reshape(-1).double()
    means = ratio_sum.reshape(-1, len(RATIO_COLUMNS)) / n[:, None]
    means[n == 0] = float("nan")
    for i, name in enumerate(RATIO_COLUMNS):
        cols[name] = means[:, i].numpy()
    cols["sentences"] = sentences.reshape(-1).numpy()
    sums = count_sum.reshape(-1, len(COUNT_COLUMNS))
    for i, name in enumerate(COUNT_COLUMNS):
        cols[name] = sums[:, i].numpy()
    frame = pd.DataFrame(cols, columns=list(SWEEP_COLUMNS))
    return _typed(frame)


def _sentence_frame(rows: list, configs: list[_Config], layer_ids: list[int]) -> pd.DataFrame:
    if not rows:
        return _typed(pd.DataFrame({c: [] for c in SENTENCE_COLUMNS}))
    parts = []
    names = _config_columns(configs)
    for idx, li, ids, r, cnt in rows:
        c, b, h, _ = r.shape
        cols: dict[str, Any] = {k: np.repeat(v[idx], b * h) for k, v in names.items()}
        cols["sentence"] = np.tile(np.repeat(ids.astype(np.int64), h), c)
        cols["layer"] = np.full(c * b * h, layer_ids[li], dtype=np.int64)
        cols["head"] = np.tile(np.arange(h, dtype=np.int64), c * b)
        cols["_config"] = np.repeat(idx, b * h)
        for i, name in enumerate(RATIO_COLUMNS):
            cols[name] = r[..., i].reshape(-1)
        for i, name in enumerate(COUNT_COLUMNS):
            cols[name] = cnt[..., i].reshape(-1)
        parts.append(pd.DataFrame(cols))
    frame = pd.concat(parts, ignore_index=True)
    frame = frame.sort_values(["_config", "sentence", "layer", "head"], kind="stable").drop(columns="_config")
    return _typed(frame.reset_index(drop=True)[list(SENTENCE_COLUMNS)])
