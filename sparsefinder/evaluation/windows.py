r"""Learned neighbour degree (Breaking BERT): a trainable window per head under a sparsity penalty.

Breaking BERT found that neighbour connections matter most, and then learned how
many neighbours each head needs. Here every head ``h`` of every chosen layer
``l`` gets a radius :math:`\rho_{lh}` (in tokens). At test time the head's graph is
the hard window

.. math:: \hat G_{lh} = \{(i, j) : |i - j| \le r_{lh}\}, \qquad r_{lh} = \max(0, \operatorname{round}(\rho_{lh})),

(:class:`LearnedWindowPredictor`; window *width* :math:`2r + 1`). To learn
:math:`\rho` by gradient descent the hard window is relaxed to keep-weights

.. math:: m_{ij} = \sigma\!\left(\frac{\rho + \tfrac12 - |i - j|}{\tau}\right),

added to the attention scores as :math:`\log m_{ij}` before entmax (through
:func:`sparsefinder.model.attention.restrict_support`). For softmax this multiplies
the attention weights by :math:`m_{ij}`; for entmax, :math:`\log m_{ij} \to -\infty`
drops a pair and :math:`\log m_{ij} \to 0` keeps it, so as :math:`\tau \to 0`
the relaxation becomes the hard window (the :math:`\tfrac12` puts the soft edge
half-way between the last kept and the first dropped offset of an integer
radius). The expected density of head ``h`` on a sentence with valid pairs
:math:`V` is

.. math:: D_{lh} = \frac{1}{|V|} \sum_{(i, j) \in V} m_{ij},

and the radii minimise, with the model's own weights frozen,

.. math:: \mathcal{L}(\rho) = \mathcal{L}_{\text{task}} + \lambda \cdot \overline{D},

where :math:`\overline{D}` is the mean over sentences, heads and chosen layers,
and the task loss keeps the exact entmax model's behaviour: :math:`1 - \cos`
of the mean-pooled sentence embeddings with the exact model's (an encoder), or
the masked-LM cross-entropy on a seeded 15 % masking (a model with an MLM
head). :math:`\partial \log m_{ij} / \partial \rho = (1 - m_{ij}) / \tau`, so
only pairs near or beyond the window's edge move it. Larger :math:`\lambda`
gives narrower windows (sparser, less faithful): sweeping :math:`\lambda` traces
the method's sparsity–accuracy curve.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from sparsefinder.artifacts import read_manifest_and_tensors
from sparsefinder.predictors.base import CoreResult, NotFittedError, Predictor, global_token_mask
from sparsefinder.predictors.constraints import Constraint, Real

WINDOWS_FILE = "windows.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "sparsefinder-learned-windows"


# ---------------------------------------------------------------------- the relaxation


def offsets(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(N, N)`` float :math:`|i - j|`."""
    pos = torch.arange(n, device=device, dtype=torch.float32)
    return (pos[:, None] - pos[None, :]).abs()


def soft_window_bias(radii: torch.Tensor, n: int, tau: float) -> torch.Tensor:
    r"""``(1, H, N, N)`` :math:`\log m_{ij} = \log\sigma((\rho_h + \frac12 - |i - j|)/\tau)` for ``(H,)`` radii."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    x = (radii.float()[:, None, None] + 0.5 - offsets(n, radii.device)[None]) / tau
    return torch.nn.functional.logsigmoid(x)[None]


def hard_radii(radii: torch.Tensor) -> torch.Tensor:
    """Integer radii of the test-time window: ``max(0, round(rho))``."""
    return torch.clamp(torch.round(radii.detach().float()), min=0).long()


# ---------------------------------------------------------------------- the predictor


class LearnedWindowPredictor(Predictor):
    r"""Per-head window :math:`|i - j| \le r_h` with radii learned by :func:`train_windows` (one layer).

    Follows the predictor protocol (:mod:`sparsefinder.predictors.base`): the
    hyperparameters record how the radii were trained (``sparsity_weight`` =
    :math:`\lambda`, ``tau``); the fitted state is ``radii_`` (``(H,)`` float,
    the learned :math:`\rho`; the graph uses :func:`hard_radii`). The radii need the
    model and the end task, so :meth:`fit` cannot learn them from stored queries
    and keys: pass ``radii=`` (or use :meth:`from_radii`). Not in the global
    registry: the sweep fits every registered learning method from a store,
    which this one cannot be; :mod:`sparsefinder.evaluation.approximate` runs it directly.
    """

    name: ClassVar[str] = "learned-window"
    family: ClassVar[str] = "pattern"
    requires_fit: ClassVar[bool] = True
    fitted_tensors: ClassVar[tuple[str, ...]] = ("radii_",)

    constraints: ClassVar[dict[str, Constraint]] = {
        "sparsity_weight": Real(0, finite=True, text="be a finite number >= 0"),
        "tau": Real(0, finite=True, text="be a finite number >= 0"),
    }

    def __init__(self, sparsity_weight: float = 0.0, tau: float = 1.0, window: int = 0,
                 global_tokens: bool = False) -> None:
        self._init_params(locals())

    @classmethod
    def from_radii(cls, radii: torch.Tensor | Sequence[float], **params: Any) -> LearnedWindowPredictor:
        return cls(**params).fit(None, None, None, radii=radii)

    def fit(self, queries: Any, keys: Any, lengths: Any, gold: Any = None, radii: Any = None,
            **kw: Any) -> LearnedWindowPredictor:
        """Install learned radii (``(H,)``); they come from :func:`train_windows`, not from ``queries``/``keys``."""
        self._check_params()
        if radii is None:
            raise NotFittedError("learned-window radii are learned through the model by "
                                 "sparsefinder.evaluation.windows.train_windows; pass radii=")
        return self.load_state_dict({"radii": torch.as_tensor(radii, dtype=torch.float32)})

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        r = state["radii"]
        if r.dim() != 1 or r.numel() == 0 or not torch.isfinite(r).all():
            raise ValueError(f"radii must be a finite (H,) tensor, got shape {tuple(r.shape)}")

    def _core(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool) -> CoreResult:
        heads, n = q.shape[1], q.shape[2]
        if heads != self.radii_.numel():
            raise ValueError(f"learned windows for {self.radii_.numel()} heads, got {heads}")
        r = hard_radii(self.radii_).to(q.device)
        band = offsets(n, q.device)[None] <= r[:, None, None].float()  # (H, N, N)
        return band[None].expand(q.shape[0], heads, n, n), None


# ---------------------------------------------------------------------- training


@dataclass
class WindowConfig:
    """Training of the radii: :math:`\\lambda` (``sparsity_weight``), temperature, initial radius, Adam
    (learning rate ``lr`` decaying linearly to 0 over ``epochs`` passes in batches of ``batch_size``).

    ``global_tokens``: the first and each sentence's last real token attend and are attended to by
    everything, outside the window (as the predictors' ``global_tokens``; kept with weight 1 in training).
    """

    sparsity_weight: float = 0.1
    tau: float = 1.0
    init_radius: float = 12.0
    lr: float = 1.0
    epochs: int = 3
    batch_size: int = 16
    seed: int = 0
    global_tokens: bool = False


@dataclass
class LearnedWindows:
    """Radii learned for ``layers`` (``(L, H)``, NaN on other layers) and how they were trained."""

    radii: torch.Tensor
    layers: tuple[int, ...]
    config: WindowConfig
    history: list[dict[str, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def widths(self) -> torch.Tensor:
        """``(L, H)`` test-time radii :func:`hard_radii` (-1 on layers without a learned window)."""
        out = torch.full(self.radii.shape, -1, dtype=torch.long)
        for layer in self.layers:
            out[layer] = hard_radii(self.radii[layer])
        return out

    def predictors(self) -> dict[int, LearnedWindowPredictor]:
        """``{layer: fitted predictor}`` of the learned layers."""
        return {layer: LearnedWindowPredictor.from_radii(self.radii[layer], sparsity_weight=self.config.sparsity_weight,
                                                         tau=self.config.tau, global_tokens=self.config.global_tokens)
                for layer in self.layers}


def train_windows(
    model, texts: Sequence[str], config: WindowConfig | None = None, layers: Any = "all", progress: bool = False,
) -> LearnedWindows:
    """Learn a radius per head of ``layers`` (see the module docstring); ``model``'s weights are not changed.

    ``model``: an :class:`~sparsefinder.model.entmax_model.EntmaxModel`; an MLM head makes the
    task loss the masked-LM cross-entropy, otherwise it is the embedding cosine
    to the exact model. Seeded (batch order); the model's parameters get no
    gradient (``requires_grad`` is switched off during training and restored).
    """
    from tqdm.auto import tqdm

    from sparsefinder.evaluation import approximate as ap
    from sparsefinder.graphs import valid_pair_mask
    from sparsefinder.model import attention

    config = config or WindowConfig()
    if config.sparsity_weight < 0 or config.tau <= 0 or config.lr <= 0 or config.epochs < 1:
        raise ValueError(f"bad window training config {config}")
    t0 = time.perf_counter()
    L, H = model.num_layers, model.num_heads
    chosen = ap.parse_layers(layers, L)
    if not chosen:
        raise ValueError("no layers to learn windows for")
    mlm = ap.is_masked_lm(model)
    batches = ap.prepare_batches(model, texts, config.batch_size, seed=config.seed, masked_lm=mlm)
    # Targets of the encoder loss: the exact model's embeddings (no gradient).
    targets = None
    if not mlm:
        targets = ap.run_approximation(model, batches, None).embeddings
    radii = torch.nn.Parameter(torch.full((len(chosen), H), float(config.init_radius), device=model.device))
    opt = torch.optim.Adam([radii], lr=config.lr)
    total = config.epochs * len(batches)
    # Linear decay to zero: Adam moves each radius by about lr per step, so a constant rate
    # would leave the rounded radii oscillating around their optimum.
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / total))
    index = {layer: i for i, layer in enumerate(chosen)}
    params = list(model.model.parameters())
    was = [p.requires_grad for p in params]
    history: list[dict[str, float]] = []
    gen = torch.Generator().manual_seed(config.seed)
    bar = tqdm(total=total, desc=f"windows lambda={config.sparsity_weight}", disable=not progress)
    try:
        for p in params:
            p.requires_grad_(False)
        for epoch in range(config.epochs):
            for bi in torch.randperm(len(batches), generator=gen).tolist():
                batch = batches[bi]
                densities: list[torch.Tensor] = []
                valid = valid_pair_mask(batch.lengths.to(model.device), batch.inputs["input_ids"].shape[1],
                                        model.causal)  # (B, 1, N, N)
                glob = (global_token_mask(batch.lengths.to(model.device), valid.shape[-1])
                        if config.global_tokens else None)

                def hook(layer, query, key, scores, valid=valid, densities=densities, glob=glob):
                    if layer not in index:
                        return None
                    bias = soft_window_bias(radii[index[layer]], scores.shape[-1], config.tau)
                    if glob is not None:
                        bias = bias.masked_fill(glob, 0.0)  # (B, H, N, N)
                    m = bias.exp() * valid  # (B, H, N, N)
                    densities.append((m.sum((-1, -2)) / valid.sum((-1, -2)).clamp(min=1)).mean())
                    return bias

                with torch.enable_grad(), attention.restrict_support(hook):
                    out = model.model(**batch.inputs, output_hidden_states=mlm)
                if mlm:
                    pos = batch.mlm_positions.to(model.device)
                    task = torch.nn.functional.cross_entropy(out.logits[pos].float(),
                                                             batch.mlm_targets.to(model.device)[pos])
                else:
                    hidden = out.last_hidden_state
                    mask = batch.inputs["attention_mask"].to(hidden.dtype)[..., None]
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                    want = targets[batch.sentence_ids].to(pooled.device)
                    task = (1 - torch.nn.functional.cosine_similarity(pooled.float(), want, dim=-1)).mean()
                density = torch.stack(densities).mean()
                loss = task + config.sparsity_weight * density
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
                history.append({"epoch": epoch, "loss": float(loss.detach()), "task": float(task.detach()),
                                "density": float(density.detach()), "mean_radius": float(radii.detach().mean())})
                bar.update(1)
                bar.set_postfix(task=f"{history[-1]['task']:.4f}", density=f"{history[-1]['density']:.3f}",
                                radius=f"{float(radii.detach().mean()):.2f}")
    finally:
        for p, w in zip(params, was, strict=True):
            p.requires_grad_(w)
        bar.close()
    full = torch.full((L, H), float("nan"))
    full[list(chosen)] = radii.detach().float().cpu()
    info = {"model": model.name, "sentences": len(texts), "masked_lm": mlm, "steps": total,
            "train_seconds": time.perf_counter() - t0}
    return LearnedWindows(full, tuple(chosen), config, history, info)


# ---------------------------------------------------------------------- persistence


def windows_key(windows: LearnedWindows, label: str) -> str:
    """The curve table's ``params`` of a learned-window run: ``{"layers":…,"sparsity_weight":…}``
    (plus ``"global_tokens":true`` when the window had global tokens)."""
    key: dict[str, Any] = {"layers": label, "sparsity_weight": windows.config.sparsity_weight}
    if windows.config.global_tokens:
        key["global_tokens"] = True
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def save_windows(runs: Mapping[str, LearnedWindows], directory: str | Path, info: Mapping[str, Any] | None = None
                 ) -> Path:
    """Write learned windows (``{key: LearnedWindows}``, keys from :func:`windows_key`) as safetensors + JSON."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, entries = {}, []
    for i, (key, w) in enumerate(runs.items()):
        tensors[f"radii|{i}"] = w.radii.contiguous().float()
        entries.append({"key": key, "tensor": f"radii|{i}", "layers": list(w.layers), "config": asdict(w.config),
                        "widths": w.widths().tolist(), "info": w.info,
                        "final": w.history[-1] if w.history else None})
    save_file(tensors, str(directory / WINDOWS_FILE))
    manifest = {"format": FORMAT, "format_version": 1, "entries": entries, "info": dict(info or {})}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    return directory


def load_windows(directory: str | Path) -> dict[str, dict[int, LearnedWindowPredictor]]:
    """``{key: {layer: LearnedWindowPredictor}}`` from :func:`save_windows` (for the curves' ``learned``)."""
    directory = Path(directory)
    try:
        manifest, tensors = read_manifest_and_tensors(directory, MANIFEST_FILE, WINDOWS_FILE)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"learned windows missing in {directory}: {e.filename}") from e
    except Exception as e:  # corrupt JSON or safetensors
        raise ValueError(f"learned windows in {directory} are unreadable: {e}") from e
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory} does not hold learned windows (format {manifest.get('format')!r})")
    out: dict[str, dict[int, LearnedWindowPredictor]] = {}
    for e in manifest["entries"]:
        radii = tensors[e["tensor"]]
        cfg = e["config"]
        out[e["key"]] = {int(layer): LearnedWindowPredictor.from_radii(
            radii[int(layer)], sparsity_weight=float(cfg["sparsity_weight"]), tau=float(cfg["tau"]),
            global_tokens=bool(cfg.get("global_tokens", False)))
            for layer in e["layers"]}
    return out


def mean_width(windows: LearnedWindows) -> float:
    """Mean test-time radius over the learned heads."""
    w = windows.widths()
    return float(np.mean([w[layer].float().mean().item() for layer in windows.layers]))


def learned_methods(directories: Sequence[str | Path]) -> dict[str, dict[str, dict[int, LearnedWindowPredictor]]]:
    """Learned windows of several directories as the curves' ``learned`` argument.

    Windows with global tokens are the method ``"learned-window+global"``, the others ``"learned-window"``,
    so each draws its own curve.
    """
    out: dict[str, dict[str, dict[int, LearnedWindowPredictor]]] = {}
    for d in directories:
        for key, by_layer in load_windows(d).items():
            glob = any(p.global_tokens for p in by_layer.values())
            out.setdefault("learned-window+global" if glob else "learned-window", {})[key] = by_layer
    return out
