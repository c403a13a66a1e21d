"""After the search: refine the finalists, re-measure, and choose the recommendation.

On a shared machine one measurement decides nothing near the target, and a search ranks students after a
short training. So the most accurate feasible students (finalists) are distilled longer (multi-fidelity), and
the recommendation is the most accurate evaluated or refined candidate whose latency, re-measured now, meets
the target; every more accurate candidate passed over is said, with its re-measured latency.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from statistics import median
from typing import Callable

from autotune.progress import SilentProgress
from autotune.records import Stage, TrialRecord
from autotune.report.summary import closest_measured
from autotune.runtime import load_artifact
from autotune.trial import REMEASURE_ROUNDS, TrialPipeline, noise_margin
from profilers.latency import LatencyStats
from search_spaces import Candidate

log = logging.getLogger(__name__)

#: A candidate measured this far over the target in the search is not re-measured for the recommendation.
REMEASURE_BEYOND = 0.25


def with_accuracy(records: list[TrialRecord], stages: tuple[Stage, ...]) -> list[TrialRecord]:
    """Records of these stages that measured an accuracy, most accurate first (ties: the faster first)."""
    return sorted((r for r in records if r.stage in stages and r.accuracy is not None),
                  key=lambda r: (-r.accuracy, r.latency_ms))


def finalists(pipeline: TrialPipeline, records: list[TrialRecord], count: int) -> list[TrialRecord]:
    """The `count` most accurate evaluated trials that meet the target, or sit within its noise, one per
    trained student (a refined student serves every bit width, so two of one student would train it twice)."""
    target_ms = pipeline.ctx.target.latency_ms
    chosen: dict[str, TrialRecord] = {}
    for record in with_accuracy(records, (Stage.EVALUATED,)):
        candidate = Candidate.from_dict(record.candidate)
        if pipeline.ctx.task.is_teacher(candidate) or candidate.student_key in chosen:
            continue
        if record.latency_ms <= target_ms * (1 + noise_margin(LatencyStats(**record.latency))):
            chosen[candidate.student_key] = record
        if len(chosen) == count:
            break
    return list(chosen.values())


def refine_finalists(pipeline: TrialPipeline, records: list[TrialRecord], progress: SilentProgress) -> list[TrialRecord]:
    """Each finalist's student distilled `training.refine_epochs` more epochs, deployed and evaluated again.

    A refined record keeps its source trial's number and says how many epochs it was trained in all.
    """
    training = pipeline.ctx.training
    if training.refine_epochs == 0:
        return []
    refined = []
    for source in finalists(pipeline, records, training.finalists):
        candidate = Candidate.from_dict(source.candidate)
        epochs = training.epochs + training.refine_epochs
        progress.note(f"refining trial {source.number} ({candidate.describe()}): {training.refine_epochs} more "
                      f"epoch(s), {epochs} in all")
        start = time.perf_counter()
        model, hit = pipeline.refine(candidate, training.refine_epochs,
                                     functools.partial(progress.training, f"refining trial {source.number}"))
        outcome = pipeline.evaluate(candidate, model, Stage.REFINED, {"train": time.perf_counter() - start},
                                    artifact_name=f"{candidate.key}-epochs{epochs}", student_cache_hit=hit)
        refined.append(TrialRecord.of(source.number, outcome, epochs=epochs, hardware_fingerprint=pipeline.ctx.fingerprint))
        progress.note(f"trial {source.number} refined: {pipeline.ctx.task.objective_name} {source.accuracy:.4f} -> "
                      f"{outcome.accuracy:.4f} (validation)")
    return refined


def confirmed_latency(pipeline: TrialPipeline, record: TrialRecord) -> float:
    """Latency at the target percentile, re-measured; rounds are added while it sits within the noise."""
    artifact = load_artifact(record.artifact)
    target = pipeline.ctx.target
    samples = [pipeline.measure(artifact)]
    while len(samples) < REMEASURE_ROUNDS:
        values = sorted(s.percentile_ms(target.percentile) for s in samples)
        if abs(median(values) - target.latency_ms) > noise_margin(samples[-1]) * target.latency_ms:
            break
        samples.append(pipeline.measure(artifact))
    return float(median(s.percentile_ms(target.percentile) for s in samples))


def choose_recommendation(pipeline: TrialPipeline, records: list[TrialRecord],
                          note: Callable[[str], None] = log.info) -> tuple[TrialRecord | None, str | None]:
    """(recommended record with its re-measured latency, or None with the reason): the most accurate evaluated or
    refined candidate whose re-measured latency meets the target; `note` hears why a more accurate one was passed
    over (a user who saw it trained should see why it was not chosen)."""
    target_ms = pipeline.ctx.target.latency_ms
    seen: set[str] = set()
    for record in with_accuracy(records, (Stage.EVALUATED, Stage.REFINED)):
        if record.artifact in seen or record.latency_ms > target_ms * (1 + REMEASURE_BEYOND):
            continue  # a candidate evaluated in two trials is one artifact
        if not Path(record.artifact).exists():  # written by a worker on another machine: cannot re-measure here
            log.info("trial %d's artifact %s is not on this machine", record.number, record.artifact)
            continue
        seen.add(record.artifact)
        latency = confirmed_latency(pipeline, record)
        if latency <= target_ms:
            return record.with_latency(latency), None
        note(f"trial {record.number} ({record.stage}, {pipeline.ctx.task.objective_name} {record.accuracy:.4f}) "
             f"re-measured at {latency:.2f} ms, over the {target_ms:.2f} ms target: not recommended")
    misses = closest_measured([r.to_dict() for r in records])
    if not misses:
        return None, "no trial finished"
    closest = ", ".join(f"trial {r['number']} at {r['latency_ms']:.2f} ms (+{r['latency_ms'] / target_ms - 1:.0%})" for r in misses)
    return None, f"no candidate met the {target_ms:.2f} ms target; closest: {closest}"
