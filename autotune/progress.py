"""Live progress of a tuning run (rich): trials done/total, the running trial's step, the best feasible
configuration so far, gate rejections, elapsed time and ETA. The API gets a silent one by default.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from autotune.records import Stage
from autotune.study import REPEAT_ATTR, SURPLUS_ATTR, finished_count
from search_spaces import Candidate

log = logging.getLogger(__name__)


class SilentProgress:
    """The interface TuneProgress implements, doing nothing: for library use and tests."""

    def start(self, total: int, done: int, target_ms: float) -> None:
        """The study begins: `total` trials in its budget, `done` already finished (a resumed or shared study)."""
        ...

    def trial_started(self, number: int, candidate: Candidate) -> None:
        """A trial of this process starts on `candidate`."""
        ...

    def step(self, name: str) -> None:
        """The running trial entered a step ("gate", "training", "evaluating"), so a long trial shows where it is."""
        ...

    def trial_finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's callback after each trial of this process, with the study for counts other workers moved."""
        ...

    def note(self, message: str) -> None:
        """A one-off message (a removed knob, a refinement); logged, so library users find it in their logs."""
        log.info(message)

    def training(self, label: str, step: int, total: int, loss: float) -> None:
        """A training step of the teacher, a student or a finalist: (step, total steps, loss)."""
        ...

    def stop(self) -> None:
        """The live part ends (called from a `finally`, so a failed study leaves no display running)."""
        ...


def trial_line(trial: FrozenTrial, target_ms: float) -> str:
    """One finished trial in a line: number, stage, candidate, accuracy, latency, and feasible or why not."""
    attrs = trial.user_attrs
    candidate = attrs.get("candidate")
    shape = Candidate.from_dict(candidate).describe() if candidate else "no candidate"
    if trial.state == TrialState.FAIL:
        return f"trial {trial.number} failed: {shape}: {attrs.get('error', 'no error recorded')}"
    accuracy = "-" if attrs.get("accuracy_is_placeholder", True) else f"{attrs['accuracy']:.4f}"
    latency = attrs.get("latency_ms")
    verdict = "feasible" if attrs.get("feasible") else (
        "not feasible: predicted over the target" if attrs.get("stage") == Stage.PREDICTED_SKIP else
        "not feasible: over the target at the gate, not trained" if attrs.get("stage") == Stage.GATE else
        "not feasible: over the target")
    timing = "-" if latency is None else f"{latency:.2f} ms (target {target_ms:.2f})"
    return f"trial {trial.number} {attrs.get('stage')}: {shape}; accuracy {accuracy}; latency {timing}; {verdict}"


class TuneProgress(SilentProgress):
    """A progress bar on stderr whose description carries the run's state."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, log_path=False)
        self.progress = Progress(
            TextColumn("[bold]trials"), MofNCompleteColumn(), BarColumn(bar_width=20), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.description}"), console=self.console,
            transient=False,
        )
        self.task: Any = None
        self.running = ""
        self.best = "no feasible trial yet"
        self.best_accuracy = -1.0
        self.rejections = 0
        self.failures = 0
        self.target_ms = 0.0

    def start(self, total: int, done: int, target_ms: float) -> None:
        """Open the live bar at the study's own count, since a resumed or joined study does not start at 0."""
        self.target_ms = target_ms
        self.progress.start()
        self.task = self.progress.add_task("", total=total, completed=done)
        self._refresh()

    def _refresh(self) -> None:
        text = f"{self.running} | best feasible: {self.best} | gate rejections {self.rejections}"
        if self.failures:
            text += f" | failed {self.failures}"
        self.progress.update(self.task, description=text)

    def trial_started(self, number: int, candidate: Candidate) -> None:
        """Show the candidate in short form (layers x hidden, bits, sparsity) as the running trial."""
        self.running = f"#{number} {candidate.layers}x{candidate.hidden} {candidate.bits}b s{candidate.sparsity:g}"
        self._refresh()

    def step(self, name: str) -> None:
        """Replace the running trial's step, keeping its number and candidate."""
        self.running = f"{self.running.split(':')[0]}: {name}"
        self._refresh()

    def trial_finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Count the outcome (failure, gate rejection, new best feasible accuracy) and move the bar to the study's
        finished count; a surplus trial ran nothing and is ignored, a repeat only noted."""
        attrs = trial.user_attrs
        if attrs.get(SURPLUS_ATTR):
            return
        if attrs.get(REPEAT_ATTR) is not None:
            self.note(f"trial {trial.number}: the sampler proposed trial {attrs[REPEAT_ATTR]}'s candidate again; its "
                      "figures reused, no budget used")
            return
        if trial.state == TrialState.FAIL:
            self.failures += 1
        elif attrs.get("stage") == Stage.GATE:
            self.rejections += 1
        elif attrs.get("feasible") and attrs.get("accuracy") is not None and attrs["accuracy"] > self.best_accuracy:
            self.best_accuracy = attrs["accuracy"]
            self.best = f"acc {attrs['accuracy']:.4f} at {attrs['latency_ms']:.2f} ms"
        self.running = f"#{trial.number} done"
        # Other workers finish trials of the same study too: the bar shows the study's count, not this process's.
        self.progress.update(self.task, completed=finished_count(study))
        self._refresh()
        if not self.console.is_terminal:  # CI, nohup, a log file: no live bar to watch, so one line per trial
            stamp = time.strftime("%H:%M:%S")
            self.console.print(f"[{stamp}] {trial_line(trial, self.target_ms)}", soft_wrap=True, markup=False, highlight=False)

    def note(self, message: str) -> None:
        """Log above the bar, so a message does not tear the live display."""
        self.console.log(message)

    def training(self, label: str, step: int, total: int, loss: float) -> None:
        """Training steps: in the running trial's line during the study, every ~10% as a log line before it."""
        if self.task is not None:
            self.running = f"{self.running.split(':')[0]}: {label} step {step}/{total}, loss {loss:.3f}"
            self._refresh()
        elif step == total or step % max(1, total // 10) == 0:
            self.console.log(f"{label}: step {step}/{total}, loss {loss:.3f}")

    def stop(self) -> None:
        """End the live display; later training (refinement) is logged line by line."""
        self.progress.stop()
        self.task = None

