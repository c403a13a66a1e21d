"""The roofline: an encoder's analytic operations over its latency, against the profile's GEMM peak for the
precision its GEMMs compute in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from profilers.hardware import HardwareProfile
from profilers.predictor import ModelShape, PredictionError, Workload, analytic_cost
from profilers.roofline import compute_precision, roofline

FIXTURE = Path(__file__).parent / "fixtures" / "result_tiny.json"
MINILM = ModelShape(6, 384, 12, 1536, 32)
WORKLOAD = Workload(1, 64)


@pytest.fixture()
def bench():
    profile = HardwareProfile.from_dict(json.loads(FIXTURE.read_text())["hardware"])
    assert profile.microbench is not None
    return profile.microbench


def test_a_model_timed_at_its_operations_over_the_peak_sits_at_100_percent(bench) -> None:
    cost = analytic_cost(MINILM, WORKLOAD)
    ops = cost.gemm_fp32_flops + cost.attention_flops
    at_peak_ms = ops / (bench.fp32_gemm_gflops * 1e6)
    assert roofline(MINILM, WORKLOAD, at_peak_ms, bench).pct == pytest.approx(100.0)
    assert roofline(MINILM, WORKLOAD, 4 * at_peak_ms, bench).pct == pytest.approx(25.0)


def test_int8_and_int4_compare_with_the_peak_they_compute_in(bench) -> None:
    int8 = roofline(ModelShape(6, 384, 12, 1536, 8), WORKLOAD, 5.0, bench)
    assert int8.precision == "int8" and int8.peak_gops == bench.int8_gemm_gops
    int4 = ModelShape(6, 384, 12, 1536, 4)
    assert roofline(int4, WORKLOAD, 5.0, bench).peak_gops == bench.int8_gemm_gops  # accuracy level 4
    assert roofline(int4, WORKLOAD, 5.0, bench, int4_int8_compute=False).peak_gops == bench.fp32_gemm_gflops


def test_bad_inputs_are_one_sentence(bench) -> None:
    with pytest.raises(ValueError, match="latency_ms must be > 0"):
        roofline(MINILM, WORKLOAD, 0.0, bench)
    with pytest.raises(PredictionError, match="no roofline for 16-bit"):
        compute_precision(16, True)
