"""Reader fuzzing: valid documents damaged (truncated, bytes flipped, re-encoded) and raw random bytes.

Whatever the bytes, a reader either returns a correct parse (non-empty, stripped
sentences without NUL; exactly the document's sentences when it was not damaged)
or raises :class:`CorpusError` with one line naming the file (and the line, when
it names one, inside the document); never another exception.
"""

from __future__ import annotations

import csv
import io
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sparsefinder.corpora.readers import CorpusError, read_corpus

FORMATS = ("txt", "csv", "tsv", "conllu")
ENCODINGS = ("utf-16", "utf-16-le", "utf-16-be", "latin-1", "cp1252")
FUZZ = settings(max_examples=150, deadline=None)

# Printable text without line or paragraph separators, normalised to single spaces.
_CHARS = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))
SENTENCE = st.text(_CHARS, min_size=1, max_size=24).map(lambda s: " ".join(s.split())).filter(bool)


def _document(fmt: str, sentences: list[str], heads_seed: list[int], with_text: bool) -> str:
    if fmt == "txt":
        return "\n".join(sentences) + "\n"
    if fmt in ("csv", "tsv"):
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
        w.writerow(["id", "text"])
        w.writerows([i, s] for i, s in enumerate(sentences))
        return buf.getvalue()
    blocks = []
    for k, s in enumerate(sentences):
        lines = [f"# text = {s}"] if with_text else []
        for i, form in enumerate(s.split(), start=1):
            # word 1 is the root; word i hangs from an earlier word: always one tree
            head = 0 if i == 1 else 1 + heads_seed[(k + i) % len(heads_seed)] % (i - 1)
            lines.append(f"{i}\t{form}\t_\tX\t_\t_\t{head}\tdep\t_\t_")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


@st.composite
def documents(draw, fmt: str) -> tuple[bytes, list[str] | None]:
    """Bytes to read, and the sentences a correct reader returns (None: damaged, any outcome is fine)."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=400)), None
    sentences = draw(st.lists(SENTENCE, min_size=1, max_size=6))
    if fmt == "conllu":  # a form is a whitespace-free word and never a comment or an ID-only line
        sentences = [s for s in sentences if "\t" not in s] or ["fallback sentence"]
    doc = _document(fmt, sentences, draw(st.lists(st.integers(0, 50), min_size=1, max_size=8)), draw(st.booleans()))
    data = doc.encode("utf-8")
    damage = draw(st.sampled_from(("none", "truncate", "flip", "encode", "nul")))
    if damage == "none":
        return data, sentences
    if damage == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))], None
    if damage == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out), None
    if damage == "encode":
        return doc.encode(draw(st.sampled_from(ENCODINGS)), errors="replace"), None
    i = draw(st.integers(0, len(data)))
    return data[:i] + b"\x00" + data[i:], None


def check(fmt: str, data: bytes, expected: list[str] | None) -> None:
    name = f"fuzz.{fmt}"
    try:
        corpus = read_corpus(data, name)
    except CorpusError as e:
        message = str(e)
        assert "\n" not in message and "\r" not in message, message
        m = re.match(rf"{re.escape(name)}: (?:line ([1-9][0-9]*): )?\S", message)
        assert m is not None, message
        if m.group(1) is not None:  # the line it names is in the file
            assert int(m.group(1)) <= data.count(b"\n") + data.count(b"\r") + 1, message
        assert expected is None, f"a valid document was refused: {message}"
        return
    texts = corpus.texts()
    assert texts, "a corpus without sentences must be a CorpusError"
    for t in texts:
        assert t and t == t.strip() and "\x00" not in t, repr(t)
    if expected is not None:
        assert texts == expected


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(data=st.data())
def test_reader_parses_or_raises_a_corpus_error(fmt: str, data) -> None:
    raw, expected = data.draw(documents(fmt))
    check(fmt, raw, expected)


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(raw=st.binary(max_size=600))
@example(raw="text\nHello there.\nA second sentence.\n".encode("utf-16-le"))  # UTF-16 without a BOM
@example(raw=b"\xff\xfe" + "text\nHello.\n".encode("utf-16-le"))
@example(raw=b"")
def test_reader_on_raw_bytes(fmt: str, raw: bytes) -> None:
    check(fmt, raw, None)


@pytest.mark.parametrize("fmt", FORMATS)
def test_utf16_le_without_bom_is_refused_naming_it(fmt: str) -> None:
    doc = _document(fmt, ["Hello there.", "A second sentence."], [0], True)
    with pytest.raises(CorpusError, match=rf"^fuzz\.{fmt}: line 1: .*UTF-16 without a byte-order mark"):
        read_corpus(doc.encode("utf-16-le"), f"fuzz.{fmt}")
    check(fmt, doc.encode("utf-8"), ["Hello there.", "A second sentence."])
