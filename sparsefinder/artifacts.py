"""Primitives of every on-disk artifact: JSON manifests written atomically, safetensors files, digests, identity.

Every artifact folder of the project (extraction store, projections, fitted predictors, interpretation,
learned windows, adapters) is a JSON manifest beside safetensors or Parquet files: nothing is pickled and
``torch.load`` is never used. This module holds what they share: the atomic manifest write, the file
digest, a safetensors writer that fills arrays in place, and the fields that identify a model (its weights'
fingerprint, its alpha, its adapter) so an artifact can refuse another model. The formats themselves are
described in ``docs/formats.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

# safetensors dtype codes of the arrays the project writes.
ST_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

ST_CODES = {v: k for k, v in ST_DTYPES.items()}


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over a module's parameters (name, dtype, shape, bytes), in name order.

    Identifies the weights actually used — base plus any adapter — whatever path
    or name the model was loaded under, so a store can refuse other weights.
    """
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(p.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def adapter_summary(manifest: dict | None) -> dict | None:
    """The scalar fields of an adapter manifest and a hash of the whole (JSON-canonical) manifest."""
    if manifest is None:
        return None
    canon = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str)
    summary: dict[str, Any] = {
        k: v for k, v in manifest.items() if v is None or isinstance(v, str | int | float | bool)
    }
    summary["manifest_sha256"] = hashlib.sha256(canon.encode()).hexdigest()
    return summary


def alpha_to_json(alpha: Any) -> float | list:
    """A model's alpha as stored in the manifest: a float, or a ``[layer][head]`` list."""
    if isinstance(alpha, torch.Tensor):
        return float(alpha.item()) if alpha.numel() == 1 else alpha.detach().cpu().float().tolist()
    if isinstance(alpha, list | tuple):
        return [alpha_to_json(a) for a in alpha]
    return float(alpha)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def allocate_safetensors(
    path: Path, tensors: dict[str, tuple[np.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> dict[str, np.memmap]:
    """Create a safetensors file of the given shapes and return writable memory maps of its tensors.

    The writer fills the arrays in place batch by batch, so a shard never has to
    be held in memory. Tensors are laid out by decreasing item size (then name),
    so every array is aligned to its item size, as safetensors' own writer does.
    """
    order = sorted(tensors, key=lambda k: (-np.dtype(tensors[k][0]).itemsize, k))
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    spans: dict[str, tuple[int, int]] = {}
    for name in order:
        dtype, shape = np.dtype(tensors[name][0]), tuple(int(s) for s in tensors[name][1])
        nbytes = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        spans[name] = (offset, offset + nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # pad so the data starts 8-byte aligned
    start = 8 + len(raw)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        fh.truncate(start + offset)
    if offset == 0:
        return {name: np.zeros(tensors[name][1], tensors[name][0]) for name in order}
    mm = np.memmap(path, dtype=np.uint8, mode="r+", offset=start, shape=(offset,))
    return {
        name: mm[a:b].view(np.dtype(tensors[name][0])).reshape(tensors[name][1]) for name, (a, b) in spans.items()
    }


def write_json_atomic(path: Path, obj: Any) -> None:
    # A crash mid-write must leave the previous manifest, never half a JSON file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
