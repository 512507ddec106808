"""The CoNLL-U parser: gold words, UPOS tags and dependency trees of each sentence block (docs/method.md §6-7).

:func:`sparsefinder.corpora.readers.read_conllu` reads a file (or an upload) with
it, under the readers' size limits; the POS-per-cluster view and the syntax mask
use the gold words it keeps. The parser is strict, like every reader: a malformed
line is a :class:`~sparsefinder.corpora.corpus.CorpusError` naming the file and the line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sparsefinder.corpora.corpus import NEWLINE, CorpusError, Sentence

_ID_WORD = re.compile(r"[1-9][0-9]*")
_ID_RANGE = re.compile(r"([1-9][0-9]*)-([1-9][0-9]*)")
_ID_EMPTY = re.compile(r"(0|[1-9][0-9]*)\.[1-9][0-9]*")


@dataclass
class _Word:
    form: str
    upos: str
    head: str
    deprel: str
    misc: str
    line: int


def parse_conllu(text: str, name: str) -> Iterator[tuple[Sentence, int]]:
    """The sentences of CoNLL-U ``text``, each with the line its block starts on (errors name ``name``).

    How the columns become a :class:`~sparsefinder.corpora.corpus.Sentence` is
    described at :func:`sparsefinder.corpora.readers.read_conllu`.
    """
    words: list[_Word] = []
    tokens: list[tuple[str, list[int], bool]] = []  # surface form, word indices, space after
    mwt_end = 0  # last word ID covered by the current multiword token
    sent_text: str | None = None
    start = 0

    def err(line: int, msg: str) -> CorpusError:
        return CorpusError(f"{name}: line {line}: {msg}")

    def flush() -> tuple[Sentence, int] | None:
        nonlocal words, tokens, sent_text, mwt_end, start
        done = None
        if words:
            if mwt_end > len(words):
                raise err(start, f"multiword token ends at word {mwt_end} but the sentence has {len(words)} words")
            done = (_conllu_sentence(words, tokens, sent_text, start, err), start)
        words, tokens, sent_text, mwt_end, start = [], [], None, 0, 0
        return done

    for lineno, raw in enumerate(NEWLINE.split(text), start=1):
        if not raw.strip():
            if (done := flush()) is not None:
                yield done
            continue
        if start == 0:  # first line of a sentence block, reported for sentence-level errors
            start = lineno
        if raw.startswith("#"):
            m = re.match(r"#\s*text\s*=\s?(.*)$", raw)
            if m and not words:
                sent_text = m.group(1).strip()
            continue
        cols = raw.split("\t")
        if len(cols) != 10:
            raise err(lineno, f"expected 10 tab-separated columns, found {len(cols)}")
        wid, form, _lemma, upos, _xpos, _feats, head, deprel, _deps, misc = cols
        if _ID_EMPTY.fullmatch(wid):
            continue
        space_after = "SpaceAfter=No" not in misc.split("|")
        m = _ID_RANGE.fullmatch(wid)
        if m:
            first, last = int(m.group(1)), int(m.group(2))
            if first != len(words) + 1:
                raise err(lineno, f"multiword token range {wid} does not start at the next word {len(words) + 1}")
            if last <= first:
                raise err(lineno, f"multiword token range {wid} must span at least two words")
            tokens.append((form, list(range(first - 1, last)), space_after))
            mwt_end = last
            continue
        if not _ID_WORD.fullmatch(wid):
            raise err(lineno, f"ID {wid!r} is not an integer, a range (1-2) or an empty node (1.1)")
        if int(wid) != len(words) + 1:
            raise err(lineno, f"word ID {wid} out of sequence (expected {len(words) + 1})")
        words.append(_Word(form, upos, head, deprel, misc, lineno))
        if len(words) > mwt_end:  # not inside a multiword token
            tokens.append((form, [len(words) - 1], space_after))
    if (done := flush()) is not None:
        yield done


def _column(words: list[_Word], attr: str) -> tuple[str, ...] | None:
    values = tuple(getattr(w, attr) for w in words)
    return None if all(v == "_" for v in values) else values


def _conllu_sentence(words: list[_Word], tokens: list[tuple[str, list[int], bool]], sent_text: str | None,
                     start: int, err: Callable[[int, str], CorpusError]) -> Sentence:
    n = len(words)
    heads: tuple[int, ...] | None = None
    if not all(w.head == "_" for w in words):  # all '_' = unparsed; otherwise every HEAD must be valid
        parsed = []
        for w in words:
            if not re.fullmatch(r"0|[1-9][0-9]*", w.head):
                raise err(w.line, f"HEAD {w.head!r} is not an integer")
            h = int(w.head)
            if h > n:
                raise err(w.line, f"HEAD {h} is out of range (the sentence has {n} words)")
            parsed.append(h)
        heads = tuple(parsed)
        _check_tree(words, heads, start, err)

    if sent_text is None:
        parts = []
        for k, (form, _idx, space_after) in enumerate(tokens):
            parts.append(form)
            if space_after and k < len(tokens) - 1:
                parts.append(" ")
        sent_text = "".join(parts)
    return Sentence(
        text=sent_text,
        words=tuple(w.form for w in words),
        upos=_column(words, "upos"),
        heads=heads,
        deprels=_column(words, "deprel"),
        char_spans=_align(sent_text, tokens, n),
    )


def _check_tree(words: list[_Word], heads: tuple[int, ...], start: int,
                err: Callable[[int, str], CorpusError]) -> None:
    """The HEADs must form one tree: exactly one root (HEAD 0), every word reaching it (no cycle).

    The syntax masks and tree distances read the heads as a tree; a cycle or a
    forest would give them paths that do not exist.
    """
    roots = [i for i, h in enumerate(heads) if h == 0]
    if not roots:
        raise err(start, "the sentence has no root (no word with HEAD 0); CoNLL-U needs exactly one")
    if len(roots) > 1:
        ids = ", ".join(str(i + 1) for i in roots)
        raise err(words[roots[1]].line, f"the sentence has {len(roots)} roots (words {ids} have HEAD 0); "
                                        "CoNLL-U needs exactly one")
    reaches_root = [False] * len(heads)
    reaches_root[roots[0]] = True
    for i in range(len(heads)):
        path, on_path, j = [], set(), i
        while not reaches_root[j] and j not in on_path:
            path.append(j)
            on_path.add(j)
            j = heads[j] - 1
        if not reaches_root[j]:  # came back to a word on this path
            loop = path[path.index(j):]
            chain = " -> ".join(str(k + 1) for k in [*loop, j])
            raise err(words[j].line, f"HEADs form a cycle ({chain}), not a tree")
        for k in path:
            reaches_root[k] = True


def _align(text: str, tokens: list[tuple[str, list[int], bool]], n: int) -> tuple[tuple[int, int], ...] | None:
    """Spans of the words in ``text``: each surface token must follow the previous one, whitespace between.

    Returns ``None`` rather than a guess when the text does not spell the tokens
    in order, since a wrong span would attach tags to the wrong subwords.
    """
    spans: list[tuple[int, int]] = [(0, 0)] * n
    pos = 0
    for form, idx, _space in tokens:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if not form or not text.startswith(form, pos):
            return None
        for k in idx:
            spans[k] = (pos, pos + len(form))
        pos += len(form)
    return tuple(spans)
