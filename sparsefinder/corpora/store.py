"""Read a corpus extraction on disk: queries, keys and gold graphs, sentence by sentence or in padded batches.

A corpus is extracted once (:func:`sparsefinder.corpora.extract.extract_corpus`) and
then streamed many times by predictor training and sweeps, so nothing
downstream re-runs the model. :class:`ExtractionStore` opens a store directory
(its layout, format version 1, is documented in :mod:`sparsefinder.corpora.shards`)
and reads it lazily through memory maps: stores can be larger than RAM, and only
the pages a read touches are loaded. One sentence comes back as a
:class:`StoredSentence`, a padded batch as a :class:`LayerBatch` (one layer) or a
:class:`StoredBatch` (all layers, shaped like the model's own extraction).
"""

from __future__ import annotations

import bisect
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
import torch

from sparsefinder.artifacts import file_sha256, model_mismatches
from sparsefinder.corpora.shards import (  # noqa: F401 - the format's names stay importable from the store
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SHARD_PATTERN,
    STORE_DTYPES,
    Shard,
    StoreError,
    StoreMismatchError,
    read_manifest,
)
from sparsefinder.graphs import AttentionGraph
from sparsefinder.mass import attention_scores, layer_alpha, support_probabilities

if TYPE_CHECKING:  # the store sits below the model layer; it only needs the model's attributes
    from sparsefinder.model.entmax_model import EntmaxModel


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
    _shard: Shard = field(repr=False, compare=False)
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
        window = self._store.windows[self._store._layer_index(layer)]
        return AttentionGraph(g[None], torch.tensor([self.length]), self.causal, window)


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
        self._shards = [Shard(path, entry, manifest) for entry in manifest["shards"]]
        self._firsts = [s.first for s in self._shards]
        self._strings: OrderedDict[int, dict[str, list]] = OrderedDict()
        self._strings_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # A context holding a store can go to another process (a Ray task): the path and manifest
        # travel, the caches and the lock do not; shards reopen their maps on first use.
        return {**self.__dict__, "_strings": OrderedDict(), "_strings_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _strings_lock=threading.Lock())

    # -- opening and validation ------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], verify: bool = False) -> ExtractionStore:
        """Open a store directory; checks the manifest and that every shard is present and whole.

        ``verify=True`` also checks every file's SHA-256 (reads the whole store).
        """
        root = Path(path)
        store = cls(root, read_manifest(root))
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
        found, have = model_mismatches(m, model)
        problems: list[str] = []
        if "num_layers" in found or "num_heads" in found:
            problems.append(
                f"shape: model has {have['num_layers']} layers x {have['num_heads']} heads, "
                f"store {m['num_layers']} x {m['num_heads']}"
            )
        if "causal" in found:
            problems.append(f"causal: model {have['causal']}, store {m['causal']}")
        if "alpha" in found:
            problems.append(f"alpha: model {have['alpha']}, store {m['alpha']}")
        if "base_checksum" in found:
            problems.append(
                f"base weights checksum: model {have['base_checksum'][:12]}…, store {m['base_checksum'][:12]}…"
            )
        if "adapter" in found:
            problems.append("adapter: the model's adapter differs from the one the store was extracted with")
        if "weights_sha256" in found:
            problems.append(f"weights: fingerprint {have['weights_sha256'][:12]}… differs from the store's "
                            f"{m['weights_sha256'][:12]}…")
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
    def windows(self) -> list[int | None]:
        """Per layer, the sliding window its mask allowed (None: full attention; stores before windows: all None)."""
        return list(self.manifest.get("windows") or [None] * self.num_layers)

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    def score_settings(self, layer: int) -> dict[str, Any]:
        """How the layer's attention turned q and k into probabilities: ``scaling``, ``softcap``, ``alpha``.

        ``recorded`` is False for a store written before the manifest kept ``scaling``
        (then the usual :math:`d^{-1/2}` and no soft-capping are assumed; the sweep checks the
        recomputed supports against the stored gold graphs, docs/method.md §2.2).
        """
        layer = self._layer_index(layer)
        m = self.manifest
        alpha = m["alpha"]
        recorded = isinstance(m.get("scaling"), list)
        return {
            "scaling": float(m["scaling"][layer]) if recorded else self.head_dim ** -0.5,
            "softcap": (m.get("softcap") or [None] * self.num_layers)[layer],
            "alpha": alpha[layer] if isinstance(alpha, list) else float(alpha),
            "recorded": recorded,
        }

    def gold_probabilities(self, batch: LayerBatch) -> tuple[torch.Tensor, int]:
        """``(B, H, N, N)`` float32 gold probabilities of a batch, recomputed (in float64) from its q and k.

        Given the stored support, 1.5-entmax has its threshold in closed form
        (:func:`sparsefinder.mass.support_probabilities`); they are zero off the stored gold
        graph. Also returns how many valid pairs' recomputed support (:math:`z > \tau`)
        disagrees with the stored gold bits: 0 when the recomputation is the model's own
        (ties at the threshold aside).
        """
        cfg = self.score_settings(batch.layer)
        window = self.windows[self._layer_index(batch.layer)]
        scores = attention_scores(batch.queries, batch.keys, batch.lengths, batch.causal, window,
                                  cfg["scaling"], cfg["softcap"])
        probs, mismatched = support_probabilities(scores, batch.gold.edges, layer_alpha(cfg["alpha"], self.num_heads))
        # float32 for the sweep's many products; rounding each value is independent of the batch's padding.
        return probs.float(), mismatched

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
        windows = self.windows
        graphs = [AttentionGraph(torch.from_numpy(g[i]), lt, self.causal, windows[li]) for i, li in enumerate(layers)]
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
    def _token_span(shard: Shard, local: int) -> tuple[int, int]:
        offs = shard.arrays["token_offsets"]
        return int(offs[local]), int(offs[local + 1])

    def _gold_block(self, shard: Shard, local: int, layer: int) -> np.ndarray:
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
        graph = AttentionGraph(batch.gold.edges.to(device), lengths, batch.causal, batch.gold.window)
        return LayerBatch(batch.indices.to(device), lengths, batch.layer, batch.queries.to(device),
                          batch.keys.to(device), graph, batch.tokens, batch.causal)
    graphs = [AttentionGraph(g.edges.to(device), lengths, batch.causal, g.window) for g in batch.graphs]
    return StoredBatch(batch.indices.to(device), lengths, [q.to(device) for q in batch.queries],
                       [k.to(device) for k in batch.keys], graphs, batch.tokens, batch.causal)
