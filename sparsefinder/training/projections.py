r"""Learned low-dimensional projections of queries and keys (Sparsefinder, docs/method.md §3).

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

Training (:func:`train_projections`) minimises the margin loss of
:func:`margin_loss` (the paper's; ``loss="listwise"``: :func:`listwise_loss`,
the cross-entropy of each query over all its keys against its gold support)
with Adam, one layer at a time (all heads of a layer in one optimisation),
streaming padded batches from an :class:`~sparsefinder.corpora.store.ExtractionStore`.
:mod:`sparsefinder.training.stacked` fine-tunes trained projections through the stacked
predictor's own loss (``sparsefinder train --loss stacked``); it keeps the bias.

Artifact format, version 1
==========================

A directory with

- ``projections.safetensors``: float32 tensors ``weight_q`` ``(L, H, d, r)``,
  ``bias_q`` ``(L, H, r)`` and, when not shared, ``weight_k``, ``bias_k``.
- ``manifest.json``: ``format`` = ``"sparsefinder-projections"``,
  ``format_version`` = 1, the structure (``num_layers``, ``num_heads``,
  ``head_dim``, ``rank``, ``shared``, ``layers`` = the trained layers),
  ``tensors_file`` and its ``tensors_sha256``, and the provenance of
  :func:`projection_manifest`: the model (``model``, ``weights_sha256``,
  ``base_checksum``, ``adapter``, ``alpha``, ``causal``), the data (``corpus``,
  ``split``, train/validation sentences), ``seed``, ``config``, ``losses``
  and ``sparsefinder_version``.

:meth:`Projections.load` refuses (:class:`ProjectionMismatchError`) a model or
store other than the one the projections were trained for, and corrupt files
(:class:`ProjectionFileError`, a subclass). Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sparsefinder import __version__
from sparsefinder.artifacts import adapter_summary, alpha_to_json, file_sha256, weights_fingerprint, write_json_atomic
from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.graphs import AttentionGraph

if TYPE_CHECKING:  # only attributes of the model are read; importing it would pull in transformers
    from sparsefinder.model.entmax_model import EntmaxModel
from sparsefinder.training.losses import DEFAULT_MARGIN, LOSSES, listwise_loss, margin_loss

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


def _indices_digest(indices: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def _canonical_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()

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
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ProjectionFileError(f"{root} holds no projections: {MANIFEST_FILE} is missing") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProjectionFileError(f"projections manifest {mpath} is corrupt: not valid JSON ({e})") from e
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

    Like :meth:`ExtractionStore.check_model`, the model *name* is only a label:
    it is compared only when either side lacks a weights fingerprint.
    """
    problems = []
    for key in ("num_layers", "num_heads", "head_dim"):
        if theirs.get(key) is not None and ours.get(key) != theirs[key]:
            problems.append(f"{key}: projections {ours.get(key)}, {what} {theirs[key]}")
    if theirs.get("causal") is not None and bool(ours.get("causal")) != bool(theirs["causal"]):
        problems.append(f"causal: projections {ours.get('causal')}, {what} {theirs['causal']}")
    a, b = np.asarray(ours.get("alpha"), dtype=np.float64), np.asarray(theirs.get("alpha"), dtype=np.float64)
    if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=1e-6):
        problems.append(f"alpha: projections {ours.get('alpha')}, {what} {theirs.get('alpha')}")
    if ours.get("base_checksum") and theirs.get("base_checksum") and ours["base_checksum"] != theirs["base_checksum"]:
        problems.append("base weights checksum differs")
    ad_ours, ad_theirs = ours.get("adapter"), theirs.get("adapter")
    if (ad_ours is None) != (ad_theirs is None) or (
        ad_ours and ad_theirs and ad_ours.get("manifest_sha256") != ad_theirs.get("manifest_sha256")
    ):
        problems.append("adapter differs")
    fp_ours, fp_theirs = ours.get("weights_sha256"), theirs.get("weights_sha256")
    if fp_ours and fp_theirs:
        if fp_ours != fp_theirs:
            problems.append(f"weights: fingerprint {fp_theirs[:12]}… differs from the projections' {fp_ours[:12]}…")
    elif names and ours.get("model") != theirs.get("model"):
        problems.append(f"model name: projections {ours.get('model')!r}, {what} {theirs.get('model')!r}")
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
    identity = {
        "model": model.name,
        "num_layers": model.num_layers,
        "num_heads": model.num_heads,
        "head_dim": _model_head_dim(model),
        "causal": bool(model.causal),
        "alpha": alpha_to_json(model.alpha),
        "base_checksum": getattr(model, "base_checksum", None),
        "adapter": adapter_summary(getattr(model, "adapter_manifest", None)),
    }
    problems = _compare_identity(manifest, identity, "model", names=False)
    if not problems:  # hashing is a pass over the weights; skip it when already refused
        identity["weights_sha256"] = weights_fingerprint(model.model)
        problems = _compare_identity(manifest, identity, "model")
    _refuse(manifest, problems, f"model {model.name!r}")


def check_store(manifest: dict[str, Any], store: ExtractionStore) -> None:
    """Refuse (:class:`ProjectionMismatchError`) a store extracted with another model than the projections'."""
    _refuse(manifest, _compare_identity(manifest, store.manifest, "store"), f"store {store.path}")


# --------------------------------------------------------------------------- training


def _layer_loss(
    params: dict[str, torch.Tensor], batch_q: torch.Tensor, batch_k: torch.Tensor, gold: AttentionGraph,
    generator: torch.Generator, margin: float, loss: str = "margin",
) -> torch.Tensor:
    qp = project(batch_q, params["weight_q"], params["bias_q"])
    kp = project(batch_k, params.get("weight_k", params["weight_q"]), params.get("bias_k", params["bias_q"]))
    if loss == "listwise":
        return listwise_loss(qp, kp, gold)
    return margin_loss(qp, kp, gold, generator, margin)


def _mean_loss(
    store: ExtractionStore, indices: Sequence[int], layer: int, params: dict[str, torch.Tensor],
    batch_size: int, margin: float, seed: int, device: torch.device, loss: str = "margin",
) -> float:
    """Sentence-weighted mean loss over ``indices``; fixed negatives (``seed``) so epochs compare fairly."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in store.iter_batches(layer, batch_size, indices=indices, order="corpus", device=device):
            n = int(batch.lengths.shape[0])
            total += float(_layer_loss(params, batch.queries, batch.keys, batch.gold, generator, margin, loss)) * n
            count += n
    return total / max(count, 1)


def evaluate_projections(
    projections: Projections,
    store: ExtractionStore,
    layer: int,
    indices: Sequence[int] | None = None,
    batch_size: int = 32,
    margin: float = DEFAULT_MARGIN,
    seed: int = 0,
    loss: str = "margin",
) -> float:
    """Mean loss (``"margin"``: :func:`margin_loss`, negatives seeded by ``seed``; or ``"listwise"``) of one layer."""
    _check_loss(loss)
    i = projections._trained(layer)
    idx = list(range(len(store))) if indices is None else [int(x) for x in indices]
    params = {k: v.cpu() for k, v in projections.layer_parameters(i).items()}
    return _mean_loss(store, idx, i, params, batch_size, margin, seed, torch.device("cpu"), loss)


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def _check_same_model(train: ExtractionStore, val: ExtractionStore) -> None:
    problems = _compare_identity(train.manifest, val.manifest, "validation store")
    if problems:
        raise ProjectionMismatchError(
            f"validation store {val.path} was extracted with another model than training store {train.path}: "
            + "; ".join(problems)
        )


def train_projections(
    store: ExtractionStore,
    train_indices: Sequence[int] | None = None,
    val_indices: Sequence[int] | ExtractionStore | None = None,
    rank: int = DEFAULT_RANK,
    shared: bool = True,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 1e-3,
    margin: float = DEFAULT_MARGIN,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    device: str | torch.device = "cpu",
    loss: str = "margin",
) -> tuple[Projections, dict[str, Any]]:
    r"""Learn the projections of every (or the given) layer on a stored corpus; returns them and the history.

    Per layer: seeded init (:class:`Projections`), then ``epochs`` passes over
    ``train_indices`` (default: the whole store) in a seeded shuffled order,
    ``batch_size`` sentences per step, Adam (``lr``) on :func:`margin_loss`
    averaged over the layer's heads (``loss="listwise"``: :func:`listwise_loss`
    instead), gradient norm clipped to 1. Batches stream
    from the store, so memory holds one batch. ``val_indices`` are sentences of
    the same store, or a second store (all its sentences) of the same model.

    History (JSON-ready): ``config``; ``layers[str(l)]`` with
    ``initial_train_loss`` / ``initial_val_loss`` (before training),
    ``train_loss`` (per epoch, mean over the epoch's steps weighted by
    sentences) and ``val_loss`` (per epoch, after it, with fixed negatives);
    the same lists averaged over layers at the top level; ``seconds``.
    The same store and seed give bit-identical weights.
    """
    if epochs < 0 or batch_size < 1 or rank < 1:
        raise ValueError("epochs must be >= 0, batch_size and rank >= 1")
    _check_loss(loss)
    dev = torch.device(device)
    L, H, d = store.num_layers, store.num_heads, store.head_dim
    train_idx = list(range(len(store))) if train_indices is None else [int(i) for i in train_indices]
    if not train_idx:
        raise ValueError("no training sentences")
    if isinstance(val_indices, ExtractionStore):
        _check_same_model(store, val_indices)
        val_store: ExtractionStore | None = val_indices
        val_idx = list(range(len(val_indices)))
    elif val_indices is not None:
        val_store, val_idx = store, [int(i) for i in val_indices]
        overlap = set(val_idx) & set(train_idx)
        if overlap:
            raise ValueError(f"{len(overlap)} validation sentence(s) are also training sentences")
    else:
        val_store, val_idx = None, []
    config: dict[str, Any] = {
        "rank": rank, "shared": shared, "epochs": epochs, "batch_size": batch_size, "lr": lr, "margin": margin,
        "seed": seed, "loss": loss, "optimizer": "adam", "grad_clip": 1.0, "init": "uniform(+-1/sqrt(d)), bias 0",
    }
    projections = Projections(L, H, d, rank, shared, seed=seed, layers=[])
    todo = sorted({projections._layer_index(x) for x in (range(L) if layers is None else layers)})
    config["layers"] = todo
    history: dict[str, Any] = {
        "config": config,
        "train_sentences": len(train_idx),
        "train_indices_sha256": _indices_digest(train_idx),
        "val_sentences": len(val_idx),
        "val_indices_sha256": _indices_digest(val_idx) if val_store is not None else None,
        "val_store": None if val_store is None or val_store is store else {
            "corpus": val_store.manifest.get("corpus"), "split": val_store.manifest.get("split"),
            "manifest_sha256": _canonical_sha256(val_store.manifest),
        },
        "layers": {},
    }
    # print() under a live tqdm bar tears it; tqdm.write prints above it.
    say = tqdm.write if (log is print and progress) else (log or (lambda _msg: None))
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    t_start = time.perf_counter()

    def val_loss(layer: int, params: dict[str, torch.Tensor]) -> float | None:
        if val_store is None:
            return None
        return _mean_loss(val_store, val_idx, layer, params, batch_size, margin, derive_seed(seed, layer, 2), dev,
                          loss)

    for layer in todo:
        t0 = time.perf_counter()
        params = {k: v.to(dev).requires_grad_(True) for k, v in projections.layer_parameters(layer).items()}
        optimizer = torch.optim.Adam(list(params.values()), lr=lr)
        negatives_gen = torch.Generator().manual_seed(derive_seed(seed, layer, 1))
        record: dict[str, Any] = {
            "initial_train_loss": _mean_loss(store, train_idx, layer, params, batch_size, margin,
                                             derive_seed(seed, layer, 3), dev, loss),
            "initial_val_loss": val_loss(layer, params),
            "train_loss": [],
            "val_loss": [],
        }
        bar = tqdm(total=epochs * steps_per_epoch, desc=f"layer {layer}", disable=not progress, leave=False)
        for epoch in range(epochs):
            batches: Iterator = store.iter_batches(
                layer, batch_size, indices=train_idx, order="shuffle", seed=derive_seed(seed, layer, 4, epoch),
                device=dev,
            )
            total, count = 0.0, 0
            for batch in batches:
                step_loss = _layer_loss(params, batch.queries, batch.keys, batch.gold, negatives_gen, margin, loss)
                optimizer.zero_grad(set_to_none=True)
                step_loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
                optimizer.step()
                n = int(batch.lengths.shape[0])
                total += float(step_loss.detach()) * n
                count += n
                bar.update(1)
                bar.set_postfix(loss=f"{float(step_loss.detach()):.4f}")
            record["train_loss"].append(total / max(count, 1))
            record["val_loss"].append(val_loss(layer, params))
            v = record["val_loss"][-1]
            say(f"layer {layer} epoch {epoch + 1}/{epochs}: train loss {record['train_loss'][-1]:.4f}"
                + ("" if v is None else f", validation loss {v:.4f}"))
        bar.close()
        record["seconds"] = round(time.perf_counter() - t0, 3)
        projections.set_layer(layer, {k: v.detach().cpu() for k, v in params.items()})
        history["layers"][str(layer)] = record

    def mean_over_layers(key: str, epoch: int | None = None) -> float | None:
        vals = [r[key] if epoch is None else r[key][epoch] for r in history["layers"].values()]
        return None if not vals or any(v is None for v in vals) else float(np.mean(vals))

    history["initial_train_loss"] = mean_over_layers("initial_train_loss")
    history["initial_val_loss"] = mean_over_layers("initial_val_loss")
    history["train_loss"] = [mean_over_layers("train_loss", e) for e in range(epochs)]
    history["val_loss"] = [mean_over_layers("val_loss", e) for e in range(epochs)]
    history["seconds"] = round(time.perf_counter() - t_start, 3)
    if val_store is not None and history["val_loss"]:
        say(f"done in {history['seconds']:.1f}s: train loss {history['train_loss'][-1]:.4f}, "
            f"validation loss {history['val_loss'][-1]:.4f} (mean over {len(todo)} layer(s))")
    return projections, history


def projection_manifest(store: ExtractionStore, config: dict[str, Any], history: dict[str, Any]) -> dict[str, Any]:
    """Provenance for :meth:`Projections.save`: model identity, data, settings, losses, library version.

    Deterministic (no timestamps or timings), so rebuilding the artifact with
    the same store and seed reproduces the manifest as well as the weights.
    """
    m = store.manifest
    layer_losses = {
        layer: {k: rec.get(k) for k in ("initial_train_loss", "initial_val_loss", "train_loss", "val_loss")}
        for layer, rec in history.get("layers", {}).items()
    }
    return {
        "model": m["model"],
        "weights_sha256": m.get("weights_sha256"),
        "base_checksum": m.get("base_checksum"),
        "adapter": m.get("adapter"),
        "alpha": m["alpha"],
        "causal": m["causal"],
        "num_layers": m["num_layers"],
        "num_heads": m["num_heads"],
        "head_dim": m["head_dim"],
        "rank": config["rank"],
        "shared": config["shared"],
        "corpus": m.get("corpus"),
        "split": m.get("split"),
        "store_manifest_sha256": _canonical_sha256(m),
        "train": {"sentences": history.get("train_sentences"), "indices_sha256": history.get("train_indices_sha256")},
        "validation": {
            "sentences": history.get("val_sentences"),
            "indices_sha256": history.get("val_indices_sha256"),
            "store": history.get("val_store"),
        },
        "seed": config["seed"],
        "config": dict(config),
        "losses": {
            "train_loss": history.get("train_loss"),
            "val_loss": history.get("val_loss"),
            "initial_train_loss": history.get("initial_train_loss"),
            "initial_val_loss": history.get("initial_val_loss"),
            "layers": layer_losses,
        },
        "sparsefinder_version": __version__,
    }
