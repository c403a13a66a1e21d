"""The study loop (`autotune.study.run`) on real Optuna studies on SQLite, no model. Retries that a kill lost: failing
a lost trial and enqueuing its retry are two writes, and a worker killed between them must not leave a failed attempt
that nothing retries (it would count against the budget for good). The deadline: no trial starts after it but a
study's first. Repeats: a candidate the sampler proposes again is not measured again and uses no budget, up to a cap."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from autotune.records import Stage, TrialOutcome
from autotune.study import (
    ERROR_ATTR, MAX_RETRY, OWNER_ATTR, REPEAT_ATTR, budget_use, kept_trials, make_objective, repeated_trial,
    retry_lost_retries, run, surplus_reason,
)
from search_spaces import Candidate, Space
from search_spaces.knobs import Categorical
from search_spaces.space import TeacherShape

LAYERS = {"layers": IntDistribution(1, 4)}


def new_study(tmp_path: Path) -> optuna.Study:
    return optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s",
                               directions=["maximize", "minimize"])


def failed(study: optuna.Study, layers: int, user_attrs: dict, system_attrs: dict | None = None) -> int:
    """A FAIL trial as a storage holds it after its worker, or its candidate, failed; its number."""
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params={"layers": layers}, distributions=LAYERS,
                                              user_attrs=user_attrs, system_attrs=system_attrs or {}))
    return study.get_trials(deepcopy=False)[-1].number


def test_a_failed_attempt_whose_retry_a_kill_lost_is_retried_once(tmp_path: Path) -> None:
    study = new_study(tmp_path)
    lost = failed(study, 2, {OWNER_ATTR: "host:1/0"})
    failed(study, 3, {OWNER_ATTR: "host:1/1", ERROR_ATTR: "ValueError: the candidate's own failure"})
    failed(study, 4, {OWNER_ATTR: "host:1/2"}, {"retry_history": list(range(90, 90 + MAX_RETRY))})  # retried enough

    assert retry_lost_retries(study) == [lost]
    assert retry_lost_retries(study) == []  # its retry is there now: nothing to recover twice
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(waiting) == 1
    assert waiting[0].params == {"layers": 2} and waiting[0].system_attrs["retry_history"] == [lost]
    # The lost attempt no longer uses the budget (its retry does); the failed candidate and the exhausted one do.
    use = budget_use(study.get_trials(deepcopy=False))
    assert (use.finished, use.waiting) == (2, 1)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_of_two_retries_of_one_attempt_only_the_first_runs(tmp_path: Path) -> None:
    study = new_study(tmp_path)
    lost = failed(study, 2, {OWNER_ATTR: "host:1/0"})
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    for _ in range(2):  # two workers recovering the same lost retry at once
        retry(study, study.get_trials(deepcopy=False)[lost])
    first, second = study.ask(), study.ask()
    assert first.params == second.params == {"layers": 2}
    assert surplus_reason(study, first.number, budget=10) is None
    reason = surplus_reason(study, second.number, budget=10)
    assert reason is not None and f"retries trial {lost}, which an earlier trial already retries" in reason


def test_a_trial_beyond_the_budget_runs_nothing(tmp_path: Path) -> None:
    study = new_study(tmp_path)
    first, second = study.ask(), study.ask()
    assert surplus_reason(study, first.number, budget=1) is None
    assert "beyond the budget of 1" in surplus_reason(study, second.number, budget=1)


def layers_objective(trial: optuna.Trial) -> list[float]:
    return [float(trial.suggest_int("layers", 1, 4)), 1.0]


def test_no_trial_starts_after_the_deadline_once_one_has_finished(tmp_path: Path) -> None:
    study = new_study(tmp_path)
    run(study, layers_objective, budget=5, deadline=time.perf_counter() - 1)  # the setup took longer than the budget
    assert budget_use(study.get_trials(deepcopy=False)).finished == 1  # a first trial still runs: a run ends with a result
    run(study, layers_objective, budget=5, deadline=time.perf_counter() - 1)  # resumed past its time: nothing more
    assert len(study.get_trials(deepcopy=False)) == 1
    run(study, layers_objective, budget=3, deadline=time.perf_counter() + 600)  # time left: the budget decides
    assert budget_use(study.get_trials(deepcopy=False)).finished == 3
    run(study, layers_objective, budget=4, deadline=None)
    assert budget_use(study.get_trials(deepcopy=False)).finished == 4


def two_candidate_space() -> Space:
    """A space of two candidates (one or two layers), so a sampler soon proposes a measured one again."""
    fixed = {"hidden": 8, "heads": 2, "ffn": 16, "sparsity": 0.0, "sparsity_pattern": "unstructured", "bits": 32}
    knobs = (Categorical("layers", (1, 2)), *(Categorical(name, (value,)) for name, value in fixed.items()))
    return Space(knobs=knobs, teacher=TeacherShape(layers=2, hidden=8, heads=2, ffn=16))


def test_a_candidate_proposed_again_is_not_measured_again_and_uses_no_budget_up_to_a_cap(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s",
                                directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    measured: list[int] = []

    def evaluate(candidate: Candidate) -> TrialOutcome:
        measured.append(candidate.layers)
        latency = 2.0 * candidate.layers
        return TrialOutcome(candidate, Stage.EVALUATED, feasible=latency <= 3.0, latency={}, latency_ms=latency,
                            size_mb=1.0, accuracy=0.5 + 0.1 * candidate.layers)

    budget = 3
    objective = make_objective(two_candidate_space(), evaluate, lambda o: {"latency": o.latency_ms - 3.0}, "hw",
                               minimize_size=False, budget=budget)
    run(study, objective, budget=budget, deadline=None)

    trials = study.get_trials(deepcopy=False)
    repeats = [t for t in trials if t.user_attrs.get(REPEAT_ATTR) is not None]
    assert len(repeats) == budget  # the cap: past it a repeat is measured and counts, so the study ends
    assert len(trials) == budget + len(repeats) and budget_use(trials).finished == budget
    assert sorted(set(measured)) == [1, 2] and len(measured) == budget  # the third counted trial is a measured repeat
    assert [t.number for t in kept_trials(study)] == [t.number for t in trials if t not in repeats]
    for trial in repeats:  # the sampler learns the same point: the earlier trial's values and constraints
        earlier = trials[trial.user_attrs[REPEAT_ATTR]]
        assert earlier.user_attrs.get(REPEAT_ATTR) is None and earlier.number < trial.number
        assert trial.params == earlier.params and trial.values == earlier.values
        assert trial.constraints == earlier.constraints and trial.state == TrialState.COMPLETE
        assert trial.user_attrs["latency_ms"] == earlier.user_attrs["latency_ms"]  # its figures too
    candidate = trials[0].user_attrs["candidate"]
    assert repeated_trial(trials, candidate, "other hardware", budget=10) is None  # its latency was not measured there
    assert repeated_trial(trials, candidate, "hw", budget=len(repeats)) is None  # the cap reached
    assert repeated_trial(trials, candidate, "hw", budget=10).number == 0
