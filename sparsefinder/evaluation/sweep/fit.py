"""Fitting: one fit per (method, fit-relevant parameters, layer) on the training split."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.evaluation.sweep.configs import (
    _check_projections,
    _config_params,
    _digest,
    _param_names,
    _project,
    _store_info,
    _uses_projection,
    canonical_params,
)
from sparsefinder.graphs import AttentionGraph
from sparsefinder.predictors.base import REGISTRY, Predictor, get_predictor


class FittedPredictors(dict):
    """``{method: {params: {layer: fitted predictor}}}`` from :func:`fit_predictors`, with ``info`` (provenance)."""

    info: dict[str, Any]

    def __init__(self, *args: Any, info: dict[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.info = dict(info or {})


def _fit_signature(method: str, params: Mapping[str, Any]) -> str:
    skip = {"window", "global_tokens"} | REGISTRY[method].predict_only_params
    return canonical_params({k: v for k, v in params.items() if k not in skip})


def _pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    n = max(p.shape[2] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0, 0, n - p.shape[2])) for p in parts])


def fit_predictors(
    store: ExtractionStore,
    projections: Any | None,
    methods: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    max_points: int | None = 100_000,
    grids: Mapping[str, list[dict[str, Any]]] | None = None,
    batch_size: int = 32,
    indices: Sequence[int] | None = None,
    progress: bool = False,
) -> FittedPredictors:
    """Fit the learning predictors (k-means, blocks, Routing) of every grid point, per layer, on a training store.

    For each layer, the (projected, or raw for ``"any"`` methods without
    projections) queries and keys of the store's sentences (``indices``, default
    all) are streamed once and concatenated; each distinct fit is made once
    (grid points that differ only in :attr:`~sparsefinder.predictors.base.Predictor.predict_only_params`, ``window`` or
    ``global_tokens`` share it). ``seed`` and ``max_points`` (the subsample per
    head) are passed to methods that take them, unless a grid point sets them.
    Methods with ``fit_uses_gold`` (the learned predictors of
    :mod:`sparsefinder.predictors.learned.core`) also get the padded gold graphs
    (``gold=``) and the sentences' token strings (``tokens=``).
    Returns ``fitted[method][canonical_params(point)][layer]``, for :func:`run_sweep`.
    """
    t0 = time.perf_counter()
    if methods is None:
        methods = [m for m, cls in REGISTRY.items() if cls.requires_fit and cls.default_sweep
                   and (projections is not None or not cls.needs_projections())]
    for m in methods:
        if m not in REGISTRY:
            raise KeyError(f"unknown predictor {m!r}")
        if REGISTRY[m].needs_projections() and projections is None:
            raise ValueError(f"{m} works on projected queries and keys: give projections")
    _check_projections(projections, store)
    grids = dict(grids or {})
    layer_ids = [store._layer_index(x) for x in (range(store.num_layers) if layers is None else layers)]
    todo = [m for m in methods if REGISTRY[m].requires_fit]
    out = FittedPredictors(info={
        "store": _store_info(store),
        "sentences": len(store) if indices is None else len(indices),
        "indices_sha256": None if indices is None else _digest(indices),
        "seed": seed,
        "max_points": max_points,
        "layers": layer_ids,
    })
    for m in todo:
        out[m] = {}
    # Seconds spent in each method's fits (all layers), and in streaming/projecting the store.
    by_method = dict.fromkeys(todo, 0.0) | {"(load)": 0.0}
    bar = tqdm(total=len(layer_ids), desc="fit", disable=not progress, dynamic_ncols=True)
    for layer in layer_ids:
        t_load = time.perf_counter()
        raw_q, raw_k, proj_q, proj_k, lens = [], [], [], [], []
        golds: list[torch.Tensor] = []
        tokens: list[list[str]] = []
        need_raw = any(not _uses_projection(REGISTRY[m], projections) for m in todo)
        # Learned predictors (sparsefinder.predictors.learned.core) fit on the gold graphs and token strings.
        need_gold = any(REGISTRY[m].fit_uses_gold for m in todo)
        for batch in store.iter_batches(layer, batch_size, indices=indices, order="length"):
            lens.append(batch.lengths)
            if need_gold:
                golds.append(batch.gold.edges)
                tokens.extend(batch.tokens)
            if need_raw:
                raw_q.append(batch.queries)
                raw_k.append(batch.keys)
            if projections is not None:
                qp, kp = _project(projections, layer, batch.queries, batch.keys)
                proj_q.append(qp)
                proj_k.append(kp)
        lengths = torch.cat(lens)
        gold_kw: dict[str, Any] = {}
        if need_gold:
            n_max = max(g.shape[-1] for g in golds)
            edges = torch.cat([torch.nn.functional.pad(g, (0, n_max - g.shape[-1], 0, n_max - g.shape[-1]))
                               for g in golds])
            gold_kw = {"gold": AttentionGraph(edges, lengths, store.causal), "tokens": tokens}
        data = {}
        if need_raw:
            data["raw"] = (_pad_cat(raw_q), _pad_cat(raw_k))
        if projections is not None:
            data["projected"] = (_pad_cat(proj_q), _pad_cat(proj_k))
        by_method["(load)"] += time.perf_counter() - t_load
        for m in todo:
            t_m = time.perf_counter()
            cls = REGISTRY[m]
            q, k = data["projected" if _uses_projection(cls, projections) else "raw"]
            cache: dict[str, Predictor] = {}
            names = set(_param_names(cls))
            extra = {"max_points": max_points} if "max_points" in names else {}
            points = [(point, _config_params(m, point, seed, extra)) for point in grids.get(m) or cls.grid()]
            for _, params in points:
                sig = _fit_signature(m, params)
                if sig not in cache:
                    cache[sig] = get_predictor(m, **params)
            # All distinct fits of the method at once: the centroid methods share the pooling, seeding and
            # passes over every n_clusters (CentroidPredictor.fit_many); each ends as its own fit would.
            cls.fit_many(list(cache.values()), q, k, lengths, **(gold_kw if cls.fit_uses_gold else {}))
            for point, params in points:
                sig = _fit_signature(m, params)
                pred = get_predictor(m, **params).load_state_dict(cache[sig].state_dict())
                # Share the fitted tensors themselves, so run_sweep sees one fit for the whole group.
                for attr in cls.fitted_tensors:
                    setattr(pred, attr, getattr(cache[sig], attr))
                out[m].setdefault(canonical_params(point), {})[layer] = pred
            by_method[m] += time.perf_counter() - t_m
        bar.update(1)
    bar.close()
    out.info["seconds"] = round(time.perf_counter() - t0, 3)
    out.info["seconds_by_method"] = {m: round(v, 3) for m, v in by_method.items()}
    return out
