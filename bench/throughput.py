"""Trials per minute with 1 and 2 worker processes, and the share of time outside training.

Runs `lrsearch run studies/quickstart.toml --trials 20 --epochs 50 --workers N` as a user
would (a fresh embedded store each time) and reads from the store each trial's start and
end and its `train_seconds` (time inside train(): the Trainer and its fit). Two clocks:

- study: from the first trial's start to the last trial's end, the part that grows with
  the number of trials (targets 2 and 3 of issue 6 are read on this one);
- command: the whole command, with process start-up (imports: a few seconds per process,
  once) and the end-of-run report (once per study) included.

Each setting runs --repeats times (median of each clock).

    python bench/throughput.py [--trials 20] [--epochs 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

STUDY = Path(__file__).resolve().parent.parent / "studies" / "quickstart.toml"


@dataclass
class Run:
    workers: int
    command_s: float
    study_s: float
    training_s: float  # summed over trials

    def outside(self, wall: float) -> float:
        return 1 - self.training_s / (wall * self.workers)


def run(workers: int, trials: int, epochs: int) -> Run:
    import optuna

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LRSEARCH_DATA": tmp}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lrsearch.cli", "run", str(STUDY), "--trials", str(trials),
                        "--epochs", str(epochs), "--workers", str(workers)],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        command = time.perf_counter() - start
        study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp}/optuna.db")
        done = [t for t in study.trials if t.datetime_complete is not None]
        study_s = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
        training = sum(t.user_attrs.get("train_seconds", 0.0) for t in study.trials)
    return Run(workers, command, study_s, training)


def median_run(workers: int, trials: int, epochs: int, repeats: int) -> Run:
    runs = [run(workers, trials, epochs) for _ in range(repeats)]
    return Run(workers, *(statistics.median(getattr(r, f) for r in runs) for f in ("command_s", "study_s", "training_s")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs = [median_run(n, args.trials, args.epochs, args.repeats) for n in (1, 2)]
    print(f"{args.trials} trials x {args.epochs} epochs (studies/quickstart.toml, median pruning), embedded SQLite, "
          f"median of {args.repeats}")
    print(f"{'workers':>7} | {'study s':>7} {'trials/min':>10} {'outside training':>16} {'speed-up':>8} | "
          f"{'command s':>9} {'outside training':>16} {'speed-up':>8}")
    one = runs[0]
    for r in runs:
        print(f"{r.workers:>7} | {r.study_s:>7.1f} {60 * args.trials / r.study_s:>10.1f} {r.outside(r.study_s):>16.0%} "
              f"{one.study_s / r.study_s:>7.2f}x | {r.command_s:>9.1f} {r.outside(r.command_s):>16.0%} "
              f"{one.command_s / r.command_s:>7.2f}x")


if __name__ == "__main__":
    main()
