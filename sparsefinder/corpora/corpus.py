"""What a corpus is: sentences (with CoNLL-U's gold words where the file gives them) and their provenance.

The readers of :mod:`sparsefinder.corpora.readers` (and the CoNLL-U parser of
:mod:`sparsefinder.corpora.conllu`) build these; everything downstream (extraction,
annotations, the dashboard) reads them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

NEWLINE = re.compile(r"\r\n|\r|\n")
"""Line breaks of any platform: every reader splits its text with this."""

Source = str | os.PathLike[str] | bytes | bytearray | memoryview
"""A file path, or the raw bytes of an upload."""


class CorpusError(ValueError):
    """Input that cannot be read as a corpus; the message names the file and line."""


@dataclass(frozen=True)
class Sentence:
    """One sentence; the word-level fields are set only for CoNLL-U input.

    ``char_spans[k]`` is the ``(start, end)`` of word ``k`` in ``text``. Words of
    a multiword token (``du`` = ``de`` + ``le``) all get the span of the token,
    since only the token appears in the text. ``char_spans`` is ``None`` when
    the words cannot be found in order in ``text``.
    """

    text: str
    words: tuple[str, ...] | None = None
    upos: tuple[str, ...] | None = None
    heads: tuple[int, ...] | None = None
    deprels: tuple[str, ...] | None = None
    char_spans: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        # Per-word fields indexed by word position must agree, or alignments downstream go wrong silently.
        if self.words is None:
            return
        n = len(self.words)
        for field in ("upos", "heads", "deprels", "char_spans"):
            value = getattr(self, field)
            if value is not None and len(value) != n:
                raise ValueError(f"Sentence.{field} has {len(value)} entries for {n} words")


@dataclass
class Corpus:
    """A named list of sentences with a human-readable provenance string."""

    name: str
    sentences: list[Sentence]
    source: str

    def texts(self) -> list[str]:
        """The sentence texts, in order (what a model is run on)."""
        return [s.text for s in self.sentences]

    def __len__(self) -> int:
        return len(self.sentences)
