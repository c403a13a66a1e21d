"""The causal-LM decode and TTFT predictor: fitted on latencies that follow its own cost model on one profile, it
recovers them, and moves to another profile by that profile's bandwidth, throughput and operator overhead."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from autotune.screening import DecodeScreen
from profilers.decode_predictor import (
    MIN_POINTS, DecoderConfig, DecoderDims, DecoderFit, DecoderPredictor, components, sensitive_blocks, weight_bytes_read,
)
from profilers.latency import summarize
from search_spaces import Candidate
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


SMOLLM2 = DecoderDims(blocks=30, hidden=576, kv_width=192, ffn=1536, vocab=49152)


def test_the_bytes_a_token_reads_follow_widths_head_and_int8_layers() -> None:
    fp32 = weight_bytes_read(SMOLLM2, 32, 32, 32, False)
    int4 = weight_bytes_read(SMOLLM2, 4, 32, 4, False)
    assert fp32 / 2**20 == pytest.approx(513.0)  # SmolLM2's 134.5M weights, its tied head once (515 MB on disk)
    assert int4 == pytest.approx(fp32 * (0.5 + 4 / 32) / 4)  # a scale per block of 32 weights
    assert weight_bytes_read(SMOLLM2, 4, 128, 4, False) < int4
    assert int4 < weight_bytes_read(SMOLLM2, 4, 32, 4, True) < weight_bytes_read(SMOLLM2, 4, 32, 8, True)
    assert weight_bytes_read(SMOLLM2, 4, 32, 4, True) == weight_bytes_read(SMOLLM2, 4, 32, 4, False) + (
        len(sensitive_blocks(30)) * (576 * (576 + 2 * 192) + 1536 * 576) * (1.0 - 0.5))  # qkv and down at int8


def test_sensitive_blocks_are_the_first_and_last_eighth_and_every_third_between() -> None:
    assert sensitive_blocks(30) == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29]
    assert sensitive_blocks(8) == [0, 3, 6, 7]


def test_the_predictor_never_predicts_a_tail_below_its_p50(machine: Throughput) -> None:
    p50 = [float(components(c, machine, "decode") @ TRUE) for c in configs()]
    tail = [ms * 0.9 for ms in p50]  # a fit on inconsistent figures may put the tail below p50
    prediction = DecoderPredictor.calibrate(machine, configs(), p50, tail, "decode", 95).predict(configs()[0], machine)
    assert prediction.predicted and prediction.latency_ms >= prediction.p50_ms and prediction.percentile == 95
    assert prediction.same_machine and prediction.calibration_points == len(configs())


def candidate(blocks: int, bits: int) -> Candidate:
    return Candidate(layers=blocks, hidden=576, heads=9, ffn=1536, bits=bits, block_size=None if bits == 32 else 32)


def test_the_decode_screen_skips_only_far_over_the_target_once_calibrated(machine: Throughput, profile: HardwareProfile) -> None:
    def config_of(c: Candidate) -> DecoderConfig:
        dims = DecoderDims(c.layers, 576, 192, c.ffn, 49152)
        return DecoderConfig(weight_bytes_read(dims, c.bits, c.block_size or 32, c.bits, False), c.layers, c.bits, 128)

    def stats(c: Candidate):
        ms = float(components(config_of(c), machine, "decode") @ TRUE)
        return summarize([ms] * 20, converged=True, seconds=0.1, batch_size=1, threads=2, peak_rss_delta_bytes=0)

    screen = DecodeScreen(profile, "decode", 95, config_of, skip_factor=1.5)
    fp32_student, int4_teacher = candidate(26, 32), candidate(30, 4)
    target_ms = float(components(config_of(int4_teacher), machine, "decode") @ TRUE)  # the int4 teacher just meets it
    measured = [candidate(30, 32), candidate(30, 8), candidate(22, 4)]
    for c in measured:
        screen.observe(c, stats(c))
        assert screen.skip(fp32_student, target_ms) is None  # under MIN_POINTS measured: never skip on priors
    screen.observe(candidate(22, 32), stats(candidate(22, 32)))
    prediction = screen.skip(fp32_student, target_ms)
    assert prediction is not None and prediction.low_ms > 1.5 * target_ms
    assert screen.skip(int4_teacher, target_ms) is None  # near the target: measured, never skipped
    assert screen.skip(candidate(30, 32), 0.01) is None  # a shape already measured is never predicted
    assert screen.size_mb(int4_teacher) == pytest.approx(config_of(int4_teacher).weight_bytes / 2**20)


@pytest.fixture()
def profile() -> HardwareProfile:
    return HardwareProfile.from_dict(json.loads(FIXTURE.read_text())["hardware"])
