"""Read (and lay out) a corpus extraction on disk: queries, keys and gold graphs.

A corpus is extracted once (:func:`sparsefinder.corpora.extract.extract_corpus`) and
then streamed many times by predictor training and sweeps, so nothing
downstream re-runs the model. Stores can be larger than RAM: every shard is
memory-mapped and only the pages a read touches are loaded.

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
  ``num_layers`` L, ``num_heads`` H, ``head_dim`` d, ``max_length``.
- data: ``dtype`` of queries/keys (``"float32"`` or ``"float16"``),
  ``corpus``, ``split``, ``num_sentences``, ``num_tokens``, ``layout`` (the
  axis order of each tensor, as below, for self-description).
- ``shards``: a list of ``{file, strings_file, first_sentence, num_sentences,
  num_tokens, gold_bytes, bytes, sha256, strings_bytes, strings_sha256}``;
  ``bytes``/``sha256`` are the shard file's size and SHA-256 hex digest.
- provenance: ``sparsefinder_version``, ``created`` (ISO 8601 UTC),
  ``settings`` (batch size, shard size, device, torch threads, sorting,
  elapsed seconds), ``metadata`` (free-form, e.g. the corpus source).

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

import bisect
import json
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
import torch

from sparsefinder.artifacts import (
    ST_DTYPES,
    adapter_summary,
    alpha_to_json,
    file_sha256,
    weights_fingerprint,
)
from sparsefinder.graphs import AttentionGraph

if TYPE_CHECKING:  # the store sits below the model layer; it only needs the model's attributes
    from sparsefinder.model.entmax_model import EntmaxModel

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


# --------------------------------------------------------------------------- shared helpers


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
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


class _Shard:
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

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            with self._lock:
                if self._arrays is None:
                    self._arrays = self._open()
        return self._arrays

    def _open(self) -> dict[str, np.ndarray]:
        arrays, _ = _read_safetensors(self.path)
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


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class StoredSentence:
    """One stored sentence: its tokens, and per layer its queries, keys and gold support."""

    index: int
    text: str
    tokens: list[str]
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    word_ids: list[int | None]
    special: list[bool]
    truncated: bool
    causal: bool
    _store: ExtractionStore = field(repr=False, compare=False)
    _shard: _Shard = field(repr=False, compare=False)
    _local: int = field(repr=False, compare=False)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def queries(self, layer: int) -> torch.Tensor:
        """``(H, n, d)`` float32 queries of one layer."""
        return self._qk("queries", layer)

    def keys(self, layer: int) -> torch.Tensor:
        """``(H, n, d)`` float32 keys of one layer."""
        return self._qk("keys", layer)

    def _qk(self, name: str, layer: int) -> torch.Tensor:
        layer = self._store._layer_index(layer)
        a, b = self._store._token_span(self._shard, self._local)
        block = self._shard.arrays[name][layer, a:b]  # (n, H, d), one contiguous read
        return torch.from_numpy(np.ascontiguousarray(block.transpose(1, 0, 2), dtype=np.float32))

    def gold(self, layer: int) -> torch.Tensor:
        """``(H, n, n)`` bool gold support of one layer."""
        layer = self._store._layer_index(layer)
        return torch.from_numpy(self._store._gold_block(self._shard, self._local, layer))

    def gold_graph(self, layer: int) -> AttentionGraph:
        """The gold graph of one layer as a one-sentence batch."""
        g = self.gold(layer)
        return AttentionGraph(g[None], torch.tensor([self.length]), self.causal)


@dataclass
class LayerBatch:
    """A padded batch of stored sentences, one layer.

    ``queries``/``keys``: ``(B, H, N, d)`` float32, zero on padding;
    ``indices``: the sentences' positions in the store (= corpus order).
    """

    indices: torch.Tensor
    lengths: torch.Tensor
    layer: int
    queries: torch.Tensor
    keys: torch.Tensor
    gold: AttentionGraph
    tokens: list[list[str]]
    causal: bool

    def padding_mask(self) -> torch.Tensor:
        """``(B, N)`` True on real tokens."""
        n = self.queries.shape[2]
        return torch.arange(n, device=self.lengths.device)[None, :] < self.lengths[:, None]


@dataclass
class StoredBatch:
    """A padded batch of stored sentences, all layers, shaped like :class:`~sparsefinder.model.entmax_model.Extraction`.

    ``queries[l]``/``keys[l]``: ``(B, H, N, d)`` float32; ``gold(l)`` the layer's graph.
    """

    indices: torch.Tensor
    lengths: torch.Tensor
    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    graphs: list[AttentionGraph]
    tokens: list[list[str]]
    causal: bool

    @property
    def num_layers(self) -> int:
        return len(self.queries)

    @property
    def num_heads(self) -> int:
        return int(self.queries[0].shape[1])

    def gold(self, layer: int) -> AttentionGraph:
        return self.graphs[layer]

    def layer(self, layer: int) -> LayerBatch:
        return LayerBatch(self.indices, self.lengths, layer, self.queries[layer], self.keys[layer],
                          self.graphs[layer], self.tokens, self.causal)

    def padding_mask(self) -> torch.Tensor:
        n = self.queries[0].shape[2]
        return torch.arange(n, device=self.lengths.device)[None, :] < self.lengths[:, None]


# --------------------------------------------------------------------------- the store


class ExtractionStore:
    """A corpus extraction on disk, read lazily through memory maps. Open with :meth:`open`."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest
        self._shards = [_Shard(path, entry, manifest) for entry in manifest["shards"]]
        self._firsts = [s.first for s in self._shards]
        self._strings: OrderedDict[int, dict[str, list]] = OrderedDict()
        self._strings_lock = threading.Lock()

    # -- opening and validation ------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], verify: bool = False) -> ExtractionStore:
        """Open a store directory; checks the manifest and that every shard is present and whole.

        ``verify=True`` also checks every file's SHA-256 (reads the whole store).
        """
        root = Path(path)
        if not root.is_dir():
            raise StoreError(f"{root} is not an extraction store: no such directory")
        mpath = root / MANIFEST_FILE
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise StoreError(f"{root} is not an extraction store: {MANIFEST_FILE} is missing") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"manifest {mpath} is corrupt: not valid JSON ({e})") from e
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
        store = cls(root, manifest)
        if verify:
            store.verify()
        return store

    def verify(self) -> None:
        """Check every shard's SHA-256 against the manifest and its arrays against the declared shapes."""
        for shard in self._shards:
            for key, digest_key in (("file", "sha256"), ("strings_file", "strings_sha256")):
                f = self.path / shard.entry[key]
                if file_sha256(f) != shard.entry[digest_key]:
                    raise StoreError(f"shard file {f} is corrupt: its SHA-256 differs from the manifest's")
            shard.arrays  # noqa: B018 - parses and validates the header
            shard.strings()

    def check_model(self, model: EntmaxModel) -> None:
        """Refuse (:class:`StoreMismatchError`) a model other than the one this store was extracted with.

        Compared: the weights' fingerprint (which covers base weights and adapter),
        the base checksum and adapter manifest where both sides have them, alpha,
        the causal flag and the numbers of layers and heads. Model *names* alone
        are labels: a store made from the same weights under another name is accepted.
        """
        m = self.manifest
        problems: list[str] = []
        if model.num_layers != m["num_layers"] or model.num_heads != m["num_heads"]:
            problems.append(
                f"shape: model has {model.num_layers} layers x {model.num_heads} heads, "
                f"store {m['num_layers']} x {m['num_heads']}"
            )
        if bool(model.causal) != m["causal"]:
            problems.append(f"causal: model {bool(model.causal)}, store {m['causal']}")
        want, have = np.asarray(m["alpha"], dtype=np.float64), np.asarray(alpha_to_json(model.alpha), np.float64)
        if want.shape != have.shape or not np.allclose(want, have, rtol=0, atol=1e-6):
            problems.append(f"alpha: model {alpha_to_json(model.alpha)}, store {m['alpha']}")
        base = getattr(model, "base_checksum", None)
        if base and m.get("base_checksum") and base != m["base_checksum"]:
            problems.append(f"base weights checksum: model {base[:12]}…, store {m['base_checksum'][:12]}…")
        adapter = adapter_summary(getattr(model, "adapter_manifest", None))
        stored_adapter = m.get("adapter")
        if (adapter is None) != (stored_adapter is None) or (
            adapter and stored_adapter and adapter["manifest_sha256"] != stored_adapter.get("manifest_sha256")
        ):
            problems.append("adapter: the model's adapter differs from the one the store was extracted with")
        if m.get("weights_sha256") and not problems:  # hashing costs a pass over the weights; skip if already refused
            fp = weights_fingerprint(model.model)
            if fp != m["weights_sha256"]:
                problems.append(f"weights: fingerprint {fp[:12]}… differs from the store's {m['weights_sha256'][:12]}…")
        if problems:
            raise StoreMismatchError(
                f"store {self.path} was extracted with model {m['model']!r}, not with this model "
                f"({model.name!r}): " + "; ".join(problems) + ". Re-extract the corpus with this model."
            )

    # -- sizes and metadata ------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["num_sentences"])

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ExtractionStore({str(self.path)!r}, model={m['model']!r}, sentences={len(self)}, "
                f"tokens={m['num_tokens']}, shards={len(self._shards)})")

    @property
    def num_layers(self) -> int:
        return int(self.manifest["num_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.manifest["num_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.manifest["head_dim"])

    @property
    def causal(self) -> bool:
        return bool(self.manifest["causal"])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    def lengths(self) -> np.ndarray:
        """``(S,)`` int64 sentence lengths in corpus order (reads only the small index arrays)."""
        if not self._shards:
            return np.zeros(0, np.int64)
        return np.concatenate([np.asarray(s.arrays["lengths"]) for s in self._shards])

    def texts(self) -> list[str]:
        return [t for i in range(len(self._shards)) for t in self._shard_strings(i)["texts"]]

    # -- random access -------------------------------------------------------------
    def sentence(self, i: int) -> StoredSentence:
        """Sentence ``i`` (corpus order; negative counts from the end)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sentence {i} out of range for a store of {n} sentences")
        i %= n
        k, local = self._locate(i)
        shard = self._shards[k]
        arr = shard.arrays
        a, b = self._token_span(shard, local)
        strings = self._shard_strings(k)
        return StoredSentence(
            index=i,
            text=strings["texts"][local],
            tokens=list(strings["tokens"][local]),
            input_ids=arr["input_ids"][a:b].tolist(),
            offsets=[(int(x), int(y)) for x, y in arr["char_offsets"][a:b]],
            word_ids=[None if w < 0 else int(w) for w in arr["word_ids"][a:b]],
            special=[bool(s) for s in arr["special"][a:b]],
            truncated=bool(arr["truncated"][local]),
            causal=self.causal,
            _store=self,
            _shard=shard,
            _local=local,
        )

    __getitem__ = sentence

    def __iter__(self) -> Iterator[StoredSentence]:
        for i in range(len(self)):
            yield self.sentence(i)

    # -- streaming -------------------------------------------------------------------
    @overload
    def iter_batches(
        self, layer: int, batch_size: int = ..., *, indices: Sequence[int] | None = ...,
        order: Literal["corpus", "shuffle", "length"] = ..., seed: int = ..., device: str | torch.device | None = ...,
    ) -> Iterator[LayerBatch]: ...

    @overload
    def iter_batches(
        self, layer: None = ..., batch_size: int = ..., *, indices: Sequence[int] | None = ...,
        order: Literal["corpus", "shuffle", "length"] = ..., seed: int = ..., device: str | torch.device | None = ...,
    ) -> Iterator[StoredBatch]: ...

    def iter_batches(
        self,
        layer: int | None = None,
        batch_size: int = 32,
        *,
        indices: Sequence[int] | None = None,
        order: Literal["corpus", "shuffle", "length"] = "corpus",
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> Iterator[LayerBatch] | Iterator[StoredBatch]:
        """Padded batches of ``batch_size`` sentences: one layer (:class:`LayerBatch`) or all (:class:`StoredBatch`).

        ``indices`` restricts to (and orders) a subset. ``order``: ``"corpus"``
        keeps the given order; ``"shuffle"`` permutes the shards and the sentences
        within each shard (seeded), and ``"length"`` sorts each shard's sentences
        longest first to cut padding. Both stay shard-local so one pass reads
        every shard region once, sequentially, however large the store.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if order not in ("corpus", "shuffle", "length"):
            raise ValueError(f"order must be 'corpus', 'shuffle' or 'length', not {order!r}")
        layer = None if layer is None else self._layer_index(layer)
        seq = self._ordered(indices, order, seed)
        return self._batches(seq, layer, batch_size, device)

    def _batches(self, seq: np.ndarray, layer: int | None, batch_size: int, device) -> Iterator[Any]:
        for start in range(0, len(seq), batch_size):
            batch = self._gather(seq[start : start + batch_size], layer)
            yield batch if device is None else _to_device(batch, torch.device(device))

    def _ordered(self, indices: Sequence[int] | None, order: str, seed: int) -> np.ndarray:
        n = len(self)
        idx = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"indices must lie in [0, {n}) for a store of {n} sentences")
        if order == "corpus" or idx.size == 0:
            return idx
        shard_of = np.searchsorted(np.asarray(self._firsts), idx, side="right") - 1
        shards = list(dict.fromkeys(shard_of.tolist()))  # first-appearance order
        rng = np.random.default_rng(seed)
        if order == "shuffle":
            shards = [shards[i] for i in rng.permutation(len(shards))]
        parts = []
        for k in shards:
            mine = idx[shard_of == k]
            if order == "shuffle":
                mine = mine[rng.permutation(len(mine))]
            else:
                lens = self._shards[k].arrays["lengths"][mine - self._shards[k].first]
                mine = mine[np.argsort(-lens, kind="stable")]
            parts.append(mine)
        return np.concatenate(parts)

    def _gather(self, idx: np.ndarray, layer: int | None) -> LayerBatch | StoredBatch:
        # Each sentence is a contiguous (n, H, d) block of a memory-mapped layer
        # region: no file is opened per sentence, and the page cache serves reads.
        locs = [self._locate(int(i)) for i in idx]
        lengths = np.array([self._shards[k].arrays["lengths"][j] for k, j in locs], dtype=np.int64)
        B, H, d = len(idx), self.num_heads, self.head_dim
        N = int(lengths.max()) if B else 0
        layers = [layer] if layer is not None else list(range(self.num_layers))
        q = np.zeros((len(layers), B, H, N, d), np.float32)
        k_ = np.zeros_like(q)
        g = np.zeros((len(layers), B, H, N, N), np.bool_)
        tokens = []
        lsel = slice(layer, layer + 1) if layer is not None else slice(None)
        for b, (k, j) in enumerate(locs):
            shard = self._shards[k]
            arr = shard.arrays
            a, e = self._token_span(shard, j)
            n = e - a
            q[:, b, :, :n] = arr["queries"][lsel, a:e].transpose(0, 2, 1, 3)
            k_[:, b, :, :n] = arr["keys"][lsel, a:e].transpose(0, 2, 1, 3)
            g0, g1 = int(arr["gold_offsets"][j]), int(arr["gold_offsets"][j + 1])
            bits = np.unpackbits(arr["gold_bits"][lsel, g0:g1], axis=1, count=H * n * n)
            g[:, b, :, :n, :n] = bits.reshape(len(layers), H, n, n).view(np.bool_)
            tokens.append(list(self._shard_strings(k)["tokens"][j]))
        lt = torch.from_numpy(lengths)
        it = torch.from_numpy(np.asarray(idx, dtype=np.int64).copy())
        qs = [torch.from_numpy(q[i]) for i in range(len(layers))]
        ks = [torch.from_numpy(k_[i]) for i in range(len(layers))]
        graphs = [AttentionGraph(torch.from_numpy(g[i]), lt, self.causal) for i in range(len(layers))]
        if layer is not None:
            return LayerBatch(it, lt, layer, qs[0], ks[0], graphs[0], tokens, self.causal)
        return StoredBatch(it, lt, qs, ks, graphs, tokens, self.causal)

    # -- internals ---------------------------------------------------------------------
    def _layer_index(self, layer: int) -> int:
        L = self.num_layers
        if not isinstance(layer, int | np.integer) or not -L <= int(layer) < L:
            raise IndexError(f"layer {layer} out of range for a model of {L} layers")
        return int(layer) % L

    def _locate(self, i: int) -> tuple[int, int]:
        k = bisect.bisect_right(self._firsts, i) - 1
        return k, i - self._firsts[k]

    @staticmethod
    def _token_span(shard: _Shard, local: int) -> tuple[int, int]:
        offs = shard.arrays["token_offsets"]
        return int(offs[local]), int(offs[local + 1])

    def _gold_block(self, shard: _Shard, local: int, layer: int) -> np.ndarray:
        arr = shard.arrays
        n = int(arr["lengths"][local])
        g0, g1 = int(arr["gold_offsets"][local]), int(arr["gold_offsets"][local + 1])
        H = self.num_heads
        bits = np.unpackbits(arr["gold_bits"][layer, g0:g1], count=H * n * n)
        return bits.reshape(H, n, n).astype(np.bool_)

    def _shard_strings(self, k: int) -> dict[str, list]:
        # Token strings are small next to q/k but add up; keep a few shards' worth.
        with self._strings_lock:
            if k in self._strings:
                self._strings.move_to_end(k)
                return self._strings[k]
        data = self._shards[k].strings()
        with self._strings_lock:
            self._strings[k] = data
            while len(self._strings) > 8:
                self._strings.popitem(last=False)
        return data


def _to_device(batch: LayerBatch | StoredBatch, device: torch.device) -> LayerBatch | StoredBatch:
    lengths = batch.lengths.to(device)
    if isinstance(batch, LayerBatch):
        graph = AttentionGraph(batch.gold.edges.to(device), lengths, batch.causal)
        return LayerBatch(batch.indices.to(device), lengths, batch.layer, batch.queries.to(device),
                          batch.keys.to(device), graph, batch.tokens, batch.causal)
    graphs = [AttentionGraph(g.edges.to(device), lengths, batch.causal) for g in batch.graphs]
    return StoredBatch(batch.indices.to(device), lengths, [q.to(device) for q in batch.queries],
                       [k.to(device) for k in batch.keys], graphs, batch.tokens, batch.causal)


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
