"""The entmax backend: capture, masks, causal models, alpha, threads, truncation, adapters."""

from __future__ import annotations

import json
import shutil
import threading
import warnings

import pytest
import torch
from entmax import entmax15, entmax_bisect

from sparsefinder.model.adapter import AdapterMismatchError, apply_adapter, weights_checksum
from sparsefinder.model.entmax_model import TruncationWarning, load_hf, load_model

FAMILIES = ["bert", "roberta", "distilbert", "gpt2"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hi there", "A dog, a dog and another dog barked."]


def reference_probs(q: torch.Tensor, k: torch.Tensor, length: int, causal: bool, alpha=1.5) -> torch.Tensor:
    """Entmax recomputed from captured q, k for one sentence without padding, by the entmax package."""
    q, k = q[:, :length].double(), k[:, :length].double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    if isinstance(alpha, float) and alpha == 1.5:
        return entmax15(scores, dim=-1)
    a = torch.as_tensor(alpha, dtype=scores.dtype).view(-1, 1, 1).expand(scores.shape[0], length, 1)
    return entmax_bisect(scores, alpha=a, dim=-1, n_iter=100)


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_qk_reproduce_model_probabilities(tiny_model_dir, family):
    model = load_model(str(tiny_model_dir(family)), device="cpu")
    assert model.causal == (family == "gpt2")
    ex = model.extract(TEXTS)
    assert ex.num_layers == 2 and ex.num_heads == 4
    for layer in range(ex.num_layers):
        for b, n in enumerate(ex.lengths.tolist()):
            ref = reference_probs(ex.queries[layer][b], ex.keys[layer][b], n, model.causal)
            got = ex.probs[layer][b, :, :n, :n].double()
            assert torch.allclose(got, ref, atol=1e-5), (family, layer, b)
            assert torch.equal(got > 0, ref > 0) or (got - ref).abs().max() < 1e-6
            # Padding keys are never attended to (needs the registered mask function).
            assert float(ex.probs[layer][b, :, :n, n:].abs().sum()) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_one_by_one(tiny_model_dir, family):
    model = load_model(str(tiny_model_dir(family)), device="cpu")
    batch = model.extract(TEXTS)
    for b, text in enumerate(TEXTS):
        single = model.extract([text])
        n = int(single.lengths[0])
        assert int(batch.lengths[b]) == n
        assert batch.tokens[b] == single.tokens[0]
        for layer in range(batch.num_layers):
            assert torch.allclose(batch.probs[layer][b, :, :n, :n], single.probs[layer][0], atol=1e-5)
            assert torch.equal(batch.gold(layer).sentence(b), single.gold(layer).sentence(0))


def test_causal_model_has_no_future_edges(tiny_model_dir):
    model = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    ex = model.extract(TEXTS)
    for layer in range(ex.num_layers):
        probs = ex.probs[layer]
        n = probs.shape[-1]
        future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        assert float(probs[..., future].abs().max()) == 0.0
        g = ex.gold(layer)
        assert g.causal
        lengths = ex.lengths
        pairs = (lengths * (lengths + 1) // 2).double()
        expected = 1 - g.edges.sum((-1, -2)).double() / pairs[:, None]
        assert torch.allclose(g.sparsity(), expected)


def test_alpha_one_is_the_softmax_model(tiny_model_dir):
    path = tiny_model_dir("bert")
    model = load_model(str(path), alpha=1.0, device="cpu")
    eager, tokenizer = load_hf(path, attn_implementation="eager", device="cpu")
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        ref = eager(**enc).last_hidden_state
    ex = model.extract(TEXTS)
    mask = enc["attention_mask"].bool()
    assert torch.allclose(ex.hidden[mask], ref[mask], atol=1e-5)


def test_per_head_alpha(tiny_model_dir):
    model = load_model(str(tiny_model_dir("bert")), device="cpu")
    alpha = torch.tensor([[1.2, 1.5, 2.0, 3.0], [1.5, 1.7, 1.1, 2.5]])
    model.set_alpha(alpha)
    ex = model.extract(TEXTS[:1])
    n = int(ex.lengths[0])
    for layer in range(2):
        ref = reference_probs(ex.queries[layer][0], ex.keys[layer][0], n, False, alpha[layer])
        assert torch.allclose(ex.probs[layer][0].double(), ref, atol=1e-4)
    # Larger alpha is sparser on the same scores (alpha = 3 vs 1.2 in layer 0).
    g = ex.gold(0).sparsity()[0]
    assert g[3] >= g[0]
    with pytest.raises(ValueError, match="per-head alpha"):
        model.set_alpha(torch.ones(3, 4) * 1.5)


def test_bisection_matches_entmax15_support(tiny_model_dir):
    exact = load_model(str(tiny_model_dir("bert")), device="cpu")
    bisect = load_model(str(tiny_model_dir("bert")), device="cpu")
    bisect.set_alpha(torch.full((2, 4), 1.5000001))
    a, b = exact.extract(TEXTS), bisect.extract(TEXTS)
    for layer in range(2):
        assert torch.allclose(a.probs[layer], b.probs[layer], atol=1e-4)
        assert (a.gold(layer).edges != b.gold(layer).edges).float().mean() < 0.01


def test_threads_get_their_own_results(tiny_model_dir):
    model = load_model(str(tiny_model_dir("bert")), device="cpu")
    texts = [f"sentence number {i} " + "word " * (i % 5 + 1) for i in range(8)]
    expected = {t: model.extract([t]) for t in texts}
    barrier = threading.Barrier(len(texts))
    results: dict[str, object] = {}
    errors: list[BaseException] = []

    def work(t: str) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                results[t] = model.extract([t])
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in texts]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for t in texts:
        got, ref = results[t], expected[t]
        assert got.tokens == ref.tokens
        assert len(got.probs) == model.num_layers  # no records leaked in from other threads
        for layer in range(model.num_layers):
            assert torch.equal(got.gold(layer).edges, ref.gold(layer).edges)


def test_long_input_is_truncated_with_a_warning(tiny_model_dir):
    model = load_model(str(tiny_model_dir("bert")), device="cpu")
    long_text = "word " * 500
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = model.extract([long_text, "short"])
    assert any(issubclass(w.category, TruncationWarning) for w in caught)
    assert ex.truncated == [True, False]
    assert int(ex.lengths[0]) == model.max_length


def test_empty_input_and_unknown_model_errors():
    with pytest.raises(KeyError, match="registered models"):
        load_model("no-such-model")
    with pytest.raises(FileNotFoundError):
        load_hf("/nonexistent/model")


def test_offsets_and_word_ids(untuned_model):
    text = "Entmax isn't softmax."
    ex = untuned_model.extract([text])
    for tok, (s, e), special in zip(ex.tokens[0], ex.offsets[0], ex.special[0], strict=True):
        if special:
            assert (s, e) == (0, 0)
        else:
            assert text[s:e].lower() == tok.removeprefix("##").lower()
    words = [w for w in ex.word_ids[0] if w is not None]
    assert words == sorted(words) and words[0] == 0


def test_default_architecture_probabilities_are_exact(untuned_model):
    """The captured q/k of the real model reproduce its probabilities: scaling applied once."""
    ex = untuned_model.extract(["Researchers study sparse attention in transformers."])
    n = int(ex.lengths[0])
    for layer in range(ex.num_layers):
        ref = reference_probs(ex.queries[layer][0], ex.keys[layer][0], n, False)
        assert torch.allclose(ex.probs[layer][0].double(), ref, atol=1e-5)
    assert 0.3 < float(ex.gold(5).sparsity().mean()) < 0.99


def test_adapter_checksum_and_corruption(tmp_path, tiny_model_dir):
    from sparsefinder.model.adapter import low_rank_deltas, save_adapter

    path = tiny_model_dir("bert")
    model, _ = load_hf(path, device="cpu")
    params = dict(model.named_parameters())
    name = "encoder.layer.0.attention.self.query.weight"
    base = {name: params[name].detach().clone()}
    tuned = {name: base[name] + 0.01 * torch.randn_like(base[name])}
    checksum = weights_checksum(path)
    save_adapter(tmp_path / "ok", low_rank_deltas(base, tuned, rank=None), {"base_weights_sha256": checksum})
    apply_adapter(model, tmp_path / "ok", checksum)
    assert torch.allclose(params[name], tuned[name], atol=1e-3)  # fp16 storage

    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ok", bad)
    (bad / "manifest.json").write_text(json.dumps({"base_weights_sha256": "0" * 64}))
    with pytest.raises(AdapterMismatchError, match="refusing"):
        apply_adapter(model, bad, checksum)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tmp_path / "ok", corrupt)
    (corrupt / "adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterMismatchError, match="unreadable"):
        apply_adapter(model, corrupt, checksum)
    (corrupt / "manifest.json").write_text("{not json")
    with pytest.raises(AdapterMismatchError, match="not valid JSON"):
        apply_adapter(model, corrupt, checksum)


def test_default_model_loads_its_verified_adapter():
    """The shipped adapter applies over the packaged weights and moves the model towards the softmax original."""
    from sparsefinder.model.catalogue import default_model_name, get_spec

    name = default_model_name()
    tuned = load_model(name, device="cpu")
    manifest = tuned.adapter_manifest
    assert manifest["base_weights_sha256"] == weights_checksum(get_spec(name).resolve_path())
    assert manifest["alpha"] == 1.5 and manifest["fidelity"]["after"]["cosine_mean"] > 0.95
    texts = ["The council approved the new budget on Tuesday.", "Fires burned across the state overnight."]
    softmax, tokenizer = load_hf(get_spec(name).resolve_path(), attn_implementation="eager", device="cpu")
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = softmax(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    reference = (hidden * mask).sum(1) / mask.sum(1)
    untuned = load_model(name, device="cpu", use_adapter=False)
    cos_tuned = torch.nn.functional.cosine_similarity(tuned.embed(texts), reference).mean()
    cos_untuned = torch.nn.functional.cosine_similarity(untuned.embed(texts), reference).mean()
    assert cos_tuned > cos_untuned and cos_tuned > 0.95
