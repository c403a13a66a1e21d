"""An outside check of a finished run: does the recommendation hold when measured again, independently?

Times RUN_DIR/model against RUN_DIR/baseline at the run's own target shape and threads, taking turns as the
tuner's final measurement does, but later and separately, `--repeat` times: an encoder's forward passes in one
fresh child process with spinning off (300 timed runs each), a causal LM's generations each in its own child
(8 runs of 64 decoded tokens each, `profilers.generation.measure_generations`), its latency the target's
(decode, or TTFT for a TTFT-only target). Each repeat checks the two promises of result.json: the recommended
latency at the target percentile is within the target x 1.05, and the speedup (the ratio of median latencies,
as result.json states it) is within 10% of the one claimed. The ratio at the target percentile is printed too.

    python bench/remeasure.py runs/sentiment-quick [--repeat 3] [--runs N] [--pause 5]

Ends with one line of JSON: the target, the claimed speedup, each repeat's figures, and how many repeats held.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune.result import ResultError, load_result  # noqa: E402
from autotune.runtime import load_artifact  # noqa: E402
from profilers.generation import GenerationRequest, measure_generations  # noqa: E402
from profilers.isolated import OnnxRequest, measure_onnx_interleaved  # noqa: E402
from profilers.latency import LatencyStats  # noqa: E402

TARGET_SLACK = 1.05
SPEEDUP_TOLERANCE = 0.10
#: Timed runs of each model per repeat: forward passes of an encoder, generations of a causal LM (64 decode samples
#: each, so 512 decode samples).
DEFAULT_RUNS = {"latency": 300, "decode": 8, "ttft": 8}


def request_for(directory: Path, target: dict) -> OnnxRequest:
    """How the tuner timed the encoder artifact in `directory`: the target's batch, sequence length and threads."""
    artifact = load_artifact(directory)
    return OnnxRequest(str(artifact.model_path), artifact.input_names, target["batch_size"], target["seq_len"],
                       artifact.vocab_size, target["threads"])


def generation_for(directory: Path, target: dict, runs: int) -> GenerationRequest:
    """How the tuner timed the causal LM in `directory`: the target's prompt and context lengths and threads."""
    return GenerationRequest(str(directory), prompt_len=target["prompt_len"], context_len=target["seq_len"],
                             threads=target["threads"], vocab_size=load_artifact(directory).vocab_size, runs=runs)


def pair_measurement(run_dir: Path, target: dict, measure: str,
                     runs: int) -> Callable[[], tuple[LatencyStats, LatencyStats]]:
    """A measurement of the baseline's and the recommended model's latency (the target's own: an encoder's forward
    pass, a causal LM's decode or TTFT), taking turns; its requests are built once for every repeat."""
    directories = [run_dir / "baseline", run_dir / "model"]
    if measure == "latency":
        requests = [request_for(d, target) for d in directories]
        return lambda: tuple(measure_onnx_interleaved(requests, runs=runs))
    generations = [generation_for(d, target, runs) for d in directories]
    return lambda: tuple(getattr(stats, measure) for stats in measure_generations(generations))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runs", type=int, default=None,
                        help="timed runs of each model per repeat (default 300 forward passes, or 8 generations)")
    parser.add_argument("--pause", type=float, default=5.0, help="seconds between repeats, so they sample other minutes")
    args = parser.parse_args(argv)
    try:
        result = load_result(args.run_dir).data
    except ResultError as exc:
        print(exc, file=sys.stderr)
        return 2
    recommended, target = result["recommended"], result["target"]
    if recommended is None:
        print(f"{args.run_dir} has no recommendation to check ({result['reason']})", file=sys.stderr)
        return 2
    pct, target_ms, claimed = f"p{target['percentile']:g}", target["latency_ms"], recommended["speedup"]
    measure = target.get("measure", "latency")
    runs = args.runs or DEFAULT_RUNS[measure]
    if runs < 1:
        print(f"--runs must be >= 1, got {runs}", file=sys.stderr)
        return 2
    measure_pair = pair_measurement(args.run_dir, target, measure, runs)
    print(f"{args.run_dir}: target {measure} {pct} <= {target_ms:.3f} ms at batch {target['batch_size']}, seq "
          f"{target['seq_len']}, {target['threads']} threads; claimed {recommended['latency_ms']:.3f} ms, speedup "
          f"{claimed:.2f}x")
    print(f"{'repeat':>6} {'baseline ' + pct:>14} {'model ' + pct:>11} {'upper':>8} {'speedup':>8} {'at ' + pct:>7} "
          f"{'p95<=1.05T':>11} {'speedup+-10%':>13}")
    rows = []
    for index in range(args.repeat):
        if index:
            time.sleep(args.pause)
        base, model = measure_pair()
        latency, speedup = model.percentile_ms(target["percentile"]), base.p50_ms / model.p50_ms
        tail = base.percentile_ms(target["percentile"]) / latency
        row = {"baseline_ms": round(base.percentile_ms(target["percentile"]), 4), "model_ms": round(latency, 4),
               "model_upper_ms": round(model.bounds_ms(target["percentile"])[1], 4), "speedup": round(speedup, 3),
               "speedup_at_percentile": round(tail, 3),
               "latency_holds": latency <= target_ms * TARGET_SLACK,
               "speedup_holds": abs(speedup / claimed - 1) <= SPEEDUP_TOLERANCE}
        rows.append(row)
        print(f"{index + 1:>6} {row['baseline_ms']:>14.3f} {row['model_ms']:>11.3f} {row['model_upper_ms']:>8.3f} "
              f"{row['speedup']:>7.2f}x {tail:>6.2f}x {str(row['latency_holds']):>11} {str(row['speedup_holds']):>13}")
    summary = {"run_dir": str(args.run_dir), "target_ms": round(target_ms, 4), "claimed_ms": round(recommended["latency_ms"], 4),
               "claimed_speedup": round(claimed, 3), "measure": measure, "runs": runs, "repeats": rows,
               "latency_held": sum(r["latency_holds"] for r in rows), "speedup_held": sum(r["speedup_holds"] for r in rows)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
