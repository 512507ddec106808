r"""Training the learned low-dimensional projections of queries and keys (Sparsefinder, docs/method.md §3).

The projections (per layer and head a linear map :math:`\mathbb{R}^d \to \mathbb{R}^r`
under which a query lies close to the keys it attends to) and their saved
artifact are :mod:`sparsefinder.training.projection_maps`; their names stay
importable from here.

Training (:func:`train_projections`) minimises the margin loss of
:func:`margin_loss` (the paper's; ``loss="listwise"``: :func:`listwise_loss`,
the cross-entropy of each query over all its keys against its gold support)
with Adam, one layer at a time (all heads of a layer in one optimisation),
streaming padded batches from an :class:`~sparsefinder.corpora.store.ExtractionStore`.
:mod:`sparsefinder.training.stacked` fine-tunes trained projections through the stacked
predictor's own loss (``sparsefinder train --loss stacked``); it keeps the bias.

:func:`projection_manifest` gives the provenance :meth:`Projections.save` writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsefinder import __version__
from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.graphs import AttentionGraph
from sparsefinder.training.losses import DEFAULT_MARGIN, LOSSES, listwise_loss, margin_loss
from sparsefinder.training.projection_maps import (  # noqa: F401 - the projections' names stay importable from here
    DEFAULT_RANK,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    TENSORS_FILE,
    ProjectionFileError,
    ProjectionMismatchError,
    Projections,
    _compare_identity,
    check_model,
    check_store,
    derive_seed,
    project,
)

# --------------------------------------------------------------------------- helpers


def _indices_digest(indices: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def _canonical_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


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
