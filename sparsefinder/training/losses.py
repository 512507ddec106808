r"""The losses that train the projections (docs/method.md §3).

The per-query margin hinge, with negatives sampled only from non-gold real keys, and the listwise
cross-entropy over each gold row.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from sparsefinder.graphs import AttentionGraph, valid_query_mask

if TYPE_CHECKING:  # only attributes of the model are read; importing it would pull in transformers
    pass


DEFAULT_MARGIN = 1.0

# --------------------------------------------------------------------------- the loss


def sample_negatives(gold: AttentionGraph, generator: torch.Generator) -> torch.Tensor:
    r"""``(B, H, N, N)`` bool: for each real query, |P_i| keys drawn uniformly without replacement.

    The candidates of query :math:`i` are :math:`C_i = \{j \text{ valid} : j \notin P_i\}`
    (valid: a real key, and :math:`j \le i` when causal), and
    :math:`|N_i| = \min(|P_i|, |C_i|)`. Padding queries get none.

    Vectorised: every pair draws an i.i.d. uniform score, non-candidates score
    :math:`-\infty`, and each row keeps its :math:`|N_i|` highest scores; the
    top :math:`k` of i.i.d. uniforms is a uniformly random :math:`k`-subset.
    The scores are drawn on ``generator``'s device, so a CPU generator gives the
    same negatives whatever device the graph is on.
    """
    edges = gold.edges
    B, H, N, _ = edges.shape
    candidates = gold.valid_pairs() & ~edges  # AttentionGraph already dropped invalid edges
    k = torch.minimum(edges.sum(-1), candidates.sum(-1))  # (B, H, N); 0 on padding rows
    kmax = int(k.max()) if k.numel() else 0
    negatives = torch.zeros_like(edges)
    if kmax == 0:
        return negatives
    scores = torch.rand((B, H, N, N), generator=generator, device=generator.device).to(edges.device)
    scores = scores.masked_fill(~candidates, -math.inf)
    top = scores.topk(kmax, dim=-1).indices  # distinct keys per row
    keep = torch.arange(kmax, device=edges.device) < k[..., None]
    return negatives.scatter_(-1, top, keep)


def margin_loss(
    qp: torch.Tensor,
    kp: torch.Tensor,
    gold: AttentionGraph,
    generator: torch.Generator | None = None,
    margin: float = DEFAULT_MARGIN,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The margin loss of docs/method.md §3 over a padded batch of projected queries/keys ``(B, H, N, r)``.

    With :math:`D_{ij} = \|q'_i - k'_j\|^2`, gold keys :math:`P_i` and sampled
    negatives :math:`N_i` (:func:`sample_negatives`, or ``negatives`` if given),

    .. math::
        \ell_i = \max\Bigl(0,\ m + \sum_{j \in P_i} D_{ij} - \sum_{l \in N_i} D_{il}\Bigr),
        \qquad
        \mathcal{L} = \frac{1}{BH} \sum_{b, h} \frac{1}{n_b} \sum_{i < n_b,\ P_i \neq \emptyset} \ell_i .

    Padding queries contribute nothing; so do queries without any gold key
    (which entmax never produces: its support is never empty), whose hinge
    would be the constant :math:`m`.
    """
    if qp.shape != kp.shape or qp.dim() != 4:
        raise ValueError(f"qp and kp must both be (B, H, N, r), got {tuple(qp.shape)} and {tuple(kp.shape)}")
    if tuple(gold.edges.shape) != tuple(qp.shape[:3]) + (qp.shape[2],):
        raise ValueError(f"gold edges {tuple(gold.edges.shape)} do not match projected vectors {tuple(qp.shape)}")
    positives = gold.edges
    if negatives is None:
        if generator is None:
            raise ValueError("give a generator to sample negatives, or the negatives themselves")
        negatives = sample_negatives(gold, generator)
    elif negatives.shape != positives.shape:
        raise ValueError(f"negatives {tuple(negatives.shape)} must match gold {tuple(positives.shape)}")
    # Σ_j w_ij D_ij with w = +1 on positives, −1 on negatives, expanded as
    # (Σ_j w_ij)‖q_i‖² + Σ_j w_ij ‖k_j‖² − 2 q_i·(Σ_j w_ij k_j): one matmul, and no
    # (B, H, N, N, r) difference tensor, which would not fit for real batches.
    w = positives.to(qp.dtype) - negatives.to(qp.dtype)
    q2 = qp.pow(2).sum(-1)
    k2 = kp.pow(2).sum(-1)
    signed = w.sum(-1) * q2 + (w @ k2.unsqueeze(-1)).squeeze(-1) - 2 * (qp * (w @ kp)).sum(-1)
    hinge = torch.relu(margin + signed)
    counted = valid_query_mask(gold.lengths.to(qp.device), qp.shape[2]) & positives.any(-1)
    per_sentence_head = (hinge * counted).sum(-1) / gold.lengths.to(qp.device).clamp(min=1)[:, None].to(qp.dtype)
    return per_sentence_head.mean()


def listwise_loss(qp: torch.Tensor, kp: torch.Tensor, gold: AttentionGraph) -> torch.Tensor:
    r"""The listwise loss: cross-entropy of each query over its keys against its gold support.

    With :math:`D_{ij} = \|q'_i - k'_j\|^2`, valid keys :math:`V_i` and gold keys
    :math:`P_i \subseteq V_i`, the model's distribution over keys is
    :math:`\pi_{ij} = \exp(-D_{ij}) / \sum_{l \in V_i} \exp(-D_{il})` and the
    target is uniform on the gold support:

    .. math::
        \ell_i = -\frac{1}{|P_i|} \sum_{j \in P_i} \log \pi_{ij},
        \qquad
        \mathcal{L} = \frac{1}{BH} \sum_{b, h} \frac{1}{n_b} \sum_{i < n_b,\ P_i \neq \emptyset} \ell_i .

    Unlike the margin loss it needs no sampled negatives: every non-gold key
    pushes back in proportion to how close it is, so the distances of *all*
    keys are ranked. (Normalised as :func:`margin_loss`; padding and queries
    without gold keys contribute nothing.)
    """
    if qp.shape != kp.shape or qp.dim() != 4:
        raise ValueError(f"qp and kp must both be (B, H, N, r), got {tuple(qp.shape)} and {tuple(kp.shape)}")
    if tuple(gold.edges.shape) != tuple(qp.shape[:3]) + (qp.shape[2],):
        raise ValueError(f"gold edges {tuple(gold.edges.shape)} do not match projected vectors {tuple(qp.shape)}")
    lengths = gold.lengths.to(qp.device)
    valid = gold.valid_pairs().to(qp.device)
    positives = gold.edges.to(qp.device) & valid
    # D_ij expanded through one matmul (no (B, H, N, N, r) difference tensor).
    dist = qp.pow(2).sum(-1, keepdim=True) + kp.pow(2).sum(-1).unsqueeze(-2) - 2 * qp @ kp.transpose(-1, -2)
    logits = (-dist).masked_fill(~valid, -math.inf)
    # Rows without any valid key (padding queries) would be all -inf; give them a finite dummy row.
    logits = torch.where(valid.any(-1, keepdim=True), logits, torch.zeros_like(logits))
    logp = torch.log_softmax(logits, dim=-1)
    n_pos = positives.sum(-1)
    per_query = -(logp.masked_fill(~positives, 0.0)).sum(-1) / n_pos.clamp(min=1)
    counted = valid_query_mask(lengths, qp.shape[2]) & (n_pos > 0)
    per_sentence_head = (per_query * counted).sum(-1) / lengths.clamp(min=1)[:, None].to(qp.dtype)
    return per_sentence_head.mean()


LOSSES = ("margin", "listwise")
"""Projection training losses: the paper's :func:`margin_loss` and :func:`listwise_loss`."""
