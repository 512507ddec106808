"""The predictor protocol, registry and shared helpers; invariants every registered predictor must keep.

Also holds the small helpers (random batches, per-method context, loop
references of the shared patterns) that the other ``test_predictors_*`` files import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefinder.graphs import AttentionGraph
from sparsefinder.predictors import REGISTRY, NotFittedError, Predictor, get_predictor, list_predictors, register
from sparsefinder.predictors.base import global_token_mask, grouped_cost, shared_pattern, window_mask
from sparsefinder.predictors.clustering import sq_dists

FAST = settings(max_examples=25, deadline=None)

ALL = [
    "distance", "bucketing", "kmeans", "blocks",
    "window", "bigbird", "longformer", "reformer", "routing", "strided",
    "distance_budget", "topk", "stacked", "priors", "cascade", "global_band", "stacked_mlp",
    "syntax", "lexical", "position", "random", "exact_bounds", "pages",
]
DEFAULT_COST = ["blocks", "window", "bigbird", "longformer", "strided", "syntax", "lexical", "position", "random"]


# --------------------------------------------------------------------------- helpers shared by the test files


def is_valid(i: int, j: int, length: int, causal: bool) -> bool:
    return i < length and j < length and (not causal or j <= i)


def random_qk(lengths: list[int], n: int, heads: int = 2, dim: int = 3, seed: int = 0, ties: bool = False):
    """Float64 ``(B, H, N, dim)`` q, k with garbage on padding (predictors must ignore it)."""
    rng = np.random.default_rng(seed)
    shape = (len(lengths), heads, n, dim)
    if ties:  # few distinct values: exercises deterministic tie-breaking
        q, k = rng.integers(0, 3, shape).astype(float), rng.integers(0, 3, shape).astype(float)
    else:
        q, k = rng.normal(size=shape), rng.normal(size=shape)
    return torch.from_numpy(q), torch.from_numpy(k), torch.tensor(lengths, dtype=torch.long)


def sentence_context(name: str, lengths: list[int], seed: int = 0) -> dict[str, Any]:
    """Per-sentence context (lists, so sentence ``b`` alone is ``[x[b]]``) for the methods that need one."""
    rng = np.random.default_rng(seed + 1)
    if name == "syntax":
        word_ids, word_heads = [], []
        for n in lengths:
            # Special first/last tokens (None), the rest grouped into words of 1–2 subword tokens.
            inner = max(n - 2, 0)
            ids: list[int | None] = []
            w = 0
            while len(ids) < inner:
                ids += [w] * min(int(rng.integers(1, 3)), inner - len(ids))
                w += 1
            ids = ([None] if n >= 1 else []) + ids + ([None] if n >= 2 else [])
            word_ids.append(ids[:n])
            heads = [-1 if v == 0 else int(rng.integers(0, v)) for v in range(w)]  # a random tree rooted at 0
            word_heads.append(heads)
        return {"word_ids": word_ids, "word_heads": word_heads}
    if name == "lexical":
        return {"embeddings": [torch.from_numpy(rng.normal(size=(n, 5))) for n in lengths]}
    if name in ("bigbird", "random"):
        return {"sentence_ids": [int(x) for x in rng.integers(0, 1000, len(lengths))]}
    if name == "distance":
        return {"head_dim": 12}
    if "tokens" in REGISTRY[name].context_keys:
        return {"tokens": toy_tokens(lengths)}
    return {}


def slice_context(context: dict[str, Any], b: int) -> dict[str, Any]:
    return {key: (value if key == "head_dim" else [value[b]]) for key, value in context.items()}


def make_predictor(name: str, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, **params: Any) -> Predictor:
    """A predictor with small test hyperparameters, fitted on (q, k) when it learns."""
    small = {"kmeans": {"n_clusters": 3}, "blocks": {"n_clusters": 3, "max_iter": 20}, "routing": {"n_clusters": 3},
             "distance": {"threshold": 3.0}, "bucketing": {"n_buckets": 3}, "strided": {"stride": 3},
             "stacked_mlp": {"hidden": 3, "steps": 20}}
    pred = get_predictor(name, **{**small.get(name, {}), **params})
    if pred.family == "learned":  # learns from gold graphs (and token strings): a seeded random gold graph
        g = torch.Generator().manual_seed(int(lengths.sum()) + 17)
        edges = torch.rand((*q.shape[:3], q.shape[2]), generator=g) < 0.4
        gold = AttentionGraph(edges, lengths)
        pred.fit(q, k, lengths, gold=gold, tokens=toy_tokens([int(x) for x in lengths]))
    elif pred.requires_fit:
        pred.fit(q, k, lengths)
    return pred


def toy_tokens(lengths: list[int]) -> list[list[str]]:
    """Token strings with repeats (the learned predictors' token priors key on them)."""
    return [[f"t{i % 3}" for i in range(n)] for n in lengths]


def loop_window(n: int, w: int) -> np.ndarray:
    out = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            out[i, j] = w > 0 and abs(i - j) <= w // 2
    return out


def loop_global(length: int, n: int) -> np.ndarray:
    out = np.zeros((n, n), dtype=bool)
    special = {0, length - 1} if length > 0 else set()
    for i in range(n):
        for j in range(n):
            out[i, j] = i in special or j in special
    return out


# (b, h, length) -> (i, j) -> how many groups query i and key j of sentence b, head h share.
PairShares = Callable[[int, int, int], Callable[[int, int], int]]


def loop_shared_graph(shape: Sequence[int], lengths: torch.Tensor, causal: bool,
                      pair_shares: PairShares) -> tuple[np.ndarray, np.ndarray]:
    """Loop reference of the grouping predictors (buckets, clusters, hashes): ``(B, H, N, N)`` edges, ``(B, H)`` cost.

    ``shape`` is ``(B, H, N)``. ``pair_shares(b, h, length)`` gives, for sentence ``b`` and head ``h``, how many groups
    query ``i`` and key ``j`` share; a valid pair is an edge when that is positive and costs that many comparisons.
    """
    b_, h_, n = shape
    edges = np.zeros((b_, h_, n, n), dtype=bool)
    cost = np.zeros((b_, h_))
    for b in range(b_):
        m = int(lengths[b])
        for h in range(h_):
            shares = pair_shares(b, h, m)
            for i in range(m):
                for j in range(m):
                    if is_valid(i, j, m, causal):
                        shared = shares(i, j)
                        edges[b, h, i, j] = shared > 0
                        cost[b, h] += shared
    return edges, cost


def as_graph_edges(raw: np.ndarray, lengths: torch.Tensor, causal: bool) -> torch.Tensor:
    """Brute-force ``(B, H, N, N)`` edges restricted to valid pairs with loops."""
    out = np.array(raw, dtype=bool, copy=True)
    b_, h_, n, _ = out.shape
    for b in range(b_):
        for h in range(h_):
            for i in range(n):
                for j in range(n):
                    out[b, h, i, j] &= is_valid(i, j, int(lengths[b]), causal)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- registry and estimator API


def test_registry_lists_every_method():
    assert list_predictors() == ALL
    assert set(REGISTRY) == set(ALL)
    assert list_predictors("sparsefinder") == ["distance", "bucketing", "kmeans", "blocks"]
    assert list_predictors("pattern") == ["syntax", "lexical", "position", "random"]
    for name, cls in REGISTRY.items():
        assert cls.name == name and issubclass(cls, Predictor)
    with pytest.raises(KeyError, match="unknown predictor"):
        get_predictor("nope")


def test_expand_methods_reads_families_from_the_registry():
    from sparsefinder.predictors import expand_methods

    paper = expand_methods("sparsefinder,baseline,pattern")
    # Family by family, each in registration order.
    assert paper == [m for f in ("sparsefinder", "baseline", "pattern") for m in ALL if REGISTRY[m].family == f]
    assert len(paper) == 15  # the paper's comparison (4 Sparsefinder methods, 6 baselines, 4 patterns) + pages
    learned = expand_methods(["learned"])
    assert "stacked_mlp" not in learned  # opt-in: not in the default sweep, so not in its family's list
    assert learned == [m for m in ALL if REGISTRY[m].family == "learned" and REGISTRY[m].default_sweep]
    assert expand_methods("window,baseline,window") == list_predictors("baseline")  # order kept, no repeats
    assert expand_methods(["stacked_mlp"]) == ["stacked_mlp"]  # a name is itself, opt-in or not
    with pytest.raises(KeyError, match="unknown predictor or family"):
        expand_methods("nope")


def test_register_rejects_duplicates_and_non_predictors():
    class Dup(Predictor):
        name = "distance"

    with pytest.raises(ValueError, match="already registered"):
        register(Dup)
    with pytest.raises(TypeError):
        register(int)  # type: ignore[arg-type]

    class Nameless(Predictor):
        pass

    with pytest.raises(ValueError, match="no name"):
        register(Nameless)
    assert list_predictors() == ALL


EVEN_2_20 = list(range(2, 21, 2))


@pytest.mark.parametrize(
    ("name", "key", "values"),
    [
        ("distance", "threshold", [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]),
        ("bucketing", "n_buckets", EVEN_2_20),
        ("kmeans", "n_clusters", EVEN_2_20),
        ("blocks", "top_k", EVEN_2_20),
        ("window", "window", [0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27]),
        ("bigbird", "num_random", EVEN_2_20),
        ("longformer", "num_global", EVEN_2_20),
        ("reformer", "n_buckets", EVEN_2_20),
        ("routing", "n_clusters", EVEN_2_20),
        ("strided", "stride", [4, 6, 8, 10, 12, 14, 16, 18, 20]),
        ("syntax", "hops", [1, 2, 3]),
        ("lexical", "sparsity", [0.5, 0.6, 0.7, 0.8, 0.9]),
        ("position", "window", [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27]),
        ("random", "sparsity", [0.5, 0.6, 0.7, 0.8, 0.9]),
    ],
)
def test_grid_matches_spec(name, key, values):
    grid = REGISTRY[name].grid()
    assert grid and all(set(point) == {key} for point in grid)
    assert [point[key] for point in grid] == pytest.approx(values)
    for point in grid:  # every grid point is a valid hyperparameter setting
        pred = get_predictor(name, **point)
        pred._check_params()


@pytest.mark.parametrize("name", ALL)
def test_get_params_round_trip(name):
    pred = get_predictor(name)
    params = pred.get_params()
    assert "window" in params and "global_tokens" in params
    assert type(pred)(**params).get_params() == params
    grid_point = REGISTRY[name].grid()[-1]
    clone = pred.clone(**grid_point)
    assert clone.get_params() == {**params, **grid_point}
    assert pred.get_params() == params  # clone does not touch the original
    assert pred.set_params(**grid_point) is pred and pred.get_params() == clone.get_params()
    with pytest.raises(ValueError, match="no hyperparameter"):
        pred.set_params(not_a_param=1)
    assert repr(get_predictor(name)).startswith(type(pred).__name__ + "(")


def test_repr_shows_changed_params():
    assert repr(get_predictor("bucketing", n_buckets=6)) == "BucketingPredictor(n_buckets=6)"
    assert repr(get_predictor("distance")) == "DistancePredictor()"


@pytest.mark.parametrize(
    ("name", "params"),
    [("bucketing", {"n_buckets": 0}), ("window", {"window": -1}), ("window", {"window": 1.5}),
     ("kmeans", {"seed": -1}), ("reformer", {"n_buckets": 3}), ("strided", {"stride": 0}),
     ("random", {"sparsity": 1.5}), ("blocks", {"variant": "v3"}), ("distance", {"global_tokens": "yes"})],
)
def test_bad_hyperparameters_fail_at_use_not_construction(name, params):
    pred = get_predictor(name, **params)  # scikit-learn: no validation in __init__
    q, k, lengths = random_qk([3], 3)
    with pytest.raises(ValueError):
        pred.fit(q, k, lengths)
        pred.predict(q, k, lengths, **sentence_context(name, [3]))


@pytest.mark.parametrize("name", ["kmeans", "blocks", "routing"])
def test_fitted_methods_refuse_to_predict_unfitted(name):
    q, k, lengths = random_qk([3], 3)
    pred = get_predictor(name)
    assert pred.requires_fit and not pred.is_fitted()
    with pytest.raises(NotFittedError):
        pred.predict(q, k, lengths)
    with pytest.raises(NotFittedError):
        pred.state_dict()


def test_input_checks():
    q, k, lengths = random_qk([3, 2], 3)
    pred = get_predictor("distance")
    with pytest.raises(ValueError, match="lengths"):
        pred.predict(q, k, torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="lengths"):
        pred.predict(q, k, torch.tensor([3]))
    with pytest.raises(ValueError, match="k must be"):
        pred.predict(q, k[:, :, :2], lengths)
    with pytest.raises(ValueError, match="last dimension"):
        pred.predict(q, k[..., :2], lengths)
    with pytest.raises(ValueError, match="q must be"):
        pred.predict(q[0], k, lengths)
    # k = None means k = q; plain lists of lengths are accepted.
    assert torch.equal(pred.predict(q, None, [3, 2]).edges, pred.predict(q, q, lengths).edges)


def test_context_keys_of_other_methods_are_ignored_but_typos_fail():
    q, k, lengths = random_qk([3], 3)
    pred = get_predictor("window")
    base = pred.predict(q, k, lengths)
    assert torch.equal(pred.predict(q, k, lengths, head_dim=12, sentence_ids=[1]).edges, base.edges)
    with pytest.raises(TypeError, match="unknown context"):
        pred.predict(q, k, lengths, head_dims=12)


def test_distance_cost_needs_head_dim():
    q, k, lengths = random_qk([3], 3)
    pred = get_predictor("distance")
    pred.predict(q, k, lengths)  # the graph itself does not need it
    with pytest.raises(ValueError, match="head_dim"):
        pred.cost(q, k, lengths)


# --------------------------------------------------------------------------- shared helpers vs loops


@given(st.integers(1, 8), st.integers(0, 20))
@FAST
def test_window_mask_matches_loops(n, w):
    assert np.array_equal(window_mask(n, w).numpy(), loop_window(n, w))


@given(st.lists(st.integers(0, 6), min_size=1, max_size=4), st.integers(0, 2))
@FAST
def test_global_tokens_use_each_sentences_own_last_token(lengths, extra):
    n = max(lengths) + extra
    mask = global_token_mask(torch.tensor(lengths), n)
    assert mask.shape == (len(lengths), 1, n, n)
    for b, length in enumerate(lengths):
        assert np.array_equal(mask[b, 0].numpy(), loop_global(length, n))


@given(st.lists(st.integers(0, 6), min_size=1, max_size=3), st.integers(0, 9), st.booleans())
@FAST
def test_shared_pattern_is_window_or_global(lengths, w, glob):
    n = max(lengths)
    out = shared_pattern(torch.tensor(lengths), n, w, glob)
    if w == 0 and not glob:
        assert out is None
        return
    for b, length in enumerate(lengths):
        expected = loop_window(n, w) | (loop_global(length, n) if glob else False)
        assert np.array_equal(out[b, 0].numpy(), expected)


@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 4), st.booleans(), st.integers(0, 10**6))
@FAST
def test_grouped_cost_matches_loops(batch, n, groups, causal, seed):
    rng = np.random.default_rng(seed)
    qm = rng.random((batch, 2, groups, n)) < 0.5
    km = rng.random((batch, 2, groups, n)) < 0.5
    got = grouped_cost(torch.from_numpy(qm), torch.from_numpy(km), causal)
    for b in range(batch):
        for h in range(2):
            expected = sum(
                1 for g in range(groups) for i in range(n) for j in range(n)
                if qm[b, h, g, i] and km[b, h, g, j] and (not causal or j <= i)
            )
            assert got[b, h].item() == expected


def test_sq_dists_is_exactly_the_loop_sum():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 4, 3))
    got = sq_dists(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    for h in range(2):
        for p in range(5):
            for c in range(4):
                total = 0.0
                for e in range(3):
                    total += (a[h, p, e] - b[h, c, e]) ** 2
                assert got[h, p, c] == total


def test_sq_dists_with_gradients_is_the_same_sum_and_differentiable():
    """Training (stacked projections) differentiates through sq_dists: the in-place path cannot, the other
    one must give the same numbers."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    with_grad = sq_dists(a, b)
    with torch.no_grad():
        plain = sq_dists(a, b)
    assert torch.equal(with_grad.detach(), plain)
    with_grad.sum().backward()
    expected = 2 * (a.detach()[:, :, None, :] - b[:, None, :, :]).sum(dim=2)
    torch.testing.assert_close(a.grad, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- invariants of every predictor

BATCHES = [([5, 1, 3, 0], 5), ([1], 1), ([2, 1], 2), ([7, 6], 8)]


def run(name: str, lengths: list[int], n: int, causal: bool, seed: int = 0, **params: Any):
    q, k, lt = random_qk(lengths, n, seed=seed)
    pred = make_predictor(name, q, k, lt, **params)
    context = sentence_context(name, lengths, seed)
    graph, cost = pred.predict_with_cost(q, k, lt, causal=causal, **context)
    return pred, graph, cost, (q, k, lt, context)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("lengths", "n"), BATCHES)
@pytest.mark.parametrize("causal", [False, True])
def test_no_padding_or_future_edges_and_cost_is_sane(name, lengths, n, causal):
    pred, graph, cost, (q, k, lt, context) = run(name, lengths, n, causal)
    raw = graph.edges
    assert isinstance(graph, AttentionGraph) and raw.shape == (len(lengths), 2, n, n)
    assert graph.causal == causal and torch.equal(graph.lengths, lt)
    for b, length in enumerate(lengths):
        assert not raw[b, :, length:, :].any() and not raw[b, :, :, length:].any()
        if causal:
            assert not raw[b].triu(diagonal=1).any()
    assert cost.shape == (len(lengths), 2) and cost.dtype == torch.float64 and bool((cost >= 0).all())
    if name in DEFAULT_COST:
        assert torch.equal(cost, graph.num_edges().double())
    assert torch.equal(pred.cost(q, k, lt, causal=causal, **context), cost)
    assert torch.equal(pred.predict(q, k, lt, causal=causal, **context).edges, raw)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("causal", [False, True])
def test_predict_is_pure_and_deterministic(name, causal):
    pred, graph, _, (q, k, lt, context) = run(name, [6, 4, 2], 6, causal)
    state = {key: v.clone() for key, v in pred.state_dict().items()} if pred.requires_fit else {}
    params = pred.get_params()
    again = make_predictor(name, q, k, lt)  # a fresh instance, same seed
    assert torch.equal(again.predict(q, k, lt, causal=causal, **context).edges, graph.edges)
    assert torch.equal(pred.predict(q, k, lt, causal=causal, **context).edges, graph.edges)
    assert pred.get_params() == params
    for key, value in state.items():
        assert torch.equal(pred.state_dict()[key], value)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("causal", [False, True])
def test_a_sentence_gets_the_same_graph_alone_or_in_a_padded_batch(name, causal):
    lengths, n = [6, 3, 1, 5], 7
    pred, graph, cost, (q, k, lt, context) = run(name, lengths, n, causal)
    for b, length in enumerate(lengths):
        alone, alone_cost = pred.predict_with_cost(
            q[b : b + 1, :, :length], k[b : b + 1, :, :length], [length], causal=causal, **slice_context(context, b)
        )
        assert torch.equal(alone.edges[0], graph.sentence(b)), f"sentence {b}"
        assert torch.allclose(alone_cost[0], cost[b])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("lengths", "n"), BATCHES)
def test_window_of_twice_n_gives_the_full_graph_for_every_method(name, lengths, n):
    _, graph, _, _ = run(name, lengths, n, causal=False, window=2 * n)
    assert torch.equal(graph.edges, graph.valid_pairs().expand_as(graph.edges))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("causal", [False, True])
def test_global_tokens_are_or_ed_in_with_the_right_cost(name, causal):
    lengths, n = [6, 3, 1], 6
    _, plain, plain_cost, _ = run(name, lengths, n, causal, global_tokens=False)
    _, glob, glob_cost, _ = run(name, lengths, n, causal, global_tokens=True)
    expected = plain.edges.clone()
    for b, length in enumerate(lengths):
        expected[b] |= torch.from_numpy(loop_global(length, n))
    assert torch.equal(glob.edges, as_graph_edges(expected.numpy(), torch.tensor(lengths), causal))
    if name == "bigbird":  # its random keys avoid the global tokens, so the core itself changes
        return
    added = (glob.edges & ~plain.edges).sum(dim=(-1, -2)).double()
    assert torch.allclose(glob_cost, plain_cost + added)


@pytest.mark.parametrize("name", [n for n in ALL if REGISTRY[n].stochastic])
def test_different_seeds_usually_differ(name):
    lengths, n = [12, 10], 12
    graphs = []
    for seed in range(3):
        q, k, lt = random_qk(lengths, n, seed=0)
        params = {"seed": seed}
        if name in ("kmeans", "blocks", "routing"):
            params["n_clusters"] = 4
        if name == "bigbird":
            params.update(window=0, global_tokens=False)
        pred = make_predictor(name, q, k, lt, **params)
        graphs.append(pred.predict(q, k, lt, **sentence_context(name, lengths)).edges)
    assert not (torch.equal(graphs[0], graphs[1]) and torch.equal(graphs[1], graphs[2]))


def test_half_precision_inputs_are_accepted():
    q, k, lengths = random_qk([4], 4)
    pred = get_predictor("distance", threshold=2.0)
    g16 = pred.predict(q.half(), k.half(), lengths)
    assert g16.edges.shape == (1, 2, 4, 4)


def test_empty_batch_of_zero_length_sentences():
    q, k, lengths = random_qk([0, 0], 2)
    for name in ALL:
        pred = make_predictor(name, *random_qk([2], 2)) if REGISTRY[name].requires_fit else get_predictor(name)
        graph = pred.predict(q, k, lengths, **sentence_context(name, [0, 0]))
        assert not graph.edges.any() and math.isclose(float(pred.cost(
            q, k, lengths, **sentence_context(name, [0, 0])).sum()), 0.0)
