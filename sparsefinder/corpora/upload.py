"""An uploaded corpus file, read under the size cap: the Corpus page's and a server's entry point.

Errors are returned, not raised: a visitor's bad file is a message on the page,
never a stack trace, and the server keeps running.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparsefinder.corpora.readers import (
    MAX_BYTES,
    MAX_UPLOAD_MIB,
    Corpus,
    CorpusError,
    corpus_stats,
    read_corpus,
    read_csv,
    read_parquet,
)


@dataclass(frozen=True)
class ParsedUpload:
    """An uploaded corpus and its statistics (:func:`~sparsefinder.corpora.readers.corpus_stats`),
    or why it could not be read."""

    corpus: Corpus | None
    stats: dict | None
    error: str | None = None


def read_upload(data: bytes, filename: str, column: str = "text") -> ParsedUpload:
    """Read an uploaded file (txt, csv, tsv, conllu, parquet) of at most ``MAX_BYTES``; ``column`` names a table's text.

    An error names the file once, at its start (``"name: line 3: ..."``), so a page can show it as it is.
    """
    if len(data) > MAX_BYTES:
        return ParsedUpload(None, None, f"{filename}: {len(data):,} bytes, more than the limit of "
                                        f"{MAX_BYTES:,} bytes ({MAX_UPLOAD_MIB} MiB)")
    try:
        suffix = Path(filename).suffix.lower()
        if suffix in (".csv", ".tsv", ".tab"):
            corpus = read_csv(data, column=column or "text", name=filename)
        elif suffix == ".parquet":
            corpus = read_parquet(data, column=column or "text", name=filename)
        else:
            corpus = read_corpus(data, filename)
    except CorpusError as e:
        message = str(e)
        return ParsedUpload(None, None, message if message.startswith(f"{filename}: ") else f"{filename}: {message}")
    if not len(corpus):
        return ParsedUpload(None, None, f"{filename}: no sentences found")
    return ParsedUpload(corpus, corpus_stats(corpus))
