"""Context providers: per-batch inputs that predictors need and the store does not hold.

A sweep or an approximation run passes one context to every method; a provider
adds the keys it knows (for example ``embeddings`` for the lexical mask) for each
batch of stored sentences. The spaCy-based providers (dependency trees, tags) are
in :mod:`sparsefinder.corpora.annotate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from sparsefinder.corpora.store import ExtractionStore, LayerBatch


@runtime_checkable
class ContextProvider(Protocol):
    """Per-batch context for predictors that need data the store lacks: ``keys`` it provides, and a call."""

    keys: tuple[str, ...]

    def __call__(self, batch: LayerBatch) -> Mapping[str, Any]: ...


class EmbeddingContext:
    """``embeddings`` for the lexical mask: the model's input embedding of each stored token.

    ``weight`` is the ``(vocabulary, e)`` input embedding matrix (e.g.
    ``model.model.get_input_embeddings().weight``); token ids come from the store.
    """

    keys: tuple[str, ...] = ("embeddings",)

    def __init__(self, store: ExtractionStore, weight: torch.Tensor) -> None:
        self.store = store
        self.weight = weight.detach().cpu()

    def __call__(self, batch: LayerBatch) -> dict[str, Any]:
        rows = []
        for i in batch.indices.tolist():
            ids = torch.tensor(self.store.sentence(int(i)).input_ids, dtype=torch.long)
            rows.append(self.weight[ids])
        return {"embeddings": rows}
