"""How a measured throughput figure was obtained, stored beside the figure so it can be judged and repeated."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchMethod:
    """The recipe behind one throughput figure (engine, shape, precision, threads, effort, statistic).

    A bare number cannot be compared with another machine's or re-measured; kept beside the figure, the recipe lets
    a reader judge whether two figures measure the same thing and repeat the measurement.
    """

    engine: str
    shape: str
    dtype: str
    threads: int | None
    runs: int
    seconds: float
    statistic: str = "median"
    round_values: tuple[float, ...] = ()  # the figure from each round, when it merges several
