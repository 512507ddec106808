"""The on-disk layout of a corpus extraction: format constants, manifest checks, memory-mapped shards.

A corpus is extracted once (:func:`sparsefinder.corpora.extract.extract_corpus`) and
then streamed many times by predictor training and sweeps, so nothing
downstream re-runs the model. Stores can be larger than RAM: every shard is
memory-mapped and only the pages a read touches are loaded. This module is the
format: the writer (:mod:`sparsefinder.corpora.extract`) and the reader
(:class:`~sparsefinder.corpora.store.ExtractionStore`) share its constants, and
the reader checks a store's manifest (:func:`read_manifest`) and opens its shards
(:class:`Shard`) with it.

On-disk format, version 1
=========================

A store is a directory::

    manifest.json                 what, from which model, and the shard list
    shard-00000.safetensors       numeric arrays of sentences [0, S0)
    shard-00000.json              their texts and token strings
    shard-00001.safetensors       sentences [S0, S0 + S1)
    ...

Sentences are stored **in corpus order**: shard ``k`` holds the consecutive
sentences ``first_sentence .. first_sentence + num_sentences - 1`` of the
corpus, in order. (Extraction sorts sentences by length *inside* a shard to
limit padding, and records which forward pass produced each sentence in
``batch`` / ``batch_row``, but writes them back in corpus order.)

``manifest.json`` (UTF-8 JSON object):

- ``format`` = ``"sparsefinder-extraction"``, ``format_version`` = ``1``,
  ``complete`` (false while an extraction is still running or was interrupted).
- model: ``model`` (name), ``weights_sha256`` (SHA-256 of the model's
  parameters, see :func:`weights_fingerprint`), ``base_checksum`` (SHA-256 of
  the base weight files when an adapter was applied, else null), ``adapter``
  (scalar fields of the adapter manifest plus ``manifest_sha256``, or null),
  ``alpha`` (a number, or a ``[layer][head]`` nested list), ``causal``,
  ``num_layers`` L, ``num_heads`` H, ``head_dim`` d, ``max_length``, per layer
  ``windows`` (sliding window or null), ``scaling`` (the factor of q·k) and
  ``softcap`` (or null); stores written before ``scaling`` was kept assume
  :math:`d^{-1/2}` and no soft-capping.
- data: ``dtype`` of queries/keys (``"float32"`` or ``"float16"``),
  ``corpus``, ``split``, ``num_sentences``, ``num_tokens``, ``layout`` (the
  axis order of each tensor, as below, for self-description).
- ``shards``: a list of ``{file, strings_file, first_sentence, num_sentences,
  num_tokens, gold_bytes, bytes, sha256, strings_bytes, strings_sha256}``;
  ``bytes``/``sha256`` are the shard file's size and SHA-256 hex digest.
- provenance: ``sparsefinder_version``, ``created`` (ISO 8601 UTC),
  ``settings`` (batch size, shard size, device, torch threads, sorting,
  elapsed seconds; for a Ray run also ``engine``: workers, resources and the
  fingerprint of the plan that ``--resume`` checks), ``metadata`` (free-form, e.g. the corpus source).

Each ``shard-NNNNN.safetensors`` is a standard safetensors file (8-byte
little-endian header length, JSON header, raw little-endian C-order data;
readable with ``safetensors.numpy.load_file``). With S sentences and T tokens
in the shard (T = sum of the sentence lengths), it holds:

=================  ==========  ================================================
tensor             dtype       shape and meaning
=================  ==========  ================================================
``token_offsets``  int64       (S+1,): sentence s is tokens ``[t[s], t[s+1])``
``lengths``        int64       (S,): real tokens per sentence (no padding)
``gold_offsets``   int64       (S+1,): sentence s is bytes ``[g[s], g[s+1])``
                               of every row of ``gold_bits``
``input_ids``      int64       (T,): token ids
``char_offsets``   int64       (T, 2): ``(start, end)`` character span in the
                               text, as the tokenizer reports it (``(0, 0)``
                               for special tokens)
``word_ids``       int64       (T,): word index of the token, -1 for none
``batch``          int64       (S,): which forward pass (numbered from 0 over
                               the whole extraction) computed the sentence
``batch_row``      int64       (S,): its row in that batch
``queries``        F32 or F16  (L, T, H, d): per layer, token, head; exactly
                               what the attention function received
``keys``           F32 or F16  (L, T, H, d)
``gold_bits``      uint8       (L, G): per layer, the concatenation over
                               sentences of ``numpy.packbits`` of the
                               sentence's (H, n, n) boolean gold support
                               ``p_hij > 0`` (C order, head, query, key; each
                               sentence padded to whole bytes, so
                               ``g[s+1] - g[s] = ceil(H n² / 8)``)
``special``        uint8       (T,): 1 for special tokens ([CLS], [SEP], ...)
``truncated``      uint8       (S,): 1 if the text was cut to ``max_length``
=================  ==========  ================================================

Layer-major tensors make the common read — one layer for many sentences —
one contiguous region per shard, and one sentence of one layer one contiguous
``(n, H, d)`` block. Gold support of a causal model is stored as the full
n × n square (its upper triangle is all zeros). Dense probabilities are never
stored. To decode sentence s, layer l without this code::

    a, b = token_offsets[s], token_offsets[s + 1]
    q = queries[l, a:b].transpose(1, 0, 2)                       # (H, n, d)
    n = b - a
    bits = gold_bits[l, gold_offsets[s]:gold_offsets[s + 1]]
    gold = np.unpackbits(bits, count=H * n * n).reshape(H, n, n).astype(bool)

``shard-NNNNN.json`` is ``{"texts": [S strings], "tokens": [S lists of token
strings]}`` in the same order.
"""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from sparsefinder.artifacts import ST_DTYPES, read_json

FORMAT = "sparsefinder-extraction"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARD_PATTERN = re.compile(r"shard-\d{5,}\.(safetensors|json)")

STORE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit; a larger "length" means a corrupt file

_SHARD_INT_TENSORS = ("token_offsets", "lengths", "gold_offsets", "input_ids", "char_offsets", "word_ids",
                      "batch", "batch_row")
_REQUIRED_MANIFEST: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "format_version": int,
    "complete": bool,
    "model": str,
    "alpha": (int, float, list),
    "causal": bool,
    "num_layers": int,
    "num_heads": int,
    "head_dim": int,
    "dtype": str,
    "num_sentences": int,
    "num_tokens": int,
    "shards": list,
}
_REQUIRED_SHARD = ("file", "strings_file", "first_sentence", "num_sentences", "num_tokens", "gold_bytes",
                   "bytes", "sha256", "strings_bytes", "strings_sha256")


class StoreError(ValueError):
    """A store that cannot be read: missing, corrupt, truncated or of another format version."""


class StoreMismatchError(StoreError):
    """A store was extracted with another model, other weights or another alpha."""


# --------------------------------------------------------------------------- safetensors


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map a safetensors file: read-only views of every tensor, and the header metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise StoreError(f"shard {path} is corrupt: {size} bytes, shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise StoreError(f"shard {path} is corrupt: header length {n} does not fit the {size}-byte file")
            raw = fh.read(n)
    except OSError as e:
        raise StoreError(f"cannot read shard {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"shard {path} is corrupt: its safetensors header is not valid JSON ({e})") from e
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    data_len = size - start
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(data_len,)) if data_len else None
    arrays: dict[str, np.ndarray] = {}
    for name, spec in header.items():
        try:
            dtype = ST_DTYPES[spec["dtype"]]
            shape = tuple(int(s) for s in spec["shape"])
            a, b = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"shard {path} is corrupt: bad header entry for {name!r} ({e!r})") from e
        if b - a != dtype.itemsize * math.prod(shape) or a < 0 or b > data_len:
            raise StoreError(
                f"shard {path} is corrupt or truncated: tensor {name!r} needs bytes [{a}, {b}) "
                f"of a {data_len}-byte data section"
            )
        arrays[name] = (mm[a:b] if mm is not None else np.zeros(0, np.uint8)).view(dtype).reshape(shape)
    return arrays, metadata


# --------------------------------------------------------------------------- shards


class Shard:
    """One shard: its manifest entry, and lazily its memory-mapped arrays and strings."""

    def __init__(self, root: Path, entry: dict, manifest: dict) -> None:
        self.root = root
        self.entry = entry
        self.path = root / entry["file"]
        self.strings_path = root / entry["strings_file"]
        self.first = int(entry["first_sentence"])
        self.count = int(entry["num_sentences"])
        self.manifest = manifest
        self._arrays: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (e.g. sent to a Ray worker) as its location only: the maps are reopened where it lands.
        return {**self.__dict__, "_arrays": None, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            with self._lock:
                if self._arrays is None:
                    self._arrays = self._open()
        return self._arrays

    def _open(self) -> dict[str, np.ndarray]:
        arrays, _ = read_safetensors(self.path)
        m = self.manifest
        L, H, d = m["num_layers"], m["num_heads"], m["head_dim"]
        S, T, G = self.count, int(self.entry["num_tokens"]), int(self.entry["gold_bytes"])
        qk = STORE_DTYPES[m["dtype"]]
        expected = {
            "token_offsets": ("<i8", (S + 1,)), "lengths": ("<i8", (S,)), "gold_offsets": ("<i8", (S + 1,)),
            "input_ids": ("<i8", (T,)), "char_offsets": ("<i8", (T, 2)), "word_ids": ("<i8", (T,)),
            "batch": ("<i8", (S,)), "batch_row": ("<i8", (S,)),
            "queries": (qk, (L, T, H, d)), "keys": (qk, (L, T, H, d)), "gold_bits": ("u1", (L, G)),
            "special": ("u1", (T,)), "truncated": ("u1", (S,)),
        }
        for name, (dtype, shape) in expected.items():
            if name not in arrays:
                raise StoreError(f"shard {self.path} is corrupt: tensor {name!r} is missing")
            got = arrays[name]
            if got.dtype != np.dtype(dtype) or got.shape != shape:
                raise StoreError(
                    f"shard {self.path} does not match the manifest: {name!r} is {got.dtype}{list(got.shape)}, "
                    f"expected {np.dtype(dtype)}{list(shape)}"
                )
        offs, lens = arrays["token_offsets"], arrays["lengths"]
        if offs[0] != 0 or offs[-1] != T or not np.array_equal(np.diff(offs), lens):
            raise StoreError(f"shard {self.path} is corrupt: token offsets disagree with sentence lengths")
        gold_sizes = (H * lens * lens + 7) // 8
        goffs = arrays["gold_offsets"]
        if goffs[0] != 0 or not np.array_equal(np.diff(goffs), gold_sizes):
            raise StoreError(f"shard {self.path} is corrupt: gold offsets disagree with sentence lengths")
        return arrays

    def strings(self) -> dict[str, list]:
        try:
            data = json.loads(self.strings_path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise StoreError(f"token strings file {self.strings_path} listed in the manifest is missing") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"token strings file {self.strings_path} is corrupt: {e}") from e
        if (
            not isinstance(data, dict)
            or len(data.get("texts", ())) != self.count
            or len(data.get("tokens", ())) != self.count
        ):
            raise StoreError(f"token strings file {self.strings_path} does not hold {self.count} sentences")
        return data


# --------------------------------------------------------------------------- the manifest


def read_manifest(root: Path) -> dict[str, Any]:
    """The validated manifest of the store directory ``root``, whose shard files must all be present and whole."""
    if not root.is_dir():
        raise StoreError(f"{root} is not an extraction store: no such directory")
    mpath = root / MANIFEST_FILE
    manifest = read_json(mpath, StoreError, f"{root} is not an extraction store: {MANIFEST_FILE} is missing",
                         f"manifest {mpath} is corrupt: not valid JSON")
    _validate_manifest(manifest, mpath)
    for entry in manifest["shards"]:
        for key, size_key in (("file", "bytes"), ("strings_file", "strings_bytes")):
            f = root / entry[key]
            if not f.is_file():
                raise StoreError(f"shard file {f} listed in the manifest is missing")
            size = f.stat().st_size
            if size != entry[size_key]:
                raise StoreError(
                    f"shard file {f} is truncated or altered: {size} bytes on disk, "
                    f"the manifest records {entry[size_key]}"
                )
    return manifest


def _validate_manifest(manifest: Any, mpath: Path) -> None:
    if not isinstance(manifest, dict):
        raise StoreError(f"manifest {mpath} is corrupt: not a JSON object")
    if manifest.get("format") != FORMAT:
        raise StoreError(f"manifest {mpath} is not a sparsefinder extraction (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"store {mpath.parent} has format version {version}, but this sparsefinder reads version "
            f"{FORMAT_VERSION}; re-extract the corpus (or use the sparsefinder version that wrote it, "
            f"{manifest.get('sparsefinder_version', 'unknown')})"
        )
    bad = [k for k, t in _REQUIRED_MANIFEST.items() if not isinstance(manifest.get(k), t)]
    if bad:
        raise StoreError(f"manifest {mpath} is corrupt: missing or mistyped fields {', '.join(bad)}")
    if not manifest["complete"]:
        raise StoreError(
            f"store {mpath.parent} is incomplete: the extraction was interrupted after "
            f"{len(manifest['shards'])} shard(s); run it again"
        )
    if manifest["dtype"] not in STORE_DTYPES:
        raise StoreError(f"manifest {mpath}: unknown dtype {manifest['dtype']!r}")
    expected_first = 0
    tokens = 0
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict) or any(k not in entry for k in _REQUIRED_SHARD):
            raise StoreError(f"manifest {mpath} is corrupt: shard entry {i} lacks fields")
        for key in ("file", "strings_file"):
            name = entry[key]
            # Names only, never paths: a manifest must not make us read outside the store.
            if not isinstance(name, str) or not SHARD_PATTERN.fullmatch(name):
                raise StoreError(f"manifest {mpath} is corrupt: bad shard file name {name!r}")
        if entry["first_sentence"] != expected_first:
            raise StoreError(f"manifest {mpath} is corrupt: shard {i} does not start at sentence {expected_first}")
        expected_first += entry["num_sentences"]
        tokens += entry["num_tokens"]
    if expected_first != manifest["num_sentences"] or tokens != manifest["num_tokens"]:
        raise StoreError(f"manifest {mpath} is corrupt: shard sizes do not add up to the totals")
