r"""Word annotations (POS, dependency trees) aligned to subword tokens, and sweep context from them.

The word-level pieces (:class:`WordAnnotation`, :func:`annotate`,
:func:`conllu_annotations`, :func:`align_tokens` and the tags :data:`SPECIAL`,
:data:`UNALIGNED`, :data:`MISSING`) live in :mod:`sparsefinder.corpora.words` and
are importable from here; this module adds the tokens' tags and the context providers.

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

from sparsefinder.corpora.context import ContextProvider, EmbeddingContext
from sparsefinder.corpora.readers import Corpus
from sparsefinder.corpora.words import (  # noqa: F401 - the word-level names stay importable from here
    MISSING,
    SPECIAL,
    UNALIGNED,
    WordAnnotation,
    align_tokens,
    annotate,
    conllu_annotations,
)

if TYPE_CHECKING:  # heavy imports (torch models) only for type checking
    from sparsefinder.corpora.store import ExtractionStore, LayerBatch, StoredSentence
    from sparsefinder.model.entmax_model import EntmaxModel, Extraction


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

    def __getstate__(self) -> dict[str, Any]:
        # Sent to other processes (Ray sweep tasks) with its parses, without the lock.
        return {**self.__dict__, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

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
