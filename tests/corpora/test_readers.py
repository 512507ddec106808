"""Corpus readers (text, CSV/TSV, CoNLL-U), their limits and errors, and the cached default corpus."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsefinder.corpora import readers as C
from sparsefinder.corpora.readers import (
    Corpus,
    CorpusError,
    Sentence,
    corpus_stats,
    default_corpus,
    read_conllu,
    read_corpus,
    read_csv,
    read_text,
    split_sentences,
)

CONLLU = """\
# sent_id = 1
# text = Vámonos al mar, dijo.
1-2\tVámonos\t_\t_\t_\t_\t_\t_\t_\t_
1\tVamos\tir\tVERB\t_\t_\t6\tccomp\t_\t_
2\tnos\tnosotros\tPRON\t_\t_\t1\tobj\t_\t_
3-4\tal\t_\t_\t_\t_\t_\t_\t_\t_
3\ta\ta\tADP\t_\t_\t5\tcase\t_\t_
4\tel\tel\tDET\t_\t_\t5\tdet\t_\t_
5\tmar\tmar\tNOUN\t_\t_\t1\tobl\t_\tSpaceAfter=No
6\t,\t,\tPUNCT\t_\t_\t7\tpunct\t_\t_
7\tdijo\tdecir\tVERB\t_\t_\t0\troot\t_\tSpaceAfter=No
7.1\tdijo\tdecir\tVERB\t_\t_\t_\t_\t0:root\t_
8\t.\t.\tPUNCT\t_\t_\t7\tpunct\t_\t_

# newdoc
# sent_id = 2
1\tHello\thello\tINTJ\t_\t_\t0\troot\t_\tSpaceAfter=No
2\t,\t,\tPUNCT\t_\t_\t3\tpunct\t_\t_
3\tworld\tworld\tNOUN\t_\t_\t1\tvocative\t_\tSpaceAfter=No
4\t!\t!\tPUNCT\t_\t_\t1\tpunct\t_\t_
"""


def _line(i: int, form: str, head: int | str = 0, misc: str = "_", upos: str = "X") -> str:
    return f"{i}\t{form}\t_\t{upos}\t_\t_\t{head}\tdep\t_\t{misc}"


# --------------------------------------------------------------------------- data types


def test_corpus_texts_and_len() -> None:
    corpus = Corpus("c", [Sentence("a b c"), Sentence("d e")], "test")
    assert corpus.texts() == ["a b c", "d e"]
    assert len(corpus) == 2


def test_sentence_rejects_inconsistent_word_fields() -> None:
    with pytest.raises(ValueError, match="upos"):
        Sentence("a b", words=("a", "b"), upos=("X",))


def test_corpus_stats_counts_gold_words_and_whitespace_words() -> None:
    corpus = Corpus("c", [Sentence("one two three"), Sentence("don't", words=("do", "n't"))], "test")
    assert corpus_stats(corpus) == {"sentences": 2, "words": 5, "mean_words": 2.5, "max_words": 3}
    assert corpus_stats(Corpus("e", [], "test"))["max_words"] == 0


# --------------------------------------------------------------------------- plain text


def test_read_text_from_path_and_bytes(tmp_path: Path) -> None:
    data = "\ufeff  First sentence here.  \r\n\n\t\nSecond one.\nÜnïcödé — third.\n".encode()
    path = tmp_path / "s.txt"
    path.write_bytes(data)
    from_path = read_text(path)
    from_bytes = read_text(data, name="upload.txt")
    expected = ["First sentence here.", "Second one.", "Ünïcödé — third."]
    assert from_path.texts() == expected
    assert from_bytes.texts() == expected
    assert from_path.name == "s.txt" and from_bytes.name == "upload.txt"
    assert all(s.words is None and s.char_spans is None for s in from_path.sentences)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=40),
                max_size=20))
def test_read_text_keeps_every_nonblank_line(lines: list[str]) -> None:
    expected = [line.strip() for line in lines if line.strip()]
    data = "\n".join(lines).encode()
    if "\x00" in data.decode():  # NUL is refused (UTF-16 without a BOM would read as NUL-filled lines)
        first = next(k for k, line in enumerate(lines, start=1) if "\x00" in line)
        with pytest.raises(CorpusError, match=rf"line {first}: file contains NUL bytes"):
            read_text(data)
    elif not expected:
        with pytest.raises(CorpusError):
            read_text(data)
    else:
        assert read_text(data).texts() == expected


def test_non_utf8_names_the_line() -> None:
    data = b"good line\nanother good one\nbad \xa3 pound\n"
    with pytest.raises(CorpusError, match=r"latin\.txt: line 3: file is not UTF-8"):
        read_text(data, name="latin.txt")
    with pytest.raises(CorpusError, match="line 2.*not UTF-8"):
        read_conllu(b"# text = x\n1\t\xff\t_\t_\t_\t_\t0\troot\t_\t_\n")


@pytest.mark.parametrize("reader", [read_text, read_csv, read_conllu])
@pytest.mark.parametrize("data", [b"", b"\xef\xbb\xbf", b"  \n\n \t\n"])
def test_empty_file(reader, data: bytes) -> None:
    with pytest.raises(CorpusError, match="empty"):
        reader(data, name="e")


def test_missing_file_is_a_corpus_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="nope.txt: cannot read"):
        read_text(tmp_path / "nope.txt")


def test_too_large_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = b"x" * (C.MAX_BYTES + 1)
    with pytest.raises(CorpusError, match="big.txt: .*limit of 20,971,520 bytes"):
        read_text(big, name="big.txt")
    monkeypatch.setattr(C, "MAX_BYTES", 100)
    path = tmp_path / "big.conllu"
    path.write_bytes(b"a\n" * 51)
    with pytest.raises(CorpusError, match="big.conllu: file is 102 bytes"):
        read_corpus(path)
    path.write_bytes(b"a\n" * 50)  # exactly at the limit is fine
    assert len(read_text(path)) == 50


def test_too_many_sentences(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "MAX_SENTENCES", 3)
    assert len(read_text(b"a\nb\nc\n")) == 3
    with pytest.raises(CorpusError, match="line 5: more than 3 sentences"):
        read_text(b"a\nb\n\nc\nd\n")
    with pytest.raises(CorpusError, match="more than 3 sentences"):
        read_csv(b"text\na\nb\nc\nd\n")
    with pytest.raises(CorpusError, match="line 7: more than 3 sentences"):
        read_conllu(f"{_line(1, 'w')}\n\n{_line(1, 'w')}\n\n{_line(1, 'w')}\n\n# c\n{_line(1, 'w')}\n".encode())


def test_too_long_sentence_names_the_line(monkeypatch: pytest.MonkeyPatch) -> None:
    long = "a" * (C.MAX_SENTENCE_CHARS + 1)
    with pytest.raises(CorpusError, match="t.txt: line 2: sentence has 10,001 characters"):
        read_text(f"short\n{long}\n".encode(), name="t.txt")
    monkeypatch.setattr(C, "MAX_SENTENCE_CHARS", 5)
    with pytest.raises(CorpusError, match="line 3: sentence has 6 characters"):
        read_csv(b"text\nabc\nabcdef\n")
    with pytest.raises(CorpusError, match="line 1: sentence has"):
        read_conllu(f"# text = abcdef\n{_line(1, 'abcdef')}\n".encode())


# --------------------------------------------------------------------------- CSV / TSV


def test_read_csv_path_bytes_and_quoting(tmp_path: Path) -> None:
    data = 'id,text,label\n1,"Hello, world.",x\n2,  Plain one  ,y\n3,,z\n\n4,"Multi\nline ""quoted"" cell",w\n'
    path = tmp_path / "d.csv"
    path.write_text(data, encoding="utf-8")
    expected = ["Hello, world.", "Plain one", 'Multi\nline "quoted" cell']
    assert read_csv(path).texts() == expected
    assert read_csv(data.encode(), name="up.csv").texts() == expected
    assert "CSV column 'text'" in read_csv(path).source


def test_read_tsv_by_extension_and_by_sniffing(tmp_path: Path) -> None:
    data = "sentence\tsource\nA sentence, with commas, here.\tweb\nAnother; one.\tbook\n"
    path = tmp_path / "d.tsv"
    path.write_text(data, encoding="utf-8")
    expected = ["A sentence, with commas, here.", "Another; one."]
    assert read_csv(path, column="sentence").texts() == expected
    assert read_csv(data.encode(), column="sentence").texts() == expected  # no extension: header decides
    with pytest.raises(CorpusError, match="available columns: 'sentence', 'source'"):
        read_corpus(data.encode(), "x.tsv")
    assert "TSV" in read_csv(path, column="sentence").source


def test_single_column_csv_with_commas_in_sentences() -> None:
    data = b'text\n"One, two, three."\nNo commas here.\n'
    assert read_csv(data, name="one.csv").texts() == ["One, two, three.", "No commas here."]


def test_csv_column_match_ignores_case_and_explicit_delimiter() -> None:
    assert read_csv(b"ID;Text\n1;hello there\n", delimiter=";").texts() == ["hello there"]
    assert read_csv(b"ID;Text\n1;hello there\n").texts() == ["hello there"]


def test_csv_missing_column_lists_columns() -> None:
    with pytest.raises(CorpusError, match=r"d\.csv: line 1: no column 'text'.*available columns: 'id', 'body'"):
        read_csv(b"id,body\n1,hi\n", name="d.csv")


def test_csv_short_row_and_bad_quoting_name_the_line() -> None:
    with pytest.raises(CorpusError, match="line 3: row has 1 fields"):
        read_csv(b"id,text\n1,fine\n2\n")
    with pytest.raises(CorpusError, match=r"line \d+: malformed CSV"):
        read_csv(b'id,text\n1,"unterminated\n')


def test_csv_header_only_has_no_sentences() -> None:
    with pytest.raises(CorpusError, match="contains no sentences"):
        read_csv(b"text\n", name="h.csv")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1,
                        max_size=30).filter(lambda s: s == s.strip() and s != ""), min_size=1, max_size=15),
       st.sampled_from([",", "\t"]))
def test_csv_roundtrip(cells: list[str], delim: str) -> None:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter=delim)  # CRLF terminator, so cells with a lone CR get quoted
    writer.writerow(["n", "text"])
    for k, cell in enumerate(cells):
        writer.writerow([k, cell])
    name = "x.tsv" if delim == "\t" else "x.csv"
    assert read_csv(buf.getvalue().encode(), name=name).texts() == cells


# --------------------------------------------------------------------------- CoNLL-U


def test_read_conllu_words_tags_tree_and_spans(tmp_path: Path) -> None:
    path = tmp_path / "ud.conllu"
    path.write_text(CONLLU, encoding="utf-8")
    for corpus in (read_conllu(path), read_conllu(CONLLU.encode(), name="ud.conllu")):
        first, second = corpus.sentences
        assert first.text == "Vámonos al mar, dijo."
        assert first.words == ("Vamos", "nos", "a", "el", "mar", ",", "dijo", ".")  # no ranges, no 7.1
        assert first.upos == ("VERB", "PRON", "ADP", "DET", "NOUN", "PUNCT", "VERB", "PUNCT")
        assert first.heads == (6, 1, 5, 5, 1, 7, 0, 7)
        assert first.deprels == ("ccomp", "obj", "case", "det", "obl", "punct", "root", "punct")
        # Words of a multiword token share its span; the rest spell themselves.
        spans = [first.text[s:e] for s, e in first.char_spans]
        assert spans == ["Vámonos", "Vámonos", "al", "al", "mar", ",", "dijo", "."]
        # No "# text": rebuilt from forms honouring SpaceAfter=No.
        assert second.text == "Hello, world!"
        assert second.char_spans == ((0, 5), (5, 6), (7, 12), (12, 13))
        assert second.heads == (0, 3, 1, 1)


def test_conllu_without_text_joins_multiword_surface_forms() -> None:
    data = "\n".join([
        "1-2\tdu\t_\t_\t_\t_\t_\t_\t_\t_",
        _line(1, "de", 3), _line(2, "le", 3), _line(3, "pain", 0, "SpaceAfter=No"), _line(4, ".", 3),
    ]) + "\n"
    (sent,) = read_conllu(data.encode()).sentences
    assert sent.text == "du pain."
    assert sent.char_spans == ((0, 2), (0, 2), (3, 7), (7, 8))


def test_conllu_unannotated_columns_become_none_and_crlf() -> None:
    data = "# text = a b\r\n1\ta\t_\t_\t_\t_\t_\t_\t_\t_\r\n2\tb\t_\t_\t_\t_\t_\t_\t_\t_\r\n"
    (sent,) = read_conllu(data.encode()).sentences
    assert sent.words == ("a", "b")
    assert sent.upos is None and sent.heads is None and sent.deprels is None
    assert sent.char_spans == ((0, 1), (2, 3))


def test_conllu_text_that_does_not_spell_the_words_has_no_spans() -> None:
    data = f"# text = gonna go\n{_line(1, 'going', 0)}\n{_line(2, 'go', 1)}\n"
    (sent,) = read_conllu(data.encode()).sentences
    assert sent.text == "gonna go" and sent.words == ("going", "go")
    assert sent.char_spans is None


@pytest.mark.parametrize(("lines", "line_no", "message"), [
    ([_line(1, "a"), "2\tb\t_\tX\t_\t_\t1\tdep\t_"], 3, "expected 10 tab-separated columns, found 9"),
    ([_line(1, "a"), "2 b _ X _ _ 1 dep _ _"], 3, "expected 10 tab-separated columns, found 1"),
    ([_line(1, "a"), _line(2, "b", "x")], 3, "HEAD 'x' is not an integer"),
    ([_line(1, "a"), _line(2, "b", -1)], 3, "HEAD '-1' is not an integer"),
    ([_line(1, "a", 0), _line(2, "b", "_")], 3, "HEAD '_' is not an integer"),
    ([_line(1, "a"), _line(2, "b", 3)], 3, r"HEAD 3 is out of range \(the sentence has 2 words\)"),
    ([_line(1, "a"), "two\tb\t_\tX\t_\t_\t1\tdep\t_\t_"], 3, "ID 'two' is not an integer"),
    ([_line(1, "a"), _line(3, "b", 1)], 3, "word ID 3 out of sequence"),
    (["2-3\tab\t_\t_\t_\t_\t_\t_\t_\t_", _line(1, "a")], 2, "range 2-3 does not start"),
    (["1-3\tab\t_\t_\t_\t_\t_\t_\t_\t_", _line(1, "a"), _line(2, "b", 1)], 1, "multiword token ends at word 3"),
])
def test_malformed_conllu_names_the_line(lines: list[str], line_no: int, message: str) -> None:
    data = "# text = a b\n" + "\n".join(lines) + "\n"
    with pytest.raises(CorpusError, match=rf"bad\.conllu: line {line_no}: .*{message}"):
        read_conllu(data.encode(), name="bad.conllu")


def test_malformed_line_number_counts_earlier_sentences() -> None:
    data = f"{_line(1, 'ok')}\n\n# c\n{_line(1, 'a')}\n{_line(2, 'b', 7)}\n"
    with pytest.raises(CorpusError, match="line 5: HEAD 7 is out of range"):
        read_conllu(data.encode())


def test_conllu_comments_only_has_no_sentences() -> None:
    with pytest.raises(CorpusError, match="c.conllu: contains no sentences"):
        read_conllu(b"# newdoc\n# text = nothing\n\n", name="c.conllu")


words_st = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc", "Zl", "Zp"), blacklist_characters="#"),
                   min_size=1, max_size=8).filter(lambda w: w.split() == [w])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(words_st, st.booleans()), min_size=1, max_size=12), st.booleans())
def test_conllu_text_and_spans_roundtrip(words: list[tuple[str, bool]], with_text: bool) -> None:
    text = "".join(w + (" " if space and k < len(words) - 1 else "") for k, (w, space) in enumerate(words))
    lines = [f"# text = {text}"] if with_text else []
    lines += [_line(k + 1, w, k, "_" if space else "SpaceAfter=No") for k, (w, space) in enumerate(words)]
    (sent,) = read_conllu(("\n".join(lines) + "\n").encode()).sentences
    assert sent.text == text
    assert sent.words == tuple(w for w, _ in words)
    assert sent.heads == tuple(range(len(words)))
    assert sent.char_spans is not None
    assert [sent.text[s:e] for s, e in sent.char_spans] == [w for w, _ in words]
    ends = [e for _, e in sent.char_spans]
    starts = [s for s, _ in sent.char_spans]
    assert all(e <= s for e, s in zip(ends, starts[1:], strict=False))


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize(("filename", "texts"), [
    ("a.txt", ["text", "one sentence"]),
    ("a.TXT", ["text", "one sentence"]),
    ("a.csv", ["one sentence"]),
])
def test_read_corpus_dispatches_on_extension(filename: str, texts: list[str], tmp_path: Path) -> None:
    data = b"text\none sentence\n"
    assert read_corpus(data, filename).texts() == texts
    path = tmp_path / filename
    path.write_bytes(data)
    assert read_corpus(path).texts() == texts


def test_read_corpus_conll_and_unknown_extension() -> None:
    assert read_corpus(CONLLU.encode(), "x.conll").texts() == ["Vámonos al mar, dijo.", "Hello, world!"]
    with pytest.raises(CorpusError, match=r"x\.pdf: unsupported file type '\.pdf'.*\.conllu"):
        read_corpus(b"whatever", "x.pdf")
    with pytest.raises(CorpusError, match="file name is needed"):
        read_corpus(b"whatever")


# --------------------------------------------------------------------------- sentence splitting


def test_split_sentences() -> None:
    text = "The cat sat on the mat.  It was   happy!\nDr. Smith arrived at 5 p.m. yesterday. Was he late?"
    assert split_sentences(text) == [
        "The cat sat on the mat.", "It was happy!", "Dr. Smith arrived at 5 p.m. yesterday.", "Was he late?",
    ]
    assert split_sentences("  \n ") == []


def test_split_sentences_from_threads() -> None:
    texts = [f"Sentence number {k} is here. And another one follows it. Done {k}." for k in range(8)]
    split_sentences("Warm up.")  # load the pipeline first, so the threads race on the nlp call itself
    barrier = threading.Barrier(len(texts))

    def run(text: str) -> list[str]:
        barrier.wait(timeout=30)
        return split_sentences(text)

    with ThreadPoolExecutor(max_workers=len(texts)) as pool:
        results = list(pool.map(run, texts))
    assert results == [[f"Sentence number {k} is here.", "And another one follows it.", f"Done {k}."]
                       for k in range(8)]


# --------------------------------------------------------------------------- default corpus


@pytest.fixture(scope="module")
def lee_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache dir holding the default corpus, split with spaCy once for the whole module."""
    root = tmp_path_factory.mktemp("sf-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSEFINDER_CACHE", str(root))
        default_corpus()
    return root


@pytest.fixture
def cached(lee_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SPARSEFINDER_CACHE", str(lee_cache))
    return lee_cache


def _no_spacy(*_args, **_kwargs):
    raise AssertionError("spaCy was called although the cache should have been used")


def test_default_corpus_sizes_and_content(cached: Path) -> None:
    full = default_corpus()
    assert full.name == C.DEFAULT_CORPUS_NAME == "lee-news"
    assert 2500 <= len(full) <= 3000
    texts = full.texts()
    assert len(set(texts)) == len(texts)  # duplicates dropped
    assert all(len(t.split()) >= 3 and t == " ".join(t.split()) for t in texts)
    # Known sentences from lee_background.cor (first document) and lee.cor (Latin-1 '£' decoded).
    assert ("A new blaze near Goulburn, south-west of Sydney, has forced the closure of the Hume Highway."
            in texts)
    assert any("£3,000" in t for t in texts)
    stats = corpus_stats(full)
    assert stats["sentences"] == len(full) and 15 < stats["mean_words"] < 35
    assert "gensim" in full.source and "LGPL" in full.source and "Lee, Pincombe & Welsh 2005" in full.source


def test_default_corpus_split(cached: Path) -> None:
    full = default_corpus().texts()
    val = default_corpus("validation")
    train = default_corpus("train", seed=0)
    assert val.name == "lee-news/validation" and train.name == "lee-news/train"
    assert len(val) == C.VALIDATION_SIZE == 500
    assert len(train) + len(val) == len(full)
    assert not set(train.texts()) & set(val.texts())
    # Both keep corpus order.
    position = {t: k for k, t in enumerate(full)}
    for part in (train, val):
        idx = [position[t] for t in part.texts()]
        assert idx == sorted(idx)
    assert default_corpus("validation", seed=0).texts() == val.texts()
    other = default_corpus("validation", seed=1).texts()
    assert other != val.texts() and len(other) == 500
    assert "seed 0" in val.source


def test_default_corpus_rejects_unknown_split(cached: Path) -> None:
    with pytest.raises(ValueError, match="split must be"):
        default_corpus("test")


def test_default_corpus_reuses_cache(cached: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = C.default_corpus_cache_path()
    assert path.parent == cached and path.is_file()
    payload = json.loads(path.read_text(encoding="utf-8"))
    assert payload["params"]["model"] == C.SPACY_MODEL
    assert list(cached.glob("*.tmp")) == []  # atomic write left no temp file
    monkeypatch.setattr(C, "_segment", _no_spacy)
    start = time.perf_counter()
    corpus = default_corpus("train")
    assert time.perf_counter() - start < 2.0
    assert len(corpus) == len(payload["sentences"]) - 500


@pytest.mark.parametrize("bad", ['{"key": "trunc', "[1, 2]", '{"key": "other", "sentences": ["x"]}'])
def test_corrupt_or_stale_cache_is_rebuilt(bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEFINDER_CACHE", str(tmp_path))
    calls = []

    def fake_segment(docs: list[str]) -> list[list[str]]:  # fast stand-in for spaCy: split on ". "
        calls.append(len(docs))
        return [[s.strip() for s in d.split(". ") if s.strip()] for d in docs]

    monkeypatch.setattr(C, "_segment", fake_segment)
    path = C.default_corpus_cache_path()
    path.write_text(bad, encoding="utf-8")
    first = default_corpus()
    assert len(calls) == 1 and calls[0] > 300  # one batch of all ~350 documents
    assert json.loads(path.read_text(encoding="utf-8"))["sentences"] == first.texts()
    default_corpus()
    assert len(calls) == 1  # rebuilt cache is now used
    # A change to the splitting parameters gives another cache file.
    monkeypatch.setattr(C, "MIN_WORDS", 4)
    assert C.default_corpus_cache_path() != path
    assert all(len(t.split()) >= 4 for t in default_corpus().texts())
    assert len(calls) == 2


def test_cache_key_depends_on_file_bytes_and_params() -> None:
    params = C._split_params()
    key = C._cache_key([("a.cor", b"abc")], params)
    assert key == C._cache_key([("a.cor", b"abc")], dict(params))
    assert key != C._cache_key([("a.cor", b"abd")], params)
    assert key != C._cache_key([("b.cor", b"abc")], params)
    assert key != C._cache_key([("a.cor", b"abc")], {**params, "model_version": "0.0.0"})


# --------------------------------------------------------------------------- bad input: encodings, trees, columns


@pytest.mark.parametrize("reader", [read_text, read_csv, read_conllu])
def test_utf16_without_bom_is_refused_not_read_as_nuls(reader) -> None:
    text = "text\nHello there.\nSecond line here.\n"
    with pytest.raises(CorpusError, match=r"^f\.x: line 1: file contains NUL bytes; it looks like UTF-16 without "
                                          r"a byte-order mark"):
        reader(text.encode("utf-16-le"), name="f.x")
    # big-endian: the first NUL is the first byte
    with pytest.raises(CorpusError, match="UTF-16 without a byte-order mark"):
        reader(text.encode("utf-16-be"), name="f.x")


def test_nul_names_its_line_and_utf16_with_bom_says_utf16() -> None:
    with pytest.raises(CorpusError, match=r"^f\.txt: line 3: file contains NUL bytes"):
        read_text(b"one\ntwo\nth\x00ree\n", name="f.txt")
    with pytest.raises(CorpusError, match=r"^f\.txt: line 1: file is UTF-16 .*save it as UTF-8"):
        read_text("Hello.\n".encode("utf-16"), name="f.txt")  # Python writes the BOM


def _conllu_heads(heads: list[int]) -> bytes:
    return ("\n".join(_line(i + 1, f"w{i}", h) for i, h in enumerate(heads)) + "\n").encode()


@pytest.mark.parametrize(("heads", "line_no", "message"), [
    ([2, 1], 3, "the sentence has no root"),  # the line its block starts on
    ([0, 0, 1], 5, r"the sentence has 2 roots \(words 1, 2 have HEAD 0\)"),  # the second root's line
    ([0, 2], 5, r"HEADs form a cycle \(2 -> 2\)"),
    ([0, 3, 4, 2], 5, r"HEADs form a cycle \(2 -> 3 -> 4 -> 2\)"),
])
def test_conllu_heads_must_form_one_tree(heads: list[int], line_no: int, message: str) -> None:
    data = b"# c\n\n# sent_id = 9\n" + _conllu_heads(heads)  # word i is on line i + 3
    with pytest.raises(CorpusError, match=rf"^t\.conllu: line {line_no}: {message}"):
        read_conllu(data, name="t.conllu")


def _is_tree(heads: list[int]) -> bool:
    """Independent check: one root, and a walk down the children from it reaches every word."""
    roots = [i + 1 for i, h in enumerate(heads) if h == 0]
    if len(roots) != 1:
        return False
    children: dict[int, list[int]] = {}
    for i, h in enumerate(heads):
        children.setdefault(h, []).append(i + 1)
    seen, todo = set(), [roots[0]]
    while todo:
        w = todo.pop()
        seen.add(w)
        todo.extend(c for c in children.get(w, []) if c not in seen)
    return len(seen) == len(heads)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8).flatmap(lambda n: st.lists(st.integers(0, n), min_size=n, max_size=n)))
def test_conllu_accepts_exactly_the_trees(heads: list[int]) -> None:
    data = _conllu_heads(heads)
    if _is_tree(heads):
        (sent,) = read_conllu(data, name="t.conllu").sentences
        assert sent.heads == tuple(heads)
    else:
        with pytest.raises(CorpusError, match=r"^t\.conllu: line \d+: .*(root|cycle)"):
            read_conllu(data, name="t.conllu")


@pytest.mark.parametrize(("data", "message"), [
    (b"text,id,text\nhello there,1,other\n", r"column 'text' appears 2 times in the CSV header \(columns 1, 3\)"),
    (b"Text,id,TEXT\nhello there,1,other\n", r"column 'text' appears 2 times"),
    (b"text\ttext\na\tb\n", r"column 'text' appears 2 times in the TSV header"),
])
def test_csv_duplicated_text_column_is_refused(data: bytes, message: str) -> None:
    name = "d.tsv" if b"\t" in data else "d.csv"
    with pytest.raises(CorpusError, match=rf"^d\.[ct]sv: line 1: {message}"):
        read_csv(data, name=name)
    # an exact match still wins over a case-folded twin, as before
    assert read_csv(b"text,Text\nkept,other\n", name="d.csv").texts() == ["kept"]


@pytest.mark.parametrize(("name", "data"), [
    ("a.txt", b"\xff\xfe\x00"), ("a.txt", b""), ("b.csv", b"id\n1\n"), ("c.conllu", _conllu_heads([2, 1])),
    ("d.tsv", b"text\ttext\na\tb\n"), ("e.txt", "x\n".encode("utf-16-le")),
])
def test_upload_error_names_the_file_once_at_its_start(name: str, data: bytes) -> None:
    from sparsefinder.corpora.upload import read_upload

    parsed = read_upload(data, name)
    assert parsed.corpus is None and parsed.error is not None
    assert parsed.error.startswith(f"{name}: ") and parsed.error.count(name) == 1, parsed.error
    assert "\n" not in parsed.error
