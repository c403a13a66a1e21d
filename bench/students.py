"""Which encoder student shapes pay on this CPU: fixed shapes distilled as the demo distils them, deployed as the
tuner deploys them, their accuracy kept and their speedup over the teacher measured in one run.

Each shape is made from the demo's fine-tuned teacher (`make_student`: layers evenly spaced, hidden dims, heads and
FFN neurons kept by importance), distilled `--epochs` epochs on the training split (the demo's recipe, seed 0),
built with ONNX Runtime's fusion and this CPU's int8 recipe, and scored on the validation and test splits. Then
every student is timed with the fp32 teacher (fused) in one child process, taking turns
(`profilers.isolated.measure_onnx_interleaved`, batch 1, `--seq-len` tokens, 2 threads), `--rounds` times; the
speedup is the median over rounds of the teacher's p50 (p95) over the student's.

A shape is `LAYERSxHIDDENxHEADSxFFN`, or `LAYERSxHIDDENxHEADSxFFN/HEAD_DIM` for pruned heads: HEADS teacher heads
kept whole at HEAD_DIM each (the teacher's head width), the attention HEADS x HEAD_DIM wide instead of HIDDEN.

    python bench/students.py [--shapes 2x384x12x1536,2x384x6x768/32,...] [--limit 2500] [--epochs 2] [--rounds 3]

Ends with one JSON line: `teacher` (validation, test), `rows` (shape, validation, test, kept_test_pct, p50_ms,
p95_ms, speedup, speedup_p95, train_s).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune.config import load_spec  # noqa: E402
from autotune.runtime import Artifact  # noqa: E402
from autotune.tasks import TextClassification, Timing, prepared_task  # noqa: E402
from profilers.cpu import probe_cpu  # noqa: E402
from profilers.isolated import measure_onnx_interleaved  # noqa: E402
from profilers.openvino import openvino_installed  # noqa: E402
from profilers.recipes import Recipe, recipe_for  # noqa: E402
from search_spaces import Candidate  # noqa: E402

DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "examples" / "sentiment" / "tune.yaml"
DEFAULT_SHAPES = "2x384x12x1536,3x384x6x768/32,2x384x6x768/32,2x384x4x768/32,1x384x12x1536,2x288x6x1152"


def parse_shape(text: str) -> Candidate:
    """`LAYERSxHIDDENxHEADSxFFN[/HEAD_DIM]` as an int8 candidate; a head width of hidden / heads is the default."""
    dims, _, head_dim = text.partition("/")
    layers, hidden, heads, ffn = (int(part) for part in dims.split("x"))
    return Candidate.canonical(layers=layers, hidden=hidden, heads=heads, ffn=ffn, bits=8,
                               head_dim=int(head_dim) if head_dim else None)


def shape_name(candidate: Candidate) -> str:
    """The shape as `parse_shape` reads it."""
    base = f"{candidate.layers}x{candidate.hidden}x{candidate.heads}x{candidate.ffn}"
    return base if candidate.head_dim is None else f"{base}/{candidate.head_dim}"


def scores(task: TextClassification, artifact: Artifact, timing: Timing) -> dict[str, float]:
    """Accuracy on the validation and test splits."""
    return {split: task.score(artifact, split, timing).objective for split in ("validation", "test")}


def trained(task: TextClassification, candidate: Candidate, epochs: int, recipe: Recipe, out_dir: Path) -> dict:
    """One student distilled, built as deployed, and scored (latency comes later, with every model at once)."""
    start = time.perf_counter()
    model = task.distil(task.make_student(candidate), candidate, epochs=epochs, lr=task.spec.training.lr, seed=0,
                        pruning=None)
    seconds = time.perf_counter() - start
    artifact = task.build(model, candidate, out_dir / shape_name(candidate).replace("/", "-"), recipe)
    return {"shape": shape_name(candidate), "artifact": artifact, "train_s": round(seconds, 1)}


def timed(task: TextClassification, teacher: Artifact, rows: list[dict], timing: Timing, rounds: int) -> None:
    """Each row's p50/p95 and speedups, medians over `rounds` interleaved measurements with the teacher."""
    requests = [task.request(a, timing) for a in (teacher, *(row["artifact"] for row in rows))]
    measured = [measure_onnx_interleaved(requests) for _ in range(rounds)]
    for index, row in enumerate(rows, start=1):
        row["p50_ms"] = statistics.median(m[index].p50_ms for m in measured)
        row["p95_ms"] = statistics.median(m[index].p95_ms for m in measured)
        row["speedup"] = statistics.median(m[0].p50_ms / m[index].p50_ms for m in measured)
        row["speedup_p95"] = statistics.median(m[0].p95_ms / m[index].p95_ms for m in measured)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    parser.add_argument("--limit", type=int, default=None, help="rows of the data (the quick demo uses 2500)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="LAYERSxHIDDENxHEADSxFFN[/HEAD_DIM], comma-separated")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.rounds < 1:
        parser.error("--epochs and --rounds must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    candidates = [parse_shape(text) for text in args.shapes.split(",")]
    overrides = {"target": {"batch_size": 1, "seq_len": args.seq_len}} | ({"data": {"limit": args.limit}} if args.limit else {})
    task = prepared_task(load_spec(args.spec, overrides))  # the timed shape is the target's: OpenVINO builds are fixed to it
    assert isinstance(task, TextClassification), "students of an encoder classifier"
    timing, recipe = Timing(1, args.seq_len, 2, "cpu"), recipe_for(probe_cpu().flags, openvino=openvino_installed())
    with tempfile.TemporaryDirectory() as tmp:
        teacher = task.build(task.teacher, task.teacher_shape.as_candidate(32), Path(tmp) / "teacher", recipe)
        teacher_scores = scores(task, teacher, timing)
        rows = []
        for candidate in candidates:
            rows.append(trained(task, candidate, args.epochs, recipe, Path(tmp)))
            rows[-1] |= scores(task, rows[-1]["artifact"], timing)
            print(f"{rows[-1]['shape']:<16} validation {rows[-1]['validation']:.4f} test {rows[-1]['test']:.4f} "
                  f"({rows[-1]['train_s']:.0f} s)", flush=True)
        timed(task, teacher, rows, timing, args.rounds)
    print(f"teacher (fp32, fused): validation {teacher_scores['validation']:.4f} test {teacher_scores['test']:.4f}")
    print(f"{'shape':<16} {'val.':>7} {'test':>7} {'kept':>6} {'p50 ms':>7} {'p95 ms':>7} {'speedup':>8} {'at p95':>7}")
    for row in rows:
        row.pop("artifact")
        row["kept_test_pct"] = round(100 * row["test"] / teacher_scores["test"], 1)
        print(f"{row['shape']:<16} {row['validation']:7.4f} {row['test']:7.4f} {row['kept_test_pct']:5.1f}% "
              f"{row['p50_ms']:7.2f} {row['p95_ms']:7.2f} {row['speedup']:7.2f}x {row['speedup_p95']:6.2f}x")
    print(json.dumps({"teacher": teacher_scores, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
