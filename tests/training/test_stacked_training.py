"""Training the projection through the stacked loss (sparsefinder.training.stacked) and ``Stacked.logits``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsefinder.cli import build_parser, main
from sparsefinder.graphs import AttentionGraph
from sparsefinder.predictors import get_predictor
from sparsefinder.predictors.learned.budgets import token_hashes

VOCAB = ["[CLS]", "the", "cat", "sat", ".", "on", "mat", "[SEP]"]


def small_fit(seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = torch.tensor([6, 4, 5, 3])
    B, H, N, r = 4, 2, 6, 3
    q = torch.from_numpy(rng.normal(size=(B, H, N, r))).float()
    k = torch.from_numpy(rng.normal(size=(B, H, N, r))).float()
    edges = torch.from_numpy(rng.random((B, H, N, N)) < 0.3) | torch.eye(N, dtype=torch.bool)
    gold = AttentionGraph(edges, lengths, False)
    tokens = [[VOCAB[int(i)] for i in rng.integers(0, 8, int(n))] for n in lengths]
    pred = get_predictor("stacked", sparsity=0.5).fit(q, k, lengths, gold=gold, tokens=tokens)
    return pred, q, k, lengths, tokens


def test_logits_are_the_scores_and_differentiable():
    pred, q, k, lengths, tokens = small_fit()
    hashes = token_hashes(tokens, q.shape[0], q.shape[2])
    z = pred.logits(q, k, lengths, hashes)
    scores = pred.scores(q, k, lengths, tokens=tokens)
    # The same per-pair computation as the thresholded scores, on every valid pair.
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(z[b, :, :n, :n].double(), scores[b, :, :n, :n])
    # Gradients reach q, k and the weights (finite), and a finite-difference check on one q entry.
    qg = q.clone().double().requires_grad_(True)
    w = pred.weight_.clone().double().requires_grad_(True)
    loss = pred.logits(qg, k.double(), lengths, hashes, weight=w)[0, :, :6, :6].sum()
    loss.backward()
    assert torch.isfinite(qg.grad).all() and torch.isfinite(w.grad).all() and float(qg.grad.abs().sum()) > 0
    eps = 1e-6
    bumped = q.clone().double()
    bumped[0, 1, 2, 0] += eps
    up = float(pred.logits(bumped, k.double(), lengths, hashes, weight=w.detach())[0, :, :6, :6].sum())
    base = float(pred.logits(q.double(), k.double(), lengths, hashes, weight=w.detach())[0, :, :6, :6].sum())
    # float32 weights folded in _combine: a loose tolerance, but the sign and size must match.
    assert (up - base) / eps == pytest.approx(float(qg.grad[0, 1, 2, 0]), rel=5e-2, abs=5e-3)


def test_stacked_training_lowers_the_loss_is_seeded_and_the_cli_saves_it(tiny_model_dir, tmp_path):
    from sparsefinder.corpora.extract import extract_corpus
    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.model.entmax_model import load_model
    from sparsefinder.training.projections import Projections, train_projections
    from sparsefinder.training.stacked import train_stacked_projections

    texts = [f"Sentence number {i} talks about cats, dogs and the weather in town." for i in range(12)]
    model = load_model(str(tiny_model_dir("bert")), device="cpu")
    extract_corpus(model, texts, tmp_path / "s", progress=False)
    store = ExtractionStore.open(tmp_path / "s")
    init, history0 = train_projections(store, rank=4, loss="listwise", epochs=1, batch_size=4, lr=1e-2,
                                       progress=False, log=None)
    proj, history = train_stacked_projections(store, init, steps=60, batch_size=4, lr=1e-2, progress=False)
    assert history["config"]["loss"] == "stacked"
    for layer in map(str, range(store.num_layers)):
        rec = history["layers"][layer]
        assert rec["last_loss"] < rec["first_loss"]
    assert not torch.equal(proj.weight_q, init.weight_q)
    assert torch.equal(proj.bias_q, init.bias_q)  # frozen
    again, _ = train_stacked_projections(store, init, steps=60, batch_size=4, lr=1e-2, progress=False)
    assert torch.equal(proj.weight_q, again.weight_q)
    # The CLI: listwise first, then --loss stacked from it; the saved projections load and carry the config.
    main(["train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "lw"), "--epochs", "1"])
    main(["train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "st"), "--loss", "stacked",
          "--init", str(tmp_path / "lw"), "--steps", "5"])
    loaded = Projections.load(tmp_path / "st", store=store)
    assert loaded.manifest["config"]["loss"] == "stacked" and loaded.manifest["config"]["steps"] == 5
    with pytest.raises(SystemExit, match="--init"):
        main(["train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "x"), "--loss", "stacked"])


def test_bad_arguments():
    from sparsefinder.training.stacked import train_stacked_projections

    with pytest.raises(ValueError, match="keep"):
        train_stacked_projections(None, None, keep=0.0)  # type: ignore[arg-type]
    assert build_parser().parse_args(["train", "--store", "s", "--out", "o", "--loss", "stacked",
                                      "--init", "i"]).init == "i"
