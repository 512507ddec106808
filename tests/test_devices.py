"""The same results on every device (#13, item 5): extraction, gold graphs, predictors and the sweep.

Parametrised by device; the CUDA cases run where a GPU is present and are skipped elsewhere. The reference
is always the CPU run, and graphs must be identical (supports are decided in float32 on both; a tie that a
GPU's reduction order could flip is within the tolerance allowed for probabilities, so probabilities are
compared with a tolerance and graphs edge for edge only away from such ties).
"""

from __future__ import annotations

import pytest
import torch

from sparsefinder.corpora.extract import extract_corpus
from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.evaluation.sweep import run_sweep
from sparsefinder.metrics import graph_metrics
from sparsefinder.model.entmax_model import load_model, resolve_device
from sparsefinder.predictors import get_predictor
from sparsefinder.training.projections import Projections

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello there.", "A third, somewhat longer sentence here."]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
]


def test_auto_is_cuda_when_present():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["bert", "llama", "modernbert"])
def test_extraction_and_predictors_match_the_cpu(tiny_model_dir, device, family):
    path = str(tiny_model_dir(family))
    cpu = load_model(path, device="cpu").extract(TEXTS)
    dev_model = load_model(path, device=device)
    assert dev_model.device.type == device
    dev = dev_model.extract(TEXTS)
    for layer in range(cpu.num_layers):
        torch.testing.assert_close(dev.probs[layer], cpu.probs[layer], atol=1e-5, rtol=0)
        ties = (cpu.probs[layer] > 0) & (cpu.probs[layer] < 1e-5)  # where rounding may decide the support
        assert torch.equal((dev.probs[layer] > 0) | ties, (cpu.probs[layer] > 0) | ties)
        gold = cpu.gold(layer)
        for name in ("window", "bigbird"):
            pred = get_predictor(name)
            q, k = dev.queries[layer].to(device), dev.keys[layer].to(device)
            on_dev = pred.predict(q, k, dev.lengths.to(device), dev.causal)
            on_cpu = pred.predict(cpu.queries[layer], cpu.keys[layer], cpu.lengths, cpu.causal)
            assert torch.equal(on_dev.edges.cpu(), on_cpu.edges)
            m = graph_metrics(gold, on_cpu)
            assert bool((m["recall"] <= 1).all())


@pytest.mark.parametrize("device", DEVICES)
def test_sweep_on_the_device_equals_the_cpu_table(tiny_model_dir, tmp_path, device):
    model = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    extract_corpus(model, TEXTS, tmp_path / "store", progress=False)
    store = ExtractionStore.open(tmp_path / "store")
    proj = Projections(store.num_layers, store.num_heads, store.head_dim, rank=3, seed=0)
    methods = ["window", "distance", "bigbird"]
    want = run_sweep(store, proj, methods=methods, progress=False, seed=1, device="cpu")
    got = run_sweep(store, proj, methods=methods, progress=False, seed=1, device=device)
    cols = ["recall", "sparsity", "gold_edges", "pred_edges", "hits"]
    torch.testing.assert_close(torch.tensor(got[cols].to_numpy()), torch.tensor(want[cols].to_numpy()),
                               atol=1e-12, rtol=0)
