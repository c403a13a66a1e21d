"""HardwareProfile: what this machine is and how fast it runs, as one frozen, JSON-round-trippable value.

A latency only means something on the hardware it was measured on, so every measurement autotune stores is
tagged with the profile's `fingerprint`: a hash of what determines speed (CPU model, cores, ISA flags, caches,
NUMA, GPU models, runtime versions and the thread count used). Volatile facts (free memory, current clock,
GPU uuid, measured throughput) are recorded but left out of the hash, so the same machine gives the same
fingerprint run after run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from profilers.cpu import CpuInfo, probe_cpu
from profilers.gpu import GpuInfo, probe_gpus
from profilers.memory import MemoryInfo, probe_memory
from profilers.microbench import MicrobenchSizes, Microbench, merge_rounds, run_cpu_microbench, run_gpu_microbench
from profilers.recipes import Recipe, recipe_for
from profilers.software import SoftwareInfo, probe_software

SCHEMA_VERSION = 1


class ProfileError(ValueError):
    """A hardware profile file that cannot be used: unreadable, corrupt, or of another schema version."""


@dataclass(frozen=True)
class HardwareProfile:
    """Everything autotune knows about one machine, frozen and JSON-round-trippable, so it can be written once with
    `autotune profile -o` and reused, and so every stored latency can be tagged with the machine it belongs to."""

    schema_version: int
    created_at: str
    threads: int
    cpu: CpuInfo
    memory: MemoryInfo
    gpus: tuple[GpuInfo, ...]
    gpu_unavailable_reason: str | None
    software: SoftwareInfo
    microbench: Microbench | None

    @property
    def recipe(self) -> Recipe:
        """How int8 and int4 are built on this CPU (profilers/recipes.py), derived from its ISA flags."""
        return recipe_for(self.cpu.flags, openvino=self.software.has_openvino)

    @property
    def fingerprint(self) -> str:
        """Short hash of the speed-determining facts (see `fingerprint_fields`), recomputed rather than stored so
        it can never disagree with the profile's contents."""
        return fingerprint_of(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain data with the fingerprint added, so a reader of the file sees the key its measurements are filed
        under and `from_dict` can detect an edited or corrupted file."""
        return {**asdict(self), "fingerprint": self.fingerprint}

    def to_json(self, indent: int | None = 2) -> str:
        """The profile as JSON text (indented by default, since people read and diff profile files)."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, source: str = "hardware profile") -> "HardwareProfile":
        """Validate and rebuild a profile; any problem is one ProfileError sentence naming `source`."""
        if not isinstance(data, dict):
            raise ProfileError(f"{source} is not a JSON object.")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ProfileError(
                f"{source} has schema_version {version!r}, but this autotune reads schema_version {SCHEMA_VERSION}; "
                "re-run `autotune profile` on that machine."
            )
        stored_fingerprint = data.get("fingerprint")
        fields = {k: v for k, v in data.items() if k != "fingerprint"}
        try:
            profile = _ADAPTER.validate_python(fields, strict=False)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise ProfileError(f"{source} is not a valid hardware profile: field {where}: {first['msg']}.") from None
        if stored_fingerprint is not None and stored_fingerprint != profile.fingerprint:
            raise ProfileError(f"{source} was edited or corrupted: its fingerprint does not match its contents.")
        return profile

    @classmethod
    def from_json(cls, text: str, source: str = "hardware profile") -> "HardwareProfile":
        """Parse and validate JSON text; malformed JSON becomes a ProfileError naming the line, like every other
        problem with a profile file, so the CLI has one error to report."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{source} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}).") from None
        return cls.from_dict(data, source)


_ADAPTER = TypeAdapter(HardwareProfile)


def fingerprint_fields(profile: HardwareProfile) -> dict[str, Any]:
    """The facts that determine inference speed; everything hashed into the fingerprint and nothing else."""
    cpu = profile.cpu
    return {
        "cpu": [cpu.vendor, cpu.model_name, cpu.architecture, cpu.physical_cores, cpu.logical_cores,
                list(cpu.flags), cpu.l1d_bytes, cpu.l2_bytes, cpu.l3_bytes, cpu.numa_nodes],
        "gpus": [[g.name, g.compute_capability, g.memory_total_bytes, g.sm_count] for g in profile.gpus],
        # OpenVINO only where present, so the fingerprints of profiles without it stay what they were.
        "software": [profile.software.torch, profile.software.onnxruntime, list(profile.software.onnxruntime_providers)]
        + ([profile.software.openvino] if profile.software.openvino else []),
        "threads": profile.threads,
    }


def fingerprint_of(profile: HardwareProfile) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of `fingerprint_fields`: canonical (sorted keys, no spaces)
    so the same facts hash the same on every machine and Python version."""
    canonical = json.dumps(fingerprint_fields(profile), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def default_threads(cpu: CpuInfo) -> int:
    """All physical cores: SMT siblings share the FPUs that GEMMs saturate, so they rarely help inference."""
    return max(1, cpu.physical_cores)


def collect_profile(threads: int | None = None, *, quick: bool = False, microbench: bool = True,
                    rounds: int = 1, interval_s: float = 0.0) -> HardwareProfile:
    """Probe this machine; with `microbench`, also measure its throughput at `threads` (default: physical cores).

    quick: smaller problems and ~1 s per figure (the whole profile in seconds) instead of ~6 s per figure.
    rounds, interval_s: CPU microbenchmark rounds, `interval_s` seconds apart, each figure the geometric mean of
    the rounds (see `with_throughput`).
    """
    cpu = probe_cpu()
    threads = default_threads(cpu) if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if interval_s < 0:
        raise ValueError(f"interval_s must be >= 0, got {interval_s}")
    gpus, reason = probe_gpus()
    probed = HardwareProfile(
        schema_version=SCHEMA_VERSION,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        threads=threads,
        cpu=cpu,
        memory=probe_memory(),
        gpus=gpus,
        gpu_unavailable_reason=reason,
        software=probe_software(),
        microbench=None,
    )
    return with_throughput(probed, quick=quick, rounds=rounds, interval_s=interval_s) if microbench else probed


def with_throughput(profile: HardwareProfile, *, quick: bool = False, rounds: int = 1,
                    interval_s: float = 0.0) -> HardwareProfile:
    """`profile` with its throughput measured (CPU at its threads, and its GPUs): what `collect_profile` adds to
    the probed facts, so a caller that needed the fingerprint early does not probe the machine twice.

    On a shared host a neighbour's load swings the CPU figures from one minute to the next, so one round describes
    one minute rather than the machine. `rounds` > 1 repeats the CPU microbenchmarks, waiting `interval_s` seconds
    between rounds, and merges each figure's rounds (`merge_rounds`), so a profile spans more of those swings and
    predicts latencies timed over minutes better than a single round does (bench/predictor.py measures this).
    GPUs are measured once.
    """
    sizes = MicrobenchSizes.for_mode(quick)
    cpu = []
    for index in range(rounds):
        if index and interval_s:
            time.sleep(interval_s)
        cpu.append(run_cpu_microbench(profile.threads, sizes, profile.recipe))
    return replace(profile, microbench=merge_rounds(cpu),
                   gpus=run_gpu_microbench(profile.gpus, sizes))


#: A profile file (or a folder of them) that runs reuse instead of measuring this machine again.
PROFILE_ENV = "AUTOTUNE_PROFILE"


def profile_for(source: str | os.PathLike[str], probed: HardwareProfile) -> HardwareProfile:
    """The measured profile in `source` (a file of `autotune profile -o`, or a folder of such files) that describes
    the machine `probed` describes, at its thread count: measuring a machine once serves many runs, and a profile of
    another machine or thread count, whose figures would mislead every prediction, is refused in one sentence."""
    source = Path(source)
    files = sorted(source.glob("*.json")) if source.is_dir() else [source]
    profiles = [load_profile(path) for path in files]
    measured = [p for p in profiles if p.fingerprint == probed.fingerprint and p.microbench is not None]
    if measured:
        return measured[0]
    found = ", ".join(f"{p.fingerprint} at {p.threads} threads{'' if p.microbench else ' (not measured)'}"
                      for p in profiles) or "no profile file"
    raise ProfileError(f"{source} holds no measured profile of this machine at {probed.threads} threads (fingerprint "
                       f"{probed.fingerprint}; found: {found}): write one with `autotune profile --threads "
                       f"{probed.threads} -o FILE`, or leave the profile out to measure this machine now.")


def load_profile(path: str | os.PathLike[str]) -> HardwareProfile:
    """Read a profile written by `autotune profile -o`; every failure is one ProfileError sentence."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"hardware profile {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"hardware profile {path} cannot be read ({exc}).") from None
    return HardwareProfile.from_json(text, source=f"hardware profile {path}")

