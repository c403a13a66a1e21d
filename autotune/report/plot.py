"""The accuracy-vs-latency picture: every evaluated trial, the Pareto front, the target line, and the
gate-rejected trials (no accuracy: drawn on the floor of the plot at their measured latency)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402

from autotune.records import Stage  # noqa: E402
from autotune.report.summary import evaluated, metric_name, pareto_trials, percentile_name  # noqa: E402


def accuracy_latency_png(result: dict[str, Any]) -> bytes:
    """The plot as PNG bytes, so the Markdown report can write it beside itself and the HTML report can inline it; gate
    rejections sit on the floor because they have a latency but no accuracy."""
    target_ms = result["target"]["latency_ms"]
    pct = percentile_name(result)
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    points = evaluated(result)
    feasible = [t for t in points if t["latency_ms"] <= target_ms]
    over = [t for t in points if t["latency_ms"] > target_ms]
    gated = [t for t in result["trials"] if t["stage"] == Stage.GATE]
    accuracies = [t["accuracy"] for t in points] + [result["baseline"]["accuracy"]["validation"]]
    floor = min(accuracies) - 0.02 if accuracies else 0.0
    ax.scatter([t["latency_ms"] for t in feasible], [t["accuracy"] for t in feasible], c="#1f77b4", label="evaluated, meets target")
    ax.scatter([t["latency_ms"] for t in over], [t["accuracy"] for t in over], c="#ff7f0e", label="evaluated, over target")
    ax.scatter([t["latency_ms"] for t in gated], [floor] * len(gated), marker="x", c="#7f7f7f",
               label="rejected by latency gate (not trained)")
    front = pareto_trials(result)
    if front:
        ax.plot([t["latency_ms"] for t in front], [t["accuracy"] for t in front], "-o", c="#2ca02c", mfc="none",
                ms=10, label="Pareto front")
    base = result["baseline"]
    ax.scatter([base["latency_ms"][pct]], [base["accuracy"]["validation"]], marker="*", s=180, c="#d62728",
               label="teacher (fused fp32)")
    rec = result["recommended"]
    if rec is not None:
        ax.scatter([rec["latency_ms"]], [rec["accuracy"]["validation"]], marker="D", s=90, facecolors="none",
                   edgecolors="black", linewidths=2, label="recommended")
    ax.axvline(target_ms, ls="--", c="#d62728", lw=1)
    ax.text(target_ms, ax.get_ylim()[1], f" target {target_ms:.2f} ms", va="top", color="#d62728", fontsize=8)
    ax.set_xlabel(f"{pct} latency (ms), batch {result['target']['batch_size']}, seq {result['target']['seq_len']}, "
                  f"{result['target']['threads']} threads")
    ax.set_ylabel(f"validation {metric_name(result)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
