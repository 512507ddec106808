r"""Fixed attention masks of Breaking BERT (Brahma et al. 2022): syntax, lexical, position, random.

These patterns ignore the values of ``q`` and ``k`` (only their shape gives
``B``, ``H``, ``N``) and are the same for every head, except :class:`RandomPredictor`
which draws each head separately. What they need comes as context:

- :class:`SyntaxPredictor`: ``word_heads`` (dependency heads) and ``word_ids``
  (token → word map);
- :class:`LexicalPredictor`: ``embeddings`` (the model's input embedding of each token);
- :class:`RandomPredictor`: optionally ``match`` (edge counts to match) and ``sentence_ids``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from sparsefinder.graphs import AttentionGraph, num_valid_pairs, valid_pair_mask
from sparsefinder.predictors.base import (
    BandPredictor,
    CoreResult,
    Predictor,
    check_sentence_ids,
    register,
    sentence_rng,
)
from sparsefinder.predictors.constraints import Constraint, Int, Real

SIMILARITY_DECIMALS = 9
"""Lexical similarities are rounded to this many decimals before ranking."""

SPARSITY_GRID: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
"""Target sparsities of the lexical and random masks (Breaking BERT studies masks of ≥ 78 % sparsity)."""


SPARSITY = Real(0.0, 1.0, text="lie in [0, 1]")
"""The constraint on the target sparsity of the lexical and random masks."""


def edge_budget(lengths: torch.Tensor, sparsity: float, causal: bool) -> torch.Tensor:
    r"""``(B,)`` edges to keep for a target sparsity: :math:`\operatorname{round}((1 - s)\,|V_b|)` (half to even)."""
    pairs = num_valid_pairs(lengths, causal).tolist()
    return torch.tensor([round((1.0 - sparsity) * v) for v in pairs], dtype=torch.long, device=lengths.device)


# ---------------------------------------------------------------------- syntax


def tree_hops(word_heads: Sequence[int], hops: int) -> np.ndarray:
    r"""``(W, W)`` bool: words at most ``hops`` edges apart in the (undirected) dependency tree.

    ``word_heads[w]`` is the 0-based index of the head of word ``w``; a root has
    ``-1`` or its own index (spaCy's convention). Several roots (a forest, e.g.
    several sentences) are allowed: words of different trees are never linked.
    """
    w = len(word_heads)
    adj = np.zeros((w, w), dtype=bool)
    for child, head in enumerate(word_heads):
        head = int(head)
        if head < -1 or head >= w:
            raise ValueError(f"word {child} has head {head}, outside [-1, {w})")
        if head >= 0 and head != child:
            adj[child, head] = adj[head, child] = True
    reach = np.eye(w, dtype=bool)
    step = adj.astype(np.int64)
    for _ in range(hops):
        grown = reach | ((reach.astype(np.int64) @ step) > 0)
        if (grown == reach).all():
            break
        reach = grown
    return reach


@register
class SyntaxPredictor(Predictor):
    r"""Dependency-tree mask: tokens whose words are at most ``hops`` tree edges apart, plus self loops.

    With :math:`w(i)` the word of token ``i`` and :math:`\mathrm{dist}` the hop
    distance in the undirected dependency tree (:func:`tree_hops`):

    .. math:: \hat G = \{(i, j) : \mathrm{dist}(w(i), w(j)) \le k\} \cup \{(i, i)\},

    symmetric by construction; subword tokens of one word (distance 0) are all
    linked. Context: ``word_heads[b]`` the 0-based head word of each word of
    sentence ``b`` (root: ``-1`` or itself; CoNLL-U's 1-based ``HEAD`` with 0 =
    root becomes ``HEAD - 1``), and ``word_ids[b]`` the word of each token (length
    ``n_b`` or ``N``; ``None`` for special tokens). Special tokens belong to no
    word and get only their self loop; set ``global_tokens=True`` to connect
    the first and last token (e.g. ``[CLS]``/``[SEP]``) to everything.
    """

    name: ClassVar[str] = "syntax"
    family: ClassVar[str] = "pattern"
    context_keys: ClassVar[tuple[str, ...]] = ("word_heads", "word_ids")

    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"hops": (1, 2, 3)}
    """``hops`` ∈ {1, 2, 3}."""
    constraints: ClassVar[dict[str, Constraint]] = {"hops": Int(0)}

    def __init__(self, hops: int = 1, window: int = 0, global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _core(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool,
              word_heads: Sequence[Sequence[int]] | None = None,
              word_ids: Sequence[Sequence[int | None]] | None = None) -> CoreResult:
        batch, _, n = q.shape[:3]
        if word_heads is None or word_ids is None:
            raise ValueError("syntax needs the context word_heads and word_ids (one list per sentence)")
        if len(word_heads) != batch or len(word_ids) != batch:
            raise ValueError(f"word_heads and word_ids need {batch} sentences each")
        edges = torch.zeros(batch, 1, n, n, dtype=torch.bool)
        for b in range(batch):
            nb = int(lengths[b])
            ids = list(word_ids[b])
            if len(ids) not in (nb, n):
                raise ValueError(f"sentence {b}: word_ids has {len(ids)} entries for {nb} tokens")
            reach = tree_hops(word_heads[b], self.hops)
            tok = np.array([-1 if w is None else int(w) for w in ids[:nb]], dtype=np.int64)
            if tok.size and (tok.max() >= len(reach) or tok.min() < -1):
                raise ValueError(f"sentence {b}: a word id lies outside its {len(reach)} words")
            has_word = tok >= 0
            sub = np.zeros((nb, nb), dtype=bool)
            if has_word.any():
                idx = np.where(has_word)[0]
                sub[np.ix_(idx, idx)] = reach[np.ix_(tok[idx], tok[idx])]
            np.fill_diagonal(sub, True)
            edges[b, 0, :nb, :nb] = torch.from_numpy(sub)
        return edges.to(q.device), None


# ---------------------------------------------------------------------- lexical


def _embedding_batch(embeddings: Any, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, N, e)`` float64 from a padded tensor or a list of ``(n_b, e)`` tensors."""
    if isinstance(embeddings, torch.Tensor) and embeddings.dim() == 3:
        if embeddings.shape[:2] != (lengths.shape[0], n):
            raise ValueError(f"embeddings must be (B, N, e) = ({lengths.shape[0]}, {n}, e), "
                             f"got {tuple(embeddings.shape)}")
        return embeddings.detach().double().cpu()
    rows = list(embeddings)
    if len(rows) != lengths.shape[0]:
        raise ValueError(f"embeddings need one entry per sentence ({lengths.shape[0]}), got {len(rows)}")
    dim = int(torch.as_tensor(rows[0]).shape[-1]) if rows else 0
    out = torch.zeros(len(rows), n, dim, dtype=torch.float64)
    for b, row in enumerate(rows):
        row = torch.as_tensor(row).double()
        nb = int(lengths[b])
        if row.shape[0] < nb:
            raise ValueError(f"sentence {b}: {row.shape[0]} embeddings for {nb} tokens")
        out[b, :nb] = row[:nb].cpu()
    return out


@register
class LexicalPredictor(Predictor):
    r"""Lexical-similarity mask: the most similar token pairs by input embedding, at a target sparsity.

    With :math:`e_i` the model's input (token) embedding of token ``i`` (context
    ``embeddings``: ``(B, N, e)`` or one ``(n_b, e)`` per sentence; position
    embeddings are better left out, or neighbours would dominate), pairs are
    ranked by cosine similarity :math:`\cos(e_i, e_j)` (a zero vector has
    similarity 0; rounded to :data:`SIMILARITY_DECIMALS` decimals so that rounding
    noise cannot order pairs that are equal, such as a repeated token's), ties
    broken by row-major position, and the top

    .. math:: m_b = \operatorname{round}((1 - s)\,|V_b|)

    valid pairs are kept (:func:`edge_budget`), so the mask's sparsity is ``s`` up
    to rounding (before any window or global tokens are added). The same mask
    for every head. Self pairs have similarity 1, so they come first unless
    the budget is smaller than ``n``.
    """

    name: ClassVar[str] = "lexical"
    family: ClassVar[str] = "pattern"
    context_keys: ClassVar[tuple[str, ...]] = ("embeddings",)

    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"sparsity": SPARSITY_GRID}
    """Target sparsity ∈ {0.5, 0.6, 0.7, 0.8, 0.9}."""
    constraints: ClassVar[dict[str, Constraint]] = {"sparsity": SPARSITY}

    def __init__(self, sparsity: float = 0.8, window: int = 0, global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _core(
        self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool, embeddings: Any = None
    ) -> CoreResult:
        batch, _, n = q.shape[:3]
        if embeddings is None:
            raise ValueError("lexical needs the context embeddings (the model's input embedding of each token)")
        emb = _embedding_batch(embeddings, lengths.cpu(), n)
        unit = emb / emb.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        # Rounded so that floating-point noise never orders pairs that are equal in
        # exact arithmetic (a repeated token, self pairs); exact ties go by position.
        sim = torch.round(unit @ unit.transpose(-1, -2), decimals=SIMILARITY_DECIMALS)  # (B, N, N)
        valid = valid_pair_mask(lengths.cpu(), n, causal)[:, 0]
        score = torch.where(valid, -sim, torch.tensor(float("inf"), dtype=sim.dtype)).reshape(batch, n * n)
        order = torch.argsort(score, dim=-1, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(n * n).expand_as(order))
        keep = ranks < edge_budget(lengths.cpu(), self.sparsity, causal)[:, None]
        return (keep.reshape(batch, 1, n, n) & valid[:, None]).to(q.device), None


# ---------------------------------------------------------------------- position


@register
class PositionPredictor(BandPredictor):
    r"""Breaking BERT's position mask: neighbours within a window, :math:`|i - j| \le \lfloor w/2 \rfloor`.

    The same graph as :class:`~sparsefinder.predictors.baselines.WindowPredictor`,
    listed with the masks; its grid drops the empty ``w = 0``.
    """

    name: ClassVar[str] = "position"
    family: ClassVar[str] = "pattern"
    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"window": [w for w in BandPredictor.param_grid["window"] if w]}
    """:math:`w \\in \\{1, 3, \\ldots, 27\\}`."""


# ---------------------------------------------------------------------- random


@register
class RandomPredictor(Predictor):
    r"""Uniformly random edges at a matched sparsity.

    Each (sentence, head) gets a uniformly random set of exactly :math:`m_{b,h}`
    valid pairs (without replacement), where :math:`m_{b,h}` is

    - the edge count of the context ``match`` (another graph of the same batch,
      e.g. the gold graph or a method's prediction, or a ``(B, H)`` tensor of
      counts), when given: the same per-head sparsity as that graph;
    - otherwise :math:`\operatorname{round}((1 - s)|V_b|)` for ``sparsity`` = s.

    Randomness: per sentence ``default_rng([seed, n])`` (``[seed, n, id]`` with
    the context ``sentence_ids``) draws ``(H, n, n)`` uniforms; the
    :math:`m_{b,h}` valid pairs of lowest value are kept, so a sentence gets
    the same edges alone or in any padded batch.
    """

    name: ClassVar[str] = "random"
    family: ClassVar[str] = "pattern"
    stochastic: ClassVar[bool] = True
    context_keys: ClassVar[tuple[str, ...]] = ("match", "sentence_ids")

    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"sparsity": SPARSITY_GRID}
    """Target sparsity ∈ {0.5, 0.6, 0.7, 0.8, 0.9}."""
    constraints: ClassVar[dict[str, Constraint]] = {"sparsity": SPARSITY, "seed": Int(0)}

    def __init__(self, sparsity: float = 0.8, seed: int = 0, window: int = 0, global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _budget(self, match: Any, lengths: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
        batch = lengths.shape[0]
        if match is None:
            return edge_budget(lengths, self.sparsity, causal)[:, None].expand(batch, heads)
        if isinstance(match, AttentionGraph):
            if not torch.equal(match.lengths.cpu().long(), lengths.cpu()) or match.causal != causal:
                raise ValueError("match is a graph over different sentences (lengths or causal flag differ)")
            match = match.num_edges()
        counts = torch.as_tensor(match).long().cpu()
        try:
            counts = torch.broadcast_to(counts, (batch, heads))
        except RuntimeError as err:
            raise ValueError(f"match counts must broadcast to (B, H) = ({batch}, {heads})") from err
        return counts

    def _core(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool, match: Any = None,
              sentence_ids: Any = None) -> CoreResult:
        batch, heads, n = q.shape[:3]
        ids = check_sentence_ids(sentence_ids, batch)
        lengths_cpu = lengths.cpu()
        budget = self._budget(match, lengths_cpu, heads, causal)
        pairs = num_valid_pairs(lengths_cpu, causal)
        if bool((budget > pairs[:, None]).any()) or bool((budget < 0).any()):
            raise ValueError("a matched edge count exceeds the sentence's valid pairs")
        edges = torch.zeros(batch, heads, n, n, dtype=torch.bool)
        for b in range(batch):
            nb = int(lengths_cpu[b])
            if nb == 0:
                continue
            u = torch.from_numpy(sentence_rng(self.seed, b, nb, ids).random((heads, nb, nb)))
            if causal:
                u = u.masked_fill(~torch.ones(nb, nb, dtype=torch.bool).tril(), math.inf)
            order = torch.argsort(u.reshape(heads, nb * nb), dim=-1, stable=True)
            ranks = torch.empty_like(order)
            ranks.scatter_(-1, order, torch.arange(nb * nb).expand_as(order))
            edges[b, :, :nb, :nb] = (ranks < budget[b][:, None]).reshape(heads, nb, nb)
        return edges.to(q.device), None
