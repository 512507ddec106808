r"""Two models (or one model at two alphas) on the same text: how their gold graphs differ, per head.

For sentence ``b``, layer ``l`` and head ``h`` with gold graphs :math:`G_A` and
:math:`G_B` over the same valid pairs :math:`V` (same tokens, same masks):

.. math::
    \mathrm{sparsity}_X = 1 - \frac{|G_X|}{|V|}, \qquad
    \mathrm{jaccard} = \frac{|G_A \cap G_B|}{|G_A \cup G_B|} \quad (1 \text{ when both are empty}).

Values are macro-averaged over sentences, as every metric of the project
(docs/method.md §2). Pairing is pair by pair, so both sides must tokenise the
text identically and have the same layers, heads and masks; otherwise the
comparison is refused with the reason. :func:`compare_extractions` works on two
extractions of the same texts (the Models page, the CLI, a notebook);
:func:`compare_stores` on two extraction stores of the same corpus.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch

from sparsefinder.graphs import AttentionGraph, num_valid_pairs

COLUMNS = ("layer", "head", "sparsity_a", "sparsity_b", "jaccard", "sentences")


def pair_counts(a: AttentionGraph, b: AttentionGraph) -> dict[str, torch.Tensor]:
    """``(B, H)`` int64 counts of one layer: edges of each graph, their intersection and union, valid pairs."""
    if a.edges.shape != b.edges.shape or not torch.equal(a.lengths.cpu(), b.lengths.cpu()):
        raise ValueError("the two graphs are over different tokens (shapes or lengths differ)")
    if a.causal != b.causal or a.window != b.window:
        raise ValueError(f"the two layers allow different pairs (causal {a.causal}/{b.causal}, "
                         f"window {a.window}/{b.window})")
    ea, eb = a.edges, b.edges.to(a.edges.device)
    heads = ea.shape[1]
    return {
        "edges_a": ea.sum((-1, -2)),
        "edges_b": eb.sum((-1, -2)),
        "both": (ea & eb).sum((-1, -2)),
        "either": (ea | eb).sum((-1, -2)),
        "pairs": num_valid_pairs(a.lengths, a.causal, a.window)[:, None].expand(-1, heads).to(ea.device),
    }


def _ratios(counts: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    c = {k: v.double().cpu().numpy() for k, v in counts.items()}
    pairs = np.where(c["pairs"] > 0, c["pairs"], np.nan)  # a sentence without tokens drops out
    return {
        "sparsity_a": 1 - c["edges_a"] / pairs,
        "sparsity_b": 1 - c["edges_b"] / pairs,
        "jaccard": np.where(np.isnan(pairs), np.nan,
                            np.where(c["either"] > 0, c["both"] / np.maximum(c["either"], 1), 1.0)),
    }


class _Means:
    """Running macro means per (layer, head) over sentences."""

    def __init__(self, layers: int, heads: int) -> None:
        self.sums = {k: np.zeros((layers, heads)) for k in COLUMNS[2:5]}
        self.counts = np.zeros((layers, heads))

    def add(self, layer: int, ratios: dict[str, np.ndarray]) -> None:
        ok = ~np.isnan(ratios["sparsity_a"])  # (B, H)
        for k in self.sums:
            self.sums[k][layer] += np.where(ok, ratios[k], 0).sum(0)
        self.counts[layer] += ok.sum(0)

    def frame(self) -> pd.DataFrame:
        layers, heads = self.counts.shape
        rows = []
        for layer in range(layers):
            for head in range(heads):
                n = self.counts[layer, head]
                rows.append({"layer": layer, "head": head,
                             **{k: self.sums[k][layer, head] / n if n else np.nan for k in self.sums},
                             "sentences": int(n)})
        return pd.DataFrame(rows, columns=list(COLUMNS))


def _check_shapes(layers: tuple[int, int], heads: tuple[int, int]) -> None:
    if layers[0] != layers[1] or heads[0] != heads[1]:
        raise ValueError(f"the models differ in shape ({layers[0]}×{heads[0]} vs {layers[1]}×{heads[1]} "
                         "layers × heads): heads cannot be paired")


def compare_extractions(a, b) -> pd.DataFrame:
    """Per (layer, head): gold sparsity of each side and the Jaccard overlap of their gold graphs (macro over
    the texts). ``a`` and ``b`` are :class:`~sparsefinder.model.entmax_model.Extraction` of the same texts."""
    if a.tokens != b.tokens:
        raise ValueError("the two models tokenise the texts differently: their graphs cannot be paired")
    _check_shapes((a.num_layers, b.num_layers), (a.num_heads, b.num_heads))
    means = _Means(a.num_layers, a.num_heads)
    for layer in range(a.num_layers):
        means.add(layer, _ratios(pair_counts(a.gold(layer), b.gold(layer))))
    return means.frame()


def compare_stores(a, b, batch_size: int = 32, layers: Iterable[int] | None = None) -> pd.DataFrame:
    """:func:`compare_extractions` over two :class:`~sparsefinder.corpora.store.ExtractionStore` of one corpus."""
    if a.texts() != b.texts():
        raise ValueError("the two stores hold different texts (or a different order): extract the same corpus")
    _check_shapes((a.num_layers, b.num_layers), (a.num_heads, b.num_heads))
    means = _Means(a.num_layers, a.num_heads)
    for layer in layers if layers is not None else range(a.num_layers):
        for ba, bb in zip(a.iter_batches(layer, batch_size, order="corpus"),
                          b.iter_batches(layer, batch_size, order="corpus"), strict=True):
            if ba.tokens != bb.tokens:
                raise ValueError("the two stores tokenise the corpus differently: their graphs cannot be paired")
            means.add(layer, _ratios(pair_counts(ba.gold, bb.gold)))
    return means.frame()
