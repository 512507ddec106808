"""Recall at matched sparsity (predictors.learned.calibration) and the learned predictors, against brute force."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefinder.graphs import AttentionGraph, valid_pair_mask
from sparsefinder.predictors import NotFittedError, get_predictor, list_predictors
from sparsefinder.predictors.clustering import sq_dists
from sparsefinder.predictors.learned.budgets import GRID_POINTS, TokenContext, token_hashes
from sparsefinder.predictors.learned.calibration import (
    CurveAccumulator,
    HeadCurve,
    allocate_budgets,
    concave_hull,
    recall_at_global_threshold,
    recall_at_sparsity,
)

# Derived from the registry (family "learned"), as every list of methods is.
LEARNED = list_predictors(family="learned")


FAST = settings(max_examples=20, deadline=None)
VOCAB = ["[CLS]", "the", "cat", "sat", ".", "on", "mat", "[SEP]"]


# --------------------------------------------------------------------------- data


def random_data(seed: int, lengths: list[int], heads: int = 2, r: int = 3, causal: bool = False,
                density: float = 0.3, ties: bool = False):
    """Float64 q, k with garbage on padding, a random gold graph (each real row non-empty), token strings."""
    rng = np.random.default_rng(seed)
    B, N = len(lengths), max(lengths)
    shape = (B, heads, N, r)
    if ties:
        q, k = rng.integers(0, 2, shape).astype(float), rng.integers(0, 2, shape).astype(float)
    else:
        q, k = rng.normal(size=shape), rng.normal(size=shape)
    lt = torch.tensor(lengths)
    edges = torch.from_numpy(rng.random((B, heads, N, N)) < density)
    diag = torch.eye(N, dtype=torch.bool)[None, None].expand(B, heads, N, N)
    edges = edges | diag  # entmax never gives an empty row; keep every real query's row non-empty
    tokens = [["[CLS]"] + [VOCAB[int(i)] for i in rng.integers(1, 7, max(n - 2, 0))] + (["[SEP]"] if n > 1 else [])
              for n in lengths]
    tokens = [t[:n] for t, n in zip(tokens, lengths, strict=True)]
    return torch.from_numpy(q), torch.from_numpy(k), lt, AttentionGraph(edges, lt, causal), tokens


def macro(keep: torch.Tensor, gold: AttentionGraph) -> tuple[np.ndarray, np.ndarray]:
    """Brute force, one sentence at a time with loops: per head mean over sentences of (density, recall)."""
    B, H, N, _ = keep.shape
    dens, rec, count = np.zeros(H), np.zeros(H), 0
    for b in range(B):
        n = int(gold.lengths[b])
        pairs = [(i, j) for i in range(n) for j in range(n) if not gold.causal or j <= i]
        if not pairs:
            continue
        count += 1
        for h in range(H):
            kept = sum(bool(keep[b, h, i, j]) for i, j in pairs)
            g = [(i, j) for i, j in pairs if bool(gold.edges[b, h, i, j])]
            hit = sum(bool(keep[b, h, i, j]) for i, j in g)
            dens[h] += kept / len(pairs)
            rec[h] += hit / len(g) if g else 1.0
    return dens / count, rec / count


# --------------------------------------------------------------------------- calibrate


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), causal=st.booleans(), ties=st.booleans())
def test_curves_match_bruteforce_at_every_threshold(seed, causal, ties):
    q, k, lengths, gold, _ = random_data(seed, [4, 1, 3, 5], causal=causal, ties=ties)
    scores = -sq_dists(q, k)
    acc = CurveAccumulator(2)
    acc.add(scores[:2], gold.edges[:2], lengths[:2], causal)  # two batches, different padding
    acc.add(scores[2:], gold.edges[2:], lengths[2:], causal)
    curves = acc.curves()
    assert acc.sentences == 4
    valid = valid_pair_mask(lengths, 5, causal)
    for t in sorted(set(scores[valid.expand_as(scores)].tolist())):
        dens, rec = macro(scores >= t, gold)
        for h in range(2):
            assert curves[h].density_at_threshold(t) == pytest.approx(dens[h], abs=1e-12)
            assert curves[h].recall_at_threshold(t) == pytest.approx(rec[h], abs=1e-12)
            # Calibrating to that density gives back that recall and a threshold that keeps that set.
            assert curves[h].recall_at_density(dens[h]) == pytest.approx(rec[h], abs=1e-12)
            t_h = curves[h].threshold_at_density(dens[h])
            assert macro(scores >= t_h, gold)[0][h] == pytest.approx(dens[h], abs=1e-12)


def test_curve_interpolates_between_pairs_and_handles_ties():
    curve = HeadCurve.from_pairs(np.array([3.0, 1.0, 1.0, 0.0]), np.full(4, 0.25), np.array([0.5, 0.5, 0.0, 0.0]))
    assert curve.density.tolist() == [0.0, 0.25, 0.75, 1.0]  # the tie group enters at once
    assert curve.recall.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert curve.recall_at_density(0.5) == pytest.approx(0.75)  # halfway through the tie group
    assert curve.threshold_at_density(0.5) == 1.0


def test_recall_at_sparsity_uniform_and_given_densities():
    a = HeadCurve.from_pairs(np.arange(4.0), np.full(4, 0.25), np.array([0.0, 0.0, 0.0, 1.0]))
    b = HeadCurve.from_pairs(np.arange(4.0), np.full(4, 0.25), np.array([0.25, 0.25, 0.25, 0.25]))
    r, s = recall_at_sparsity([a, b], 0.75)
    assert (r, s) == (pytest.approx((1.0 + 0.25) / 2), pytest.approx(0.75))
    r, s = recall_at_sparsity([a, b], 0.75, densities=[0.25, 0.25])
    assert s == pytest.approx(0.75)
    with pytest.raises(ValueError, match="one density per head"):
        recall_at_sparsity([a, b], 0.7, densities=[0.3])
    with pytest.raises(ValueError, match="sparsity must lie"):
        recall_at_sparsity([a, b], 1.5)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), s=st.sampled_from([0.3, 0.5, 0.7, 0.9]))
def test_global_threshold_matches_bruteforce(seed, s):
    q, k, lengths, gold, _ = random_data(seed, [4, 3, 5], heads=2)
    scores = -sq_dists(q, k)
    acc = CurveAccumulator(2)
    acc.add(scores, gold.edges, lengths)
    r, sp, t = recall_at_global_threshold(acc.curves(), s)
    assert sp == pytest.approx(s, abs=1e-9)
    # Brute force: the thresholds bracketing the target and the linear interpolation between them.
    ts = sorted(set(scores[valid_pair_mask(lengths, 5).expand_as(scores)].tolist()), reverse=True)
    pts = [(0.0, 0.0)] + [tuple(float(x.mean()) for x in macro(scores >= t_, gold)) for t_ in ts]
    xs, ys = zip(*pts, strict=True)
    assert r == pytest.approx(float(np.interp(1 - s, xs, ys)), abs=1e-9)


def test_concave_hull():
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    y = np.array([0.0, 0.1, 0.8, 0.85, 1.0])
    assert concave_hull(x, y).tolist() == [0, 2, 4]


def test_allocate_budgets_beats_every_grid_allocation():
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, 6)
    recall = np.sort(rng.random((3, 6)), axis=1)
    recall[:, 0] = 0
    for target in (0.2, 0.4, 0.6):
        dens = allocate_budgets(grid, recall, target)
        assert dens.mean() == pytest.approx(target) and (dens >= 0).all() and (dens <= 1 + 1e-12).all()

        def hull_value(h: int, d: float) -> float:
            idx = concave_hull(grid, recall[h])
            return float(np.interp(d, grid[idx], recall[h][idx]))

        got = sum(hull_value(h, d) for h, d in enumerate(dens))
        best = max(sum(recall[h, c] for h, c in enumerate(combo))
                   for combo in itertools.product(range(6), repeat=3) if abs(grid[list(combo)].mean() - target) < 1e-9)
        assert got >= best - 1e-12
    with pytest.raises(ValueError, match="mean_density"):
        allocate_budgets(grid, recall, 1.5)


# --------------------------------------------------------------------------- learned predictors


def fit(name: str, seed: int = 0, causal: bool = False, **params):
    q, k, lengths, gold, tokens = random_data(seed, [6, 3, 5, 6, 2, 4], causal=causal)
    pred = get_predictor(name, **params)
    if pred.input_space == "shape":
        q, k = q[..., :1] * 0, k[..., :1] * 0
    return pred.fit(q, k, lengths, gold=gold, tokens=tokens), (q, k, lengths, gold, tokens)


@pytest.mark.parametrize("name", LEARNED)
def test_padded_batch_equals_each_sentence_alone(name):
    pred, (q, k, lengths, gold, tokens) = fit(name, sparsity=0.6)
    batch = pred.predict(q, k, lengths, tokens=tokens).edges
    for b, n in enumerate(lengths.tolist()):
        alone = pred.predict(q[b:b + 1, :, :n], k[b:b + 1, :, :n], [n], tokens=[tokens[b]]).edges[0]
        assert torch.equal(batch[b, :, :n, :n], alone)
        assert not batch[b, :, n:].any() and not batch[b, :, :, n:].any()


@pytest.mark.parametrize("name", LEARNED)
def test_predict_is_pure_and_fit_is_seeded(name):
    pred, (q, k, lengths, gold, tokens) = fit(name)
    q0, state = q.clone(), {a: t.clone() for a, t in pred.state_dict().items()}
    first = pred.predict(q, k, lengths, tokens=tokens).edges
    assert torch.equal(first, pred.predict(q, k, lengths, tokens=tokens).edges)
    assert torch.equal(q, q0)
    assert all(torch.equal(state[a], t) for a, t in pred.state_dict().items())
    again, _ = fit(name)
    assert torch.equal(first, again.predict(q, k, lengths, tokens=tokens).edges)


@pytest.mark.parametrize("name", LEARNED)
def test_causal_graphs_never_point_to_the_future(name):
    pred, (q, k, lengths, gold, tokens) = fit(name, causal=True, sparsity=0.3)
    edges = pred.predict(q, k, lengths, causal=True, tokens=tokens).edges
    assert not (edges & ~valid_pair_mask(lengths, edges.shape[-1], True)).any()
    assert edges.any()


@pytest.mark.parametrize("name", LEARNED)
def test_uniform_budget_hits_the_target_sparsity_on_the_training_data(name):
    """Each head within one edge of the target (its sentences' largest single-pair weight), at a grid density."""
    pred, (q, k, lengths, gold, tokens) = fit(name, budget="uniform", sparsity=0.6)
    scores = pred.scores(q, k, lengths, tokens=tokens)
    dens, _ = macro(scores >= pred.head_thresholds()[None, :, None, None], gold)
    one_edge = max(1.0 / (n * n) for n in lengths.tolist()) / len(lengths)
    ties = len(torch.unique(scores)) < scores.numel()  # a tie group may enter at once
    for h in range(2):
        if not ties:
            assert abs(dens[h] - 0.4) <= one_edge + 1e-12
        assert dens[h] >= 0.4 - 1e-12 or name in ("cascade",)  # never sparser than asked, candidates allowing


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), s=st.sampled_from([0.2, 0.5, 0.75]))
def test_per_head_budgets_have_the_target_mean_density(seed, s):
    pred, _ = fit("distance_budget", seed=seed, sparsity=s)
    assert pred.head_densities().mean() == pytest.approx(1 - s)
    assert pred.clone(budget="uniform").load_state_dict(pred.state_dict()).head_densities().tolist() \
        == pytest.approx([1 - s, 1 - s])


@FAST
@given(seed=st.integers(0, 2**31 - 1), kk=st.integers(1, 5), causal=st.booleans())
def test_topk_rows_keep_exactly_k_nearest_valid_keys(seed, kk, causal):
    pred, (q, k, lengths, gold, tokens) = fit("topk", seed=seed)
    z = pred.scores(q, k, lengths, causal=causal)
    d = sq_dists(q.float(), k.float())
    for b, n in enumerate(lengths.tolist()):
        for h in range(2):
            for i in range(n):
                keys = [j for j in range(n) if not causal or j <= i]
                kept = [j for j in keys if float(z[b, h, i, j]) > -kk]
                assert len(kept) == min(kk, len(keys))
                nearest = sorted(keys, key=lambda j: (float(d[b, h, i, j]), j))[:kk]
                assert sorted(kept) == sorted(nearest)


def test_logistic_fit_is_a_stationary_point():
    from sparsefinder.predictors.learned.stacked import _fit_logistic

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(2, 400, 3)))
    y = (torch.from_numpy(rng.random((2, 400))) < torch.sigmoid(x[..., 0] - 0.5 * x[..., 1])).double()
    w = _fit_logistic(x, y, l2=1e-3).requires_grad_(True)
    z = (x * w[:, None, :3]).sum(-1) + w[:, None, 3]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none").mean(1).sum()
    (loss + 1e-3 * w[:, :3].pow(2).sum()).backward()
    assert float(w.grad.abs().max()) < 1e-8
    # It recovers the signs of the generating model.
    assert float(w[0, 0].detach()) > 0.5 and float(w[0, 1].detach()) < -0.2


@pytest.mark.parametrize("name,params", [("cascade", {}), ("cascade", {"max_cluster_keys": 2, "n_clusters": 3}),
                                         ("cascade", {"max_cluster_keys": 0, "band": 1}),
                                         ("cascade", {"max_cluster_keys": 2, "cluster_pool": 5}), ("global_band", {})])
def test_sparse_support_equals_dense_predict(name, params):
    pred, _ = fit(name, sparsity=0.5, **params)
    q, k, lengths, _, tokens = random_data(9, [7, 4, 1, 12])
    for b, n in enumerate(lengths.tolist()):
        qb, kb = q[b:b + 1, :, :n].float(), k[b:b + 1, :, :n].float()
        dense = pred.predict(qb, kb, [n], tokens=[tokens[b]]).edges[0]
        if name == "cascade":
            idx, keep = pred.support(qb[0], kb[0], tokens[b])
        else:
            idx = pred.support(n, tokens[b])
            keep = idx >= 0
        sparse = torch.zeros_like(dense)
        h, i, m = torch.nonzero(keep, as_tuple=True)
        sparse[h, i, idx[h, i, m]] = True
        assert torch.equal(sparse, dense)


def test_token_hashes_and_priors_use_tokens():
    h = token_hashes([["a", "b"], ["a"]], 2, 3)
    assert h[0, 0] == h[1, 0] and h[0, 0] != h[0, 1] and h[1, 1] == -1 and (h[:, 2] == -1).all()
    pred, (q, k, lengths, gold, tokens) = fit("priors")
    with_tokens = pred.scores(q, k, lengths, tokens=tokens)
    without = pred.scores(q, k, lengths)
    assert not torch.equal(with_tokens, without)
    assert TokenContext().keys == ("tokens",)


def test_bad_input_gets_clear_errors():
    q, k, lengths, gold, tokens = random_data(0, [3, 2])
    with pytest.raises(ValueError, match="learns from the gold graphs"):
        get_predictor("stacked").fit(q, k, lengths)
    with pytest.raises(NotFittedError):
        get_predictor("topk").predict(q, k, lengths)
    with pytest.raises(ValueError, match="sparsity must be"):
        get_predictor("topk", sparsity=1.5).fit(q, k, lengths, gold=gold)
    with pytest.raises(ValueError, match="budget must be"):
        get_predictor("stacked", budget="some").fit(q, k, lengths, gold=gold)
    with pytest.raises(ValueError, match="tokens must list"):
        token_hashes([["a"]], 2, 3)
    pred, _ = fit("distance_budget")
    with pytest.raises(ValueError, match="thresholds and train_recall"):
        pred.clone().load_state_dict({"thresholds": torch.zeros(2, 3), "train_recall": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="fitted for 2 heads"):
        pred.predict(torch.randn(1, 3, 4, 3), torch.randn(1, 3, 4, 3), [4])


def test_fitted_state_round_trips_through_fitted_io(tmp_path):
    from sparsefinder.evaluation.fitted import load_fitted, save_fitted

    preds = {name: fit(name, sparsity=0.5) for name in LEARNED}
    fitted = {name: {json.dumps({"sparsity": 0.5}): {0: p}} for name, (p, _) in preds.items()}
    loaded = load_fitted(save_fitted(fitted, tmp_path / "f"))
    for name, (p, (q, k, lengths, _, tokens)) in preds.items():
        again = loaded[name][json.dumps({"sparsity": 0.5})][0]
        assert again.thresholds_.shape == (2, GRID_POINTS)
        assert torch.equal(p.predict(q, k, lengths, tokens=tokens).edges,
                           again.predict(q, k, lengths, tokens=tokens).edges)


def test_sweep_fits_and_scores_learned_predictors_with_tokens(tiny_model_dir, tmp_path):
    """fit_predictors passes gold and tokens; run_sweep with TokenContext equals predict + graph_metrics."""
    from sparsefinder.corpora.extract import extract_corpus
    from sparsefinder.corpora.store import ExtractionStore
    from sparsefinder.evaluation.sweep import fit_predictors, run_sweep
    from sparsefinder.metrics import graph_metrics
    from sparsefinder.model.entmax_model import load_model
    from sparsefinder.training.projections import Projections

    texts = [f"the {i} cats sat on {i % 3} mats today." for i in range(8)]
    extract_corpus(load_model(str(tiny_model_dir("bert")), device="cpu"), texts, tmp_path / "s", progress=False)
    store = ExtractionStore.open(tmp_path / "s")
    proj = Projections(store.num_layers, store.num_heads, store.head_dim, rank=3, seed=0)
    grids = {"stacked": [{"sparsity": 0.5}, {"sparsity": 0.8, "budget": "uniform"}], "global_band": [{"sparsity": 0.6}]}
    fitted = fit_predictors(store, proj, methods=list(grids), grids=grids)
    # Grid points share one fit: the target sparsity only picks thresholds.
    by_params = fitted["stacked"]
    assert by_params['{"sparsity":0.5}'][0].weight_ is by_params['{"budget":"uniform","sparsity":0.8}'][0].weight_
    frame = run_sweep(store, proj, methods=list(grids), grids=grids, fitted=fitted, layers=[1], batch_size=3,
                      progress=False, context=TokenContext())
    for method, key in [("stacked", '{"sparsity":0.5}'), ("global_band", '{"sparsity":0.6}')]:
        pred = fitted[method][key][1]
        recalls = []
        for i in range(len(store)):
            s = store.sentence(i)
            q, k = s.queries(1)[None], s.keys(1)[None]
            if pred.input_space == "projected":
                q, k = proj.project_queries(1, q), proj.project_keys(1, k)
            graph = pred.predict(q, k, [s.length], tokens=[s.tokens])
            recalls.append(graph_metrics(s.gold_graph(1), graph)["recall"][0])
        got = frame[(frame.method == method) & (frame.params == key)].sort_values("head")["recall"].to_numpy()
        assert np.allclose(got, torch.stack(recalls).mean(0).numpy(), atol=1e-12)


def test_compressed_curve_keeps_exact_points_and_interpolates_closely():
    rng = np.random.default_rng(4)
    P = 20_000
    curve = HeadCurve.from_pairs(rng.normal(size=P), np.full(P, 1 / P), (rng.random(P) < 0.2) / (0.2 * P))
    small = curve.compress(points=501)
    assert len(small.density) < 1100 and small.density[-1] == curve.density[-1]
    assert set(small.threshold.tolist()) <= set(curve.threshold.tolist())
    for d in np.linspace(0, 1, 97):
        assert small.recall_at_density(d) == pytest.approx(curve.recall_at_density(d), abs=2e-3)
        t = small.threshold_at_density(d)
        assert curve.density_at_threshold(t) >= d - 1e-12  # still a calibration that reaches d


def cascade_candidates_bruteforce(pred, q, k, n, tokens):
    """Loops: every query's candidate keys (band, global, ends, its cluster's capped list) of one sentence."""
    cent = pred.centroids_.double()
    aff = pred.affinity_.double()
    H, C = aff.shape[:2]
    prior = [[0.0] * n for _ in range(H)]
    from sparsefinder.predictors.learned.budgets import _lookup

    kp = _lookup(pred.key_hashes_, pred.key_prior_, token_hashes([tokens], 1, n))[0]
    out = np.zeros((H, n, n), dtype=bool)
    for h in range(H):
        prior[h] = [float(kp[h, j]) for j in range(n)]
        glob = sorted(range(n), key=lambda j: (-prior[h][j], j))[:pred.n_global]

        def nearest(x, side, h=h):
            d = [float(((x - cent[h, side, c]) ** 2).sum()) for c in range(C)]
            return min(range(C), key=lambda c: (d[c], c))

        ck = [nearest(k[h, j].double(), 1) for j in range(n)]
        for i in range(n):
            a = nearest(q[h, i].double(), 0)
            row_rank = sorted(range(C), key=lambda b: (-float(aff[h, a, b]), b))
            rank_of = {b: r for r, b in enumerate(row_rank)}
            eligible = [j for j in range(n) if rank_of[ck[j]] < pred.cluster_top]
            dist = {j: float(((cent[h, 0, a].float() - k[h, j].float()) ** 2).sum()) for j in eligible}
            listed = sorted(eligible, key=lambda j: (rank_of[ck[j]], dist[j], j))
            pool = listed[:pred.cluster_pool or n]
            own = {j: float(((q[h, i].float() - k[h, j].float()) ** 2).sum()) for j in pool}
            near = sorted(range(len(pool)), key=lambda p: (own[pool[p]], p))[:pred.max_cluster_keys or n]
            near = [pool[p] for p in near]
            for j in range(n):
                out[h, i, j] = (abs(i - j) <= pred.band or j in glob or j in (0, n - 1) or j in near)
    return out


@pytest.mark.parametrize("cap,pool", [(0, 0), (1, 0), (3, 0), (0, 2), (2, 4), (3, 3)])
def test_cascade_candidates_match_bruteforce(cap, pool):
    pred, _ = fit("cascade", n_clusters=3, cluster_top=2, band=1, n_global=1, max_cluster_keys=cap,
                  cluster_pool=pool)
    q, k, lengths, _, tokens = random_data(4, [9, 5])
    for b, n in enumerate(lengths.tolist()):
        qb, kb = q[b:b + 1, :, :n].float(), k[b:b + 1, :, :n].float()
        hashes = token_hashes([tokens[b]], 1, n)
        cand = pred._candidates(qb, kb, torch.tensor([n]), False, hashes)[0]
        expect = cascade_candidates_bruteforce(pred, qb[0], kb[0], n, tokens[b])
        assert np.array_equal(cand.numpy(), expect)
        # The cap bounds the number of candidates of every query.
        if cap or pool:
            assert int(cand.sum(-1).max()) <= 2 * 1 + 1 + 1 + 2 + min(cap or n, pool or n)


def test_cascade_support_width_does_not_grow_with_n():
    pred, _ = fit("cascade", max_cluster_keys=5, band=2, n_global=2)
    rng = np.random.default_rng(3)
    for n in (50, 400):
        q = torch.from_numpy(rng.normal(size=(2, n, 3))).float()
        idx, keep = pred.support(q, q.flip(1), None)
        assert idx.shape[-1] <= 2 * 2 + 1 + 2 + 2 + 5
        assert bool(keep.any())


def test_stacked_without_row_rank_drops_one_feature_and_checks_its_state():
    pred, (q, k, lengths, gold, tokens) = fit("stacked", row_rank=False)
    assert "log_rank" not in pred.features and len(pred.features) == 12
    assert tuple(pred.weight_.shape) == (2, 13)
    # Without the rank, a key's score does not depend on the other keys of its row: shuffling them
    # (keeping each key's own features) leaves every score as it was.
    z = pred.scores(q, k, lengths, tokens=tokens)
    full, _ = fit("stacked")
    z_full = full.scores(q, k, lengths, tokens=tokens)
    far = k.clone()
    far[0, :, 3] += 100.0  # key 3 of sentence 0 moves away: other keys' ranks change, their distances do not
    changed = pred.scores(q, far, lengths, tokens=tokens)
    keep = [j for j in range(6) if j != 3]
    rows_min_same = torch.ones(2, 6, dtype=torch.bool)  # rel_dist moves only where key 3 was the row minimum
    d = sq_dists(q[0].float(), k[0].float())
    rows_min_same &= d.argmin(-1) != 3
    for h in range(2):
        for i in range(6):
            if rows_min_same[h, i]:
                assert torch.equal(changed[0, h, i, keep], z[0, h, i, keep])
    assert not torch.equal(z, z_full)
    # With the rank the same move changes other keys' scores in those rows (the check above can fail).
    moved = full.scores(q, far, lengths, tokens=tokens)
    assert any(not torch.equal(moved[0, h, i, keep], z_full[0, h, i, keep])
               for h in range(2) for i in range(6) if rows_min_same[h, i])
    with pytest.raises(ValueError, match="another feature set"):
        get_predictor("stacked").load_state_dict(pred.state_dict())
    with pytest.raises(ValueError, match="row_rank"):
        get_predictor("stacked", row_rank="no").fit(q, k, lengths, gold=gold, tokens=tokens)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=12), pairs=st.integers(1, 5000))
def test_pair_chunks_cover_every_sentence_within_the_budget(lengths, pairs):
    from sparsefinder.predictors.learned.calibration import pair_chunks

    lt = torch.tensor(lengths)
    chunks = pair_chunks(lt, pairs)
    assert [i for sl in chunks for i in range(sl.start, sl.stop)] == list(range(len(lengths)))
    for sl in chunks:
        size = (sl.stop - sl.start) * int(lt[sl].max()) ** 2
        assert size <= pairs or sl.stop - sl.start == 1


def test_score_curves_do_not_depend_on_the_chunking():
    from sparsefinder.predictors.learned.calibration import score_curves

    pred, (q, k, lengths, gold, tokens) = fit("stacked")
    acc = CurveAccumulator(2)
    acc.add(pred.scores(q, k, lengths, tokens=tokens), gold.edges, lengths)
    whole = acc.curves()
    for pairs in (1, 50, 10_000):
        chunked = score_curves(pred, q, k, lengths, gold.edges, tokens, pairs=pairs)
        for a, b in zip(whole, chunked, strict=True):
            grid = np.linspace(0, 1, 11)
            assert np.allclose(a.recall_at_density(grid), b.recall_at_density(grid), atol=1e-12)


def test_learned_family_is_derived_from_the_registry():
    assert LEARNED == ["distance_budget", "topk", "stacked", "priors", "cascade", "global_band", "stacked_mlp"]
