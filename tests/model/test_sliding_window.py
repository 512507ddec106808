"""Sliding-window and alternating local/global layers (#13, item 1): Mistral, Phi-3, Gemma-2, ModernBERT.

The valid pairs of a layer are the pairs its own mask allows. Checked independently: the windows read from
the config against the masks the layers received (brute-force |i - j| over the allowed pairs), the
probabilities recomputed from the captured q/k under that mask, the denominators against a brute-force count,
softmax (alpha = 1) against transformers' own eager attention, and a padded batch against one text at a time.
"""

from __future__ import annotations

import pytest
import torch
from entmax import entmax15
from hypothesis import given
from hypothesis import strategies as st

from sparsefinder.graphs import AttentionGraph, num_valid_pairs, valid_pair_mask
from sparsefinder.metrics import graph_metrics
from sparsefinder.model import attention
from sparsefinder.model.entmax_model import load_model
from sparsefinder.predictors import get_predictor

# family -> per-layer window (largest |i - j|): 4 keys back for the decoders, |i - j| <= 2 for ModernBERT
WINDOWS = {
    "mistral-sw": [3, 3],
    "phi3": [3, 3],
    "gemma2": [3, None],
    "modernbert": [None, 2, 2],
}
TEXTS = [
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "Hello there.",
    "A third sentence, somewhat longer than the second one, for padding.",
]


@pytest.fixture(scope="module", params=sorted(WINDOWS))
def windowed(request, tiny_model_dir):
    return request.param, load_model(str(tiny_model_dir(request.param)), device="cpu")


def _brute_pairs(n: int, causal: bool, window: int | None) -> int:
    return sum(
        1
        for i in range(n)
        for j in range(n)
        if (not causal or j <= i) and (window is None or abs(i - j) <= window)
    )


@given(n=st.integers(0, 40), causal=st.booleans(), window=st.one_of(st.none(), st.integers(0, 45)))
def test_num_valid_pairs_counts_the_band(n, causal, window):
    lengths = torch.tensor([n, max(n - 3, 0)])
    want = [_brute_pairs(int(m), causal, window) for m in lengths]
    assert num_valid_pairs(lengths, causal, window).tolist() == want
    assert valid_pair_mask(lengths, max(n, 1), causal, window).sum((1, 2, 3)).tolist() == want


def test_windows_are_read_from_the_config_and_equal_the_masks_received(windowed, tiny_model_dir):
    family, model = windowed
    assert model.windows == WINDOWS[family]
    enc, _ = model.tokenize(TEXTS[:1])
    with torch.inference_mode(), attention.capture() as sink:
        model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    n = int(enc["attention_mask"].sum())
    for layer, record in enumerate(sink.records):
        if record.mask is None:  # ModernBERT's global layers get no mask when nothing is padded
            assert WINDOWS[family][layer] is None
            continue
        i, j = torch.nonzero(record.mask[0, 0] == 0, as_tuple=True)
        widest = int((i - j).abs().max())
        assert widest == (n - 1 if WINDOWS[family][layer] is None else WINDOWS[family][layer])


def test_probabilities_follow_the_layer_mask_and_gold_graphs_stay_inside_it(windowed):
    family, model = windowed
    ex = model.extract(TEXTS)
    for layer in range(ex.num_layers):
        window = WINDOWS[family][layer]
        q, k, p = ex.queries[layer].double(), ex.keys[layer].double(), ex.probs[layer].double()
        scores = q @ k.transpose(-1, -2) * getattr(model.attention_modules[layer], "scaling", q.shape[-1] ** -0.5)
        cap = getattr(model.model.config, "attn_logit_softcapping", None)
        if cap:
            scores = torch.tanh(scores / cap) * cap
        valid = valid_pair_mask(ex.lengths, q.shape[2], ex.causal, window)
        want = entmax15(scores.masked_fill(~valid, -1e9), dim=-1).masked_fill(~valid, 0)
        real = ex.padding_mask()[:, None, :, None]
        torch.testing.assert_close(p * real, want * real, atol=2e-6, rtol=0)
        gold = ex.gold(layer)
        assert gold.window == window
        for b, n in enumerate(ex.lengths.tolist()):
            edges = gold.sentence(b)
            i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            outside = (window is not None) & ((i - j).abs() > (window if window is not None else n))
            assert not edges[:, outside].any()
            pairs = _brute_pairs(n, ex.causal, window)
            want_sparsity = 1 - edges.sum((-1, -2)).double() / pairs
            torch.testing.assert_close(gold.sparsity()[b], want_sparsity)


def test_alpha_one_equals_transformers_eager_attention(windowed, tiny_model_dir):
    from transformers import AutoModel

    family, _ = windowed
    path = tiny_model_dir(family)
    ours = load_model(str(path), device="cpu", alpha=1.0)
    ex = ours.extract(TEXTS[:1])
    eager = AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    enc, _ = ours.tokenize(TEXTS[:1])
    with torch.inference_mode():
        hidden = eager(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ex.hidden.float(), hidden.float(), atol=1e-4, rtol=1e-4)


def test_padded_batch_equals_one_by_one_and_predictors_score_inside_the_window(windowed):
    family, model = windowed
    batch = model.extract(TEXTS)
    for b, text in enumerate(TEXTS):
        one = model.extract([text])

        for layer in range(batch.num_layers):
            assert torch.equal(batch.gold(layer).sentence(b), one.gold(layer).sentence(0))
    layer = next(i for i, w in enumerate(WINDOWS[family]) if w is not None)
    gold = batch.gold(layer)
    for name in ("window", "random", "bigbird"):
        pred = get_predictor(name)
        graph = pred.predict(batch.queries[layer], batch.keys[layer], batch.lengths, batch.causal)
        m = graph_metrics(gold, graph)
        inside = graph.edges & gold.valid_pairs()
        assert torch.equal(m["pred_edges"], inside.sum((-1, -2)))
        want_pairs = torch.tensor([_brute_pairs(int(n), batch.causal, WINDOWS[family][layer])
                                   for n in batch.lengths])
        assert torch.equal(m["valid_pairs"][:, 0], want_pairs)
        assert bool((m["sparsity"] >= 0).all()) and bool((m["recall"] <= 1).all())



def test_a_mask_that_differs_from_the_scored_pairs_is_refused(tiny_model_dir):
    model = load_model(str(tiny_model_dir("mistral-sw")), device="cpu")
    model.windows = [None, None]  # as if the window were unknown: the received mask disagrees
    with pytest.raises(RuntimeError, match="layer 0: its attention mask allows other pairs"):
        model.extract(TEXTS[:1])


def test_a_predicted_graph_of_another_window_is_refused(tiny_model_dir):
    gold = AttentionGraph(torch.ones(1, 1, 6, 6, dtype=torch.bool), torch.tensor([6]), False, 2)
    with pytest.raises(ValueError, match="different layers: window 2 vs 1"):
        graph_metrics(gold, AttentionGraph(torch.ones(1, 1, 6, 6, dtype=torch.bool), torch.tensor([6]), False, 1))


def test_pages_predictions_keep_only_the_pairs_a_layer_allows(windowed):
    """What Explore and Pareto draw (predict_batch, predict_head) holds no pair the layer's mask forbids."""
    from sparsefinder.evaluation.analysis import allowed_pairs, predict_batch, predict_head

    family, model = windowed
    ex = model.extract(TEXTS)
    batch = predict_batch(ex, "window", {"window": 30})
    for layer, window in enumerate(WINDOWS[family]):
        for b, n in enumerate(ex.lengths.tolist()):
            allowed = allowed_pairs(ex, b, layer)
            edges = batch.edges(b, layer, n)
            assert not (edges & ~allowed).any()
            if window is None and not ex.causal:
                assert allowed.all()
        head = predict_head(ex, layer, 0, "window", {"window": 30})
        assert not (head.pred & ~head.allowed).any()
