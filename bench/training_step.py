"""Where a distillation step's time goes: forward, backward and optimizer of student shapes, with one dense AdamW
over every weight against the tuner's optimizers (lazy Adam for the token table, `training_optimizers`).

Each shape is made from the demo's fine-tuned teacher (as `bench/students.py` makes them) and trained on the first
`--steps` length-grouped batches of the demo's training split (batch 32, seed 0), each optimizer from the same
weights; the first `--warmup` steps are left out of the means. Training is what a trial spends most of its time on
with 2 cores, and at BERT's 30k-token vocabulary a dense step over the token table (11.7M weights at hidden 384)
costs more than two slim layers' forward and backward.

    python bench/training_step.py [--shapes 4x384x6x384/32,2x384x4x384/32] [--steps 60] [--warmup 10]

Ends with one JSON line: `rows` (shape, optimizer, forward_ms, backward_ms, optimizer_ms, step_ms) and `speedup`
(per shape: the dense step's time over the tuner's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from autotune.compress.distillation import (  # noqa: E402
    TokenizedData, collate, length_grouped_batches, row_gradients, training_optimizers,
)
from autotune.config import load_spec  # noqa: E402
from autotune.tasks import TextClassification, prepared_task  # noqa: E402
from students import parse_shape  # noqa: E402  (bench/students.py: this script's directory is on sys.path)

DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "examples" / "sentiment" / "tune.yaml"
OPTIMIZERS = ("dense AdamW", "tuner")


def step_times(model: torch.nn.Module, data: TokenizedData, optimizer: str, steps: int,
               warmup: int) -> dict[str, float]:
    """Mean ms of forward, backward and optimizer over `steps - warmup` steps of one optimizer layout."""
    spent = {"forward_ms": 0.0, "backward_ms": 0.0, "optimizer_ms": 0.0}
    layout = row_gradients(model) if optimizer == "tuner" else contextlib.nullcontext()
    with layout:
        optimizers = (training_optimizers(model, (), 1e-4) if optimizer == "tuner"
                      else [torch.optim.AdamW(model.parameters(), lr=1e-4)])
        model.train()
        for step, indices in enumerate(length_grouped_batches(data.lengths, 32, seed=0)[:steps]):
            inputs, labels = collate(data, indices, 0)
            start = time.perf_counter()
            loss = F.cross_entropy(model(**inputs).logits, labels)
            forward = time.perf_counter()
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            backward = time.perf_counter()
            for o in optimizers:
                o.step()
            if step >= warmup:
                spent["forward_ms"] += forward - start
                spent["backward_ms"] += backward - forward
                spent["optimizer_ms"] += time.perf_counter() - backward
    means = {name: 1000 * seconds / (steps - warmup) for name, seconds in spent.items()}
    return means | {"step_ms": sum(means.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    parser.add_argument("--shapes", default="4x384x6x384/32,2x384x4x384/32",
                        help="LAYERSxHIDDENxHEADSxFFN[/HEAD_DIM], comma-separated")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be >= 0 and below --steps")
    logging.basicConfig(level=logging.WARNING)
    task = prepared_task(load_spec(args.spec))
    assert isinstance(task, TextClassification), "students of an encoder classifier"
    rows, speedup = [], {}
    for text in args.shapes.split(","):
        candidate = parse_shape(text)
        for optimizer in OPTIMIZERS:
            rows.append({"shape": text, "optimizer": optimizer,
                         **step_times(task.make_student(candidate), task.train, optimizer, args.steps, args.warmup)})
            print(f"{text:<16} {optimizer:<12} " + "  ".join(f"{k[:-3]} {v:6.1f} ms" for k, v in rows[-1].items()
                                                            if k.endswith("_ms")), flush=True)
        speedup[text] = round(rows[-2]["step_ms"] / rows[-1]["step_ms"], 2)
        print(f"{text:<16} the tuner's step is {speedup[text]:.2f}x faster", flush=True)
    print(json.dumps({"rows": [{k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()} for row in rows],
                      "speedup": speedup}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
