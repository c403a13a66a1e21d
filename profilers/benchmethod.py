"""How a measured throughput figure was obtained, stored beside the figure so it can be judged and repeated."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchMethod:
    engine: str
    shape: str
    dtype: str
    threads: int | None
    runs: int
    seconds: float
    statistic: str = "median"
    round_values: tuple[float, ...] = ()  # the figure from each round, when it merges several
