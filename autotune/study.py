"""The Optuna study: objectives, the latency constraint, samplers, storage and resume. Never touches a tensor.

The study only sees `evaluate(candidate) -> TrialOutcome`. Each outcome becomes objective values (validation
accuracy up, latency at the target percentile down, optionally size down) and a constraint value
(latency - target, through `Trial.set_constraint`) that the samplers read, so NSGA-II/TPE/GP learn where the feasible
region ends. A gate-rejected trial ends COMPLETE with its measured latency and its violation: Optuna records
constraints only for COMPLETE and PRUNED trials, and NSGA-II builds its population from COMPLETE ones, so a
PRUNED rejection would teach the sampler nothing. Its accuracy value is a placeholder (0), flagged in the
trial's user attributes and never reported as measured.

A trial that raises is recorded FAIL with its error in the user attributes; the study goes on.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from search_spaces import Candidate, Space
from search_spaces.knobs import Categorical, FloatRange, IntRange

log = logging.getLogger(__name__)

SAMPLERS = ("nsga2", "tpe", "gp", "random")
PLACEHOLDER_ACCURACY = 0.0
LATENCY_CONSTRAINT = "latency_ms_over_target"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=5)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {name!r}")


def directions(minimize_size: bool) -> list[str]:
    return ["maximize", "minimize"] + (["minimize"] if minimize_size else [])


def open_study(
    name: str, storage: str, sampler: str, seed: int, minimize_size: bool, resume: bool
) -> optuna.Study:
    """Create the study, or load it when `resume`; an existing study without `resume` is refused."""
    if not resume:
        trials_held = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
        if trials_held.get(name, 0) > 0:
            raise FileExistsError(
                f"storage already holds study {name!r} with {trials_held[name]} trials; "
                "pass --resume to continue it, or --out/--storage for a new run"
            )
    return optuna.create_study(
        study_name=name, storage=storage, sampler=make_sampler(sampler, seed), directions=directions(minimize_size),
        load_if_exists=True,
    )


def suggest(trial: optuna.Trial, space: Space) -> Candidate:
    """Sample every knob of the space (each is a product dimension; see search_spaces.space)."""
    params: dict[str, Any] = {}
    for knob in space.knobs:
        if isinstance(knob, Categorical):
            params[knob.name] = trial.suggest_categorical(knob.name, list(knob.choices))
        elif isinstance(knob, IntRange):
            params[knob.name] = trial.suggest_int(knob.name, knob.low, knob.high, step=knob.step, log=knob.log)
        elif isinstance(knob, FloatRange):
            params[knob.name] = trial.suggest_float(knob.name, knob.low, knob.high, step=knob.step, log=knob.log)
    return space.candidate(params)


def enqueue_anchors(study: optuna.Study, space: Space, anchors: Sequence[Candidate]) -> None:
    """Enqueue the given candidates (e.g. the teacher and its int8 twin) as the first trials, once per study."""
    if study.trials:
        return
    names = [k.name for k in space.knobs]
    for anchor in anchors:
        if space.contains(anchor):
            study.enqueue_trial({n: v for n, v in asdict(anchor).items() if n in names}, skip_if_exists=True)
        else:
            log.info("not enqueued (outside the space): %s", anchor.describe())


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def objective_values(outcome: Any, minimize_size: bool) -> list[float]:
    accuracy = outcome.accuracy if outcome.accuracy is not None else PLACEHOLDER_ACCURACY
    values = [accuracy, outcome.latency_ms]
    return values + [outcome.size_mb] if minimize_size else values


def record(trial: optuna.Trial, outcome: Any, target_ms: float, fingerprint: str) -> None:
    """Store the outcome on the trial: the constraint, and every measured figure for the result and report.

    The constraint goes through `Trial.set_constraint` (Optuna 5), which every constraint-aware sampler and
    `study.best_trials` read: <= 0 means the latency target is met.
    """
    trial.set_constraint(LATENCY_CONSTRAINT, outcome.latency_ms - target_ms)
    trial.set_user_attr("accuracy_is_placeholder", outcome.accuracy is None)
    trial.set_user_attr("candidate", outcome.candidate.to_dict())
    trial.set_user_attr("hardware_fingerprint", fingerprint)
    for name, value in outcome.figures().items():
        trial.set_user_attr(name, value)


def make_objective(
    space: Space, evaluate: Callable[[Candidate], Any], target_ms: float, fingerprint: str, minimize_size: bool,
    on_start: Callable[[int, Candidate], None] = lambda number, candidate: None,
) -> Callable[[optuna.Trial], list[float]]:
    def objective(trial: optuna.Trial) -> list[float]:
        candidate = suggest(trial, space)
        trial.set_user_attr("candidate", candidate.to_dict())
        on_start(trial.number, candidate)
        try:
            outcome = evaluate(candidate)
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
            raise
        record(trial, outcome, target_ms, fingerprint)
        return objective_values(outcome, minimize_size)

    return objective


def run(
    study: optuna.Study, objective: Callable[[optuna.Trial], list[float]], budget: int, timeout_s: float | None,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
) -> None:
    """Run trials until the study holds `budget` finished trials (a resumed study only runs the rest)."""
    remaining = budget - finished_count(study)
    if remaining <= 0:
        log.info("study already has %d finished trials (budget %d)", finished_count(study), budget)
        return
    stop_at_budget = optuna.study.MaxTrialsCallback(budget, states=FINISHED)
    study.optimize(objective, n_trials=remaining, timeout=timeout_s, catch=(Exception,),
                   callbacks=[stop_at_budget, *callbacks], gc_after_trial=True)


def importances(study: optuna.Study) -> dict[str, dict[str, float]]:
    """Optuna's parameter importances per objective (PED-ANOVA, Optuna's default evaluator).

    Accuracy is judged over evaluated trials only (a gate rejection's accuracy is a placeholder); latency over
    every COMPLETE trial, gate rejections included, since their latency was measured. Too few trials, or a
    space with nothing varying, gives no figures rather than an error.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    evaluated = [t for t in complete if not t.user_attrs.get("accuracy_is_placeholder", True)]
    out: dict[str, dict[str, float]] = {}
    # PED-ANOVA ranks what it takes to reach *low* values, so accuracy is negated.
    for name, trials, value in (("accuracy", evaluated, lambda t: -t.values[0]), ("latency_ms", complete, lambda t: t.values[1])):
        if len(trials) < 3:
            continue
        view = optuna.create_study(directions=study.directions)
        view.add_trials(trials)
        try:
            with warnings.catch_warnings():  # PED-ANOVA's reminder that it ranks low values: handled by the sign
                warnings.simplefilter("ignore", UserWarning)
                scores = optuna.importance.get_param_importances(view, target=value)
        except (ValueError, RuntimeError) as exc:
            log.info("no %s importances: %s", name, exc)
            continue
        out[name] = {param: round(float(score), 4) for param, score in scores.items()}
    return out
