r"""Train the projection through the stacked model's loss (``sparsefinder train --loss stacked``, issue #7).

The listwise projections (:func:`sparsefinder.training.projections.train_projections`)
are trained alone and frozen; :class:`~sparsefinder.predictors.learned.core.Stacked`
is then fitted on the projected :math:`q', k'`. Here, per layer, starting from
existing projections :math:`W_h` (``init``, e.g. the listwise r = 8 ones) and
the Newton fit of ``Stacked`` on them (priors, standardisation
:math:`\mu_h, \sigma_h`, logistic weights :math:`w_h`), Adam minimises

.. math::
    \mathcal{L}(W, w) = \frac{1}{H |S|} \sum_h \sum_{(i, j) \in S}
    \mathrm{BCE}\bigl(z_{hij}(W_h, w_h),\ [\,(i, j) \in G_h\,]\bigr),

:math:`z` the stacked logit (:meth:`Stacked.logits`) over a seeded sample
:math:`S` of the valid pairs (a fraction ``keep``) of ``batch`` sentences per
step. The gradient reaches :math:`W` through the projected distance, its
row-relative value (a subgradient through the row minimum) and the squared
norms; the row rank, the token and offset priors and the flags are constants,
and :math:`\mu, \sigma` stay frozen. The shared bias stays frozen too (at zero
for listwise projections: distances do not move it and the norms gain nothing
from it). Only the projection is kept: the product re-fits ``Stacked`` on it
from scratch (thresholds and calibration as usual).

On the default model (layers 0 and 3, 24 heads) this adds 0.018 / 0.024 recall
at matched sparsity 0.7 / 0.8 over the same number of extra listwise steps;
distance-only predictors lose on the new projection (README), so it is saved
as its own artifact for ``stacked``/``cascade``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.graphs import AttentionGraph, valid_pair_mask
from sparsefinder.predictors.learned.budgets import token_hashes
from sparsefinder.predictors.learned.stacked import Stacked
from sparsefinder.training.losses import listwise_loss
from sparsefinder.training.projection_maps import Projections, derive_seed, project


def _projected(params: dict[str, torch.Tensor], x: torch.Tensor, side: str) -> torch.Tensor:
    suffix = "k" if side == "k" and "weight_k" in params else "q"
    return project(x, params[f"weight_{suffix}"], params[f"bias_{suffix}"]).float()


def train_stacked_projections(
    store: ExtractionStore,
    init: Projections,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 1e-3,
    lr_head: float = 1e-2,
    keep: float = 0.5,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    train_indices: Sequence[int] | None = None,
    progress: bool = True,
) -> tuple[Projections, dict[str, Any]]:
    """``init``'s projections trained through the stacked BCE on ``store`` (module docstring), and the history.

    Returns new :class:`Projections` (``init`` is not modified) and a JSON-ready
    history: ``config``, per layer the mean training BCE of the first and last
    50 steps and the seconds. The same store, ``init`` and seed give
    bit-identical weights.
    """
    if steps < 0 or batch_size < 1 or not 0.0 < keep <= 1.0:
        raise ValueError("steps must be >= 0, batch_size >= 1 and keep in (0, 1]")
    if (init.num_layers, init.num_heads, init.head_dim) != (store.num_layers, store.num_heads, store.head_dim):
        raise ValueError(f"init projections are for {init.num_layers} layers x {init.num_heads} heads of dimension "
                         f"{init.head_dim}; the store has {store.num_layers} x {store.num_heads} x {store.head_dim}")
    idx = list(range(len(store))) if train_indices is None else [int(i) for i in train_indices]
    if not idx:
        raise ValueError("no training sentences")
    todo = sorted(init.layers if layers is None else {int(x) for x in layers})
    out = Projections(init.num_layers, init.num_heads, init.head_dim, init.rank, init.shared, layers=[])
    for layer in init.layers:
        out.set_layer(layer, init.layer_parameters(layer))
    config = {"loss": "stacked", "rank": init.rank, "shared": init.shared, "steps": steps,
              "batch_size": batch_size, "lr": lr, "lr_head": lr_head, "keep": keep, "seed": seed,
              "optimizer": "adam", "grad_clip": 1.0, "bias": "frozen", "layers": todo,
              "init": dict(init.manifest.get("config", {})) if getattr(init, "manifest", None) else None}
    history: dict[str, Any] = {"config": config, "train_sentences": len(idx), "layers": {}}
    t_start = time.perf_counter()
    for layer in todo:
        t0 = time.perf_counter()
        batch = next(store.iter_batches(layer, len(idx), indices=idx, order="corpus"))
        params0 = init.layer_parameters(layer)
        with torch.no_grad():
            head = Stacked().fit(_projected(params0, batch.queries, "q"), _projected(params0, batch.keys, "k"),
                                 batch.lengths, gold=batch.gold, tokens=batch.tokens)
        params, losses = train_layer(params0, head, batch, layer, steps, batch_size, lr, lr_head, keep, seed,
                                     progress=progress)
        out.set_layer(layer, params)
        history["layers"][str(layer)] = {"first_loss": losses[0] if losses else None,
                                         "last_loss": losses[-1] if losses else None,
                                         "seconds": round(time.perf_counter() - t0, 3)}
    history["seconds"] = round(time.perf_counter() - t_start, 3)
    first = [r["first_loss"] for r in history["layers"].values() if r["first_loss"] is not None]
    last = [r["last_loss"] for r in history["layers"].values() if r["last_loss"] is not None]
    # projection_manifest reads per-epoch losses; one "epoch" here is the whole run.
    history["train_loss"] = [float(np.mean(last))] if last else []
    history["initial_train_loss"] = float(np.mean(first)) if first else None
    history["val_loss"], history["initial_val_loss"] = [], None
    return out, history


def train_layer(params0: dict[str, torch.Tensor], head: Stacked, batch: Any, layer: int, steps: int,
                batch_size: int, lr: float, lr_head: float, keep: float, seed: int, progress: bool = False,
                freeze_bias: bool = True, listwise_weight: float = 0.0, stacked_weight: float = 1.0
                ) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Adam on one layer's projection and logistic weights; the new projection and the mean loss of every 50 steps.

    ``params0``: the layer's projection (:meth:`Projections.layer_parameters`);
    ``head``: ``Stacked`` fitted on it; ``batch``: the layer's padded training
    data (a :class:`~sparsefinder.corpora.store.LayerBatch`). The loss is
    ``stacked_weight`` × the stacked BCE + ``listwise_weight`` ×
    :func:`~sparsefinder.training.projections.listwise_loss` (the experiments of
    ``experiments/stacked_projection.py``; the product uses 1 and 0 with the bias frozen).
    """
    weights = {k: v.clone().float().requires_grad_(k.startswith("weight") or not freeze_bias)
               for k, v in params0.items()}
    w_head = head.weight_.clone().float().requires_grad_(True)
    trained = [v for v in weights.values() if v.requires_grad]
    # The logistic weights act on standardised features, O(1); projection entries are ~0.1: two rates.
    opt = torch.optim.Adam([{"params": trained, "lr": lr}, {"params": [w_head], "lr": lr_head}])
    B = batch.queries.shape[0]
    hashes = token_hashes(batch.tokens, B, batch.queries.shape[2])
    rng = np.random.default_rng(derive_seed(seed, layer, 21))
    gen = torch.Generator().manual_seed(derive_seed(seed, layer, 22))
    order, pos = rng.permutation(B), 0
    losses, window = [], []
    for _ in tqdm(range(steps), desc=f"layer {layer}", disable=not progress, leave=False):
        if pos + batch_size > B:  # a new epoch: a new seeded order
            order, pos = rng.permutation(B), 0
        sel = torch.from_numpy(np.sort(order[pos:pos + batch_size]))
        pos += batch_size
        lengths = batch.lengths[sel]
        n = int(lengths.max())
        qp = _projected(weights, batch.queries[sel, :, :n], "q")
        kp = _projected(weights, batch.keys[sel, :, :n], "k")
        causal = bool(batch.gold.causal)
        valid = valid_pair_mask(lengths, n, causal)[:, 0]
        take = valid & (torch.rand(valid.shape, generator=gen) < keep)
        z = head.logits(qp, kp, lengths, hashes[sel, :n], causal, weight=w_head)  # (B, H, n, n)
        edges = batch.gold.edges[sel][:, :, :n, :n]
        y = edges.permute(1, 0, 2, 3)[:, take].float()
        loss = stacked_weight * torch.nn.functional.binary_cross_entropy_with_logits(z.permute(1, 0, 2, 3)[:, take], y)
        if listwise_weight > 0:
            loss = loss + listwise_weight * listwise_loss(qp, kp, AttentionGraph(edges, lengths, causal))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*trained, w_head], 1.0)
        opt.step()
        window.append(float(loss.detach()))
        if len(window) == 50:
            losses.append(float(np.mean(window)))
            window = []
    if window:
        losses.append(float(np.mean(window)))
    return {k: v.detach() for k, v in weights.items()}, losses
