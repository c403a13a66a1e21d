"""The deployment planning report from result.json alone: figures derived from the result (summary.py), the
plot (plot.py), `autotune plan`'s predicted sections (predicted.py), and HTML and Markdown (render.py)."""

from autotune.report.render import build_report, write_report

__all__ = ["build_report", "write_report"]
