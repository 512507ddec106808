"""Fitted-predictor files (sparsefinder.evaluation.fitted): identical tensors stored once (format 2),
format-1 directories still read, corrupt manifests refused. Checked against the files'
raw contents and the predictors' own predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsefinder.evaluation.fitted import FITTED_FILE, MANIFEST_FILE, FittedFileError, load_fitted, save_fitted
from sparsefinder.graphs import AttentionGraph
from sparsefinder.predictors import get_predictor

SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9)
WORDS = ["the", "cat", "sat", "on", "mat", "."]


def data(seed: int, lengths=(6, 4, 7, 5), heads: int = 2, r: int = 3):
    """Random q, k with garbage on padding, a random gold graph with non-empty rows, and token strings."""
    rng = np.random.default_rng(seed)
    B, N = len(lengths), max(lengths)
    q = torch.from_numpy(rng.normal(size=(B, heads, N, r))).float()
    k = torch.from_numpy(rng.normal(size=(B, heads, N, r))).float()
    lt = torch.tensor(lengths)
    edges = torch.from_numpy(rng.random((B, heads, N, N)) < 0.3) | torch.eye(N, dtype=torch.bool)
    tokens = [["[CLS]", *(WORDS[int(i)] for i in rng.integers(0, len(WORDS), n - 2)), "[SEP]"] for n in lengths]
    return q, k, lt, AttentionGraph(edges, lt, False), tokens


def key(sparsity: float) -> str:
    return json.dumps({"sparsity": sparsity})


def learned_fitted(points=SPARSITIES) -> tuple[dict, tuple]:
    """What the sweep writes for predictors whose sparsity is a predict-time knob: one fit per layer,
    the same state at every grid point; plus k-means, whose grid points are separate fits."""
    train, test = data(0), data(1)
    fitted: dict = {}
    for method in ("stacked", "priors", "distance_budget"):
        for layer in (0, 1):
            q, k, lengths, gold, tokens = data(10 + layer)
            base = get_predictor(method, sparsity=0.7).fit(q, k, lengths, gold=gold, tokens=tokens)
            for s in points:
                pred = base.clone(sparsity=s).load_state_dict(base.state_dict())
                fitted.setdefault(method, {}).setdefault(key(s), {})[layer] = pred
    for c in (2, 3):
        pred = get_predictor("kmeans", n_clusters=c).fit(train[0], train[1], train[2])
        fitted.setdefault("kmeans", {})[json.dumps({"n_clusters": c})] = {0: pred}
    return fitted, test


def predictions(fitted: dict, test) -> dict:
    q, k, lengths, _, tokens = test
    out = {}
    for method, by_params in fitted.items():
        for params, by_layer in by_params.items():
            for layer, pred in by_layer.items():
                ctx = {"tokens": tokens} if "tokens" in pred.context_keys else {}
                out[method, params, layer] = pred.predict(q, k, lengths, **ctx).edges
    return out


def write_v1(fitted: dict, directory) -> None:
    """A format-1 directory as sparsefinder wrote it before format 2: every key stored, no aliases."""
    directory.mkdir(parents=True)
    tensors, entries = {}, []
    for method, by_params in fitted.items():
        for params, by_layer in by_params.items():
            for layer, pred in by_layer.items():
                for name, t in pred.state_dict().items():
                    tensors[f"{method}|{params}|{layer}|{name}"] = t.contiguous().clone()
                entries.append({"method": method, "params": params, "layer": layer,
                                "hyperparameters": pred.get_params()})
    save_file(tensors, str(directory / FITTED_FILE))
    manifest = {"format": "sparsefinder-fitted-predictors", "format_version": 1, "entries": entries,
                "info": {"train": "somewhere"}}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")


def test_round_trip_with_shared_tensors_predicts_the_same(tmp_path):
    fitted, test = learned_fitted()
    out = save_fitted(fitted, tmp_path / "f", info={"projections": "p"})
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 2
    stored = load_file(str(out / FITTED_FILE))
    # brute force: every key of every predictor's state is stored, or an alias of a stored tensor with the
    # same dtype, shape and bytes; no two stored tensors are identical
    every = {f"{m}|{p}|{layer}|{n}": t for m, bp in fitted.items() for p, bl in bp.items()
             for layer, pred in bl.items() for n, t in pred.state_dict().items()}
    assert set(stored) | set(manifest["aliases"]) == set(every)
    assert not set(stored) & set(manifest["aliases"])
    for k, t in every.items():
        s = stored[manifest["aliases"].get(k, k)]
        assert s.dtype == t.dtype and s.shape == t.shape and s.numpy().tobytes() == t.numpy().tobytes(), k
    contents = [(t.dtype, tuple(t.shape), t.numpy().tobytes()) for t in stored.values()]
    assert len(set(contents)) == len(contents)
    # the 5 grid points of each learned (method, layer) share every tensor; the token tables of stacked and
    # priors fitted on the same data are the same tensors too
    assert manifest["aliases"]["stacked|" + key(0.9) + "|1|weight"] == "stacked|" + key(0.5) + "|1|weight"
    assert manifest["aliases"]["priors|" + key(0.5) + "|0|key_prior"] == "stacked|" + key(0.5) + "|0|key_prior"
    assert "kmeans|" + json.dumps({"n_clusters": 3}) + "|0|centroids" in stored

    loaded = load_fitted(out)
    assert loaded.info == {"projections": "p"}
    assert loaded["stacked"][key(0.8)][1].get_params() == fitted["stacked"][key(0.8)][1].get_params()
    want, got = predictions(fitted, test), predictions(loaded, test)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # sparsity is a predict-time knob: the grid points share their state but not their graphs
    assert not torch.equal(got["stacked", key(0.5), 0], got["stacked", key(0.9), 0])


def test_identical_grid_points_cost_the_size_of_one(tmp_path):
    five, _ = learned_fitted(SPARSITIES)
    one, _ = learned_fitted((0.5,))
    write_v1(five, tmp_path / "v1")
    save_fitted(five, tmp_path / "five")
    save_fitted(one, tmp_path / "one")
    size = {d: (tmp_path / d / FITTED_FILE).stat().st_size for d in ("v1", "five", "one")}
    # same tensors as one grid point (the safetensors header lists the same keys)
    assert size["five"] == size["one"]
    # the learned tensors are most of the data, so storing them once is about a fifth of format 1
    assert 0.15 < size["five"] / size["v1"] < 0.25, size


def test_format_1_directory_still_loads(tmp_path):
    fitted, test = learned_fitted((0.5, 0.9))
    write_v1(fitted, tmp_path / "v1")
    loaded = load_fitted(tmp_path / "v1")
    assert loaded.info == {"train": "somewhere"}
    want, got = predictions(fitted, test), predictions(loaded, test)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # and a format-1 directory written again is format 2 and predicts the same
    again = load_fitted(save_fitted(loaded, tmp_path / "v2"))
    for k, v in predictions(again, test).items():
        assert torch.equal(want[k], v), k


def edit_manifest(directory, change) -> None:
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, message", [
    (lambda m: m["aliases"].update({next(iter(m["aliases"])): "stacked|nope|0|weight"}), "not stored"),
    (lambda m: m.update(aliases=["a", "b"]), "'aliases' is not a mapping"),
    (lambda m: m["aliases"].update({next(iter(m["aliases"])): 3}), "is not a key"),
    (lambda m: m["aliases"].update({"stacked|" + key(0.5) + "|0|weight": "stacked|" + key(0.5) + "|1|weight"}),
     "also a stored tensor"),
    (lambda m: m.update(format_version=3), "format version 3"),
    (lambda m: m.update(format="something else"), "not a fitted-predictor directory"),
    (lambda m: m.pop("entries"), "'entries' is not a list"),
    (lambda m: m["entries"][0].pop("layer"), "corrupt manifest entry"),
])
def test_corrupt_manifest_is_refused(tmp_path, change, message):
    fitted, _ = learned_fitted((0.5, 0.9))
    out = save_fitted(fitted, tmp_path / "f")
    assert load_fitted(out)
    edit_manifest(out, change)
    with pytest.raises(FittedFileError, match=message):
        load_fitted(out)


def test_dropped_alias_is_a_missing_tensor(tmp_path):
    fitted, _ = learned_fitted((0.5, 0.9))
    out = save_fitted(fitted, tmp_path / "f")
    edit_manifest(out, lambda m: m["aliases"].pop("stacked|" + key(0.9) + "|0|weight"))
    with pytest.raises(FittedFileError, match=r"stacked .*0\.9.* layer 0: .*lacks \['weight'\]"):
        load_fitted(out)


def test_not_json_manifest_is_unreadable(tmp_path):
    fitted, _ = learned_fitted((0.5,))
    out = save_fitted(fitted, tmp_path / "f")
    (out / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(FittedFileError, match="unreadable"):
        load_fitted(out)
    (out / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(FittedFileError, match="not a fitted-predictor directory"):
        load_fitted(out)


def test_fitted_predictor_matches_params_by_value(tmp_path):
    """Files keyed with ``json.dumps`` spacing (bench/predictors.py) serve the sweep's canonical keys."""
    from sparsefinder.predictors.methods import fitted_predictor

    fitted, _ = learned_fitted((0.5, 0.9))
    loaded = load_fitted(save_fitted(fitted, tmp_path / "f"))
    assert key(0.9) == '{"sparsity": 0.9}'  # the spaced form is what the file holds
    for s in (0.5, 0.9):
        for canonical in (f'{{"sparsity":{s}}}', {"sparsity": s}, key(s)):
            pred = fitted_predictor(loaded, "stacked", canonical, 1)
            assert pred is loaded["stacked"][key(s)][1] and pred.sparsity == s
    # A target the file does not hold runs from a stored fit (the target only picks thresholds), as a copy.
    other = fitted_predictor(loaded, "stacked", '{"sparsity":0.7}', 1)
    assert other.sparsity == 0.7 and all(p.sparsity != 0.7 for by in loaded["stacked"].values() for p in by.values())
    with pytest.raises(KeyError):
        fitted_predictor(loaded, "stacked", '{"sparsity":0.5}', 4)
