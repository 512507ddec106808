"""Corpus-scale extraction: run a model over many sentences and write q, k and gold graphs to disk.

:func:`extract_corpus` runs :meth:`EntmaxModel.extract` batch by batch and
writes a store directory that :class:`sparsefinder.corpora.store.ExtractionStore`
reads lazily. The byte-level format (``manifest.json`` plus safetensors and
JSON shards; layer-major ``queries``/``keys`` of shape ``(L, T, H, d)``, gold
supports as per-layer ``numpy.packbits`` of each sentence's ``(H, n, n)``
boolean matrix, index arrays that make every sentence a slice) is specified
in full in the docstring of :mod:`sparsefinder.corpora.shards`, so that the files can
be read without this package.

How it runs, and why:

- The corpus is cut into shards of ``shard_size`` consecutive sentences. A
  shard's file is allocated on disk first (its size follows from the token
  counts) and filled in place through a memory map batch by batch, so q/k of
  a shard, let alone of the corpus, are never held in memory; a finished shard is renamed
  into place and entered in the manifest, which marks the store complete only
  at the end. (Besides one batch's tensors, only the shard's texts, token
  strings and token ids are in memory.)
- Within a shard, sentences run longest first in batches of ``batch_size`` to
  limit padding, but are written back in corpus order. Padding changes the
  floating-point rounding of a forward pass (a sentence's q/k differ in the
  last bits between batch compositions), so each sentence records which batch
  and row computed it: ``model.extract`` on that batch reproduces it exactly.
- q/k are stored as float32 by default: that is what the attention function
  computes in here, so the stored values are exactly the captured ones and the
  sweep sees the same numbers the gold graph came from. ``dtype=float16``
  halves the store (q/k are nearly all of it); the gold graph is stored
  separately as bits and is exact either way.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsefinder import __version__
from sparsefinder.artifacts import (
    adapter_summary,
    allocate_safetensors,
    alpha_to_json,
    file_sha256,
    weights_fingerprint,
    write_json_atomic,
)
from sparsefinder.corpora.shards import FORMAT, FORMAT_VERSION, MANIFEST_FILE, SHARD_PATTERN, STORE_DTYPES
from sparsefinder.model.entmax_model import EntmaxModel, TruncationWarning

DEFAULT_SHARD_SIZE = 1024
"""Sentences per shard: also the window sorted by length, so larger shards pad less."""

LAYOUT = {
    "queries": "(layer, token, head, dim)",
    "keys": "(layer, token, head, dim)",
    "gold_bits": "(layer, byte): per sentence packbits of (head, query, key) bool",
    "token_offsets": "(sentence + 1,)",
    "gold_offsets": "(sentence + 1,)",
    "char_offsets": "(token, 2)",
}


def _store_dtype(dtype: torch.dtype | str) -> str:
    name = {torch.float32: "float32", torch.float16: "float16"}.get(dtype, dtype) if isinstance(
        dtype, torch.dtype) else str(dtype)
    name = {"fp32": "float32", "fp16": "float16", "half": "float16", "float": "float32"}.get(name, name)
    if name not in STORE_DTYPES:
        raise ValueError(f"dtype must be float32 or float16, not {dtype!r}")
    return name


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    ours = [
        p for p in out.iterdir()
        if p.name in (MANIFEST_FILE, MANIFEST_FILE + ".tmp")
        or SHARD_PATTERN.fullmatch(p.name.removesuffix(".partial"))
    ]
    others = [p for p in out.iterdir() if p not in ours]
    if (ours or others) and not overwrite:
        if _interrupted(out):
            raise FileExistsError(f"{out} holds an interrupted extraction (incomplete manifest); pass "
                                  "overwrite=True (--overwrite) to start over, or continue it with "
                                  "--engine ray --resume")
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace a previous extraction there")
    # Only our own files are removed, never whatever else a user keeps in the folder.
    for p in ours:
        p.unlink()


def _interrupted(out: Path) -> bool:
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("complete") is False


def extract_corpus(
    model: EntmaxModel,
    texts: Iterable[str],
    out_dir: str | os.PathLike[str],
    batch_size: int = 32,
    dtype: torch.dtype | str = torch.float32,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
    corpus_name: str = "",
    split: str = "",
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    callback: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Extract queries, keys and gold graphs of every text into the store directory ``out_dir``.

    ``texts`` is any iterable of strings (consumed one shard at a time, so a
    generator over a huge file works), or a corpus object with ``texts()`` and
    ``name`` (then ``corpus_name`` defaults to its name). ``dtype`` of the
    stored q/k: ``torch.float32`` (exact, default) or ``torch.float16`` (half
    the disk). ``metadata`` is free-form provenance copied into the manifest.
    ``callback(done, total)``, if given, is called after each batch with the
    sentences extracted so far and the total (None for an iterable without a length).
    Returns ``out_dir``; open it with :meth:`ExtractionStore.open`.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    if callable(getattr(texts, "texts", None)):  # a sparsefinder.corpora.readers.Corpus
        corpus_name = corpus_name or str(getattr(texts, "name", ""))
        texts = texts.texts()
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not one string")
    dtype_name = _store_dtype(dtype)
    np_dtype = STORE_DTYPES[dtype_name]
    total = len(texts) if hasattr(texts, "__len__") else None  # type: ignore[arg-type]
    it = iter(texts)
    window = list(islice(it, shard_size))
    if not window:  # an empty store is always a mistake upstream (a filter or limit that kept nothing)
        raise ValueError("no texts to extract")
    out = Path(out_dir)
    _prepare_dir(out, overwrite)

    t0 = time.perf_counter()
    manifest = new_manifest(model, dtype_name, corpus_name, split, batch_size, shard_size, metadata)
    head_dim = manifest["head_dim"]
    write_json_atomic(out / MANIFEST_FILE, manifest)

    bar = tqdm(total=total, unit="sent", desc=f"extract {model.name}", disable=not progress, dynamic_ncols=True)
    if callback is not None:
        bar = _CallbackBar(bar, callback, total)
    batch_no = 0
    try:
        while window:
            k = len(manifest["shards"])
            entry, batch_no = _write_shard(
                model, window, out, k, manifest["num_sentences"], batch_no, batch_size, np_dtype, head_dim, bar
            )
            manifest["shards"].append(entry)
            manifest["num_sentences"] += entry["num_sentences"]
            manifest["num_tokens"] += entry["num_tokens"]
            manifest["truncated"] += entry.pop("_truncated")
            write_json_atomic(out / MANIFEST_FILE, manifest)
            bar.set_postfix(tokens=manifest["num_tokens"])
            window = list(islice(it, shard_size))
    finally:
        bar.close()
    if manifest["truncated"]:
        warnings.warn(
            f"{manifest['truncated']} text(s) longer than the model's maximum of {model.max_length} tokens were "
            "truncated (flagged per sentence in the store)",
            TruncationWarning,
            stacklevel=2,
        )
    manifest["complete"] = True
    manifest["settings"]["elapsed_s"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(out / MANIFEST_FILE, manifest)
    return out


def new_manifest(
    model: EntmaxModel, dtype_name: str, corpus_name: str, split: str, batch_size: int, shard_size: int,
    metadata: dict[str, Any] | None,
) -> dict[str, Any]:
    """The manifest of a store about to be written (``complete`` false, no shards yet).

    Shared by every engine that writes stores (here and :mod:`sparsefinder.distributed`), so that
    they describe the same extraction with the same fields.
    """
    probe = model.extract(["a"], keep_probs=False)  # the head size, whatever the config calls it
    head_dim = int(probe.queries[0].shape[-1])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "model": model.name,
        "weights_sha256": weights_fingerprint(model.model),
        "base_checksum": getattr(model, "base_checksum", None),
        "adapter": adapter_summary(getattr(model, "adapter_manifest", None)),
        "alpha": alpha_to_json(model.alpha),
        "causal": bool(model.causal),
        # Per layer, the sliding window (largest |i - j|) its mask allows; null for full attention.
        "windows": list(getattr(model, "windows", [None] * model.num_layers)),
        # Per layer, how the attention scaled (and soft-capped) q·k: mass recall recomputes the probabilities.
        "scaling": list(probe.scaling),
        "softcap": list(probe.softcaps),
        "num_layers": model.num_layers,
        "num_heads": model.num_heads,
        "head_dim": head_dim,
        "max_length": model.max_length,
        "dtype": dtype_name,
        "corpus": corpus_name,
        "split": split,
        "num_sentences": 0,
        "num_tokens": 0,
        "truncated": 0,
        "layout": LAYOUT,
        "shards": [],
        "sparsefinder_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            "batch_size": batch_size,
            "shard_size": shard_size,
            "device": str(model.device),
            # What the model computed in (entmax and the gold graph are float32 whatever it is).
            "compute_dtype": str(next(model.model.parameters()).dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
            "sort": "length descending within each shard; stored in corpus order",
        },
        "metadata": dict(metadata or {}),
    }


class _CallbackBar:
    """A tqdm bar that also reports ``(done, total)`` to a callback after each update."""

    def __init__(self, bar: tqdm, callback: Callable[[int, int | None], None], total: int | None) -> None:
        self._bar, self._callback, self._total, self._done = bar, callback, total, 0

    def update(self, n: int) -> None:
        self._bar.update(n)
        self._done += n
        self._callback(self._done, self._total)

    def set_postfix(self, **kwargs: Any) -> None:
        self._bar.set_postfix(**kwargs)

    def close(self) -> None:
        self._bar.close()


def _write_shard(
    model: EntmaxModel,
    window: list[str],
    out: Path,
    k: int,
    first: int,
    batch_no: int,
    batch_size: int,
    np_dtype: np.dtype,
    head_dim: int,
    bar: tqdm,
) -> tuple[dict[str, Any], int]:
    """Extract one shard's sentences into ``shard-{k:05d}.*``; returns its manifest entry and the next batch id."""
    for i, t in enumerate(window):
        if not isinstance(t, str):
            raise TypeError(f"text {first + i} is {type(t).__name__}, not str")
    with warnings.catch_warnings():  # truncation is recorded per sentence and reported once at the end
        warnings.simplefilter("ignore", TruncationWarning)
        enc, _ = model.tokenize(window)
    lengths = enc["attention_mask"].sum(1).numpy().astype(np.int64)
    if (lengths == 0).any():
        bad = first + int(np.flatnonzero(lengths == 0)[0])
        raise ValueError(f"text {bad} has no tokens ({window[bad - first]!r}); remove empty texts from the corpus")
    input_ids = enc["input_ids"].numpy()
    L, H, d, S = model.num_layers, model.num_heads, head_dim, len(window)
    token_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    gold_offsets = np.concatenate([[0], np.cumsum((H * lengths * lengths + 7) // 8)]).astype(np.int64)
    T, G = int(token_offsets[-1]), int(gold_offsets[-1])

    name = f"shard-{k:05d}"
    partial = out / f"{name}.safetensors.partial"
    arr = allocate_safetensors(
        partial,
        {
            "token_offsets": (np.dtype("<i8"), (S + 1,)), "lengths": (np.dtype("<i8"), (S,)),
            "gold_offsets": (np.dtype("<i8"), (S + 1,)), "input_ids": (np.dtype("<i8"), (T,)),
            "char_offsets": (np.dtype("<i8"), (T, 2)), "word_ids": (np.dtype("<i8"), (T,)),
            "batch": (np.dtype("<i8"), (S,)), "batch_row": (np.dtype("<i8"), (S,)),
            "queries": (np_dtype, (L, T, H, d)), "keys": (np_dtype, (L, T, H, d)),
            "gold_bits": (np.dtype("u1"), (L, G)), "special": (np.dtype("u1"), (T,)),
            "truncated": (np.dtype("u1"), (S,)),
        },
        metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)},
    )
    arr["token_offsets"][:] = token_offsets
    arr["lengths"][:] = lengths
    arr["gold_offsets"][:] = gold_offsets
    tokens: list[list[str] | None] = [None] * S
    limit = float(np.finfo(np_dtype).max)

    order = np.argsort(-lengths, kind="stable")  # longest first: similar lengths share a batch
    for start in range(0, S, batch_size):
        rows = order[start : start + batch_size]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)
            # Gold-bits mode: the store keeps only the support, packed inside each attention call, so no
            # layer's (B, H, N, N) float probabilities are held (what lets long inputs fit; same bytes).
            ext = model.extract([window[i] for i in rows], gold_bits=True)
        if not np.array_equal(ext.lengths.numpy(), lengths[rows]):
            raise RuntimeError("tokenisation differed between the shard and its batch; cannot place the tokens")
        q = torch.stack(ext.queries)  # (L, B, H, N, d)
        kk = torch.stack(ext.keys)
        if np_dtype.itemsize < 4 and max(float(q.abs().max()), float(kk.abs().max())) > limit:
            raise ValueError(f"queries/keys exceed the range of {np_dtype.name}; extract with dtype=float32")
        qn = q.permute(0, 1, 3, 2, 4).numpy()  # (L, B, N, H, d) — token-major, as stored
        kn = kk.permute(0, 1, 3, 2, 4).numpy()
        for b, i in enumerate(rows.tolist()):
            n, a = int(lengths[i]), int(token_offsets[i])
            arr["queries"][:, a : a + n] = qn[:, b, :n]
            arr["keys"][:, a : a + n] = kn[:, b, :n]
            arr["gold_bits"][:, gold_offsets[i] : gold_offsets[i + 1]] = np.stack(
                [ext.gold_bits(layer, b) for layer in range(L)]
            )
            arr["input_ids"][a : a + n] = input_ids[i, :n]
            arr["char_offsets"][a : a + n] = np.asarray(ext.offsets[b], dtype=np.int64).reshape(n, 2)
            arr["word_ids"][a : a + n] = [-1 if w is None else w for w in ext.word_ids[b]]
            arr["special"][a : a + n] = ext.special[b]
            arr["truncated"][i] = ext.truncated[b]
            arr["batch"][i] = batch_no
            arr["batch_row"][i] = b
            tokens[i] = ext.tokens[b]
        batch_no += 1
        bar.update(len(rows))
    truncated = int(arr["truncated"].sum())
    arr["queries"].flush()  # every view shares one map; flushing one writes them all
    del arr

    strings_path = out / f"{name}.json"
    strings_path.write_text(json.dumps({"texts": window, "tokens": tokens}, ensure_ascii=False), encoding="utf-8")
    final = out / f"{name}.safetensors"
    os.replace(partial, final)
    entry = {
        "file": final.name,
        "strings_file": strings_path.name,
        "first_sentence": first,
        "num_sentences": S,
        "num_tokens": T,
        "gold_bytes": G,
        "bytes": final.stat().st_size,
        "sha256": file_sha256(final),
        "strings_bytes": strings_path.stat().st_size,
        "strings_sha256": file_sha256(strings_path),
        "_truncated": truncated,
    }
    return entry, batch_no
