"""Learned neighbour degree: the soft window, training with the model frozen, the test-time predictor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefinder.evaluation import approximate as ap
from sparsefinder.evaluation.windows import (
    LearnedWindowPredictor,
    WindowConfig,
    hard_radii,
    learned_methods,
    load_windows,
    save_windows,
    soft_window_bias,
    train_windows,
    windows_key,
)
from sparsefinder.model import attention
from sparsefinder.model.entmax_model import load_model
from sparsefinder.predictors import NotFittedError

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A cat sat on the mat and looked at the bird in the tree.",
    "Researchers study sparse attention in transformers every single day.",
    "The committee approved the new budget after a long debate on Tuesday.",
    "Heavy rain flooded the old town centre overnight.",
    "She gave the book to her brother before leaving for work.",
    "Markets fell sharply as investors worried about rising interest rates.",
    "The children played football in the park until it got dark.",
]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-2.0, 9.0), min_size=1, max_size=4), st.lists(st.integers(0, 9), min_size=1, max_size=3),
       st.booleans(), st.booleans())
def test_predictor_equals_brute_force_band(radii, lengths, causal, glob):
    heads, n = len(radii), max(lengths) + 1
    pred = LearnedWindowPredictor.from_radii(radii, global_tokens=glob)
    q = torch.randn(len(lengths), heads, n, 3)
    graph = pred.predict(q, None, lengths, causal=causal)
    for b, nb in enumerate(lengths):
        for h, rho in enumerate(radii):
            r = max(0, int(np.round(rho)))  # round half to even, like torch.round
            for i in range(n):
                for j in range(n):
                    keep = abs(i - j) <= r or (glob and (i in (0, nb - 1) or j in (0, nb - 1)))
                    want = i < nb and j < nb and keep and (not causal or j <= i)
                    assert bool(graph.edges[b, h, i, j]) == want


def test_predictor_state_and_errors():
    pred = LearnedWindowPredictor.from_radii([0.4, 2.6], sparsity_weight=0.1)
    assert hard_radii(pred.radii_).tolist() == [0, 3]
    copy = LearnedWindowPredictor(**pred.get_params()).load_state_dict(pred.state_dict())
    assert torch.equal(copy.radii_, pred.radii_)
    with pytest.raises(NotFittedError, match="train_windows"):
        LearnedWindowPredictor().fit(None, None, None)
    with pytest.raises(NotFittedError):
        LearnedWindowPredictor().predict(torch.zeros(1, 2, 3, 1), None, [3])
    with pytest.raises(ValueError, match="2 heads"):
        pred.predict(torch.zeros(1, 3, 4, 1), None, [4])
    with pytest.raises(ValueError, match="finite"):
        LearnedWindowPredictor.from_radii([float("nan")])
    with pytest.raises(ValueError, match="tau"):
        LearnedWindowPredictor(tau=-1.0).from_radii([1.0], tau=-1.0)


def test_soft_bias_is_the_log_keep_weight():
    radii = torch.tensor([0.0, 2.0])
    bias = soft_window_bias(radii, 5, tau=0.5)
    assert bias.shape == (1, 2, 5, 5)
    for h, rho in enumerate(radii.tolist()):
        for i in range(5):
            for j in range(5):
                m = 1 / (1 + np.exp(-(rho + 0.5 - abs(i - j)) / 0.5))
                assert float(bias[0, h, i, j]) == pytest.approx(np.log(m), rel=1e-5, abs=1e-6)


def test_small_temperature_soft_window_matches_the_hard_window(bert):
    """As tau -> 0 the relaxation becomes the test-time window (integer radii)."""
    radii = torch.tensor([[1.0, 0.0, 3.0, 2.0], [2.0, 1.0, 0.0, 4.0]])
    batches = ap.prepare_batches(bert, TEXTS, batch_size=4)
    preds = {layer: LearnedWindowPredictor.from_radii(radii[layer]) for layer in (0, 1)}
    hard = ap.run_approximation(bert, batches, ap.method_graphs("learned-window", predictors=preds), [0, 1])
    embs = []
    for batch in batches:
        def hook(layer, q, k, scores):
            return soft_window_bias(radii[layer], scores.shape[-1], tau=0.005)

        with torch.inference_mode(), attention.restrict_support(hook):
            out = bert.model(**batch.inputs)
        mask = batch.inputs["attention_mask"][..., None].float()
        embs.append(((out.last_hidden_state * mask).sum(1) / mask.sum(1), batch.sentence_ids))
    soft = torch.zeros_like(hard.embeddings)
    for e, ids in embs:
        soft[ids] = e
    assert ap.embedding_cosines(hard.embeddings, soft).min() > 0.9999


def test_training_moves_only_the_radii_and_larger_lambda_gives_smaller_windows(bert):
    before = {n: p.detach().clone() for n, p in bert.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in bert.model.named_parameters()}
    cfg = dict(tau=1.0, init_radius=6.0, lr=0.5, epochs=4, batch_size=4, seed=0)
    free = train_windows(bert, TEXTS, WindowConfig(sparsity_weight=0.0, **cfg))
    tight = train_windows(bert, TEXTS, WindowConfig(sparsity_weight=1.0, **cfg))
    for n, p in bert.model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None, n
        assert p.requires_grad == flags[n]
    assert free.layers == tight.layers == (0, 1)
    assert not torch.equal(tight.radii, torch.full_like(tight.radii, 6.0))  # the radii did learn
    assert float(tight.radii.mean()) < float(free.radii.mean()) - 1.0
    assert tight.history[-1]["density"] < free.history[-1]["density"]
    assert all(np.isfinite(h["loss"]) for h in free.history + tight.history)
    # Seeded: the same config gives the same radii.
    again = train_windows(bert, TEXTS, WindowConfig(sparsity_weight=1.0, **cfg))
    assert torch.equal(again.radii, tight.radii)


def test_mlm_training_and_layer_subset(tiny_model_dir, tmp_path):
    mlm = load_model(str(tiny_model_dir("bert-mlm")), device="cpu", task="masked-lm")
    w = train_windows(mlm, TEXTS, WindowConfig(sparsity_weight=0.5, epochs=1, batch_size=4, global_tokens=True),
                      layers="later")
    assert w.layers == (1,)
    assert torch.isnan(w.radii[0]).all() and torch.isfinite(w.radii[1]).all()
    assert w.widths()[0].tolist() == [-1] * 4
    # Round trip through safetensors, then straight into the curves.
    key = windows_key(w, "later")
    save_windows({key: w}, tmp_path / "win")
    loaded = load_windows(tmp_path / "win")
    assert list(loaded) == [key] and list(loaded[key]) == [1]
    assert torch.equal(loaded[key][1].radii_, w.radii[1]) and loaded[key][1].global_tokens
    learned = learned_methods([tmp_path / "win"])
    assert list(learned) == ["learned-window+global"]
    frame = ap.sparsity_accuracy_curve(mlm, TEXTS, list(learned), layers=["all", "later"],
                                       learned=learned, batch_size=4, references=False)
    assert list(frame.layers) == ["later"] and frame.mlm_loss.notna().all()
    assert json.loads(frame.params.iloc[0]) == {"global_tokens": True, "layers": "later", "sparsity_weight": 0.5}


def test_bad_inputs(bert, tmp_path):
    with pytest.raises(ValueError, match="tau"):
        soft_window_bias(torch.zeros(2), 3, tau=0.0)
    with pytest.raises(ValueError, match="config"):
        train_windows(bert, TEXTS, WindowConfig(epochs=0))
    with pytest.raises(FileNotFoundError):
        load_windows(tmp_path / "nothing")
