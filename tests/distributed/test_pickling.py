"""What Ray sends to its workers: a store (inside a sweep's context) pickles as its location and reads the same."""

from __future__ import annotations

import pickle

import torch

from sparsefinder.corpora.extract import extract_corpus
from sparsefinder.corpora.store import ExtractionStore


def test_store_pickles_without_its_maps_and_reads_the_same(bert, tmp_path):
    texts = ["The cat sat on the mat.", "Rain.", "Officials said the bridge would reopen next week."]
    store = ExtractionStore.open(extract_corpus(bert, texts, tmp_path / "s", shard_size=2, progress=False))
    before = store.sentence(2).queries(1)  # opens the maps and fills the caches
    blob = pickle.dumps(store)
    assert len(blob) < 20_000  # the location and manifest, not the q/k of the maps
    copy = pickle.loads(blob)
    assert copy.texts() == texts and torch.equal(copy.sentence(2).queries(1), before)
    assert torch.equal(copy.sentence(0).gold(0), store.sentence(0).gold(0))
    copy.sentence(1)  # the lock and caches work again after unpickling


def test_syntax_context_pickles_with_its_lock_renewed(bert, tmp_path):
    from sparsefinder.corpora.annotate import SyntaxContext

    store = ExtractionStore.open(extract_corpus(bert, ["A dog ran."], tmp_path / "s", progress=False))
    ctx = pickle.loads(pickle.dumps(SyntaxContext(store)))
    assert ctx.store.texts() == ["A dog ran."] and ctx._lock is not None
