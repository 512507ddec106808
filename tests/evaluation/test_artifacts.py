"""The shipped artifacts of the default model load, match the model, and agree with each other."""

from __future__ import annotations

import json

import pytest

from sparsefinder.evaluation.fitted import load_fitted
from sparsefinder.evaluation.pareto import best_recall_table, pareto_front
from sparsefinder.evaluation.sweep import SWEEP_COLUMNS, load_sweep
from sparsefinder.model.catalogue import default_model_name, get_spec
from sparsefinder.training.projections import Projections


@pytest.fixture(scope="module")
def spec():
    return get_spec(default_model_name())


@pytest.fixture(scope="module")
def default_model():
    from sparsefinder.model.entmax_model import load_model

    return load_model(default_model_name(), device="cpu")


def test_projections_belong_to_the_default_model(spec, default_model):
    proj = Projections.load(spec.artifact("projections"), model=default_model)
    assert (proj.num_layers, proj.num_heads, proj.head_dim, proj.rank) == (6, 12, 32, 4)
    manifest = json.loads((spec.artifact("projections") / "manifest.json").read_text())
    assert manifest["split"] == "train" and manifest["seed"] == 0


def test_projections_refuse_the_untuned_model(spec):
    from sparsefinder.model.entmax_model import load_model
    from sparsefinder.training.projections import ProjectionMismatchError

    with pytest.raises(ProjectionMismatchError):
        Projections.load(spec.artifact("projections"), model=load_model(default_model_name(), use_adapter=False,
                                                                         device="cpu"))


def test_fitted_predictors_cover_every_layer(spec):
    fitted = load_fitted(spec.artifact("fitted"))
    assert {"kmeans", "routing", "blocks"} <= set(fitted)
    for by_params in fitted.values():
        for by_layer in by_params.values():
            assert sorted(by_layer) == list(range(6))


def test_sweep_table_is_complete_and_sane(spec):
    frame = load_sweep(spec.artifact("sweep"))
    assert set(SWEEP_COLUMNS) <= set(frame.columns)
    assert frame.groupby(["method", "params"]).size().eq(72).all()  # every head of every layer
    assert frame["sentences"].eq(500).all()
    for col in ("recall", "precision", "sparsity", "exact"):
        assert frame[col].between(0, 1).all()
    # Learned projections must beat random edges, and random must not dominate the front.
    table = best_recall_table(frame)
    assert table.loc["distance"].iloc[0] > table.loc["random"].iloc[0]
    front = pareto_front(frame, by=())
    assert front["on_front"].any() and not front.loc[front["method"] == "random", "on_front"].all()
