"""Knob types: one named dimension of the search, and how an Optuna trial samples it.

A knob knows its values and how to narrow them; it never imports Optuna itself. `distribution_args` gives the
arguments of the matching `trial.suggest_*` call, so the study (the only place that touches Optuna) samples
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
        return self.choices

    def contains(self, value: Any) -> bool:
        return value in self.choices

    def restricted_to(self, keep: tuple[Scalar, ...]) -> "Categorical":
        return Categorical(self.name, tuple(v for v in self.choices if v in keep))

    def suggest_kind(self) -> tuple[str, dict[str, Any]]:
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
        return tuple(range(self.low, self.high + 1, self.step))

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and self.low <= value <= self.high and (value - self.low) % self.step == 0

    def suggest_kind(self) -> tuple[str, dict[str, Any]]:
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
        if self.step is None:
            raise ValueError(f"knob {self.name!r} is continuous; it has no finite list of values")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return tuple(round(self.low + i * self.step, 10) for i in range(count))

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def suggest_kind(self) -> tuple[str, dict[str, Any]]:
        return "float", {"low": self.low, "high": self.high, "step": self.step, "log": self.log}


Knob = Union[Categorical, IntRange, FloatRange]
