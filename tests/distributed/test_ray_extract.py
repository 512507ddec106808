"""Extraction on Ray against the single-process store: same bytes, whatever the workers; faults; interruptions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsefinder.corpora.extract import extract_corpus
from sparsefinder.corpora.shards import read_safetensors
from sparsefinder.corpora.store import ExtractionStore, StoreError

pytestmark = pytest.mark.ray
ray_extract = pytest.importorskip("sparsefinder.distributed.ray_extract")
pytest.importorskip("ray")

SETTINGS = {"batch_size": 3, "shard_size": 4}
# What may differ between engines: when and how fast it ran, and the engine's own record.
VOLATILE = {"created"}
VOLATILE_SETTINGS = {"elapsed_s", "engine"}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir("bert"))


@pytest.fixture(scope="module")
def single(bert, texts, tmp_path_factory) -> Path:
    """The single-process store, with one torch thread as each Ray worker of half a CPU has."""
    out = tmp_path_factory.mktemp("single") / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return extract_corpus(bert, texts, out, progress=False, **SETTINGS)
    finally:
        torch.set_num_threads(threads)


def assert_same_store(a: Path, b: Path) -> None:
    """Every tensor and string bit for bit, and the manifests but for timings, device and engine."""
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    strip = lambda m: {k: v for k, v in m.items() if k not in VOLATILE and k != "settings"}  # noqa: E731
    assert strip(ma) == strip(mb)
    assert {k: v for k, v in ma["settings"].items() if k not in VOLATILE_SETTINGS} == \
        {k: v for k, v in mb["settings"].items() if k not in VOLATILE_SETTINGS}
    assert ma["complete"] and mb["complete"]
    for ea, eb in zip(ma["shards"], mb["shards"], strict=True):
        ta, _ = read_safetensors(a / ea["file"])
        tb, _ = read_safetensors(b / eb["file"])
        assert sorted(ta) == sorted(tb)
        for name in ta:
            assert ta[name].dtype == tb[name].dtype and np.array_equal(ta[name], tb[name]), name
        assert (a / ea["file"]).read_bytes() == (b / eb["file"]).read_bytes()
        assert (a / ea["strings_file"]).read_bytes() == (b / eb["strings_file"]).read_bytes()
    sa, sb = ExtractionStore.open(a, verify=True), ExtractionStore.open(b, verify=True)
    assert len(sa) == len(sb) and sa.texts() == sb.texts()
    x, y = sa.sentence(5), sb.sentence(5)
    assert x.tokens == y.tokens and bool((x.gold(1) == y.gold(1)).all())


def test_one_worker_equals_single_process(ray_session, model_dir, texts, single, tmp_path):
    out = ray_extract.extract_corpus_ray(model_dir, texts, tmp_path / "ray", device="cpu", workers=1,
                                         progress=False, **SETTINGS)
    assert_same_store(single, out)
    engine = json.loads((out / "manifest.json").read_text())["settings"]["engine"]
    assert engine["name"] == "ray" and engine["workers"] == 1 and 0 < engine["cpus_per_worker"] < 2


def test_cli_two_workers_equal_single_process(ray_session, model_dir, texts, single, tmp_path, capsys):
    from sparsefinder.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "ray2"
    rc = main(["extract", "--engine", "ray", "--workers", "2", "--corpus", str(corpus), "--model", model_dir,
               "--device", "cpu", "--out", str(out), "--batch-size", "3", "--shard-size", "4", "--split", "all"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["settings"]["engine"]["workers"] == 2
    # The CLI names the corpus after its file and the split as given; the rest must match the API's store.
    ref = json.loads((single / "manifest.json").read_text())
    assert (m["corpus"], m["split"]) == ("corpus.txt", "all") and (ref["corpus"], ref["split"]) == ("", "")
    m["corpus"], m["split"] = "", ""
    (out / "manifest.json").write_text(json.dumps(m))
    assert_same_store(single, out)


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_failed_worker_is_retried(ray_session, model_dir, texts, single, tmp_path, mode):
    marker = tmp_path / "failed-once"
    hook = f"2:{marker}" + (":exit" if mode == "exit" else "")
    out = ray_extract.extract_corpus_ray(model_dir, texts, tmp_path / "ray", device="cpu", workers=2,
                                         progress=False, fail_once=hook, **SETTINGS)
    assert marker.exists()  # the fault did fire, on shard 2, once
    assert_same_store(single, out)


def test_interrupted_output_is_detected_and_resumed(ray_session, bert, model_dir, texts, single, tmp_path):
    out = tmp_path / "ray"
    marker = tmp_path / "failed-once"
    # No retries: the injected fault on the last shard ends the job, as a lost driver or cluster would.
    with pytest.raises(RuntimeError, match="injected failure on shard 3"):
        ray_extract.extract_corpus_ray(model_dir, texts, out, device="cpu", workers=1, progress=False,
                                       max_retries=0, fail_once=f"3:{marker}", **SETTINGS)
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is False and len(m["shards"]) < 4
    kept = {e["file"]: (out / e["file"]).stat().st_mtime_ns for e in m["shards"]}
    with pytest.raises(StoreError, match="incomplete"):
        ExtractionStore.open(out)
    with pytest.raises(FileExistsError, match="interrupted extraction .* --resume"):
        ray_extract.extract_corpus_ray(model_dir, texts, out, device="cpu", progress=False, **SETTINGS)
    with pytest.raises(FileExistsError, match="interrupted extraction .* --resume"):
        extract_corpus(bert, texts, out, progress=False)  # the single-process path refuses it too
    with pytest.raises(FileExistsError, match="another corpus, model or settings"):
        ray_extract.extract_corpus_ray(model_dir, texts[:-1], out, device="cpu", progress=False, resume=True,
                                       **SETTINGS)
    ray_extract.extract_corpus_ray(model_dir, texts, out, device="cpu", workers=2, progress=False, resume=True,
                                   **SETTINGS)
    m = json.loads((out / "manifest.json").read_text())
    assert m["settings"]["engine"]["resumed_shards"] == len(kept)
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept  # finished shards were kept, not redone
    assert_same_store(single, out)


def test_bad_text_is_one_clear_error(ray_session, model_dir, tmp_path):
    with pytest.raises(TypeError, match="text 1 is int"):
        ray_extract.extract_corpus_ray(model_dir, ["fine", 3], tmp_path / "x", device="cpu", progress=False)
