r"""The sweep engine: every predictor over its grid, every layer and head, on a stored corpus split.

:func:`run_sweep` streams an :class:`~sparsefinder.corpora.store.ExtractionStore` one
padded batch of sentences (with all its layers) at a time, so memory holds one
batch, never the corpus, and scores every configuration (method × grid point) against the gold entmax
graph with the metrics of :mod:`sparsefinder.metrics` (docs/method.md §2). The result is
a tidy :class:`pandas.DataFrame` (:data:`SWEEP_COLUMNS`), one row per
(method, params, layer, head):

- ``recall``, ``precision``, ``sparsity``, ``gold_sparsity``, ``exact``,
  ``efficiency``: the *macro* means over sentences (per sentence first, then
  the mean over the ``sentences`` sentences that have at least one valid pair),
  exactly as :func:`sparsefinder.metrics.aggregate` computes them;
- ``gold_edges``, ``pred_edges``, ``hits``, ``valid_pairs``, ``valid_queries``,
  ``covered_queries``, ``cost``: the sums over sentences, so micro averages
  can be recomputed;
- ``params`` is the grid point as canonical JSON (:func:`canonical_params`);
  the full hyperparameters of each configuration are in ``frame.attrs["sweep"]``.

With ``per_sentence=True`` the same engine returns one row per
(method, params, sentence, layer, head) instead, in the layout of
:func:`sparsefinder.metrics.per_sentence_frame` (``method``, ``family`` and
``params`` are its setting columns, so ``metrics.aggregate`` reproduces the
aggregated table). Any per-sentence row is thus reproducible from the
aggregated table by rerunning one configuration on the sentences wanted
(``methods=[m], grids={m: [params]}, layers=[l], indices=[...]``).

Speed comes from sharing work across the grid; nothing loops over heads, and
metrics are batched tensor counts (``hits = (gold & pred).sum``):

- the projections are applied once per batch and layer, for every method;
- *nested* families, where a larger grid value only adds edges, are scored
  for the whole grid in one pass: each pair gets the first grid index at which
  it becomes an edge (its *level*) and the counts of every grid point are
  cumulative histograms of the levels (``bincount``). This covers distance
  (squared distances computed once; level = number of thresholds below the
  distance), window and position, Longformer (number of global tokens), BigBird
  (number of random keys: one seeded draw and one sort per batch), random
  (matched sparsity) and blocks (``top_k``);
- bucketing ranks the tokens of every projected dimension once per batch; a
  grid point's bins are then ``rank // ⌈n/β⌉``;
- k-means computes the distances to the centroids once per fitted set of
  centroids (shared by its ``top_t`` values);
- the grouping methods (bucketing, k-means, Reformer, Routing) pack each
  token's groups into integer bit codes, so "shares a group" is one broadcast
  AND per 31 groups instead of the predictors' matmul over the groups, and
  their grouped cost comes from group sizes;
- the learned budget predictors (distance_budget, topk, stacked, priors,
  cascade, global_band) score the pairs once per batch and layer for every
  target sparsity (it only moves the per-head thresholds): per head the grid is
  a nested family in decreasing threshold order, scored like the others
  (:mod:`~sparsefinder.evaluation.sweep.learned`);
- pages shares per page size the page statistics, bounds and seed-set
  thresholds of every slack and sparsity, and counts from sums over
  (query, page) pairs without building the graphs
  (:mod:`~sparsefinder.evaluation.sweep.pages`);
- random draws (BigBird, random) and fixed patterns do not depend on the
  layer: batches hold every layer, and these are computed once per batch;
- strided scores its fixed pattern once for all heads;
- everything else (syntax, lexical, …) calls the predictor's own
  batched :meth:`~sparsefinder.predictors.base.Predictor.predict_with_cost`
  over the whole padded batch.

Levels and masks use ``uint8`` arithmetic rather than ``torch.where`` and bool
sums go through ``uint8`` views: on CPU both are many times faster.

Every fast path gives exactly the numbers of ``predictor.predict`` followed by
:func:`~sparsefinder.metrics.graph_metrics` (tests/test_sweep.py checks it).

Which methods run by default (``methods=None``): every registered predictor
whose inputs are available, except the opt-in ones (``default_sweep = False``).
Methods on the ``"projected"`` space need ``projections``; methods with ``input_space = "any"`` (Reformer, Routing) get
the projected vectors when there are projections and the raw ones otherwise;
methods that learn (k-means, blocks, Routing) need their fitted instances in
``fitted`` (from :func:`fit_predictors`, on a *training* store); syntax and
lexical need context the store does not hold (dependency heads; the model's
input embeddings) and run only when a ``context`` provider declares those keys
(see :class:`EmbeddingContext` for lexical). Skipped methods and the reason
are recorded in ``frame.attrs["sweep"]["skipped"]``; a method asked for
explicitly that cannot run is an error.

Stochastic predictors get ``seed`` (unless the grid point sets one) and the
store's sentence indices as ``sentence_ids``, so each sentence draws its own
random pattern, the same in any batch: the same seed gives the same table.

:func:`save_sweep` / :func:`load_sweep` store the table as Parquet plus a JSON
sidecar with its provenance. :func:`pareto_front`, :func:`best_recall_at` and
:func:`best_recall_table` summarise it (recall against sparsity, per head, per
layer or overall).
"""

from sparsefinder.corpora.context import ContextProvider, EmbeddingContext
from sparsefinder.evaluation.sweep.configs import (
    OPTIONAL_CONTEXT,
    SENTENCE_COLUMNS,
    SUPPLIED_CONTEXT,
    SWEEP_COLUMNS,
    SWEEP_FORMAT,
    SWEEP_FORMAT_VERSION,
    canonical_params,
    default_grids,
)
from sparsefinder.evaluation.sweep.fit import FittedPredictors, fit_predictors
from sparsefinder.evaluation.sweep.run import run_sweep
from sparsefinder.evaluation.sweep.table import load_sweep, save_sweep

__all__ = [
    "OPTIONAL_CONTEXT",
    "SENTENCE_COLUMNS",
    "SUPPLIED_CONTEXT",
    "SWEEP_COLUMNS",
    "SWEEP_FORMAT",
    "SWEEP_FORMAT_VERSION",
    "ContextProvider",
    "EmbeddingContext",
    "FittedPredictors",
    "canonical_params",
    "default_grids",
    "fit_predictors",
    "load_sweep",
    "run_sweep",
    "save_sweep",
]
