"""Helpers that test modules in different folders share: hypothesis graph cases, sweep-frame checks and builders."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from entmax import entmax15, entmax_bisect
from hypothesis import strategies as st

from sparsefinder.metrics import COUNT_COLUMNS, RATIO_COLUMNS

#: One line of ~1,500 MiniLM tokens: above LONG_INPUT_TOKENS, within the "llama-long" tiny model's 2,048.
LONG_TEXT = " ".join(["Sparse attention skips most pairs of tokens, and entmax gives exact zeros."] * 90)

MASS_COLUMNS = ("mass_recall", "gold_mass", "mass_hits")
# The sweep's gold probabilities are float32 entmax; references are float64 (entmax package): each probability
# agrees to ~1e-7 and a head's mass sums at most a few hundred of them.
MASS_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def graph_cases(max_heads: int, max_length: int, **extra: st.SearchStrategy) -> dict[str, st.SearchStrategy]:
    """``@given`` keywords of a random graph batch: ``seed``, ``B`` (1 to 3 sentences), ``H``, ``N``, ``causal``.

    ``extra`` adds the test's own arguments, so one call spells a test's whole case.
    """
    return dict(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), H=st.integers(1, max_heads),
                N=st.integers(1, max_length), causal=st.booleans(), **extra)


def assert_aggregates_match(got: pd.DataFrame, ref: pd.DataFrame, by: str | list[str], label: str) -> None:
    """``got``'s rows (sorted like ``ref.groupby(by)``) are ``ref``'s per-group ratio means and count sums."""
    means = ref.groupby(by)[list(RATIO_COLUMNS)].mean()
    sums = ref.groupby(by)[list(COUNT_COLUMNS)].sum()
    for col in RATIO_COLUMNS:
        tol = MASS_TOLERANCE if col in MASS_COLUMNS else dict(rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[col].to_numpy(), means[col].to_numpy(), **tol, err_msg=f"{label} {col}")
    for col in COUNT_COLUMNS:
        tol = MASS_TOLERANCE if col in MASS_COLUMNS else dict(rtol=1e-12)
        np.testing.assert_allclose(got[col].to_numpy(), sums[col].to_numpy(), **tol, err_msg=f"{label} {col}")


def reference_probs(q: torch.Tensor, k: torch.Tensor, causal: bool, window: int | None, scaling: float,
                    softcap: float | None, alpha: float | list) -> torch.Tensor:
    """``(H, n, n)`` float64 entmax probabilities of one sentence's ``(H, n, d)`` q and k, by the entmax package.

    Written from the definition, independently of :mod:`sparsefinder.mass`: scores ``scaling * q k^T``,
    soft-capped, pairs outside the causal/window mask excluded, entmax over each row.
    """
    s = torch.einsum("hid,hjd->hij", q.double(), k.double()) * scaling
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    n = s.shape[-1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (i - j).abs() <= window
    s = s.masked_fill(~allowed, -1e30)
    a = torch.as_tensor(alpha, dtype=torch.float64).flatten()
    if a.numel() == 1 and float(a) == 1.5:
        return entmax15(s, dim=-1) * allowed
    a = a.expand(s.shape[0]).view(-1, 1, 1).expand(*s.shape[:-1], 1).contiguous()
    return entmax_bisect(s, alpha=a, dim=-1, n_iter=80) * allowed


def grid_frame(methods: Iterable[str], params: Sequence[str], cells: Sequence[tuple[int, int]],
               values: Callable[[], dict[str, Any]]) -> pd.DataFrame:
    """A sweep-like frame: a row per method, params and ``(layer, head)`` cell, nested in that order.

    ``values()`` is called once a row in that order, so a seeded generator behind it fills the same frame every time.
    """
    return pd.DataFrame([{"method": method, "params": p, "layer": layer, "head": head, **values()}
                         for method in methods for p in params for layer, head in cells])


def stored_gold_probs(store, i: int, layer: int) -> torch.Tensor:
    """``(1, H, n, n)`` gold probabilities of stored sentence ``i``: :func:`reference_probs` of its q and k with
    the store's recorded scaling, soft-cap and alpha, zero off its stored gold graph (as the sweep defines them)."""
    s = store.sentence(i)
    cfg = store.score_settings(layer)
    gold = s.gold_graph(layer)
    probs = reference_probs(s.queries(layer), s.keys(layer), store.causal, gold.window, cfg["scaling"],
                            cfg["softcap"], cfg["alpha"])
    return (probs * gold.edges[0])[None]
