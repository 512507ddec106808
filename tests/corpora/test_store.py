"""Corpus extraction to disk and the lazy store that reads it back (corpora.extract, corpora.store)."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from sparsefinder.corpora.extract import extract_corpus
from sparsefinder.corpora.store import ExtractionStore, LayerBatch, StoredBatch, StoreError, StoreMismatchError
from sparsefinder.graphs import AttentionGraph
from sparsefinder.model.entmax_model import EntmaxModel, TruncationWarning, load_model

TEXTS = [
    "The cat sat on the mat.",
    "Sparse attention lets a transformer skip most pairs of tokens, which saves a great deal of compute.",
    "Hi!",
    "Entmax gives exact zeros.",
    "Ünïcödé café, naïve façade — and an em dash.",
    "one two three four five six seven",
    "A short one.",
    "Researchers predicted the sparsity pattern of attention heads with learned low-dimensional projections.",
    "Why?",
    "Numbers like 3.14159 and 2,718 are tokenised into pieces.",
    # Longer than the tiny models' 64 positions: must be truncated and flagged.
    " ".join(["word"] * 90),
    "The end.",
]


def _extract(model: EntmaxModel, out: Path, **kw) -> ExtractionStore:
    with pytest.warns(TruncationWarning):  # the one over-long text, reported once
        extract_corpus(model, TEXTS, out, progress=False, **kw)
    return ExtractionStore.open(out)


@pytest.fixture(scope="module")
def bert_store(bert, tmp_path_factory) -> ExtractionStore:
    return _extract(bert, tmp_path_factory.mktemp("stores") / "bert", batch_size=3, shard_size=5)


def _provenance(path: Path) -> dict[int, list[tuple[int, int]]]:
    """Batch id -> [(row, sentence)], read with plain safetensors (no sparsefinder code)."""
    manifest = json.loads((path / "manifest.json").read_text())
    batches: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for entry in manifest["shards"]:
        arrays = load_file(str(path / entry["file"]))
        for s, (b, r) in enumerate(zip(arrays["batch"], arrays["batch_row"], strict=True)):
            batches[int(b)].append((int(r), entry["first_sentence"] + s))
    return {b: sorted(members) for b, members in batches.items()}


def _assert_matches_model(model: EntmaxModel, store: ExtractionStore) -> None:
    """Every stored sentence equals ``model.extract`` re-run on the batch that produced it, bit for bit."""
    seen = set()
    for members in _provenance(store.path).values():
        assert [r for r, _ in members] == list(range(len(members)))
        with pytest.warns(TruncationWarning) if any(i == 10 for _, i in members) else contextlib.nullcontext():
            ref = model.extract([TEXTS[i] for _, i in members])
        for row, i in members:
            seen.add(i)
            sent = store.sentence(i)
            n = int(ref.lengths[row])
            assert sent.index == i and sent.text == TEXTS[i]
            assert sent.length == n and sent.tokens == ref.tokens[row]
            assert sent.offsets == ref.offsets[row]
            assert sent.word_ids == ref.word_ids[row]
            assert sent.special == ref.special[row]
            assert sent.truncated == (i == 10)
            assert sent.input_ids == model.tokenizer.convert_tokens_to_ids(ref.tokens[row])
            for layer in range(model.num_layers):
                assert torch.equal(sent.queries(layer), ref.queries[layer][row, :, :n])
                assert torch.equal(sent.keys(layer), ref.keys[layer][row, :, :n])
                assert torch.equal(sent.gold(layer), ref.gold(layer).sentence(row))
    assert seen == set(range(len(TEXTS)))


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    ("family", "batch_size", "shard_size"),
    [("bert", 3, 5), ("bert", 64, 4), ("gpt2", 4, 7)],
)
def test_round_trip_is_exact(family, batch_size, shard_size, tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir(family)), device="cpu")
    store = _extract(model, tmp_path / "s", batch_size=batch_size, shard_size=shard_size)
    m = store.manifest
    assert len(store) == len(TEXTS) and m["complete"]
    assert len(m["shards"]) == -(-len(TEXTS) // shard_size)
    assert m["num_tokens"] == int(store.lengths().sum()) == sum(store.sentence(i).length for i in range(len(store)))
    assert (m["num_layers"], m["num_heads"], m["head_dim"]) == (2, 4, 8)
    assert m["causal"] == (family == "gpt2") and m["dtype"] == "float32" and m["truncated"] == 1
    _assert_matches_model(model, store)


def test_batch_size_one_equals_single_text_extraction(bert, tmp_path):
    store = _extract(bert, tmp_path / "s", batch_size=1, shard_size=4)
    for i, text in enumerate(TEXTS):
        with pytest.warns(TruncationWarning) if i == 10 else contextlib.nullcontext():
            ref = bert.extract([text])
        sent = store[i]
        for layer in range(bert.num_layers):
            assert torch.equal(sent.queries(layer), ref.queries[layer][0])
            assert torch.equal(sent.keys(layer), ref.keys[layer][0])
            assert torch.equal(sent.gold(layer), ref.gold(layer).sentence(0))


def test_corpus_order_against_one_batch(bert, bert_store):
    # Independent of the recorded provenance: one padded batch of all texts agrees up to rounding.
    with pytest.warns(TruncationWarning):
        ref = bert.extract(TEXTS)
    assert bert_store.texts() == TEXTS
    for i in range(len(TEXTS)):
        n = int(ref.lengths[i])
        sent = bert_store.sentence(i)
        assert sent.tokens == ref.tokens[i]
        torch.testing.assert_close(sent.queries(1), ref.queries[1][i, :, :n], rtol=0, atol=1e-4)


def test_float16_halves_qk_and_keeps_gold_exact(bert, bert_store, tmp_path):
    store = _extract(bert, tmp_path / "h", batch_size=3, shard_size=5, dtype=torch.float16)
    assert store.manifest["dtype"] == "float16"
    for i in range(len(TEXTS)):
        a, b = store.sentence(i), bert_store.sentence(i)
        for layer in range(bert.num_layers):
            assert a.queries(layer).dtype == torch.float32
            assert torch.equal(a.queries(layer), b.queries(layer).half().float())
            assert torch.equal(a.gold(layer), b.gold(layer))
    size = sum(e["bytes"] for e in store.manifest["shards"])
    size32 = sum(e["bytes"] for e in bert_store.manifest["shards"])
    assert size < 0.6 * size32


def test_files_are_plain_safetensors_and_json(bert_store):
    # The documented decoding recipe, with numpy only.
    entry = bert_store.manifest["shards"][1]
    arrays = load_file(str(bert_store.path / entry["file"]))
    strings = json.loads((bert_store.path / entry["strings_file"]).read_text())
    H = bert_store.num_heads
    for s in range(entry["num_sentences"]):
        a, b = arrays["token_offsets"][s], arrays["token_offsets"][s + 1]
        n = b - a
        q = arrays["queries"][1, a:b].transpose(1, 0, 2)
        bits = arrays["gold_bits"][1, arrays["gold_offsets"][s] : arrays["gold_offsets"][s + 1]]
        gold = np.unpackbits(bits, count=H * n * n).reshape(H, n, n).astype(bool)
        sent = bert_store.sentence(entry["first_sentence"] + s)
        assert np.array_equal(q, sent.queries(1).numpy())
        assert np.array_equal(gold, sent.gold(1).numpy())
        assert strings["tokens"][s] == sent.tokens and strings["texts"][s] == sent.text


# --------------------------------------------------------------------------- streaming


def test_iter_batches_one_layer(bert_store):
    lengths = bert_store.lengths()
    order = []
    for batch in bert_store.iter_batches(layer=1, batch_size=4):
        assert isinstance(batch, LayerBatch) and batch.layer == 1
        B = len(batch.indices)
        N = int(lengths[batch.indices.numpy()].max())
        assert batch.queries.shape == batch.keys.shape == (B, 4, N, 8)
        assert batch.gold.edges.shape == (B, 4, N, N)
        assert torch.equal(batch.lengths, torch.from_numpy(lengths[batch.indices.numpy()]))
        expected = AttentionGraph.from_sentences([bert_store[int(i)].gold(1) for i in batch.indices])
        assert torch.equal(batch.gold.edges, expected.edges)
        for b, i in enumerate(batch.indices.tolist()):
            n = int(lengths[i])
            assert torch.equal(batch.queries[b, :, :n], bert_store[i].queries(1))
            assert torch.equal(batch.keys[b, :, :n], bert_store[i].keys(1))
            assert not batch.queries[b, :, n:].any() and not batch.keys[b, :, n:].any()
            assert not batch.gold.edges[b, :, n:].any() and not batch.gold.edges[b, :, :, n:].any()
        assert batch.tokens == [bert_store[i].tokens for i in batch.indices.tolist()]
        order += batch.indices.tolist()
    assert order == list(range(len(TEXTS)))  # corpus order, across shard boundaries (shards of 5, batches of 4)


def test_iter_batches_gold_equals_extraction_gold(bert, bert_store):
    # A batch formed exactly like a recorded forward pass reproduces that pass's Extraction.gold.
    members = _provenance(bert_store.path)[0]
    idx = [i for _, i in members]
    ref = bert.extract([TEXTS[i] for i in idx])
    (batch,) = bert_store.iter_batches(layer=0, batch_size=len(idx), indices=idx)
    for layer in range(bert.num_layers):
        (full,) = bert_store.iter_batches(layer=layer, batch_size=len(idx), indices=idx)
        assert torch.equal(full.gold.edges, ref.gold(layer).edges)
        real = ref.padding_mask()[:, None, :, None]  # the model's padding positions have q/k too; the store zeros them
        assert torch.equal(full.queries, ref.queries[layer] * real) and torch.equal(full.keys, ref.keys[layer] * real)
    assert torch.equal(batch.lengths, ref.lengths)


def test_iter_batches_all_layers_and_orders(bert_store):
    per_layer = list(bert_store.iter_batches(layer=0, batch_size=5))
    all_layers = list(bert_store.iter_batches(batch_size=5))
    assert len(per_layer) == len(all_layers) == 3
    for one, full in zip(per_layer, all_layers, strict=True):
        assert isinstance(full, StoredBatch) and full.num_layers == 2 and full.num_heads == 4
        assert torch.equal(full.queries[0], one.queries) and torch.equal(full.gold(0).edges, one.gold.edges)
        assert torch.equal(full.layer(0).keys, one.keys)
        second = next(b for b in bert_store.iter_batches(layer=-1, batch_size=5, indices=one.indices.tolist()))
        assert torch.equal(full.queries[1], second.queries) and torch.equal(full.gold(1).edges, second.gold.edges)

    shuffled = [i for b in bert_store.iter_batches(0, 3, order="shuffle", seed=1) for i in b.indices.tolist()]
    again = [i for b in bert_store.iter_batches(0, 3, order="shuffle", seed=1) for i in b.indices.tolist()]
    assert sorted(shuffled) == list(range(len(TEXTS))) and shuffled == again and shuffled != sorted(shuffled)

    by_length = [i for b in bert_store.iter_batches(0, 4, order="length") for i in b.indices.tolist()]
    lengths = bert_store.lengths()
    for first in (0, 5, 10):  # shard-local: each shard's sentences longest first
        chunk = [i for i in by_length if first <= i < first + 5]
        assert chunk == sorted(chunk, key=lambda i: -lengths[i])
    moved = next(bert_store.iter_batches(0, 5, device="cpu"))
    assert torch.equal(moved.queries, per_layer[0].queries) and torch.equal(moved.gold.edges, per_layer[0].gold.edges)
    moved_all = next(bert_store.iter_batches(None, 5, device="cpu"))
    assert torch.equal(moved_all.gold(1).edges, all_layers[0].gold(1).edges)
    subset = [b.indices.tolist() for b in bert_store.iter_batches(0, 2, indices=[7, 2, 11])]
    assert subset == [[7, 2], [11]]
    with pytest.raises(IndexError):
        next(bert_store.iter_batches(0, 2, indices=[len(TEXTS)]))
    with pytest.raises(IndexError):
        bert_store.iter_batches(layer=2)


def test_causal_store(gpt2, tmp_path):
    store = _extract(gpt2, tmp_path / "g", batch_size=5, shard_size=6)
    assert store.causal and store.manifest["causal"]
    for batch in store.iter_batches(layer=0, batch_size=6):
        assert batch.causal and batch.gold.causal
        assert not torch.triu(batch.gold.edges, diagonal=1).any()
        assert batch.gold.num_edges().min() > 0
    assert store[3].gold_graph(1).causal


# --------------------------------------------------------------------------- validation


@pytest.fixture
def store_copy(bert_store, tmp_path) -> Path:
    return Path(shutil.copytree(bert_store.path, tmp_path / "copy"))


def _edit_manifest(path: Path, **changes) -> None:
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


def test_corrupt_or_missing_manifest(store_copy, tmp_path):
    with pytest.raises(StoreError, match="no such directory"):
        ExtractionStore.open(tmp_path / "nowhere")
    (store_copy / "manifest.json").write_text('{"format": "sparsefinder-extr')
    with pytest.raises(StoreError, match="manifest .* is corrupt: not valid JSON"):
        ExtractionStore.open(store_copy)
    (store_copy / "manifest.json").unlink()
    with pytest.raises(StoreError, match="manifest.json is missing"):
        ExtractionStore.open(store_copy)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format_version": 99}, "format version 99, but this sparsefinder reads version 1"),
        ({"format": "something-else"}, "is not a sparsefinder extraction"),
        ({"complete": False}, "incomplete"),
        ({"num_layers": "two"}, "missing or mistyped fields num_layers"),
        ({"num_sentences": 3}, "do not add up"),
    ],
)
def test_bad_manifest_fields(store_copy, changes, message):
    _edit_manifest(store_copy, **changes)
    with pytest.raises(StoreError, match=message):
        ExtractionStore.open(store_copy)


def test_manifest_cannot_point_outside_the_store(store_copy):
    m = json.loads((store_copy / "manifest.json").read_text())
    m["shards"][0]["file"] = "../../etc/passwd"
    (store_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="bad shard file name"):
        ExtractionStore.open(store_copy)


def test_truncated_shard(store_copy):
    shard = store_copy / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(StoreError, match=r"shard-00001.safetensors is truncated or altered: \d+ bytes on disk"):
        ExtractionStore.open(store_copy)


def test_missing_shard(store_copy):
    (store_copy / "shard-00002.safetensors").unlink()
    with pytest.raises(StoreError, match="shard-00002.safetensors listed in the manifest is missing"):
        ExtractionStore.open(store_copy)


def test_missing_strings_file(store_copy):
    (store_copy / "shard-00000.json").unlink()
    with pytest.raises(StoreError, match="shard-00000.json listed in the manifest is missing"):
        ExtractionStore.open(store_copy)


def test_corrupt_shard_contents(store_copy, bert_store):
    shard = store_copy / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[0:8] = (2**40).to_bytes(8, "little")  # same size, garbage header length
    shard.write_bytes(bytes(data))
    store = ExtractionStore.open(store_copy)  # sizes match, so only a read or verify() can tell
    with pytest.raises(StoreError, match="shard-00000.safetensors is corrupt"):
        store.sentence(0).queries(0)
    store.sentence(7)  # other shards are unaffected
    with pytest.raises(StoreError, match="SHA-256 differs"):
        ExtractionStore.open(store_copy, verify=True)

    shutil.copy(bert_store.path / shard.name, shard)
    other = store_copy / "shard-00001.safetensors"
    data = bytearray(other.read_bytes())
    data[-5:] = b"\xff" * 5  # flipped gold bits: the header is fine, the checksum is not
    other.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00001.safetensors is corrupt"):
        ExtractionStore.open(store_copy).verify()


def test_check_model(bert_store, bert, gpt2, tiny_model_dir):
    bert_store.check_model(bert)
    with pytest.raises(StoreMismatchError, match="causal"):
        bert_store.check_model(gpt2)
    other = load_model(str(tiny_model_dir("bert")), device="cpu")
    other.set_alpha(2.0)
    with pytest.raises(StoreMismatchError, match=r"alpha: model 2\.0, store 1\.5"):
        bert_store.check_model(other)
    other.set_alpha(1.5)
    bert_store.check_model(other)  # same weights, same alpha
    with torch.no_grad():
        next(other.model.parameters()).add_(1e-3)
    with pytest.raises(StoreMismatchError, match="weights: fingerprint"):
        bert_store.check_model(other)


def test_extract_refuses_non_empty_dir_and_takes_a_corpus(bert, tmp_path):
    from sparsefinder.corpora.readers import Corpus, Sentence

    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    corpus = Corpus("tiny", [Sentence(t) for t in TEXTS[:3]], "test")
    with pytest.raises(FileExistsError, match="not empty"):
        extract_corpus(bert, corpus, out, progress=False)
    extract_corpus(bert, corpus, out, progress=False, overwrite=True, split="validation", metadata={"seed": 0})
    extract_corpus(bert, corpus, out, progress=False, overwrite=True, split="validation", metadata={"seed": 0})
    store = ExtractionStore.open(out, verify=True)
    assert (out / "notes.txt").read_text() == "keep me"
    m = store.manifest
    assert (m["corpus"], m["split"], m["metadata"], len(store)) == ("tiny", "validation", {"seed": 0}, 3)
    with pytest.raises(ValueError, match="no texts"):
        extract_corpus(bert, iter(()), tmp_path / "empty", progress=False)
    assert not (tmp_path / "empty").exists()
    with pytest.raises(ValueError, match="float32 or float16"):
        extract_corpus(bert, TEXTS[:2], tmp_path / "x", dtype=torch.int8, progress=False)
