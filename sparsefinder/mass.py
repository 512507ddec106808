r"""What a predicted graph keeps of the gold attention: mass recall and output error (docs/method.md §2.2).

Edge recall counts gold edges; it does not say how much *attention* a prediction
keeps, nor what a sparse kernel computing attention over the predicted pairs only
would change. For one sentence and head, with gold probabilities :math:`p_{ij}`
(zero outside the gold graph :math:`G`), valid pairs :math:`V`, real queries
:math:`Q` and predicted pairs :math:`\hat G`:

.. math::
    \mathrm{mass\_recall} = \frac{\sum_{(i,j) \in \hat G} p_{ij}}{\sum_{(i,j) \in V} p_{ij}}
    = \frac{1}{|Q|} \sum_{i \in Q} \sum_{j \in \hat G_i} p_{ij},

since every real row sums to one. It is 1 exactly when :math:`G \subseteq \hat G`,
and it weighs a missed edge by its probability, so missing a key with
:math:`p_{ij} = 10^{-4}` costs almost nothing while missing the head's dominant key
costs most of a row. (Long-context sparse-attention work calls the same quantity
*attention recall*.)

The **output error** compares the head's dense output :math:`O = P V` with the
output of entmax restricted to the predicted pairs, :math:`\tilde O = \tilde P V`,
where :math:`\tilde p_{i\cdot} = \mathrm{entmax}_\alpha(s_{i\cdot})` over
:math:`\hat G_i` only (scores elsewhere masked out); a query with no predicted key
outputs zero, as a sparse kernel would:

.. math::
    \mathrm{output\_error} = \frac{\lVert \tilde O - O \rVert_F}{\lVert O \rVert_F}
    \quad \text{(over the real queries).}

Because entmax's threshold over a superset of the support is the threshold over
all keys, :math:`G \subseteq \hat G` gives :math:`\tilde P = P` and an error of 0
(up to rounding); dropping gold keys renormalises each row over what is left.

Everything here is computed in float64 with the ``entmax`` package's sorting
``entmax15`` (bisection for other alpha): the numbers then do not depend on how
sentences were padded into batches, nor on the CPU's vector width, to ~1e-15.
The scores are recomputed from the captured queries and keys as the
model's attention computed them (:func:`attention_scores`: the model's scaling,
Gemma-2's soft-capping, the layer's valid pairs), so the same code serves a live
extraction (which also captures ``v``) and a stored corpus (queries and keys only:
mass recall, no output error).
"""

from __future__ import annotations

import torch
from entmax import entmax15, entmax_bisect

from sparsefinder.graphs import real_tokens, valid_pair_mask
from sparsefinder.kernels.entmax import Alpha, check_alpha


def attention_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    causal: bool,
    window: int | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    r"""``(B, H, N, N)`` float64 scores :math:`s_{ij}` of a layer, the pairs its mask forbids at the dtype's minimum.

    ``queries``/``keys`` are ``(B, H, N, d)`` per query head (as captured);
    ``scaling`` defaults to :math:`d^{-1/2}`; ``softcap`` applies
    :math:`c \tanh(s / c)` before the mask, as the attention function does. The
    minimum is finite, so a row without any allowed pair still goes through entmax
    (its probabilities are then zeroed by :func:`gold_probabilities`).
    """
    if scaling is None:
        scaling = queries.shape[-1] ** -0.5
    scores = torch.matmul(queries.double(), keys.double().transpose(-1, -2)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    valid = valid_pair_mask(lengths.to(scores.device), scores.shape[-1], causal, window)
    return scores.masked_fill(~valid, torch.finfo(scores.dtype).min)


def layer_alpha(alpha: Alpha | list, heads: int) -> Alpha:
    """One layer's alpha as :func:`entmax64` takes it: a float, or ``(1, H, 1, 1)``.

    ``alpha`` is a float, a per-head sequence or tensor of length ``heads``.
    """
    check_alpha(alpha)
    if isinstance(alpha, int | float):
        return float(alpha)
    values = torch.as_tensor(alpha, dtype=torch.float64).flatten()
    if values.numel() == 1:
        return float(values)
    if values.numel() != heads:
        raise ValueError(f"alpha has {values.numel()} values for a layer of {heads} heads")
    return values.view(1, heads, 1, 1)


def entmax64(scores: torch.Tensor, alpha: Alpha = 1.5) -> torch.Tensor:
    """alpha-entmax over the last dim in float64: sorting ``entmax15`` for 1.5, softmax for 1, else bisection.

    The sort makes a row's result independent of trailing masked entries (padding), bit for bit.
    """
    scores = scores.double()
    if isinstance(alpha, float) and alpha == 1.5:
        return entmax15(scores, dim=-1)
    if isinstance(alpha, float) and alpha == 1.0:
        return torch.softmax(scores, dim=-1)
    a = torch.as_tensor(alpha, dtype=torch.float64, device=scores.device)
    if bool((a <= 1).any()):
        raise ValueError("a per-head alpha must be > 1 for every head (1 is softmax)")
    return entmax_bisect(scores, alpha=a.expand(*scores.shape[:-1], 1), dim=-1, n_iter=60)


def _restricted(scores: torch.Tensor, keep: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    """entmax over the kept pairs only; rows without a kept pair are all zero."""
    probs = entmax64(scores.masked_fill(~keep, torch.finfo(scores.dtype).min), alpha)
    # where, not a product: bisection over a row of equal minima may give NaN, and NaN * 0 is NaN.
    return torch.where(keep.any(dim=-1, keepdim=True), probs, 0.0)


def gold_probabilities(scores: torch.Tensor, lengths: torch.Tensor, causal: bool, window: int | None,
                       alpha: Alpha) -> torch.Tensor:
    """``(B, H, N, N)`` float64 entmax probabilities of :func:`attention_scores`, zero outside the valid pairs."""
    valid = valid_pair_mask(lengths.to(scores.device), scores.shape[-1], causal, window)
    return _restricted(scores, valid.expand_as(scores), alpha)


def support_probabilities(scores: torch.Tensor, support: torch.Tensor, alpha: Alpha) -> tuple[torch.Tensor, int]:
    r"""``(B, H, N, N)`` float64 entmax probabilities of a layer whose support is known, and the disagreements.

    For :math:`\alpha = 1.5`, with :math:`z = (s - \max_S s)/2` and the row's support :math:`S` given
    (a stored gold graph), the threshold solves :math:`\sum_{j \in S} (z_j - \tau)^2 = 1` in closed form,

    .. math:: \tau = \frac{s_1 - \sqrt{s_1^2 - c\,(s_2 - 1)}}{c}, \qquad
              c = |S|,\; s_1 = \sum_S z_j,\; s_2 = \sum_S z_j^2,

    and :math:`p_j = [z_j - \tau]_+^2` on :math:`S`: a few elementwise passes, no sort, and only sums
    along each row (so the result does not depend on how rows were padded). The second value counts
    the valid pairs where :math:`z_j > \tau` disagrees with :math:`j \in S`: 0 when ``support`` is the
    support of these scores (ties at the threshold aside). Other alpha: bisection over the valid pairs
    (:func:`gold_probabilities`), then zero off ``support``.
    """
    valid = scores > torch.finfo(scores.dtype).min  # attention_scores puts the forbidden pairs at the minimum
    support = support.to(scores.device) & valid
    if not (isinstance(alpha, float) and alpha == 1.5):
        probs = _restricted(scores, valid, alpha)
        return probs * support, int(((probs > 0) != support).sum())
    neg = torch.finfo(scores.dtype).min
    top = scores.masked_fill(~support, neg).amax(dim=-1, keepdim=True)
    z = ((scores - top) / 2).masked_fill(~valid, neg)
    zs = torch.where(support, z, 0.0)
    c = support.sum(dim=-1, keepdim=True, dtype=torch.float64)
    s1, s2 = zs.sum(dim=-1, keepdim=True), zs.square().sum(dim=-1, keepdim=True)
    tau = (s1 - (s1.square() - c * (s2 - 1)).clamp(min=0).sqrt()) / c.clamp(min=1)
    probs = torch.where(support, (z - tau).clamp(min=0).square(), 0.0)
    mismatched = int(((z > tau) != support)[valid].sum())
    return probs, mismatched


def mass_counts(probs: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gold_mass, mass_hits)``, each ``(B, H)`` float64: the probability on the valid pairs, and on ``edges``.

    ``probs`` is zero outside the valid pairs, so ``gold_mass`` is the number of real
    queries up to rounding; ``edges`` is ``(B, H|1, N, N)`` bool.
    """
    p = probs.double()
    return p.sum(dim=(-1, -2)), (p * edges.to(p.device)).sum(dim=(-1, -2))


def output_error(
    scores: torch.Tensor,
    values: torch.Tensor,
    edges: torch.Tensor,
    lengths: torch.Tensor,
    causal: bool,
    window: int | None,
    alpha: Alpha,
) -> torch.Tensor:
    r"""``(B, H)`` float64 relative L2 error :math:`\lVert \tilde O - O \rVert_F / \lVert O \rVert_F` (see above).

    ``scores`` from :func:`attention_scores`; ``values`` ``(B, H, N, d_v)`` per query
    head; ``edges`` the predicted graph ``(B, H|1, N, N)`` (pairs outside the layer's
    mask are ignored). NaN for a sentence without real tokens; 0 when both outputs
    are zero.
    """
    valid = valid_pair_mask(lengths.to(scores.device), scores.shape[-1], causal, window).expand_as(scores)
    v = values.double().to(scores.device)
    dense = torch.matmul(_restricted(scores, valid, alpha), v)
    approx = torch.matmul(_restricted(scores, valid & edges.to(scores.device), alpha), v)
    real = real_tokens(lengths.to(scores.device), scores.shape[-1])[:, None, :, None]
    diff = ((approx - dense) * real).square().sum(dim=(-1, -2)).sqrt()
    norm = (dense * real).square().sum(dim=(-1, -2)).sqrt()
    err = torch.where(norm > 0, diff / norm.clamp(min=torch.finfo(torch.float64).tiny),
                      torch.where(diff > 0, float("inf"), 0.0))
    return err.masked_fill((lengths.to(err.device) == 0)[:, None], float("nan"))
