"""A head's drawing from a long text's gold-bits extraction (block summaries made inside the attention call)
equals the one made from the kept probabilities of a normal extraction."""

from __future__ import annotations

import numpy as np
import pytest

from sparsefinder.evaluation import analysis as an
from sparsefinder.model.entmax_model import load_model

TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on under the warm afternoon sun."


@pytest.mark.parametrize("family", ["llama", "modernbert"])
def test_bits_extraction_blocks_equal_the_probabilities_blocks(tiny_model_dir, family):
    model = load_model(str(tiny_model_dir(family)), device="cpu")
    side = 5  # blocks of several tokens at this length
    normal = model.extract([TEXT])
    bits = model.extract([TEXT], gold_bits=True, block_max_side=side)
    assert not an.has_probabilities(bits) and an.has_probabilities(normal)
    n = int(normal.lengths[0])
    for layer in range(model.num_layers):
        for head in range(model.num_heads):
            want = an.head_view(normal, 0, layer, head, max_side=side)
            got = an.head_view(bits, 0, layer, head, max_side=side)
            assert got.size == want.size > 1 and got.n == n
            np.testing.assert_array_equal(got.top, want.top)
            np.testing.assert_array_equal(got.edges, want.edges)
            np.testing.assert_array_equal(got.allowed, want.allowed)
            # the counts against the matrix itself
            p = normal.probs[layer][0, head, :n, :n].numpy()
            allowed = an.allowed_pairs(normal, 0, layer)
            assert got.zeros == int(((p == 0) & allowed).sum())
            assert got.forbidden == int((~allowed).sum())
    with pytest.raises(ValueError, match="neither"):
        an.head_view(bits, 0, 0, 0, max_side=side + 1)


def test_long_texts_are_extracted_without_probabilities(tiny_model_dir, monkeypatch):
    model = load_model(str(tiny_model_dir("llama")), device="cpu")
    assert an.has_probabilities(an.extract_for_view(model, [TEXT]))
    monkeypatch.setattr(an, "LONG_INPUT_TOKENS", 8)
    ex = an.extract_for_view(model, [TEXT])
    assert not an.has_probabilities(ex) and ex.block_max_side == an.HEAD_MAX_SIDE
    result = an.analyse(ex, [TEXT])
    assert not result.probabilities
    np.testing.assert_array_equal(result.sparsity, an.analyse(model.extract([TEXT]), [TEXT]).sparsity)
