"""Report sections for `autotune plan`: predicted latency of the run's configurations on other machines.

Rendered from the `plans` entries `autotune plan` adds to result.json, so `autotune report` reproduces them.
Each machine gets its own section whose title, headers and text say "predicted": these figures come from the
latency model calibrated on this run's measurements, never from a measurement on that machine, and they are
never put in the same table as measured figures.
"""

from __future__ import annotations

from typing import Any

from autotune.report import summary
from autotune.report.sections import Section, Table

VERDICTS = {
    "meets": "meets (whole interval under target)",
    "likely": "likely (interval crosses target)",
    "misses": "misses",
    "unknown": "not predicted (bit width not modelled)",
}


def threads_text(threads: int) -> str:
    """The thread count in words ("1 thread", "4 threads"): it is part of what a predicted latency means, so every
    title and line states it."""
    return f"{threads} thread" + ("s" if threads != 1 else "")


def _interval(prediction: dict[str, Any]) -> str:
    return f"{prediction['low_ms']:.2f}-{prediction['high_ms']:.2f}"


def _row(config: dict[str, Any], others: tuple[str, ...]) -> tuple[str, ...]:
    p = config["prediction"]
    accuracy = "-" if config["accuracy"] is None else f"{config['accuracy']:.4f}"
    extra = tuple(f"{o['latency_ms']:.2f} ({_interval(o)})" if (o := (config.get("others") or {}).get(name)) else "-"
                  for name in others)
    if p is None:
        return (str(config["trial"]), summary.describe(config["candidate"]), accuracy, "-", "-", "-", *extra, "-",
                VERDICTS["unknown"])
    return (str(config["trial"]), summary.describe(config["candidate"]), accuracy, f"{p['p50_ms']:.2f}", f"{p['latency_ms']:.2f}",
            _interval(p), *extra, f"{config['headroom']:+.0%}", VERDICTS[config["verdict"]])


def machine_section(entry: dict[str, Any], metric: str, latency: str = "latency") -> Section:
    """One machine's section: its predicted answer, what the prediction rests on, and a table whose every header says
    predicted, so no reader takes it for a measurement."""
    pct = f"p{entry['percentile']:g}"
    recommended = next((c for c in entry["configs"] if c["trial"] == entry["recommended_trial"]), None)
    if recommended is None:
        answer = f"Predicted: no configuration of this run meets {pct} <= {entry['target_ms']:.2f} ms there."
    else:
        p = recommended["prediction"]
        answer = (f"Predicted recommendation: trial {recommended['trial']}, {summary.describe(recommended['candidate'])}, "
                  f"predicted {pct} {p['latency_ms']:.2f} ms ({p['level']:.0%} interval {_interval(p)} ms) vs target "
                  f"{entry['target_ms']:.2f} ms ({recommended['headroom']:.0%} predicted headroom)"
                  + ("; measure it there before relying on it." if recommended["verdict"] == "likely" else "."))
    basis = (f"Predicted, not measured: the latency model calibrated on {entry['calibration_points']} latencies measured "
             f"in this run, applied to the profile {entry['source']} (fingerprint {entry['fingerprint']}, "
             f"{entry['machine']}, {threads_text(entry['threads'])})"
             + ("; this is the run's own machine." if entry["same_machine"] else
                "; the interval includes an assumed +-25% for transferring the calibration to another machine."))
    others = tuple(sorted({name for c in entry["configs"] for name in c.get("others") or {}}))
    label = "" if latency == "latency" else f"{latency} "
    headers = ("trial", "configuration", f"val. {metric} (measured in this run)", f"predicted {label}p50 ms",
               f"predicted {label}{pct} ms", f"predicted {label}{pct} interval ms",
               *(f"predicted {name.removesuffix('_ms').replace('ttft', 'TTFT')} {pct} ms (interval)" for name in others),
               "predicted headroom", "verdict (predicted)")
    return Section(f"Predicted (not measured) on {entry['machine']}, {threads_text(entry['threads'])} [{entry['fingerprint']}]",
                   (answer, basis), Table(headers, tuple(_row(c, others) for c in entry["configs"])))


def predicted_sections(result: dict[str, Any]) -> list[Section]:
    """A section per `autotune plan` entry in the result (none before a plan), placed after the measured sections."""
    return [machine_section(entry, summary.metric_name(result), summary.latency_label(result))
            for entry in result.get("plans") or []]
