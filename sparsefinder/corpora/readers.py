"""Sentences to study: file readers for user corpora and the offline default corpus.

Every experiment runs on a list of sentences. Users bring their own as plain
text (one sentence per line), CSV/TSV (one column holds the sentences) or
CoNLL-U (gold words, UPOS tags and dependency trees, which the POS-per-cluster
view and the syntax masks of Breaking BERT use; docs/method.md §6-7). The web UI receives
uploads as bytes, so every reader takes a path *or* raw bytes plus a name.

Readers are strict: input must be UTF-8, malformed lines are rejected with a
:class:`CorpusError` that names the file and the line, and size limits keep one
upload from exhausting the server. Silent repairs would make gold graphs and
tags refer to different words than the user thinks. The sentences and corpora
they return are defined in :mod:`sparsefinder.corpora.corpus`; the CoNLL-U
parsing itself is :mod:`sparsefinder.corpora.conllu`.

The default corpus needs no download: the Lee news corpus ships inside the
installed ``gensim`` package. Its documents are split into sentences with spaCy
once and the result is cached on disk, because segmentation costs seconds and
the dashboard asks for the corpus on every start.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sparsefinder.corpora.conllu import parse_conllu
from sparsefinder.corpora.corpus import NEWLINE as _NEWLINE
from sparsefinder.corpora.corpus import Corpus, CorpusError, Sentence, Source
from sparsefinder.corpora.spacy_model import SPACY_MODEL, load_spacy

MAX_UPLOAD_MIB = 20
"""Largest accepted input in MiB: the readers', the Corpus page's and Streamlit's ``server.maxUploadSize``."""
MAX_BYTES = MAX_UPLOAD_MIB * 1024 * 1024
"""Largest accepted input in bytes (20 MiB); larger uploads are refused before decoding."""
MAX_SENTENCES = 100_000
"""Most sentences one corpus may hold."""
MAX_SENTENCE_CHARS = 10_000
"""Longest accepted sentence in characters (far beyond any model's context)."""

DEFAULT_CORPUS_NAME = "lee-news"
VALIDATION_SIZE = 500
"""Sentences in the default corpus's validation split."""
MIN_WORDS = 3
"""Default-corpus sentences with fewer whitespace-separated words are dropped (fragments like ``he said.``)."""

# The dependency parser gives better sentence boundaries on this news text than
# the statistical ``senter`` (which cuts inside brackets and quotes); the parser
# only needs tok2vec, so everything else is left out to save time.
_SPACY_EXCLUDE = ("tagger", "attribute_ruler", "lemmatizer", "ner", "senter")
_LEE_FILES = ("test/test_data/lee_background.cor", "test/test_data/lee.cor")
_SPLIT_VERSION = 1  # bump when the splitting/filtering logic below changes
_MAX_SPLIT_CHARS = 1_000_000  # spaCy's own default nlp.max_length
_NEWLINE_BYTES = re.compile(rb"\r\n|\r|\n")


# --------------------------------------------------------------------------- input


def _load(src: Source, name: str | None) -> tuple[bytes, str]:
    """Bytes of ``src`` and the name to report, refusing oversized input before reading it."""
    if isinstance(src, bytes | bytearray | memoryview):
        data = bytes(src)
        name = name or "<upload>"
        if len(data) > MAX_BYTES:
            raise CorpusError(f"{name}: input is {len(data):,} bytes, more than the limit of {MAX_BYTES:,} bytes")
        return data, name
    path = Path(src)
    name = name or path.name
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise CorpusError(f"{name}: file is {size:,} bytes, more than the limit of {MAX_BYTES:,} bytes")
        with path.open("rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError as e:
        raise CorpusError(f"{name}: cannot read file: {e.strerror or e}") from e
    if len(data) > MAX_BYTES:  # the file grew between stat and read
        raise CorpusError(f"{name}: file is more than the limit of {MAX_BYTES:,} bytes")
    return data, name


def _decode(data: bytes, name: str) -> str:
    """Strict UTF-8 (a BOM is allowed); a bad byte is reported with its line so the user can fix it.

    NUL is refused too: it is valid UTF-8 but no text has it, and every other byte
    of a UTF-16 file without a byte-order mark is one, which would otherwise read
    as sentences full of NULs.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    elif data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise CorpusError(f"{name}: line 1: file is UTF-16 (it starts with a UTF-16 byte-order mark), "
                          "not UTF-8; save it as UTF-8 and try again")
    nul = data.find(b"\x00")
    if nul >= 0:
        line = len(_NEWLINE_BYTES.findall(data, 0, nul)) + 1
        raise CorpusError(f"{name}: line {line}: file contains NUL bytes; it looks like UTF-16 without a "
                          "byte-order mark; save it as UTF-8 and try again")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = len(_NEWLINE_BYTES.findall(data, 0, e.start)) + 1
        raise CorpusError(
            f"{name}: line {line}: file is not UTF-8 (invalid byte 0x{data[e.start]:02x}); "
            "save it as UTF-8 and try again"
        ) from None
    if not text.strip():
        raise CorpusError(f"{name}: file is empty")
    return text


def _read(src: Source, name: str | None) -> tuple[str, str, str]:
    """Decoded text, reported name and a provenance prefix."""
    data, name = _load(src, name)
    where = "upload" if isinstance(src, bytes | bytearray | memoryview) else f"file {os.fspath(src)}"
    return _decode(data, name), name, where


class _Collector:
    """Accumulates sentences while enforcing the per-sentence and per-corpus limits."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sentences: list[Sentence] = []

    def add(self, sentence: Sentence, line: int) -> None:
        if len(sentence.text) > MAX_SENTENCE_CHARS:
            raise CorpusError(
                f"{self.name}: line {line}: sentence has {len(sentence.text):,} characters, "
                f"more than the limit of {MAX_SENTENCE_CHARS:,}"
            )
        if len(self.sentences) >= MAX_SENTENCES:
            raise CorpusError(
                f"{self.name}: line {line}: more than {MAX_SENTENCES:,} sentences; split the corpus into smaller files"
            )
        self.sentences.append(sentence)

    def done(self) -> list[Sentence]:
        if not self.sentences:
            raise CorpusError(f"{self.name}: contains no sentences")
        return self.sentences


# --------------------------------------------------------------------------- readers


def read_text(src: Source, name: str | None = None) -> Corpus:
    """Plain text, one sentence per line; blank lines are skipped, surrounding whitespace stripped.

    ``src`` is a path or the bytes of an upload; ``name`` (default: the file
    name) is used in error messages and as the corpus name.
    """
    text, name, where = _read(src, name)
    out = _Collector(name)
    for lineno, line in enumerate(_NEWLINE.split(text), start=1):
        line = line.strip()
        if line:
            out.add(Sentence(line), lineno)
    return Corpus(name, out.done(), f"{where}, plain text, one sentence per line")


def _guess_delimiter(header: str, name: str) -> str:
    """Decide CSV vs TSV (vs ``;``/``|``) from the extension, then from the header line.

    The header is used rather than :class:`csv.Sniffer`, which misfires on
    single-column files whose sentences contain commas.
    """
    suffix = Path(name).suffix.lower()
    preferred = {".tsv": "\t", ".tab": "\t", ".csv": ","}.get(suffix)
    if preferred is not None and preferred in header:
        return preferred
    counts = {d: header.count(d) for d in (",", "\t", ";", "|")}
    best = max(counts, key=lambda d: counts[d])
    if counts[best] > 0:
        return best
    return preferred or ","


def read_csv(src: Source, column: str = "text", name: str | None = None, *, delimiter: str | None = None) -> Corpus:
    """One sentence per row from ``column`` of a CSV or TSV file with a header row.

    The delimiter is ``delimiter`` when given, else decided from the file
    extension and the header. Column names match exactly, else ignoring case
    and surrounding spaces. Rows whose cell is empty are skipped.
    """
    text, name, where = _read(src, name)
    header_line = next((line for line in _NEWLINE.split(text) if line.strip()), "")
    delim = delimiter or _guess_delimiter(header_line, name)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim, strict=True)
    out = _Collector(name)
    index: int | None = None
    last_line = 0
    try:
        for row in reader:
            line, last_line = last_line + 1, reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            if index is None:
                index = _find_column([cell.strip() for cell in row], column, name, delim)
                continue
            if index >= len(row):
                raise CorpusError(f"{name}: line {line}: row has {len(row)} fields, no column {column!r}")
            cell = row[index].strip()
            if cell:
                out.add(Sentence(cell), line)
    except csv.Error as e:
        raise CorpusError(f"{name}: line {reader.line_num}: malformed {_delim_name(delim)} ({e})") from None
    return Corpus(name, out.done(), f"{where}, {_delim_name(delim)} column {column!r}")


def _delim_name(delim: str) -> str:
    return "TSV" if delim == "\t" else "CSV"


def _find_column(header: list[str], column: str, name: str, delim: str) -> int:
    # A repeated name is refused, exact or case-folded: picking one of the columns would be a silent guess.
    for names, wanted in ((header, column), ([h.casefold() for h in header], column.strip().casefold())):
        found = [i for i, h in enumerate(names) if h == wanted]
        if len(found) > 1:
            where = ", ".join(str(i + 1) for i in found)
            raise CorpusError(f"{name}: line 1: column {column!r} appears {len(found)} times in the "
                              f"{_delim_name(delim)} header (columns {where}); rename all but one")
        if found:
            return found[0]
    available = ", ".join(repr(h) for h in header)
    raise CorpusError(f"{name}: line 1: no column {column!r} in the {_delim_name(delim)} header; "
                      f"available columns: {available}")


def read_conllu(src: Source, name: str | None = None) -> Corpus:
    """CoNLL-U (or 10-column CoNLL-X): words, UPOS, heads and deprels of each sentence.

    Multiword-token ranges (``1-2``) give the surface form used for the text and
    spans; empty nodes (``1.1``) are skipped. The text is ``# text =`` when
    present, else the surface forms joined by spaces, honouring
    ``SpaceAfter=No``. A sentence whose HEAD (or UPOS, DEPREL) column is ``_``
    throughout is unannotated and gets ``None`` for it; a HEAD that is ``_`` in
    an otherwise parsed sentence is an error.
    """
    text, name, where = _read(src, name)
    out = _Collector(name)
    for sentence, line in parse_conllu(text, name):
        out.add(sentence, line)
    return Corpus(name, out.done(), f"{where}, CoNLL-U")


def read_parquet(src: Source, column: str = "text", name: str | None = None) -> Corpus:
    """One sentence per row from the string ``column`` of a Parquet file (exact name, else ignoring case).

    Read from bytes held in memory (the same size cap as every reader), so a damaged file is
    a :class:`CorpusError` naming it, never a crash in the Parquet library; null and empty
    cells are skipped, and a row is named by its 1-based number.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, name = _load(src, name)
    where = "upload" if isinstance(src, bytes | bytearray | memoryview) else f"file {os.fspath(src)}"
    try:
        table = pq.read_table(pa.BufferReader(bytes(data)))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CorpusError(f"{name}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    names = table.column_names
    found = [n for n in names if n == column] or [n for n in names if n.strip().casefold() == column.casefold()]
    if len(found) != 1:
        what = "appears more than once" if found else "is missing"
        raise CorpusError(f"{name}: column {column!r} {what} in the Parquet schema; columns: "
                          f"{', '.join(repr(n) for n in names)}")
    values = table.column(found[0])
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise CorpusError(f"{name}: column {found[0]!r} holds {values.type}, not text")
    try:
        cells = values.to_pylist()
    except (pa.ArrowException, UnicodeDecodeError, OSError, ValueError) as e:  # a damaged page or non-UTF-8
        raise CorpusError(f"{name}: column {found[0]!r} is not readable text ({str(e).splitlines()[0]})") from None
    out = _Collector(name)
    for row, cell in enumerate(cells, start=1):
        cell = (cell or "").strip()
        if "\x00" in cell:
            raise CorpusError(f"{name}: row {row}: text contains NUL characters")
        if cell:
            out.add(Sentence(cell), row)
    return Corpus(name, out.done(), f"{where}, Parquet column {found[0]!r}")


_READERS = {".txt": "text", ".text": "text", ".csv": "csv", ".tsv": "csv", ".tab": "csv",
            ".conllu": "conllu", ".conll": "conllu", ".parquet": "parquet"}


def read_corpus(src: Source, filename: str | None = None) -> Corpus:
    """Read ``src`` with the reader its extension calls for (.txt, .csv, .tsv, .conllu, .conll, .parquet).

    ``filename`` names an upload given as bytes and decides its format; for a
    path it defaults to the path's file name.
    """
    if filename is None:
        if isinstance(src, bytes | bytearray | memoryview):
            raise CorpusError("<upload>: a file name is needed to decide the format of uploaded bytes")
        filename = Path(src).name
    suffix = Path(filename).suffix.lower()
    kind = _READERS.get(suffix)
    if kind == "text":
        return read_text(src, name=filename)
    if kind == "csv":
        return read_csv(src, name=filename)
    if kind == "conllu":
        return read_conllu(src, name=filename)
    if kind == "parquet":
        return read_parquet(src, name=filename)
    supported = ", ".join(sorted(set(_READERS)))
    raise CorpusError(f"{filename}: unsupported file type {suffix or '(no extension)'!r}; supported: {supported}")


def corpus_stats(corpus: Corpus) -> dict[str, int | float]:
    """Sentence and word counts, for the dashboard's corpus summary.

    Words are the gold words for CoNLL-U sentences and whitespace-separated
    words otherwise. Keys: ``sentences``, ``words``, ``mean_words``, ``max_words``.
    """
    counts = [len(s.words) if s.words is not None else len(s.text.split()) for s in corpus.sentences]
    return {
        "sentences": len(counts),
        "words": int(sum(counts)),
        "mean_words": float(np.mean(counts)) if counts else 0.0,
        "max_words": max(counts, default=0),
    }


# --------------------------------------------------------------------------- sentence splitting

_NLP_LOCK = threading.Lock()


def _nlp() -> Any:
    """The spaCy pipeline for sentence boundaries (loaded once; importing spaCy alone takes seconds)."""
    return load_spacy(_SPACY_EXCLUDE)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _segment(docs: list[str]) -> list[list[str]]:
    """Sentences of each document, whitespace-normalised, empty ones dropped.

    spaCy pipelines are not documented as thread-safe, so the lock serialises
    the calls (and the first load) between the web UI's threads.
    """
    with _NLP_LOCK:
        nlp = _nlp()
        parsed = list(nlp.pipe(docs, batch_size=32))
    return [[s for s in (_normalise(sent.text) for sent in doc.sents) if s] for doc in parsed]


def split_sentences(text: str) -> list[str]:
    """Split pasted text into sentences with the same spaCy pipeline as the default corpus.

    Whitespace inside each sentence is normalised; no sentence is dropped for
    being short, since the user chose the text. Safe to call from several threads.
    """
    if len(text) > _MAX_SPLIT_CHARS:
        raise CorpusError(f"text has {len(text):,} characters, more than the limit of {_MAX_SPLIT_CHARS:,}")
    if not text.strip():
        return []
    return _segment([text])[0]


# --------------------------------------------------------------------------- default corpus


def cache_dir() -> Path:
    """Where derived data is cached: ``$SPARSEFINDER_CACHE``, else ``~/.cache/sparsefinder``."""
    env = os.environ.get("SPARSEFINDER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsefinder"


def _lee_paths() -> list[Path]:
    """The Lee corpus files inside the installed gensim package, found without importing gensim (slow)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the default corpus needs the 'gensim' package, which ships the Lee news corpus")
    for root in spec.submodule_search_locations:
        paths = [Path(root) / f for f in _LEE_FILES]
        if all(p.is_file() for p in paths):
            return paths
    raise CorpusError(f"gensim is installed but its Lee corpus files {', '.join(_LEE_FILES)} are missing")


def _decode_lee(data: bytes) -> str:
    # lee.cor is Latin-1 (a '£' sign), not UTF-8; this is our own data, so a fallback is fine here.
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _split_params() -> dict[str, Any]:
    return {
        "model": SPACY_MODEL,
        "model_version": _version(SPACY_MODEL),
        "spacy_version": _version("spacy"),
        "exclude": list(_SPACY_EXCLUDE),
        "min_words": MIN_WORDS,
        "split_version": _SPLIT_VERSION,
    }


def _cache_key(contents: Iterable[tuple[str, bytes]], params: dict[str, Any]) -> str:
    """Hash of the input files' names and bytes and the splitting parameters: any change invalidates the cache."""
    h = hashlib.sha256()
    for fname, data in contents:
        h.update(fname.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()


def _split_lee(contents: list[tuple[str, bytes]]) -> list[str]:
    """Documents (one a line) → sentences: normalised, fragments under MIN_WORDS words and repeats dropped."""
    docs = [_normalise(line) for _, data in contents for line in _NEWLINE.split(_decode_lee(data))]
    docs = [d for d in docs if d]
    seen: set[str] = set()
    sentences: list[str] = []
    for doc in _segment(docs):
        for s in doc:
            if len(s.split()) >= MIN_WORDS and s not in seen:
                seen.add(s)
                sentences.append(s)
    return sentences


def _read_cache(path: Path, key: str) -> list[str] | None:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("key") != key:
        return None
    sentences = payload.get("sentences")
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        return None
    return sentences


def _write_cache(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write (temp file in the same directory + rename): concurrent readers never see a partial file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:  # an unwritable cache only costs time, never correctness
        warnings.warn(f"could not write the corpus cache {path}: {e}", RuntimeWarning, stacklevel=3)


def _lee_cache() -> tuple[list[tuple[str, bytes]], dict[str, Any], str, Path]:
    contents = [(p.name, p.read_bytes()) for p in _lee_paths()]
    params = _split_params()
    key = _cache_key(contents, params)
    return contents, params, key, cache_dir() / f"{DEFAULT_CORPUS_NAME}-sentences-{key[:20]}.json"


def default_corpus_cache_path() -> Path:
    """The cache file of the default corpus's sentences for the installed data and spaCy model."""
    return _lee_cache()[3]


def _lee_sentences() -> list[str]:
    """All default-corpus sentences, from the cache when it matches the inputs, else split and cached."""
    contents, params, key, path = _lee_cache()
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    sentences = _split_lee(contents)
    _write_cache(path, {"key": key, "params": params, "files": [f for f, _ in contents], "sentences": sentences})
    return sentences


def default_corpus(split: str | None = None, seed: int = 0) -> Corpus:
    """The Lee news corpus as sentences, whole or as a fixed train/validation split.

    Validation is :data:`VALIDATION_SIZE` sentences drawn by a permutation from
    ``numpy.random.default_rng(seed)``, train is the rest; both keep corpus
    order. Projections are trained on one split and evaluated on the other
    (docs/method.md §3), so the split must be reproducible from the seed alone.
    """
    if split not in (None, "train", "validation"):
        raise ValueError(f"split must be 'train', 'validation' or None, not {split!r}")
    texts = _lee_sentences()
    if split is None:
        chosen = texts
    else:
        in_val = np.zeros(len(texts), dtype=bool)
        in_val[np.random.default_rng(seed).permutation(len(texts))[:VALIDATION_SIZE]] = True
        chosen = [t for t, v in zip(texts, in_val, strict=True) if v == (split == "validation")]
    files = " and ".join(_LEE_FILES)
    source = (
        f"Lee news corpus (Lee, Pincombe & Welsh 2005), {files} from gensim {_version('gensim')} "
        f"(distributed with gensim under the LGPL); split into sentences with spaCy {SPACY_MODEL} "
        f"{_version(SPACY_MODEL)}, fragments under {MIN_WORDS} words and duplicates dropped"
    )
    if split is not None:
        source += f"; {split} split: {VALIDATION_SIZE} validation sentences by seeded permutation (seed {seed})"
    name = DEFAULT_CORPUS_NAME if split is None else f"{DEFAULT_CORPUS_NAME}/{split}"
    return Corpus(name, [Sentence(t) for t in chosen], source)
