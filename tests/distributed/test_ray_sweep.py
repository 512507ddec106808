"""Sweep and curves on Ray against the single-process tables: equal value for value, also after a retried task."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sparsefinder.corpora.extract import extract_corpus
from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.evaluation.sweep import fit_predictors, load_sweep, run_sweep, save_sweep
from sparsefinder.training.projections import Projections

pytestmark = pytest.mark.ray
ray_sweep = pytest.importorskip("sparsefinder.distributed.ray_sweep")
pytest.importorskip("ray")

# Methods of three families (sparsefinder, baseline, pattern), a few points each, k-means fitted.
GRIDS = {
    "distance": [{"threshold": t} for t in (0.5, 2.0, 8.0)],
    "bucketing": [{"n_buckets": 2}, {"n_buckets": 4, "window": 1}],
    "kmeans": [{"n_clusters": 2}, {"n_clusters": 3, "top_t": 2}],
    "window": [{"window": w} for w in (0, 1, 3)],
    "bigbird": [{"num_random": r} for r in (0, 2)],
    "random": [{"sparsity": s} for s in (0.5, 0.9)],
    "strided": [{"stride": 2}],
}


def one_thread(fn):
    """``fn()`` with one torch thread, as each Ray task runs by default (rounding depends on the count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(bert, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep-store") / "store"
    store = ExtractionStore.open(extract_corpus(bert, texts, out, batch_size=4, progress=False))
    proj = Projections(store.num_layers, store.num_heads, store.head_dim, rank=3, seed=0)
    fitted = fit_predictors(store, proj, methods=["kmeans"], grids=GRIDS, seed=3, max_points=500)
    kw = dict(methods=list(GRIDS), grids=GRIDS, fitted=fitted, batch_size=3, seed=5)
    single = one_thread(lambda: run_sweep(store, proj, progress=False, **kw))
    return store, proj, kw, single


def assert_same_sweep(ray_frame: pd.DataFrame, single: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(ray_frame, single, check_exact=True)
    a, b = ray_frame.attrs["sweep"], single.attrs["sweep"]
    for key in ("methods", "skipped", "configurations", "layers", "sentences", "seed", "batch_size", "store",
                "projections", "fitted"):
        assert a[key] == b[key], key


def test_sweep_equals_single_process(ray_session, setup, tmp_path):
    store, proj, kw, single = setup
    frame = ray_sweep.run_sweep_ray(str(store.path), proj, progress=False, **kw)
    assert frame.attrs["sweep"]["engine"]["tasks"] == store.num_layers * 3  # families sparsefinder, baseline, pattern
    assert_same_sweep(frame, single)
    # The same Parquet table as the single-process sweep writes.
    a, b = save_sweep(frame, tmp_path / "ray.parquet"), save_sweep(single, tmp_path / "single.parquet")
    pd.testing.assert_frame_equal(load_sweep(a), load_sweep(b), check_exact=True)


def test_failed_sweep_task_is_retried(ray_session, setup, tmp_path):
    store, proj, kw, single = setup
    marker = tmp_path / "failed-once"
    frame = ray_sweep.run_sweep_ray(str(store.path), proj, progress=False, fail_once=f"3:{marker}", **kw)
    assert marker.exists()
    assert_same_sweep(frame, single)


def test_curves_equal_single_process(ray_session, bert, tiny_model_dir, texts):
    from sparsefinder.evaluation.approximate import sparsity_accuracy_curve

    grids = {"window": [{"window": 1}, {"window": 3}], "random": [{"sparsity": 0.5}], "bigbird": [{"num_random": 1}]}
    kw = dict(layers=["all", "later"], batch_size=4, seed=2)
    single = one_thread(lambda: sparsity_accuracy_curve(bert, texts, list(grids), grids, **kw))
    frame = ray_sweep.curves_ray(str(tiny_model_dir("bert")), texts, list(grids), grids, device="cpu",
                                 progress=False, **kw)
    assert list(frame.columns) == list(single.columns)
    timing = ["seconds"]  # each run's wall time
    pd.testing.assert_frame_equal(frame.drop(columns=timing), single.drop(columns=timing), check_exact=True)
    assert frame.attrs["curves"]["engine"]["tasks"] == 4
    assert {k: v for k, v in frame.attrs["curves"].items() if k not in ("seconds", "engine")} == \
        {k: v for k, v in single.attrs["curves"].items() if k != "seconds"}


def test_cli_sweep_engine_ray_writes_the_same_table(ray_session, setup, tmp_path, capsys):
    from sparsefinder.cli import main

    store = setup[0]
    common = ["sweep", "--store", str(store.path), "--methods", "window,random,strided", "--context", "none",
              "--threads", "1", "--batch-size", "3"]
    assert main([*common, "--out", str(tmp_path / "single.parquet")]) == 0
    assert main([*common, "--engine", "ray", "--workers", "2", "--out", str(tmp_path / "ray.parquet")]) == 0, \
        capsys.readouterr().err
    a, b = load_sweep(tmp_path / "ray.parquet"), load_sweep(tmp_path / "single.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert a.attrs["sweep"]["engine"]["cpus_per_task"] == 1.0 and "engine" not in b.attrs["sweep"]
