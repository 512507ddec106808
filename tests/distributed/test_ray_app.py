"""The dashboard pointed at a Ray cluster (``SPARSEFINDER_RAY_ADDRESS``): the Corpus page's extraction runs
on Ray with its progress on the page, and writes the store the single-process path writes (#14)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sparsefinder import results as rs
from sparsefinder.corpora.extract import extract_corpus
from sparsefinder.corpora.store import ExtractionStore

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
TEXT = b"The cat sat on the mat.\nDogs bark at night in the city.\nA small bird sings every morning.\n"


def test_engine_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(rs.RAY_ADDRESS_ENV, raising=False)
    assert rs.ray_engine() is None
    monkeypatch.setenv(rs.RAY_ADDRESS_ENV, "ray://head:10001")
    monkeypatch.setenv(rs.RAY_WORKERS_ENV, "3")
    assert rs.ray_engine() == ("ray://head:10001", 3)
    monkeypatch.setenv(rs.RAY_WORKERS_ENV, "two")
    with pytest.raises(ValueError, match="whole number"):
        rs.ray_engine()


def test_corpus_page_extracts_on_ray_with_progress(ray_session, bert, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from sparsefinder.model.user_catalogue import add_model

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    monkeypatch.setenv("SPARSEFINDER_CATALOGUE", str(tmp_path / "user.json"))
    monkeypatch.setenv("SPARSEFINDER_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv(rs.RAY_ADDRESS_ENV, "local")  # the tests' own Ray, already connected
    model_dir = Path(bert.name)
    add_model("tiny-bert", model_dir)
    seen: list[tuple[int, int | None]] = []
    real = rs.extract_result

    def spy(model, texts, out, corpus_name="", callback=None):
        def report(done, total):
            seen.append((done, total))
            callback(done, total)

        return real(model, texts, out, corpus_name=corpus_name, callback=report)

    monkeypatch.setattr(rs, "extract_result", spy)
    at = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=300)
    at.query_params["model"] = "tiny-bert"
    at.run()
    at.switch_page("views/corpus.py").run()
    at.radio(key="corpus_source").set_value("upload a file").run()
    at.file_uploader(key="corpus_upload").set_value(("s.txt", TEXT, "text/plain")).run()
    at.text_input(key="corpus_result").set_value("on-ray").run()
    at.button(key="corpus_extract").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    out = tmp_path / "runs" / "tiny-bert" / "on-ray" / "store"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["engine"]["name"] == "ray"
    assert seen and seen[-1] == (3, 3)
    # The same store as the single-process path (one torch thread, as each half-CPU worker runs).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = extract_corpus(bert, [s.decode() for s in TEXT.split(b"\n") if s], tmp_path / "single",
                                batch_size=32, progress=False)
    finally:
        torch.set_num_threads(threads)
    a, b = ExtractionStore.open(out, verify=True), ExtractionStore.open(single)
    assert a.texts() == b.texts()
    for i in range(len(a)):
        for layer in range(a.num_layers):
            assert torch.equal(a.sentence(i).gold(layer), b.sentence(i).gold(layer))
            assert torch.equal(a.sentence(i).queries(layer), b.sentence(i).queries(layer))
