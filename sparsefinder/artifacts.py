"""Primitives of every on-disk artifact: JSON manifests written atomically, safetensors files, digests, identity.

Every artifact folder of the project (extraction store, projections, fitted predictors, interpretation,
learned windows, adapters) is a JSON manifest beside safetensors or Parquet files: nothing is pickled and
``torch.load`` is never used. This module holds what they share: the atomic manifest write, the file
digest, a safetensors writer that fills arrays in place, and the fields that identify a model (its weights'
fingerprint, its alpha, its adapter) with the one rule that compares them (:func:`identity_mismatches`), so
every artifact refuses another model alike. The formats themselves are described in ``docs/formats.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
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


def read_json(path: Path, error: type[Exception], missing: str, corrupt: str) -> Any:
    """The parsed JSON file ``path``; ``error(missing)`` when it is absent, ``error(corrupt + " (reason)")`` when it
    is not UTF-8 JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise error(missing) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{corrupt} ({e})") from e


def read_manifest_and_tensors(directory: Path, manifest_file: str, tensors_file: str) -> tuple[Any, dict]:
    """An artifact folder's parsed JSON manifest and its safetensors tensors (CPU ``torch`` tensors).

    Raises what the readers raise (``FileNotFoundError``, JSON or safetensors
    errors); each artifact words them in its own error.
    """
    from safetensors.torch import load_file

    manifest = json.loads((directory / manifest_file).read_text(encoding="utf-8"))
    return manifest, load_file(str(directory / tensors_file))


# --------------------------------------------------------------------------- model identity

IDENTITY_FIELDS = ("num_layers", "num_heads", "head_dim", "causal", "alpha", "base_checksum", "adapter",
                   "weights_sha256", "model")
"""The fields of a manifest that identify the model an artifact was made with, in the order they are compared."""


def model_identity(model: Any, head_dim: int | None = None) -> dict[str, Any]:
    """The identity fields of a loaded model (an :class:`~sparsefinder.model.entmax_model.EntmaxModel`'s
    attributes) as a manifest records them, without the weights' fingerprint (a pass over the weights)."""
    return {
        "model": model.name,
        "num_layers": model.num_layers,
        "num_heads": model.num_heads,
        "head_dim": head_dim,
        "causal": bool(model.causal),
        "alpha": alpha_to_json(model.alpha),
        "base_checksum": getattr(model, "base_checksum", None),
        "adapter": adapter_summary(getattr(model, "adapter_manifest", None)),
    }


def identity_mismatches(recorded: Mapping[str, Any], current: Mapping[str, Any], names: bool = True) -> list[str]:
    """The :data:`IDENTITY_FIELDS` in which the identity ``current`` differs from the ``recorded`` one, in order.

    The shape fields and the causal flag count where ``current`` gives them;
    alpha must agree to 1e-6 (scalar or per head); base checksums count when
    both sides have one; adapters by the hash of their manifest (or one side
    having none). The weights' fingerprint decides when both sides have one:
    model *names* are only labels, compared (with ``names``) only when a
    fingerprint is missing.
    """
    found = []
    for key in ("num_layers", "num_heads", "head_dim"):
        if current.get(key) is not None and recorded.get(key) != current[key]:
            found.append(key)
    if current.get("causal") is not None and bool(recorded.get("causal")) != bool(current["causal"]):
        found.append("causal")
    a, b = np.asarray(recorded.get("alpha"), dtype=np.float64), np.asarray(current.get("alpha"), dtype=np.float64)
    if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=1e-6):
        found.append("alpha")
    base_r, base_c = recorded.get("base_checksum"), current.get("base_checksum")
    if base_r and base_c and base_r != base_c:
        found.append("base_checksum")
    ad_r, ad_c = recorded.get("adapter"), current.get("adapter")
    if (ad_r is None) != (ad_c is None) or (
        ad_r and ad_c and ad_r.get("manifest_sha256") != ad_c.get("manifest_sha256")
    ):
        found.append("adapter")
    fp_r, fp_c = recorded.get("weights_sha256"), current.get("weights_sha256")
    if fp_r and fp_c:
        if fp_r != fp_c:
            found.append("weights_sha256")
    elif names and recorded.get("model") != current.get("model"):
        found.append("model")
    return found


def model_mismatches(
    recorded: Mapping[str, Any], model: Any, head_dim: int | None = None, names: bool = False
) -> tuple[list[str], dict[str, Any]]:
    """:func:`identity_mismatches` of a loaded model against a manifest, and the model's identity.

    The weights are fingerprinted (:func:`weights_fingerprint`, added to the
    returned identity) only when everything else agrees and the manifest
    records a fingerprint to compare with.
    """
    current = model_identity(model, head_dim)
    found = identity_mismatches(recorded, current, names=False)
    if found:  # hashing is a pass over the weights; skip it when already refused
        return found, current
    if recorded.get("weights_sha256"):
        current["weights_sha256"] = weights_fingerprint(model.model)
    return identity_mismatches(recorded, current, names=names), current
