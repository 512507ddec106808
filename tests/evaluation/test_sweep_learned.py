"""The sweep's learned fast path (one score per batch, per-head nested thresholds) against predict + graph_metrics."""

from __future__ import annotations

import pytest
import torch

from sparsefinder.evaluation.sweep.batch import NESTED, _Batch
from sparsefinder.evaluation.sweep.configs import _Config, canonical_params
from sparsefinder.evaluation.sweep.plan import _plan
from sparsefinder.graphs import AttentionGraph, valid_pair_mask
from sparsefinder.metrics import graph_metrics
from sparsefinder.predictors import REGISTRY, get_predictor
from sparsefinder.predictors.learned.budgets import _BudgetPredictor

LEARNED = sorted(m for m, cls in REGISTRY.items() if issubclass(cls, _BudgetPredictor))
# Small fits: few clusters for short sentences, a short MLP training.
EXTRA = {"cascade": {"n_clusters": 3, "cluster_pool": 6, "max_cluster_keys": 3},
         "stacked_mlp": {"hidden": 3, "steps": 5}}
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", ",", "."]


def _data(seed: int, b: int, h: int, n: int, r: int, causal: bool):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    lengths[0] = n
    q = torch.randn(b, h, n, r, generator=g)
    k = torch.randn(b, h, n, r, generator=g)
    valid = valid_pair_mask(lengths, n, causal)
    gold = (torch.rand(b, h, n, n, generator=g) < 0.3) & valid
    probs = torch.rand(b, h, n, n, generator=g) * gold
    tokens = [[WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(m),), generator=g)] for m in lengths]
    return q, k, lengths, gold, probs, tokens


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("method", LEARNED)
def test_learned_fast_path_matches_predict_and_graph_metrics(method, causal):
    assert REGISTRY[method] in NESTED
    h, r = 2, 3
    q, k, lengths, gold, _, tokens = _data(0, 12, h, 10, r, causal)
    cls = REGISTRY[method]
    extra = EXTRA.get(method, {})
    template = get_predictor(method, **extra)
    template.fit(q, k, lengths, gold=AttentionGraph(gold, lengths, causal), tokens=tokens)
    state = template.state_dict()
    # Sparsities out of grid order, a repeated threshold region (0.95 / 0.99 may round to one grid
    # point), both budgets, and a window + global variant.
    points = [{"sparsity": s} for s in (0.7, 0.2, 0.95, 0.5, 0.99)]
    points += [{"sparsity": s, "budget": "uniform"} for s in (0.4, 0.8)]
    points += [{"sparsity": s, "window": 3, "global_tokens": True} for s in (0.6, 0.9)]
    configs = []
    for i, point in enumerate(points):
        pred = get_predictor(method, **extra, **point)
        pred.load_state_dict(state)
        configs.append(_Config(i, method, point, canonical_params(point), pred, {0: pred}))
    units = _plan(configs)
    assert all(u.kind == "nested" for u in units) and len(units) == 3

    qe, ke, lengths_e, gold_e, probs_e, tokens_e = _data(1, 5, h, 9, r, causal)
    batch = _Batch(layer=0, lengths=lengths_e, causal=causal, gold=gold_e, raw_q=qe, raw_k=ke,
                   proj_q=qe if cls.input_space == "projected" else None,
                   proj_k=ke if cls.input_space == "projected" else None, head_dim=r,
                   sentence_ids=torch.arange(5), context={"tokens": tokens_e}, probs=probs_e)
    gold_graph = AttentionGraph(gold_e, lengths_e, causal)
    for unit in units:
        counts = unit.run(batch)
        for row, c in enumerate(unit.configs):
            graph, cost = c.predictor.predict_with_cost(qe, ke, lengths_e, causal, tokens=tokens_e)
            want = graph_metrics(gold_graph, graph, cost, probs=probs_e)
            for key in ("pred_edges", "hits", "covered_queries", "cost"):
                assert torch.equal(counts[key][row].double(), want[key].double()), (method, c.key, key)
            torch.testing.assert_close(counts["mass_hits"][row], want["mass_hits"], rtol=1e-12, atol=1e-12)
    # Informative: the thresholds cut through the scores at some but not all configurations.
    pred_edges = torch.cat([unit.run(batch)["pred_edges"] for unit in units])
    assert pred_edges.min() < pred_edges.max()
