"""Block summaries of a head's probabilities: what a drawing of a long input needs, without the matrix.

A heatmap of one head at thousands of tokens cannot show every pair (8192² cells), so it is drawn
as ``s × s`` blocks of tokens (``s`` = :func:`block_side`, at most ``max_side`` blocks a side; the
last block of a side may be smaller). Each block keeps:

- its **largest probability** (float32): the block's colour; 0 means no gold edge in the block;
- its **gold edges**: how many of its pairs have ``p > 0``.

A gold-bits extraction of a long text (``EntmaxModel.extract(..., block_side=...)``) computes these
inside the attention call, layer by layer, so a head can be drawn at 8,192 tokens from a few
kilobytes instead of its 256 MiB probability matrix; a normal extraction gets the same summary
from its kept probabilities (:func:`head_blocks` on one head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812


def block_side(n: int, max_side: int) -> int:
    """Tokens per block so that ``n`` tokens fit in ``max_side`` blocks (as
    :func:`sparsefinder.plots.heatmaps.block_size`, which cannot import torch code)."""
    return max(1, -(-int(n) // int(max_side)))


def block_counts(n: int, size: int) -> torch.Tensor:
    """``(m, m)`` int64: pairs per block (``size²``, fewer in the last row and column of blocks)."""
    sides = torch.full((-(-n // size),), size, dtype=torch.int64)
    sides[-1] = n - size * (len(sides) - 1)
    return sides[:, None] * sides[None, :]


def allowed_block_counts(n: int, size: int, causal: bool = False, window: int | None = None) -> torch.Tensor:
    """``(m, m)`` int32: pairs per block that :func:`sparsefinder.graphs.valid_pair_mask` allows for one
    sentence of ``n`` tokens, without building its ``(n, n)`` mask.

    A query's allowed keys are one interval (all keys; up to itself when ``causal``; within ``window``
    of it), so a block's count is the sum over its queries of that interval's overlap with the block's
    keys: ``n × m`` numbers instead of ``n²`` (8,192 tokens: milliseconds, not a 256 MiB pool).
    """
    i = torch.arange(n, dtype=torch.int64)
    lo = torch.zeros(n, dtype=torch.int64) if window is None else (i - window).clamp(min=0)
    hi = i.clone() if causal else torch.full((n,), n - 1, dtype=torch.int64)
    if window is not None and not causal:
        hi = (i + window).clamp(max=n - 1)
    m = -(-n // size)
    start = torch.arange(m, dtype=torch.int64) * size
    stop = (start + size - 1).clamp(max=n - 1)
    overlap = (torch.minimum(hi[:, None], stop[None, :]) - torch.maximum(lo[:, None], start[None, :]) + 1).clamp(min=0)
    rows = torch.zeros((m, m), dtype=torch.int64).index_add_(0, i // size, overlap)
    return rows.to(torch.int32)


def block_sum(mask: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., n, n)`` bool → ``(..., m, m)`` int32 counts of True per ``size × size`` block.

    An average pool times the block's own pair count (the pool divides by the pairs inside the
    input), rounded: exact for any block of up to 2²⁴ pairs in float32. One ``(n, n)`` float
    temporary at a time (the leading dimensions are looped), so 8,192 tokens cost 256 MiB, not H times that.
    """
    lead = mask.shape[:-2]
    n0, n1 = mask.shape[-2:]
    if n0 != n1:
        raise ValueError(f"block_sum takes square matrices, got {n0} × {n1}")
    if size == 1:
        return mask.to(torch.int32)
    flat = mask.reshape(-1, n0, n1)
    counts = block_counts(n0, size).to(torch.float32)
    out = torch.empty((flat.shape[0], *counts.shape), dtype=torch.int32)
    for i in range(flat.shape[0]):
        mean = F.avg_pool2d(flat[i][None].to(torch.float32), size, size, ceil_mode=True)[0]
        out[i] = torch.round(mean.cpu() * counts).to(torch.int32)
    return out.reshape(*lead, *counts.shape)


def head_blocks(probs: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, n, n)`` probabilities → ``(H, m, m)`` float32 largest p and int32 gold edges per block.

    Head by head, so the temporaries are one ``(n, n)`` matrix (not ``H`` of them)."""
    p = probs.detach()
    if p.dim() != 3:
        raise ValueError(f"probs must be (H, n, n), got shape {tuple(p.shape)}")
    if size == 1:
        return p.to(torch.float32).cpu().clone(), (p > 0).to(torch.int32).cpu()
    top, edges = [], []
    for h in range(p.shape[0]):
        top.append(F.max_pool2d(p[h][None].to(torch.float32), size, size, ceil_mode=True)[0].cpu())
        edges.append(block_sum(p[h] > 0, size))
    return torch.stack(top), torch.stack(edges)
