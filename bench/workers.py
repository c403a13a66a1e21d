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
"""

from __future__ import annotations

import argparse
import json
import os
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


def start_worker(spec: Path, storage: str, study: str, root: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "AUTOTUNE_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "autotune", "worker", str(spec), "--storage", storage,
                             "--study-name", study, "--out", str(root / "run")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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
    complete = [t for t in trials if t.state == TrialState.COMPLETE and not t.user_attrs.get("surplus")]
    running = [t for t in trials if t.state == TrialState.RUNNING]
    return max(0, budget - len(complete)) + len(running), kills


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--kill-every", type=float, default=8.0, metavar="S")
    parser.add_argument("--storage", default=None, metavar="URL", help="an RDB URL (default: SQLite in a temp dir)")
    args = parser.parse_args()
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
