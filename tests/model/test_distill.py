"""Distillation of a softmax model into an entmax one: improves fidelity, seeded, adapter round trip."""

from __future__ import annotations

import json

import torch

from sparsefinder.kernels.entmax import entmax
from sparsefinder.model.adapter import read_manifest
from sparsefinder.model.distill import DistillConfig, distill, tsallis_entropy

TRAIN = [f"the {a} {b} sat on the {c} mat" for a in ("big", "small", "red") for b in ("cat", "dog") for c in
         ("old", "new", "wet", "dry")]
EVAL = ["a small red dog sat on the mat", "the old cat sat", "the wet dog on the new mat"]


def test_tsallis_entropy_orders_sparse_below_dense():
    scores = torch.randn(2, 3, 5, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    sharp, flat = entmax(scores * 10), entmax(scores * 0.1)
    assert tsallis_entropy(sharp, 1.5, mask) < tsallis_entropy(flat, 1.5, mask)
    one_hot = torch.zeros(1, 1, 2, 4)
    one_hot[..., 0] = 1
    assert float(tsallis_entropy(one_hot, 1.5, torch.ones(1, 2, dtype=torch.bool))) == 0.0


def test_distill_improves_fidelity_and_is_reproducible(tmp_path, tiny_model_dir):
    path = tiny_model_dir("bert")
    config = DistillConfig(epochs=6, batch_size=8, lr=3e-3, rank=None, seed=3)
    m1 = distill(path, TRAIN, EVAL, tmp_path / "a", config, progress=False)
    before, after = m1["fidelity"]["before"], m1["fidelity"]["after"]
    assert after["cosine_mean"] > before["cosine_mean"]
    assert len(after["gold_sparsity_per_layer"]) == 2
    assert read_manifest(tmp_path / "a")["base_weights_sha256"] == m1["base_weights_sha256"]
    m2 = distill(path, TRAIN, EVAL, tmp_path / "b", config, progress=False)
    adapter_bytes = [(tmp_path / d / "adapter.safetensors").read_bytes() for d in ("a", "b")]
    assert adapter_bytes[0] == adapter_bytes[1]
    assert m1["history"] == m2["history"]
    json.dumps(m1)  # the manifest is plain JSON


def test_sparsity_penalty_keeps_attention_sparser(tmp_path, tiny_model_dir):
    path = tiny_model_dir("bert")
    plain = distill(path, TRAIN, EVAL, tmp_path / "p", DistillConfig(epochs=4, batch_size=8, lr=3e-3, rank=4),
                    progress=False)
    sparse = distill(path, TRAIN, EVAL, tmp_path / "s",
                     DistillConfig(epochs=4, batch_size=8, lr=3e-3, rank=4, sparsity_weight=5.0), progress=False)
    assert sparse["fidelity"]["after"]["gold_sparsity_mean"] > plain["fidelity"]["after"]["gold_sparsity_mean"]
