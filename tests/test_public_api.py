"""The top-level public API: every exported name resolves, lazily, to the object its module defines."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import sparsefinder as sf


@pytest.mark.parametrize("name", [n for n in sf.__all__ if n != "__version__"])
def test_every_export_resolves_to_its_module(name):
    module = importlib.import_module(sf._EXPORTS[name])
    assert getattr(sf, name) is getattr(module, sf._ALIASES.get(name, name))
    assert name in dir(sf)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sf.nope  # noqa: B018


def test_import_is_lazy():
    code = "import sys, sparsefinder; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_docstring_example_runs(tiny_model_dir):
    """The example of the package docstring and the README, on a tiny random model instead of the catalogue one."""
    model = sf.load_model(str(tiny_model_dir("bert")))
    ex = model.extract(["The quick brown fox jumps over the lazy dog."])
    gold = ex.gold(layer=1)
    pred = sf.get_predictor("window", window=3).predict(ex.queries[1], ex.keys[1], ex.lengths)
    m = sf.graph_metrics(gold, pred)
    assert isinstance(gold, sf.AttentionGraph) and isinstance(pred, sf.AttentionGraph)
    assert 0.0 <= float(m["recall"].mean()) <= 1.0
    assert gold.sparsity().shape == (1, ex.num_heads)
    assert "window" in sf.list_predictors() and "stacked" in sf.list_predictors()
    metrics = sf.predict_batch(ex, "window", {"window": 3}).metrics
    assert metrics["mass_recall"].shape == metrics["output_error"].shape == (1, ex.num_layers, ex.num_heads)
    assert ((metrics["mass_recall"] >= 0) & (metrics["mass_recall"] <= 1 + 1e-9)).all()
