"""Grouped-query decoders (Llama, Mistral, Qwen2): 4 query heads share 2 key/value heads (#13, item 1, in part).

The attention function expands keys and values per query head as transformers' eager attention does
(``repeat_kv``); what is captured is what each query head saw. Checked against independent computations:
the probabilities recomputed from the captured q/k with the entmax package, and, at alpha = 1, the model's
output against transformers' own eager (softmax) implementation.
"""

from __future__ import annotations

import pytest
import torch
from entmax import entmax15

from sparsefinder.graphs import valid_pair_mask
from sparsefinder.metrics import graph_metrics
from sparsefinder.model.entmax_model import load_model
from sparsefinder.predictors import get_predictor

FAMILIES = ("llama", "mistral", "qwen2")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello there.", "A third, somewhat longer sentence here."]


@pytest.fixture(scope="module", params=FAMILIES)
def decoder(request, tiny_model_dir):
    return request.param, tiny_model_dir(request.param)


def test_captured_keys_are_per_query_head_and_reproduce_the_probabilities(decoder):
    _, path = decoder
    model = load_model(str(path), device="cpu")
    ex = model.extract(TEXTS)
    assert model.causal and ex.num_heads == 4
    for layer in range(ex.num_layers):
        q, k, p = ex.queries[layer].double(), ex.keys[layer].double(), ex.probs[layer].double()
        assert q.shape == k.shape and q.shape[1] == 4
        # query heads 0-1 read key head 0, heads 2-3 key head 1
        assert torch.equal(k[:, 0], k[:, 1]) and torch.equal(k[:, 2], k[:, 3]) and not torch.equal(k[:, 1], k[:, 2])
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        valid = valid_pair_mask(ex.lengths, q.shape[2], causal=True)  # (B, 1, n, n)
        want = entmax15(scores.masked_fill(~valid, -1e9), dim=-1).masked_fill(~valid, 0)
        real = ex.padding_mask()[:, None, :, None]  # padded query rows are not part of any graph
        torch.testing.assert_close(p * real, want * real, atol=2e-6, rtol=0)


def test_alpha_one_equals_transformers_eager_attention(decoder):
    from transformers import AutoModel

    _, path = decoder
    text = TEXTS[0]
    ours = load_model(str(path), device="cpu", alpha=1.0).extract([text])
    eager = AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    model = load_model(str(path), device="cpu")
    enc, _ = model.tokenize([text])
    with torch.inference_mode():
        hidden = eager(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ours.hidden.float(), hidden.float(), atol=1e-4, rtol=1e-4)


def test_padded_batch_equals_one_by_one_and_predictors_run(decoder):
    _, path = decoder
    model = load_model(str(path), device="cpu")
    batch = model.extract(TEXTS)
    for b, text in enumerate(TEXTS):
        alone = model.extract([text])
        n = int(alone.lengths[0])
        assert int(batch.lengths[b]) == n
        for layer in range(batch.num_layers):
            assert torch.equal(batch.gold(layer).edges[b, :, :n, :n], alone.gold(layer).edges[0, :, :n, :n])
    gold = batch.gold(1)
    pred = get_predictor("window", window=2).predict(batch.queries[1], batch.keys[1], batch.lengths, causal=True)
    m = graph_metrics(gold, pred)
    assert m["recall"].shape == (len(TEXTS), 4) and bool(((m["recall"] >= 0) & (m["recall"] <= 1)).all())
