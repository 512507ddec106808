"""What Ray sends to its workers: a store (inside a sweep's context) travels as its location and reads the same.

Round trips go through Ray's own object store (``ray.put``/``ray.get``), the transport the engines use;
nothing here unpickles bytes of its own.
"""

from __future__ import annotations

import pytest
import torch

from sparsefinder.corpora.extract import extract_corpus
from sparsefinder.corpora.store import ExtractionStore

pytestmark = pytest.mark.ray


def test_store_travels_without_its_maps_and_reads_the_same(ray_session, bert, tmp_path):
    texts = ["The cat sat on the mat.", "Rain.", "Officials said the bridge would reopen next week."]
    store = ExtractionStore.open(extract_corpus(bert, texts, tmp_path / "s", shard_size=2, progress=False))
    before = store.sentence(2).queries(1)  # opens the maps and fills the caches
    # The location and manifest travel, not the q/k of the maps.
    assert all(shard.__getstate__()["_arrays"] is None for shard in store.__getstate__()["_shards"])
    copy = ray_session.get(ray_session.put(store))
    assert copy.texts() == texts and torch.equal(copy.sentence(2).queries(1), before)
    assert torch.equal(copy.sentence(0).gold(0), store.sentence(0).gold(0))
    copy.sentence(1)  # the lock and caches work again on arrival


def test_syntax_context_travels_with_its_lock_renewed(ray_session, bert, tmp_path):
    from sparsefinder.corpora.annotate import SyntaxContext

    store = ExtractionStore.open(extract_corpus(bert, ["A dog ran."], tmp_path / "s", progress=False))
    ctx = ray_session.get(ray_session.put(SyntaxContext(store)))
    assert ctx.store.texts() == ["A dog ran."] and ctx._lock is not None
