"""Texts in, gold and predicted graphs out: what the Explore page, the CLI and a notebook show per text.

Every function takes an :class:`~sparsefinder.model.entmax_model.Extraction` that the
caller computed once (the data flows one way: nothing here re-runs the model), and
returns small, picklable values (packed bits and per-head numbers), so a server can
cache them and share them between sessions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparsefinder.graphs import AttentionGraph, valid_pair_mask
from sparsefinder.mass import output_error
from sparsefinder.metrics import graph_metrics
from sparsefinder.predictors.methods import predict_layer

SPLIT_MODES = ("sentences", "lines")
MAX_TEXT_CHARS = 100_000
"""Longest text :func:`split_texts` accepts: far more than the batch of sentences a page analyses, and
small enough that splitting it stays well under a second (spaCy's own limit is 1,000,000)."""


def split_texts(text: str, mode: str = "sentences") -> list[str]:
    """The texts to analyse: one per non-empty line, or per sentence within each line.

    Sentences come from the library's spaCy splitter (the one that splits the
    default corpus), so abbreviations such as "Dr." do not end a sentence. A text
    longer than :data:`MAX_TEXT_CHARS` is a :class:`~sparsefinder.corpora.corpus.CorpusError`.
    """
    from sparsefinder.corpora.corpus import CorpusError
    from sparsefinder.corpora.readers import split_sentences

    if mode not in SPLIT_MODES:
        raise ValueError(f"split mode must be one of {SPLIT_MODES}, got {mode!r}")
    if len(text or "") > MAX_TEXT_CHARS:
        raise CorpusError(f"the text has {len(text):,} characters, more than the limit of {MAX_TEXT_CHARS:,}; "
                          "analyse it in parts")
    out: list[str] = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        if mode == "lines":
            out.append(line)
        else:
            out.extend(split_sentences(line))
    return out


def text_hash(texts: Sequence[str]) -> str:
    """A digest of a batch of texts (length-prefixed, so ``["ab"]`` and ``["a", "b"]`` differ)."""
    h = hashlib.sha256()
    for t in texts:
        data = t.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class Analysis:
    """The gold graphs of a batch of texts, per layer and head.

    ``sparsity[b, l, h]`` is the gold sparsity of sentence ``b``, layer ``l``,
    head ``h``; ``packed[b][l]`` the packed bits of that sentence's ``(H, n, n)``
    gold graph (see :meth:`AttentionGraph.pack`).
    """

    texts: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]
    sparsity: np.ndarray
    packed: tuple[tuple[np.ndarray, ...], ...]
    truncated: tuple[bool, ...]
    num_layers: int
    num_heads: int
    # False for a long text's gold-bits extraction (extract_for_view): no method overlay or mass recall.
    probabilities: bool = True

    def gold_edges(self, b: int, layer: int) -> np.ndarray:
        """``(H, n, n)`` bool gold edges of sentence ``b`` in ``layer``."""
        n = len(self.tokens[b])
        return AttentionGraph.unpack_sentence(self.packed[b][layer], self.num_heads, n).numpy()


def analyse(extraction, texts: Sequence[str]) -> Analysis:
    """Gold sparsity grid, tokens and packed gold graphs of ``texts`` (the batch ``extraction`` ran)."""
    ex = extraction
    grids = [ex.gold(layer) for layer in range(ex.num_layers)]
    sparsity = np.stack([g.sparsity().numpy() for g in grids], axis=1)  # (B, L, H)
    return Analysis(
        texts=tuple(texts),
        tokens=tuple(tuple(t) for t in ex.tokens),
        sparsity=sparsity,
        # A gold-bits extraction already holds the packed bits (repacking 8,192 tokens takes seconds).
        packed=tuple(tuple(g.pack(b) if ex.gold_packed is None else ex.gold_packed[layer][b]
                           for layer, g in enumerate(grids)) for b in range(len(texts))),
        truncated=tuple(bool(t) for t in ex.truncated),
        num_layers=ex.num_layers,
        num_heads=ex.num_heads,
        probabilities=has_probabilities(ex),
    )


#: Longest text (in tokens) analysed with every layer's float32 probabilities kept (``4 H n²`` bytes a layer:
#: 8 GiB for 4 layers of 8 heads at 8,192 tokens). Longer texts get a gold-bits extraction that keeps each
#: head's block summary instead (:func:`extract_for_view`); the methods' overlay needs the probabilities.
LONG_INPUT_TOKENS = 1024
#: Most blocks a side of a head's drawing (as :data:`sparsefinder.plots.heatmaps.MAX_SIDE`).
HEAD_MAX_SIDE = 96


def is_long_input(model, texts: Sequence[str]) -> bool:
    """Whether a text of the batch has more than :data:`LONG_INPUT_TOKENS` tokens (after the model's truncation)."""
    enc, _ = model.tokenize(list(texts))
    return int(enc["attention_mask"].sum(1).max()) > LONG_INPUT_TOKENS


def extract_for_view(model, texts: Sequence[str], bits: bool | None = None):
    """``model.extract(texts)``, or above :data:`LONG_INPUT_TOKENS` tokens the gold-bits extraction with
    block summaries of at most :data:`HEAD_MAX_SIDE` blocks a side (memory ``H n² / 8`` bytes a layer).
    ``bits`` decides instead of the length (:func:`is_long_input`)."""
    if not (is_long_input(model, texts) if bits is None else bits):
        return model.extract(list(texts))
    return model.extract(list(texts), gold_bits=True, block_max_side=HEAD_MAX_SIDE)


def has_probabilities(extraction) -> bool:
    """Whether the extraction kept the float probabilities (a method's overlay and mass recall need them)."""
    return all(p.numel() for p in extraction.probs)


@dataclass(frozen=True)
class HeadView:
    """One head of one sentence as it is drawn: every pair up to ``max_side`` tokens, else blocks.

    ``size`` tokens per block a side (1: every pair; the last block of a side may be smaller). Per block:
    ``top`` the largest probability (float32; the probability itself when ``size`` is 1), ``edges`` the gold
    edges (``p > 0``), ``allowed`` the pairs the layer's mask allows (0: the block is all future keys or
    outside the sliding window).
    """

    n: int
    size: int
    top: np.ndarray
    edges: np.ndarray
    allowed: np.ndarray

    @property
    def zeros(self) -> int:
        """Allowed pairs with probability exactly 0 (not gold edges)."""
        return int(self.allowed.sum()) - int(self.edges.sum())

    @property
    def forbidden(self) -> int:
        """Pairs the layer's mask forbids."""
        return self.n * self.n - int(self.allowed.sum())


def head_view(extraction, sentence: int, layer: int, head: int, max_side: int = HEAD_MAX_SIDE) -> HeadView:
    """:class:`HeadView` of one head: from the extraction's block summaries when it kept them at this
    ``max_side`` (a long text's gold-bits extraction), else from its probabilities."""
    from sparsefinder.model.blocks import allowed_block_counts, block_side, head_blocks

    ex = extraction
    n = int(ex.lengths[sentence])
    size = block_side(n, max_side)
    if ex.blocks is not None and ex.block_max_side == max_side:
        top, edges = (a[head] for a in ex.blocks[layer][sentence])
    elif has_probabilities(ex):
        t, e = head_blocks(ex.probs[layer][sentence, head : head + 1, :n, :n], size)
        top, edges = t[0].numpy(), e[0].numpy()
    else:
        raise ValueError("this extraction kept neither the probabilities nor block summaries at "
                         f"{max_side} blocks a side")
    allowed = allowed_block_counts(n, size, ex.causal, ex.window(layer)).numpy()
    return HeadView(n=n, size=size, top=np.asarray(top, dtype=np.float32), edges=np.asarray(edges, dtype=np.int32),
                    allowed=allowed.astype(np.int32))


def head_probabilities(extraction, sentence: int, layer: int, head: int) -> np.ndarray:
    """``(n, n)`` float32 entmax probabilities of one head for one sentence (a copy)."""
    n = int(extraction.lengths[sentence])
    return extraction.probs[layer][sentence, head, :n, :n].numpy().astype(np.float32, copy=True)


def allowed_pairs(extraction, sentence: int, layer: int) -> np.ndarray:
    """``(n, n)`` bool: the pairs the layer's mask allows for one sentence (all of them in a full
    bidirectional layer; the lower triangle in a decoder; a band in a sliding-window layer)."""
    n = int(extraction.lengths[sentence])
    valid = valid_pair_mask(torch.tensor([n]), n, extraction.causal, extraction.window(layer))
    return valid[0, 0].numpy()


def layer_metrics(extraction, layer: int, pred: AttentionGraph) -> dict[str, torch.Tensor]:
    """Every metric of one layer's prediction against the gold graph of the same run, ``(B, H)`` each.

    The graph metrics with mass recall (the run kept the gold probabilities), and the
    ``output_error`` of entmax restricted to the prediction when the run kept the values
    (docs/method.md §2.2; NaN otherwise).
    """
    ex = extraction
    gold = ex.gold(layer)
    m = graph_metrics(gold, pred, probs=ex.probs[layer])
    if ex.has_values():
        m["output_error"] = output_error(ex.scores(layer), ex.values[layer], pred.edges, ex.lengths, ex.causal,
                                         ex.window(layer), ex.alpha(layer))
    else:
        m["output_error"] = torch.full_like(m["recall"], float("nan"))
    return m


@dataclass(frozen=True)
class HeadPrediction:
    """One head's gold and predicted graph on one sentence, and its metrics."""

    tokens: tuple[str, ...]
    gold: np.ndarray  # (n, n) bool
    pred: np.ndarray  # (n, n) bool
    metrics: dict
    truncated: bool
    allowed: np.ndarray | None = None  # (n, n) bool, the layer's valid pairs


def predict_head(extraction, layer: int, head: int, method: str, params: str | Mapping[str, Any] | None,
                 projections: Any = None, fitted: Mapping | None = None) -> HeadPrediction:
    """Predicted vs gold graph of ``method`` ``params`` for one head of the first sentence of ``extraction``."""
    ex = extraction
    pred = predict_layer(ex, layer, method, params, projections=projections, fitted=fitted)
    gold = ex.gold(layer)
    m = layer_metrics(ex, layer, pred)
    n = int(ex.lengths[0])
    allowed = allowed_pairs(ex, 0, layer)
    return HeadPrediction(
        tokens=tuple(ex.tokens[0]),
        gold=gold.edges[0, head, :n, :n].numpy().copy(),
        # A predictor unaware of the layer's window may propose forbidden pairs; they are not scored, nor drawn.
        pred=pred.edges[0, head, :n, :n].cpu().numpy() & allowed,
        metrics={k: float(v[0, head]) for k, v in m.items()},
        truncated=bool(ex.truncated[0]),
        allowed=allowed,
    )


@dataclass(frozen=True)
class BatchPrediction:
    """A method's predicted graphs for a batch of texts: per-head metrics and packed edges.

    ``metrics[name]`` is ``(B, L, H)`` (recall, precision, sparsity, exact, mass_recall, output_error, …:
    :func:`layer_metrics`);
    ``packed[b][l]`` the packed bits of sentence ``b``'s ``(H, n, n)`` predicted graph.
    """

    metrics: dict
    packed: tuple[tuple[np.ndarray, ...], ...]
    num_heads: int

    def edges(self, b: int, layer: int, n: int) -> np.ndarray:
        return AttentionGraph.unpack_sentence(self.packed[b][layer], self.num_heads, n).numpy()


def predict_batch(extraction, method: str, params: str | Mapping[str, Any] | None, projections: Any = None,
                  fitted: Mapping | None = None) -> BatchPrediction:
    """``method`` ``params`` on every layer of ``extraction``, against the gold graphs of the same run."""
    ex = extraction
    batch = len(ex.tokens)
    per_layer, packed = [], []
    for layer in range(ex.num_layers):
        pred = predict_layer(ex, layer, method, params, projections=projections, fitted=fitted)
        gold = ex.gold(layer)
        per_layer.append({k: v.numpy() for k, v in layer_metrics(ex, layer, pred).items()})
        if gold.window is not None and pred.window is None:  # keep only the pairs that are scored
            pred = AttentionGraph(pred.edges & gold.valid_pairs(), pred.lengths, pred.causal, gold.window)
        packed.append([pred.pack(b) for b in range(batch)])
    return BatchPrediction(
        metrics={k: np.stack([m[k] for m in per_layer], axis=1) for k in per_layer[0]},
        packed=tuple(tuple(packed[layer][b] for layer in range(ex.num_layers)) for b in range(batch)),
        num_heads=ex.num_heads,
    )
