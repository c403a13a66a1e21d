"""Knob types: one named dimension of the search, and how an Optuna trial samples it.

A knob knows its values and how to narrow them; it never imports Optuna itself. `suggest_kind` gives the kind
and arguments of the matching `trial.suggest_*` call, so the study (the only place that touches Optuna) samples
every knob the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

Scalar = Union[int, float, str]


@dataclass(frozen=True)
class Categorical:
    """A finite set of values, searched without assuming any order between them."""

    name: str
    choices: tuple[Scalar, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError(f"knob {self.name!r} has no values to search")
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"knob {self.name!r} lists a value twice: {list(self.choices)}")

    def values(self) -> tuple[Scalar, ...]:
        """The choices in their listed order; the same method on every knob type, so a space can check any knob's
        values without asking which type it is."""
        return self.choices

    def contains(self, value: Any) -> bool:
        """Whether `value` is one of the choices: how a space tells if a candidate proposed elsewhere is inside it."""
        return value in self.choices

    def restricted_to(self, keep: tuple[Scalar, ...]) -> "Categorical":
        """The knob narrowed to the choices also in `keep`, order preserved; a new knob, since knobs are frozen and
        shared between spaces."""
        return Categorical(self.name, tuple(v for v in self.choices if v in keep))

    def suggest_kind(self) -> tuple[str, dict[str, Any]]:
        """("categorical", kwargs) for `trial.suggest_categorical`, so sampling stays in the one module that imports
        Optuna."""
        return "categorical", {"choices": list(self.choices)}


@dataclass(frozen=True)
class IntRange:
    """Integers low..high (inclusive) in steps, optionally sampled on a log scale."""

    name: str
    low: int
    high: int
    step: int = 1
    log: bool = False

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"knob {self.name!r}: low {self.low} is above high {self.high}")
        if self.step < 1 or (self.log and self.step != 1):
            raise ValueError(f"knob {self.name!r}: step must be >= 1 (and 1 on a log scale), got {self.step}")
        if self.log and self.low < 1:
            raise ValueError(f"knob {self.name!r}: a log scale needs low >= 1, got {self.low}")

    def values(self) -> tuple[int, ...]:
        """Every integer the range can yield, low first: finite, so a space can validate each one up front."""
        return tuple(range(self.low, self.high + 1, self.step))

    def contains(self, value: Any) -> bool:
        """Whether `value` is an integer on the range's grid (on a step from low), not merely between its bounds."""
        return isinstance(value, int) and self.low <= value <= self.high and (value - self.low) % self.step == 0

    def suggest_kind(self) -> tuple[str, dict[str, Any]]:
        """("int", kwargs) for `trial.suggest_int`, so sampling stays in the one module that imports Optuna."""
        return "int", {"low": self.low, "high": self.high, "step": self.step, "log": self.log}


@dataclass(frozen=True)
class FloatRange:
    """Reals in [low, high], optionally on a grid (`step`) or a log scale."""

    name: str
    low: float
    high: float
    step: float | None = None
    log: bool = False

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"knob {self.name!r}: low {self.low} is above high {self.high}")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError(f"knob {self.name!r}: a log scale needs low > 0 and no step")

    def values(self) -> tuple[float, ...]:
        """The grid's points, rounded so float steps do not drift (0.1 * 3 -> 0.3); a continuous range has none and
        raises, since its values cannot be listed."""
        if self.step is None:
            raise ValueError(f"knob {self.name!r} is continuous; it has no finite list of values")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return tuple(round(self.low + i * self.step, 10) for i in range(count))

    def contains(self, value: Any) -> bool:
        """Whether `value` is a number within the bounds; the grid is not checked, because float steps make exact
        membership fragile."""
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def suggest_kind(self) -> tuple[str, dict[str, Any]]:
        """("float", kwargs) for `trial.suggest_float`, so sampling stays in the one module that imports Optuna."""
        return "float", {"low": self.low, "high": self.high, "step": self.step, "log": self.log}


Knob = Union[Categorical, IntRange, FloatRange]
