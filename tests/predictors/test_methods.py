"""sparsefinder.predictors.methods: a sweep configuration's graph on new text."""

from __future__ import annotations

import pytest
import torch

from sparsefinder.evaluation.fitted import load_fitted
from sparsefinder.metrics import graph_metrics
from sparsefinder.model.catalogue import default_model_name, get_spec
from sparsefinder.predictors import get_predictor
from sparsefinder.predictors.methods import (
    UnsupportedMethodError,
    params_key,
    predict_layer,
    predictable_methods,
    unsupported_reason,
)
from sparsefinder.training.projections import Projections

FOX = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def shipped():
    from sparsefinder.model.adapter import AdapterMismatchError
    from sparsefinder.model.entmax_model import load_model

    spec = get_spec(default_model_name())
    if spec.artifact("projections") is None or spec.artifact("fitted") is None:
        pytest.skip("the default model ships no projections / fitted predictors")
    try:
        model = load_model(spec.name)
    except (AdapterMismatchError, FileNotFoundError) as e:
        pytest.skip(f"default model does not load: {e}")
    proj = Projections.load(spec.artifact("projections"), model=model)
    fitted = load_fitted(spec.artifact("fitted"))
    return model, proj, fitted, model.extract([FOX])


def test_params_key_is_canonical():
    assert params_key('{"b": 1, "a": 2}') == '{"a":2,"b":1}'
    assert params_key({}) == "{}" == params_key(None)


def test_unsupported_methods_say_why():
    assert "context" in unsupported_reason("syntax")
    assert "projections" in unsupported_reason("bucketing")
    assert "fitted" in unsupported_reason("kmeans", projections=object(), fitted={})
    assert unsupported_reason("window") is None
    with pytest.raises(UnsupportedMethodError):
        predict_layer(None, 0, "syntax")


def test_shape_method_matches_predictor(shipped):
    _, _, _, ex = shipped
    graph = predict_layer(ex, 2, "window", '{"window":3}')
    direct = get_predictor("window", window=3).predict(ex.queries[2].float(), ex.keys[2].float(), ex.lengths)
    assert torch.equal(graph.edges, direct.edges)


def test_projected_and_fitted_methods(shipped):
    _, proj, fitted, ex = shipped
    assert {"distance", "bucketing", "kmeans", "routing"} <= set(predictable_methods(proj, fitted))
    key = next(iter(fitted["kmeans"]))
    graph = predict_layer(ex, 1, "kmeans", key, projections=proj, fitted=fitted)
    q = proj.project_queries(1, ex.queries[1].float()).float()
    k = proj.project_keys(1, ex.keys[1].float()).float()
    direct = fitted["kmeans"][key][1].predict(q, k, ex.lengths)
    assert torch.equal(graph.edges, direct.edges)
    m = graph_metrics(ex.gold(1), graph)
    assert m["recall"].shape == (1, ex.num_heads)
    assert bool(((m["recall"] >= 0) & (m["recall"] <= 1)).all())
