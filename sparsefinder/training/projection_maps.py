r"""The learned projections themselves and their saved artifact (Sparsefinder, docs/method.md §3).

Per layer :math:`\ell` and head :math:`h` a linear map :math:`\mathbb{R}^d \to \mathbb{R}^r`
(r = 4 by default) sends queries and keys to a space where a query lies close
to the keys it attends to (its gold entmax support) and far from the others:

.. math::
    q'_i = W_{\ell h}^\top q_i + b_{\ell h}, \qquad k'_j = W_{\ell h}^\top k_j + b_{\ell h},
    \qquad W_{\ell h} \in \mathbb{R}^{d \times r},\ b_{\ell h} \in \mathbb{R}^r .

By default the same map projects queries and keys (``shared=True``); with
``shared=False`` keys have their own :math:`W^K, b^K`. (With a shared map the
bias cancels in every distance :math:`\|q'_i - k'_j\|`, so it gets no gradient
and stays at its zero initialisation; it is kept so both variants have one
format.)

:class:`Projections` holds the maps of every layer and head and projects with
them; :mod:`sparsefinder.training.projections` trains them.

Artifact format, version 1
==========================

A directory with

- ``projections.safetensors``: float32 tensors ``weight_q`` ``(L, H, d, r)``,
  ``bias_q`` ``(L, H, r)`` and, when not shared, ``weight_k``, ``bias_k``.
- ``manifest.json``: ``format`` = ``"sparsefinder-projections"``,
  ``format_version`` = 1, the structure (``num_layers``, ``num_heads``,
  ``head_dim``, ``rank``, ``shared``, ``layers`` = the trained layers),
  ``tensors_file`` and its ``tensors_sha256``, and the provenance of
  :func:`~sparsefinder.training.projections.projection_manifest`: the model (``model``, ``weights_sha256``,
  ``base_checksum``, ``adapter``, ``alpha``, ``causal``), the data (``corpus``,
  ``split``, train/validation sentences), ``seed``, ``config``, ``losses``
  and ``sparsefinder_version``.

:meth:`Projections.load` refuses (:class:`ProjectionMismatchError`) a model or
store other than the one the projections were trained for, and corrupt files
(:class:`ProjectionFileError`, a subclass). Nothing is ever unpickled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sparsefinder.artifacts import (
    file_sha256,
    identity_mismatches,
    model_mismatches,
    read_json,
    write_json_atomic,
)

if TYPE_CHECKING:  # only attributes of the model and the store are read; importing them would pull in transformers
    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.model.entmax_model import EntmaxModel

FORMAT = "sparsefinder-projections"
FORMAT_VERSION = 1
TENSORS_FILE = "projections.safetensors"
MANIFEST_FILE = "manifest.json"
DEFAULT_RANK = 4

# Keys of the model identity compared by load(); see _compare_identity.
_STRUCTURE_KEYS = ("num_layers", "num_heads", "head_dim", "rank", "shared", "layers")


class ProjectionMismatchError(ValueError):
    """Projections refused: trained for another model, other weights, another alpha or another shape."""


class ProjectionFileError(ProjectionMismatchError):
    """A projections artifact that cannot be read: missing, corrupt, truncated or of another format."""


# --------------------------------------------------------------------------- helpers


def derive_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed derived from ``seed`` and integer ``keys`` (``numpy.random.SeedSequence``).

    Each layer, epoch and purpose gets its own stream, so training layer 3 alone
    gives the same weights as training all layers, and streams never overlap.
    """
    if seed < 0 or any(k < 0 for k in keys):
        raise ValueError(f"seeds must be non-negative, got {seed} and {keys}")
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1)[0])


def _init_layer(
    num_heads: int, head_dim: int, rank: int, shared: bool, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Seeded initial parameters of one layer: :math:`W \\sim U(-1/\\sqrt d, 1/\\sqrt d)`, :math:`b = 0`.

    The bound is torch.nn.Linear's: it keeps each projected coordinate on the
    scale of one input coordinate, so initial distances are neither collapsed
    nor exploded relative to the margin.
    """
    bound = 1.0 / math.sqrt(head_dim)

    def w() -> torch.Tensor:
        return (torch.rand(num_heads, head_dim, rank, generator=generator) * 2 - 1) * bound

    params = {"weight_q": w(), "bias_q": torch.zeros(num_heads, rank)}
    if not shared:
        params["weight_k"] = w()
        params["bias_k"] = torch.zeros(num_heads, rank)
    return params


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:math:`x'_{\\ldots h n} = W_h^\\top x_{\\ldots h n} + b_h`: ``(..., H, N, d)`` → ``(..., H, N, r)``.

    ``weight`` is ``(H, d, r)``, ``bias`` ``(H, r)``.
    """
    if x.shape[-1] != weight.shape[-2] or x.shape[-3] != weight.shape[0]:
        raise ValueError(
            f"expected (..., H={weight.shape[0]}, N, d={weight.shape[-2]}) vectors, got {tuple(x.shape)}"
        )
    x = x.to(weight.dtype)
    return torch.einsum("...hnd,hdr->...hnr", x, weight) + bias[:, None, :]


def _model_head_dim(model: EntmaxModel) -> int | None:
    # EntmaxModel does not record d; read it from the config where the config says it.
    config = getattr(getattr(model, "model", None), "config", None)
    if config is None:
        return None
    explicit = getattr(config, "head_dim", None)
    if isinstance(explicit, int):
        return explicit
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "dim", None)
    heads = getattr(model, "num_heads", None)
    return int(hidden) // int(heads) if isinstance(hidden, int) and heads else None


# --------------------------------------------------------------------------- the projections


class Projections(torch.nn.Module):
    r"""Per-layer, per-head linear maps :math:`\mathbb{R}^d \to \mathbb{R}^r` (see the module docstring).

    Tensors are buffers, not parameters: projecting for prediction never builds
    an autograd graph (training optimises its own copies, :func:`train_projections`).
    ``layers`` lists the layers that hold trained maps; projecting any other
    layer raises. A fresh instance holds the seeded initialisation of every layer.
    """

    weight_q: torch.Tensor
    bias_q: torch.Tensor

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        rank: int = DEFAULT_RANK,
        shared: bool = True,
        seed: int = 0,
        layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if min(num_layers, num_heads, head_dim, rank) < 1:
            raise ValueError("num_layers, num_heads, head_dim and rank must be >= 1")
        self._shape = (int(num_layers), int(num_heads), int(head_dim), int(rank))
        self._shared = bool(shared)
        per_layer = [
            _init_layer(num_heads, head_dim, rank, shared, torch.Generator().manual_seed(derive_seed(seed, layer, 0)))
            for layer in range(num_layers)
        ]
        for name in per_layer[0]:
            self.register_buffer(name, torch.stack([p[name] for p in per_layer]))
        self.layers = tuple(sorted({self._layer_index(x) for x in (range(num_layers) if layers is None else layers)}))
        self.manifest: dict[str, Any] = {}

    # -- structure ---------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self._shape[0]

    @property
    def num_heads(self) -> int:
        return self._shape[1]

    @property
    def head_dim(self) -> int:
        return self._shape[2]

    @property
    def rank(self) -> int:
        return self._shape[3]

    @property
    def shared(self) -> bool:
        return self._shared

    def extra_repr(self) -> str:
        return (f"layers={self.num_layers}, heads={self.num_heads}, d={self.head_dim}, r={self.rank}, "
                f"shared={self.shared}, trained={list(self.layers)}")

    def _layer_index(self, layer: int) -> int:
        L = self.num_layers
        if not isinstance(layer, int | np.integer) or not -L <= int(layer) < L:
            raise IndexError(f"layer {layer} out of range for projections of {L} layers")
        return int(layer) % L

    def _trained(self, layer: int) -> int:
        i = self._layer_index(layer)
        if i not in self.layers:
            raise ValueError(f"layer {i} has no trained projection (trained layers: {list(self.layers)})")
        return i

    # -- projecting ----------------------------------------------------------------
    def layer_parameters(self, layer: int) -> dict[str, torch.Tensor]:
        """Copies of one layer's tensors: ``weight_q`` ``(H, d, r)``, ``bias_q`` ``(H, r)`` (+ ``_k`` if separate)."""
        i = self._layer_index(layer)
        return {name: buf[i].clone() for name, buf in self.named_buffers()}

    def set_layer(self, layer: int, params: dict[str, torch.Tensor]) -> None:
        """Overwrite one layer's maps (as :meth:`layer_parameters` returns them) and mark it trained."""
        i = self._layer_index(layer)
        buffers = dict(self.named_buffers())
        if set(params) != set(buffers):
            raise ValueError(f"expected tensors {sorted(buffers)}, got {sorted(params)}")
        with torch.no_grad():
            for name, value in params.items():
                if value.shape != buffers[name].shape[1:]:
                    raise ValueError(f"{name}: expected {tuple(buffers[name].shape[1:])}, got {tuple(value.shape)}")
                buffers[name][i].copy_(value.detach())
        self.layers = tuple(sorted({*self.layers, i}))

    def project_queries(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """``(..., H, N, d)`` queries → ``(..., H, N, r)``: :math:`W_h^{Q\\top} q + b^Q_h`."""
        i = self._trained(layer)
        return project(q, self.weight_q[i].to(q.device), self.bias_q[i].to(q.device))

    def project_keys(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """``(..., H, N, d)`` keys → ``(..., H, N, r)``: the shared map, or :math:`W^K, b^K` when separate."""
        i = self._trained(layer)
        suffix = "q" if self.shared else "k"
        w, b = getattr(self, f"weight_{suffix}")[i], getattr(self, f"bias_{suffix}")[i]
        return project(k, w.to(k.device), b.to(k.device))

    def project(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both at once: ``(project_queries(layer, q), project_keys(layer, k))``."""
        return self.project_queries(layer, q), self.project_keys(layer, k)

    # -- saving and loading ----------------------------------------------------------
    def structure(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "rank": self.rank,
            "shared": self.shared,
            "layers": list(self.layers),
        }

    def save(self, directory: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> Path:
        """Write ``projections.safetensors`` and ``manifest.json`` (``manifest`` plus format and structure).

        ``manifest`` is usually :func:`projection_manifest`; keys it shares with
        the structure must agree with this object. Returns the directory.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        manifest = dict(self.manifest if manifest is None else manifest)
        structure = self.structure()
        clash = [k for k in _STRUCTURE_KEYS if k in manifest and manifest[k] != structure[k]]
        if clash:
            raise ValueError(f"manifest disagrees with the projections on {clash}")
        tensors = {name: buf.detach().to("cpu", torch.float32).contiguous() for name, buf in self.named_buffers()}
        path = out / TENSORS_FILE
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        os.replace(tmp, path)  # never leave a half-written file under the real name
        full = {
            **manifest,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **structure,
            "tensors_file": TENSORS_FILE,
            "tensors_sha256": file_sha256(path),
        }
        write_json_atomic(out / MANIFEST_FILE, full)
        self.manifest = full
        return out

    @staticmethod
    def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
        """The validated ``manifest.json`` of a projections directory."""
        root = Path(directory)
        mpath = root / MANIFEST_FILE
        manifest = read_json(mpath, ProjectionFileError, f"{root} holds no projections: {MANIFEST_FILE} is missing",
                             f"projections manifest {mpath} is corrupt: not valid JSON")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ProjectionFileError(f"{mpath} is not a sparsefinder projections manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ProjectionFileError(
                f"projections {root} have format version {manifest.get('format_version')}, this sparsefinder "
                f"reads {FORMAT_VERSION}; retrain them (or use sparsefinder {manifest.get('sparsefinder_version')})"
            )
        types: dict[str, type | tuple[type, ...]] = {
            "num_layers": int, "num_heads": int, "head_dim": int, "rank": int, "shared": bool, "layers": list,
            "tensors_sha256": str,
        }
        bad = [k for k, t in types.items() if not isinstance(manifest.get(k), t)]
        if bad:
            raise ProjectionFileError(f"projections manifest {mpath} is corrupt: missing or mistyped {bad}")
        return manifest

    def check_store(self, store: ExtractionStore) -> None:
        """Refuse (:class:`ProjectionMismatchError`) a store extracted with another model than these
        projections' (nothing to check for projections without a recorded model)."""
        if isinstance(self.manifest, dict) and self.manifest.get("model") is not None:
            check_store(self.manifest, store)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        model: EntmaxModel | None = None,
        store: ExtractionStore | None = None,
        map_location: str | torch.device = "cpu",
    ) -> Projections:
        """Load projections; refuse files that are corrupt and a ``model``/``store`` they were not trained for.

        Raises :class:`ProjectionFileError` (missing, corrupt, altered files) or
        :class:`ProjectionMismatchError` (see :func:`check_model` / :func:`check_store`).
        """
        root = Path(directory)
        manifest = cls.read_manifest(root)
        path = root / TENSORS_FILE
        if not path.is_file():
            raise ProjectionFileError(f"projection weights {path} are missing")
        # The digest catches corruption that still parses (a flipped bit in a weight).
        if file_sha256(path) != manifest["tensors_sha256"]:
            raise ProjectionFileError(
                f"projection weights {path} are corrupt or were altered: their SHA-256 differs from the manifest's"
            )
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ProjectionFileError(f"projection weights {path} are unreadable: {e}") from e
        L, H, d, r, shared = (manifest[k] for k in ("num_layers", "num_heads", "head_dim", "rank", "shared"))
        try:
            obj = cls(L, H, d, r, shared, layers=manifest["layers"])
        except (ValueError, IndexError) as e:
            raise ProjectionFileError(f"projections manifest in {root} is corrupt: {e}") from e
        buffers = dict(obj.named_buffers())
        if set(tensors) != set(buffers):
            raise ProjectionFileError(f"projection weights {path} hold {sorted(tensors)}, expected {sorted(buffers)}")
        for name, t in tensors.items():
            if t.shape != buffers[name].shape or not torch.isfinite(t).all():
                raise ProjectionFileError(
                    f"projection weights {path}: {name!r} is {tuple(t.shape)} or not finite, "
                    f"expected finite {tuple(buffers[name].shape)}"
                )
            buffers[name].copy_(t)
        obj.manifest = manifest
        if model is not None:
            check_model(manifest, model)
        if store is not None:
            check_store(manifest, store)
        return obj.to(map_location)


# --------------------------------------------------------------------------- identity checks


def _compare_identity(ours: dict[str, Any], theirs: dict[str, Any], what: str, names: bool = True) -> list[str]:
    """Differences between two model identities (manifest-style dicts); the weights fingerprint decides.

    The rule is :func:`sparsefinder.artifacts.identity_mismatches`, as for
    :meth:`ExtractionStore.check_model`: the model *name* is only a label,
    compared only when either side lacks a weights fingerprint.
    """
    return _describe(identity_mismatches(ours, theirs, names), ours, theirs, what)


def _describe(found: list[str], ours: dict[str, Any], theirs: dict[str, Any], what: str) -> list[str]:
    """The projections' wording of the mismatched identity fields ``found``."""
    problems = []
    for key in found:
        if key == "base_checksum":
            problems.append("base weights checksum differs")
        elif key == "adapter":
            problems.append("adapter differs")
        elif key == "weights_sha256":
            problems.append(f"weights: fingerprint {theirs[key][:12]}… differs from the projections' {ours[key][:12]}…")
        elif key == "model":
            problems.append(f"model name: projections {ours.get(key)!r}, {what} {theirs.get(key)!r}")
        else:
            problems.append(f"{key}: projections {ours.get(key)}, {what} {theirs.get(key)}")
    return problems


def _refuse(manifest: dict[str, Any], problems: list[str], what: str) -> None:
    if problems:
        raise ProjectionMismatchError(
            f"these projections were trained for model {manifest.get('model')!r}, not for this {what}: "
            + "; ".join(problems) + ". Train projections for it (sparsefinder train)."
        )


def check_model(manifest: dict[str, Any], model: EntmaxModel) -> None:
    """Refuse (:class:`ProjectionMismatchError`) a model the projections (``manifest``) were not trained for.

    Compared: layers, heads, head size, causal flag, alpha, base checksum and
    adapter where known, and the fingerprint of the weights actually loaded.
    """
    found, identity = model_mismatches(manifest, model, head_dim=_model_head_dim(model), names=True)
    _refuse(manifest, _describe(found, manifest, identity, "model"), f"model {model.name!r}")


def check_store(manifest: dict[str, Any], store: ExtractionStore) -> None:
    """Refuse (:class:`ProjectionMismatchError`) a store extracted with another model than the projections'."""
    _refuse(manifest, _compare_identity(manifest, store.manifest, "store"), f"store {store.path}")
