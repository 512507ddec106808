r"""Distil a softmax encoder into an entmax one by tuning its attention weights.

Swapping softmax for 1.5-entmax changes a trained model's outputs, so its gold
graphs would describe a model that no longer works as trained. We fine-tune
only the attention projections (query, key, value, output) of the entmax
*student* so that it reproduces the softmax *teacher*:

.. math::
    \mathcal{L} = \underbrace{1 - \cos(\bar h^S, \bar h^T)}_{\text{pooled embedding}}
      + \underbrace{\tfrac{1}{|T|}\sum_t \lVert h^S_t - h^T_t\rVert^2 / D}_{\text{per token}}
      + \lambda \, \underbrace{\overline{H^T_\alpha(p)}}_{\text{attention density}}

where :math:`\bar h` is the mean-pooled last hidden state and
:math:`H^T_\alpha(p) = (1 - \sum_j p_j^\alpha) / (\alpha(\alpha - 1))` is the
Tsallis entropy that entmax itself regularises with, averaged over real query
rows, heads and layers. Fine-tuning alone makes attention denser (most in the
last layers); the entropy term trades a little fidelity for sparser graphs.

The result is saved as a low-rank safetensors adapter over the packaged base
weights (see :mod:`sparsefinder.model.adapter`), with its fidelity measured after
the adapter is re-applied from disk.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsefinder import __version__
from sparsefinder.model import attention
from sparsefinder.model.adapter import low_rank_deltas, save_adapter, weights_checksum
from sparsefinder.model.entmax_model import EntmaxModel, load_hf

ATTENTION_PARAM_KEYS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


@dataclass
class DistillConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-4
    warmup: float = 0.05
    sparsity_weight: float = 0.0
    hidden_weight: float = 1.0
    alpha: float = 1.5
    seed: int = 0
    rank: int | None = 64
    max_length: int = 128


def attention_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The q/k/v/o weights and biases of every layer (BERT-style naming)."""
    params = {n: p for n, p in model.named_parameters() if any(k in n for k in ATTENTION_PARAM_KEYS)}
    if not params:
        raise ValueError("found no BERT-style attention parameters to tune")
    return params


def tsallis_entropy(probs: torch.Tensor, alpha: float, query_mask: torch.Tensor) -> torch.Tensor:
    """Mean Tsallis alpha-entropy of the real query rows of ``(B, H, N, N)`` probabilities."""
    ent = (1.0 - probs.clamp(min=0).pow(alpha).sum(-1)) / (alpha * (alpha - 1.0))  # (B, H, N)
    mask = query_mask[:, None, :].to(ent.dtype)
    return (ent * mask).sum() / (mask.sum() * ent.shape[1]).clamp(min=1)


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


@torch.no_grad()
def evaluate(student: EntmaxModel, teacher_emb: torch.Tensor, texts: list[str], batch_size: int = 64) -> dict:
    """Fidelity (mean/min cosine to the teacher) and gold sparsity per layer on ``texts``."""
    cos, sparsity = [], []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        ex = student.extract(chunk)
        emb = ex.mean_pooled()
        cos.append(torch.nn.functional.cosine_similarity(emb, teacher_emb[start : start + len(chunk)], dim=-1))
        sparsity.append(torch.stack([ex.gold(layer).sparsity().mean(1) for layer in range(ex.num_layers)], 1))
    cos_all = torch.cat(cos)
    sp = torch.cat(sparsity)  # (sentences, layers)
    return {
        "cosine_mean": float(cos_all.mean()),
        "cosine_min": float(cos_all.min()),
        "gold_sparsity_per_layer": [round(float(v), 4) for v in sp.mean(0)],
        "gold_sparsity_mean": float(sp.mean()),
        "sentences": len(texts),
    }


@torch.no_grad()
def teacher_outputs(teacher, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled embeddings of the softmax teacher (the distillation target)."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        hidden = teacher(**enc).last_hidden_state
        out.append(pooled(hidden, enc["attention_mask"]))
    return torch.cat(out)


def distill(
    model_dir: Path,
    train_texts: list[str],
    eval_texts: list[str],
    out_dir: Path,
    config: DistillConfig,
    provenance: dict | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune the attention of an entmax copy of ``model_dir`` and save the adapter to ``out_dir``."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    t0 = time.perf_counter()
    teacher, tokenizer = load_hf(model_dir, attn_implementation="eager", device="cpu")
    teacher.eval()
    student_hf, _ = load_hf(model_dir, device="cpu")
    base_state = {n: p.detach().clone() for n, p in attention_parameters(student_hf).items()}
    student = EntmaxModel(student_hf, tokenizer, name=str(model_dir), alpha=config.alpha, device=torch.device("cpu"))

    eval_teacher = teacher_outputs(teacher, tokenizer, eval_texts, config.max_length)
    before = evaluate(student, eval_teacher, eval_texts)

    params = attention_parameters(student_hf)
    for p in student_hf.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    optim = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_texts) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warm = max(1, int(config.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    history = []
    bar = tqdm(total=total, desc="distil", disable=not progress)
    # Dropout off: the target is the teacher's deterministic eval-mode output.
    student_hf.eval()
    for epoch in range(config.epochs):
        order = rng.permutation(len(train_texts))
        sums = {"loss": 0.0, "cos": 0.0, "mse": 0.0, "entropy": 0.0}
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch = [train_texts[i] for i in idx]
            enc = tokenizer(batch, padding=True, truncation=True, max_length=config.max_length, return_tensors="pt")
            with torch.no_grad():
                target = teacher(**enc).last_hidden_state
            with attention.capture(keep_probs=config.sparsity_weight > 0, detach=False) as sink:
                hidden = student_hf(**enc).last_hidden_state
            mask = enc["attention_mask"].bool()
            cos = 1 - torch.nn.functional.cosine_similarity(pooled(hidden, mask), pooled(target, mask), dim=-1).mean()
            mse = ((hidden - target) ** 2).mean(-1)[mask].mean()
            loss = cos + config.hidden_weight * mse
            entropy = torch.zeros(())
            if config.sparsity_weight > 0:
                entropy = torch.stack([tsallis_entropy(r.probs, config.alpha, mask) for r in sink.records]).mean()
                loss = loss + config.sparsity_weight * entropy
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            optim.step()
            sched.step()
            for k, v in zip(sums, (loss, cos, mse, entropy), strict=True):
                sums[k] += float(v.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", cos=f"{1 - float(cos.detach()):.4f}")
        history.append({k: round(v / steps_per_epoch, 5) for k, v in sums.items()} | {"epoch": epoch + 1})
    bar.close()
    train_seconds = time.perf_counter() - t0

    tuned = {n: p.detach() for n, p in params.items()}
    deltas = low_rank_deltas(base_state, tuned, config.rank)
    manifest = {
        "kind": "sparsefinder-adapter",
        "base_model_dir": model_dir.name,
        "base_weights_sha256": weights_checksum(model_dir),
        "alpha": config.alpha,
        "tuned_parameters": sorted(tuned),
        "config": asdict(config),
        "steps": total,
        "train_sentences": len(train_texts),
        "eval_sentences": len(eval_texts),
        "history": history,
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "sparsefinder_version": __version__,
        **(provenance or {}),
    }
    save_adapter(out_dir, deltas, manifest)

    # Measure what ships: re-apply the fp16 low-rank adapter from disk to fresh weights.
    from sparsefinder.model.adapter import apply_adapter

    fresh_hf, _ = load_hf(model_dir, device="cpu")
    apply_adapter(fresh_hf, out_dir, manifest["base_weights_sha256"])
    shipped = EntmaxModel(fresh_hf, tokenizer, name="adapter", alpha=config.alpha, device=torch.device("cpu"))
    after = evaluate(shipped, eval_teacher, eval_texts)
    manifest["fidelity"] = {"before": before, "after": after}
    (Path(out_dir) / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
