"""Save and load fitted predictors (k-means centroids, Routing centroids, …) as safetensors + JSON.

A directory holds ``fitted.safetensors`` — one tensor per (method, grid point,
layer, fitted tensor), keyed ``"{method}|{params}|{layer}|{tensor}"`` where
``params`` is the canonical JSON of the grid point — and ``manifest.json``
with each entry's full hyperparameters and the provenance of the fit (the
store and projections it was fitted on). Nothing is unpickled: loading
rebuilds each predictor from the registry with its hyperparameters and then
loads its tensors, which checks their shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from sparsefinder.predictors import get_predictor
from sparsefinder.sweep import FittedPredictors

FITTED_FILE = "fitted.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "sparsefinder-fitted-predictors"


class FittedFileError(ValueError):
    """A fitted-predictor directory is missing, corrupt, or does not match its manifest."""


def save_fitted(fitted: dict, directory: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``fitted[method][params][layer] -> Predictor`` (what :func:`sparsefinder.sweep.fit_predictors` returns)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, entries = {}, []
    for method, by_params in fitted.items():
        for params, by_layer in by_params.items():
            for layer, pred in by_layer.items():
                for name, tensor in pred.state_dict().items():
                    # Grid points that share one fit share tensors; safetensors stores each separately.
                    tensors[f"{method}|{params}|{layer}|{name}"] = tensor.contiguous().clone()
                entries.append({"method": method, "params": params, "layer": int(layer),
                                "hyperparameters": _jsonable(pred.get_params())})
    save_file(tensors, str(directory / FITTED_FILE))
    manifest = {"format": FORMAT, "format_version": 1, "entries": entries,
                "info": _jsonable(dict(info if info is not None else getattr(fitted, "info", {})))}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return directory


def load_fitted(directory: str | Path) -> FittedPredictors:
    """Inverse of :func:`save_fitted` (provenance in ``.info``)."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(directory / FITTED_FILE))
    except FileNotFoundError as e:
        raise FittedFileError(f"fitted predictors missing in {directory}: {e.filename}") from e
    except Exception as e:  # json or safetensors errors: the files are corrupt
        raise FittedFileError(f"fitted predictors in {directory} are unreadable: {e}") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != 1:
        raise FittedFileError(f"{directory} is not a version-1 fitted-predictor directory")
    fitted: dict = {}
    for e in manifest["entries"]:
        prefix = f"{e['method']}|{e['params']}|{e['layer']}|"
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            pred = get_predictor(e["method"], **e["hyperparameters"]).load_state_dict(state)
        except (KeyError, ValueError, TypeError) as err:
            raise FittedFileError(f"fitted {e['method']} {e['params']} layer {e['layer']}: {err}") from err
        fitted.setdefault(e["method"], {}).setdefault(e["params"], {})[int(e["layer"])] = pred
    return FittedPredictors(fitted, info=manifest["info"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
