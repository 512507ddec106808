"""Learned projections (sparsefinder.training.projections): negative sampling, the margin loss, training, artifacts."""

from __future__ import annotations

import json
import math
import shutil
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file as np_load_file

from sparsefinder import __version__
from sparsefinder.corpora.extract import extract_corpus
from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.graphs import AttentionGraph
from sparsefinder.model.entmax_model import load_model
from sparsefinder.training.losses import margin_loss, sample_negatives
from sparsefinder.training.projections import (
    MANIFEST_FILE,
    TENSORS_FILE,
    ProjectionFileError,
    ProjectionMismatchError,
    Projections,
    evaluate_projections,
    projection_manifest,
    train_projections,
)
from tests.helpers import graph_cases

SUBJECTS = ["The cat", "A dog", "My friend", "The old man", "Her sister", "Our teacher"]
PREDICATES = ["saw the bird", "ate an apple quickly", "went to the market on Monday", "reads books",
              "likes to sing loudly in the rain"]
TEXTS = [f"{s} {p}." for s in SUBJECTS for p in PREDICATES]  # 30 short sentences
TRAIN, VAL = list(range(24)), list(range(24, 30))
# Few sentences, so take many small steps at a higher rate than the defaults to see learning in a test.
FAST = dict(batch_size=4, lr=1e-2, progress=False, log=None)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stores_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("proj-stores")


@pytest.fixture(scope="module")
def bert_store(bert, stores_dir) -> ExtractionStore:
    extract_corpus(bert, TEXTS, stores_dir / "bert", progress=False, corpus_name="toy", split="train")
    return ExtractionStore.open(stores_dir / "bert")


@pytest.fixture(scope="module")
def gpt2_store(gpt2, stores_dir) -> ExtractionStore:
    extract_corpus(gpt2, TEXTS, stores_dir / "gpt2", progress=False, corpus_name="toy", split="train")
    return ExtractionStore.open(stores_dir / "gpt2")


@pytest.fixture(scope="module")
def trained(bert_store) -> tuple[Projections, dict]:
    return train_projections(bert_store, TRAIN, VAL, epochs=4, seed=0, **FAST)


@pytest.fixture(scope="module")
def saved(trained, bert_store, tmp_path_factory) -> Path:
    proj, history = trained
    out = tmp_path_factory.mktemp("proj") / "bert-proj"
    proj.save(out, projection_manifest(bert_store, history["config"], history))
    return out


# --------------------------------------------------------------------------- independent references


def loop_loss(qp: torch.Tensor, kp: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, lengths: torch.Tensor,
              margin: float = 1.0) -> float:
    """docs/method.md §3 written out with Python loops and float64 scalars."""
    B, H, N, r = qp.shape
    total = 0.0
    for b in range(B):
        n = int(lengths[b])
        for h in range(H):
            s = 0.0
            for i in range(n):
                ps = [j for j in range(N) if pos[b, h, i, j]]
                if not ps:
                    continue

                def dist(j: int, b=b, h=h, i=i) -> float:
                    return sum((float(qp[b, h, i, c]) - float(kp[b, h, j, c])) ** 2 for c in range(r))

                hinge = margin + sum(dist(j) for j in ps) - sum(dist(j) for j in range(N) if neg[b, h, i, j])
                s += max(0.0, hinge)
            total += s / max(n, 1)
    return total / (B * H)


def brute_project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x'[..., h, n, c] = Σ_e x[..., h, n, e] W[h, e, c] + b[h, c], one head at a time."""
    out = torch.empty(*x.shape[:-1], w.shape[-1], dtype=torch.float64)
    for h in range(w.shape[0]):
        out[..., h, :, :] = x[..., h, :, :].double() @ w[h].double() + b[h].double()
    return out


def separation(proj: Projections, store: ExtractionStore, layer: int, indices: list[int]) -> tuple[float, float]:
    """Mean projected squared distance over gold pairs, and over valid non-gold pairs (pooled)."""
    gold_d, other_d = [], []
    for i in indices:
        s = store.sentence(i)
        qp, kp = proj.project(layer, s.queries(layer), s.keys(layer))  # (H, n, r)
        d = ((qp[:, :, None, :] - kp[:, None, :, :]) ** 2).sum(-1)
        g = s.gold(layer)
        n = s.length
        valid = torch.tril(torch.ones(n, n, dtype=torch.bool)) if store.causal else torch.ones(n, n, dtype=torch.bool)
        gold_d.append(d[g])
        other_d.append(d[~g & valid])
    return float(torch.cat(gold_d).mean()), float(torch.cat(other_d).mean())


def random_graph(seed: int, B: int, H: int, N: int, causal: bool, density: float) -> AttentionGraph:
    rng = np.random.default_rng(seed)
    lengths = torch.from_numpy(rng.integers(0, N + 1, size=B))
    edges = torch.from_numpy(rng.random((B, H, N, N)) < density)
    return AttentionGraph(edges, lengths, causal)


# --------------------------------------------------------------------------- negative sampling


@settings(max_examples=60, deadline=None)
@given(**graph_cases(3, 8, density=st.sampled_from([0.0, 0.1, 0.4, 0.7, 1.0])))
def test_sample_negatives_invariants(seed, B, H, N, causal, density):
    gold = random_graph(seed, B, H, N, causal, density)
    neg = sample_negatives(gold, torch.Generator().manual_seed(seed))
    assert neg.shape == gold.edges.shape and neg.dtype == torch.bool
    for b in range(B):
        n = int(gold.lengths[b])
        for h in range(H):
            for i in range(N):
                row = neg[b, h, i]
                if i >= n:  # a padding query draws nothing
                    assert not row.any()
                    continue
                allowed = [j for j in range(n) if (j <= i or not causal)]
                positives = [j for j in allowed if gold.edges[b, h, i, j]]
                available = [j for j in allowed if j not in positives]
                drawn = row.nonzero().flatten().tolist()
                assert set(drawn) <= set(available)  # never a positive, padding or (causal) future key
                assert len(drawn) == min(len(positives), len(available))
    again = sample_negatives(gold, torch.Generator().manual_seed(seed))
    assert torch.equal(neg, again)


def test_sample_negatives_uniform_without_replacement():
    # 3000 copies of one query row: positives {0, 3}; the six other real keys are the candidates,
    # the two last positions are padding. Each 2-subset of the candidates must be about equally likely.
    copies, N = 3000, 10
    edges = torch.zeros(copies, 1, N, N, dtype=torch.bool)
    edges[:, 0, 0, [0, 3]] = True
    gold = AttentionGraph(edges, torch.full((copies,), 8), causal=False)
    neg = sample_negatives(gold, torch.Generator().manual_seed(7))[:, 0, 0]
    assert (neg.sum(-1) == 2).all()
    candidates = [1, 2, 4, 5, 6, 7]
    assert not neg[:, [0, 3, 8, 9]].any()
    per_key = neg[:, candidates].sum(0).double() / copies
    assert torch.allclose(per_key, torch.full_like(per_key, 1 / 3), atol=0.04)
    counts = {pair: int((neg[:, list(pair)].all(-1)).sum()) for pair in combinations(candidates, 2)}
    expected = copies / 15
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 40, counts  # 14 degrees of freedom: P(chi2 > 40) < 0.001


# --------------------------------------------------------------------------- the loss


def test_margin_loss_hand_example():
    # One sentence, two tokens, r = 1: q' = (0, 0.6), k' = (0, 1); gold: 0 -> 0, 1 -> 1.
    # The only negatives: 0 -> 1 and 1 -> 0. ℓ_0 = max(0, 1 + 0 - 1) = 0, ℓ_1 = 1 + 0.16 - 0.36 = 0.8.
    qp = torch.tensor([0.0, 0.6]).view(1, 1, 2, 1)
    kp = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1)
    gold = AttentionGraph(torch.eye(2, dtype=torch.bool).view(1, 1, 2, 2), torch.tensor([2]))
    loss = margin_loss(qp, kp, gold, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(0.8 / 2)


@settings(max_examples=30, deadline=None)
@given(**graph_cases(3, 7, margin=st.sampled_from([0.5, 1.0, 3.0])))
def test_margin_loss_matches_loop(seed, B, H, N, causal, margin):
    gold = random_graph(seed, B, H, N, causal, 0.3)
    g = torch.Generator().manual_seed(seed)
    qp, kp = torch.randn(B, H, N, 3, generator=g), torch.randn(B, H, N, 3, generator=g)
    neg = sample_negatives(gold, torch.Generator().manual_seed(seed + 1))
    got = margin_loss(qp, kp, gold, margin=margin, negatives=neg)
    assert got.item() == pytest.approx(loop_loss(qp, kp, gold.edges, neg, gold.lengths, margin), rel=1e-5, abs=1e-5)
    # Given a generator, it draws exactly what sample_negatives draws from the same seed.
    drawn = margin_loss(qp, kp, gold, torch.Generator().manual_seed(seed + 1), margin=margin)
    assert drawn.item() == got.item()


def test_margin_loss_on_stored_batch(bert_store):
    proj = Projections(bert_store.num_layers, bert_store.num_heads, bert_store.head_dim, seed=3)
    batch = next(bert_store.iter_batches(1, 7))
    qp, kp = proj.project(1, batch.queries, batch.keys)
    neg = sample_negatives(batch.gold, torch.Generator().manual_seed(0))
    got = margin_loss(qp, kp, batch.gold, negatives=neg)
    assert got.item() == pytest.approx(loop_loss(qp, kp, batch.gold.edges, neg, batch.lengths), rel=1e-5)
    # Padding changes nothing: the batch loss is the mean of each sentence's loss computed unpadded.
    assert int(batch.lengths.min()) < batch.queries.shape[2]
    alone = []
    for b, n in enumerate(batch.lengths.tolist()):
        g = AttentionGraph(batch.gold.edges[b : b + 1, :, :n, :n], batch.lengths[b : b + 1])
        alone.append(margin_loss(qp[b : b + 1, :, :n], kp[b : b + 1, :, :n], g, negatives=neg[b : b + 1, :, :n, :n]))
    assert got.item() == pytest.approx(torch.stack(alone).mean().item(), rel=1e-5)


def test_margin_loss_gradients_ignore_padding(bert_store):
    batch = next(bert_store.iter_batches(0, 5))
    qp = torch.randn(*batch.queries.shape[:3], 4, requires_grad=True)
    kp = torch.randn(*batch.keys.shape[:3], 4, requires_grad=True)
    margin_loss(qp, kp, batch.gold, torch.Generator().manual_seed(0)).backward()
    pad = ~batch.padding_mask()[:, None, :].expand(-1, qp.shape[1], -1)
    assert pad.any()
    assert (qp.grad[pad] == 0).all() and (kp.grad[pad] == 0).all()


# --------------------------------------------------------------------------- projections


@pytest.mark.parametrize("shared", [True, False])
def test_projection_matches_bruteforce(shared):
    proj = Projections(3, 2, 5, rank=4, shared=shared, seed=11)
    with torch.no_grad():  # nonzero biases, so the test sees them
        proj.bias_q.normal_(generator=torch.Generator().manual_seed(1))
        if not shared:
            proj.bias_k.normal_(generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 2, 6, 5, generator=torch.Generator().manual_seed(0))
    assert (proj.num_layers, proj.num_heads, proj.head_dim, proj.rank, proj.shared) == (3, 2, 5, 4, shared)
    got_q = proj.project_queries(2, x)
    assert got_q.shape == (2, 2, 6, 4)
    assert torch.allclose(got_q.double(), brute_project(x, proj.weight_q[2], proj.bias_q[2]), atol=1e-5)
    wk, bk = (proj.weight_q, proj.bias_q) if shared else (proj.weight_k, proj.bias_k)
    assert torch.allclose(proj.project_keys(-1, x).double(), brute_project(x, wk[2], bk[2]), atol=1e-5)
    assert torch.equal(proj.project_keys(2, x), got_q) == shared
    assert proj.project_queries(0, x[0]).shape == (2, 6, 4)  # one unbatched (H, n, d) sentence
    with pytest.raises(ValueError, match="d=5"):
        proj.project_queries(0, torch.zeros(1, 2, 3, 4))
    with pytest.raises(IndexError):
        proj.project_queries(3, x)


def test_projection_init_is_seeded():
    a, b, c = Projections(2, 3, 8, seed=0), Projections(2, 3, 8, seed=0), Projections(2, 3, 8, seed=1)
    assert torch.equal(a.weight_q, b.weight_q) and not torch.equal(a.weight_q, c.weight_q)
    assert a.weight_q.abs().max() <= 1 / math.sqrt(8) and (a.bias_q == 0).all()


# --------------------------------------------------------------------------- training


def test_training_lowers_loss_and_separates(trained, bert_store):
    proj, history = trained
    initial = Projections(bert_store.num_layers, bert_store.num_heads, bert_store.head_dim, seed=0)
    assert proj.layers == (0, 1)
    for layer in range(bert_store.num_layers):
        rec = history["layers"][str(layer)]
        assert len(rec["train_loss"]) == len(rec["val_loss"]) == 4
        assert rec["train_loss"][-1] < 0.6 * rec["initial_train_loss"]
        assert rec["val_loss"][-1] < 0.6 * rec["initial_val_loss"]
        # The history's numbers are those an independent evaluation gives (same fixed negatives).
        before = evaluate_projections(initial, bert_store, layer, VAL, batch_size=4)
        after = evaluate_projections(proj, bert_store, layer, VAL, batch_size=4)
        assert after < 0.6 * before
        gold_before, other_before = separation(initial, bert_store, layer, VAL)
        gold_after, other_after = separation(proj, bert_store, layer, VAL)
        assert gold_after < other_after  # gold keys are nearer than the rest, on held-out sentences
        assert gold_after / other_after < gold_before / other_before
    assert history["train_loss"] == pytest.approx(
        [np.mean([history["layers"][str(x)]["train_loss"][e] for x in (0, 1)]) for e in range(4)]
    )
    assert history["val_sentences"] == 6 and history["train_sentences"] == 24


def test_training_is_seeded(bert_store):
    def weights(seed: int, layers=None) -> dict[str, torch.Tensor]:
        p, _ = train_projections(bert_store, TRAIN, VAL, epochs=1, seed=seed, layers=layers, **FAST)
        return dict(p.named_buffers())

    a, b, c = weights(5), weights(5), weights(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["weight_q"], c["weight_q"])
    # Each layer has its own random streams: training layer 1 alone gives the same layer 1.
    alone = weights(5, layers=[1])
    assert torch.equal(alone["weight_q"][1], a["weight_q"][1])


def test_training_logs_and_untrained_layers(bert_store):
    lines: list[str] = []
    proj, history = train_projections(bert_store, TRAIN, VAL, epochs=2, layers=[-1], seed=0,
                                      batch_size=8, progress=False, log=lines.append)
    assert proj.layers == (1,) and list(history["layers"]) == ["1"]
    assert sum("layer 1 epoch" in x and "validation loss" in x for x in lines) == 2
    batch = next(bert_store.iter_batches(0, 2))
    with pytest.raises(ValueError, match="no trained projection"):
        proj.project_queries(0, batch.queries)
    with pytest.raises(ValueError, match="also training"):
        train_projections(bert_store, TRAIN, [0, 25], progress=False, log=None)


def test_separate_query_and_key_maps(bert_store, tmp_path):
    proj, history = train_projections(bert_store, TRAIN, VAL, epochs=3, shared=False, seed=0, **FAST)
    assert not proj.shared and not torch.equal(proj.weight_q, proj.weight_k)
    assert not torch.equal(proj.bias_q, proj.bias_k)  # the bias no longer cancels, so it learns
    for rec in history["layers"].values():
        assert rec["val_loss"][-1] < 0.7 * rec["initial_val_loss"]
    s = bert_store.sentence(25)
    assert torch.allclose(proj.project_keys(0, s.keys(0)).double(),
                          brute_project(s.keys(0), proj.weight_k[0], proj.bias_k[0]), atol=1e-5)
    proj.save(tmp_path, projection_manifest(bert_store, history["config"], history))
    back = Projections.load(tmp_path, store=bert_store)
    assert not back.shared and torch.equal(back.weight_k, proj.weight_k)


def test_causal_store(gpt2_store, gpt2, bert, tmp_path):
    assert gpt2_store.causal
    batch = next(gpt2_store.iter_batches(0, 8))
    neg = sample_negatives(batch.gold, torch.Generator().manual_seed(0))
    assert not torch.triu(neg, diagonal=1).any() and not (neg & batch.gold.edges).any()
    proj, history = train_projections(gpt2_store, TRAIN, VAL, epochs=3, seed=0, **FAST)
    for layer in (0, 1):
        rec = history["layers"][str(layer)]
        assert rec["val_loss"][-1] < 0.6 * rec["initial_val_loss"]
        gold_d, other_d = separation(proj, gpt2_store, layer, VAL)
        assert gold_d < other_d
    proj.save(tmp_path, projection_manifest(gpt2_store, history["config"], history))
    Projections.load(tmp_path, model=gpt2, store=gpt2_store)
    with pytest.raises(ProjectionMismatchError, match="causal"):
        Projections.load(tmp_path, model=bert)


def test_validation_on_a_second_store(bert, gpt2_store, bert_store, tmp_path):
    extract_corpus(bert, TEXTS[24:], tmp_path / "val", progress=False, corpus_name="toy", split="validation")
    val = ExtractionStore.open(tmp_path / "val")
    _, history = train_projections(bert_store, TRAIN, val, epochs=1, seed=0, **FAST)
    _, same = train_projections(bert_store, TRAIN, VAL, epochs=1, seed=0, **FAST)
    assert history["val_sentences"] == 6 and history["val_store"]["split"] == "validation"
    # The same sentences, so the same validation losses as when they are indices of the training store.
    assert history["layers"]["0"]["val_loss"] == pytest.approx(same["layers"]["0"]["val_loss"], rel=1e-5)
    with pytest.raises(ProjectionMismatchError):
        train_projections(bert_store, TRAIN, gpt2_store, epochs=1, progress=False, log=None)


# --------------------------------------------------------------------------- artifacts


def test_save_load_round_trip(saved, trained, bert, bert_store):
    proj, history = trained
    assert sorted(p.name for p in saved.iterdir()) == [MANIFEST_FILE, TENSORS_FILE]
    back = Projections.load(saved, model=bert, store=bert_store)
    assert back.layers == proj.layers and back.shared == proj.shared and back.rank == 4
    for name, buf in proj.named_buffers():
        assert torch.equal(dict(back.named_buffers())[name], buf)
    s = bert_store.sentence(3)
    assert torch.equal(back.project_queries(1, s.queries(1)), proj.project_queries(1, s.queries(1)))
    # Plain safetensors and JSON, readable without this library.
    raw = np_load_file(str(saved / TENSORS_FILE))
    assert raw["weight_q"].shape == (2, 4, 8, 4) and raw["bias_q"].shape == (2, 4, 4)
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    assert back.manifest == manifest
    m = bert_store.manifest
    assert manifest["model"] == m["model"] and manifest["weights_sha256"] == m["weights_sha256"]
    assert manifest["alpha"] == 1.5 and manifest["rank"] == 4 and manifest["shared"] is True
    assert (manifest["corpus"], manifest["split"], manifest["seed"]) == ("toy", "train", 0)
    assert manifest["losses"]["val_loss"] == history["val_loss"]
    assert manifest["train"]["sentences"] == 24 and manifest["validation"]["sentences"] == 6
    assert manifest["sparsefinder_version"] == __version__
    # A rebuild from the same store and seed gives the same manifest (no timestamps).
    assert projection_manifest(bert_store, history["config"], history) == {
        k: v for k, v in manifest.items()
        if k not in ("format", "format_version", "layers", "tensors_file", "tensors_sha256")
    }


def test_load_refuses_other_models(saved, gpt2, gpt2_store, tiny_model_dir):
    with pytest.raises(ProjectionMismatchError, match="not for this model"):
        Projections.load(saved, model=gpt2)
    with pytest.raises(ProjectionMismatchError, match="not for this store"):
        Projections.load(saved, store=gpt2_store)
    path = str(tiny_model_dir("bert"))
    with pytest.raises(ProjectionMismatchError, match="alpha"):
        Projections.load(saved, model=load_model(path, alpha=2.0, device="cpu"))
    other = load_model(path, device="cpu")
    with torch.no_grad():
        next(other.model.parameters()).add_(1e-3)  # same name and shape, other weights
    with pytest.raises(ProjectionMismatchError, match="weights"):
        Projections.load(saved, model=other)
    renamed = load_model(path, device="cpu")
    renamed.name = "a label only"
    Projections.load(saved, model=renamed)  # the same weights under another name are accepted
    assert issubclass(ProjectionMismatchError, ValueError)


def _copy(saved: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(saved, out)
    return out


def test_load_refuses_corrupt_files(saved, tmp_path):
    d = _copy(saved, tmp_path)
    data = bytearray((d / TENSORS_FILE).read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside a weight: still parses, digest differs
    (d / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(ProjectionFileError, match="corrupt"):
        Projections.load(d)

    # Truncated, with the manifest's digest updated to match: the safetensors parser must refuse it.
    d = _copy(saved, tmp_path / "t")
    (d / TENSORS_FILE).write_bytes((saved / TENSORS_FILE).read_bytes()[:100])
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    from sparsefinder.artifacts import file_sha256

    manifest["tensors_sha256"] = file_sha256(d / TENSORS_FILE)
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ProjectionFileError, match="unreadable"):
        Projections.load(d)

    d = _copy(saved, tmp_path / "m")
    (d / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ProjectionFileError, match="not valid JSON"):
        Projections.load(d)

    d = _copy(saved, tmp_path / "v")
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    (d / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ProjectionFileError, match="format version 99"):
        Projections.load(d)

    d = _copy(saved, tmp_path / "x")
    (d / TENSORS_FILE).unlink()
    with pytest.raises(ProjectionFileError, match="missing"):
        Projections.load(d)
    with pytest.raises(ProjectionFileError, match="missing"):
        Projections.load(tmp_path / "nowhere")


def test_save_refuses_inconsistent_manifest(trained, tmp_path):
    proj, _ = trained
    with pytest.raises(ValueError, match="rank"):
        proj.save(tmp_path, {"rank": 8})
