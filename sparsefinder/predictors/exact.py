r"""``exact_bounds``: the gold graph itself, found by scoring only the key blocks that could hold support keys.

:math:`\hat G` is the support of dense alpha-entmax attention (docs/method.md §1), computed by
:func:`sparsefinder.kernels.exact_bounds.exact_sparse_entmax_attention`: seed candidates
(a window and the first/last key), block bounds on the scores, and the threshold's lower
bound (docs/method.md §8). Recall is 1 by construction (up to float rounding of the gold
graph's own scores); the method's *cost* is the number of valid (query, key) pairs the kernel
actually scored, which is where the bounds pay off or do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from sparsefinder.kernels.exact_bounds import DEFAULT_BLOCK_SIZE, exact_sparse_entmax_attention
from sparsefinder.predictors.base import CoreResult, Predictor, register
from sparsefinder.predictors.constraints import Bool, Constraint, Int, Real


@register
class ExactBoundsPredictor(Predictor):
    r"""The exact entmax support, :math:`\hat G = \{(i, j) : p_{ij} > 0\}`, at the cost of the pairs scored.

    ``q``, ``k`` are the raw queries and keys (``input_space = "raw"``: as the attention
    function receives them, never the projections), scores
    :math:`s_{ij} = \gamma\, q_i \cdot k_j` with :math:`\gamma` = ``scaling`` (default
    :math:`d^{-1/2}`, :math:`d` = the last dim of ``q``), thresholded by ``alpha``-entmax over the
    valid keys of the row (real keys; :math:`j \le i` when causal). Computed in float64, so
    the graph does not depend on the batch layout.

    ``seed_window`` and ``seed_global`` choose the kernel's seed candidates and ``block_size``
    its key blocks: they change the cost, never the graph (``window``/``global_tokens`` are the
    shared OR-ed patterns, as for every method). Cost per (sentence, head): the distinct valid
    pairs scored (:attr:`ExactAttention.pairs_scored
    <sparsefinder.kernels.exact_bounds.ExactAttention.pairs_scored>`); the bound evaluations
    (:math:`n^2/`\ ``block_size`` dot products with block centres) are not pairs and not counted.
    """

    name: ClassVar[str] = "exact_bounds"
    family: ClassVar[str] = "exact"
    input_space: ClassVar[str] = "raw"
    default_sweep: ClassVar[bool] = False
    """Opt-in (``--methods exact_bounds``): the kernel iterates per (sentence, head), ~40 ms each on short
    sentences here, which would add most of an hour to a 500-sentence sweep of 72 heads, for a method whose
    recall is known to be 1."""
    param_grid: ClassVar[dict[str, Sequence[Any]]] = {"block_size": (8, 32)}
    """Two key-block sizes: smaller blocks have tighter bounds but cost more bound evaluations."""
    constraints: ClassVar[dict[str, Constraint]] = {
        "alpha": Real(1, 1e6, low_open=True, finite=True, text="be a finite number > 1"),
        "scaling": Real(0, low_open=True, finite=True, text="be a positive number or None"),
        "seed_window": Int(0), "seed_global": Bool(), "block_size": Int(1),
    }

    def __init__(self, alpha: float = 1.5, scaling: float | None = None, seed_window: int = 3,
                 seed_global: bool = True, block_size: int = DEFAULT_BLOCK_SIZE, window: int = 0,
                 global_tokens: bool = False) -> None:
        self._init_params(locals())

    def _check_params(self) -> None:
        scaling = self.scaling
        if scaling is None:  # Real does not take None; check the rest with a stand-in
            self.scaling = 1.0
        try:
            super()._check_params()
        finally:
            self.scaling = scaling

    def _core(self, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, causal: bool) -> CoreResult:
        batch, heads, n, d = q.shape
        edges = torch.zeros(batch, heads, n, n, dtype=torch.bool, device=q.device)
        cost = torch.zeros(batch, heads, dtype=torch.float64)
        scaling = d**-0.5 if self.scaling is None else float(self.scaling)
        for b in range(batch):
            m = int(lengths[b])
            if m == 0:
                continue
            qb, kb = q[b : b + 1, :, :m].double(), k[b : b + 1, :, :m].double()
            res = exact_sparse_entmax_attention(
                qb, kb, torch.zeros(1, heads, m, 1, dtype=torch.float64), alpha=float(self.alpha), scaling=scaling,
                window=self.seed_window, global_keys=self.seed_global, causal=causal, block_size=self.block_size)
            ix = res.support.indices()
            edges[b, ix[1], ix[2], ix[3]] = True
            cost[b] = res.pairs_scored[0].double()
        return edges, lambda: cost
