"""Predicted attention graphs: the predictor protocol, its registry, and every method.

Importing this package registers every predictor, so :func:`list_predictors`
and :func:`get_predictor` see them all::

    from sparsefinder.predictors import get_predictor, list_predictors

    pred = get_predictor("bucketing", n_buckets=4)
    graph = pred.predict(q_proj, k_proj, lengths)          # AttentionGraph
    graph, cost = pred.predict_with_cost(q_proj, k_proj, lengths)

Modules: :mod:`.base` (protocol, registry, shared window/global helpers),
:mod:`.paper` (distance, bucketing, k-means, blocks), :mod:`.baselines`
(window, BigBird, Longformer, Reformer, Routing, strided), :mod:`.patterns`
(Breaking BERT's syntax, lexical, position, random), :mod:`.exact` (the exact support by block bounds),
:mod:`.pages` (page-level support estimates), :mod:`.learned`
(per-head budgets: calibrated distance, top-k, priors, stacked, cascade, global band, the MLP),
:mod:`.clustering` (batched seeded k-means and the projected-space distances), :mod:`.constraints`
(declared hyperparameter checks), :mod:`.methods` (which methods can run on given artifacts, parameter keys).
"""

# Import order is registration order, which every method list (CLI, app, sweep) shows: keep it by hand.
from sparsefinder.predictors import paper  # noqa: I001
from sparsefinder.predictors import baselines
from sparsefinder.predictors.learned import budgets, stacked, cascade, global_band, mlp
from sparsefinder.predictors import patterns
from sparsefinder.predictors import exact
from sparsefinder.predictors import pages
from sparsefinder.predictors.base import (
    REGISTRY,
    NotFittedError,
    Predictor,
    expand_methods,
    get_predictor,
    list_predictors,
    register,
)

__all__ = [
    "REGISTRY",
    "NotFittedError",
    "Predictor",
    "baselines",
    "expand_methods",
    "get_predictor",
    "budgets",
    "cascade",
    "exact",
    "global_band",
    "mlp",
    "pages",
    "stacked",
    "list_predictors",
    "patterns",
    "register",
    "paper",
]
