"""Two models (or two alphas) on the same texts: per-head gold sparsity and Jaccard overlap (#15, item 3),
against loops over the probabilities, and the store-pair version against the per-text one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefinder.corpora.extract import extract_corpus
from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.evaluation.compare_models import compare_extractions, compare_stores, pair_counts
from sparsefinder.graphs import AttentionGraph
from sparsefinder.model.entmax_model import load_model

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello there.", "A third, somewhat longer sentence here."]


def _loops(ex_a, ex_b):
    """(layers, heads, 3) macro means of sparsity A, sparsity B, Jaccard from the probabilities, by loops."""
    out = np.zeros((ex_a.num_layers, ex_a.num_heads, 3))
    for layer in range(ex_a.num_layers):
        for h in range(ex_a.num_heads):
            vals = []
            for b, n in enumerate(ex_a.lengths.tolist()):
                ga = ex_a.probs[layer][b, h, :n, :n].numpy() > 0
                gb = ex_b.probs[layer][b, h, :n, :n].numpy() > 0
                pairs = n * (n + 1) // 2 if ex_a.causal else n * n
                union = (ga | gb).sum()
                vals.append((1 - ga.sum() / pairs, 1 - gb.sum() / pairs, (ga & gb).sum() / union if union else 1))
            out[layer, h] = np.mean(vals, axis=0)
    return out


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def two_alphas(request, tiny_model_dir):
    path = str(tiny_model_dir(request.param))
    return load_model(path, device="cpu", alpha=1.5), load_model(path, device="cpu", alpha=2.0)


def test_comparison_equals_loops(two_alphas):
    a, b = two_alphas
    ex_a, ex_b = a.extract(TEXTS), b.extract(TEXTS)
    frame = compare_extractions(ex_a, ex_b)
    want = _loops(ex_a, ex_b)
    got = frame[["sparsity_a", "sparsity_b", "jaccard"]].to_numpy().reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert (frame["sentences"] == len(TEXTS)).all()
    assert (got[..., 2] < 1).any()  # the two alphas do give different graphs
    same = compare_extractions(ex_a, a.extract(TEXTS))
    assert (same["jaccard"] == 1).all() and np.allclose(same["sparsity_a"], same["sparsity_b"])


def test_store_pair_equals_the_per_text_comparison(two_alphas, tmp_path):
    a, b = two_alphas
    extract_corpus(a, TEXTS, tmp_path / "a", progress=False)
    extract_corpus(b, TEXTS, tmp_path / "b", progress=False)
    by_store = compare_stores(ExtractionStore.open(tmp_path / "a"), ExtractionStore.open(tmp_path / "b"),
                              batch_size=2)
    by_text = compare_extractions(a.extract(TEXTS), b.extract(TEXTS))
    np.testing.assert_allclose(by_store[["sparsity_a", "sparsity_b", "jaccard"]].to_numpy(),
                               by_text[["sparsity_a", "sparsity_b", "jaccard"]].to_numpy(), rtol=0, atol=1e-12)
    extract_corpus(b, TEXTS[:2], tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="different texts"):
        compare_stores(ExtractionStore.open(tmp_path / "a"), ExtractionStore.open(tmp_path / "c"))


def test_unpairable_models_are_refused(tiny_model_dir, two_alphas):
    a, _ = two_alphas
    ex = a.extract(TEXTS)
    other = load_model(str(tiny_model_dir("modernbert")), device="cpu").extract(TEXTS)
    with pytest.raises(ValueError, match="tokenise the texts differently|differ in shape"):
        compare_extractions(ex, other)
    shifted = a.extract(TEXTS)
    shifted.tokens[0] = shifted.tokens[0][::-1]
    with pytest.raises(ValueError, match="tokenise the texts differently"):
        compare_extractions(ex, shifted)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), causal=st.booleans(), window=st.one_of(st.none(), st.integers(0, 4)))
def test_jaccard_is_symmetric_bounded_and_one_on_itself(seed, causal, window):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 8, (3,), generator=g)
    a = AttentionGraph(torch.rand(3, 2, 8, 8, generator=g) < 0.4, lengths, causal, window)
    b = AttentionGraph(torch.rand(3, 2, 8, 8, generator=g) < 0.4, lengths, causal, window)
    ab, ba, aa = pair_counts(a, b), pair_counts(b, a), pair_counts(a, a)
    assert torch.equal(ab["both"], ba["both"]) and torch.equal(ab["either"], ba["either"])
    assert bool((ab["both"] <= ab["either"]).all()) and bool((ab["either"] <= ab["pairs"]).all())
    assert torch.equal(aa["both"], aa["either"])
    assert torch.equal(ab["either"], ab["edges_a"] + ab["edges_b"] - ab["both"])


def test_cli_compare_models_prints_the_library_numbers(two_alphas, tiny_model_dir, capsys, tmp_path):
    import json

    from sparsefinder.cli import main

    path = str(tiny_model_dir(two_alphas[0].causal and "gpt2" or "bert"))
    assert main(["compare-models", "--a", path, "--alpha-a", "1.5", "--alpha-b", "2", "--json", "--device", "cpu",
                 "\n".join(TEXTS)]) == 0
    rows = json.loads(capsys.readouterr().out)
    want = compare_extractions(*(m.extract(TEXTS) for m in two_alphas))
    np.testing.assert_allclose([r["jaccard"] for r in rows], want["jaccard"].to_numpy(), rtol=0, atol=1e-12)
    assert main(["compare-models", "--store-a", str(tmp_path)]) == 2
    assert "both --store-a and --store-b" in capsys.readouterr().err
