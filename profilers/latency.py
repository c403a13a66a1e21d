"""The latency harness: time any runnable until its median is stable, and say how stable it got.

Shared machines are noisy, so a fixed number of repeats either wastes time on a quiet machine or reports
noise on a busy one. The harness warms up, then measures in rounds until the distribution-free confidence
interval of the median is narrow enough (relative half-width <= `rel_ci`) or a run/time cap is reached, and
reports whether it converged. Every figure carries the batch size and thread count it was measured at.

Entry points:
- `measure(fn, ...)`: any zero-argument callable; `threads` sets torch's intra-op pool while it runs.
- `measure_onnx(model, feeds, ...)`: an ONNX model (path or bytes) in a fresh ORT session at `threads`.
- `measure_ort_session(session, feeds, ...)`: an existing session (its own thread setting is reported).
- `measure_torch_module(module, inputs, ...)`: a torch module under `torch.inference_mode()`.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import psutil

from profilers.ort import CPU_PROVIDER, make_session, session_threads

Z_95 = 1.96


@dataclass(frozen=True)
class MeasureSettings:
    """How long and how hard to measure. Defaults suit millisecond-scale inference calls."""

    warmup: int = 5
    min_runs: int = 20
    max_runs: int = 2000
    max_seconds: float = 10.0
    rel_ci: float = 0.02
    round_size: int = 10

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.min_runs < 3:
            raise ValueError(f"min_runs must be >= 3 for a median interval, got {self.min_runs}")
        if self.max_runs < self.min_runs:
            raise ValueError(f"max_runs ({self.max_runs}) must be >= min_runs ({self.min_runs})")
        if self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        if not 0 < self.rel_ci < 1:
            raise ValueError(f"rel_ci must be in (0, 1), got {self.rel_ci}")
        if self.round_size < 1:
            raise ValueError(f"round_size must be >= 1, got {self.round_size}")


@dataclass(frozen=True)
class LatencyStats:
    """A measured latency distribution in milliseconds, with the settings that produced it."""

    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    stdev_ms: float
    min_ms: float
    max_ms: float
    runs: int
    converged: bool
    median_ci_rel_halfwidth: float
    seconds: float
    batch_size: int
    threads: int | None
    throughput_items_per_s: float
    peak_rss_delta_bytes: int
    peak_gpu_bytes: int | None = None
    #: A distribution-free ~95% confidence interval of each reported percentile ("p95" -> [low, high] ms), from
    #: the order statistics of the samples: with few runs a tail percentile is near the sample maximum, and its
    #: interval says how little it is pinned down. None in measurements stored before it existed.
    percentile_bounds_ms: dict[str, list[float]] | None = None

    def bounds_ms(self, percentile: float) -> tuple[float, float] | None:
        """The ~95% confidence interval of the latency at `percentile`, or None where it was not recorded."""
        if self.percentile_bounds_ms is None:
            return None
        low, high = self.percentile_bounds_ms[f"p{float(percentile):g}"]
        return float(low), float(high)

    def percentile_ms(self, percentile: float) -> float:
        """The latency at a named percentile (50, 90, 95, 99), as a dict lookup that fails loudly otherwise."""
        table = {50.0: self.p50_ms, 90.0: self.p90_ms, 95.0: self.p95_ms, 99.0: self.p99_ms}
        if float(percentile) not in table:
            raise ValueError(f"percentile must be one of {sorted(table)}, got {percentile}")
        return table[float(percentile)]

    def to_dict(self) -> dict[str, Any]:
        """Plain field values for JSON results and reports; every field is a plain scalar, so it serialises as is."""
        return asdict(self)


def median_ci_rel_halfwidth(samples_ms: Sequence[float]) -> float:
    """Relative half-width of a ~95% distribution-free confidence interval of the median.

    Uses the order statistics at ranks n/2 -/+ 1.96*sqrt(n)/2, which needs no assumption about the shape
    of the latency distribution (it is usually skewed, with a long right tail).
    """
    n = len(samples_ms)
    if n < 3:
        return math.inf
    ordered = sorted(samples_ms)
    spread = Z_95 * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - spread))
    hi = min(n - 1, math.ceil(n / 2 + spread))
    median = statistics.median(ordered)
    if median <= 0:
        return math.inf
    return (ordered[hi] - ordered[lo]) / 2 / median


def binomial_quantile(level: float, n: int, p: float) -> int:
    """The smallest k with P(X <= k) >= `level` for X ~ Binomial(n, p), as `scipy.stats.binom.ppf` gives it. The CDF
    is summed from the log-pmf with the standard library: importing scipy.special cost every timing child half a
    second of its 0.8 s (n is at most a few thousand runs). A CDF value equal to `level` up to rounding counts as
    reaching it."""
    if p <= 0.0 or p >= 1.0:
        return 0 if p <= 0.0 else n
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    cdf = 0.0
    for k in range(n + 1):
        cdf += math.exp(log_n - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q)
        if cdf >= level * (1.0 - 1e-9):
            return k
    return n


def percentile_bounds(samples_ms: Sequence[float], percentile: float, confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of a percentile: the order statistics whose ranks bracket it with
    `confidence` (the number of samples below the true percentile is binomial), clamped to the sample range."""
    ordered = sorted(samples_ms)
    n, q, tail = len(ordered), percentile / 100.0, (1.0 - confidence) / 2
    low_rank = binomial_quantile(tail, n, q)  # samples below the percentile: at least this many, with 1 - tail
    high_rank = binomial_quantile(1.0 - tail, n, q) + 1
    return ordered[max(0, min(n - 1, low_rank - 1))], ordered[max(0, min(n - 1, high_rank - 1))]


def summarize(
    samples_ms: Sequence[float],
    *,
    converged: bool,
    seconds: float,
    batch_size: int,
    threads: int | None,
    peak_rss_delta_bytes: int,
    peak_gpu_bytes: int | None = None,
) -> LatencyStats:
    """Percentiles and moments of raw samples; pure, so reports can be rebuilt from stored samples."""
    if not samples_ms:
        raise ValueError("no latency samples to summarize")
    arr = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p95, p99 = (float(v) for v in np.percentile(arr, [50, 90, 95, 99]))
    return LatencyStats(
        p50_ms=p50,
        p90_ms=p90,
        p95_ms=p95,
        p99_ms=p99,
        mean_ms=float(arr.mean()),
        stdev_ms=float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        min_ms=float(arr.min()),
        max_ms=float(arr.max()),
        runs=int(arr.size),
        converged=converged,
        median_ci_rel_halfwidth=median_ci_rel_halfwidth(samples_ms),
        seconds=seconds,
        batch_size=batch_size,
        threads=threads,
        throughput_items_per_s=batch_size * 1000.0 / p50 if p50 > 0 else math.inf,
        peak_rss_delta_bytes=peak_rss_delta_bytes,
        peak_gpu_bytes=peak_gpu_bytes,
        percentile_bounds_ms={f"p{q}": list(percentile_bounds(samples_ms, q)) for q in (50, 90, 95, 99)},
    )


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op pool at `threads`, restoring the previous size afterwards."""
    if threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_common(batch_size: int, threads: int | None) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for the runtime's default), got {threads}")


def _timed_runs(fn: Callable[[], Any], settings: MeasureSettings, sync: Callable[[], None]) -> tuple[list[float], bool, float, int]:
    """Warm up, then time rounds of calls until the median is stable or a cap is hit.

    Returns (samples in ms, converged, seconds spent timing, peak RSS delta in bytes). RSS is read between
    calls, outside the timed region, so the probe does not inflate latencies.
    """
    process = psutil.Process(os.getpid())
    rss_before = process.memory_info().rss
    peak_rss = rss_before
    for _ in range(settings.warmup):
        fn()
    sync()
    samples: list[float] = []
    converged = False
    start = time.perf_counter()
    while len(samples) < settings.max_runs:
        for _ in range(min(settings.round_size, settings.max_runs - len(samples))):
            t0 = time.perf_counter()
            fn()
            sync()
            samples.append((time.perf_counter() - t0) * 1000.0)
        peak_rss = max(peak_rss, process.memory_info().rss)
        if len(samples) >= settings.min_runs and median_ci_rel_halfwidth(samples) <= settings.rel_ci:
            converged = True
            break
        if time.perf_counter() - start >= settings.max_seconds and len(samples) >= settings.min_runs:
            break
        if time.perf_counter() - start >= settings.max_seconds * 3:
            break  # a very slow call: stop even below min_runs rather than run away
    return samples, converged, time.perf_counter() - start, max(0, peak_rss - rss_before)


def _no_sync() -> None:
    return None


def measure(
    fn: Callable[[], Any],
    *,
    batch_size: int = 1,
    threads: int | None = None,
    settings: MeasureSettings = MeasureSettings(),
    cuda: bool = False,
) -> LatencyStats:
    """Time a zero-argument callable. `threads` sizes torch's intra-op pool for the duration.

    With `cuda=True` each call is followed by `torch.cuda.synchronize()` (kernels are asynchronous) and the
    peak GPU memory allocated during the runs is reported.
    """
    _check_common(batch_size, threads)
    sync = _no_sync
    peak_gpu: int | None = None
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
        sync = torch.cuda.synchronize
    with torch_threads(threads):
        samples, converged, seconds, rss_delta = _timed_runs(fn, settings, sync)
    if cuda:
        import torch

        peak_gpu = int(torch.cuda.max_memory_allocated())
    return summarize(
        samples,
        converged=converged,
        seconds=seconds,
        batch_size=batch_size,
        threads=threads,
        peak_rss_delta_bytes=rss_delta,
        peak_gpu_bytes=peak_gpu,
    )


def measure_pooled(fn: Callable[[], Any], *, threads: int | None, batch_size: int = 1,
                   settings: MeasureSettings = MeasureSettings()) -> LatencyStats:
    """Time a zero-argument callable of an engine that sizes its own thread pool (ONNX Runtime, OpenVINO): `threads`
    is the pool it was built with, recorded, and torch is left alone (not imported where it is not loaded)."""
    _check_common(batch_size, threads)
    samples, converged, seconds, rss_delta = _timed_runs(fn, settings, _no_sync)
    return summarize(samples, converged=converged, seconds=seconds, batch_size=batch_size, threads=threads,
                     peak_rss_delta_bytes=rss_delta)


def measure_ort_session(
    session: Any,
    feeds: Mapping[str, np.ndarray],
    *,
    batch_size: int = 1,
    settings: MeasureSettings = MeasureSettings(),
) -> LatencyStats:
    """Time `session.run` on fixed feeds; the thread count reported is the one the session was built with."""
    output_names = [o.name for o in session.get_outputs()]
    feeds = dict(feeds)
    return measure_pooled(lambda: session.run(output_names, feeds), threads=session_threads(session) or None,
                          batch_size=batch_size, settings=settings)


def measure_onnx(
    model: str | os.PathLike[str] | bytes,
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int,
    batch_size: int = 1,
    providers: Sequence[str] = (CPU_PROVIDER,),
    settings: MeasureSettings = MeasureSettings(),
) -> LatencyStats:
    """Time an ONNX model in a fresh session with `threads` intra-op threads and spinning off."""
    _check_common(batch_size, threads)
    session = make_session(model, threads=threads, providers=providers)
    return measure_ort_session(session, feeds, batch_size=batch_size, settings=settings)


def measure_torch_module(
    module: Any,
    inputs: Mapping[str, Any],
    *,
    batch_size: int = 1,
    threads: int | None = None,
    settings: MeasureSettings = MeasureSettings(),
) -> LatencyStats:
    """Time `module(**inputs)` in eval mode under inference_mode; CUDA is synchronised when inputs live there."""
    import torch

    module.eval()
    on_cuda = any(isinstance(v, torch.Tensor) and v.is_cuda for v in inputs.values())

    def call() -> Any:
        with torch.inference_mode():
            return module(**inputs)

    return measure(call, batch_size=batch_size, threads=threads, settings=settings, cuda=on_cuda)
