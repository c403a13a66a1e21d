"""The latency harness: percentiles of a known distribution, convergence, caps, and honoured thread counts."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import numpy as np
import pytest

from profilers.latency import MeasureSettings, binomial_quantile, measure, measure_onnx, measure_torch_module, median_ci_rel_halfwidth, summarize
from profilers.microbench import matmul_model
from profilers.ort import make_session, session_threads


def sleeper(ms: float):
    return lambda: time.sleep(ms / 1000.0)


def test_sleep_callable_percentiles_within_tolerance() -> None:
    stats = measure(sleeper(5.0), settings=MeasureSettings(warmup=2, min_runs=20, max_runs=200, max_seconds=3.0))
    # sleep overshoots by scheduler latency, never undershoots
    assert 5.0 <= stats.p50_ms < 6.5
    assert stats.p50_ms <= stats.p90_ms <= stats.p95_ms <= stats.p99_ms <= stats.max_ms
    assert stats.min_ms >= 5.0 and stats.runs >= 20
    assert stats.throughput_items_per_s == pytest.approx(1000.0 / stats.p50_ms)


def test_known_bimodal_distribution_is_summarised_exactly() -> None:
    samples = [1.0] * 90 + [10.0] * 10
    stats = summarize(samples, converged=True, seconds=1.0, batch_size=4, threads=2, peak_rss_delta_bytes=0)
    assert stats.p50_ms == 1.0 and stats.p99_ms == 10.0 and stats.mean_ms == pytest.approx(1.9)
    assert stats.throughput_items_per_s == pytest.approx(4000.0)
    assert stats.percentile_ms(95) == stats.p95_ms
    with pytest.raises(ValueError, match="percentile"):
        stats.percentile_ms(42)


def test_stable_callable_converges_early() -> None:
    stats = measure(sleeper(2.0), settings=MeasureSettings(warmup=1, min_runs=20, max_runs=1000, max_seconds=5.0, rel_ci=0.2))
    assert stats.converged and stats.runs < 1000 and stats.median_ci_rel_halfwidth <= 0.2


def test_noisy_callable_stops_at_the_run_cap() -> None:
    delays = itertools.cycle([1.0, 4.0, 2.0, 6.0, 3.0])
    stats = measure(lambda: time.sleep(next(delays) / 1000.0),
                    settings=MeasureSettings(warmup=0, min_runs=10, max_runs=30, max_seconds=30.0, rel_ci=0.001))
    assert stats.runs == 30 and not stats.converged


def test_noisy_callable_stops_at_the_time_cap() -> None:
    delays = itertools.cycle([1.0, 5.0])
    start = time.perf_counter()
    stats = measure(lambda: time.sleep(next(delays) / 1000.0),
                    settings=MeasureSettings(warmup=0, min_runs=10, max_runs=100_000, max_seconds=0.5, rel_ci=0.001))
    elapsed = time.perf_counter() - start
    assert not stats.converged and elapsed < 1.5 and 10 <= stats.runs < 100_000


def test_median_interval_narrows_with_more_samples() -> None:
    rng = np.random.default_rng(0)
    few = median_ci_rel_halfwidth(list(10 + rng.standard_normal(20)))
    many = median_ci_rel_halfwidth(list(10 + rng.standard_normal(2000)))
    assert many < few
    assert median_ci_rel_halfwidth([1.0, 2.0]) == float("inf")


def test_threads_are_honoured_for_torch() -> None:
    import torch

    seen: list[int] = []
    before = torch.get_num_threads()
    settings = MeasureSettings(warmup=0, min_runs=3, max_runs=3)
    stats = measure(lambda: seen.append(torch.get_num_threads()), threads=1, settings=settings)
    assert set(seen) == {1} and stats.threads == 1
    assert torch.get_num_threads() == before  # restored afterwards


def test_torch_module_measurement() -> None:
    import torch

    module = torch.nn.Linear(64, 64)
    stats = measure_torch_module(module, {"input": torch.randn(8, 64)}, batch_size=8, threads=1,
                                 settings=MeasureSettings(warmup=1, min_runs=5, max_runs=50, max_seconds=1.0))
    assert stats.batch_size == 8 and stats.threads == 1 and stats.p50_ms > 0
    assert stats.peak_gpu_bytes is None and stats.peak_rss_delta_bytes >= 0


def test_onnx_measurement_uses_the_thread_count_asked() -> None:
    model = matmul_model(64, integer=False)
    assert session_threads(make_session(model, threads=1)) == 1
    feeds = {"A": np.ones((64, 64), dtype=np.float32)}
    stats = measure_onnx(model, feeds, threads=1, settings=MeasureSettings(warmup=1, min_runs=5, max_runs=20, max_seconds=1.0))
    assert stats.threads == 1 and stats.runs >= 5


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"min_runs": 2}, "min_runs"),
        ({"min_runs": 10, "max_runs": 5}, "max_runs"),
        ({"max_seconds": 0}, "max_seconds"),
        ({"rel_ci": 1.5}, "rel_ci"),
        ({"warmup": -1}, "warmup"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        MeasureSettings(**kwargs)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        measure(lambda: None, batch_size=0)
    with pytest.raises(ValueError, match="threads"):
        measure(lambda: None, threads=0)
    with pytest.raises(ValueError, match="threads"):
        make_session(matmul_model(8, integer=False), threads=0)
    with pytest.raises(ValueError, match="not available here"):
        make_session(matmul_model(8, integer=False), threads=1, providers=("NoSuchExecutionProvider",))


@pytest.mark.parametrize("level", [0.005, 0.025, 0.05, 0.95, 0.975, 0.995])
def test_binomial_quantile_is_scipys_ppf(level: float) -> None:
    from scipy.stats import binom

    for n, p in itertools.product([1, 2, 3, 7, 20, 39, 40, 41, 100, 299, 300, 400, 1000, 2000], [0.5, 0.9, 0.95, 0.99]):
        assert binomial_quantile(level, n, p) == int(binom.ppf(level, n, p)), (n, p)


def test_binomial_quantile_takes_an_exact_tie_at_its_rank() -> None:
    assert binomial_quantile(0.5, 7, 0.5) == 3  # P(X <= 3) is exactly 1/2 for 7 fair coins


def test_a_timing_child_imports_neither_scipy_stats_nor_the_profile() -> None:
    """Every measurement starts a child that imports profilers.isolated (or .generation): the profile's modules and
    scipy.stats would add seconds to each one."""
    code = ("import sys, profilers.isolated, profilers.generation, profilers.latency as l; l.percentile_bounds([1.0] * 9, 95);"
            "print(sorted(m for m in ('scipy.stats', 'pydantic', 'onnx', 'profilers.hardware', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
