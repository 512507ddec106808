"""Declared hyperparameter constraints, checked in one place (as scikit-learn's ``_parameter_constraints``).

A predictor class lists its constraints by hyperparameter name::

    constraints = {"n_clusters": Int(1), "seed": Int(0), "decay": Real(0, 1, text="lie in [0, 1]")}

and :meth:`Predictor._check_params <sparsefinder.predictors.base.Predictor._check_params>`
checks the constraints of the class and of every base class (a subclass may
override a base's entry) when ``fit`` or ``predict`` runs, never in ``__init__``.
A check that relates several hyperparameters stays a small ``_check_params``
override next to the method it protects.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class Constraint:
    """One hyperparameter's admissible values; :meth:`check` raises ``ValueError`` naming it."""

    def check(self, name: str, value: Any) -> None:
        raise NotImplementedError


def check_int(value: Any, name: str, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (bools are not ints here), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True)
class Int(Constraint):
    """An integer ``>= minimum``; ``None`` too when ``optional``."""

    minimum: int | None = None
    optional: bool = False

    def check(self, name: str, value: Any) -> None:
        if value is None and self.optional:
            return
        check_int(value, name, self.minimum)


@dataclass(frozen=True)
class Real(Constraint):
    r"""A real number (not a bool, not NaN) in :math:`[low, high]`, or :math:`(low, high]` with ``low_open``.

    ``finite`` also refuses infinities. ``text`` completes the error message
    "``name`` must ``text``, got ``value``".
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    finite: bool = False
    text: str = "be a number"

    def check(self, name: str, value: Any) -> None:
        ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and not math.isnan(value)
        if ok and self.finite:
            ok = math.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value <= self.high
        if not ok:
            raise ValueError(f"{name} must {self.text}, got {value!r}")


@dataclass(frozen=True)
class Bool(Constraint):
    """``True`` or ``False`` (numpy bools too)."""

    text: str = "be a bool"

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, bool | np.bool_):
            raise ValueError(f"{name} must {self.text}, got {value!r}")


@dataclass(frozen=True)
class Options(Constraint):
    """One of a fixed set of values."""

    values: Sequence[Any]
    text: str | None = None

    def check(self, name: str, value: Any) -> None:
        if value not in self.values:
            raise ValueError(f"{name} must {self.text or f'be one of {tuple(self.values)}'}, got {value!r}")
