"""TuneResult: what a run found, as one JSON document (`result.json`) that reports are rendered from alone.

Schema (version 1): name, target (resolved latency_ms and how it is measured), hardware (profile with its
fingerprint), space (knobs searched and values removed for this machine), baseline (the uncompressed model
exported the same way: accuracy {validation, test}, latency_ms {p50, p90, p95, p99, ...}, size_mb), trials
[{number, state, candidate, stage, feasible, accuracy, latency_ms, size_mb, seconds, error, ...}], pareto
[trial numbers], recommended {number, candidate, accuracy {validation, test}, latency_ms, size_mb, speedup,
artifact} or null with `reason`, plus the study's storage (password redacted) and cache counters.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_SCHEMA_VERSION = 1
RESULT_FILE = "result.json"


class ResultError(ValueError):
    """A result.json that cannot be read: missing, corrupt or of another schema version."""


@dataclass(frozen=True)
class TuneResult:
    data: dict[str, Any]

    @property
    def trials(self) -> list[dict[str, Any]]:
        return self.data["trials"]

    @property
    def pareto(self) -> list[dict[str, Any]]:
        """The Pareto-optimal feasible trials (accuracy up, latency down), as trial records."""
        by_number = {t["number"]: t for t in self.trials}
        return [by_number[n] for n in self.data["pareto"]]

    @property
    def recommended(self) -> dict[str, Any] | None:
        return self.data["recommended"]

    @property
    def reason(self) -> str | None:
        return self.data.get("reason")

    @property
    def run_dir(self) -> Path:
        return Path(self.data["run_dir"])

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, allow_nan=False, default=str)

    def save(self, run_dir: str | os.PathLike[str]) -> Path:
        path = Path(run_dir) / RESULT_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json() + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def load_result(path: str | os.PathLike[str]) -> TuneResult:
    """Read result.json (or a run directory holding it); every problem is one ResultError sentence."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultError(f"{path} does not exist; run `autotune tune` first.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultError(f"{path} cannot be read as a tune result ({exc}).") from None
    if not isinstance(data, dict) or data.get("schema_version") != RESULT_SCHEMA_VERSION:
        version = data.get("schema_version") if isinstance(data, dict) else None
        raise ResultError(f"{path} has schema_version {version!r}; this autotune reads {RESULT_SCHEMA_VERSION}.")
    return TuneResult(data)
