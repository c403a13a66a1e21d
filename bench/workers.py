"""Scale-out and crash safety of `autotune worker`, on a fixed tiny study (the tests' 2-layer, hidden-32 BERT and
synthetic reviews, so it runs anywhere in minutes):

1. wall time of the study with 1 worker, then with 2 workers (each run from an empty cache: both train the same
   students), and their ratio (below 1 when the second worker helps; on 2 cores each worker times latencies
   with 1 thread, so two can run side by side);
2. trials lost under crashes: 2 workers on a fresh study, the first SIGKILLed (and started again) every `--kill-every` seconds
   until the study holds its budget. Lost = budgeted trials that did not end COMPLETE, plus
   trials left RUNNING. Must be 0: every killed trial is failed by its stale heartbeat and retried.

    python bench/workers.py [--trials 8] [--kill-every 8] [--storage URL]

Default storage: SQLite in a temporary directory (an RDB, so with Optuna's heartbeat). Ends with one JSON line:
{"one_worker_s", "two_workers_s", "ratio", "trials_lost"} (plus kills, for the record).

3. `--storm`: a kill storm. `--workers` (4) workers on a fresh study of `--trials` (24), one random worker SIGKILLed
   every `--kill-every` seconds (5, jittered by a quarter; with `--aim-at-trials`, drawn among those running a trial
   when any does) and started again, for `--minutes` (10) or until the budget is done; then a final worker pass, killed by nobody, finishes what is left. The study must hold exactly
   the budget of COMPLETE trials, no duplicate, nothing RUNNING, every killed trial retried.

    python bench/workers.py --storm [--storage journal|postgres|URL] [--minutes 10] [--trials 24] [--workers 4]

   `--storage postgres` reads the server's URL from $AUTOTUNE_TEST_POSTGRES_URL (`source .ci/postgres.sh &&
   postgres_start` starts one). Prints its figures and ends with one JSON line: {"storage", "kills",
   "kills_mid_trial", "retries", "complete", "budget", "duplicates", "left_running", "unretried",
   "retries_exhausted", "failed_candidates", "workers_seen", "worker_errors", "storm_s", "final_pass_s", "ok"}.
   A trial lost more than MAX_RETRY times is not retried again (autotune cannot tell a kill from a candidate
   that kills its worker): "retries_exhausted" counts those, which `--aim-at-trials` makes likely.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the tests' tiny model and synthetic data, made locally

from conftest import save_tiny_model, synthetic_rows, write_csv  # noqa: E402

from autotune.study import ERROR_ATTR, MAX_RETRY, OWNER_ATTR, WORKER_ATTR, ran_nothing, retried_numbers  # noqa: E402

SPACE = {"layers": [1, 2], "hidden": [32], "heads": [4], "ffn": [64], "sparsity": [0.0, 0.3], "bits": [32, 8]}


def write_spec(root: Path, trials: int) -> Path:
    model = save_tiny_model(root / "model")
    data = write_csv(root / "reviews.csv", synthetic_rows(240))
    spec = {
        "name": "bench-workers",
        "model": {"path": str(model)},
        "data": {"path": str(data), "max_length": 32},
        "target": {"latency_ms": 50.0, "seq_len": 32, "threads": 1},
        "space": {"preset": "bert-default", "knobs": SPACE},
        "search": {"trials": trials, "seed": 0, "heartbeat_s": 1},
        "training": {"epochs": 1, "batch_size": 16},
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def start_worker(spec: Path, storage: str, study: str, root: Path, cache: Path, log: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "AUTOTUNE_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.DEVNULL if log is None else log.open("w")
    return subprocess.Popen([sys.executable, "-m", "autotune", "worker", str(spec), "--storage", storage,
                             "--study-name", study, "--out", str(root / "run")], env=env,
                            stdout=out, stderr=subprocess.STDOUT)


def timed_study(spec: Path, storage: str, root: Path, workers: int) -> float:
    """Seconds from starting `workers` processes on a new study to the last one's exit."""
    study, cache = f"timed-{uuid.uuid4().hex[:8]}", Path(tempfile.mkdtemp(dir=root, prefix="cache-"))
    start = time.perf_counter()
    procs = [start_worker(spec, storage, study, root, cache) for _ in range(workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker failed with exit codes {codes}")
    return time.perf_counter() - start


def trials_lost_under_kills(spec: Path, storage: str, root: Path, budget: int, kill_every: float) -> tuple[int, int]:
    """(trials lost, kills): two workers, the first SIGKILLed and restarted every `kill_every` s until the budget.

    Always the same one: killing them in turn faster than a worker starts up would let neither finish a trial."""
    study, cache = f"killed-{uuid.uuid4().hex[:8]}", Path(tempfile.mkdtemp(dir=root, prefix="cache-"))
    procs = [start_worker(spec, storage, study, root, cache) for _ in range(2)]
    kills, victim, last_kill = 0, 0, time.monotonic()  # victim: procs[0], restarted after each kill
    while any(p.poll() is None for p in procs):
        time.sleep(0.5)
        survivor_running = procs[1].poll() is None  # once it is done, so is the study: let the victim finish
        if survivor_running and time.monotonic() - last_kill >= kill_every and procs[victim].poll() is None:
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait()
            kills += 1
            procs[victim] = start_worker(spec, storage, study, root, cache)
            last_kill = time.monotonic()
    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and not ran_nothing(t)]
    running = [t for t in trials if t.state == TrialState.RUNNING]
    return max(0, budget - len(complete)) + len(running), kills


# -- the kill storm ------------------------------------------------------------------------------------------------

#: How long the workers left after the storm, and the final pass, may take before they count as hung.
DRAIN_S = 900


def wait_or_kill(proc: subprocess.Popen, timeout: float) -> int:
    """The exit status of a worker given `timeout` s to finish; one still running then is killed (status -9)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()

def storage_url(choice: str | None, root: Path) -> str:
    """The storm's storage: a journal file in `root`, the test PostgreSQL server, or a URL given as is."""
    if choice in (None, "journal"):
        return f"journal:{root / 'study.log'}"
    if choice == "postgres":
        url = os.environ.get("AUTOTUNE_TEST_POSTGRES_URL")
        if not url:
            raise SystemExit("--storage postgres reads AUTOTUNE_TEST_POSTGRES_URL: `source .ci/postgres.sh && postgres_start`")
        return url
    return choice


def load_trials(storage: str, study: str) -> list:
    """The study's trials, whatever the storage (a journal is opened as autotune opens it)."""
    if storage.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        backend = JournalStorage(JournalFileBackend(storage[len("journal:"):]))
        return optuna.load_study(study_name=study, storage=backend).get_trials(deepcopy=False)
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def running_owners(storage: str, study: str) -> set[int]:
    """Pids of the workers that hold a RUNNING trial right now (none while the study is not there yet)."""
    try:
        trials = load_trials(storage, study)
    except Exception:  # noqa: BLE001 - not created yet, or the storage busy: nobody to aim at this time
        return set()
    owners = (str(t.user_attrs.get(OWNER_ATTR, "")).rpartition("/")[0].rpartition(":")[2] for t in trials
              if t.state.name == "RUNNING")
    return {int(pid) for pid in owners if pid.isdigit()}


def budget_done(storage: str, study: str, budget: int) -> bool:
    """Whether the study holds `budget` COMPLETE trials (those that ran nothing aside: surplus trials, repeats)."""
    try:
        trials = load_trials(storage, study)
    except Exception:  # noqa: BLE001 - not created yet
        return False
    return sum(t.state.name == "COMPLETE" and not ran_nothing(t) for t in trials) >= budget


def kill_storm(spec: Path, storage: str, study: str, root: Path, cache: Path, *, workers: int, budget: int,
               seconds: float, kill_every: float, seed: int, aim_at_trials: bool) -> dict:
    """SIGKILL one random live worker every `kill_every` s (jittered), start it again, until `seconds` pass or the
    study holds its `budget` of COMPLETE trials. With `aim_at_trials` the victim is drawn among the workers
    running a trial when there are any (a worker spends most of a short life starting up, and a kill then loses
    nothing). Returns the kills, the pids killed and the errors seen."""
    rng = random.Random(seed)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    log_of: dict[int, Path] = {}

    def start() -> subprocess.Popen:
        log = logs / f"worker-{len(log_of) + 1}.log"
        proc = start_worker(spec, storage, study, root, cache, log)
        log_of[proc.pid] = log
        return proc

    def failure(proc: subprocess.Popen, when: str) -> str:
        return f"{when}: exit {proc.returncode}: " + log_of[proc.pid].read_text(errors="replace")[-1500:]

    procs = [start() for _ in range(workers)]
    kills, killed_pids, errors = 0, [], []
    begin = time.monotonic()
    next_kill = begin + kill_every * rng.uniform(0.75, 1.25)
    while time.monotonic() - begin < seconds and any(p.poll() is None for p in procs):
        time.sleep(0.2)
        for i, proc in enumerate(procs):
            if proc.poll() not in (None, 0):  # a worker that failed by itself: noted, started again
                errors.append(failure(proc, "during the storm"))
                procs[i] = start()
        if time.monotonic() >= next_kill:
            if budget_done(storage, study, budget):
                break  # the storm is over: what is left is workers starting up, who would find nothing to do
            live = [i for i, p in enumerate(procs) if p.poll() is None]
            busy = [i for i in live if procs[i].pid in running_owners(storage, study)] if aim_at_trials else []
            if live:
                victim = rng.choice(busy or live)
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait()  # reaped: a zombie would still look alive to the next worker
                kills += 1
                killed_pids.append(procs[victim].pid)
                procs[victim] = start()
            next_kill = time.monotonic() + kill_every * rng.uniform(0.75, 1.25)
    storm_s = time.monotonic() - begin
    for proc in procs:  # the storm is over: whoever is left finishes in peace
        if wait_or_kill(proc, DRAIN_S) != 0:
            errors.append(failure(proc, "after the storm"))
    return {"kills": kills, "killed_pids": killed_pids, "errors": errors, "storm_s": storm_s,
            "drained_s": time.monotonic() - begin - storm_s}


def storm_figures(trials: list, budget: int, killed_pids: list[int]) -> dict:
    """What the storm left: COMPLETE trials against the budget, retries, duplicates, RUNNING leftovers, and the
    trials lost to kills that were never retried."""
    retried = retried_numbers(trials)
    complete = [t for t in trials if t.state.name == "COMPLETE" and not ran_nothing(t)]
    lineage = [t.system_attrs.get("retry_history", [t.number])[0] for t in complete]
    numbers = [t.number for t in trials]
    lost = [t for t in trials if t.state.name == "FAIL" and ERROR_ATTR not in t.user_attrs]  # killed, not failed by its candidate
    owners = {t.number: str(t.user_attrs.get(OWNER_ATTR, "")).rpartition("/")[0].rpartition(":")[2] for t in lost}
    return {
        "complete": len(complete), "budget": budget,
        # a second retry of one attempt (two workers recovered its lost retry at once) runs nothing: not counted
        "retries": sum(1 for t in trials if t.system_attrs.get("retry_history") and not ran_nothing(t)),
        "duplicates": (len(numbers) - len(set(numbers))) + (len(lineage) - len(set(lineage))),
        "left_running": sum(1 for t in trials if t.state.name == "RUNNING"),
        "kills_mid_trial": sum(1 for t in lost if owners[t.number] in {str(pid) for pid in killed_pids}),
        "unretried": sum(1 for t in lost if t.number not in retried),
        # lost again after MAX_RETRY retries: a candidate that keeps killing its worker, as far as autotune can tell
        "retries_exhausted": sum(1 for t in lost if t.number not in retried
                                 and len(t.system_attrs.get("retry_history", [])) >= MAX_RETRY),
        "failed_candidates": sum(1 for t in trials if t.state.name == "FAIL" and ERROR_ATTR in t.user_attrs),
        "workers_seen": len({t.user_attrs.get(WORKER_ATTR) for t in complete}),
    }


def storm(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp:
        root = Path(tmp)
        spec = write_spec(root, args.trials)
        storage = storage_url(args.storage, root)
        study, cache = f"storm-{uuid.uuid4().hex[:8]}", root / "cache"
        kind = "journal" if storage.startswith("journal:") else storage.split(":", 1)[0].split("+")[0]
        print(f"kill storm on {kind}: {args.workers} workers, {args.trials} trials, a SIGKILL every ~{args.kill_every:g} s "
              f"for up to {args.minutes:g} min", flush=True)
        seen = kill_storm(spec, storage, study, root, cache, workers=args.workers, budget=args.trials,
                          seconds=args.minutes * 60,
                          kill_every=args.kill_every, seed=args.seed, aim_at_trials=args.aim_at_trials)
        at_end = load_trials(storage, study)
        done = sum(1 for t in at_end if t.state.name == "COMPLETE" and not ran_nothing(t))
        print(f"storm: {seen['storm_s']:.0f} s, {seen['kills']} kills, {done} of {args.trials} trials COMPLETE when it "
              f"ended ({seen['drained_s']:.0f} s more for the workers left to exit)", flush=True)
        start = time.monotonic()
        final = start_worker(spec, storage, study, root, cache, root / "logs" / "final.log")
        if wait_or_kill(final, DRAIN_S) != 0:
            seen["errors"].append(f"final pass: exit {final.returncode}: "
                                  + (root / "logs" / "final.log").read_text(errors="replace")[-1500:])
        final_s = time.monotonic() - start
        figures = storm_figures(load_trials(storage, study), args.trials, seen["killed_pids"])
        for error in seen["errors"]:
            print(f"worker error: {error}", flush=True)
    ok = (figures["complete"] == args.trials and not figures["duplicates"] and not figures["left_running"]
          and not figures["unretried"] and not seen["errors"])
    print(f"final pass: {final_s:.0f} s; {figures['complete']} of {figures['budget']} COMPLETE, {figures['retries']} "
          f"retries of {figures['kills_mid_trial']} trials killed mid-run ({seen['kills']} kills in all), "
          f"{figures['duplicates']} duplicates, {figures['left_running']} left RUNNING, {figures['unretried']} killed "
          f"trials never retried ({figures['retries_exhausted']} after {MAX_RETRY} retries), "
          f"{figures['failed_candidates']} failed candidates; "
          f"{figures['workers_seen']} worker processes completed trials", flush=True)
    print(json.dumps({"storage": kind, "kills": seen["kills"], **figures, "worker_errors": len(seen["errors"]),
                      "storm_s": round(seen["storm_s"], 1), "final_pass_s": round(final_s, 1), "ok": ok}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=None, help="the budget (default 8; 24 with --storm)")
    parser.add_argument("--kill-every", type=float, default=None, metavar="S", help="seconds between kills (8; 5 with --storm)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="an RDB URL (default: SQLite in a temp dir); with --storm also journal (default) or postgres")
    parser.add_argument("--storm", action="store_true", help="the kill storm instead of the timings")
    parser.add_argument("--workers", type=int, default=4, help="--storm: workers running at once")
    parser.add_argument("--minutes", type=float, default=10.0, help="--storm: how long the kills go on at most")
    parser.add_argument("--seed", type=int, default=0, help="--storm: which worker is killed when")
    parser.add_argument("--aim-at-trials", action="store_true",
                        help="--storm: draw the victim among the workers running a trial, when any does")
    args = parser.parse_args()
    if args.storm:
        args.trials, args.kill_every = args.trials or 24, args.kill_every or 5.0
        storm(args)
        return
    args.trials, args.kill_every = args.trials or 8, args.kill_every or 8.0
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        root = Path(tmp)
        spec = write_spec(root, args.trials)
        storage = args.storage or f"sqlite:///{root / 'study.db'}"
        one = timed_study(spec, storage, root, workers=1)
        print(f"1 worker: {one:.1f} s for {args.trials} trials", flush=True)
        two = timed_study(spec, storage, root, workers=2)
        print(f"2 workers: {two:.1f} s ({two / one:.2f} x the time of one)", flush=True)
        lost, kills = trials_lost_under_kills(spec, storage, root, args.trials, args.kill_every)
        print(f"SIGKILL every {args.kill_every:g} s: {kills} kills, {lost} trials lost", flush=True)
    print(json.dumps({"one_worker_s": round(one, 2), "two_workers_s": round(two, 2), "ratio": round(two / one, 3),
                      "trials_lost": lost, "kills": kills}))


if __name__ == "__main__":
    main()
