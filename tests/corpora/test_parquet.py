"""Parquet corpora (a ``text`` column), as the Ray engine's issue asks: a correct parse, or one clear error
naming the file, for valid, damaged and random bytes (hypothesis)."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefinder.corpora.corpus import CorpusError
from sparsefinder.corpora.readers import read_corpus, read_parquet
from sparsefinder.corpora.upload import read_upload


def _parquet(**columns) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def test_reads_the_text_column_in_order_skipping_empty_cells(tmp_path):
    data = _parquet(id=[1, 2, 3, 4], Text=["  The cat sat.", None, "", "Dogs bark. "])
    corpus = read_corpus(data, "c.parquet")
    assert [s.text for s in corpus.sentences] == ["The cat sat.", "Dogs bark."]
    path = tmp_path / "c.parquet"
    path.write_bytes(data)
    assert corpus.texts() == read_corpus(path).texts()
    assert read_upload(data, "c.parquet").corpus.texts() == corpus.texts()
    assert read_parquet(_parquet(body=["x y"]), column="body", name="b.parquet").texts() == ["x y"]


@pytest.mark.parametrize("data, message", [
    (_parquet(sentence=["a"]), "column 'text' is missing"),
    (_parquet(text=[1, 2]), "holds int64, not text"),
    (_parquet(text=["a\x00b"]), "NUL"),
    (_parquet(text=[None, ""]), "contains no sentences"),
    (b"PAR1 not really", "not a readable Parquet file"),
])
def test_bad_parquet_is_one_clear_error_naming_the_file(data, message):
    with pytest.raises(CorpusError) as e:
        read_corpus(data, "bad.parquet")
    assert str(e.value).startswith("bad.parquet: ") and message in str(e.value)
    assert "\n" not in str(e.value)
    upload = read_upload(data, "bad.parquet")
    assert upload.corpus is None and upload.error.count("bad.parquet") == 1


@settings(max_examples=120, deadline=None)
@given(texts=st.lists(st.text(max_size=40), min_size=1, max_size=12), cut=st.integers(0, 4000),
       flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=4))
def test_damaged_parquet_parses_or_fails_clearly(texts, cut, flips):
    data = bytearray(_parquet(text=texts))
    for at, value in flips:
        data[at % len(data)] = value
    data = bytes(data[: max(cut, 1)]) if cut < len(data) else bytes(data)
    try:
        corpus = read_corpus(data, "f.parquet")
    except CorpusError as e:
        assert str(e).startswith("f.parquet: ") and "\n" not in str(e)
        return
    for s in corpus.sentences:
        assert s.text and s.text == s.text.strip() and "\x00" not in s.text
    if not flips and cut >= len(data):
        assert corpus.texts() == [t.strip() for t in texts if t.strip() and "\x00" not in t]
