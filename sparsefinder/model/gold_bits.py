"""Gold graphs packed into bits inside the attention call, for long inputs.

The gold graph of a layer is the support ``p_ij > 0`` of its entmax probabilities over the
valid pairs (docs/method.md §1). Keeping the float32 probabilities to derive it later costs
``4 H N²`` bytes per layer and text (12 heads at N = 8192: 3.2 GB per layer); the support in
bits costs ``H n² / 8``, 32 times less, and is all that a corpus store keeps anyway.

The layout is the store's (:meth:`sparsefinder.graphs.AttentionGraph.pack`): per sentence, the
``(H, n, n)`` boolean support without padding, flattened row-major, in ``numpy.packbits``
order (big-endian: the first pair is the most significant bit of byte 0; the last byte
is zero-padded). Packing here is torch-only, on the tensor's own device, so a GPU never
ships its float probabilities to the host: only ``H n² / 8`` bytes cross.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsefinder.graphs import AttentionGraph, valid_pair_mask


def packbits(flat: torch.Tensor) -> torch.Tensor:
    """``numpy.packbits`` of a 1-D bool tensor, computed in torch on the tensor's device.

    Byte ``m`` is ``sum_k flat[8m + k] << (7 - k)``; built with one shift-or per bit position over
    strided views, so the temporaries are an eighth of the input each (never an int64 copy, as
    summing over weights would make).
    """
    flat = flat.reshape(-1)
    count = flat.numel()
    full, rest = divmod(count, 8)
    out = torch.zeros(full + (rest > 0), dtype=torch.uint8, device=flat.device)
    body = flat[: 8 * full].view(full, 8)
    for k in range(8):
        out[:full] |= body[:, k].to(torch.uint8) << (7 - k)
    for k in range(rest):  # the zero-padded last byte
        out[full:] |= flat[8 * full + k : 8 * full + k + 1].to(torch.uint8) << (7 - k)
    return out


def sentence_bits(probs: torch.Tensor, n: int, causal: bool, window: int | None) -> torch.Tensor:
    """Packed support of one sentence's ``(H, N, N)`` probabilities over its valid ``(n, n)`` pairs.

    Exactly the bits of ``AttentionGraph(probs > 0, ...).pack(b)``: the support restricted to the
    valid pairs (the graph drops anything outside them), padding cut off.
    """
    lengths = torch.tensor([n], device=probs.device)
    support = (probs[:, :n, :n] > 0) & valid_pair_mask(lengths, n, causal, window)[0]
    return packbits(support)


def unpack_batch(bits: list[np.ndarray], lengths: torch.Tensor, num_heads: int, n: int) -> torch.Tensor:
    """``(B, H, n, n)`` bool edges from one layer's per-sentence packed bits (padding all False)."""
    edges = torch.zeros(len(bits), num_heads, n, n, dtype=torch.bool)
    for b, packed in enumerate(bits):
        m = int(lengths[b])
        edges[b, :, :m, :m] = AttentionGraph.unpack_sentence(packed, num_heads, m)
    return edges
