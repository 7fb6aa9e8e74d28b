"""Trials per minute with 1 and 2 worker processes, and the share of time outside training.

Runs `lrsearch run studies/quickstart.toml --trials 20 --epochs 50 --workers N` as a user
would (a fresh embedded store each time) and reads from the store each trial's start and
end and its `train_seconds` (time inside train(): the Trainer and its fit). Two clocks:

- study: from the first trial's start to the last trial's end, the part that grows with
  the number of trials (targets 2 and 3 of issue 6 are read on this one);
- command: the whole command, with process start-up (imports: a few seconds per process,
  once) and the end-of-run report (once per study) included.

Each setting runs --repeats times (median of each clock).

A second table runs the same study in this process, one worker, twice per repetition: as
lrsearch runs it (Optuna's RDB storage on SQLite), and with the Optuna study in memory
(everything else unchanged: the same sampler, pruner, objective and MLflow store). The
difference is what Optuna's storage costs per trial.

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
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lrsearch.cli",
                "run",
                str(STUDY),
                "--trials",
                str(trials),
                "--epochs",
                str(epochs),
                "--workers",
                str(workers),
            ],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        command = time.perf_counter() - start
        study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp}/optuna.db")
        done = [t for t in study.trials if t.datetime_complete is not None]
        study_s = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
        training = sum(t.user_attrs.get("train_seconds", 0.0) for t in study.trials)
    return Run(workers, command, study_s, training)


def median_run(workers: int, trials: int, epochs: int, repeats: int) -> Run:
    runs = [run(workers, trials, epochs) for _ in range(repeats)]
    return Run(
        workers, *(statistics.median(getattr(r, f) for r in runs) for f in ("command_s", "study_s", "training_s"))
    )


def in_process(trials: int, epochs: int, in_memory: bool) -> tuple[float, float]:
    """(seconds, seconds of training) for the study's trials run by ``work`` in this process."""
    import optuna

    from lrsearch.choices.sampling import make_pruner, make_sampler
    from lrsearch.config import load_config
    from lrsearch.fit.training import quiet_lightning
    from lrsearch.service.session import open_session
    from lrsearch.service.worker import work
    from lrsearch.store.retrying_storage import RetryingStorage

    quiet_lightning()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_config(STUDY).with_overrides(trials=trials, epochs=epochs)
    with tempfile.TemporaryDirectory() as tmp:
        session = open_session(cfg, storage=f"sqlite:///{tmp}/optuna.db", tracking=f"sqlite:///{tmp}/mlflow.db")
        if in_memory:
            session.store = RetryingStorage(optuna.storages.InMemoryStorage(), session.store.retry)
            session.study = optuna.create_study(
                storage=session.store,
                study_name=cfg.study.name,
                direction=cfg.study.direction,
                sampler=make_sampler(cfg.study.sampler, cfg.params, cfg.study.seed),
                pruner=make_pruner(cfg.study.pruner, cfg.train.epochs, cfg.study.prune_every),
            )
            session.study_id = session.store.get_study_id_from_name(cfg.study.name)
        start = time.perf_counter()
        work(session)
        wall = time.perf_counter() - start
        training = sum(t.user_attrs.get("train_seconds", 0.0) for t in session.study.trials)
    return wall, training


def storage_share(trials: int, epochs: int, repeats: int) -> None:
    rows = {False: [], True: []}
    for _ in range(repeats):
        for in_memory in rows:
            rows[in_memory].append(in_process(trials, epochs, in_memory))
    print(f"\nin this process, 1 worker, {trials} trials x {epochs} epochs, median of {repeats}")
    print(f"{'Optuna study':<26} {'work s':>7} {'training s':>10} {'outside training':>16} {'ms/trial outside':>16}")
    for in_memory, runs in rows.items():
        wall = statistics.median(w for w, _ in runs)
        training = statistics.median(t for _, t in runs)
        label = "in memory" if in_memory else "RDB storage on SQLite"
        print(
            f"{label:<26} {wall:>7.2f} {training:>10.2f} {1 - training / wall:>16.0%} "
            f"{1000 * (wall - training) / trials:>16.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs = [median_run(n, args.trials, args.epochs, args.repeats) for n in (1, 2)]
    print(
        f"{args.trials} trials x {args.epochs} epochs (studies/quickstart.toml, median pruning), embedded SQLite, "
        f"median of {args.repeats}"
    )
    print(
        f"{'workers':>7} | {'study s':>7} {'trials/min':>10} {'outside training':>16} {'speed-up':>8} | "
        f"{'command s':>9} {'outside training':>16} {'speed-up':>8}"
    )
    one = runs[0]
    for r in runs:
        print(
            f"{r.workers:>7} | {r.study_s:>7.1f} {60 * args.trials / r.study_s:>10.1f} {r.outside(r.study_s):>16.0%} "
            f"{one.study_s / r.study_s:>7.2f}x | {r.command_s:>9.1f} {r.outside(r.command_s):>16.0%} "
            f"{one.command_s / r.command_s:>7.2f}x"
        )
    storage_share(args.trials, args.epochs, args.repeats)


if __name__ == "__main__":
    main()
