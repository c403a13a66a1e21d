"""Latency, accuracy and roofline of the compression operators and execution engines on the all-MiniLM-L6-v2
shape, measured in one run, and which ISA paths the quantization recipes and engine rules use on this CPU.

Rows: the demo's fine-tuned teacher (BERT 6x384, 12 heads) as fp32 unfused, fp32 fused, int8 and int4 under each
recipe choice that depends on the CPU (int8 with 7-bit or full-range weights; int4 MatMulNBits computing in fp32
or in int8); the teacher under every engine and precision mode of `profilers.recipes.engine_modes` whose engine
is installed (ONNX Runtime static int8; OpenVINO fp32, bf16, NNCF static int8), kept by this CPU's rules or not,
so the rows show why; and student shapes 4x384, 2x384, 2x256 at fp32 (fused), ONNX Runtime's dynamic int8 and,
where this CPU's recipe runs int8 in OpenVINO, OpenVINO's static int8 (random weights: latency depends on shape and
bits, as in the tuner's latency gate). OpenVINO's rows are IRs fixed to the timed shape, as the tuner deploys them;
its fp32 and int8 teacher also come as the same models taking any shape (`-any-shape`), to show what fixing buys.

Each teacher row gives its validation accuracy on the demo's split and its largest logit difference from the fused
fp32 teacher on random token ids. Static int8 is calibrated on 64 rows of the training split. Speedups are against
`fp32-best`, the fastest fp32 teacher measured (ONNX Runtime unfused or fused, OpenVINO), so no slow reference
inflates them. Rows are timed one after another, so two rows' ratio carries the host's drift between their minutes:
the teacher rows within 0.5 point of the fp32 teacher's validation accuracy and within 1.5x of the fastest of them
(but bf16, whose hint the timing child does not set) are timed again taking turns with `fp32-best` in one clean
child process, three times (`alternating_speedups`), and `teacher-best` is the one with the highest median ratio
there (`teacher_best_alternating_speedups`; the fastest row within 0.5 point where none could be timed so).
`roofline_pct` is each row's operations per second (the predictor's analytic count) against the profile's GEMM
peak for its compute precision, measured at the start of the run. `*` marks the recipe profilers/recipes.py picks
for this CPU and the modes its rules keep. The JSON line names the machine's ISA flags (`isa`), the ones that chose
the recipes (`isa_deciding`), and a `recipe` on every row.

Every model is built first (all torch work done), then each is timed in a runtime of its own with spinning off,
one alive at a time, so no idle pool competes for the cores.

    python bench/operators.py [--threads 2] [--seq-len 64] [--batch-size 1] [--out-dir DIR] [--spec SPEC]
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from autotune.compress.quantization import build_variant  # noqa: E402
from autotune.config import load_spec  # noqa: E402
from autotune.runtime import OrtRuntime, export_artifact, feeds_for  # noqa: E402
from autotune.runtime.engines import convert_openvino_fp32, quantize_openvino_int8  # noqa: E402
from autotune.runtime.sessions import InferenceRuntime, OpenVinoRuntime  # noqa: E402
from autotune.tasks import TextClassification, prepared_task  # noqa: E402
from autotune.tasks.text_classification import openvino_input_shape  # noqa: E402
from autotune.tasks.encoding import evaluate  # noqa: E402
from profilers.cpu import probe_cpu  # noqa: E402
from profilers.hardware import collect_profile  # noqa: E402
from profilers.isolated import OnnxRequest, measure_onnx_interleaved  # noqa: E402
from profilers.latency import LatencyStats, MeasureSettings  # noqa: E402
from profilers.microbench import Microbench  # noqa: E402
from profilers.predictor import ModelShape, Workload  # noqa: E402
from profilers.openvino import Shape, openvino_installed  # noqa: E402
from profilers.recipes import INT4_INT8_COMPUTE, INT8_DOT_FLAGS, EngineMode, Recipe, engine_modes, recipe_for  # noqa: E402
from profilers.roofline import roofline  # noqa: E402

DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "examples" / "sentiment" / "tune.yaml"
STUDENT_SHAPES = ((4, 384), (2, 384), (2, 256))
HEAD_DIM = 32  # MiniLM's 384 / 12; students keep it so 256 wide means 8 heads
FP32_BEST = "fp32-best"
TEACHER_BEST = "teacher-best"
ACCURACY_TOLERANCE = 0.005  # half a point of validation accuracy
SETTINGS = MeasureSettings(warmup=10, min_runs=50, max_runs=2000, max_seconds=6.0, rel_ci=0.02)
ERROR_ROWS = 64  # rows of random token ids each quantized teacher's logits are compared on
ALTERNATING_ROUNDS = 3  # teacher-best's contenders and fp32-best taking turns in one child process, this many times
CONTENDER_SPREAD = 1.5  # teacher rows this much slower than the fastest one in the sequential timing are not contenders


@dataclass(frozen=True)
class Variant:
    """One model to time: its row name, how it was built, what it runs on, whether this CPU's rules choose it."""

    name: str
    model_path: Path
    vocab_size: int
    recipe: str
    shape: ModelShape
    engine: str = "onnxruntime"
    ov_precision: str = "fp32"  # OpenVINO's inference precision hint
    chosen: bool = True
    teacher: bool = False
    int4_int8_compute: bool = True  # int4 rows: MatMulNBits computes in int8 (accuracy level 4), else in fp32

    def open(self, threads: int) -> InferenceRuntime:
        """Its runtime: an ONNX Runtime session or an OpenVINO compiled model."""
        if self.engine == "openvino":
            return OpenVinoRuntime(self.model_path, threads=threads, vocab_size=self.vocab_size, precision=self.ov_precision)  # type: ignore[arg-type]
        return OrtRuntime(self.model_path, threads=threads, vocab_size=self.vocab_size)

    def size_mb(self) -> float:
        """On disk; an OpenVINO IR's weights are in the .bin beside the .xml."""
        weights = self.model_path.with_suffix(".bin")
        return (self.model_path.stat().st_size + (weights.stat().st_size if self.engine == "openvino" and weights.exists() else 0)) / 1e6


@dataclass(frozen=True)
class Row:
    """A timed variant, its accuracy on the validation split (teacher rows) and its roofline."""

    variant: Variant
    stats: LatencyStats
    accuracy: float | None
    roofline_pct: float
    logit_error: float | None
    size_mb: float
    input_names: tuple[str, ...]


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
        rows.append((f"int8-{'7bit' if reduce_range else 'full'}-weights", 8,
                     replace(chosen, int8_reduce_range=reduce_range, int8_engine="onnxruntime")))
    for level in (0, INT4_INT8_COMPUTE):
        rows.append((f"int4-{'int8' if level else 'fp32'}-compute", 4, replace(chosen, int4_accuracy_level=level)))
    return rows


def error_feeds(runtime: InferenceRuntime) -> dict[str, np.ndarray]:
    """ERROR_ROWS random 64-token inputs, the same for every teacher row."""
    return feeds_for(runtime.input_names, ERROR_ROWS, 64, runtime.vocab_size, seed=1)


def prepared_teacher(spec_path: Path) -> TextClassification:
    """The spec's teacher, fine-tuned (cached) as `autotune tune` prepares it, with its splits and tokenizer."""
    task = prepared_task(load_spec(spec_path))
    assert isinstance(task, TextClassification), "the operators bench measures an encoder classifier"
    return task


def engine_variants(mode: EngineMode, unfused: Path, out_dir: Path, vocab: int, shape: ModelShape,
                    calibration: list[dict[str, np.ndarray]], chosen: Recipe, fixed: Shape | None) -> list[Variant]:
    """The teacher under one engine mode beyond ONNX Runtime's fp32 and dynamic int8 (built here; none when the
    engine is not installed). OpenVINO's fp32 and int8 come as IRs fixed to the timed shape, as the tuner deploys
    them, and beside them as the same models taking any shape (`-any-shape`), so the table shows what fixing buys."""
    if importlib.util.find_spec(mode.engine) is None:  # the engine's module has its name
        return []
    if mode.name == "onnxruntime-int8-static":
        path = build_variant(unfused, out_dir / "teacher-ort-int8-static.onnx", 8, static=True, calibration=calibration,
                             recipe=chosen, num_heads=shape.heads, hidden_size=shape.hidden)
        return [Variant(mode.name, path, vocab, "int8 static QDQ (fused graph), calibrated", replace(shape, bits=8),
                        chosen=mode.kept, teacher=True)]
    if mode.name == "openvino-int8-static":
        recipe, int8 = "NNCF int8 static, calibrated", replace(shape, bits=8)
        built = {kind: quantize_openvino_int8(unfused, calibration, out_dir / f"teacher-openvino-int8-{kind}" / "model.xml",
                                              shape_of_kind) for kind, shape_of_kind in (("fixed", fixed), ("any", None))}
        return [Variant(mode.name, built["fixed"], vocab, recipe, int8, "openvino", chosen=mode.kept, teacher=True),
                Variant(f"{mode.name}-any-shape", built["any"], vocab, recipe, int8, "openvino", chosen=False, teacher=True)]
    if mode.engine == "openvino" and mode.kept:  # fp32, or bf16 where the rules keep it (OpenVINO refuses it elsewhere)
        ir = out_dir / "teacher-openvino-fp32" / "model.xml"
        if not ir.exists():
            convert_openvino_fp32(unfused, ir, fixed)
        variants = [Variant(mode.name, ir, vocab, f"OpenVINO {mode.precision}", shape, "openvino", mode.precision,
                            chosen=True, teacher=True)]
        if mode.precision == "fp32":
            variants.append(Variant(f"{mode.name}-any-shape", unfused, vocab, "OpenVINO fp32", shape, "openvino",
                                    chosen=False, teacher=True))
        return variants
    return []


def build_variants(task: TextClassification, out_dir: Path, chosen: Recipe, modes: tuple[EngineMode, ...],
                   fixed: Shape | None) -> list[Variant]:
    """Every model the table times, built before any timing starts; OpenVINO's fixed to `fixed` (None: any shape)."""
    teacher, tokenizer = task.teacher, task.tokenizer
    artifact = export_artifact(teacher, tokenizer, out_dir / "teacher")
    shape = dict(num_heads=artifact.num_heads, hidden_size=artifact.hidden_size)
    vocab = artifact.vocab_size
    c = teacher.config
    teacher_shape = ModelShape(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size, 32)
    fused = build_variant(artifact.model_path, out_dir / "teacher-fp32-fused.onnx", 32, **shape)
    variants = [Variant("fp32-unfused", artifact.model_path, vocab, "fp32", teacher_shape, teacher=True),
                Variant("fp32-fused", fused, vocab, "fp32", teacher_shape, teacher=True)]
    for name, bits, recipe in recipe_choices(chosen):
        path = build_variant(artifact.model_path, out_dir / f"teacher-{name}.onnx", bits, recipe=recipe, **shape)
        variants.append(Variant(name, path, vocab, recipe.describe(bits), replace(teacher_shape, bits=bits),
                                chosen=recipe == chosen, teacher=True,
                                int4_int8_compute=recipe.int4_accuracy_level == INT4_INT8_COMPUTE))
    calibration = task.calibration_feeds()
    for mode in modes:
        variants += engine_variants(mode, artifact.model_path, out_dir, vocab, teacher_shape, calibration, chosen, fixed)
    for layers, hidden in STUDENT_SHAPES:
        student = export_artifact(student_shape(teacher, layers, hidden), tokenizer, out_dir / f"student-{layers}x{hidden}")
        dynamic = replace(chosen, int8_engine="onnxruntime")
        kinds = [("fp32", 32, dynamic), ("int8", 8, dynamic)] + ([("int8-openvino", 8, chosen)] if dynamic != chosen else [])
        for suffix, bits, recipe in kinds:
            name = f"student-{layers}x{hidden}-{suffix}"
            engine = recipe.int8_engine if bits == 8 else "onnxruntime"
            path = (quantize_openvino_int8(student.model_path, calibration, out_dir / name / "model.xml", fixed)
                    if engine == "openvino" else
                    build_variant(student.model_path, out_dir / f"{name}.onnx", bits, recipe=recipe,
                                  num_heads=student.num_heads, hidden_size=student.hidden_size))
            variants.append(Variant(name, path, vocab, recipe.describe(bits),
                                    ModelShape(layers, hidden, hidden // HEAD_DIM, 4 * hidden, bits), engine,
                                    chosen=recipe == chosen or bits == 32,
                                    int4_int8_compute=chosen.int4_accuracy_level == INT4_INT8_COMPUTE))
    return variants


def measure_variant(variant: Variant, task: TextClassification, reference_logits: np.ndarray, bench: Microbench, *,
                    threads: int, batch_size: int, seq_len: int) -> Row:
    """Time one variant in a runtime of its own, dropped before the next one opens; a quantized teacher row is also
    scored on the validation split and compared with the fused fp32 teacher's logits on random inputs."""
    runtime = variant.open(threads)
    stats = runtime.measure(batch_size, seq_len, SETTINGS)
    accuracy = error = None
    if variant.teacher:
        accuracy = evaluate(runtime.run, task.tokenizer, task.splits.validation, max_length=task.spec.data.max_length).accuracy
        if variant.shape.bits != 32 or variant.ov_precision != "fp32":
            error = float(np.abs(runtime.run(error_feeds(runtime)) - reference_logits).max())
    pct = roofline(variant.shape, Workload(batch_size, seq_len), stats.p50_ms, bench,
                   int4_int8_compute=variant.int4_int8_compute).pct
    names = runtime.input_names
    del runtime
    gc.collect()
    return Row(variant, stats, accuracy, pct, error, variant.size_mb(), names)


def fp32_best(rows: list[Row]) -> Row:
    """The fastest fp32 teacher measured: the reference every speedup is taken against."""
    fp32 = [r for r in rows if r.variant.teacher and r.variant.shape.bits == 32 and r.variant.ov_precision == "fp32"]
    return min(fp32, key=lambda r: r.stats.p50_ms)


def within_tolerance(rows: list[Row]) -> list[Row]:
    """The teacher rows within ACCURACY_TOLERANCE of the fp32 teacher's validation accuracy."""
    reference = fp32_best(rows).accuracy
    assert reference is not None
    return [r for r in rows if r.variant.teacher and r.accuracy is not None and r.accuracy >= reference - ACCURACY_TOLERANCE]


def contenders(rows: list[Row]) -> list[Row]:
    """The rows `teacher-best` is chosen among by taking turns: within tolerance, not the reference itself, within
    CONTENDER_SPREAD of the fastest of them one after another, and timeable by the child (no bf16 hint)."""
    reference, within = fp32_best(rows), within_tolerance(rows)
    fastest = min(r.stats.p50_ms for r in within)
    return [r for r in within if r is not reference and r.variant.ov_precision == "fp32"
            and r.stats.p50_ms <= CONTENDER_SPREAD * fastest]


def alternating_speedups(reference: Row, rivals: list[Row], *, threads: int, batch_size: int, seq_len: int,
                         rounds: int = ALTERNATING_ROUNDS) -> dict[str, list[float]]:
    """Each rival's speedup over `reference` (medians), all taking turns in one clean child process, `rounds` times."""
    if not rivals:
        return {}
    requests = [OnnxRequest(str(r.variant.model_path), r.input_names, batch_size, seq_len, r.variant.vocab_size, threads,
                            engine=r.variant.engine) for r in (reference, *rivals)]
    speedups: dict[str, list[float]] = {r.variant.name: [] for r in rivals}
    for _ in range(rounds):
        reference_stats, *stats = measure_onnx_interleaved(requests)
        for rival, rival_stats in zip(rivals, stats):
            speedups[rival.variant.name].append(reference_stats.p50_ms / rival_stats.p50_ms)
    return speedups


def teacher_best(rows: list[Row], alternating: dict[str, list[float]]) -> Row:
    """The teacher row with the highest median speedup taking turns with `fp32-best`; the fastest row within
    tolerance one after another where none was timed so."""
    if alternating:
        name = max(alternating, key=lambda n: statistics.median(alternating[n]))
        return next(r for r in rows if r.variant.name == name)
    return min(within_tolerance(rows), key=lambda r: r.stats.p50_ms)


def render(rows: list[Row], isa: tuple[str, ...], chosen: Recipe, modes: tuple[EngineMode, ...],
           alternating: dict[str, list[float]], *, threads: int, batch_size: int, seq_len: int) -> str:
    """The table, headed by the machine's ISA flags, the recipe and engine rules chosen for it with their reasons,
    then each contender's speedups taking turns with `fp32-best`."""
    reference, best = fp32_best(rows), teacher_best(rows, alternating)
    header = (f"{'variant':<26}{'p50 ms':>9}{'p95 ms':>9}{'speedup':>9}{'val acc':>9}{'roofline':>9}{'size MB':>9}"
              f"{'max|dlogit|':>12}  recipe ('*' = this CPU's)")
    lines = [f"batch {batch_size}, seq {seq_len}, {threads} threads, spinning off; speedups against {FP32_BEST} "
             f"({reference.variant.name}, {reference.stats.p50_ms:.2f} ms)",
             f"ISA: {' '.join(isa)}", *(f"recipe: {reason}" for reason in chosen.reasons),
             *(f"engine rule: {m.name} {'kept' if m.kept else 'dropped'}: {m.reason}" for m in modes),
             header, "-" * len(header)]
    for r in rows + [replace(best, variant=replace(best.variant, name=f"{TEACHER_BEST} ({best.variant.name})"))]:
        error = "-" if r.logit_error is None else f"{r.logit_error:.2e}"
        acc = "-" if r.accuracy is None else f"{100 * r.accuracy:.2f}"
        lines.append(f"{r.variant.name:<26}{r.stats.p50_ms:>9.2f}{r.stats.p95_ms:>9.2f}"
                     f"{reference.stats.p50_ms / r.stats.p50_ms:>8.2f}x{acc:>9}{r.roofline_pct:>8.1f}%{r.size_mb:>9.1f}"
                     f"{error:>12}  {'*' if r.variant.chosen else ' '} {r.variant.recipe}")
    lines.append(f"taking turns with {FP32_BEST} in one child process ({ALTERNATING_ROUNDS} rounds): "
                 + ("; ".join(f"{name} {', '.join(f'{x:.2f}x' for x in ratios)}" for name, ratios in alternating.items())
                    or "no contender the timing child runs (bf16 hints only)"))
    return "\n".join(lines)


def row_json(r: Row, reference_ms: float, name: str | None = None) -> dict[str, object]:
    """One row of the JSON line."""
    return {"name": name or r.variant.name, "engine": r.variant.engine, "recipe": r.variant.recipe,
            "chosen": r.variant.chosen, "p50_ms": round(r.stats.p50_ms, 3), "p95_ms": round(r.stats.p95_ms, 3),
            "speedup": round(reference_ms / r.stats.p50_ms, 3), "size_mb": round(r.size_mb, 2),
            "accuracy": None if r.accuracy is None else round(r.accuracy, 4), "roofline_pct": round(r.roofline_pct, 1),
            "max_logit_error": None if r.logit_error is None else round(r.logit_error, 6)}


def as_json(rows: list[Row], isa: tuple[str, ...], chosen: Recipe, modes: tuple[EngineMode, ...],
            alternating: dict[str, list[float]]) -> str:
    """The one line of JSON the bench ends with: `fp32-best` and `teacher-best` are rows of their own."""
    reference, best = fp32_best(rows), teacher_best(rows, alternating)
    ms = reference.stats.p50_ms
    return json.dumps({
        "isa": list(isa),
        "isa_deciding": sorted(set(isa) & INT8_DOT_FLAGS),
        "chosen_recipe": chosen.to_dict(),
        "engine_modes": [{"name": m.name, "kept": m.kept, "reason": m.reason} for m in modes],
        "rows": [row_json(r, ms) for r in rows] + [row_json(reference, ms, FP32_BEST) | {"of": reference.variant.name},
                                                    row_json(best, ms, TEACHER_BEST) | {"of": best.variant.name}],
        "alternating_speedups": {name: [round(x, 3) for x in ratios] for name, ratios in alternating.items()},
        "teacher_best_alternating_speedups": [round(x, 3) for x in alternating.get(best.variant.name, [])],
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=None, help="where the models go (default: a temp dir)")
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="the tune spec whose teacher and data are used")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    isa = probe_cpu().flags
    chosen, modes = recipe_for(isa, openvino=openvino_installed()), engine_modes(isa)
    bench = collect_profile(args.threads).microbench  # before any torch work: the peaks each roofline divides by
    assert bench is not None
    task = prepared_teacher(args.spec)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out_dir or Path(tmp)
        fixed = openvino_input_shape(args.batch_size, args.seq_len, task.spec.data.max_length)
        variants = build_variants(task, out_dir, chosen, modes, fixed)
        time.sleep(1.0)  # let torch's OpenMP workers from export go idle before timing
        reference = next(v for v in variants if v.name == "fp32-fused").open(args.threads)
        reference_logits = reference.run(error_feeds(reference))
        del reference
        rows = [measure_variant(v, task, reference_logits, bench, threads=args.threads, batch_size=args.batch_size,
                                seq_len=args.seq_len) for v in variants]
        shape = {"threads": args.threads, "batch_size": args.batch_size, "seq_len": args.seq_len}
        alternating = alternating_speedups(fp32_best(rows), contenders(rows), **shape)
    print(render(rows, isa, chosen, modes, alternating, **shape))
    print(as_json(rows, isa, chosen, modes, alternating))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
