"""What the last-layer state transfer (`training.state_weight`) buys a student: fixed student shapes distilled as
the demo distils them, with and without it, and their accuracy on the demo's validation and test splits.

Each shape is made from the demo's fine-tuned teacher (`make_student`, layers and widths kept by importance),
distilled `--epochs` epochs on the training split at each weight (same seed, so the weight is the only
difference), exported fp32 and scored in ONNX Runtime. The teacher's states are computed once and cached like its
logits; the training time of each student is printed beside its accuracy, so the cost shows too.

    python bench/state_transfer.py [--limit 2500] [--weights 0,1] [--shapes 2x384x12x1536,...] [--epochs 2]

Ends with one JSON line: `teacher` (validation, test) and `rows` (shape, state_weight, validation, test,
train_s).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune.config import load_spec  # noqa: E402
from autotune.tasks import TextClassification, Timing, prepared_task  # noqa: E402
from profilers.recipes import PORTABLE  # noqa: E402
from search_spaces import Candidate  # noqa: E402
from students import scores, trained  # noqa: E402  (bench/students.py: this script's directory is on sys.path)

DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "examples" / "sentiment" / "tune.yaml"
DEFAULT_SHAPES = "2x384x12x1536,3x288x6x1152,2x288x6x1152"
TIMING = Timing(1, 64, 2, "cpu")


def parse_shape(text: str) -> Candidate:
    """`LAYERSxHIDDENxHEADSxFFN` as an fp32 candidate."""
    layers, hidden, heads, ffn = (int(part) for part in text.split("x"))
    return Candidate(layers=layers, hidden=hidden, heads=heads, ffn=ffn, bits=32)


def student_row(task: TextClassification, candidate: Candidate, weight: float, epochs: int, out_dir: Path) -> dict:
    """One student distilled at `weight`, exported and scored."""
    row = trained(task, candidate, epochs, PORTABLE, out_dir / f"weight-{weight:g}")
    return {"shape": row["shape"], "state_weight": weight, **scores(task, row["artifact"], TIMING),
            "train_s": row["train_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    parser.add_argument("--limit", type=int, default=None, help="rows of the data (the quick demo uses 2500)")
    parser.add_argument("--weights", default="0,1", help="state_weight values, comma-separated")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="LAYERSxHIDDENxHEADSxFFN, comma-separated")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    candidates = [parse_shape(text) for text in args.shapes.split(",")]
    rows, teacher = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for weight in (float(w) for w in args.weights.split(",")):
            overrides = {"training": {"state_weight": weight}} | ({"data": {"limit": args.limit}} if args.limit else {})
            task = prepared_task(load_spec(args.spec, overrides))
            assert isinstance(task, TextClassification), "the state transfer is an encoder student's"
            teacher = teacher or scores(task, task.build(task.teacher, task.teacher_shape.as_candidate(32),
                                                         Path(tmp) / "teacher", PORTABLE), TIMING)
            for candidate in candidates:
                rows.append(student_row(task, candidate, weight, args.epochs, Path(tmp)))
                r = rows[-1]
                print(f"{r['shape']:<16} state_weight {weight:g}: validation {r['validation']:.4f} "
                      f"test {r['test']:.4f} ({r['train_s']:.0f} s)", flush=True)
    print(f"teacher: validation {teacher['validation']:.4f} test {teacher['test']:.4f}")
    print(json.dumps({"teacher": teacher, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
