"""Mass recall and output error (sparsefinder.mass, docs/method.md §2.2) against brute force, and where they are wired.

References are float64 loops over rows with the entmax package, written from the definitions; the library
computes in float32, so values agree to ~1e-6 (a row's probabilities to ~1e-7).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from entmax import entmax15, entmax_bisect
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefinder.corpora.extract import extract_corpus
from sparsefinder.corpora.store import ExtractionStore
from sparsefinder.evaluation.analysis import predict_batch, predict_head
from sparsefinder.evaluation.sweep import run_sweep
from sparsefinder.graphs import AttentionGraph, valid_pair_mask
from sparsefinder.mass import attention_scores, gold_probabilities, layer_alpha, output_error
from sparsefinder.metrics import aggregate, graph_metrics, per_sentence_frame
from sparsefinder.model.entmax_model import load_model
from tests.helpers import graph_cases, reference_probs

TEXTS = ["The cat sat on the mat.", "Dogs bark loudly at night.", "Hi.",
         "Sparse attention gives exact zeros to many keys in every head."]


def _case(seed: int, B: int, H: int, N: int, causal: bool, window: int | None, d: int = 4):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, N + 1, (B,), generator=g)
    lengths[0] = N  # at least one full sentence
    q = torch.randn(B, H, N, d, generator=g) * 2
    k = torch.randn(B, H, N, d, generator=g) * 2
    v = torch.randn(B, H, N, 3, generator=g)
    edges = torch.rand(B, H, N, N, generator=g) < 0.5
    return lengths, q, k, v, edges


def _brute(q, k, v, edges, lengths, causal, window, alpha):
    """Per sentence and head: mass on the predicted valid pairs / mass on the valid pairs, and the relative L2
    of entmax restricted (row by row) to the predicted pairs."""
    B, H = q.shape[:2]
    mass = np.full((B, H), np.nan)
    err = np.full((B, H), np.nan)
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            continue
        for h in range(H):
            a = alpha if isinstance(alpha, float) else float(alpha[h])
            p = reference_probs(q[b, h, :n][None], k[b, h, :n][None], causal, window, 1 / 2, None, a)[0]
            i, j = np.arange(n)[:, None], np.arange(n)[None, :]
            allowed = np.ones((n, n), bool)
            if causal:
                allowed &= j <= i
            if window is not None:
                allowed &= np.abs(i - j) <= window
            keep = edges[b, h, :n, :n].numpy() & allowed
            mass[b, h] = p.numpy()[keep].sum() / p.numpy()[allowed].sum()
            s = (q[b, h, :n].double() @ k[b, h, :n].double().T) / 2
            dense = p @ v[b, h, :n].double()
            approx = torch.zeros_like(dense)
            for r in range(n):
                cols = np.flatnonzero(keep[r])
                if len(cols) == 0:
                    continue  # no predicted key: zero output
                row = s[r, cols][None]
                pr = entmax15(row, dim=-1) if a == 1.5 else entmax_bisect(row, alpha=a, dim=-1, n_iter=80)
                approx[r] = pr[0] @ v[b, h, cols].double()
            err[b, h] = float((approx - dense).norm() / dense.norm())
    return mass, err


@settings(max_examples=25, deadline=None)
@given(**graph_cases(max_heads=3, max_length=7, window=st.sampled_from([None, 0, 2]),
                     alpha=st.sampled_from([1.5, 2.0, "per-head"])))
def test_mass_recall_and_output_error_equal_brute_force(seed, B, H, N, causal, window, alpha):
    lengths, q, k, v, edges = _case(seed, B, H, N, causal, window)
    a = [1.5, 1.3, 2.0][:H] if alpha == "per-head" else alpha
    scores = attention_scores(q, k, lengths, causal, window, scaling=0.5)
    probs = gold_probabilities(scores, lengths, causal, window, layer_alpha(a, H))
    gold = AttentionGraph(probs > 0, lengths, causal, window)
    pred = AttentionGraph(edges, lengths, causal, window)
    m = graph_metrics(gold, pred, probs=probs)
    err = output_error(scores, v, edges, lengths, causal, window, layer_alpha(a, H))
    mass_ref, err_ref = _brute(q, k, v, edges, lengths, causal, window, a if alpha == "per-head" else float(a))
    np.testing.assert_allclose(m["mass_recall"].numpy(), mass_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(err.numpy(), err_ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(**graph_cases(max_heads=3, max_length=8, window=st.sampled_from([None, 1]), extra_rate=st.floats(0, 1)))
def test_a_superset_of_the_gold_graph_keeps_all_the_mass_and_the_output(seed, B, H, N, causal, window, extra_rate):
    """entmax's threshold over a superset of the support is the threshold over all keys: nothing changes."""
    lengths, q, k, v, _ = _case(seed, B, H, N, causal, window)
    scores = attention_scores(q, k, lengths, causal, window)
    probs = gold_probabilities(scores, lengths, causal, window, 1.5)
    g = torch.Generator().manual_seed(seed + 1)
    edges = (probs > 0) | (torch.rand(probs.shape, generator=g) < extra_rate)
    gold = AttentionGraph(probs > 0, lengths, causal, window)
    m = graph_metrics(gold, AttentionGraph(edges, lengths, causal, window), probs=probs)
    real = lengths > 0
    np.testing.assert_allclose(m["mass_recall"][real].numpy(), 1.0, atol=1e-6)
    err = output_error(scores, v, edges, lengths, causal, window, 1.5)
    assert float(err[real].max()) <= 1e-5
    # Every valid pair predicted: the same computation as the dense one, so exactly 0.
    everything = torch.ones_like(edges)
    assert float(output_error(scores, v, everything, lengths, causal, window, 1.5)[real].abs().max()) == 0.0
    assert bool(err[~real].isnan().all())


def test_empty_prediction_loses_all_mass_and_the_whole_output():
    lengths, q, k, v, _ = _case(3, 2, 2, 5, False, None)
    scores = attention_scores(q, k, lengths, False)
    probs = gold_probabilities(scores, lengths, False, None, 1.5)
    none = torch.zeros_like(probs, dtype=torch.bool)
    m = graph_metrics(AttentionGraph(probs > 0, lengths, False), AttentionGraph(none, lengths, False), probs=probs)
    real = lengths > 0
    assert torch.equal(m["mass_recall"][real], torch.zeros_like(m["mass_recall"][real]))
    # A sparse kernel with no keys outputs zero: the error is |0 - O| / |O| = 1.
    np.testing.assert_allclose(output_error(scores, v, none, lengths, False, None, 1.5)[real].numpy(), 1.0)


def test_mass_is_nan_without_probabilities_and_stays_nan_when_aggregated():
    lengths = torch.tensor([3, 2])
    edges = valid_pair_mask(lengths, 3, False).expand(2, 2, 3, 3).clone()
    gold = AttentionGraph(edges, lengths, False)
    m = graph_metrics(gold, gold)
    assert bool(m["mass_recall"].isnan().all()) and bool(m["gold_mass"].isnan().all())
    frame = per_sentence_frame({0: m}, [0, 1])
    for micro in (False, True):
        agg = aggregate(frame, by=("layer",), micro=micro)
        assert agg["mass_recall"].isna().all() and agg["gold_mass"].isna().all(), micro
        assert (agg["recall"] == 1.0).all()
    with pytest.raises(ValueError, match="probs must be shaped"):
        graph_metrics(gold, gold, probs=torch.ones(2, 2, 3, 4))


def test_micro_mass_recall_pools_the_mass():
    lengths, q, k, _, edges = _case(5, 3, 2, 6, True, None)
    scores = attention_scores(q, k, lengths, True)
    probs = gold_probabilities(scores, lengths, True, None, 1.5)
    gold = AttentionGraph(probs > 0, lengths, True)
    m = graph_metrics(gold, AttentionGraph(edges, lengths, True), probs=probs)
    agg = aggregate(per_sentence_frame({0: m}, [0, 1, 2]), by=(), micro=True)
    pooled = float((probs.double() * edges).sum() / probs.double().sum())
    assert agg["mass_recall"].item() == pytest.approx(pooled, rel=1e-12)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "gemma2", "modernbert"])
def test_live_extraction_recomputes_its_own_probabilities(family, tiny_model_dir):
    """The captured scaling, soft-cap and alpha reproduce the model's probabilities on every valid pair
    (Gemma-2 scales by query_pre_attn_scalar^-1/2 and soft-caps; ModernBERT has local layers)."""
    model = load_model(tiny_model_dir(family), device="cpu")
    ex = model.extract(TEXTS)
    assert ex.has_values()
    for layer in range(ex.num_layers):
        p = gold_probabilities(ex.scores(layer), ex.lengths, ex.causal, ex.window(layer), ex.alpha(layer))
        valid = ex.gold(layer).valid_pairs().expand_as(p)
        assert float((p - ex.probs[layer])[valid].abs().max()) <= 1e-6, (family, layer)
        assert torch.equal((p > 0)[valid], (ex.probs[layer] > 0)[valid])
        # The captured values are the ones the attention multiplied: P V over real queries.
        assert ex.values[layer].shape == ex.queries[layer].shape[:3] + ex.values[layer].shape[3:]
    if family == "gemma2":
        assert ex.softcaps[0] == 5.0 and ex.scaling[0] != pytest.approx(ex.queries[0].shape[-1] ** -0.5)


def test_predictions_on_a_text_report_mass_recall_and_output_error(tiny_model_dir):
    model = load_model(tiny_model_dir("bert"), device="cpu")
    ex = model.extract(TEXTS)
    bp = predict_batch(ex, "window", {"window": 1})
    assert bp.metrics["mass_recall"].shape == bp.metrics["recall"].shape
    real = np.isfinite(bp.metrics["recall"])
    assert np.isfinite(bp.metrics["output_error"][real]).all()
    # Against brute force on one head: the window's own edges, the model's own probabilities.
    b, layer, h = 1, 1, 2
    n = int(ex.lengths[b])
    edges = torch.from_numpy(bp.edges(b, layer, n))[h]
    p = ex.probs[layer][b, h, :n, :n].double()
    assert bp.metrics["mass_recall"][b, layer, h] == pytest.approx(float(p[edges].sum() / p.sum()), rel=1e-6)
    head = predict_head(ex, layer, h, "window", {"window": 10**6})
    assert head.metrics["mass_recall"] == pytest.approx(1.0, abs=1e-6) and head.metrics["output_error"] == 0.0


@pytest.fixture(scope="module")
def gemma_store(tiny_model_dir, tmp_path_factory):
    model = load_model(tiny_model_dir("gemma2"), device="cpu")
    out = tmp_path_factory.mktemp("mass-gemma") / "store"
    extract_corpus(model, TEXTS, out, progress=False)
    return out


def test_store_records_how_the_attention_scored(gemma_store):
    store = ExtractionStore.open(gemma_store)
    cfg = store.score_settings(0)
    assert cfg["recorded"] and cfg["softcap"] == 5.0
    batch = next(store.iter_batches(1, len(store)))
    probs, mismatched = store.gold_probabilities(batch)
    assert mismatched == 0
    frame = run_sweep(store, methods=["window"], grids={"window": [{"window": 1}, {"window": 100}]}, progress=False)
    assert frame.attrs["sweep"]["mass"] == {"scored": True, "support_mismatch": 0.0, "scaling": "recorded"}
    wide = frame[frame.params == '{"window":100}']
    np.testing.assert_allclose(wide["mass_recall"], 1.0, atol=1e-6)
    narrow = frame[frame.params == '{"window":1}']
    assert (narrow["mass_recall"] < 1).any() and narrow["mass_recall"].between(0, 1).all()


def test_a_store_without_its_scaling_is_checked_before_mass_is_reported(gemma_store, tmp_path):
    """Gemma-2 does not scale by d^-1/2: assumed for a store that did not record it, the recomputed supports
    disagree with the stored gold graphs, and the sweep withholds mass recall instead of reporting a wrong one."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(gemma_store, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["scaling"], manifest["softcap"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    store = ExtractionStore.open(old)
    assert not store.score_settings(0)["recorded"]
    frame = run_sweep(store, methods=["window"], grids={"window": [{"window": 1}]}, progress=False)
    info = frame.attrs["sweep"]["mass"]
    assert info["scaling"] == "assumed d^-1/2" and not info["scored"] and "disagree" in info["reason"]
    assert frame["mass_recall"].isna().all() and frame["recall"].notna().all()
    off = run_sweep(ExtractionStore.open(gemma_store), methods=["window"], grids={"window": [{"window": 1}]},
                    progress=False, mass=False)
    assert off["mass_recall"].isna().all() and off.attrs["sweep"]["mass"]["scored"] is False


@settings(max_examples=30, deadline=None)
@given(**graph_cases(max_heads=3, max_length=9, window=st.sampled_from([None, 2]), alpha=st.sampled_from([1.5, 2.0])))
def test_probabilities_on_a_known_support_are_entmax(seed, B, H, N, causal, window, alpha):
    """Given the true support, the closed-form threshold gives entmax's probabilities (float64 sorting
    entmax15 / bisection as reference) and no disagreement; a wrong support is counted."""
    from sparsefinder.mass import support_probabilities

    lengths, q, k, _, _ = _case(seed, B, H, N, causal, window)
    scores = attention_scores(q, k, lengths, causal, window)
    ref = gold_probabilities(scores, lengths, causal, window, alpha)
    probs, bad = support_probabilities(scores, ref > 0, alpha)
    assert bad == 0
    np.testing.assert_allclose(probs.numpy(), ref.numpy(), rtol=0, atol=1e-6 if alpha != 1.5 else 1e-12)
    if alpha == 1.5 and bool((ref > 0).any()):
        wrong = (ref > 0).clone()
        wrong.view(-1)[int(torch.nonzero(wrong.view(-1))[0])] = False  # drop one gold edge
        _, bad = support_probabilities(scores, wrong, alpha)
        assert bad >= 1
