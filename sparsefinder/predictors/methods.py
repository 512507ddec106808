"""Predict one layer's attention graph for an extraction with a configuration from the sweep.

The dashboard (and scripts) use :func:`predict_layer` to show what a sweep
configuration (``method`` + canonical ``params`` JSON) predicts on new text:

- methods on the ``"projected"`` input space (and ``"any"`` when projections
  are given, as in the sweep) get the learned projections of the queries/keys;
- methods that learn (k-means, blocks, Routing) use the shipped fitted
  predictor of that configuration and layer;
- the sweep-supplied context (``head_dim``, ``sentence_ids``) is filled in;
  methods that need other context (syntax, lexical) raise
  :class:`UnsupportedMethodError`.

No Streamlit here.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import torch

from sparsefinder.graphs import AttentionGraph
from sparsefinder.predictors.base import REGISTRY, get_predictor

#: Context the helper can supply itself (``match`` is optional for random).
SUPPLIED = frozenset({"head_dim", "sentence_ids", "match", "tokens"})


class UnsupportedMethodError(ValueError):
    """The method cannot be run here (missing projections, fitted state or context)."""


def parse_params(params: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if params is None:
        return {}
    if isinstance(params, str):
        return dict(json.loads(params)) if params.strip() else {}
    return dict(params)


def params_key(params: str | Mapping[str, Any] | None) -> str:
    """Canonical JSON of a grid point (the sweep table's and the fitted files' ``params``)."""
    return json.dumps(parse_params(params), sort_keys=True, separators=(",", ":"))


def unsupported_reason(method: str, projections: Any = None, fitted: Mapping | None = None) -> str | None:
    """Why ``method`` cannot be predicted on new text with these artifacts, or None when it can."""
    if method not in REGISTRY:
        return f"unknown method {method!r}"
    cls = REGISTRY[method]
    missing = set(cls.context_keys) - SUPPLIED
    if missing:
        return f"{method} needs context {sorted(missing)} that the dashboard does not compute"
    if cls.needs_projections() and projections is None:
        return f"{method} needs the learned projections, and this model has none"
    if cls.requires_fit and not (fitted and method in fitted):
        return f"{method} must be fitted, and this model ships no fitted {method}"
    return None


def predictable_methods(projections: Any = None, fitted: Mapping | None = None) -> list[str]:
    """Registered methods :func:`predict_layer` can run with these artifacts."""
    return [m for m in REGISTRY if unsupported_reason(m, projections, fitted) is None]


def fitted_predictor(fitted: Mapping, method: str, params: str | Mapping[str, Any] | None, layer: int):
    """``fitted[method][params][layer]``, with ``params`` matched by its canonical JSON (:func:`params_key`).

    Files from the CLI sweep and the bench are keyed canonically; a hand-made or older file may use
    ``json.dumps`` spacing, which names the same grid point. Raises ``KeyError`` when there is none.
    """
    by_params = fitted[method]
    key = params_key(params)
    if key in by_params:
        return by_params[key][int(layer)]
    for k, by_layer in by_params.items():
        if params_key(k) == key:
            return by_layer[int(layer)]
    # A point the file does not hold may still share a stored point's fit: the learned predictors'
    # target sparsity only picks thresholds on the fitted curves (predict_only_params), so any
    # target in [0, 1] runs from the fit stored for another target (the sweep fits once per layer).
    wanted = parse_params(params)
    for k, by_layer in by_params.items():
        if fit_signature(method, parse_params(k)) == fit_signature(method, wanted):
            stored = by_layer[int(layer)]
            changed = {n: v for n, v in wanted.items() if n in REGISTRY[method].predict_only_params}
            # A shallow copy shares the fitted tensors (read only) and leaves the stored predictor as it was.
            return copy.copy(stored).set_params(**changed)
    raise KeyError(key)


def fit_signature(method: str, params: Mapping[str, Any]) -> str:
    """The part of a grid point its fit depends on: ``params`` without the method's
    :attr:`~sparsefinder.predictors.base.Predictor.predict_only_params` (points with equal
    signatures share one fit, as :func:`sparsefinder.evaluation.sweep.fit_predictors` fits them).
    ``window`` and ``global_tokens`` change prediction, not the fitted state, so they are part of
    the signature here: a stored point is only reused for a target that differs in a predict-only
    parameter, never in what the graph keeps besides it.
    """
    skip = REGISTRY[method].predict_only_params
    return params_key({k: v for k, v in params.items() if k not in skip})


def predict_layer(
    extraction,
    layer: int,
    method: str,
    params: str | Mapping[str, Any] | None = None,
    projections: Any = None,
    fitted: Mapping | None = None,
    sentence_ids: torch.Tensor | None = None,
) -> AttentionGraph:
    """The graph ``method`` with ``params`` predicts for every head of ``layer`` of ``extraction``.

    ``extraction``: a :class:`~sparsefinder.model.entmax_model.Extraction` (queries/keys ``(B, H, N, d)``).
    ``fitted``: ``fitted[method][params JSON][layer] -> Predictor`` (:func:`~.evaluation.fitted.load_fitted`).
    ``sentence_ids`` (stochastic methods' per-sentence draws) default to ``0 .. B-1``.
    """
    reason = unsupported_reason(method, projections, fitted)
    if reason is not None:
        raise UnsupportedMethodError(reason)
    cls = REGISTRY[method]
    key = params_key(params)
    if cls.requires_fit:
        try:
            pred = fitted_predictor(fitted, method, key, layer)
        except KeyError as e:
            raise UnsupportedMethodError(f"no fitted {method} {key} for layer {layer}") from e
    else:
        pred = get_predictor(method, **parse_params(params))
    q = extraction.queries[layer].float()
    k = extraction.keys[layer].float()
    if cls.reads_projections(projections is not None):
        with torch.no_grad():
            q = projections.project_queries(layer, q).float().contiguous()
            k = projections.project_keys(layer, k).float().contiguous()
    lengths = extraction.lengths
    if sentence_ids is None:
        sentence_ids = torch.arange(len(lengths))
    context = {"head_dim": int(extraction.queries[layer].shape[-1]), "sentence_ids": sentence_ids}
    tokens = getattr(extraction, "tokens", None)  # a live run (evaluation.approximate) passes its batch's tokens
    if tokens is not None:
        context["tokens"] = [list(t) for t in tokens]
    context = {c: v for c, v in context.items() if c in cls.context_keys}
    with torch.no_grad():
        return pred.predict(q, k, lengths, causal=extraction.causal, **context)
