"""Population-based training against search: studies/pbt.toml (a population of 16 in one
fit) against studies/search.toml (TPE, median pruning, trial arrays) and the best classic
schedule of studies/schedules.toml, on the default problem, over seeds 1..5.

For each: the epochs trained, all trials or members together, until one reaches the grids'
best val/acc (0.840), and the seconds from the study's first trial to then; for PBT also
its best final value and the exploits' share of its training time. In this process, on
fresh SQLite stores, one torch thread.

    python bench/pbt.py [--seeds 5] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "studies"
GOOD = 0.840  # the five classic grid studies' best val/acc (bench/search_efficiency.py)


def first_reaching(client: Any, trials: list[Any], good: float) -> tuple[int, float] | None:
    """(epoch, timestamp in s) of the first val/acc >= good of any of ``trials``' runs."""
    hits = []
    for t in trials:
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id:
            hits += [
                (m.step, m.timestamp / 1000) for m in client.get_metric_history(run_id, "val/acc") if m.value >= good
            ]
    return min(hits) if hits else None


def run_pbt(folder: Path, seed: int, epochs: int | None) -> dict[str, Any]:
    import optuna
    from mlflow import MlflowClient

    from lrsearch.config import load_config
    from lrsearch.fit import population
    from lrsearch.service.launch import run_study

    base = load_config(STUDIES / "pbt.toml").with_overrides(epochs=epochs)  # None: the study's
    name = f"pbt-{seed}"
    cfg = dataclasses.replace(base, study=dataclasses.replace(base.study, name=name, seed=seed))
    stores = (f"sqlite:///{folder / name}-optuna.db", f"sqlite:///{folder / name}-mlflow.db")
    from lrsearch.fit.model import ArrayClassifier

    spent = [0.0, 0.0]  # the whole step (rank, choose, explore, record, copy); the copies alone
    step, copy = population.Population.step, ArrayClassifier.copy_members

    def timed_step(self: Any, array: Any, values: Any) -> None:
        started = time.perf_counter()
        step(self, array, values)
        spent[0] += time.perf_counter() - started

    def timed_copy(self: Any, copies: Any) -> None:
        started = time.perf_counter()
        copy(self, copies)
        spent[1] += time.perf_counter() - started

    population.Population.step, ArrayClassifier.copy_members = timed_step, timed_copy  # type: ignore[method-assign]
    try:
        run_study(cfg, storage=stores[0], tracking=stores[1])
    finally:
        population.Population.step, ArrayClassifier.copy_members = step, copy  # type: ignore[method-assign]
    trials = optuna.load_study(study_name=name, storage=stores[0]).get_trials(deepcopy=False)
    started = min(t.datetime_start for t in trials).timestamp()
    reach = first_reaching(MlflowClient(stores[1]), trials, GOOD)
    training = sum(t.user_attrs.get("train_seconds", 0) for t in trials)
    best = max(t.value for t in trials if t.value is not None)
    ended = max(t.datetime_complete for t in trials).timestamp()
    return {
        "best": best,
        "epochs": None if reach is None else (reach[0] + 1) * len(trials),
        "seconds": None if reach is None else reach[1] - started,
        # By the members' values (their metric at the end): the whole study's epochs and time.
        "ended_epochs": sum(t.user_attrs.get("epochs_trained", 0) for t in trials) if best >= GOOD else None,
        "ended_seconds": ended - started if best >= GOOD else None,
        "exploit_share": spent[0] / training if training else None,
        "copy_share": spent[1] / training if training else None,
    }


def run_tpe(folder: Path, seed: int, max_trials: int) -> dict[str, Any]:
    import optuna
    from optuna.trial import TrialState

    from lrsearch.config import load_config
    from lrsearch.core.stopping import Interrupted, StopFlag
    from lrsearch.service.launch import run_study

    base = load_config(STUDIES / "search.toml").with_overrides(trials=max_trials)
    name = f"search-{seed}"
    cfg = dataclasses.replace(base, study=dataclasses.replace(base.study, name=name, seed=seed))
    stores = (f"sqlite:///{folder / name}-optuna.db", f"sqlite:///{folder / name}-mlflow.db")
    stop = StopFlag()

    def reached(study: Any, trial: Any) -> None:
        if trial.state == TrialState.COMPLETE and trial.value >= GOOD:
            stop.signum = signal.SIGINT  # as a Ctrl-C: the array stops at its epoch's end

    with contextlib.suppress(Interrupted):
        run_study(cfg, storage=stores[0], tracking=stores[1], callbacks=[reached], stop=stop)
    trials = optuna.load_study(study_name=name, storage=stores[0]).get_trials(deepcopy=False)
    hits = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE and t.value >= GOOD), key=lambda t: t.datetime_complete
    )
    if not hits:
        return {"epochs": None, "seconds": None}
    at = hits[0].datetime_complete
    started = min(t.datetime_start for t in trials if t.datetime_start is not None)
    done = sum(
        t.user_attrs.get("epochs_trained", 0)
        for t in trials
        if t.datetime_complete is not None and t.datetime_complete <= at
    )
    return {"epochs": done, "seconds": (at - started).total_seconds()}


def run_schedules(folder: Path) -> dict[str, Any]:
    """The best classic schedule (the grid's best trial) and when it reached GOOD."""
    import optuna
    from mlflow import MlflowClient

    from lrsearch.config import load_config
    from lrsearch.results.ranking import direction, ranking
    from lrsearch.service.launch import run_study

    stores = (f"sqlite:///{folder}/schedules-optuna.db", f"sqlite:///{folder}/schedules-mlflow.db")
    run_study(load_config(STUDIES / "schedules.toml"), storage=stores[0], tracking=stores[1])
    study = optuna.load_study(study_name="schedules", storage=stores[0])
    best = ranking(study.trials, direction(study))[0]
    reach = first_reaching(MlflowClient(stores[1]), [best], GOOD)
    return {
        "trial": best.number,
        "params": best.params,
        "best": best.value,
        "epoch": None if reach is None else reach[0] + 1,
    }


def median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves the script runs")
    args = parser.parse_args()
    import optuna
    import torch

    from lrsearch.fit.training import quiet_lightning

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(1)
    quiet_lightning()
    seeds = range(1, (1 if args.quick else args.seeds) + 1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pbt = [run_pbt(folder, seed, 4 if args.quick else None) for seed in seeds]
        tpe = [run_tpe(folder, seed, 4 if args.quick else 160) for seed in seeds]
        classic = None if args.quick else run_schedules(folder)
    print(
        f"Population-based training vs search, the default problem, until val/acc {GOOD}; "
        f"seeds {seeds.start}..{seeds.stop - 1}; medians over the seeds that reach it"
    )
    print(
        "| study | reaches it when | seeds | epochs, all together | s from the first trial | best value (median) "
        "| target |"
    )
    print("|---|---|---|---|---|---|---|")

    def row(label: str, rows: list[dict[str, Any]], epochs_key: str, seconds_key: str, target: str) -> None:
        reached = [r for r in rows if r[epochs_key] is not None]
        epochs, seconds = median([r[epochs_key] for r in rows]), median([r[seconds_key] for r in rows])
        best = median([r.get("best") for r in rows])
        ok = "" if not target else f"{target}: {'met' if epochs is not None and epochs <= 800 else 'missed'}"
        print(
            f"| {label} | {len(reached)}/{len(rows)} | {'' if epochs is None else f'{epochs:.0f}'} | "
            f"{'' if seconds is None else f'{seconds:.2f}'} | {'' if best is None else f'{best:.3f}'} | {ok} |"
        )

    row(
        "studies/pbt.toml (16 members x 48 epochs) | a member's value (at its end)",
        pbt,
        "ended_epochs",
        "ended_seconds",
        "<= 800 epochs",
    )
    row("studies/pbt.toml | a member's val/acc at any epoch", pbt, "epochs", "seconds", "")
    row("studies/search.toml (TPE, median pruning, arrays auto) | a trial's value", tpe, "epochs", "seconds", "")
    for key, what in (
        ("copy_share", "the copies alone (weights, optimizer state, hyperparameters)"),
        ("exploit_share", "the whole exploit-and-explore step (rank, choose, perturb, record, copy)"),
    ):
        share = median([r[key] for r in pbt])
        print(
            f"\n{what}: {share:.2%} of PBT's training time (target <= 1%); per seed: "
            + ", ".join(f"{r[key]:.2%}" for r in pbt)
        )
    print(
        "per seed, PBT (epochs, s, best): "
        + "; ".join(f"{r['epochs']}, {r['seconds'] and round(r['seconds'], 2)}, {r['best']:.3f}" for r in pbt)
    )
    print(
        "per seed, TPE (epochs, s): "
        + "; ".join(f"{r['epochs']}, {r['seconds'] and round(r['seconds'], 2)}" for r in tpe)
    )
    if classic is not None:
        print(
            f"best classic schedule (studies/schedules.toml): trial {classic['trial']} {classic['params']}: "
            f"{classic['best']:.3f}, first at {GOOD} after {classic['epoch']} epochs"
        )


if __name__ == "__main__":
    main()
