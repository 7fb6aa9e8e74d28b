"""Trials per minute with 1 and 2 worker processes, and the share of wall time outside training.

Runs `lrsearch run studies/quickstart.toml --trials 20 --epochs 50 --workers N` as a user
would (a fresh embedded store each time, process start-up and imports included) and reads
each trial's `train_seconds` (time inside Lightning's fit) from the store.

    python bench/throughput.py [--trials 20] [--epochs 50]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STUDY = Path(__file__).resolve().parent.parent / "studies" / "quickstart.toml"


def run(workers: int, trials: int, epochs: int) -> tuple[float, float]:
    """(wall seconds, seconds spent training summed over trials) for one fresh study."""
    import optuna

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LRSEARCH_DATA": tmp}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lrsearch.cli", "run", str(STUDY), "--trials", str(trials),
                        "--epochs", str(epochs), "--workers", str(workers)],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp}/optuna.db")
        training = sum(t.user_attrs.get("train_seconds", 0.0) for t in study.trials)
    return wall, training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=50)
    args = parser.parse_args()
    rows = [(n, *run(n, args.trials, args.epochs)) for n in (1, 2)]
    print(f"{args.trials} trials x {args.epochs} epochs (studies/quickstart.toml, median pruning), embedded SQLite")
    print(f"{'workers':>7} {'wall s':>8} {'trials/min':>10} {'outside training':>17} {'speed-up':>9}")
    for workers, wall, training in rows:
        outside = 1 - training / (wall * workers)
        print(f"{workers:>7} {wall:>8.1f} {60 * args.trials / wall:>10.1f} {outside:>16.0%} "
              f"{rows[0][1] / wall:>8.2f}x")


if __name__ == "__main__":
    main()
