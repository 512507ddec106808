"""The sweep's ``pages`` kernel (every grid point of a sentence from shared page statistics) against
predict + graph_metrics, configuration by configuration."""

from __future__ import annotations

import pytest
import torch

from sparsefinder.evaluation.sweep.batch import GROUPED, _Batch
from sparsefinder.evaluation.sweep.configs import _Config, canonical_params
from sparsefinder.evaluation.sweep.plan import _plan
from sparsefinder.graphs import AttentionGraph, valid_pair_mask
from sparsefinder.metrics import graph_metrics
from sparsefinder.predictors import REGISTRY, get_predictor


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("causal", [False, True])
def test_pages_kernel_matches_predict_and_graph_metrics(seed, causal):
    assert REGISTRY["pages"] in GROUPED
    g = torch.Generator().manual_seed(seed)
    b, h, n, d = 7, 3, 11, 4
    lengths = torch.tensor([n, 0, 1, 6, 9, 6, n])  # equal lengths share the threshold calls
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, h, n, d, generator=g)
    if seed == 2:  # few distinct values: ties in the estimates and the budget sort
        q, k = q.round(), k.round()
    gold = (torch.rand(b, h, n, n, generator=g) < 0.3) & valid_pair_mask(lengths, n, causal)
    probs = torch.rand(b, h, n, n, generator=g) * gold
    # The default grid's shape (page size x slack, page size x sparsity), out of order, plus the
    # predictor's other parameters: another alpha (bisection) and scaling, window and global tokens.
    points = [{"page_size": p, "slack": s, "sparsity": None} for p in (4, 2) for s in (0.5, 0.0, 1.0)]
    points += [{"page_size": p, "slack": 0.5, "sparsity": s} for p in (2, 4) for s in (0.9, 0.5, 0.7)]
    points += [{"page_size": 3, "slack": 0.25, "sparsity": 0.6}, {"page_size": 3, "slack": 0.0, "sparsity": 0.8},
               {"page_size": 3, "alpha": 1.3, "scaling": 0.7},
               {"page_size": 2, "slack": 0.75, "window": 3, "global_tokens": True},
               {"page_size": 4, "sparsity": 0.5, "window": 1}]
    configs = [_Config(i, "pages", p, canonical_params(p), get_predictor("pages", **p)) for i, p in enumerate(points)]
    units = _plan(configs)
    assert [u.kind for u in units] == ["grouped"]
    batch = _Batch(layer=0, lengths=lengths, causal=causal, gold=gold, raw_q=q, raw_k=k, proj_q=None, proj_k=None,
                   head_dim=d, sentence_ids=torch.arange(b), context={}, probs=probs)
    counts = units[0].run(batch)
    gold_graph = AttentionGraph(gold, lengths, causal)
    for row, c in enumerate(configs):
        graph, cost = c.predictor.predict_with_cost(q, k, lengths, causal)
        want = graph_metrics(gold_graph, graph, cost, probs=probs)
        for key in ("pred_edges", "hits", "covered_queries", "cost"):
            assert torch.equal(counts[key][row].double(), want[key].double()), (c.key, key)
        torch.testing.assert_close(counts["mass_hits"][row], want["mass_hits"], rtol=1e-12, atol=1e-12)
    assert counts["pred_edges"].min() < counts["pred_edges"].max()
