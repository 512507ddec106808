"""Configurations of a sweep: table columns, grid points, projections and the inputs of a method."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sparsefinder.metrics import CONFIG_COLUMNS, COUNT_COLUMNS, RATIO_COLUMNS
from sparsefinder.predictors.base import REGISTRY, Predictor

if TYPE_CHECKING:
    from sparsefinder.corpora.store import ExtractionStore

SWEEP_FORMAT = "sparsefinder-sweep"
SWEEP_FORMAT_VERSION = 1


SWEEP_COLUMNS: tuple[str, ...] = (
    CONFIG_COLUMNS + ("layer", "head") + RATIO_COLUMNS + ("sentences",) + COUNT_COLUMNS
)
"""Columns of the aggregated sweep table, in order."""
SENTENCE_COLUMNS: tuple[str, ...] = CONFIG_COLUMNS + ("sentence", "layer", "head") + RATIO_COLUMNS + COUNT_COLUMNS
"""Columns of the per-sentence table (``per_sentence=True``)."""

SUPPLIED_CONTEXT: frozenset[str] = frozenset({"head_dim", "sentence_ids"})
"""Context keys the sweep fills in itself (the model's head size; the store's sentence indices)."""
OPTIONAL_CONTEXT: frozenset[str] = frozenset({"match", "tokens"})
"""Context keys a method can do without (random's ``match``: it falls back to its target ``sparsity``; the
learned predictors' ``tokens``: without them every token counts as unseen; give
:class:`sparsefinder.predictors.learned.core.TokenContext`)."""


_RATIO_INDEX = {c: i for i, c in enumerate(RATIO_COLUMNS)}


# ---------------------------------------------------------------------- configurations


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"not JSON-serialisable: {value!r}")


def canonical_params(params: Mapping[str, Any]) -> str:
    """The canonical JSON of a grid point: sorted keys, no spaces (``{"n_buckets":4}``); the table's ``params``."""
    return json.dumps(dict(params), sort_keys=True, separators=(",", ":"), default=_jsonable)


def default_grids(methods: Iterable[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Each method's own :meth:`~sparsefinder.predictors.base.Predictor.grid` (the paper's values)."""
    return {m: REGISTRY[m].grid() for m in (REGISTRY if methods is None else methods)}


def _param_names(cls: type[Predictor]) -> list[str]:
    return cls._param_names()


def _config_params(method: str, point: Mapping[str, Any], seed: int, extra: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Constructor keywords of one configuration: run-level ``seed`` (if the method has one), ``extra``, the point."""
    cls = REGISTRY[method]
    names = set(_param_names(cls))
    params: dict[str, Any] = {}
    if "seed" in names:
        params["seed"] = seed
    params.update({k: v for k, v in (extra or {}).items() if k in names})
    params.update(point)
    return params


@dataclass
class _Config:
    index: int
    method: str
    point: dict[str, Any]
    key: str
    predictor: Predictor  # unfitted template (hyperparameters); fitted ones are looked up per layer
    fitted: dict[int, Predictor] | None = None

    def for_layer(self, layer: int) -> Predictor:
        if self.fitted is None:
            return self.predictor
        return self.fitted[layer]


# ---------------------------------------------------------------------- projections and inputs


def _check_projections(projections: Any, store: ExtractionStore) -> None:
    if projections is None:
        return
    for attr in ("num_layers", "num_heads", "head_dim"):
        have, want = getattr(projections, attr, None), getattr(store, attr)
        if have is not None and int(have) != int(want):
            raise ValueError(f"projections have {attr} = {have} but the store has {want}")
    # Duck-typed, so the sweep's planning floor does not import the training package.
    check = getattr(projections, "check_store", None)
    if callable(check):
        check(store)


def _project(projections: Any, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        qp = projections.project_queries(layer, q)
        kp = projections.project_keys(layer, k)
    # Predictors compute in float32 (check_inputs); converting once here avoids a copy per method.
    return qp.float().contiguous(), kp.float().contiguous()


def _uses_projection(cls: type[Predictor], projections: Any) -> bool:
    return cls.reads_projections(projections is not None)


def _digest(indices: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(list(indices), dtype="<i8").tobytes()).hexdigest()


def _store_info(store: ExtractionStore) -> dict[str, Any]:
    m = store.manifest
    keys = ("model", "weights_sha256", "base_checksum", "alpha", "causal", "corpus", "split", "num_sentences",
            "num_tokens", "num_layers", "num_heads", "head_dim", "created")
    info = {k: m.get(k) for k in keys}
    info["path"] = str(store.path)
    info["manifest_sha256"] = hashlib.sha256(json.dumps(m, sort_keys=True, default=str).encode()).hexdigest()
    return info


def _projection_info(projections: Any) -> dict[str, Any] | None:
    if projections is None:
        return None
    manifest = getattr(projections, "manifest", None) or {}
    keep = ("model", "weights_sha256", "corpus", "split", "seed", "rank", "shared", "layers", "tensors_sha256",
            "store_manifest_sha256", "train", "validation", "sparsefinder_version")
    info = {k: manifest[k] for k in keep if k in manifest}
    info.setdefault("rank", getattr(projections, "rank", None))
    info["class"] = type(projections).__name__
    return info
