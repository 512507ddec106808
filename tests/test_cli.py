"""The ``sparsefinder`` command line, run in-process."""

from __future__ import annotations

import json

import pytest

from sparsefinder.cli import main
from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.model.entmax_model import load_model


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "minilm-entmax15" in out and "minilm-entmax15-untuned" in out


def test_gold_prints_every_layer_and_head(capsys, tiny_model_dir):
    path = str(tiny_model_dir("bert"))
    text = "The quick brown fox jumps over the lazy dog."
    assert main(["gold", text, "--model", path, "--device", "cpu", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    ex = load_model(path, device="cpu").extract([text])
    expected = [[float(v) for v in ex.gold(layer).sparsity()[0]] for layer in range(ex.num_layers)]
    assert payload["gold_sparsity"] == expected
    assert payload["tokens"][0][0] == "[CLS]"


def test_predict_prints_recall_mass_recall_and_output_error_per_layer(capsys, tiny_model_dir):
    import numpy as np

    from sparsefinder.evaluation.analysis import predict_batch
    from sparsefinder.metrics import HEAD_METRICS

    path = str(tiny_model_dir("gpt2"))
    texts = "The quick brown fox jumps over the lazy dog.\nDogs bark."
    args = ["predict", texts, "--lines", "--method", "window", "--params", '{"window": 1}', "--model", path,
            "--device", "cpu"]
    assert main([*args, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    want = predict_batch(load_model(path, device="cpu").extract(texts.splitlines()), "window", {"window": 1}).metrics
    assert len(payload["layers"]) == 2 and set(payload["mean"]) == set(HEAD_METRICS)
    for layer, row in enumerate(payload["layers"]):
        for name in HEAD_METRICS:
            assert row[name] == pytest.approx(float(np.nanmean(want[name][:, layer])), rel=1e-9), (layer, name)
    assert 0 < payload["mean"]["mass_recall"] < 1 and payload["mean"]["output_error"] > 0
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mass_recall" in out and "output_error" in out and out.strip().splitlines()[-1].startswith(" mean")
    assert main(["predict", "x", "--method", "nope", "--model", path, "--device", "cpu"]) == 2
    assert "nope" in capsys.readouterr().err


def test_extract_writes_a_store(tmp_path, tiny_model_dir, capsys):
    corpus = tmp_path / "sents.txt"
    corpus.write_text("One sentence here.\nAnother, longer sentence follows it.\nThird.\n", encoding="utf-8")
    out = tmp_path / "store"
    rc = main(["extract", "--corpus", str(corpus), "--split", "all", "--out", str(out),
               "--model", str(tiny_model_dir("gpt2")), "--device", "cpu", "--batch-size", "2"])
    assert rc == 0
    store = ExtractionStore.open(out)
    assert len(store) == 3 and store.causal
    assert store.sentence(2).text == "Third."


def test_extract_dtype_and_compute_dtype(tmp_path, tiny_model_dir, capsys):
    import torch

    corpus = tmp_path / "sents.txt"
    corpus.write_text("One sentence here.\nAnother, longer sentence follows it.\n", encoding="utf-8")
    path = str(tiny_model_dir("llama"))
    common = ["extract", "--corpus", str(corpus), "--split", "all", "--model", path, "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "h"), "--dtype", "float16"]) == 0
    half = ExtractionStore.open(tmp_path / "h")
    q = half.sentence(0).queries(0)
    assert half.manifest["dtype"] == "float16" and torch.equal(q, q.half().float()) and not torch.equal(q, q.round())
    assert main([*common, "--out", str(tmp_path / "b"), "--compute-dtype", "bfloat16"]) == 0
    store = ExtractionStore.open(tmp_path / "b")
    assert store.manifest["settings"]["compute_dtype"] == "bfloat16" and store.manifest["dtype"] == "float32"
    # The stored q/k are exactly a bfloat16 model's (float32 copies of bfloat16 numbers).
    q = store.sentence(1).queries(1)
    assert torch.equal(q, q.to(torch.bfloat16).float())
    for flag, value in (("--dtype", "int8"), ("--compute-dtype", "float64")):
        with pytest.raises(SystemExit):
            main([*common, "--out", str(tmp_path / "x"), flag, value])
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].endswith(f"argument {flag}: must be " + ("float32 or float16" if flag == "--dtype" else
                                "one of float32, bfloat16, float16") + f", got {value!r}")
    assert main([*common, "--out", str(tmp_path / "r"), "--engine", "ray", "--compute-dtype", "bfloat16"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --compute-dtype is for the local engine; Ray workers load the model in its own dtype")


def test_errors_are_clear_and_nonzero(tmp_path, capsys):
    assert main(["gold", "hello", "--model", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait\n")
    assert main(["extract", "--corpus", str(bad), "--out", str(tmp_path / "o"), "--split", "all"]) == 2
    assert "UTF-8" in capsys.readouterr().err


def test_train_saves_projections_for_the_store(tmp_path, tiny_model_dir):
    from sparsefinder.training.projections import Projections

    corpus = tmp_path / "sents.txt"
    corpus.write_text("\n".join(f"sentence {i} has some words in it" for i in range(12)), encoding="utf-8")
    path = str(tiny_model_dir("bert"))
    assert main(["extract", "--corpus", str(corpus), "--split", "all", "--out", str(tmp_path / "s"),
                 "--model", path, "--device", "cpu"]) == 0
    assert main(["train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "p"), "--epochs", "1"]) == 0
    store = ExtractionStore.open(tmp_path / "s")
    proj = Projections.load(tmp_path / "p", store=store)
    assert proj.rank == 4 and proj.num_layers == 2
    assert main(["train", "--store", str(tmp_path / "missing"), "--out", str(tmp_path / "q")]) == 2


def test_sweep_fits_saves_and_reloads_predictors(tmp_path, tiny_model_dir, capsys):
    import pandas as pd

    from sparsefinder.evaluation.fitted import FittedFileError, load_fitted
    from sparsefinder.evaluation.sweep import load_sweep

    corpus = tmp_path / "sents.txt"
    corpus.write_text("\n".join(f"the {i} cats sat on {i % 3} mats today" for i in range(10)), encoding="utf-8")
    path = str(tiny_model_dir("bert"))
    store, proj = str(tmp_path / "s"), str(tmp_path / "p")
    assert main(["extract", "--corpus", str(corpus), "--split", "all", "--out", store, "--model", path]) == 0
    assert main(["train", "--store", store, "--out", proj, "--epochs", "1"]) == 0
    common = ["sweep", "--store", store, "--projections", proj, "--methods", "distance,kmeans,window"]
    assert main([*common, "--fit-store", store, "--save-fitted", str(tmp_path / "f"),
                 "--out", str(tmp_path / "a.parquet"), "--figure", str(tmp_path / "front.html")]) == 0
    assert "recall @ sparsity >= 0.5" in capsys.readouterr().out
    assert "Recall against sparsity (all layers and heads)" in (tmp_path / "front.html").read_text(encoding="utf-8")
    # pareto reads the table back and draws one head's fronts
    assert main(["pareto", "--sweep", str(tmp_path / "a.parquet"), "--layer", "0", "--head", "1"]) == 0
    assert "Pareto fronts (layer 0, head 1)" in capsys.readouterr().out
    assert main([*common, "--fitted", str(tmp_path / "f"), "--out", str(tmp_path / "b.parquet")]) == 0
    a, b = load_sweep(tmp_path / "a.parquet"), load_sweep(tmp_path / "b.parquet")
    assert set(a["method"]) == {"distance", "kmeans", "window"}
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    fitted = load_fitted(tmp_path / "f")
    assert set(fitted) == {"kmeans"}
    (tmp_path / "f" / "fitted.safetensors").write_bytes(b"garbage")
    with pytest.raises(FittedFileError, match="unreadable"):
        load_fitted(tmp_path / "f")


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf", "0.5", "abc"])
def test_alpha_must_be_finite_and_at_least_one(alpha, capsys, tiny_model_dir):
    with pytest.raises(SystemExit) as exc:
        main(["gold", "--model", str(tiny_model_dir("bert")), f"--alpha={alpha}", "Hello world."])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "alpha must be a" in err and "Traceback" not in err


def test_alpha_is_checked_where_it_enters(tmp_path, monkeypatch, tiny_model_dir):
    import math

    import torch

    from sparsefinder.kernels.entmax import check_alpha, entmax
    from sparsefinder.model.catalogue import load_registry

    for bad in (math.nan, math.inf, 0.9, [[1.5, math.nan]], []):
        with pytest.raises(ValueError, match="finite number >= 1"):
            check_alpha(bad)
    for good in (1.0, 1.5, 2.0, [[1.0, 1.7]]):
        check_alpha(good)
    with pytest.raises(ValueError, match="finite number >= 1"):
        entmax(torch.zeros(2, 3), torch.tensor([[math.nan], [1.5]]))
    model = load_model(str(tiny_model_dir("bert")), device="cpu")
    with pytest.raises(ValueError, match="finite number >= 1"):
        model.set_alpha(math.nan)
    for bad in (math.nan, "1.5"):  # json writes NaN as a bare literal that json.loads accepts
        (tmp_path / "models.json").write_text(json.dumps(
            {"default": "m", "models": {"m": {"path": "pkg:none", "alpha": bad}}}), encoding="utf-8")
        with pytest.raises(ValueError, match="the alpha of 'm' must be a finite number"):
            load_registry(tmp_path / "models.json")


def test_bad_corpus_paths_and_devices_are_one_line_errors(tmp_path, capsys, monkeypatch):
    import sparsefinder.corpora.readers as readers

    out = str(tmp_path / "o")
    assert main(["extract", "--corpus", str(tmp_path), "--out", out]) == 2  # a directory
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a regular file" in err and "Traceback" not in err
    assert main(["extract", "--corpus", str(tmp_path / "none.txt"), "--out", out]) == 2
    assert "no such file" in capsys.readouterr().err
    # the size cap is checked on the file's size, before it is read
    big = tmp_path / "big.txt"
    big.write_bytes(b"word " * 50)
    monkeypatch.setattr(readers, "MAX_BYTES", 100)
    monkeypatch.setattr(readers, "read_corpus", lambda *a, **k: pytest.fail("read before the size check"))
    assert main(["extract", "--corpus", str(big), "--out", out]) == 2
    assert "250 bytes, more than the limit of 100" in capsys.readouterr().err
    for device in ("bogus", "cuda:0" if not __import__("torch").cuda.is_available() else "bogus2"):
        with pytest.raises(SystemExit) as exc:
            main(["gold", "--device", device, "Hello."])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "device" in err and "Traceback" not in err


def test_failures_exit_1_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import sparsefinder.cli as cli

    def broken(args):
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(cli, "cmd_models", broken)
    assert main(["models"]) == 1
    assert capsys.readouterr().err == "error: RuntimeError: the disk is full\n"
    with pytest.raises(RuntimeError, match="the disk is full"):
        main(["--debug", "models"])


def test_serve_runs_the_dashboard_from_the_checkout(monkeypatch, tmp_path):
    """`sparsefinder serve` becomes `streamlit run app/streamlit_app.py` in the checkout, offline and headless
    (every browser test starts the server this way, tests/browser_support.py)."""
    import os
    import sys
    from pathlib import Path

    seen = {}

    def fake_exec(path, argv):
        seen.update(path=path, argv=argv, cwd=os.getcwd(), offline=os.environ.get("HF_HUB_OFFLINE"))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "execv", fake_exec)
    main(["serve", "--port", "8765", "--host", "0.0.0.0"])
    root = Path(__file__).resolve().parent.parent
    assert seen["path"] == sys.executable and Path(seen["cwd"]) == root and seen["offline"] == "1"
    argv = seen["argv"]
    assert argv[1:4] == ["-m", "streamlit", "run"] and (root / argv[4]).is_file()
    assert argv[argv.index("--server.port") + 1] == "8765" and argv[argv.index("--server.address") + 1] == "0.0.0.0"
    assert argv[argv.index("--server.headless") + 1] == "true"
