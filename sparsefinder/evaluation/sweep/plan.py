"""Planning: which configurations run on which kernel, and which methods can run at all."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sparsefinder.evaluation.sweep.batch import (
    GROUPED,
    NESTED,
    SHARED_DENSE,
    Counts,
    _Batch,
    _generic_counts,
    _nested_counts,
)
from sparsefinder.evaluation.sweep.configs import (
    OPTIONAL_CONTEXT,
    SUPPLIED_CONTEXT,
    _Config,
    _config_params,
    canonical_params,
)
from sparsefinder.predictors.base import REGISTRY, get_predictor


@dataclass
class _Unit:
    """Configurations scored together on a batch: a nested group, or a single configuration."""

    configs: list[_Config]
    kind: str  # "nested", "grouped", "shared" or "generic"

    def run(self, batch: _Batch) -> Counts:
        pred = self.configs[0].for_layer(batch.layer)
        if batch.window is not None:
            # The fast paths assume the valid pairs the predictor itself sees; a sliding-window layer
            # scores fewer, so each configuration goes through the predictor (exact, slower).
            parts = [_generic_counts(batch, c.for_layer(batch.layer)) for c in self.configs]
            return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        if self.kind == "nested":
            spec = NESTED[type(pred)]
            if spec.usable(batch):
                values = [getattr(c.predictor, spec.param) if spec.value is None else
                          spec.value(c.for_layer(batch.layer)) for c in self.configs]
                return _nested_counts(spec.levels(batch, pred, values), len(values), batch)
            parts = [_generic_counts(batch, c.for_layer(batch.layer)) for c in self.configs]
            return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        if self.kind == "grouped":
            return GROUPED[type(pred)](batch, [c.for_layer(batch.layer) for c in self.configs])
        if self.kind == "shared":
            return SHARED_DENSE[type(pred)](batch, pred)
        return _generic_counts(batch, pred)


def _state_digest(configs: Sequence[_Config]) -> str:
    """Fingerprint of a configuration's fitted tensors over all layers (equal fits may share a nested pass)."""
    c = configs[0]
    if c.fitted is None:
        return ""
    h = hashlib.sha256()
    for layer in sorted(c.fitted):
        for name, tensor in sorted(c.fitted[layer].state_dict().items()):
            h.update(f"{layer}:{name}:{tuple(tensor.shape)}".encode())
            h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def _plan(configs: list[_Config]) -> list[_Unit]:
    units: list[_Unit] = []
    groups: dict[tuple[str, str, str], list[_Config]] = {}
    grouped: dict[str, list[_Config]] = {}
    for c in configs:
        cls = REGISTRY[c.method]
        if cls in GROUPED:
            grouped.setdefault(c.method, []).append(c)  # each configuration brings its own predictor
        elif cls in NESTED:
            spec = NESTED[cls]
            rest = {k: v for k, v in c.predictor.get_params().items() if k != spec.param}
            key = (c.method, canonical_params(rest), _state_digest([c]))
            groups.setdefault(key, []).append(c)
        elif cls in SHARED_DENSE:
            units.append(_Unit([c], "shared"))
        else:
            units.append(_Unit([c], "generic"))
    for (method, _, _), members in groups.items():
        spec = NESTED[REGISTRY[method]]
        members.sort(key=lambda c: getattr(c.predictor, spec.param), reverse=spec.descending)
        units.append(_Unit(members, "nested"))
    units.extend(_Unit(members, "grouped") for members in grouped.values())
    units.sort(key=lambda u: min(c.index for c in u.configs))
    return units


def _select_methods(
    methods: Sequence[str] | None, projections: Any, fitted: Mapping[str, Any] | None, context_keys: set[str]
) -> tuple[list[str], dict[str, str]]:
    explicit = methods is not None
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for m in ([m for m, c in REGISTRY.items() if c.default_sweep] if methods is None else list(methods)):
        if m not in REGISTRY:
            raise KeyError(f"unknown predictor {m!r}; known: {list(REGISTRY)}")
        cls = REGISTRY[m]
        reason = None
        missing = set(cls.context_keys) - SUPPLIED_CONTEXT - OPTIONAL_CONTEXT - context_keys
        if cls.needs_projections() and projections is None:
            reason = "needs projections"
        elif cls.requires_fit and not (fitted and m in fitted):
            reason = "needs fitted predictors (fit_predictors on a training store)"
        elif missing:
            reason = f"needs context {sorted(missing)} (give a context provider)"
        if reason is None:
            chosen.append(m)
        elif explicit:
            raise ValueError(f"cannot run {m}: it {reason}")
        else:
            skipped[m] = reason
    return chosen, skipped


def _build_configs(
    methods: list[str], grids: Mapping[str, list[dict[str, Any]]], fitted: Mapping[str, Any] | None,
    layers: list[int], seed: int,
) -> list[_Config]:
    configs: list[_Config] = []
    for m in methods:
        cls = REGISTRY[m]
        points = grids.get(m)
        if points is None:
            points = cls.grid()
        seen: set[str] = set()
        for point in points:
            key = canonical_params(point)
            if key in seen:
                raise ValueError(f"{m}: grid point {key} is listed twice")
            seen.add(key)
            template = get_predictor(m, **_config_params(m, point, seed))
            template._check_params()
            per_layer = None
            if cls.requires_fit:
                assert fitted is not None
                by_params = fitted[m]
                if key not in by_params:
                    raise ValueError(f"no fitted {m} for grid point {key}: fit it with the same grid "
                                     f"(fitted ones: {sorted(by_params)})")
                missing = [x for x in layers if x not in by_params[key]]
                if missing:
                    raise ValueError(f"fitted {m} {key} lacks layers {missing}")
                per_layer = {x: by_params[key][x] for x in layers}
                template = per_layer[layers[0]]
            configs.append(_Config(len(configs), m, dict(point), key, template, per_layer))
    return configs
