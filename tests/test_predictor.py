"""The latency predictor, the search's screen and `autotune plan`, on synthetic profiles and the tiny result fixture."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from statistics import median
from types import SimpleNamespace

import numpy as np
import pytest

from autotune.cli import main
from autotune.plan import plan_for
from autotune.records import Stage
from profilers.recipes import PORTABLE
from autotune.screening import LatencyScreen
from autotune.trial import Target, TrialPipeline
from profilers.hardware import HardwareProfile
from profilers.latency import summarize
from profilers.predictor import (
    COMPONENTS,
    REFERENCE_ELEMENTWISE_SHARE,
    REFERENCE_OVERHEAD_MS,
    CalibrationPoint,
    ModelShape,
    Predictor,
    Throughput,
    Workload,
    analytic_cost,
    components_ms,
    elementwise_gbps,
    operator_overhead_ms,
)
from search_spaces import Candidate

FIXTURE = Path(__file__).parent / "fixtures" / "result_tiny.json"
WORKLOAD = Workload(batch_size=1, seq_len=64)
MACHINE = Throughput(fp32_gflops=100.0, int8_gops=200.0, bandwidth_gbps=20.0, threads=2, fingerprint="synthetic")


def predict(shape: ModelShape, machine: Throughput = MACHINE, workload: Workload = WORKLOAD) -> float:
    return Predictor.uncalibrated(95).predict(shape, workload, machine).p50_ms


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_prediction_grows_with_every_dimension_of_work(bits: int) -> None:
    base = ModelShape(layers=2, hidden=192, heads=6, ffn=768, bits=bits)
    for bigger in (replace(base, layers=3), replace(base, hidden=288), replace(base, ffn=1152)):
        assert analytic_cost(bigger, WORKLOAD).weight_bytes > analytic_cost(base, WORKLOAD).weight_bytes
        assert predict(bigger) > predict(base)
    assert predict(replace(base, heads=12)) > predict(base)  # same FLOPs, twice the per-head attention blocks
    assert predict(base, workload=Workload(1, 128)) > predict(base) and predict(base, workload=Workload(2, 64)) > predict(base)


def test_fewer_bits_move_fewer_bytes_and_are_faster_where_that_binds() -> None:
    shapes = {bits: ModelShape(6, 384, 12, 1536, bits) for bits in (32, 8, 4)}
    weights = {bits: analytic_cost(s, WORKLOAD).weight_bytes for bits, s in shapes.items()}
    assert weights[32] > weights[4] > weights[8]  # int4 keeps the fused Q/K/V weights in fp32
    # Starved of memory bandwidth (the weights stream from memory), its cache-resident activations unchanged.
    starved = replace(MACHINE, bandwidth_gbps=0.5, elementwise_gbps=elementwise_gbps(MACHINE), fingerprint="bandwidth-bound")
    assert predict(shapes[32], starved) > predict(shapes[4], starved)
    assert predict(shapes[32], starved) > predict(shapes[8], starved)
    int8_rich = replace(MACHINE, int8_gops=4 * MACHINE.fp32_gflops, fingerprint="vnni")
    assert predict(shapes[32], int8_rich) > predict(shapes[8], int8_rich)
    faster = replace(MACHINE, fp32_gflops=200.0, int8_gops=400.0, bandwidth_gbps=40.0, fingerprint="faster")
    assert all(predict(s, faster) < predict(s) for s in shapes.values())
    slow_int4 = replace(MACHINE, int4_gflops=MACHINE.fp32_gflops / 4, fingerprint="slow int4")
    assert predict(shapes[4], slow_int4) > predict(shapes[4]) and predict(shapes[32], slow_int4) == predict(shapes[32])



def test_costlier_small_operators_slow_narrow_models_most() -> None:
    """The per-operator figure is what separates a machine's narrow-model speed from its GEMM speed."""
    narrow, wide = ModelShape(2, 96, 12, 384, 8), ModelShape(6, 384, 12, 1536, 32)
    costly = replace(MACHINE, small_op_ms=3 * REFERENCE_OVERHEAD_MS, fingerprint="costly operators")
    assert operator_overhead_ms(costly) == pytest.approx(3 * REFERENCE_OVERHEAD_MS - 2 * 64 * 48 * 48 / 100e6)
    noisy = replace(MACHINE, small_op_ms=0.001)  # less than its own arithmetic at this machine's throughput
    assert operator_overhead_ms(noisy) == pytest.approx(0.1 * 0.001)
    slowdown = {name: predict(shape, costly) / predict(shape) for name, shape in (("narrow", narrow), ("wide", wide))}
    assert slowdown["narrow"] > slowdown["wide"] > 1.0


def test_activations_move_at_the_elementwise_chains_rate_and_int8_quantization_apart() -> None:
    """Skip-layernorm and gelu traffic is timed against the profile's elementwise chain (copy bandwidth only for
    older profiles); int8's quantization traffic is a component of its own, so fp32 and int4 do not pay for it."""
    shape = ModelShape(3, 192, 6, 1536, 32)
    assert elementwise_gbps(MACHINE) == pytest.approx(REFERENCE_ELEMENTWISE_SHARE * MACHINE.bandwidth_gbps)
    measured = replace(MACHINE, elementwise_gbps=1.0, fingerprint="elementwise measured")
    slower_activations = replace(measured, elementwise_gbps=0.5)
    assert predict(shape, slower_activations) > predict(shape, measured)
    more_bandwidth = replace(measured, bandwidth_gbps=10 * MACHINE.bandwidth_gbps)  # weights only, here
    assert predict(shape, more_bandwidth) < predict(shape, measured)
    assert predict(shape, more_bandwidth) > predict(shape, replace(more_bandwidth, elementwise_gbps=10.0))
    costs = {bits: analytic_cost(replace(shape, bits=bits), WORKLOAD) for bits in (32, 8, 4)}
    assert costs[32].quantize_bytes == costs[4].quantize_bytes == 0 < costs[8].quantize_bytes
    assert costs[32].activation_bytes == costs[8].activation_bytes == costs[4].activation_bytes
    quantize = COMPONENTS.index("quantize")
    assert components_ms(costs[8], measured)[quantize] == pytest.approx(costs[8].quantize_bytes / 1e6)  # at 1 GB/s


def synthetic_points(n: int, seed: int, noise: float = 0.02) -> list[CalibrationPoint]:
    """Latencies from a known ground truth (coefficients unlike the priors) with lognormal noise."""
    truth = np.array([2.2, 3.0, 1.1, 6.0, 0.6, 0.1, 2.0, 3.0, 1.0, 20.0])
    assert len(truth) == len(COMPONENTS)
    rng = np.random.default_rng(seed)
    points = []
    for _ in range(n):
        heads = int(rng.choice([3, 6, 12]))
        shape = ModelShape(int(rng.integers(1, 7)), heads * int(rng.choice([8, 16, 32])), heads,
                           int(rng.choice([384, 768, 1152, 1536])), int(rng.choice([32, 8, 4])))
        true_ms = float(components_ms(analytic_cost(shape, WORKLOAD), MACHINE) @ truth)
        p50 = true_ms * float(np.exp(rng.normal(0, noise)))
        points.append(CalibrationPoint(shape, WORKLOAD, p50, p50 * 1.15))
    return points


def test_calibration_recovers_a_known_ground_truth() -> None:
    train, held_out = synthetic_points(30, seed=1), synthetic_points(30, seed=2)

    def median_error(predictor: Predictor) -> float:
        return median(abs(predictor.predict(p.shape, WORKLOAD, MACHINE).p50_ms / p.p50_ms - 1) for p in held_out)

    calibrated = Predictor.calibrate(MACHINE, train, 95)
    before, after = median_error(Predictor.uncalibrated(95)), median_error(calibrated)
    assert after < 0.05 < before
    inside = [calibrated.predict(p.shape, WORKLOAD, MACHINE) for p in held_out]
    coverage = np.mean([q.p50_low_ms <= p.p50_ms <= q.p50_high_ms for q, p in zip(inside, held_out)])
    assert coverage >= 0.7  # a 90% interval, on 30 points
    tail = calibrated.predict(held_out[0].shape, WORKLOAD, MACHINE)
    assert tail.latency_ms == pytest.approx(tail.p50_ms * 1.15, rel=0.05)
    elsewhere = calibrated.predict(held_out[0].shape, WORKLOAD, replace(MACHINE, fingerprint="other"))
    assert not elsewhere.same_machine and elsewhere.high_ms / elsewhere.latency_ms > tail.high_ms / tail.latency_ms


def stats(ms: float):
    return summarize([ms] * 20, converged=True, seconds=0.1, batch_size=1, threads=2, peak_rss_delta_bytes=0)


@pytest.fixture(scope="module")
def profile() -> HardwareProfile:
    return HardwareProfile.from_dict(json.loads(FIXTURE.read_text())["hardware"])


def test_a_profile_without_chain_figures_predicts_from_its_peak_figures(profile: HardwareProfile) -> None:
    bench = profile.microbench
    assert bench is not None and bench.fp32_chain_gflops is None  # the fixture predates the encoder-regime figures
    machine = Throughput.of(profile)
    assert (machine.fp32_gflops, machine.int8_gops, machine.int4_gflops) == (bench.fp32_gemm_gflops, bench.int8_gemm_gops, None)
    assert machine.small_op_ms is None and operator_overhead_ms(machine) == REFERENCE_OVERHEAD_MS
    assert machine.elementwise_gbps is None
    assert elementwise_gbps(machine) == pytest.approx(REFERENCE_ELEMENTWISE_SHARE * bench.memory_bandwidth_gbps)
    assert predict(ModelShape(2, 192, 6, 768, 4), machine) > 0


def test_screen_skips_only_far_over_target_once_calibrated(profile: HardwareProfile) -> None:
    screen = LatencyScreen(profile, WORKLOAD, 95, vocab_size=100, skip_factor=1.5)
    huge = Candidate(layers=6, hidden=384, heads=12, ffn=1536, bits=32)
    truth = Throughput.of(profile)
    target_ms = 1.0
    assert screen.skip(huge, target_ms) is None  # nothing measured yet: never skip on priors alone
    for point in synthetic_points(8, seed=3, noise=0.0):
        candidate = Candidate(point.shape.layers, point.shape.hidden, point.shape.heads, point.shape.ffn, bits=point.shape.bits)
        screen.observe(candidate, stats(Predictor.uncalibrated(95).predict(point.shape, WORKLOAD, truth).p50_ms))
    prediction = screen.skip(huge, target_ms)
    assert prediction is not None and prediction.predicted and prediction.low_ms > 1.5 * target_ms
    assert screen.skip(huge, prediction.low_ms) is None  # within 1.5x of a target: measured, not skipped


def screened_pipeline(profile: HardwareProfile, cache_dir: Path) -> TrialPipeline:
    """A pipeline whose only real parts are the screen and the gate cache: a 0.01 ms target nothing meets."""
    target = Target(latency_ms=0.01, percentile=95.0, batch_size=1, seq_len=64, threads=2, runtime="onnxruntime",
                    device="cpu")
    task = SimpleNamespace(teacher=SimpleNamespace(config=SimpleNamespace(vocab_size=100)), stand_in_identity=(100,))
    ctx = SimpleNamespace(target=target, task=task, cache_dir=cache_dir, fingerprint="machine", reference_ms=10.0,
                          recipe=PORTABLE)
    return TrialPipeline(ctx, screen=LatencyScreen(profile, WORKLOAD, 95, vocab_size=100, min_points=0))  # type: ignore[arg-type]


def test_trial_pipeline_records_a_skip_as_predicted_without_measuring(profile: HardwareProfile, tmp_path: Path) -> None:
    pipeline = screened_pipeline(profile, tmp_path)  # an empty gate cache: never measured before
    pipeline.gate = lambda candidate: pytest.fail("a skipped candidate must not be measured")  # type: ignore[method-assign]
    outcome = pipeline.run(Candidate(layers=6, hidden=384, heads=12, ffn=1536))
    assert outcome.stage == Stage.PREDICTED_SKIP and not outcome.feasible and outcome.accuracy is None
    assert outcome.latency["predicted"] is True and outcome.latency_ms == outcome.latency["latency_ms"]
    assert pipeline.counters["gates_skipped_by_prediction"] == 1


def test_plan_marks_predictions_as_predicted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = json.loads(FIXTURE.read_text())
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(json.dumps(result))
    other = {k: v for k, v in result["hardware"].items() if k != "fingerprint"}
    other["cpu"] = {**other["cpu"], "model_name": "<script>alert(1)</script> box"}
    other["microbench"] = {**other["microbench"], "fp32_gemm_gflops": 40.0}
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["plan", str(tmp_path / "run"), "--hardware", str(tmp_path / "other.json"), "--target-ms", "0.5"]) == 0
    assert "predicted" in capsys.readouterr().out
    stored = json.loads((tmp_path / "run" / "result.json").read_text())["plans"]
    assert len(stored) == 1 and stored[0]["predicted"] and stored[0]["target_ms"] == 0.5
    assert all(c["prediction"]["predicted"] for c in stored[0]["configs"])
    md = (tmp_path / "run" / "report.md").read_text()
    section = md[md.index("## Predicted (not measured)"):]
    assert "predicted p95 ms" in section and "Predicted, not measured" in section
    assert "## Predicted" not in md[:md.index("## Predicted (not measured)")]  # measured sections stay apart
    html_text = (tmp_path / "run" / "report.html").read_text()
    assert "<script>alert" not in html_text and "&lt;script&gt;alert(1)&lt;/script&gt; box" in html_text


def test_plan_predictions_agree_with_the_run_on_its_own_machine() -> None:
    result = json.loads(FIXTURE.read_text())
    machine = plan_for(result, HardwareProfile.from_dict(result["hardware"]), "run's own")
    assert machine.same_machine and machine.calibration_points == len(result["trials"])
    trial = {t["number"]: t for t in result["trials"]}
    for config in machine.configs:
        assert config.prediction.low_ms <= trial[config.trial]["latency"]["p95_ms"] * 1.5


def run_dir_with(tmp_path: Path, profile_text: str) -> tuple[Path, Path]:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(FIXTURE.read_text())
    (tmp_path / "profile.json").write_text(profile_text)
    return tmp_path / "run", tmp_path / "profile.json"


@pytest.mark.slow
def test_plan_refuses_a_foreign_schema_profile_in_one_sentence(tmp_path: Path) -> None:
    run_dir, bad = run_dir_with(tmp_path, '{"schema_version": 7}')
    done = subprocess.run([sys.executable, "-m", "autotune", "plan", str(run_dir), "--hardware", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "schema_version 7" in done.stderr and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "plans" not in json.loads((run_dir / "result.json").read_text())


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "is not valid JSON"),
    ('{"schema_version": 1, "threads": 2}', "is not a valid hardware profile"),
])
def test_plan_refuses_a_corrupt_profile_in_one_sentence(tmp_path: Path, content: str, fragment: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, bad = run_dir_with(tmp_path, content)
    assert main(["plan", str(run_dir), "--hardware", str(bad)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_a_cached_gate_measurement_is_used_before_any_prediction(profile: HardwareProfile, tmp_path: Path) -> None:
    from autotune.caches import write_json_atomic
    from autotune.tasks import Timed
    from profilers.latency import LatencyStats

    measured = LatencyStats(p50_ms=20.0, p90_ms=21.0, p95_ms=22.0, p99_ms=23.0, mean_ms=20.0, stdev_ms=1.0, min_ms=19.0,
                            max_ms=24.0, runs=30, converged=True, median_ci_rel_halfwidth=0.01, seconds=1.0, batch_size=1,
                            threads=2, throughput_items_per_s=50.0, peak_rss_delta_bytes=0)
    pipeline = screened_pipeline(profile, tmp_path)
    candidate = Candidate(layers=6, hidden=384, heads=12, ffn=1536)
    write_json_atomic(pipeline.gate_path(candidate), {"timed": Timed({"latency": measured}).to_dict(), "size_mb": 10.0,
                                                      "candidate": candidate.to_dict(), "reference_ms": 10.0})
    outcome = pipeline.run(candidate)
    assert outcome.stage == Stage.GATE and outcome.gate_cache_hit and outcome.latency_ms == 22.0
    assert pipeline.counters["gates_skipped_by_prediction"] == 0 and pipeline.counters["gate_cache_hits"] == 1