"""Gold-bits capture (#13 item 4, long inputs): the support packed inside the attention call.

Checked against independent references: ``numpy.packbits`` for the torch packing, ``probs > 0`` of the
normal (float probabilities) mode for the bits of every tiny family, one text at a time for a padded
batch, and a store written from the normal mode for the store writer (every array compared).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from sparsefinder.corpora.extract import extract_corpus
from sparsefinder.graphs import AttentionGraph
from sparsefinder.model import attention
from sparsefinder.model.entmax_model import EntmaxModel, load_model
from sparsefinder.model.gold_bits import packbits

FAMILIES = ["bert", "gpt2", "llama", "mistral-sw", "gemma2", "modernbert"]
TEXTS = [
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "Hello there.",
    "A third sentence, somewhat longer than the second one, for padding.",
    "Odd.",
]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tiny_model_dir):
    return request.param, load_model(str(tiny_model_dir(request.param)), device="cpu")


@settings(max_examples=60, deadline=None)
@given(bits=st.lists(st.booleans(), min_size=0, max_size=70))
def test_packbits_equals_numpy(bits):
    flat = torch.tensor(bits, dtype=torch.bool)
    want = np.packbits(np.asarray(bits, dtype=bool))
    assert np.array_equal(packbits(flat).numpy(), want)


def test_gold_bits_equal_the_support_of_the_normal_mode(family_model):
    family, model = family_model
    normal = model.extract(TEXTS)
    packed = model.extract(TEXTS, gold_bits=True)
    assert packed.gold_packed is not None and normal.gold_packed is None
    # No float probabilities are kept in the gold-bits mode, and q/k are the same numbers.
    assert all(p.numel() == 0 for p in packed.probs)
    with torch.inference_mode(), attention.capture(gold_bits=True, lengths=[int(n) for n in packed.lengths],
                                                   causal=model.causal, windows=model.windows) as sink:
        enc, _ = model.tokenize(TEXTS)
        model.model(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    # Not even an empty view of the probabilities: a view would keep their whole storage alive.
    assert all(r.probs.untyped_storage().nbytes() == 0 for r in sink.records)
    assert all(len(r.gold_bits) == len(TEXTS) for r in sink.records)
    for layer in range(model.num_layers):
        assert torch.equal(packed.queries[layer], normal.queries[layer])
        assert torch.equal(packed.keys[layer], normal.keys[layer])
        want = AttentionGraph(normal.probs[layer] > 0, normal.lengths, normal.causal, normal.window(layer))
        got = packed.gold(layer)
        assert got.window == want.window and got.causal == want.causal
        assert torch.equal(got.edges, want.edges), f"{family} layer {layer}"
        for b in range(len(TEXTS)):
            assert packed.gold_packed[layer][b].dtype == np.uint8
            assert np.array_equal(packed.gold_bits(layer, b), want.pack(b))
            assert np.array_equal(normal.gold_bits(layer, b), want.pack(b))
    # A graph with edges (a gold that is all zeros would pass trivially).
    assert int(packed.gold(0).num_edges().sum()) > 0


def test_gold_bits_padded_batch_equals_one_by_one(family_model):
    _, model = family_model
    batch = model.extract(TEXTS, gold_bits=True)
    for b, text in enumerate(TEXTS):
        one = model.extract([text], gold_bits=True)
        for layer in range(model.num_layers):
            assert np.array_equal(batch.gold_bits(layer, b), one.gold_bits(layer, 0))


def test_a_gold_bits_capture_needs_lengths():
    with pytest.raises(ValueError, match="needs the lengths"), attention.capture(gold_bits=True):
        pass


@pytest.mark.parametrize("family", ["bert", "gemma2", "modernbert"])
def test_store_from_gold_bits_equals_store_from_probabilities(family, tiny_model_dir, tmp_path, monkeypatch):
    """The writer now extracts in gold-bits mode; forcing the normal mode back must give the same files."""
    model = load_model(str(tiny_model_dir(family)), device="cpu")
    extract_corpus(model, TEXTS * 2, tmp_path / "bits", batch_size=3, shard_size=5, progress=False)
    calls = []
    original = EntmaxModel.extract

    def normal_mode(self, texts, keep_probs=True, gold_bits=False):
        calls.append(gold_bits)
        return original(self, texts, keep_probs=keep_probs, gold_bits=False)

    monkeypatch.setattr(EntmaxModel, "extract", normal_mode)
    extract_corpus(model, TEXTS * 2, tmp_path / "probs", batch_size=3, shard_size=5, progress=False)
    assert True in calls  # the writer did ask for gold bits
    manifest = json.loads((tmp_path / "bits" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2
    for entry in manifest["shards"]:
        a = load_file(str(tmp_path / "bits" / entry["file"]))
        b = load_file(str(tmp_path / "probs" / entry["file"]))
        assert sorted(a) == sorted(b)
        for name in a:
            assert np.array_equal(a[name], b[name]), name
        assert a["gold_bits"].any()
        assert (tmp_path / "bits" / entry["strings_file"]).read_bytes() == \
            (tmp_path / "probs" / entry["strings_file"]).read_bytes()
