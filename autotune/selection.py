"""After the search: refine the finalists, re-measure, and choose the recommendation.

On a shared machine latencies move by tens of percent between minutes, and a search ranks students after a
short training. So the most accurate feasible students that still meet the target beside the baseline
(finalists) are distilled longer (multi-fidelity); then
the most accurate candidates are re-measured together with the baseline, alternating in one clean child process,
so that two versions of one shape are judged side by side. A candidate that meets the target there, at least within
noise, is confirmed alone with the baseline (three pairwise measurements, whose median ratio is the speedup and
whose spread is its noise), and recommended when the upper confidence bound of its latency percentile is under
the target less a safety margin; failing that, one that meets the target only within noise is recommended and
said to be so. A relative target is
judged at the host's pace in the same minutes (`Target.latency_ms_beside`): a host that slows by a third between
the search and the selection would otherwise put every candidate over a speedup it still delivers.
Every more accurate candidate passed over is kept in the result with why.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median
from typing import Any, Callable

from autotune.progress import SilentProgress
from autotune.records import Stage, TrialRecord, closest_measured, with_final_latencies
from autotune.runtime import Artifact, load_artifact
from autotune.trial import REMEASURE_ROUNDS, Target, TrialPipeline, noise_margin
from profilers.latency import LatencyStats
from search_spaces import Candidate

log = logging.getLogger(__name__)

#: A candidate measured this far over the target in the search is not re-measured for the recommendation.
REMEASURE_BEYOND = 0.25


def with_accuracy(records: list[TrialRecord], stages: tuple[Stage, ...]) -> list[TrialRecord]:
    """Records of these stages that measured an accuracy, most accurate first (ties: the faster first)."""
    return sorted((r for r in records if r.stage in stages and r.accuracy is not None),
                  key=lambda r: (-r.accuracy, r.latency_ms))


def searched_finalists(pipeline: TrialPipeline, records: list[TrialRecord]) -> list[TrialRecord]:
    """The evaluated students (not the teacher) that met the target in the search, or sat within its noise, whose
    artifacts are on this machine (not a worker's elsewhere), most accurate first."""
    target_ms = pipeline.ctx.target.latency_ms
    return [record for record in with_accuracy(records, (Stage.EVALUATED,))
            if not pipeline.ctx.task.is_teacher(Candidate.from_dict(record.candidate))
            and record.latency_ms <= target_ms * (1 + noise_margin(LatencyStats(**record.latency)))
            and Path(record.artifact).exists()]


def finalists(pipeline: TrialPipeline, baseline: Artifact, records: list[TrialRecord], count: int,
              margin: float) -> list[TrialRecord]:
    """The `count` most accurate students of `searched_finalists` that still meet the target, or sit within its noise,
    re-measured beside the baseline (`judge`, as the recommendation is; one within noise there is confirmed alone
    first, as the recommendation is, and left out if it is over), one per trained student (a refined student serves
    every bit width, so two of one student would train it twice).

    Re-measuring first keeps refinement, the selection's costliest step, off a student the selection would pass
    over: a host's pace moves between the search and the selection, and a student measured at the target's edge
    alone can measure over it beside the teacher. They are measured `count` at a time, most accurate first, until
    enough pass.
    """
    target = pipeline.ctx.target
    ranked, chosen = searched_finalists(pipeline, records), {}
    for start in range(0, len(ranked), count):
        batch = [replace(r, artifact=pipeline.recorded_artifact(r)) for r in ranked[start:start + count]  # verified
                 if Candidate.from_dict(r.candidate).student_key not in chosen]
        if not batch:
            continue
        baseline_timed, *timed = pipeline.measure_together([baseline, *(load_artifact(r.artifact) for r in batch)])
        for record, measured in zip(batch, timed):
            verdict, why = judge(target.latency(measured), target, target.latency(baseline_timed), margin)
            if verdict == "within noise":
                confirmation = confirm(pipeline, baseline, record)
                verdict, why = judge(confirmation.measured, target, confirmation.baseline, margin)
            if verdict == "over":
                log.info("trial %d is not refined: %s", record.number, why)
                continue
            chosen.setdefault(Candidate.from_dict(record.candidate).student_key, record)
            if len(chosen) == count:
                return list(chosen.values())
    return list(chosen.values())


def refine_finalists(pipeline: TrialPipeline, baseline: Artifact, records: list[TrialRecord], margin: float,
                     progress: SilentProgress) -> list[TrialRecord]:
    """Each finalist's student distilled again from the start for `training.refine_epochs` more epochs than the
    search's, deployed and evaluated again.

    A refined record keeps its source trial's number and says how many epochs it was trained in all.
    """
    training = pipeline.ctx.training
    if training.refine_epochs == 0:
        return []
    refined = []
    for source in finalists(pipeline, baseline, records, training.finalists, margin):
        candidate = Candidate.from_dict(source.candidate)
        epochs = training.epochs + training.refine_epochs
        progress.note(f"refining trial {source.number} ({candidate.describe()}): distilled again from the start, "
                      f"{epochs} epochs")
        start = time.perf_counter()
        model, hit = pipeline.refine(candidate, training.refine_epochs,
                                     functools.partial(progress.training, f"refining trial {source.number}"))
        outcome = pipeline.deploy_and_measure(candidate, model, Stage.REFINED, {"train": time.perf_counter() - start},
                                              artifact_name=f"{candidate.key}-epochs{epochs}", student_cache_hit=hit)
        refined.append(TrialRecord.of(source.number, outcome, epochs=epochs, hardware_fingerprint=pipeline.ctx.fingerprint))
        progress.note(f"trial {source.number} refined: {pipeline.ctx.task.objective_name} {source.accuracy:.4f} -> "
                      f"{outcome.accuracy:.4f} (validation)")
    return refined


#: Candidates measured together with the baseline in one interleaved child process (the most accurate first).
FINAL_BATCH = 6


@dataclass(frozen=True)
class Confirmation:
    """The candidate and the baseline measured alone together, alternating in one child process, REMEASURE_ROUNDS
    times: the repeat with the median candidate percentile, and every repeat's speedup (their spread is the noise
    of the ratio from one minute to the next).

    The speedup is the ratio of median latencies: a tail percentile of the slower model catches more of a shared
    host's bursts (a 10 ms run overlaps more of them than a 2 ms one), so its ratio moves by tens of percent
    between minutes where the medians' ratio holds within a few. The ratio at the target percentile is kept too.
    """

    baseline: LatencyStats
    measured: LatencyStats
    speedups: tuple[float, ...]  # p50 ratios, one per repeat
    tail_speedups: tuple[float, ...]  # ratios at the target percentile
    figures: dict[str, float]  # the candidate's every figure in the median repeat (a causal LM's TTFT, peak memory)
    target_ms: float  # the target at the pace of the median repeat's baseline (`Target.latency_ms_beside`)


@dataclass(frozen=True)
class Choice:
    """What the selection decided, and the evidence: the recommendation (with its latency as re-measured beside
    the baseline) or None with the reason, every more accurate candidate passed over and why, and the
    confirmation the speedup comes from."""

    recommended: TrialRecord | None
    verdict: str | None  # "meets" (upper bound under target x (1 - margin)) or "meets within noise"
    reason: str | None
    passed_over: tuple[dict[str, Any], ...]
    confirmation: Confirmation | None
    margin: float
    percentile: float
    #: Whether the recommendation was confirmed a second time, right after its searched twin (same shape and bits, so
    #: the same latency) met the target, its first confirmation having met it only within noise.
    reconfirmed: bool = False

    @property
    def target_ms(self) -> float | None:
        """The target the recommendation was judged against, in the minutes of its confirmation."""
        return None if self.confirmation is None else self.confirmation.target_ms

    @property
    def speedup(self) -> float | None:
        """Baseline / recommended median latency: the median over the confirmation's repeats."""
        return None if self.confirmation is None else float(median(self.confirmation.speedups))

    @property
    def speedup_interval(self) -> tuple[float, float] | None:
        """The lowest and highest speedup of the confirmation's repeats: how far the ratio moved between minutes."""
        return None if self.confirmation is None else (min(self.confirmation.speedups), max(self.confirmation.speedups))


def confirm(pipeline: TrialPipeline, baseline: Artifact, record: TrialRecord) -> Confirmation:
    """A candidate chosen in a batch, measured again alone with the baseline (so no third model shares the caches),
    REMEASURE_ROUNDS times."""
    target = pipeline.ctx.target
    percentile = target.percentile
    timed = sorted((pipeline.measure_together([baseline, load_artifact(record.artifact)]) for _ in range(REMEASURE_ROUNDS)),
                   key=lambda pair: target.latency(pair[1]).percentile_ms(percentile))
    pairs = [(target.latency(b), target.latency(m)) for b, m in timed]
    base, mine = pairs[len(pairs) // 2]
    return Confirmation(base, mine, tuple(b.p50_ms / m.p50_ms for b, m in pairs),
                        tuple(b.percentile_ms(percentile) / m.percentile_ms(percentile) for b, m in pairs),
                        timed[len(timed) // 2][1].figures(percentile), target.latency_ms_beside(base))


def passed(record: TrialRecord, reason: str, stats: LatencyStats | None = None, percentile: float = 95.0) -> dict[str, Any]:
    """One passed-over candidate as result.json keeps it: which trial, how accurate, its latency and why."""
    bounds = None if stats is None else stats.bounds_ms(percentile)
    return {"number": record.number, "stage": str(record.stage), "accuracy": record.accuracy, "artifact": record.artifact,
            "latency_ms": record.latency_ms if stats is None else stats.percentile_ms(percentile),
            "latency_upper_ms": None if bounds is None else bounds[1], "reason": reason}


def contenders(pipeline: TrialPipeline, records: list[TrialRecord]) -> tuple[list[TrialRecord], list[dict[str, Any]]]:
    """(candidates to re-measure, most accurate first; those passed over before any re-measurement, with why)."""
    target_ms = pipeline.ctx.target.latency_ms
    chosen, skipped, seen = [], [], set()
    for record in with_accuracy(records, (Stage.EVALUATED, Stage.REFINED)):
        if record.artifact in seen:
            continue  # a candidate evaluated in two trials is one artifact
        seen.add(record.artifact)
        if record.latency_ms > target_ms * (1 + REMEASURE_BEYOND):
            skipped.append(passed(record, f"measured {record.latency_ms:.2f} ms in the search, more than "
                                          f"{REMEASURE_BEYOND:.0%} over the {target_ms:.2f} ms target: not re-measured"))
        elif not Path(record.artifact).exists():  # written by a worker on another machine
            skipped.append(passed(record, f"its artifact {record.artifact} is not on this machine: not re-measured"))
        else:
            chosen.append(replace(record, artifact=pipeline.recorded_artifact(record)))  # verified, else rebuilt
    return chosen, skipped


def judge(stats: LatencyStats, target: Target, baseline: LatencyStats, margin: float) -> tuple[str, str]:
    """(verdict, why) of one candidate re-measured beside `baseline`: "meets" when its latency's upper confidence
    bound is under the target (at the baseline's pace) less the margin, "within noise" when only its point estimate
    is under the target, else "over"."""
    percentile, target_ms = target.percentile, target.latency_ms_beside(baseline)
    latency = stats.percentile_ms(percentile)
    upper = (stats.bounds_ms(percentile) or (latency, latency))[1]
    limit = target_ms * (1 - margin)
    paced = pace_words(target, target_ms)
    if upper <= limit:
        return "meets", f"p{percentile:g} {latency:.2f} ms, upper bound {upper:.2f} ms <= {limit:.2f} ms{paced}"
    if latency <= target_ms:
        return "within noise", (f"meets only within noise: p{percentile:g} {latency:.2f} ms, but its upper bound "
                                f"{upper:.2f} ms is over the target less the {margin:.0%} margin ({limit:.2f} ms){paced}")
    return "over", (f"re-measured at {latency:.2f} ms (upper bound {upper:.2f} ms), over the {target_ms:.2f} ms "
                    f"target{paced}")


def pace_words(target: Target, target_ms: float) -> str:
    """How a relative target moved with the baseline re-measured beside the candidate, in words ("" if it did not)."""
    if target_ms == target.latency_ms:
        return ""
    return (f" (the {target.latency_ms:.2f} ms target at the baseline's pace in these minutes, "
            f"{target_ms / target.latency_ms - 1:+.0%})")


def within_limits(verdict: str, why: str, over: list[str]) -> tuple[str, str]:
    """The verdict on the searched latency, turned "over" when a limit of the target (a causal LM's TTFT, peak
    memory) is exceeded: a recommendation meets every target."""
    if not over or verdict == "over":
        return verdict, why
    return "over", f"{why}, but {'; '.join(over)}"


def latency_identity(record: TrialRecord) -> str | None:
    """What a candidate's latency depends on (its shape and bits, `Candidate.shape_key`): a refined student and its
    searched twin share it. None for a record without a candidate."""
    return None if record.candidate is None else Candidate.from_dict(record.candidate).shape_key


def choose_recommendation(pipeline: TrialPipeline, baseline: Artifact, records: list[TrialRecord], margin: float,
                          note: Callable[[str], None] = log.info) -> Choice:
    """The most accurate evaluated or refined candidate whose latency, re-measured alternating with the baseline's
    in one child process, meets the target at least within noise, and meets it with its upper confidence bound and
    the margin when confirmed alone with the baseline (three pairwise measurements: one batch's interval is wide
    for a model at the target's edge); failing that, the most accurate one whose confirmation meets it within noise,
    said so. `note` hears every candidate passed over and why.

    A refined student and its searched twin share a shape and so a latency, but their confirmations fall in
    different minutes: when the twin's meets the target and the more accurate one's met it only within noise, the
    more accurate one is confirmed again in these minutes, and recommended if that meets it."""
    target = pipeline.ctx.target
    ranked, passed_over = contenders(pipeline, records)
    fallback: tuple[TrialRecord, Confirmation] | None = None
    within_noise: dict[str, TrialRecord] = {}  # by latency identity: the first, most accurate

    def verdict_of(confirmation: Confirmation) -> tuple[str, str]:
        verdict, why = judge(confirmation.measured, target, confirmation.baseline, margin)
        return within_limits(verdict, why, target.limits_over(confirmation.figures))

    for start in range(0, len(ranked), FINAL_BATCH):
        batch = ranked[start:start + FINAL_BATCH]
        baseline_timed, *timed = pipeline.measure_together([baseline, *(load_artifact(r.artifact) for r in batch)])
        for record, measured_timed in zip(batch, timed):
            measured = target.latency(measured_timed)
            verdict, why = judge(measured, target, target.latency(baseline_timed), margin)
            verdict, why = within_limits(verdict, why, target.limits_over(measured_timed.figures(target.percentile)))
            if verdict != "over":
                confirmation = confirm(pipeline, baseline, record)
                verdict, why = verdict_of(confirmation)
                identity = latency_identity(record)
                if verdict == "meets":
                    twin, reconfirmed = within_noise.get(identity) if identity else None, False
                    if twin is not None and verdict_of(again := confirm(pipeline, baseline, twin))[0] == "meets":
                        record, confirmation, reconfirmed = twin, again, True
                    chosen = record.with_latency(confirmation.measured.percentile_ms(target.percentile))
                    return Choice(chosen, verdict, None, more_accurate(passed_over, chosen), confirmation, margin,
                                  target.percentile, reconfirmed)
                measured = confirmation.measured
                if verdict == "within noise":
                    fallback = fallback or (record, confirmation)
                    if identity:
                        within_noise.setdefault(identity, record)
            passed_over.append(passed(record, why, measured, target.percentile))
            outcome = "not recommended yet" if verdict == "within noise" else "not recommended"  # a fallback, or a twin's
            note(f"trial {record.number} ({record.stage}, {pipeline.ctx.task.objective_name} {record.accuracy:.4f}): "
                 f"{why}: {outcome}")
    if fallback is not None:
        record, confirmation = fallback
        chosen = record.with_latency(confirmation.measured.percentile_ms(target.percentile))
        return Choice(chosen, "meets within noise", None, more_accurate(passed_over, chosen), confirmation, margin,
                      target.percentile)
    return Choice(None, None, no_recommendation_reason(records, passed_over, target.latency_ms), tuple(passed_over),
                  None, margin, target.percentile)


def more_accurate(passed_over: list[dict[str, Any]], chosen: TrialRecord) -> tuple[dict[str, Any], ...]:
    """The passed-over candidates at least as accurate as the recommendation (itself excluded): the ones a user
    would ask about."""
    return tuple(p for p in passed_over if p["accuracy"] is not None and p["accuracy"] >= chosen.accuracy
                 and p["artifact"] != chosen.artifact)


def no_recommendation_reason(records: list[TrialRecord], passed_over: list[dict[str, Any]], target_ms: float) -> str:
    """Why nothing is recommended, naming the closest candidates measured (re-measured, where they were) and by how
    much they miss."""
    misses = closest_measured(with_final_latencies([r.to_dict() for r in records], passed_over))
    if not misses:
        return "no trial finished"
    closest = ", ".join(f"trial {r['number']} at {r['latency_ms']:.2f} ms ({r['latency_ms'] / target_ms - 1:+.0%})"
                        for r in misses)
    return f"no candidate met the {target_ms:.2f} ms target; closest: {closest}"
