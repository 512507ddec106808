"""Helpers that test modules in different folders share: hypothesis graph cases, sweep-frame checks and builders."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from hypothesis import strategies as st

from sparsefinder.metrics import COUNT_COLUMNS, RATIO_COLUMNS


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
        np.testing.assert_allclose(got[col].to_numpy(), means[col].to_numpy(), rtol=1e-12, atol=1e-12,
                                   err_msg=f"{label} {col}")
    for col in COUNT_COLUMNS:
        np.testing.assert_allclose(got[col].to_numpy(), sums[col].to_numpy(), rtol=1e-12, err_msg=f"{label} {col}")


def grid_frame(methods: Iterable[str], params: Sequence[str], cells: Sequence[tuple[int, int]],
               values: Callable[[], dict[str, Any]]) -> pd.DataFrame:
    """A sweep-like frame: a row per method, params and ``(layer, head)`` cell, nested in that order.

    ``values()`` is called once a row in that order, so a seeded generator behind it fills the same frame every time.
    """
    return pd.DataFrame([{"method": method, "params": p, "layer": layer, "head": head, **values()}
                         for method in methods for p in params for layer, head in cells])
