"""``stacked_mlp`` (sparsefinder.predictors.learned.mlp) against brute force, autograd and the logistic ``stacked``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_predictors_learned import random_data

from sparsefinder.graphs import AttentionGraph, valid_pair_mask
from sparsefinder.predictors import get_predictor
from sparsefinder.predictors.learned.budgets import STACKED_FEATURES, token_hashes
from sparsefinder.predictors.learned.mlp import ADAM_BETAS, StackedMLP, fit_mlp
from sparsefinder.predictors.learned.stacked import _fit_logistic, _pair_features

LENGTHS = [6, 3, 5, 6, 2, 4]


def fit(data_seed: int = 0, causal: bool = False, **params):
    q, k, lengths, gold, tokens = random_data(data_seed, LENGTHS, causal=causal)
    pred = get_predictor("stacked_mlp", **{"hidden": 4, "steps": 40, **params})
    return pred.fit(q, k, lengths, gold=gold, tokens=tokens), (q, k, lengths, gold, tokens)


def numpy_forward(state: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """Brute force: ``(B, H, N, N)`` scores of raw features ``x`` ``(B, H, N, N, F)``, one pair at a time."""
    mean, scale = state["mean"].double().numpy(), state["scale"].double().numpy()
    weight = state["weight"].double().numpy()
    w1, b1, w2 = (state[n].double().numpy() for n in ("w1", "b1", "w2"))
    B, H, N, _, F = x.shape
    out = np.zeros((B, H, N, N))
    for b, h, i, j in np.ndindex(B, H, N, N):
        xs = (x[b, h, i, j] - mean[h]) / scale[h]
        z = weight[h, F] + sum(weight[h, f] * xs[f] for f in range(F))
        for m in range(w1.shape[2]):
            z += w2[h, m] * math.tanh(b1[h, m] + sum(w1[h, f, m] * xs[f] for f in range(F)))
        out[b, h, i, j] = z
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_scores_are_the_numpy_forward_pass_of_the_saved_weights(causal):
    pred, (q, k, lengths, gold, tokens) = fit(data_seed=3, causal=causal)
    state = pred.state_dict()
    assert state["w2"].abs().max() > 0  # trained: the hidden units contribute
    x = _pair_features(STACKED_FEATURES, q, k, lengths, causal, token_hashes(tokens, len(LENGTHS), 6),
                       pred._priors(), 2).double().numpy()
    want = numpy_forward(state, x)
    got = pred.scores(q, k, lengths, causal=causal, tokens=tokens).numpy()
    valid = valid_pair_mask(lengths, 6, causal).expand(got.shape).numpy()
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-4, atol=1e-4)
    # The graph keeps, per head, the valid pairs at or above the head's threshold.
    t = pred.head_thresholds().numpy()
    edges = pred.predict(q, k, lengths, causal=causal, tokens=tokens).edges.numpy()
    assert np.array_equal(edges, valid & (got >= t[None, :, None, None]))


def test_zero_steps_is_exactly_stacked():
    """Same pair sample, same standardisation, logistic skip from stacked's fit, hidden units off: stacked's bits."""
    q, k, lengths, gold, tokens = random_data(5, LENGTHS)
    mlp = get_predictor("stacked_mlp", steps=0, max_pairs=50).fit(q, k, lengths, gold=gold, tokens=tokens)
    ref = get_predictor("stacked", max_pairs=50).fit(q, k, lengths, gold=gold, tokens=tokens)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(mlp.state_dict()[name], tensor), name
    assert torch.equal(mlp.scores(q, k, lengths, tokens=tokens), ref.scores(q, k, lengths, tokens=tokens))
    # Training changes the weights but not the sample it standardises on.
    trained = get_predictor("stacked_mlp", steps=5, max_pairs=50).fit(q, k, lengths, gold=gold, tokens=tokens)
    assert torch.equal(trained.mean_, ref.mean_) and torch.equal(trained.scale_, ref.scale_)
    assert not torch.equal(trained.weight_, ref.weight_)


def test_fit_mlp_matches_autograd_adam():
    """The hand-written gradient: the same Adam trajectory as autograd on the written-out loss.

    Compared in float64: Adam divides by sqrt(v), so where a gradient is near zero a float32 rounding
    difference (which depends on the CPU's vector width) moves a parameter by up to lr. In float64 both
    trajectories agree to ~1e-12 on any CPU; 1e-9 leaves room for 25 steps of accumulated rounding.
    """
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(3, 300, 4)))
    y = torch.from_numpy(rng.random((3, 300)) < 0.3).double()
    wt = torch.from_numpy(rng.random((3, 300)) < 0.8).double()
    lin = _fit_logistic(x, y, weight=wt)
    steps, lr, l2, M = 25, 0.05, 1e-2, 5
    got = fit_mlp(x, y, wt, lin, M, steps, lr, l2, torch.Generator().manual_seed(4), dtype=torch.float64)
    w1 = torch.randn(3, 4, M, generator=torch.Generator().manual_seed(4), dtype=torch.float64) / 2.0
    zeros = torch.zeros(3, M, dtype=torch.float64)
    params = [lin[:, :4].double().clone(), lin[:, 4].double().clone(), w1, zeros.clone(), zeros.clone()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS)
    for t in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
        opt.zero_grad()
        a, c, u, b1, v = params
        z = (x * a[:, None]).sum(-1) + c[:, None] + (torch.tanh(x @ u + b1[:, None]) * v[:, None]).sum(-1)
        ce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
        loss = (ce * wt).sum(1) / wt.sum(1) + l2 * (a.pow(2).sum(1) + u.pow(2).sum((1, 2)) + v.pow(2).sum(1))
        loss.sum().backward()
        opt.step()
    want = [torch.cat([params[0], params[1][:, None]], 1), params[2], params[3], params[4]]
    for g_, w_ in zip(got, want, strict=True):
        assert g_.dtype == torch.float64
        torch.testing.assert_close(g_, w_.detach(), rtol=1e-9, atol=1e-9)
    # The predictor's own float32 path starts from the same point and stays finite.
    got32 = fit_mlp(x, y, wt, lin, M, steps, lr, l2, torch.Generator().manual_seed(4))
    assert all(g_.dtype == torch.float32 and torch.isfinite(g_).all() for g_ in got32)


def xor_data(seed: int = 0):
    """Gold = (|q'_i|^2 > c) XOR (|k'_j|^2 > c): two features (query_norm, key_norm) no linear score separates."""
    rng = np.random.default_rng(seed)
    lengths = [8] * 30
    q = torch.from_numpy(rng.normal(size=(30, 2, 8, 3)))
    k = torch.from_numpy(rng.normal(size=(30, 2, 8, 3)))
    c = 2.37  # about the median of a chi-square with 3 degrees of freedom: about half the pairs are gold
    big_q, big_k = q.pow(2).sum(-1) > c, k.pow(2).sum(-1) > c
    edges = big_q[..., :, None] ^ big_k[..., None, :]
    lt = torch.tensor(lengths)
    return q, k, lt, AttentionGraph(edges, lt)


def test_beats_the_logistic_model_on_a_nonlinear_gold():
    q, k, lengths, gold = xor_data()
    mlp = get_predictor("stacked_mlp", steps=300, lr=0.03).fit(q, k, lengths, gold=gold)
    logit = get_predictor("stacked").fit(q, k, lengths, gold=gold)
    grid = np.linspace(0, 1, mlp.train_recall_.shape[1])
    at = int(np.searchsorted(grid, 0.5))  # keep half the pairs, about the gold density
    r_mlp, r_log = mlp.train_recall_[:, at], logit.train_recall_[:, at]
    assert (r_mlp > r_log + 0.15).all(), (r_mlp, r_log)
    assert (r_mlp > 0.9).all()
    # Brute force: the same at the thresholds, counting kept gold pairs of each sentence.
    for pred, rec in ((mlp, r_mlp), (logit, r_log)):
        z = pred.scores(q, k, lengths)
        t = pred.thresholds_[:, at]
        kept = z >= t[None, :, None, None]
        g = gold.edges
        per_sentence = (kept & g).sum((-1, -2)).double() / g.sum((-1, -2)).clamp(min=1).double()
        assert per_sentence.mean(0).numpy() == pytest.approx(rec.numpy(), abs=0.02)


def test_fit_is_deterministic_and_seeded():
    a, _ = fit(data_seed=1)
    b, _ = fit(data_seed=1)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    c, _ = fit(data_seed=1, seed=7)
    assert not torch.equal(c.state_dict()["w1"], sa["w1"])


def test_save_load_round_trip_through_fitted_io(tmp_path):
    from sparsefinder.evaluation.fitted import FittedFileError, load_fitted, save_fitted

    pred, (q, k, lengths, gold, tokens) = fit(data_seed=2, hidden=3, sparsity=0.6)
    key = json.dumps({"sparsity": 0.6})
    save_fitted({"stacked_mlp": {key: {0: pred}}}, tmp_path)
    back = load_fitted(tmp_path)["stacked_mlp"][key][0]
    assert isinstance(back, StackedMLP) and back.get_params() == pred.get_params()
    assert all(torch.equal(back.state_dict()[n], t) for n, t in pred.state_dict().items())
    edges = pred.predict(q, k, lengths, tokens=tokens).edges
    assert edges.any() and torch.equal(back.predict(q, k, lengths, tokens=tokens).edges, edges)
    # A manifest that claims another hidden size does not fit the tensors.
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["entries"][0]["hyperparameters"]["hidden"] = 5
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FittedFileError, match="hidden=5"):
        load_fitted(tmp_path)


def test_state_of_another_shape_is_rejected():
    pred, _ = fit(hidden=4)
    state = pred.state_dict()
    with pytest.raises(ValueError, match="hidden=6"):
        StackedMLP(hidden=6).load_state_dict(state)
    bad = dict(state, w2=state["w2"][:1])
    with pytest.raises(ValueError, match="w2"):
        StackedMLP(hidden=4).load_state_dict(bad)
    with pytest.raises(ValueError, match="lacks"):
        StackedMLP(hidden=4).load_state_dict({n: t for n, t in state.items() if n != "b1"})


@pytest.mark.parametrize("params", [{"hidden": 0}, {"hidden": 2.0}, {"steps": -1}, {"steps": True}, {"lr": 0.0},
                                    {"lr": -0.1}, {"lr": float("nan")}, {"l2": -1e-3}, {"l2": float("inf")},
                                    {"l2": "0.1"}, {"max_pairs": 0}, {"sparsity": 1.5}])
def test_bad_params_raise(params):
    q, k, lengths, gold, tokens = random_data(0, LENGTHS)
    with pytest.raises(ValueError):
        get_predictor("stacked_mlp", **params).fit(q, k, lengths, gold=gold, tokens=tokens)
    good, _ = fit()
    with pytest.raises(ValueError):
        good.set_params(**params).predict(q, k, lengths, tokens=tokens)
