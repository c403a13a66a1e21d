"""What the latency gate and the caches save: seconds of a gate-rejected trial vs a trained one, on the real model.

The teacher is all-MiniLM-L6-v2 (BERT 6x384, 12 heads, with a fresh classification head) and the data the
builtin movie-review set (`autotune fetch`), all of it by default, with students trained as the demo spec
(examples/sentiment/tune.yaml) trains them, so a trained trial costs here what it costs in `make demo`. The
target is a fraction (default 0.5) of the teacher's measured p95, which puts deep students over it and
shallow ones under it. Six candidates go through `TrialPipeline.run`, the same call the study makes:

- three deep ones the gate must reject (no training),
- three shallow ones that are trained, two of them differing only in bits (the second is a student cache hit),

then the rejected ones run again: their gates are now cache hits. A fresh temporary `AUTOTUNE_CACHE_DIR` keeps
the first measurement of everything cold.

The gate times a stand-in with a 1,021-row token table instead of the model's 30,522 rows (cheaper to
export, fuse and quantize; a gather from the table costs the same). The last check measures what that
costs in fidelity: the stand-in's p50 over the full-table build's p50 for the rejected shapes, alternating
the two for three rounds (`standin_p50_ratio`, median; 1.0 means the gate times what a deployed model runs). The teacher is *not* fine-tuned (accuracy is not measured here;
only where time goes), which saves minutes and leaves training and evaluation costs unchanged.

    python bench/search_cost.py [--rows N] [--max-length 64] [--target-fraction 0.5] [--threads N]

Ends with one JSON line: gate_rejected_median_s, trained_median_s, ratio, student_cache_hits, gate_cache_hits,
standin_p50_ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from statistics import median
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune.builtin import MINILM, VADER, vader_csv_path  # noqa: E402
from autotune.caches import cache_root  # noqa: E402
from autotune.compress import shaped_like  # noqa: E402
from autotune.config import load_spec  # noqa: E402
from autotune.progress import SilentProgress  # noqa: E402
from autotune.records import TrialOutcome  # noqa: E402
from autotune.session import measure_baseline, resolved_threads  # noqa: E402
from autotune.tasks import TextClassification, Timing  # noqa: E402
from autotune.trial import Target, TrialContext, TrialPipeline  # noqa: E402
from profilers.hardware import collect_profile  # noqa: E402
from search_spaces import Candidate  # noqa: E402

# MiniLM is 6 layers x 384 hidden, 12 heads, FFN 1536. At batch 1 the encoder layers dominate latency, so
# 4-6 fp32 layers sit well over half the teacher's latency and 1-2 layers well under it.
REJECTED = (
    Candidate(layers=6, hidden=384, heads=12, ffn=1536, sparsity=0.3, bits=32),
    Candidate(layers=5, hidden=384, heads=12, ffn=1536, bits=32),
    Candidate(layers=4, hidden=384, heads=12, ffn=1536, bits=32),
)
TRAINED = (
    Candidate(layers=2, hidden=384, heads=12, ffn=1536, sparsity=0.3, bits=32),
    Candidate(layers=2, hidden=384, heads=12, ffn=1536, sparsity=0.3, bits=8),  # same student: a cache hit
    Candidate(layers=1, hidden=192, heads=6, ffn=768, bits=8),
)


DEMO_SPEC = Path(__file__).resolve().parent.parent / "examples" / "sentiment" / "tune.yaml"


def bench_spec(data_path: str, rows: int | None, max_length: int, threads: int | str) -> dict[str, Any]:
    """A tune spec for the builtin model (all rows, or a `rows`-row subset) trained as the demo spec trains
    its students, so a "trained trial" costs what it costs in `make demo`; the target is set after the baseline."""
    return {
        "name": "search-cost",
        "model": {"path": MINILM},
        "data": {"path": data_path, "max_length": max_length, "limit": rows},
        "target": {"latency_ms": 1.0, "seq_len": max_length, "threads": threads},
        "training": load_spec(DEMO_SPEC).training.model_dump(),
    }


def trial_row(label: str, outcome: TrialOutcome) -> dict[str, Any]:
    """One printed row (and its figures) for a TrialOutcome."""
    return {
        "label": label, "candidate": outcome.candidate.describe(), "stage": outcome.stage,
        "latency_ms": outcome.latency_ms, "seconds": sum(outcome.seconds.values()),
        "stage_seconds": "/".join(f"{outcome.seconds.get(s, 0.0):.1f}" for s in ("gate", "train", "evaluate")),
        "gate_hit": outcome.gate_cache_hit, "student_hit": outcome.student_cache_hit,
    }


def render(rows: list[dict[str, Any]], target_ms: float, baseline_p95: float) -> str:
    lines = [f"target p95 <= {target_ms:.2f} ms (teacher p95 {baseline_p95:.2f} ms)",
             f"{'run':<12} {'candidate':<58} {'stage':<10} {'p95 ms':>7} {'seconds':>7} {'gate/train/eval s':>18} "
             f"{'gate hit':>8} {'student hit':>11}"]
    for r in rows:
        student_hit = "-" if r["student_hit"] is None else str(r["student_hit"])
        lines.append(f"{r['label']:<12} {r['candidate']:<58} {r['stage']:<10} {r['latency_ms']:>7.2f} "
                     f"{r['seconds']:>7.1f} {r['stage_seconds']:>18} {str(r['gate_hit']):>8} {student_hit:>11}")
    return "\n".join(lines)


def stand_in_p50_ratio(pipeline: TrialPipeline, candidates: tuple[Candidate, ...], tmp: Path, rounds: int = 3) -> float:
    """Median over candidates and rounds of p50(gate stand-in) / p50(same shape, full token table)."""
    task = pipeline.ctx.task
    ratios = []
    for c in candidates:
        builds = {}
        for name, vocab in (("stand-in", task.gate_vocab()), ("full", None)):
            model = shaped_like(task.teacher, c.layers, c.hidden, c.heads, c.ffn, vocab_size=vocab)
            builds[name] = task.build(model, c, tmp / f"{c.key}-{name}-{c.bits}", pipeline.ctx.recipe)
        for _ in range(rounds):
            stand_in, full = (pipeline.ctx.target.latency(pipeline.measure(builds[n])) for n in ("stand-in", "full"))
            ratios.append(stand_in.p50_ms / full.p50_ms)
    return median(ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None,
                        help="use a stratified subset of this many rows (default: all 10,568, 80%% for training, as the demo)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--target-fraction", type=float, default=0.5, help="target = this x the teacher's p95")
    parser.add_argument("--threads", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    data_path = vader_csv_path()  # resolved before the cache directory moves to a temporary one
    if not data_path.exists():
        print(f"{VADER} is not fetched ({data_path}); run `autotune fetch` first.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="autotune-bench-") as tmp:
        os.environ["AUTOTUNE_CACHE_DIR"] = str(Path(tmp) / "cache")
        threads = int(args.threads) if args.threads != "auto" else "auto"
        return run(bench_spec(str(data_path), args.rows, args.max_length, threads), Path(tmp), args.target_fraction)


def run(spec_data: dict[str, Any], tmp: Path, target_fraction: float) -> int:
    """Baseline, target, the six cold trials, the gate re-runs; prints the table and the JSON summary."""
    spec = load_spec(spec_data)
    threads = resolved_threads(spec)
    loaded = TextClassification.load(spec)
    print(f"{len(loaded.splits.train)} training rows, max_length {spec.data.max_length}, {threads} threads; "
          "teacher NOT fine-tuned (its new head stays random: only time is measured, not accuracy)")
    profile = collect_profile(threads, quick=True)
    start = time.perf_counter()
    task = TextClassification.prepare(replace(loaded, new_head=False), spec, cache_root(), SilentProgress())
    print(f"teacher logits on the training split: {time.perf_counter() - start:.1f} s (once per run, cached)")
    t = spec.target
    baseline = measure_baseline(task, Timing(t.batch_size, t.seq_len, threads, t.device), t.percentile, "latency",
                                tmp / "run")
    baseline_p95 = baseline.latency.p95_ms
    target = Target(target_fraction * baseline_p95, t.percentile, t.batch_size, t.seq_len, threads, t.runtime, t.device)
    pipeline = TrialPipeline(TrialContext(task=task, target=target, fingerprint=profile.fingerprint, training=spec.training,
                                          seed=spec.search.seed, cache_dir=cache_root(), artifacts_dir=tmp / "run" / "artifacts",
                                          reference_ms=baseline.latency.percentile_ms(t.percentile), recipe=profile.recipe))

    rows = [trial_row("cold", pipeline.run(c)) for c in REJECTED + TRAINED]
    rows += [trial_row("gate re-run", pipeline.run(c)) for c in REJECTED]
    print(render(rows, target.latency_ms, baseline_p95))
    print(f"counters: {pipeline.counters}")
    fidelity = stand_in_p50_ratio(pipeline, REJECTED, tmp / "fidelity")
    print(f"gate stand-in p50 / full-table p50 (rejected shapes, 3 alternating rounds): median {fidelity:.3f}")

    cold = rows[:len(REJECTED) + len(TRAINED)]
    rejected = [r["seconds"] for r in cold if r["stage"] == "gate"]
    trained = [r["seconds"] for r in cold if r["stage"] == "evaluated" and r["student_hit"] is False]
    if not rejected or not trained:
        print(f"expected both gate-rejected and trained trials; got {len(rejected)} and {len(trained)} "
              "(adjust --target-fraction)", file=sys.stderr)
        return 1
    summary = {
        "gate_rejected_median_s": round(median(rejected), 2),
        "trained_median_s": round(median(trained), 2),
        "ratio": round(median(rejected) / median(trained), 3),
        "student_cache_hits": pipeline.counters["student_cache_hits"],
        "gate_cache_hits": pipeline.counters["gate_cache_hits"],
        "standin_p50_ratio": round(fidelity, 3),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
