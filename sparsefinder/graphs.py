"""The one graph type: boolean attention edges over a right-padded batch.

A graph holds ``edges[b, h, i, j]`` = query ``i`` attends to key ``j`` in
sentence ``b``, head ``h``. Sentence ``b`` has ``lengths[b]`` real tokens at
positions ``0 .. lengths[b] - 1``; everything after is padding. A *valid pair*
``(i, j)`` has both positions real and, for a causal (decoder) model, ``j <= i``;
in a sliding-window layer (Mistral, Gemma-2/3, ModernBERT's local layers) also
``|i - j| <= window``, the layer's own mask. Only valid pairs are ever edges, and
only they count in any denominator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def valid_pair_mask(lengths: torch.Tensor, n: int, causal: bool = False, window: int | None = None) -> torch.Tensor:
    """Boolean ``(B, 1, n, n)`` mask of the pairs that may be edges (``window``: largest ``|i - j|``)."""
    pos = torch.arange(n, device=lengths.device)
    real = pos[None, :] < lengths[:, None]  # (B, n)
    valid = real[:, :, None] & real[:, None, :]
    if causal:
        valid = valid & (pos[None, :, None] >= pos[None, None, :])
    if window is not None:
        valid = valid & ((pos[None, :, None] - pos[None, None, :]).abs() <= window)
    return valid[:, None]


def real_tokens(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, N)`` True on real (non-padding) positions (the rows of :func:`valid_query_mask`)."""
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]


def valid_query_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean ``(B, 1, n)`` mask of the real (non-padding) queries."""
    pos = torch.arange(n, device=lengths.device)
    return (pos[None, :] < lengths[:, None])[:, None]


def num_valid_pairs(lengths: torch.Tensor, causal: bool = False, window: int | None = None) -> torch.Tensor:
    r"""Valid pairs per sentence: ``n²``, or ``n(n+1)/2`` when causal.

    With a window :math:`w < n`, the causal band holds :math:`n(w+1) - w(w+1)/2`
    pairs (row ``i`` sees ``min(i, w) + 1`` keys) and the two-sided band
    :math:`n(2w+1) - w(w+1)` (``w(w+1)/2`` pairs cut at each end).
    """
    lengths = lengths.to(torch.long)
    if window is not None:
        w = torch.clamp(lengths - 1, min=0).clamp(max=window)  # a window wider than the sentence cuts nothing
        one_sided = lengths * (w + 1) - w * (w + 1) // 2
        return one_sided if causal else 2 * one_sided - lengths
    return lengths * (lengths + 1) // 2 if causal else lengths * lengths


@dataclass(frozen=True)
class AttentionGraph:
    """Edges of all heads of one layer for a padded batch.

    ``edges`` is ``(B, H, N, N)`` bool, indexed ``[sentence, head, query, key]``;
    edges outside the valid pairs are dropped on construction.
    """

    edges: torch.Tensor
    lengths: torch.Tensor
    causal: bool = False
    # The layer's sliding window (largest |i - j| its mask allows), None for full attention.
    window: int | None = None

    def __post_init__(self) -> None:
        if self.edges.dim() != 4 or self.edges.shape[-1] != self.edges.shape[-2]:
            raise ValueError(f"edges must be (B, H, N, N), got {tuple(self.edges.shape)}")
        if self.lengths.shape != (self.edges.shape[0],):
            raise ValueError("lengths must have one entry per sentence")
        if self.lengths.numel() and int(self.lengths.max()) > self.n:
            raise ValueError("a length exceeds the padded size N")
        # A negative length would give no valid pairs in the mask but a positive
        # n² in num_valid_pairs, so the denominators would disagree with the edges.
        if self.lengths.numel() and int(self.lengths.min()) < 0:
            raise ValueError("lengths must be non-negative")
        edges = self.edges.to(torch.bool) & self.valid_pairs()
        object.__setattr__(self, "edges", edges)

    @property
    def n(self) -> int:
        return int(self.edges.shape[-1])

    @property
    def num_heads(self) -> int:
        return int(self.edges.shape[1])

    def valid_pairs(self) -> torch.Tensor:
        return valid_pair_mask(self.lengths.to(self.edges.device), self.n, self.causal, self.window)

    def valid_queries(self) -> torch.Tensor:
        return valid_query_mask(self.lengths.to(self.edges.device), self.n)

    def num_edges(self) -> torch.Tensor:
        """``(B, H)`` edge counts."""
        return self.edges.sum(dim=(-1, -2))

    def sparsity(self) -> torch.Tensor:
        """``(B, H)``: 1 − |edges| / valid pairs."""
        pairs = num_valid_pairs(self.lengths, self.causal, self.window).to(self.edges.device).clamp(min=1)
        return 1.0 - self.num_edges().double() / pairs[:, None].double()

    def union(self, other: AttentionGraph) -> AttentionGraph:
        self._check_compatible(other)
        return AttentionGraph(self.edges | other.edges, self.lengths, self.causal, self.window)

    __or__ = union

    def intersection(self, other: AttentionGraph) -> AttentionGraph:
        self._check_compatible(other)
        return AttentionGraph(self.edges & other.edges, self.lengths, self.causal, self.window)

    __and__ = intersection

    def _check_compatible(self, other: AttentionGraph) -> None:
        if self.edges.shape != other.edges.shape:
            raise ValueError(f"graph shapes differ: {tuple(self.edges.shape)} vs {tuple(other.edges.shape)}")
        if not torch.equal(self.lengths.cpu(), other.lengths.cpu()) or self.causal != other.causal:
            raise ValueError("graphs are over different sentences (lengths or causal flag differ)")
        if self.window != other.window:
            raise ValueError(f"graphs are over different layers: window {self.window} vs {other.window}")

    def sentence(self, b: int) -> torch.Tensor:
        """``(H, n_b, n_b)`` edges of sentence ``b`` without its padding."""
        n_b = int(self.lengths[b])
        return self.edges[b, :, :n_b, :n_b]

    def edge_list(self, b: int, h: int) -> np.ndarray:
        """``(E, 2)`` int array of ``(query, key)`` edges, row-major order."""
        return self.sentence(b)[h].nonzero().cpu().numpy().astype(np.int32)

    def pack(self, b: int) -> np.ndarray:
        """Packed bits of sentence ``b``'s ``(H, n_b, n_b)`` edges (for storage or the browser)."""
        return np.packbits(self.sentence(b).cpu().numpy().reshape(-1))

    @staticmethod
    def unpack_sentence(bits: np.ndarray, num_heads: int, n: int) -> torch.Tensor:
        """Inverse of :meth:`pack`: ``(H, n, n)`` bool."""
        flat = np.unpackbits(np.asarray(bits, dtype=np.uint8), count=num_heads * n * n)
        return torch.from_numpy(flat.astype(bool).reshape(num_heads, n, n))

    @classmethod
    def from_sentences(
        cls, sentences: list[torch.Tensor], causal: bool = False, window: int | None = None
    ) -> AttentionGraph:
        """Pad per-sentence ``(H, n_b, n_b)`` edges into one batch graph."""
        if not sentences:
            raise ValueError("no sentences")
        heads = sentences[0].shape[0] if sentences[0].dim() == 3 else -1
        for b, s in enumerate(sentences):
            # Without this check a (1, n, n) or (n, n) sentence would silently
            # broadcast over every head of the batch.
            if s.dim() != 3 or s.shape[-1] != s.shape[-2] or s.shape[0] != heads:
                raise ValueError(
                    f"sentence {b}: expected (H, n, n) edges with H = {heads} like sentence 0, got {tuple(s.shape)}"
                )
        n = max(int(s.shape[-1]) for s in sentences)
        edges = torch.zeros(len(sentences), heads, n, n, dtype=torch.bool)
        for b, s in enumerate(sentences):
            m = s.shape[-1]
            edges[b, :, :m, :m] = s.to(torch.bool).cpu()
        lengths = torch.tensor([int(s.shape[-1]) for s in sentences], dtype=torch.long)
        return cls(edges, lengths, causal, window)
