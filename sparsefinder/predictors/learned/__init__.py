r"""Learned predictors with per-head budgets: beyond the paper's one-threshold-for-all recipe (issue #7).

Every predictor here *scores* each valid pair :math:`(i, j)` of a head
(higher: more likely a gold edge) and keeps, in head :math:`h`, the pairs with
:math:`z_{ij} \ge t_h`. The thresholds come from the training split:

- ``fit`` computes the scores of the training sentences and, per head, the
  recall–density curve (:class:`sparsefinder.predictors.learned.calibration.HeadCurve`); it stores
  the score quantile :math:`t_h(g)` and the training recall :math:`R_h(g)` at
  :data:`GRID_POINTS` densities :math:`g \in [0, 1]`;
- ``predict`` turns the target mean ``sparsity`` :math:`s` into per-head
  densities: ``budget="per_head"`` allocates them on the training curves
  (:func:`sparsefinder.predictors.learned.calibration.allocate_budgets`: mean density
  :math:`1 - s`, maximum summed recall), ``budget="uniform"`` gives every head
  :math:`1 - s`; then :math:`t_h = t_h(g_h)`.

So ``sparsity`` is a prediction-time knob: one fit serves the whole grid.

The scorers (all inputs ``(B, H, N, r)``; ``tokens`` is optional context, a
list of each sentence's token strings; without it every token counts as unseen):

- ``distance_budget``: :math:`z = -\|q'_i - k'_j\|^2` (the paper's distance
  predictor with calibrated per-head thresholds);
- ``topk``: per-query top-k nearest keys, :math:`z = -\mathrm{rank}_i(j) - \frac{D_{ij}}{1 + D_{ij}}`
  (the rank of key :math:`j` among query :math:`i`'s valid keys by distance;
  the second term only breaks ties between rows, so a threshold keeps the
  :math:`k` nearest keys of every query, and the :math:`(k+1)`-th of the rows
  where it is closest);
- ``priors``: a per-head logistic model over token-identity and relative-offset
  priors and position flags only (no projection; ``input_space = "shape"``);
- ``stacked``: a per-head logistic model over cheap pair features
  (:data:`STACKED_FEATURES`: projected distance, its value relative to the
  row's nearest key, its rank in the row, the squared norms of :math:`k'_j`
  and :math:`q'_i` (with the distance they give the dot product
  :math:`q'_i \cdot k'_j`), the priors, position flags, sentence length),
  fitted by Newton's method on the pointwise cross-entropy of a seeded sample
  of training pairs (a threshold per head ranks pairs across rows, which a
  pointwise loss calibrates directly);
- ``cascade``: sub-quadratic. The stacked model scored only on a bounded
  number of cheap candidates per query (a band of offsets, the sentence's
  global keys, at most ``max_cluster_keys`` keys of the key clusters the
  query's cluster attends to most): :meth:`Cascade.support` never touches
  all :math:`n^2` pairs;
- ``global_band``: sub-quadratic. Per head, *units* of edges that are cheap to
  enumerate: each relative offset :math:`o = j - i \in [-K, K]` (a diagonal),
  each *global key* rank :math:`c < C` (the key with the :math:`c`-th largest
  token prior of the sentence: [CLS], the full stop, ...), and the first and
  last key. The score of a pair is the best training precision of the units
  that contain it, :math:`z_{ij} = \max_{u \ni (i, j)} \mathrm{prec}_h(u)`, so
  thresholding keeps whole units in decreasing precision. A kernel enumerates
  :math:`O(n (|O_h| + |C_h|))` pairs per head (:meth:`GlobalBand.support`),
  never all :math:`n^2`.

Token priors: with :math:`c_h(t)` valid pairs whose key has token :math:`t` and
:math:`g_h(t)` of them gold, :math:`\mathrm{logit}\,\frac{g_h(t) + m p_h}{c_h(t) + m}`
(:math:`p_h` the head's gold density, :math:`m` = ``prior_strength``);
likewise per query token and per clipped offset. Tokens are keyed by a CRC-32
of their UTF-8 text, so the fitted state is tensors only (safetensors).

Modules: :mod:`.budgets` (the shared base, token priors, ``distance_budget``, ``topk``),
:mod:`.stacked` (``stacked``, ``priors``), :mod:`.cascade`, :mod:`.global_band`, :mod:`.mlp`
(``stacked_mlp``) and :mod:`.calibration` (recall at matched sparsity, budget allocation).
"""
