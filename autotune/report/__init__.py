"""The deployment planning report: planning logic (plan.py), the plot (plot.py), HTML and Markdown (render.py)."""

from autotune.report.render import build_report, write_report

__all__ = ["build_report", "write_report"]
