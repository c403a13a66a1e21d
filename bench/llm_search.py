"""The LLM search's Pareto front against what a user would build by hand, measured in one run on this machine.

Runs `examples/llm/tune.yaml` (SmolLM2-135M-Instruct on Shakespeare, decode target 3x the fp32 teacher's), or reads a
finished run's result.json (`--result`), then measures, one after the other in the same minutes and each in a fresh
child process: the fp32 teacher, the reference (the model builder's int4: round-to-nearest, block 32, accuracy level
4) and every configuration of the run's feasible Pareto front. Each row's perplexity is taken on the run's own
validation windows, on the artifact in ONNX Runtime, so every row is scored the same way.

It prints the table and the issue's three comparisons:
- at the reference's decode latency or lower, the best perplexity of the front against the teacher's (+5% is the bar);
- at the reference's TTFT or lower, the best perplexity of the front against the reference's;
- a configuration at least 1.5x faster in decode than the reference that loses no more perplexity than it does.
It ends with one line of JSON: `teacher_ppl`, `reference` (`ppl`, `decode_ms`), and the front as `rows` (`name`, `ppl`,
`decode_ms`, `ttft_ms`; p50s).

    python bench/llm_search.py [--result runs/smollm2-shakespeare] [--trials 10] [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune import api  # noqa: E402
from autotune.config import load_spec  # noqa: E402
from autotune.lm_measure import LMMeasurement, measure_artifact  # noqa: E402
from autotune.runtime.genai import LMArtifact, WeightOnly  # noqa: E402
from autotune.tasks.causal_lm import CausalLM  # noqa: E402
from autotune.tasks.lm_exports import LMShape, cached_export  # noqa: E402
from autotune.report.summary import describe, pareto_trials  # noqa: E402
from profilers.cpu import probe_cpu  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "examples" / "llm" / "tune.yaml"
REFERENCE = WeightOnly(bits=4, block_size=32, method="rtn")
#: The issue's bars: perplexity within 5% of the teacher's at the reference's decode; 1.5x the reference's decode.
TEACHER_BAR, FASTER_BAR = 0.05, 1.5


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def front_artifacts(result: dict) -> dict[str, Path]:
    """The run's feasible Pareto front (and its recommendation), by name: `trial<N>` and its configuration."""
    rows = {f"trial{t['number']}: {describe(t['candidate'])}": Path(t["artifact"])
            for t in pareto_trials(result) if t.get("artifact")}
    rec = result.get("recommended")
    if rec is not None:
        rows[f"recommended (trial {rec['number']}): {rec['description']}"] = Path(rec["artifact"])
    return rows


def ppl(m: LMMeasurement) -> float:
    return m.score.perplexity


def decode(m: LMMeasurement) -> float:
    return m.generation.decode.p50_ms


def ttft(m: LMMeasurement) -> float:
    return m.generation.ttft.p50_ms


def best_within(front: list[LMMeasurement], latency: Callable[[LMMeasurement], float], bound: float) -> LMMeasurement | None:
    """The front row of lowest perplexity among those at `bound` or faster in `latency`."""
    return min((m for m in front if latency(m) <= bound), key=ppl, default=None)


def comparisons(teacher: LMMeasurement, reference: LMMeasurement, front: list[LMMeasurement]) -> dict[str, str]:
    """The three comparisons of the module docstring, in words, each with its verdict."""
    out = {}
    best = best_within(front, decode, decode(reference))
    out["at the reference's decode"] = (
        "no front row decodes as fast as the reference" if best is None else
        f"{best.name}: ppl {ppl(best):.2f} = {ppl(best) / ppl(teacher) - 1:+.1%} vs the teacher (bar +{TEACHER_BAR:.0%}): "
        f"{'met' if ppl(best) <= ppl(teacher) * (1 + TEACHER_BAR) else 'NOT met'}")
    best = best_within(front, ttft, ttft(reference))
    out["at the reference's TTFT"] = (
        "no front row prefills as fast as the reference" if best is None else
        f"{best.name}: ppl {ppl(best):.2f} vs the reference's {ppl(reference):.2f}: "
        f"{'met' if ppl(best) <= ppl(reference) else 'NOT met'}")
    fastest = min((m for m in front if ppl(m) <= ppl(reference)), key=decode, default=None)
    met = fastest is not None and decode(fastest) * FASTER_BAR <= decode(reference)
    out[f"{FASTER_BAR}x the reference's decode, no worse perplexity"] = (
        "NOT met: no front row is as accurate as the reference" if fastest is None else
        f"{fastest.name} (the fastest front row as accurate as the reference): {decode(fastest):.2f} ms/token, "
        f"{decode(reference) / decode(fastest):.2f}x the reference: {'met' if met else 'NOT met'}")
    return out


def print_table(rows: list[LMMeasurement], teacher: LMMeasurement) -> None:
    print(f"{'row':<96} {'ppl':>8} {'vs teacher':>10} {'decode ms':>9} {'TTFT ms':>8} {'peak MB':>8}")
    for m in rows:
        print(f"{m.name[:96]:<96} {m.score.perplexity:8.2f} {m.score.perplexity / teacher.score.perplexity - 1:+10.1%} "
              f"{m.generation.decode.p50_ms:9.2f} {m.generation.ttft.p50_ms:8.1f} {m.generation.peak_rss_bytes / 2**20:8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--result", type=Path, help="a finished LLM run (its directory or result.json); default: run the demo spec")
    parser.add_argument("--spec", type=Path, default=SPEC)
    parser.add_argument("--trials", type=int, help="the search's trial budget (default: the spec's)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-llm-search"))
    parser.add_argument("--runs", type=int, default=10, help="generation runs per row (16 decoded tokens each)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.result is None:
        say(f"running the search of {args.spec} into {args.out}")
        result = api.tune(args.spec, out=args.out, resume=True, **({"trials": args.trials} if args.trials else {})).data
    else:
        result = api.load_result(args.result).data
    spec = load_spec(result["spec"])
    loaded = CausalLM.load(spec)  # the run's windows, cut exactly as the run cut them
    t, threads = spec.target, result["target"]["threads"]
    shape = LMShape(t.prompt_len, t.context_len, spec.data.max_length)
    vocab = int(loaded.teacher.config.vocab_size)
    validation = loaded.windows.validation

    def measure(name: str, artifact: LMArtifact, reference=None) -> LMMeasurement:
        say(f"measuring {name}")
        return measure_artifact(name, artifact, validation, shape, threads, vocab, reference, args.runs)

    teacher = measure("teacher-fp32", cached_export(loaded.hf_dir, None))
    reference = measure("builder-int4-rtn-b32 (reference)", cached_export(loaded.hf_dir, REFERENCE), teacher.score.predictions)
    front = [measure(name, LMArtifact(path, None), teacher.score.predictions) for name, path in front_artifacts(result).items()]
    cpu = probe_cpu()
    print(f"\n{result['name']} on {cpu.model_name}, {threads} threads, batch 1, prompt {t.prompt_len}, decode at context "
          f"{t.context_len}, perplexity on {validation.size} validation tokens; p50s, every row timed in this run")
    print_table([teacher, reference, *front], teacher)
    for name, verdict in comparisons(teacher, reference, front).items():
        print(f"- {name}: {verdict}")
    print(f"bench took {time.perf_counter() - started:.0f} s")
    print(json.dumps({"machine": cpu.model_name, "threads": threads, "teacher_ppl": teacher.score.perplexity,
                      "reference": {"ppl": reference.score.perplexity, "decode_ms": reference.generation.decode.p50_ms,
                                    "ttft_ms": reference.generation.ttft.p50_ms},
                      "rows": [{"name": m.name, "ppl": m.score.perplexity, "decode_ms": m.generation.decode.p50_ms,
                                "ttft_ms": m.generation.ttft.p50_ms} for m in front]}))


if __name__ == "__main__":
    main()
