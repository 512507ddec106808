"""Entmax attention plugged into transformers by registration.

``register()`` adds an attention function named ``"entmax"`` to transformers'
``AttentionInterface`` and the matching eager (additive float) mask to
``AttentionMaskInterface``; a model loaded with ``attn_implementation="entmax"``
then runs alpha-entmax in every self-attention layer, whatever its architecture.

Capture is per call, not global: :func:`capture` sets a context variable that
only the current thread (or asyncio task) sees, so sessions of one server that
share a model each get their own queries, keys and probabilities.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

from sparsefinder.kernels.entmax import Alpha, entmax
from sparsefinder.model.blocks import block_side, head_blocks
from sparsefinder.model.gold_bits import sentence_bits

ATTN_IMPLEMENTATION = "entmax"

# A support restriction hook: given (layer, query, key, scores) returns a bool keep-mask
# (B, H, N, K), a float additive bias of that shape (a differentiable soft mask: log keep-weights),
# or None (layer untouched). Used to run the model on a predicted graph (sparsefinder.evaluation.approximate)
# and to train soft windows (sparsefinder.evaluation.windows).
SupportFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@dataclass
class AttentionRecord:
    """What one attention call saw: ``(B, H, N, d)`` queries/keys, ``(B, H, N, N)`` probs.

    Keys are per *query* head, as the attention used them: under grouped-query attention
    query head ``h`` reads key head ``h // kv_groups`` (``kv_groups`` query heads per key head).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    probs: torch.Tensor
    kv_groups: int = 1
    # The additive mask the layer received (0 = allowed), kept so the extraction can check that
    # the pairs it scores are exactly the ones the layer's own mask allows (padding, causal, window).
    mask: torch.Tensor | None = None
    # What turns q, k into probabilities (sparsefinder.mass.attention_scores), and the values, so that a
    # metric can recompute the head's output over a predicted graph (the output error).
    values: torch.Tensor | None = None
    scaling: float | None = None
    softcap: float | None = None
    alpha: Alpha = 1.5
    # Gold-bits capture (Capture.gold_bits): per sentence, the packed support of the probabilities over its
    # valid pairs (sparsefinder.model.gold_bits), on the CPU; ``probs`` is then empty.
    gold_bits: list[torch.Tensor] | None = None
    # Block capture (Capture.blocks_max_side): per sentence, the (H, m, m) largest probability and gold-edge
    # count per block of tokens (sparsefinder.model.blocks), on the CPU.
    blocks: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def expand_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, H_kv, N, d)`` -> ``(B, H_kv * groups, N, d)``: each key/value head repeated for its query heads
    (what transformers' eager ``repeat_kv`` does for grouped- and multi-query attention)."""
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


@dataclass
class Capture:
    """Collects one record per attention call, in call (= layer) order."""

    keep_probs: bool = True
    # Training (distillation) needs gradients through the captured probabilities.
    detach: bool = True
    records: list[AttentionRecord] = field(default_factory=list)
    # Gold-bits mode (long inputs): pack each sentence's support into bits inside the call and keep no float
    # probabilities. Needs the real lengths of the right-padded batch, the causal flag and the layer windows,
    # which define the valid pairs the bits cover (sparsefinder.graphs.valid_pair_mask).
    gold_bits: bool = False
    lengths: list[int] | None = None
    causal: bool = False
    windows: list[int | None] | None = None
    # Block summaries (long inputs drawn as blocks, sparsefinder.model.blocks): at most this many blocks a side.
    blocks_max_side: int | None = None

    def window(self, layer: int) -> int | None:
        return None if self.windows is None or not 0 <= layer < len(self.windows) else self.windows[layer]


_capture: ContextVar[Capture | None] = ContextVar("sparsefinder_capture", default=None)
_support: ContextVar[SupportFn | None] = ContextVar("sparsefinder_support", default=None)
_tagger: ContextVar[list | None] = ContextVar("sparsefinder_tagger", default=None)


@contextlib.contextmanager
def capture(
    keep_probs: bool = True,
    detach: bool = True,
    gold_bits: bool = False,
    lengths: list[int] | None = None,
    causal: bool = False,
    windows: list[int | None] | None = None,
    blocks_max_side: int | None = None,
) -> Iterator[Capture]:
    """Record q, k and entmax probabilities of every attention call in this context.

    ``gold_bits=True`` records, instead of the probabilities, each sentence's packed gold support
    (``lengths``: real tokens per text of the right-padded batch; ``causal``/``windows``: the valid pairs).
    ``blocks_max_side`` also records each sentence's block summary (:mod:`sparsefinder.model.blocks`).
    """
    if (gold_bits or blocks_max_side) and lengths is None:
        raise ValueError("a gold-bits or block capture needs the lengths of the batch")
    sink = Capture(keep_probs=keep_probs and not gold_bits, detach=detach, gold_bits=gold_bits,
                   lengths=None if lengths is None else [int(n) for n in lengths], causal=causal, windows=windows,
                   blocks_max_side=blocks_max_side)
    token = _capture.set(sink)
    try:
        yield sink
    finally:
        _capture.reset(token)


@contextlib.contextmanager
def restrict_support(fn: SupportFn) -> Iterator[None]:
    """Run attention with ``fn(layer, query, key, scores)`` restricting the scores before entmax.

    ``query``/``key`` are ``(B, H, N, d)`` as the attention function received them
    (what a predictor reads); ``scores`` are ``(B, H, N, K)``, scaled and with the
    model's additive mask. ``fn`` returns a bool keep mask (scores outside it get
    the dtype's minimum, so entmax gives them exactly zero; a query row with no
    kept key gets all-zero probabilities, i.e. a zero attention output), a float tensor added
    to the scores (e.g. log keep-weights of a soft mask, through which gradients
    flow), or None to leave the layer untouched. Per call through a context
    variable: only the current thread (or asyncio task) is restricted.
    """
    token = _support.set(fn)
    try:
        yield
    finally:
        _support.reset(token)


@contextlib.contextmanager
def trace_modules() -> Iterator[list[tuple[torch.nn.Module, torch.Tensor | None]]]:
    """Collect ``(module, attention_mask)`` of each attention call, in call order.

    A model loader runs one tiny forward under this to learn which modules are
    the attention layers (and in what order) and whether the mask is causal.
    """
    calls: list = []
    token = _tagger.set(calls)
    try:
        yield calls
    finally:
        _tagger.reset(token)


def module_alpha(module: torch.nn.Module) -> Alpha:
    """The alpha a model loader attached to this attention module (1.5 if none)."""
    return getattr(module, "entmax_alpha", 1.5)


def entmax_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for transformers' eager attention with softmax replaced by alpha-entmax.

    ``scaling`` is the model's own (usually ``d^{-1/2}``), applied exactly once.
    The mask is the eager additive mask: 0 or the dtype's minimum (finite, so a
    fully masked row does not crash entmax15).
    """
    tagger = _tagger.get()
    if tagger is not None:
        tagger.append((module, None if attention_mask is None else attention_mask.detach()))
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads cannot share {key.shape[1]} key heads evenly")
    groups = query.shape[1] // key.shape[1]
    key, value = expand_kv(key, groups), expand_kv(value, groups)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    # In place wherever no gradient flows (extraction runs under inference mode): at long N each out-of-place
    # step would hold a second (B, H, N, N) float32 tensor (12 heads at N = 8192: 3.2 GB each).
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2))
    inplace = not (torch.is_grad_enabled() and scores.requires_grad)
    scores = scores.mul_(scaling) if inplace else scores * scaling
    softcap = kwargs.get("softcap")
    if softcap:  # Gemma-2's logit soft-capping, applied before the mask as in transformers' eager attention
        scores = scores.div_(softcap).tanh_().mul_(softcap) if inplace else torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask_bias = attention_mask[..., : key.shape[-2]].float()
        scores = scores.add_(mask_bias) if inplace else scores + mask_bias
    restrict = _support.get()
    empty_rows = None
    if restrict is not None:
        keep = restrict(getattr(module, "sparsefinder_layer", -1), query, key, scores)
        if keep is not None:
            if keep.dtype == torch.bool:
                scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
                # A query with no kept key attends to nothing (zero output), as a sparse
                # kernel would; entmax over an all-masked row would spread over every position.
                empty_rows = ~keep.any(dim=-1, keepdim=True)
            else:
                # Clamped so that a masked score plus a large negative bias stays finite.
                scores = (scores + keep.to(scores.dtype)).clamp(min=torch.finfo(scores.dtype).min)
    probs = entmax(scores, module_alpha(module))
    del scores  # the scores are not needed past entmax: free them before the output matmul
    if empty_rows is not None and bool(empty_rows.any()):
        probs = probs.masked_fill(empty_rows, 0.0)
    sink = _capture.get()
    if sink is not None:
        _record(sink, module, query, key, value, probs, attention_mask, groups, scaling, softcap)
    if dropout > 0.0 and module.training:
        probs_used = torch.nn.functional.dropout(probs, p=dropout, training=True)
    else:
        probs_used = probs
    out = torch.matmul(probs_used.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), probs


def _record(sink: Capture, module, query, key, value, probs, attention_mask, groups, scaling, softcap) -> None:
    """Append this call's :class:`AttentionRecord` to the capture (gold bits packed here, in gold-bits mode)."""
    bits = None
    if sink.gold_bits:
        layer = getattr(module, "sparsefinder_layer", len(sink.records))
        window = sink.window(layer)
        # Packed on the probabilities' device; only H n² / 8 bytes per sentence move to the host.
        bits = [sentence_bits(probs[b], n, sink.causal, window).cpu() for b, n in enumerate(sink.lengths)]
    blocks = None
    if sink.blocks_max_side:
        blocks = [head_blocks(probs[b, :, :n, :n], block_side(n, sink.blocks_max_side))
                  for b, n in enumerate(sink.lengths)]
    # Not probs[:0]: a view, even an empty one, keeps the whole (B, H, N, N) storage alive.
    kept = probs if sink.keep_probs else probs.new_empty((0, *probs.shape[1:]))
    mask = None if attention_mask is None else attention_mask.detach()
    settings = dict(scaling=float(scaling), softcap=float(softcap) if softcap else None, alpha=module_alpha(module),
                    gold_bits=bits, blocks=blocks)
    if sink.detach:
        keep_values = sink.keep_probs or sink.gold_bits
        sink.records.append(AttentionRecord(query.detach(), key.detach(), kept.detach(), groups, mask,
                                            value.detach() if keep_values else None, **settings))
    else:
        sink.records.append(AttentionRecord(query, key, kept, groups, mask, **settings))


_registered = False


def register() -> None:
    """Register the ``"entmax"`` attention and mask functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    AttentionInterface.register(ATTN_IMPLEMENTATION, entmax_attention_forward)
    # Without the mask function transformers builds no padding mask for an
    # unknown implementation, and padding would silently be attended to.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)
    _registered = True
