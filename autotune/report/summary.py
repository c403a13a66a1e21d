"""Deployment planning from a result.json alone: the answer in one line, what changes with the target, and
how much traffic this machine can serve. Pure functions over the result's dict, so every figure in a report
can be traced back to a measured number in result.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autotune.records import Stage
from profilers.hardware import HardwareProfile
from autotune.screening import model_shape
from profilers.predictor import PredictionError, Workload
from profilers.recipes import INT4_INT8_COMPUTE, engines_text
from profilers.roofline import roofline
from search_spaces import Candidate

TARGET_SCALES = (0.5, 0.75, 1.5, 2.0)


def evaluated(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Trials with a measured accuracy (gate-rejected and failed trials have none)."""
    return [t for t in result["trials"] if t["stage"] == Stage.EVALUATED and t["accuracy"] is not None]


def architecture(candidate: dict[str, Any]) -> str:
    """A candidate's architecture in the report's short form (layers x hidden, heads and their width where pruned,
    FFN), written one way in every table."""
    heads = f"{candidate['heads']}h" + (f" of {candidate['head_dim']}" if candidate.get("head_dim") else "")
    return f"{candidate['layers']}x{candidate['hidden']} ({heads}, FFN {candidate['ffn']})"


def roofline_pct(result: dict[str, Any], trial: dict[str, Any]) -> float | None:
    """An encoder trial's operations per second at its p50 as a percentage of the run's profiled GEMM peak for its
    compute precision (`profilers.roofline`); None for a causal LM, a predicted latency or a profile without peaks."""
    profile = HardwareProfile.from_dict(result["hardware"], source="the run's hardware profile")
    latency = trial.get("latency") or {}
    if is_causal_lm(result) or profile.microbench is None or latency.get("predicted") or not latency.get("p50_ms"):
        return None
    c, target = trial["candidate"], result["target"]
    int8_compute = (result.get("recipe") or {}).get("int4_accuracy_level") == INT4_INT8_COMPUTE
    try:
        return roofline(model_shape(Candidate.from_dict(c)), Workload(target["batch_size"], target["seq_len"]),
                        latency["p50_ms"], profile.microbench, int4_int8_compute=int8_compute).pct
    except PredictionError:
        return None


def fp32_reference_text(result: dict[str, Any]) -> str:
    """Which fp32 deployment of the teacher is the baseline, and what the others measured beside it."""
    choices = result["baseline"].get("fp32_p50_ms") or {}
    if len(choices) < 2:
        return "the teacher's one fp32 export"
    fastest = min(choices, key=choices.get)
    others = ", ".join(f"{name} {ms:.2f} ms" for name, ms in choices.items() if name != fastest)
    return f"{fastest} (p50 {choices[fastest]:.2f} ms, the fastest measured; {others}, timed together)"


def engines_of(result: dict[str, Any]) -> str:
    """The engines an encoder run's figures come from: the target's runtime, the baseline's and int8's engines."""
    return engines_text(result["target"]["runtime"], result["baseline"].get("engine"),
                        (result.get("recipe") or {}).get("int8_engine"))


def sparsity_text(candidate: dict[str, Any]) -> str:
    """A candidate's sparsity as the report shows it: "dense", or its fraction and pattern."""
    return "dense" if not candidate["sparsity"] else f"{candidate['sparsity']:.0%} {candidate['sparsity_pattern']}"


def describe(candidate: dict[str, Any]) -> str:
    """A candidate dict in the same words `Candidate.describe` uses everywhere else."""
    return Candidate.from_dict(candidate).describe()


def metric_name(result: dict[str, Any]) -> str:
    """What "accuracy" means in this run: accuracy, or the name of the user's metric function."""
    return result.get("metric", "accuracy")


def percentile_name(result: dict[str, Any]) -> str:
    """The target percentile as a label ("p95"), as result.json keys its latency figures."""
    return f"p{result['target']['percentile']:g}"


def is_causal_lm(result: dict[str, Any]) -> bool:
    """Whether the run tuned a causal LM (its latencies are decode and TTFT, its quality perplexity)."""
    return result["spec"]["model"].get("task") == "causal-lm"


def latency_label(result: dict[str, Any]) -> str:
    """What the searched latency is, in words: "latency", or a causal LM's "decode" (per token) or "TTFT"."""
    measure = result["target"].get("measure", "latency")
    return {"decode": "decode", "ttft": "TTFT"}.get(measure, "latency")


def trial_perplexity(trial: dict[str, Any]) -> float | None:
    """A causal LM trial's validation perplexity as the search measured it (None before evaluation)."""
    return (trial.get("extras") or {}).get("perplexity")


def split_perplexity(entry: dict[str, Any], split: str) -> float | None:
    """The baseline's or the recommendation's perplexity on `split` ("validation" or "test")."""
    return (((entry.get("extras") or {}).get(split)) or {}).get("perplexity")


def judged_target(result: dict[str, Any]) -> tuple[float, str]:
    """The target the recommendation was judged against and, where the host's pace moved a relative target (the
    teacher re-measured beside it), by how much in words; result.json files without `target_ms` keep the resolved one."""
    resolved = result["target"]["latency_ms"]
    judged = result["recommended"].get("target_ms") or resolved
    if judged == resolved:
        return resolved, ""
    return judged, f" (the {resolved:.2f} ms target at the teacher's pace beside it, {judged / resolved - 1:+.0%})"


def lm_answer(result: dict[str, Any]) -> str:
    """A causal LM's recommendation in words: decode and TTFT against their targets, perplexity against the teacher's
    (validation and test), speedup, size and peak memory."""
    target, rec, base = result["target"], result["recommended"], result["baseline"]
    pct = percentile_name(result)
    spec_target = result["spec"]["target"]
    figures, base_figures = rec.get("figures") or {}, base.get("figures") or {}

    def against(name: str, label: str, unit: str) -> str:
        value, bound = figures.get(f"{name}_ms"), spec_target.get(f"{name}_ms")
        paced = ""
        if name == target.get("measure"):
            bound, paced = judged_target(result)
        text = f"{label} {pct} {value:.2f} {unit}" if value is not None else f"{label} not measured"
        return text + (f" vs target {bound:.2f}{paced}" if bound is not None and value is not None else "")

    parts = [against("decode", "decode", "ms/token"),
             against("ttft", f"TTFT ({target.get('prompt_len')}-token prompt)", "ms")]
    quality = []
    for split in ("validation", "test"):
        mine, teacher = split_perplexity(rec, split), split_perplexity(base, split)
        if mine is not None and teacher:
            quality.append(f"{split} {mine:.2f} vs {teacher:.2f} ({mine / teacher - 1:+.1%})")
    memory = f", peak memory {figures['peak_mb']:.0f} MB vs {base_figures.get('peak_mb', float('nan')):.0f} MB" \
        if "peak_mb" in figures else ""
    caveat = " It meets the target only within noise." if rec.get("verdict") == "meets within noise" else ""
    return (f"Deploy {describe(rec['candidate'])}: {'; '.join(parts)} (context {target['seq_len']}, {target['threads']} "
            f"threads); perplexity {', '.join(quality) or 'not measured'} against the fp32 teacher; "
            f"{rec['speedup']:.2f}x faster {latency_label(result)}; {rec['size_mb']:.0f} MB vs {base['size_mb']:.0f} MB on "
            f"disk{memory}.{caveat}")


def measurements_text(rec: dict[str, Any]) -> str:
    """The confirmation the recommendation's speedup comes from: three measurements, and whether they were its second
    confirmation, taken after its searched twin (same shape) met the target."""
    final = rec.get("final_measurement") or {}
    again = ", its second confirmation, after its searched twin of the same shape met the target," if final.get(
        "reconfirmed_after_twin") else ""
    return f"three measurements{again}"


def one_line_answer(result: dict[str, Any]) -> str:
    """The recommendation in words with its latency vs the target, accuracy vs the teacher, speedup and size."""
    target = result["target"]
    pct = percentile_name(result)
    rec = result["recommended"]
    if rec is None:
        return (f"No configuration met {pct} {latency_label(result)} <= {target['latency_ms']:.2f} ms on this machine: "
                f"{result['reason']}.")
    if is_causal_lm(result):
        return lm_answer(result)
    base = result["baseline"]
    target_ms, paced = judged_target(result)
    headroom = 1 - rec["latency_ms"] / target_ms
    val, test = rec["accuracy"]["validation"], rec["accuracy"]["test"]
    base_val, base_test = base["accuracy"]["validation"], base["accuracy"]["test"]
    test_part = (f", test {test:.4f} vs {base_test:.4f} ({test / base_test:.1%} kept)"
                 if test is not None and base_test else "")
    trained = f" (distilled {rec['epochs']} epochs: refined after the search)" if rec.get("refined") else ""
    interval = rec.get("latency_interval_ms")
    latency = f"{pct} {rec['latency_ms']:.2f} ms" + (f" (95% interval {interval[0]:.2f}-{interval[1]:.2f})" if interval else "")
    spread = rec.get("speedup_interval")
    speedup = f"{rec['speedup']:.2f}x faster" + (
        f" (median latency; {spread[0]:.2f}-{spread[1]:.2f}x over {measurements_text(rec)} alternating with the teacher, "
        f"{rec['speedup_at_percentile']:.2f}x at {pct})" if spread else "")
    caveat = ""
    if rec.get("verdict") == "meets within noise" and interval:
        caveat = (f" It meets the target only within noise: the upper bound of its {pct} is "
                  f"{interval[1] / target_ms - 1:+.0%} from the target, and no candidate met it with the "
                  f"{rec['margin']:.0%} margin.")
    return (
        f"Deploy {describe(rec['candidate'])}{trained}: {latency} vs target {target_ms:.2f} ms{paced} "
        f"({headroom:.0%} headroom); {metric_name(result)} validation {val:.4f} vs teacher {base_val:.4f} "
        f"({val / base_val:.1%} kept){test_part}; {speedup} and "
        f"{rec['size_mb']:.1f} MB vs {base['size_mb']:.1f} MB on disk.{caveat}"
    )


@dataclass(frozen=True)
class TargetOption:
    """The best configuration already measured under `scale` x the target: what a changed target would give, without
    another run."""

    scale: float
    target_ms: float
    trial: dict[str, Any] | None


def best_under(result: dict[str, Any], limit_ms: float) -> dict[str, Any] | None:
    """The most accurate evaluated trial measured at or under `limit_ms` (ties: the faster one)."""
    fitting = [t for t in evaluated(result) if t["latency_ms"] <= limit_ms]
    return min(fitting, key=lambda t: (-t["accuracy"], t["latency_ms"])) if fitting else None


def changed_targets(result: dict[str, Any]) -> list[TargetOption]:
    """The best measured configuration at each of TARGET_SCALES x the target, so a reader sees what a tighter or looser
    target buys."""
    target_ms = result["target"]["latency_ms"]
    return [TargetOption(s, target_ms * s, best_under(result, target_ms * s)) for s in TARGET_SCALES]


def teacher_needs_ms(result: dict[str, Any]) -> float:
    """The tightest target the uncompressed teacher meets on its own: its measured latency at the percentile."""
    key = f"p{result['target']['percentile']:g}"
    return float(result["baseline"]["latency_ms"][key])


@dataclass(frozen=True)
class Capacity:
    """How many instances of one configuration this machine holds and the requests/s they serve together, with the limit
    (cores or memory) that decides it."""

    trial: dict[str, Any]
    throughput_per_instance: float
    instances: int
    limited_by: str
    requests_per_s: float
    memory_per_instance_mb: float


def capacity(result: dict[str, Any], trial: dict[str, Any]) -> Capacity:
    """How many instances of one configuration this machine holds, and the requests/s they serve together.

    An instance uses `threads` cores; its memory is the peak resident memory of a process running it where measured
    (a causal LM's), else its model file plus the peak resident growth measured while it ran. The smaller of the two
    limits wins.
    """
    hardware = result["hardware"]
    target = result["target"]
    latency = trial["latency"]
    throughput = target["batch_size"] * 1000.0 / latency["p50_ms"]
    by_cores = max(1, hardware["cpu"]["physical_cores"] // target["threads"])
    peak_mb = (trial.get("extras") or {}).get("peak_mb")  # a whole generating process, where the family measures it
    memory_mb = peak_mb if peak_mb is not None else trial["size_mb"] + latency.get("peak_rss_delta_bytes", 0) / 2**20
    by_memory = int(hardware["memory"]["available_bytes"] / 2**20 // max(memory_mb, 1e-6))
    instances = max(1, min(by_cores, by_memory))
    return Capacity(trial, throughput, instances, "cores" if by_cores <= by_memory else "memory",
                    instances * throughput, memory_mb)


def pareto_trials(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The Pareto front's trials by latency, each candidate once (a sampler may propose one candidate in several
    trials; they share one measurement, so the first trial stands for all)."""
    by_number = {t["number"]: t for t in result["trials"]}
    first: dict[str, dict[str, Any]] = {}
    for number in sorted(result["pareto"]):
        first.setdefault(Candidate.from_dict(by_number[number]["candidate"]).key, by_number[number])
    return sorted(first.values(), key=lambda t: t["latency_ms"])


def cost_breakdown(result: dict[str, Any]) -> dict[str, float]:
    """Seconds spent per stage over all trials, then refining the finalists (their training and evaluation)."""
    totals = {"gate": 0.0, "train": 0.0, "evaluate": 0.0, "refine": 0.0}
    for trial in result["trials"]:
        for stage, seconds in (trial.get("seconds") or {}).items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    totals["refine"] = sum(sum(r["seconds"].values()) for r in result.get("refined", []))
    return totals


def stage_counts(result: dict[str, Any]) -> dict[str, int]:
    """Trials per outcome (a completed trial's stage, else its state such as fail), for the report's cost summary."""
    counts: dict[str, int] = {}
    for trial in result["trials"]:
        stage = trial["stage"] if trial["state"] == "COMPLETE" else trial["state"].lower()
        counts[stage] = counts.get(stage, 0) + 1
    return counts


def speedup(result: dict[str, Any], trial: dict[str, Any]) -> float:
    """A trial's speedup over the teacher at the target percentile, both latencies measured in this run."""
    return teacher_needs_ms(result) / trial["latency_ms"]
