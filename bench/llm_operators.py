"""Every causal-LM operator on the builtin SmolLM2-135M-Instruct and the builtin Shakespeare text, measured in one
run on this machine at batch 1: perplexity and top-1 agreement with the fp32 teacher on the validation plays
(computed on each ONNX artifact in ONNX Runtime), time to first token for a 128-token prompt, decode ms/token at a
256-token context (both in a clean child process through ONNX Runtime GenAI), peak resident memory and size on disk.

Rows:
- `teacher-fp32`: the builder's fp32 export (timed again right before every other row: speedups are taken within
  such a pair, since the host drifts by tens of percent over a run);
- `builder-int4-rtn`: what a user would build by hand, the builder's int4 (symmetric round-to-nearest, block 32,
  accuracy level 4): the reference the tuner must beat;
- `int8-rtn-b32`, and `int4-<method>-b<block>` for each method (rtn, rtn-asym, rtn-offset, k-quant, hqq) and block size
  (32, 64, 128), int8 compute (accuracy level 4; k-quant only where ONNX Runtime can pack its zero points);
  `int4-...-head8`: the LM head at int8;
- `drop20` / `drop40`: 20% / 40% of the decoder blocks removed by angular-distance importance on training text,
  `-healed` after distillation from the teacher (top-32 logits) for `--heal-tokens` training tokens;
  `ffn75-healed`: every FFN narrowed to 75% of its neurons by activation importance, healed the same way;
  `wanda-2:4`: Wanda 2:4 sparsity without healing (no sparse kernel in ONNX Runtime's CPU provider: the row shows
  that it costs perplexity and buys no latency). Students are fp32 unless the name says otherwise.

All torch work (importance, healing) happens before the first timing; each artifact is then timed alone in its
own child process, so training and timing never share the cores. Ends with one line of JSON: `rows` (`name`,
`ppl`, `agreement`, `ttft_ms`, `decode_ms`, `peak_mb`, `size_mb`; p50s) and `teacher_ppl`.

    python bench/llm_operators.py [--heal-tokens 32768] [--windows 12] [--runs 10] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from autotune.compress.decoder import (  # noqa: E402
    block_importance, blocks_to_keep, drop_blocks, ffn_importance, narrow_ffn, prune_decoder,
)
from autotune.compress.healing import TeacherTargets, heal, teacher_targets  # noqa: E402
from autotune.caches import cache_root, key_of  # noqa: E402
from autotune.lm_measure import LMMeasurement, measure_artifact  # noqa: E402
from autotune.tasks.lm_exports import LMShape, cached_causal_lm, cached_export, weights_identity  # noqa: E402
from autotune.runtime.genai import DECODE_ACCURACY_LEVEL, ExportError, LMArtifact, WeightOnly, check_k_quant_blocks  # noqa: E402
from autotune.tasks.lm_models import prepare_causal_lm  # noqa: E402
from autotune.tasks.lm_text import load_text, token_windows  # noqa: E402
from profilers.cpu import probe_cpu  # noqa: E402
from profilers.generation import GenerationRequest, GenerationStats, measure_generation  # noqa: E402

MODEL = "builtin:SmolLM2-135M-Instruct"
TEXT = "builtin:shakespeare"
SHAPE = LMShape(prompt_len=128, context_len=256, window=256)
#: GPTQ (`WeightOnly(method="gptq")`) is left out: ONNX Runtime's implementation ran one SmolLM2 export for more
#: than 6 minutes on 2 cores without finishing, more than this whole table's other exports together.
METHODS = ("rtn", "rtn-asym", "rtn-offset", "k-quant", "hqq")
BLOCKS = (32, 64, 128)
REFERENCE = WeightOnly(bits=4, block_size=32, method="rtn")
CALIBRATION_WINDOWS = 16
TARGET_TOP_K = 32
log = logging.getLogger("bench.llm_operators")


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def data(hf_dir: Path, windows: int, train_windows: int) -> tuple[np.ndarray, torch.Tensor]:
    """Validation windows (the first `windows` of the validation plays) and a seeded sample of training windows
    from every training play (calibration and healing)."""
    from transformers import AutoTokenizer

    splits = load_text(TEXT)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    validation = token_windows(tokenizer, splits.validation, SHAPE.window, limit=windows).numpy()
    train = token_windows(tokenizer, splits.train, SHAPE.window)
    picked = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:train_windows]
    return validation, train[picked]


def load_teacher(hf_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def cached_targets(teacher, hf_dir: Path, train: torch.Tensor) -> TeacherTargets:
    """The teacher's top-k next-token distributions on the healing windows, computed once per machine."""
    path = cache_root() / "lm-targets" / f"{key_of(weights_identity(hf_dir), train.tolist(), TARGET_TOP_K)}.pt"
    if path.exists():
        return TeacherTargets.load(path)
    began = time.perf_counter()
    targets = teacher_targets(teacher, train, k=TARGET_TOP_K)
    targets.save(path)
    say(f"teacher top-{TARGET_TOP_K} targets on {train.numel()} training tokens: {time.perf_counter() - began:.0f} s")
    return targets


def healed(student, train: torch.Tensor, targets: TeacherTargets, tokens: int, label: str):
    began = time.perf_counter()
    result = heal(student, train, targets, tokens=tokens, lr=1e-4, seed=0)
    say(f"{label}: healed on {result.tokens} tokens in {result.steps} steps, {time.perf_counter() - began:.0f} s, "
        f"loss {result.first_loss:.3f} -> {result.last_loss:.3f}")
    return result.model


def students(hf_dir: Path, train: torch.Tensor, heal_tokens: int, quick: bool) -> dict[str, Path]:
    """Hugging Face directories of every student row, built (and healed) once per machine."""
    teacher = load_teacher(hf_dir)
    calibration = train[:CALIBRATION_WINDOWS]
    importance = block_importance(teacher, calibration)
    say("block importance (angular distance): " + " ".join(f"{v:.3f}" for v in importance))
    blocks = len(importance)
    targets = cached_targets(teacher, hf_dir, train)
    made: dict[str, Path] = {}
    for percent in ((40,) if quick else (20, 40)):
        keep = blocks_to_keep(importance, round(blocks * (1 - percent / 100)))
        say(f"drop{percent}: keeping blocks {list(keep)}")
        made[f"drop{percent}"] = cached_causal_lm(hf_dir, ("drop", keep), lambda: drop_blocks(teacher, keep))
        made[f"drop{percent}-healed"] = cached_causal_lm(
            hf_dir, ("drop", keep, "heal", heal_tokens, TARGET_TOP_K),
            lambda: healed(drop_blocks(teacher, keep), train, targets, heal_tokens, f"drop{percent}"))
    if not quick:
        width = teacher.config.intermediate_size * 3 // 4
        neurons = ffn_importance(teacher, calibration)
        made["ffn75-healed"] = cached_causal_lm(
            hf_dir, ("ffn", width, "heal", heal_tokens, TARGET_TOP_K),
            lambda: healed(narrow_ffn(teacher, width, neurons), train, targets, heal_tokens, "ffn75"))
        made["wanda-2:4"] = cached_causal_lm(hf_dir, ("wanda", "2:4"),
                                             lambda: prune_decoder(teacher, None, "wanda", "2:4", calibration))
    return made


def artifacts(hf_dir: Path, student_dirs: dict[str, Path], quick: bool, calibration: np.ndarray) -> dict[str, LMArtifact]:
    """Every row's ONNX artifact, exported (or reused from the cache) before anything is timed."""
    rows = {"teacher-fp32": (hf_dir, None), "builder-int4-rtn": (hf_dir, REFERENCE),
            "int8-rtn-b32": (hf_dir, WeightOnly(bits=8, block_size=32))}
    for method in METHODS:
        for block in ((32,) if quick else BLOCKS):
            weights = WeightOnly(bits=4, block_size=block, method=method)
            if method == "k-quant":
                try:
                    check_k_quant_blocks(hf_dir, block)
                except ExportError as error:
                    say(f"no row {weights.name}: {error}")
                    continue
            rows[weights.name] = (hf_dir, weights)
    for method in ("rtn", "k-quant"):
        weights = WeightOnly(bits=4, block_size=32, method=method, head_bits=8)
        rows[weights.name] = (hf_dir, weights)
    rows |= {name: (directory, None) for name, directory in student_dirs.items()}
    if "drop40-healed" in student_dirs:
        weights = WeightOnly(bits=4, block_size=32, method="k-quant", head_bits=8)
        rows[f"drop40-healed-{weights.name}"] = (student_dirs["drop40-healed"], weights)
    built = {}
    for name, (source, weights) in rows.items():
        began = time.perf_counter()
        built[name] = cached_export(source, weights, calibration)
        say(f"export {name}: {time.perf_counter() - began:.1f} s")
    return built


def print_table(rows: list[LMMeasurement], paired: dict[str, GenerationStats]) -> None:
    """One row per artifact; speedups against the teacher timed right before that row (the host drifts by tens of
    percent over the run, so a ratio is only taken within a pair)."""
    print(f"{'row':<38} {'ppl':>9} {'vs fp32':>8} {'agree':>6} {'TTFT ms':>8} {'x TTFT':>7} {'decode ms':>9} "
          f"{'x decode':>8} {'peak MB':>8} {'size MB':>8}")
    teacher_ppl = rows[0].score.perplexity
    for measurement in rows:
        r, base = measurement.row(), paired[measurement.name]
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.3f}"
        print(f"{r['name']:<38} {r['ppl']:>9.2f} {r['ppl'] / teacher_ppl - 1:>+8.1%} {agree:>6} {r['ttft_ms']:>8.1f} "
              f"{base.ttft.p50_ms / r['ttft_ms']:>6.2f}x {r['decode_ms']:>9.2f} {base.decode.p50_ms / r['decode_ms']:>7.2f}x "
              f"{r['peak_mb']:>8.0f} {r['size_mb']:>8.1f}")


def speedups(row: LMMeasurement, base: GenerationStats) -> tuple[float, float]:
    """(TTFT, decode) speedups of a row over its paired teacher timing."""
    return base.ttft.p50_ms / row.generation.ttft.p50_ms, base.decode.p50_ms / row.generation.decode.p50_ms


def checks(rows: dict[str, LMMeasurement], paired: dict[str, GenerationStats], blocks: int,
           removed: dict[str, int], weight_bytes: dict[str, int]) -> None:
    """The issue's claims, each printed with its figures."""
    int4 = {name: speedups(row, paired[name])[1] for name, row in rows.items()
            if name.startswith("int4-") and "hqq" not in name}
    best = max(int4, key=int4.get)
    print(f"\nint4 decode vs fp32 (paired): fastest {best} {int4[best]:.2f}x (needs >= 2.5x)")
    for name, count in removed.items():
        if f"{name}-healed" in rows:
            ttft, decode = speedups(rows[f"{name}-healed"], paired[f"{name}-healed"])
            print(f"{name}-healed: {count} of {blocks} blocks removed, TTFT {ttft:.2f}x and decode {decode:.2f}x faster; "
                  f"in proportion to blocks {blocks / (blocks - count):.2f}x, to weight bytes read per token "
                  f"{weight_bytes['teacher-fp32'] / weight_bytes[name]:.2f}x (the embedding and LM head stay)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heal-tokens", type=int, default=32768, help="training tokens of healing per student")
    parser.add_argument("--train-windows", type=int, default=128, help="256-token training windows for healing")
    parser.add_argument("--windows", type=int, default=12, help="256-token validation windows for perplexity")
    parser.add_argument("--runs", type=int, default=10, help="timed generations per artifact (4 rounds of 16 decode steps each)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="block 32 only, one depth student: a smoke run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    torch.manual_seed(0)

    hf_dir = prepare_causal_lm(MODEL)
    validation, train = data(hf_dir, args.windows, args.train_windows)
    cpu = probe_cpu()
    say(f"{cpu.model_name}, {args.threads} threads, accuracy level {DECODE_ACCURACY_LEVEL}; {validation.size} validation tokens")
    student_dirs = students(hf_dir, train, args.heal_tokens, args.quick)
    built = artifacts(hf_dir, student_dirs, args.quick, train[:CALIBRATION_WINDOWS].numpy())
    torch.set_num_threads(1)  # nothing trains from here on; timing runs in child processes

    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    timing = GenerationRequest("", SHAPE.prompt_len, SHAPE.context_len, args.threads, vocab, runs=args.runs)
    teacher = measure_artifact("teacher-fp32", built["teacher-fp32"], validation, SHAPE, args.threads, vocab, runs=args.runs)
    rows, paired = {"teacher-fp32": teacher}, {"teacher-fp32": teacher.generation}
    for name, artifact in built.items():
        if name != "teacher-fp32":
            paired[name] = measure_generation(dataclasses.replace(timing, model_dir=str(built["teacher-fp32"].directory)))
            rows[name] = measure_artifact(name, artifact, validation, SHAPE, args.threads, vocab,
                                          teacher.score.predictions, args.runs)
            say(f"measured {name}")
    print(f"\nSmolLM2-135M-Instruct on {cpu.model_name}, {args.threads} threads, batch 1, prompt {SHAPE.prompt_len}, "
          f"decode at context {SHAPE.context_len}, perplexity on {validation.size} validation tokens; p50s; speedups "
          "against the teacher timed just before each row")
    print_table(list(rows.values()), paired)
    blocks = json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"]
    removed = {name: blocks - json.loads((path / "config.json").read_text())["num_hidden_layers"]
               for name, path in student_dirs.items() if name.startswith("drop") and not name.endswith("healed")}
    weight_bytes = {name: artifact.size_bytes for name, artifact in built.items()}
    checks(rows, paired, blocks, removed, weight_bytes)
    print(f"bench took {time.perf_counter() - started:.0f} s")
    print(json.dumps({"machine": cpu.model_name, "threads": args.threads, "teacher_ppl": teacher.score.perplexity,
                      "heal_tokens": args.heal_tokens,
                      "rows": [{k: v for k, v in m.row().items() if not k.endswith("p95_ms")} | {
                          "decode_speedup": speedups(m, paired[m.name])[1]} for m in rows.values()]}))


if __name__ == "__main__":
    main()
