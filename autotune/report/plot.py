"""The quality-vs-latency picture (accuracy, or a causal LM's perplexity against its decode latency): every
evaluated trial, the Pareto front, the target line, and the gate-rejected trials (no quality: drawn on the floor of
the plot at their measured latency)."""

from __future__ import annotations

import io
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402

from autotune.records import Stage  # noqa: E402
from autotune.report.summary import (  # noqa: E402
    evaluated, is_causal_lm, latency_label, metric_name, pareto_trials, percentile_name, split_perplexity, trial_perplexity,
)


def quality_axis(result: dict[str, Any]) -> tuple[str, Callable[[dict[str, Any]], float | None], float | None, bool]:
    """(label, a trial's value, the teacher's value, lower is better) of the plot's vertical axis: a causal LM's
    validation perplexity, else the objective (accuracy or the user's metric)."""
    base = result["baseline"]
    if is_causal_lm(result):
        return "validation perplexity (lower is better)", trial_perplexity, split_perplexity(base, "validation"), True
    return f"validation {metric_name(result)}", lambda t: t["accuracy"], base["accuracy"]["validation"], False


def accuracy_latency_png(result: dict[str, Any]) -> bytes:
    """The plot as PNG bytes, so the Markdown report can write it beside itself and the HTML report can inline it; gate
    rejections sit on the floor (the worst end of the quality axis) because they have a latency but no quality."""
    target_ms = result["target"]["latency_ms"]
    pct = percentile_name(result)
    label, quality, teacher, lower_is_better = quality_axis(result)
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    points = [t for t in evaluated(result) if quality(t) is not None]
    feasible = [t for t in points if t["latency_ms"] <= target_ms]
    over = [t for t in points if t["latency_ms"] > target_ms]
    gated = [t for t in result["trials"] if t["stage"] == Stage.GATE]
    values = [quality(t) for t in points] + ([teacher] if teacher is not None else [])
    spread = 0.02 * max(1.0, max(values, default=1.0) - min(values, default=0.0)) if values else 0.02
    floor = (max(values) + spread if lower_is_better else min(values) - spread) if values else 0.0
    ax.scatter([t["latency_ms"] for t in feasible], [quality(t) for t in feasible], c="#1f77b4", label="evaluated, meets target")
    ax.scatter([t["latency_ms"] for t in over], [quality(t) for t in over], c="#ff7f0e", label="evaluated, over target")
    ax.scatter([t["latency_ms"] for t in gated], [floor] * len(gated), marker="x", c="#7f7f7f",
               label="rejected by latency gate (not trained)")
    front = [t for t in pareto_trials(result) if quality(t) is not None]
    if front:
        ax.plot([t["latency_ms"] for t in front], [quality(t) for t in front], "-o", c="#2ca02c", mfc="none",
                ms=10, label="Pareto front")
    if teacher is not None:
        ax.scatter([result["baseline"]["latency_ms"][pct]], [teacher], marker="*", s=180, c="#d62728",
                   label="teacher (fp32)")
    rec = result["recommended"]
    if rec is not None:
        mine = split_perplexity(rec, "validation") if lower_is_better else rec["accuracy"]["validation"]
        ax.scatter([rec["latency_ms"]], [mine], marker="D", s=90, facecolors="none", edgecolors="black", linewidths=2,
                   label="recommended")
    if lower_is_better:
        ax.invert_yaxis()  # better is up, as on an accuracy plot
    ax.axvline(target_ms, ls="--", c="#d62728", lw=1)
    ax.text(target_ms, ax.get_ylim()[1], f" target {target_ms:.2f} ms", va="top", color="#d62728", fontsize=8)
    ax.set_xlabel(x_label(result))
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def x_label(result: dict[str, Any]) -> str:
    """The latency axis in words: which latency, at which percentile and shape."""
    t, pct = result["target"], percentile_name(result)
    if is_causal_lm(result):
        return (f"{pct} {latency_label(result)} (ms{'/token' if t.get('measure') == 'decode' else ''}), context "
                f"{t['seq_len']}, prompt {t.get('prompt_len')}, {t['threads']} threads")
    return f"{pct} latency (ms), batch {t['batch_size']}, seq {t['seq_len']}, {t['threads']} threads"
