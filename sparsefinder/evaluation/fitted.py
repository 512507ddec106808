"""Save and load fitted predictors (k-means centroids, Routing centroids, …) as safetensors + JSON.

A directory holds ``fitted.safetensors`` — one tensor per (method, grid point,
layer, fitted tensor), keyed ``"{method}|{params}|{layer}|{tensor}"`` where
``params`` is the canonical JSON of the grid point — and ``manifest.json``
with each entry's full hyperparameters and the provenance of the fit (the
store and projections it was fitted on). Nothing is unpickled: loading
rebuilds each predictor from the registry with its hyperparameters and then
loads its tensors, which checks their shapes.

Format version 2 stores each distinct tensor once. Two tensors are the same when
their dtype, shape and bytes are equal; the first key (in save order) holds the
data and the manifest's ``"aliases"`` maps every other key to it. This matters
for predictors whose sparsity is a predict-time knob (every grid point of one
method holds the same fit) and for token-prior tables shared by predictors fitted
on the same data: the learned predictors' file shrinks from 89 MB to a few MB.
Version-1 directories (no aliases) still load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sparsefinder.artifacts import read_manifest_and_tensors
from sparsefinder.evaluation.sweep.fit import FittedPredictors
from sparsefinder.predictors.base import get_predictor

FITTED_FILE = "fitted.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "sparsefinder-fitted-predictors"
FORMAT_VERSION = 2
#: Versions :func:`load_fitted` reads (1: one stored tensor per key; 2: adds ``"aliases"``).
READABLE_VERSIONS = (1, 2)


class FittedFileError(ValueError):
    """A fitted-predictor directory is missing, corrupt, or does not match its manifest."""


def save_fitted(fitted: dict, directory: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``fitted[method][params][layer] -> Predictor`` (from :func:`~.sweep.fit_predictors`).

    Identical tensors (same dtype, shape and bytes) are stored once; the manifest's
    ``"aliases"`` maps each repeated key to the key that holds the data.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_content: dict[tuple, list[str]] = {}  # (dtype, shape, sha256) -> stored keys with that digest
    entries = []
    for method, by_params in fitted.items():
        for params, by_layer in by_params.items():
            for layer, pred in by_layer.items():
                for name, tensor in pred.state_dict().items():
                    key = f"{method}|{params}|{layer}|{name}"
                    tensor = tensor.detach().cpu().contiguous()
                    raw = _raw_bytes(tensor)
                    content = (str(tensor.dtype), tuple(tensor.shape), hashlib.sha256(raw.numpy()).digest())
                    # The digest picks candidates; equal bytes decide (a collision never merges two tensors).
                    same = next((k for k in by_content.get(content, ()) if torch.equal(_raw_bytes(tensors[k]), raw)),
                                None)
                    if same is not None:
                        aliases[key] = same
                    else:
                        tensors[key] = tensor.clone()  # safetensors refuses tensors that share memory
                        by_content.setdefault(content, []).append(key)
                entries.append({"method": method, "params": params, "layer": int(layer),
                                "hyperparameters": _jsonable(pred.get_params())})
    save_file(tensors, str(directory / FITTED_FILE))
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "entries": entries, "aliases": aliases,
                "info": _jsonable(dict(info if info is not None else getattr(fitted, "info", {})))}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return directory


def load_fitted(directory: str | Path) -> FittedPredictors:
    """Inverse of :func:`save_fitted` (provenance in ``.info``); reads format versions 1 and 2."""
    directory = Path(directory)
    try:
        manifest, tensors = read_manifest_and_tensors(directory, MANIFEST_FILE, FITTED_FILE)
    except FileNotFoundError as e:
        raise FittedFileError(f"fitted predictors missing in {directory}: {e.filename}") from e
    except Exception as e:  # json or safetensors errors: the files are corrupt
        raise FittedFileError(f"fitted predictors in {directory} are unreadable: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FittedFileError(f"{directory} is not a fitted-predictor directory (manifest format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise FittedFileError(f"{directory}: fitted-predictor format version {version!r} is not one of "
                              f"{READABLE_VERSIONS}; a newer sparsefinder may have written it")
    tensors.update(_resolve_aliases(directory, manifest.get("aliases", {}) if version >= 2 else {}, tensors))
    entries = manifest.get("entries")
    if not isinstance(entries, list):
        raise FittedFileError(f"{directory}: corrupt manifest, 'entries' is not a list")
    fitted: dict = {}
    for e in entries:
        try:
            method, params, layer, hyper = e["method"], e["params"], int(e["layer"]), dict(e["hyperparameters"])
        except (KeyError, TypeError, ValueError) as err:
            raise FittedFileError(f"{directory}: corrupt manifest entry {e!r}: {err!r}") from err
        prefix = f"{method}|{params}|{layer}|"
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            pred = get_predictor(method, **hyper).load_state_dict(state)
        except (KeyError, ValueError, TypeError) as err:
            raise FittedFileError(f"fitted {method} {params} layer {layer}: {err}") from err
        fitted.setdefault(method, {}).setdefault(params, {})[layer] = pred
    return FittedPredictors(fitted, info=manifest.get("info", {}))


def _resolve_aliases(directory: Path, aliases: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{alias key: stored tensor}`` (the same tensor object: :meth:`Predictor.load_state_dict` copies it)."""
    if not isinstance(aliases, dict):
        raise FittedFileError(f"{directory}: corrupt manifest, 'aliases' is not a mapping")
    out = {}
    for alias, target in aliases.items():
        if not isinstance(target, str):
            raise FittedFileError(f"{directory}: corrupt manifest, alias {alias!r} -> {target!r} is not a key")
        if alias in tensors:
            raise FittedFileError(f"{directory}: corrupt manifest, alias {alias!r} is also a stored tensor")
        if target not in tensors:  # aliases point at stored keys only, never at other aliases
            raise FittedFileError(f"{directory}: alias {alias!r} points to {target!r}, which is not stored in "
                                  f"{FITTED_FILE}")
        out[alias] = tensors[target]
    return out


def _raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 view (any dtype, bfloat16 included; NaN compares by its bits)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
