"""sparsefinder.results: which artifacts go with a model, a result and a method.

The artifacts are stand-ins (empty folders read by recording loaders), so each test
states exactly which files a method must run with; the shipped catalogue is checked
once against the real data/ folder.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pandas as pd
import pytest

from sparsefinder import results as rs
from sparsefinder.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def data(tmp_path, monkeypatch):
    """A catalogue of one model with paper and learned artifacts (folders), and an empty runs folder."""
    d = tmp_path / "data"
    for sub in ("proj", "fit", "lproj", "lfit"):
        (d / sub).mkdir(parents=True)
    sweep_table(["kmeans"]).to_parquet(d / "sweep.parquet")
    sweep_table(["kmeans", "stacked"]).to_parquet(d / "learned.parquet")
    sweep_table(["pages"]).to_parquet(d / "pages.parquet")
    models = {"default": "m", "models": {"m": {"path": "pkg:none", "alpha": 1.5, "artifacts": {
        "projections": "proj", "fitted": "fit", "sweep": "sweep.parquet", "learned_sweep": "learned.parquet",
        "pages_sweep": "pages.parquet", "learned_projections": "lproj", "learned_fitted": "lfit"}}}}
    (d / "models.json").write_text(json.dumps(models), encoding="utf-8")
    monkeypatch.setenv("SPARSEFINDER_DATA", str(d))
    monkeypatch.setenv(rs.RUNS_ENV, str(tmp_path / "runs"))
    return d


def sweep_table(methods: list[str]) -> pd.DataFrame:
    """A minimal table with every column a sweep table has (one row per method)."""
    from sparsefinder.metrics import CONFIG_COLUMNS, RATIO_COLUMNS

    frame = pd.DataFrame({c: [0.5] * len(methods) for c in (*CONFIG_COLUMNS, "layer", "head", *RATIO_COLUMNS)})
    frame["method"], frame["params"] = methods, "{}"
    return frame


def recording_loaders(fitted_by_dir: dict[str, dict]):
    """Loaders that return the folder's name as 'projections' and a given fitted mapping per folder."""
    return rs.Loaders(projections=lambda p: f"projections:{Path(p).name}",
                      fitted=lambda p: fitted_by_dir[Path(p).name])


def test_shipped_result_resolves_declared_paths(data):
    r = rs.shipped_result("m")
    assert (r.name, r.is_default, r.store) == (rs.SHIPPED, True, None)
    assert r.projections == data / "proj" and r.fitted == data / "fit" and r.sweep == data / "sweep.parquet"
    assert r.extra_sweeps == (data / "learned.parquet", data / "pages.parquet") and r.curves is None  # absent: None
    assert r.learned_projections == data / "lproj" and r.learned_fitted == data / "lfit"


def test_a_method_fitted_only_in_the_learned_state_runs_with_the_learned_projections(data):
    found = rs.result_artifacts(rs.shipped_result("m"), loaders=recording_loaders(
        {"fit": {"kmeans": {}}, "lfit": {"stacked": {}, "kmeans": {}}}))
    assert found.for_method("kmeans") == ("projections:proj", {"kmeans": {}})  # the result's own wins
    assert found.for_method("stacked") == ("projections:lproj", {"stacked": {}, "kmeans": {}})
    assert found.for_method("distance") == ("projections:proj", {"kmeans": {}})
    assert found.unsupported("stacked") is None and found.unsupported("kmeans") is None
    methods = found.available_methods()
    assert {"kmeans", "stacked", "distance", "window"} <= set(methods)
    assert "cascade" not in methods  # needs a fit that neither state has
    from sparsefinder.predictors import REGISTRY

    assert methods == [m for m in REGISTRY if m in set(methods)]  # registry order


def test_missing_learned_state_is_explained_for_learned_methods_only(data):
    (data / "lfit").rmdir()
    found = rs.result_artifacts(rs.shipped_result("m"), loaders=recording_loaders({"fit": {"kmeans": {}}}))
    assert found.learned[0] is None and "missing" in found.learned[1]
    assert "stacked must be fitted" in found.unsupported("stacked") and "missing" in found.unsupported("stacked")
    assert "missing" not in found.unsupported("routing")  # a paper method's missing fit is not about that file
    assert "stacked" not in found.available_methods()


def test_saved_result_uses_its_own_store_and_falls_back_to_shipped_projections(data, tmp_path):
    assert rs.result_choices("m") == [rs.SHIPPED]
    d = rs.result_dir("m", "mine")
    (d / "store").mkdir(parents=True)
    (d / "store" / "manifest.json").write_text(json.dumps({"complete": True, "num_sentences": 3}))
    sweep_table(["window"]).to_parquet(d / "sweep.parquet")
    (d / "fitted").mkdir()
    assert rs.result_choices("m") == [rs.SHIPPED, "mine"]
    r = rs.resolve_result("m", "mine")
    assert r.store == d / "store" and r.sweep == d / "sweep.parquet" and r.fitted == d / "fitted"
    assert r.projections == data / "proj"  # none of its own: the model's shipped ones
    assert r.learned_fitted is None and r.extra_sweeps == ()
    assert rs.resolve_result("m", "not-saved") == rs.shipped_result("m")
    info = rs.saved_results("m")
    assert info == [{"name": "mine", "store": True, "sentences": 3, "corpus": None, "projections": False,
                     "fitted": True, "sweep": True}]
    # an incomplete extraction is listed but cannot be chosen
    (d / "store" / "manifest.json").write_text(json.dumps({"complete": False}))
    assert rs.result_choices("m") == [rs.SHIPPED]


def test_result_key_changes_when_a_file_changes(data):
    before = rs.shipped_result("m").key
    (data / "fit" / "kmeans.safetensors").write_bytes(b"x")
    assert rs.shipped_result("m").key != before
    assert rs.fingerprint(data / "nothing") == "missing" and rs.fingerprint(None) == "none"


def test_override_replaces_the_learned_pairing_and_refuses_a_missing_folder(data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    r = rs.override_result(rs.shipped_result("m"), projections=mine)
    assert r.projections == mine and r.learned_fitted is None and r.learned_projections is None
    assert r.fitted == data / "fit"
    with pytest.raises(FileNotFoundError, match="projections directory not found"):
        rs.override_result(r, projections=tmp_path / "typo")


def test_merge_sweeps_keeps_each_method_from_the_first_table_that_has_it():
    a = pd.DataFrame({"method": ["kmeans", "window"], "recall": [0.1, 0.2]})
    a.attrs = {"sweep": "a"}
    b = pd.DataFrame({"method": ["kmeans", "stacked", "stacked"], "recall": [0.9, 0.3, 0.4]})
    out = rs.merge_sweeps([a, b])
    assert out["method"].tolist() == ["kmeans", "window", "stacked", "stacked"]
    assert out["recall"].tolist() == [0.1, 0.2, 0.3, 0.4] and out.attrs == {"sweep": "a"}
    assert rs.merge_sweeps([a]) is a


def test_load_result_sweep_merges_the_learned_and_pages_tables(data):
    frame = rs.load_result_sweep(rs.shipped_result("m"))
    assert frame["method"].tolist() == ["kmeans", "stacked", "pages"]


def test_params_options_prefer_the_sweep_table():
    frame = pd.DataFrame({"method": ["window", "window"], "params": ['{"window":5}', '{"window":3}']})
    assert rs.params_options("window", frame) == ['{"window":3}', '{"window":5}']
    from sparsefinder.predictors import REGISTRY
    from sparsefinder.predictors.methods import params_key

    assert rs.params_options("window") == [params_key(p) for p in REGISTRY["window"].grid()]


def test_shipped_catalogue_pairs_the_learned_predictors_with_their_projections():
    """The real data/: every learned method in the learned state runs with the listwise projections."""
    from sparsefinder.evaluation.fitted import load_fitted

    result = rs.shipped_result("minilm-entmax15")
    found = rs.result_artifacts(result, loaders=rs.Loaders(projections=lambda p: Path(p).name,
                                                           fitted=load_fitted))
    learned = found.learned[0]
    assert learned is not None and found.learned[1] is None
    for method in learned:
        if method not in found.fitted:
            assert found.for_method(method)[0] == "minilm-entmax15-listwise-r8"
    assert found.for_method("kmeans")[0] == "minilm-entmax15"


def test_cli_results_lists_what_each_result_can_draw(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(rs.RUNS_ENV, str(tmp_path))
    assert main(["results", "--model", "minilm-entmax15"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "shipped (default corpus): projections, fitted, sweep, curves"
    found = rs.result_artifacts(rs.shipped_result("minilm-entmax15"))
    assert lines[1] == "  methods: " + ", ".join(found.available_methods())
    assert {"kmeans", "stacked"} <= set(lines[1][len("  methods: "):].split(", "))
    assert main(["results", "--model", "not-registered"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_the_app_decides_nothing_about_artifacts():
    """The pages reach artifacts and methods only through sparsefinder.results (and app.cache over it)."""
    deciding = {"sparsefinder.predictors.methods", "sparsefinder.evaluation.fitted", "sparsefinder.training",
                "sparsefinder.training.projections", "sparsefinder.evaluation.sweep"}
    for path in (ROOT / "app").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            mod = node.module if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names] if isinstance(node, ast.Import | ast.ImportFrom) else []
            assert mod not in deciding and not deciding & set(names), f"{path.name} imports {mod or names}"
            assert not (isinstance(node, ast.Name) and node.id in {"unsupported_reason", "predictable_methods"})
