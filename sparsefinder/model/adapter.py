"""Weight adapters: small safetensors deltas applied over packaged base weights.

An adapter directory holds ``adapter.safetensors`` and ``manifest.json``. Each
tuned parameter ``P`` is stored either as a low-rank delta ``P.delta_u`` (out×r)
and ``P.delta_v`` (r×in), with ``P = P_base + U V``, or as a full delta
``P.delta``. The manifest records the base weights' SHA-256; applying an adapter
to other base weights is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_FILE = "adapter.safetensors"
MANIFEST_FILE = "manifest.json"


class AdapterMismatchError(ValueError):
    """The adapter was made for other base weights, or is corrupt."""


def weights_checksum(model_dir: Path) -> str:
    """SHA-256 of a model directory's weight files (safetensors), in name order."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def low_rank_deltas(
    base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], rank: int | None
) -> dict[str, torch.Tensor]:
    """Deltas of the parameters that changed; matrices truncated to ``rank`` by SVD."""
    out: dict[str, torch.Tensor] = {}
    for name, new in tuned.items():
        delta = (new.detach().float().cpu() - base[name].detach().float().cpu())
        if delta.dim() == 2 and rank is not None and rank < min(delta.shape):
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            root = s[:rank].sqrt()
            out[f"{name}.delta_u"] = (u[:, :rank] * root).contiguous()
            out[f"{name}.delta_v"] = (root[:, None] * vh[:rank]).contiguous()
        else:
            out[f"{name}.delta"] = delta.contiguous()
    return out


def save_adapter(directory: Path, deltas: dict[str, torch.Tensor], manifest: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16) for k, v in deltas.items()}, str(directory / ADAPTER_FILE))
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise AdapterMismatchError(f"adapter manifest missing: {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterMismatchError(f"adapter manifest {path} is not valid JSON: {e}") from e


def apply_adapter(model: torch.nn.Module, directory: Path, base_checksum: str) -> dict:
    """Add an adapter's deltas to ``model`` in place after checking the base checksum."""
    manifest = read_manifest(directory)
    expected = manifest.get("base_weights_sha256")
    if expected != base_checksum:
        raise AdapterMismatchError(
            f"adapter {directory} was trained for base weights {str(expected)[:12]}…, "
            f"but the installed base weights are {base_checksum[:12]}…; refusing to apply it"
        )
    try:
        tensors = load_file(str(Path(directory) / ADAPTER_FILE))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise AdapterMismatchError(f"adapter weights {directory / ADAPTER_FILE} are unreadable: {e}") from e
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            name, kind = key.rsplit(".", 1)
            if kind == "delta_v":
                continue
            if name not in params:
                raise AdapterMismatchError(f"adapter parameter {name!r} does not exist in the model")
            p = params[name]
            if kind == "delta":
                delta = value.float()
            elif kind == "delta_u":
                delta = value.float() @ tensors[f"{name}.delta_v"].float()
            else:
                raise AdapterMismatchError(f"unknown adapter tensor {key!r}")
            if delta.shape != p.shape:
                raise AdapterMismatchError(f"adapter {name}: shape {tuple(delta.shape)} != model {tuple(p.shape)}")
            p.add_(delta.to(p.device, p.dtype))
    return manifest
