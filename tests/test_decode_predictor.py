"""The causal-LM decode and TTFT predictor: fitted on latencies that follow its own cost model on one profile, it
recovers them, and moves to another profile by that profile's bandwidth, throughput and operator overhead."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from profilers.decode_predictor import MIN_POINTS, DecoderConfig, DecoderFit, components
from profilers.hardware import HardwareProfile
from profilers.predictor import PredictionError, Throughput

FIXTURE = Path(__file__).parent / "fixtures" / "result_tiny.json"
#: Inverse efficiencies the synthetic latencies are made with: the weights read at 70% of copy bandwidth, three
#: operator overheads per block, twenty per call.
TRUE = np.array([1 / 0.7, 3.0, 20.0])


@pytest.fixture()
def machine() -> Throughput:
    return Throughput.of(HardwareProfile.from_dict(json.loads(FIXTURE.read_text())["hardware"]))


def configs() -> list[DecoderConfig]:
    """Decoders of 22-30 blocks at fp32, int8 and int4: 80-520 MB of weights."""
    return [DecoderConfig(mb * 2**20, blocks, bits, 128) for mb, blocks, bits in
            ((515, 30, 32), (255, 30, 8), (83, 30, 4), (434, 26, 32), (76, 26, 4), (353, 22, 32), (70, 22, 4))]


def test_decode_is_recovered_on_the_calibration_machine_and_follows_bandwidth_on_another(machine: Throughput) -> None:
    measured = [float(components(c, machine, "decode") @ TRUE) for c in configs()]
    fit = DecoderFit.calibrate(machine, configs(), measured, "decode")
    probe = DecoderConfig(200 * 2**20, 24, 8, 128)
    value, low, high = fit.predict(probe, machine)
    assert value == pytest.approx(float(components(probe, machine, "decode") @ TRUE), rel=1e-3) and low <= value <= high
    faster = dataclasses.replace(machine, bandwidth_gbps=machine.bandwidth_gbps * 2, fingerprint="other")
    moved, moved_low, moved_high = fit.predict(probe, faster)
    assert moved == pytest.approx(float(components(probe, faster, "decode") @ TRUE), rel=1e-3)
    assert moved < value and (moved_high / moved_low) > (high / low)  # another machine: a wider interval


def test_ttft_counts_a_prompt_s_flops_at_the_precision_the_kernels_compute_in(machine: Throughput) -> None:
    fp32, int4 = DecoderConfig(400e6, 30, 32, 128), DecoderConfig(400e6 / 32 * 5, 30, 4, 128)  # the same weights
    work_fp32, work_int4 = components(fp32, machine, "ttft")[0], components(int4, machine, "ttft")[0]
    assert work_fp32 == pytest.approx(2 * 128 * 1e8 / (machine.fp32_gflops * 1e6))
    assert work_int4 == pytest.approx(2 * 128 * 1e8 / (machine.int8_gops * 1e6))


def test_too_few_points_or_an_unknown_latency_is_one_sentence(machine: Throughput) -> None:
    with pytest.raises(PredictionError, match="too few"):
        DecoderFit.calibrate(machine, configs()[:MIN_POINTS - 1], [1.0] * (MIN_POINTS - 1), "decode")
    with pytest.raises(PredictionError, match="predicted: decode, ttft"):
        components(configs()[0], machine, "prefill")
