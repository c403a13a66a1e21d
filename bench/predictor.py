"""How well the latency predictor predicts measured latency, here and on a second "machine" (1 thread).

The predictor is profilers/predictor.py; the second "machine" is this one at 1 thread. Also: what its skips
would save on the demo search.

Candidates: `--n` (default 40) distinct shapes drawn uniformly at random from the bert-default space for the
all-MiniLM-L6-v2 teacher (6x384, 12 heads, FFN 1536), restricted to this machine (fp16 and 2:4 removed on an
AVX2 CPU). Each is built as the latency gate builds it (random weights, export, fuse, quantize to its bits) and
timed at batch 1, 64 tokens in fresh child processes (profilers.isolated, the gate's path), at 2 threads and at
1 thread, three processes each, in three passes over all candidates so that a build's processes are minutes
apart (the median p50 is the truth graded against), plus one gate-length timing whose wall seconds (with the
build's) are the cost of one gate.

Figures:
- same machine: 5-fold cross-validation over the 2-thread measurements (calibrate on 4 folds with the 2-thread
  profile, predict the held-out fold; no point is ever predicted by a calibration that saw it). "mape" is the
  *median* absolute percentage error of p50, as the issue defines it (the mean is printed too), "within_15pct"
  the share within +-15%, "kendall_tau" scipy's tau-b between predicted and measured p50 over all held-out points.
- cross machine: calibrate on all 2-thread measurements with the 2-thread profile, predict with the 1-thread
  profile, compare with the 1-thread measurements (same three figures, and interval coverage).
- search time saved on the demo spec (examples/sentiment/tune.yaml), estimated, not measured: the share of the
  demo space's distinct shapes whose predicted p95 interval lies entirely above 1.5x the demo target (teacher
  p95 / 4, measured here), times the demo's trial budget, times the median measured cost of one gate here; and
  how many of this bench's measured candidates such a skip would have wrongly skipped (measured p95 at or under
  1.5x target). Sampler behaviour is not modelled (NSGA-II proposes more promising shapes than uniform sampling).

    python bench/predictor.py [--n 40] [--quick] [--seed 0] [--rounds 8] [--measurements FILE]

Profiles: `--rounds` (default 8) microbenchmark rounds at each thread count, spread evenly over the timings (one
before the first build, one after the last, the rest between), each figure the geometric mean of its rounds, as
`autotune profile --rounds` merges them. One round is a snapshot of this shared box at that minute: within one
run the 2-thread fp32 chain read 79-117 GFLOP/s from round to round while the teacher's 2-thread p50 held at
13.9-15.4 ms across seven runs, and in each of those runs the merged profile put more cross-machine predictions
within 15% than the median single round did (e.g. 0.85 against 0.74; single rounds 0.20-0.85).

`--quick`: 8 candidates and quick one-round profiles (a smoke run, figures meaningless). `--measurements FILE`
keeps every timing in FILE (JSON) and reuses the candidates already in it, so an interrupted run continues (with
nothing left to time, the rounds run back to back); every profile round goes to FILE's sibling
`<stem>.profiles.json`. The last line is JSON: {"mape", "within_15pct", "kendall_tau", "n", "cross_machine":
{"mape", "within_15pct", "kendall_tau", "profile_drift"}, "repeat_mape"}; repeat_mape is how far one process's
p50 of a build lies from its other processes' median, profile_drift how far one 1-thread round alone moves the
cross-machine predictions from the merged profile's (the noise of a one-round profile).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import mean, median
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scipy.stats import kendalltau  # noqa: E402

from autotune.tasks.text_classification import load_teacher  # noqa: E402
from autotune.compress import shaped_like  # noqa: E402
from autotune.config import load_spec  # noqa: E402
from autotune.screening import DEFAULT_SKIP_FACTOR, model_shape  # noqa: E402
from autotune.compress.quantization import quantize_artifact  # noqa: E402
from autotune.runtime import export_artifact  # noqa: E402
from autotune.trial import GATE_SETTINGS  # noqa: E402
from profilers.hardware import HardwareProfile, collect_profile  # noqa: E402
from profilers.isolated import OnnxRequest, measure_onnx_isolated  # noqa: E402
from profilers.latency import LatencyStats, MeasureSettings  # noqa: E402
from profilers.microbench import MicrobenchSizes, Microbench, merge_rounds, run_cpu_microbench  # noqa: E402
from profilers.predictor import PREDICTED_BITS, CalibrationPoint, Predictor, Throughput, Workload  # noqa: E402
from profilers.cpu import probe_cpu  # noqa: E402
from profilers.recipes import Recipe, recipe_for  # noqa: E402
from search_spaces import Candidate, Space, preset, restrict_to_hardware, with_overrides  # noqa: E402

DEMO_SPEC = Path(__file__).resolve().parent.parent / "examples" / "sentiment" / "tune.yaml"
WORKLOAD = Workload(batch_size=1, seq_len=64)
PERCENTILE = 95.0
SETTINGS = MeasureSettings(warmup=5, min_runs=20, max_runs=400, max_seconds=3.0)  # the evaluation's settings
FOLDS = 5
#: Fresh processes per candidate and thread count, the median p50 kept: one process's p50 of the same build
#: was seen 30% apart from another's on this 2-core box, which no predictor can be graded against.
REPEATS = 3


@dataclass(frozen=True)
class Measured:
    """One build's timings: each process's p50 and p95 at 2 and 1 threads (one process per pass), and the cost of
    its gate. The figures graded against are the medians over its processes."""

    candidate: dict[str, Any]
    gate_seconds: float  # build (export + fuse + quantize) + one gate-length timing, wall clock
    process_p50s_2t: tuple[float, ...] = ()
    process_p50s_1t: tuple[float, ...] = ()
    process_p95s_2t: tuple[float, ...] = ()
    process_p95s_1t: tuple[float, ...] = ()

    @property
    def repeats(self) -> int:
        return len(self.process_p50s_2t)

    # The figures graded against: medians over the build's processes.
    p50_2t = property(lambda self: median(self.process_p50s_2t))
    p95_2t = property(lambda self: median(self.process_p95s_2t))
    p50_1t = property(lambda self: median(self.process_p50s_1t))
    p95_1t = property(lambda self: median(self.process_p95s_1t))

    def with_process(self, two: LatencyStats, one: LatencyStats) -> "Measured":
        """This build with one more process timed at each thread count."""
        return replace(self, process_p50s_2t=(*self.process_p50s_2t, two.p50_ms),
                       process_p50s_1t=(*self.process_p50s_1t, one.p50_ms),
                       process_p95s_2t=(*self.process_p95s_2t, two.p95_ms),
                       process_p95s_1t=(*self.process_p95s_1t, one.p95_ms))


def modelled(space: Space) -> Space:
    """The space without the bit widths the predictor does not model (fp16, where the hardware rules keep it),
    said on stdout: the bench scores predictions, and an unmodelled width has none to score."""
    for bits in [b for b in space.knob("bits").values() if b not in PREDICTED_BITS]:
        space, _ = space.without("bits", bits, "not modelled by the predictor")
        print(f"bits={bits} left out: the predictor models bits {', '.join(map(str, PREDICTED_BITS))} on CPU")
    return space


def sample_candidates(space: Space, n: int, seed: int) -> list[Candidate]:
    """n candidates with distinct shapes (shape x bits), uniform over the space's knob values."""
    rng = random.Random(seed)
    seen: dict[str, Candidate] = {}
    while len(seen) < n:
        params = {k.name: rng.choice(k.values()) for k in space.knobs}
        candidate = Candidate.canonical(**params)
        seen.setdefault(candidate.shape_key, candidate)
    return list(seen.values())


@functools.cache
def this_cpu_recipe() -> Recipe:
    """This CPU's quantization recipe, as the tuner's gate builds with it (probed once: py-cpuinfo takes a second)."""
    return recipe_for(probe_cpu().flags)


def build_candidate(teacher: Any, tokenizer: Any, candidate: Candidate, directory: Path) -> tuple[OnnxRequest, float]:
    """Build the candidate's shape as the gate does (into `directory`) and time it once at gate length at 2
    threads: what to time it with, and the wall seconds of build + gate timing (the cost of one gate)."""
    start = time.perf_counter()
    model = shaped_like(teacher, candidate.layers, candidate.hidden, candidate.heads, candidate.ffn)
    plain = export_artifact(model, tokenizer, directory / "fp32")
    variant = quantize_artifact(plain, directory / "variant", bits=candidate.bits, recipe=this_cpu_recipe())
    request = OnnxRequest(model_path=str(variant.model_path), input_names=variant.input_names,
                          batch_size=WORKLOAD.batch_size, seq_len=WORKLOAD.seq_len, vocab_size=variant.vocab_size, threads=2)
    measure_onnx_isolated(request, GATE_SETTINGS)
    return request, time.perf_counter() - start


def time_process(request: OnnxRequest) -> tuple[LatencyStats, LatencyStats]:
    """One fresh process's timing of the build at 2 threads, then one at 1 thread."""
    return (measure_onnx_isolated(replace(request, threads=2), SETTINGS),
            measure_onnx_isolated(replace(request, threads=1), SETTINGS))


def repeatability(rows: Sequence[Measured]) -> float:
    """Median |p50 of one process / median p50 of the candidate's other processes - 1|: how well this machine's
    own measurement of a build agrees with itself, the floor under any predictor's error graded against it."""
    errors = [abs(p50 / median(others) - 1.0)
              for row in rows for p50s in (row.process_p50s_2t, row.process_p50s_1t)
              for i, p50 in enumerate(p50s) if (others := p50s[:i] + p50s[i + 1:])]
    return median(errors) if errors else float("nan")


def load_measurements(path: Path | None) -> list[Measured]:
    """The rows saved in `path`; rows of older files (without each process's p95) are left out, to be re-measured."""
    if path is None or not path.exists():
        return []
    lists = ("process_p50s_2t", "process_p50s_1t", "process_p95s_2t", "process_p95s_1t")
    return [Measured(row["candidate"], row["gate_seconds"], *(tuple(row[k]) for k in lists))
            for row in json.loads(path.read_text()) if all(k in row for k in lists) and row["process_p95s_2t"]]


def round_positions(rounds: int, builds: int) -> list[int]:
    """Before which of `builds` timings (0 .. builds, builds meaning after the last) each profile round is taken:
    evenly from the first to after the last, so the rounds span the timings' conditions."""
    if rounds == 1:
        return [0]
    return [round(k * builds / (rounds - 1)) for k in range(rounds)]


def measure_all(candidates: Sequence[Candidate], path: Path | None, rounds: int,
                take_round: Callable[[], None]) -> list[Measured]:
    """Timings of every candidate in REPEATS passes over all of them (one process per thread count per pass), so
    a build's processes are minutes apart and its median spans the host's fast and slow stretches as the profile
    rounds do. Timed back to back, a build's processes shared its minute: in one run the first five builds ran
    15-26% slower at 2 threads than predicted, barely faster than at 1 thread, and most later ones faster.
    Reuses what `path` holds and saves after each step (an interrupted run continues: an unfinished build is
    rebuilt, its gate seconds kept), with `take_round` called `rounds` times spread over the new steps (see
    round_positions)."""
    saved = {Candidate.from_dict(r.candidate).shape_key: r for r in load_measurements(path)}
    rows = {c.shape_key: saved[c.shape_key] for c in candidates if c.shape_key in saved}
    steps = [c for k in range(REPEATS) for c in candidates if c.shape_key not in rows or rows[c.shape_key].repeats <= k]
    positions = round_positions(rounds, len(steps))
    teacher, tokenizer, _ = load_teacher(load_spec(DEMO_SPEC)) if steps else (None, None, None)
    requests: dict[str, OnnxRequest] = {}
    with tempfile.TemporaryDirectory(prefix="bench-predictor-") as tmp:
        for i in range(len(steps) + 1):
            for _ in range(positions.count(i)):
                take_round()
            if i == len(steps):
                break
            candidate, key = steps[i], steps[i].shape_key
            if key not in requests:
                requests[key], gate_seconds = build_candidate(teacher, tokenizer, candidate, Path(tmp) / f"c{len(requests)}")
                rows.setdefault(key, Measured(candidate.to_dict(), gate_seconds))
            row = rows[key] = rows[key].with_process(*time_process(requests[key]))
            print(f"[{i + 1}/{len(steps)}] {candidate.describe()}, process {row.repeats}: p50 "
                  f"{row.process_p50s_2t[-1]:.2f} ms (2t), {row.process_p50s_1t[-1]:.2f} ms (1t); gate {row.gate_seconds:.1f} s",
                  flush=True)
            if path is not None:
                path.write_text(json.dumps([asdict(m) for m in rows.values()], indent=1))
    return [rows[c.shape_key] for c in candidates]


def point(row: Measured, threads: int) -> CalibrationPoint:
    shape = model_shape(Candidate.from_dict(row.candidate))
    if threads == 2:
        return CalibrationPoint(shape, WORKLOAD, row.p50_2t, row.p95_2t)
    return CalibrationPoint(shape, WORKLOAD, row.p50_1t, row.p95_1t)


@dataclass(frozen=True)
class Accuracy:
    mape: float
    mean_ape: float
    within_15pct: float
    kendall_tau: float
    coverage: float

    def summary(self) -> dict[str, float]:
        return {"mape": round(self.mape, 4), "within_15pct": round(self.within_15pct, 4),
                "kendall_tau": round(self.kendall_tau, 4)}


def accuracy(predicted: Sequence[float], measured: Sequence[float], inside: Sequence[bool]) -> Accuracy:
    errors = [abs(p / m - 1.0) for p, m in zip(predicted, measured)]
    tau = kendalltau(predicted, measured).statistic
    return Accuracy(median(errors), mean(errors), float(np.mean([e <= 0.15 for e in errors])), float(tau),
                    float(np.mean(inside)))


def cross_validated(points: Sequence[CalibrationPoint], machine: Throughput, seed: int) -> Accuracy:
    """Each point predicted by a calibration on the other folds only."""
    order = np.random.default_rng(seed).permutation(len(points))
    predicted, measured, inside = [], [], []
    for fold in range(FOLDS):
        held = set(order[fold::FOLDS].tolist())
        predictor = Predictor.calibrate(machine, [p for i, p in enumerate(points) if i not in held], PERCENTILE)
        for i in sorted(held):
            pred = predictor.predict(points[i].shape, WORKLOAD, machine)
            predicted.append(pred.p50_ms)
            measured.append(points[i].p50_ms)
            inside.append(pred.p50_low_ms <= points[i].p50_ms <= pred.p50_high_ms)
    return accuracy(predicted, measured, inside)


def transferred(predictor: Predictor, targets: Sequence[CalibrationPoint], machine: Throughput) -> Accuracy:
    preds = [predictor.predict(p.shape, WORKLOAD, machine) for p in targets]
    return accuracy([q.p50_ms for q in preds], [p.p50_ms for p in targets],
                    [q.p50_low_ms <= p.p50_ms <= q.p50_high_ms for q, p in zip(preds, targets)])


def profile_drift(predictor: Predictor, calibration: Sequence[CalibrationPoint], merged_machine: Throughput,
                  single_rounds: Sequence[Throughput]) -> float:
    """Median |p50 predicted from one round's profile / from the merged profile - 1| over rounds and shapes: what
    the noise of a one-round profile alone moves a cross-machine prediction, before any modelling error."""
    from_merged = [predictor.predict(p.shape, WORKLOAD, merged_machine).p50_ms for p in calibration]
    return median(abs(predictor.predict(p.shape, WORKLOAD, single).p50_ms / merged_ms - 1)
                  for single in single_rounds for p, merged_ms in zip(calibration, from_merged))


def rounds_path(measurements: Path) -> Path:
    return measurements.with_name(f"{measurements.stem}.profiles.json")


def demo_savings(rows: Sequence[Measured], profile: HardwareProfile, predictor: Predictor, teacher_p95: float) -> dict[str, Any]:
    """Estimated gate seconds saved by predictor skips on the demo spec (see the module docstring)."""
    spec = load_spec(DEMO_SPEC)
    target_ms = teacher_p95 / spec.target.speedup
    space = with_overrides(preset(spec.space.preset, shape_of_minilm()), spec.space.knobs)
    space = modelled(restrict_to_hardware(space, profile, spec.target.runtime, spec.target.device)[0])
    shapes = {}
    for values in itertools.product(*(k.values() for k in space.knobs)):
        candidate = Candidate.canonical(**dict(zip((k.name for k in space.knobs), values)))
        shapes.setdefault(candidate.shape_key, candidate)
    machine = Throughput.of(profile)
    limit = DEFAULT_SKIP_FACTOR * target_ms
    skipped = [c for c in shapes.values() if predictor.predict(model_shape(c), WORKLOAD, machine).low_ms > limit]
    wrong = [r for r in rows if r.p95_2t <= limit
             and predictor.predict(model_shape(Candidate.from_dict(r.candidate)), WORKLOAD, machine).low_ms > limit]
    gate_s = median(r.gate_seconds for r in rows)
    share = len(skipped) / len(shapes)
    return {"target_ms": round(target_ms, 3), "shapes": len(shapes), "skipped_share": round(share, 3),
            "gate_seconds_median": round(gate_s, 2), "trials": spec.search.trials,
            "seconds_saved_estimate": round(share * spec.search.trials * gate_s, 1), "wrong_skips_in_bench": len(wrong)}


def shape_of_minilm():
    from search_spaces import TeacherShape

    return TeacherShape(layers=6, hidden=384, heads=12, ffn=1536)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="random candidates (default 40)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 candidates, quick profiles")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measurements", type=Path, default=None, help="JSON file to keep and reuse timings in")
    parser.add_argument("--rounds", type=int, default=8, help="microbenchmark rounds per profile, spread over the timings (default 8)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.n < 2:
        parser.error(f"--rounds must be >= 1 and --n >= 2 (got --rounds {args.rounds}, --n {args.n})")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("fusion_embedlayer").setLevel(logging.ERROR)
    n = 8 if args.quick else args.n
    rounds = 1 if args.quick else args.rounds
    probed = {threads: collect_profile(threads, microbench=False) for threads in (2, 1)}
    taken: dict[int, list[Microbench]] = {2: [], 1: []}
    sizes = MicrobenchSizes.for_mode(args.quick)

    def take_round() -> None:
        """One CPU round at each thread count (the GPUs, if any, play no part in this bench)."""
        for threads in probed:
            taken[threads].append(run_cpu_microbench(threads, sizes, probed[threads].recipe))
        if args.measurements is not None:
            rounds_path(args.measurements).write_text(json.dumps(
                {t: [replace(probed[t], microbench=m).to_dict() for m in ms] for t, ms in taken.items()}))

    space = modelled(restrict_to_hardware(preset("bert-default", shape_of_minilm()), probed[2], "onnxruntime", "cpu")[0])
    teacher = shape_of_minilm().as_candidate(32)
    candidates = sample_candidates(space, n, args.seed)
    rows = measure_all([*candidates, teacher], args.measurements, rounds, take_round)
    profile_2t, profile_1t = (replace(probed[t], microbench=merge_rounds(taken[t])) for t in (2, 1))
    teacher_row = next(r for r in rows if Candidate.from_dict(r.candidate).shape_key == teacher.shape_key)
    random_rows = [r for r in rows if r is not teacher_row]
    two = Throughput.of(profile_2t)
    one = Throughput.of(profile_1t)
    points_2t = [point(r, 2) for r in random_rows]
    same = cross_validated(points_2t, two, args.seed)
    calibrated = Predictor.calibrate(two, points_2t, PERCENTILE)  # on every 2-thread point, for what follows
    cross = transferred(calibrated, [point(r, 1) for r in random_rows], one)
    drift = profile_drift(calibrated, points_2t, one, [Throughput.of(replace(probed[1], microbench=m)) for m in taken[1]])
    savings = demo_savings(random_rows, profile_2t, calibrated, teacher_row.p95_2t)
    for name, machine in (("2 threads", two), ("1 thread", one)):
        print(f"profile at {name} (encoder-regime chains): fp32 {machine.fp32_gflops} GFLOP/s, int8 {machine.int8_gops} GOP/s, "
              f"int4 {machine.int4_gflops} GFLOP/s, {machine.bandwidth_gbps} GB/s copy, activations {machine.elementwise_gbps} GB/s, "
              f"one small operator {(machine.small_op_ms or float('nan')) * 1000:.1f} us")
    print(f"teacher (fused fp32) p50 {teacher_row.p50_2t:.2f} ms, p95 {teacher_row.p95_2t:.2f} ms at 2 threads")
    for name, acc in (("same machine (5-fold CV, 2 threads)", same), ("cross machine (2t calibration -> 1t)", cross)):
        print(f"{name}: median APE {acc.mape:.1%}, mean APE {acc.mean_ape:.1%}, within 15% {acc.within_15pct:.0%}, "
              f"Kendall tau {acc.kendall_tau:.3f}, 90% interval coverage {acc.coverage:.0%}")
    repeat = repeatability(random_rows)
    print(f"repeatability: one process's p50 vs the median of the same build's other {REPEATS - 1} processes: "
          f"median {repeat:.1%} apart (the noise under every figure above)")
    for threads, benches in taken.items():
        print(f"{threads}-thread rounds, fp32 chain GFLOP/s in order: {[m.fp32_chain_gflops for m in benches]}")
    print(f"profile drift: one 1-thread round alone moves the cross-machine predictions a median {drift:.1%} from the "
          f"merged profile's")
    print("demo search savings (estimate):", json.dumps(savings))
    print(json.dumps({**same.summary(), "n": len(random_rows), "cross_machine": {**cross.summary(), "profile_drift": round(drift, 4)},
                      "repeat_mape": round(repeat, 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
