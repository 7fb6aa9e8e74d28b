"""Trial arrays: trials trained together, in one fit, train as each trains alone."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import optuna
import pytest
from conftest import ASKS_AS_ANOTHER_CLIENT
from mlflow import MlflowClient

from lrsearch.choices.data import load_data
from lrsearch.choices.optimizers import OPTIMIZERS
from lrsearch.choices.sampling import array_target
from lrsearch.choices.schedules import SCHEDULES
from lrsearch.config import parse_config
from lrsearch.fit.member import Member
from lrsearch.fit.training import choose_array_size, fit_array, largest_array, member_bytes, train

CFG = parse_config({"study": {"name": "arrays", "pruner": "none"}, "train": {"epochs": 20}}, "arrays.toml")
DATA = load_data(CFG.data)
SCHEDULE_HP = {
    "time_decay": {"decay": 0.01},
    "step": {"step_size": 3, "gamma": 0.5},
    "exponential": {"gamma": 0.9},
    "cosine": {"t_max": 20},
    "plateau": {"patience": 2, "factor": 0.5},
    "one_cycle": {"pct_start": 0.3, "anneal": "cos"},
    "cyclic": {"mode": "triangular2", "base_fraction": 0.1, "half_cycle": 2},
}
OPTIMIZER_HP = {
    "sgd": {"momentum": 0.9, "nesterov": True},
    "rmsprop": {"momentum": 0.5},
    "adamw": {"weight_decay": 0.05},
}
LRS = (0.1, 0.03, 0.01, 0.003, 0.1, 0.05, 0.001, 0.02)


def _hp(optimizer: str, schedule: str, lr: float, warmup: int = 0) -> dict:
    hp = {
        "optimizer": optimizer,
        "lr": lr,
        "schedule": schedule,
        **OPTIMIZER_HP.get(optimizer, {}),
        **SCHEDULE_HP.get(schedule, {}),
    }
    return {**hp, "warmup_epochs": warmup} if warmup else hp


def _curves(result) -> dict[str, list[float]]:
    return {k: [v for _, v, _ in points] for k, points in result.history.items()}


@pytest.mark.parametrize("shift", [0, 1, 2], ids=["first", "second", "third"])
def test_a_trial_in_an_array_of_8_trains_as_it_trains_alone(shift):
    """Every optimizer of the registry and every schedule, at rates up to 0.1, three pairings
    of them: per-epoch val/loss within 1e-4 over 20 epochs, the LR curve equal."""
    optimizers, schedules = list(OPTIMIZERS.names), list(SCHEDULES.names)
    hps = [
        _hp(optimizers[(i + shift) % len(optimizers)], schedules[i], LRS[i], warmup=2 if i % 3 == shift else 0)
        for i in range(8)
    ]
    members = [Member(str(i), hp, 100 + i, CFG.train.epochs) for i, hp in enumerate(hps)]
    fit_array(CFG, DATA, members)
    for member in members:
        alone = _curves(train(CFG, DATA, member.hp, member.seed))
        together = _curves(member.result)
        assert len(together["val/loss"]) == 20 and member.result.epochs == 20
        assert max(abs(a - b) for a, b in zip(alone["val/loss"], together["val/loss"])) < 1e-4, member.hp
        assert together["lr"] == alone["lr"], member.hp
        assert together["momentum"] == alone["momentum"], member.hp


def test_a_diverging_member_leaves_alone_and_the_others_train_on():
    calm = [Member(str(i), _hp("sgd", "constant", 0.05), i, 6) for i in range(3)]
    wild = Member("wild", _hp("sgd", "constant", 1e8), 9, 6)
    fit_array(CFG, DATA, [calm[0], wild, *calm[1:]])
    assert wild.result.diverged_on == "train/loss" and wild.result.epochs == wild.result.diverged_at + 1
    assert not math.isfinite(wild.result.final("train/loss"))
    for member in calm:
        alone = _curves(train(CFG.with_overrides(epochs=6), DATA, member.hp, member.seed))
        assert member.result.epochs == 6
        assert max(abs(a - b) for a, b in zip(alone["val/loss"], _curves(member.result)["val/loss"])) < 1e-4


class _Host:
    """Fills each free slot with the next of ``queue`` and keeps who left, in order."""

    def __init__(self, queue: list[Member]) -> None:
        self.queue = queue
        self.left: list[tuple[str, int]] = []

    def boundary(self, members: list[Member], leaving: list[Member], refill: bool) -> list[Member]:
        self.left += [(member.key, member.result.epochs) for member in leaving]
        free = len(leaving) if refill else 0
        taken, self.queue = self.queue[:free], self.queue[free:]
        return taken


def test_members_leave_when_they_end_and_new_ones_take_their_slots():
    """Members of different lengths leave at their own epochs; the host's new members join at
    that epoch boundary and train as they would alone (their LR curve starts at their epoch 0)."""
    first = [Member("a", _hp("adam", "cosine", 0.01), 1, 3), Member("b", _hp("sgd", "one_cycle", 0.1), 2, 7)]
    later = [Member("c", _hp("rmsprop", "step", 0.003), 3, 5), Member("d", _hp("adagrad", "time_decay", 0.05), 4, 2)]
    host = _Host(list(later))
    fit_array(CFG, DATA, first, host)
    # a leaves after 3 epochs, c takes its slot (epochs 3-7 of the fit); b leaves after 7, d takes its slot
    assert host.left == [("a", 3), ("b", 7), ("c", 5), ("d", 2)]
    for member in first + later:
        alone = _curves(train(CFG.with_overrides(epochs=member.epochs), DATA, member.hp, member.seed))
        together = _curves(member.result)
        assert [s for s, _, _ in member.result.history["lr"]] == list(range(member.epochs))
        assert together["lr"] == alone["lr"]
        assert max(abs(a - b) for a, b in zip(alone["val/loss"], together["val/loss"])) < 1e-4


def test_auto_never_picks_an_array_larger_than_memory_or_the_study_allows():
    wide = parse_config(
        {"study": {"name": "wide"}, "model": {"hidden": [4096, 4096]}, "data": {"n_samples": 20000, "n_features": 200}},
        "wide.toml",
    )
    data = load_data(wide.data)
    assert member_bytes(wide, data) > 100 * 2**20  # two 4096-wide layers and 10,000 validation rows
    assert largest_array(wide, data) <= 5
    assert largest_array(CFG, DATA) == 256
    assert choose_array_size(CFG, DATA, trials=3) <= 3  # never more members than the study's trials
    assert choose_array_size(CFG, DATA, trials=64) in (4, 8, 16, 32, 64)


def test_a_learning_sampler_starts_small_and_grows_with_what_it_has_learnt():
    # TPE proposes each member knowing none of its array's running trials: 8 first, then a
    # quarter of the trials finished once that is more, up to the fastest size.
    assert [array_target("tpe", 32, finished) for finished in (0, 31, 40, 80, 200)] == [8, 8, 10, 20, 32]
    assert array_target("tpe", 4, 0) == 4
    assert array_target("random", 32, 0) == array_target("qmc", 32, 0) == 32  # they learn nothing


def test_runs_summary_says_how_many_trials_trained_together_and_why():
    from lrsearch.cli.output import array_line
    from lrsearch.service.session import ArrayUse

    grown = ArrayUse("auto", 16, 8, 8)
    grown.saw(12)
    grown.saw(5)  # the study's last trials
    assert array_line(grown, "tpe") == (
        "trials trained together: 8, growing to 12, at a time (auto: arrays of 16 train fastest a trial on this "
        "machine; tpe learns from finished trials, so its arrays start at 8 and grow to 1/4 of the finished trials)"
    )
    assert array_line(ArrayUse("auto", 16, 16, 16), "random") == (
        "trials trained together: 16 at a time (auto: arrays of 16 train fastest a trial on this machine)"
    )
    assert array_line(ArrayUse(64, 5, 5, 5), "tpe") == (
        "trials trained together: 5 at a time (array 64 asked for; memory allows 5)"
    )
    assert array_line(ArrayUse(4, 4, 4, 4, device="cuda:0"), "tpe") == (
        "trials trained together: 4 at a time on cuda:0 (array 4 asked for)"
    )


ARRAY_STUDY = """\
[study]
name = "tiny"
direction = "maximize"
metric = "val/acc"
sampler = "grid"
seed = 5
pruner = "median"
prune_every = 1

[train]
epochs = 6
batch_size = 64

[params]
optimizer = { choices = ["sgd", "adam"] }
lr = { choices = [1e6, 0.05, 0.01, 0.003] }
momentum = 0.9
"""


def test_a_study_run_in_arrays_records_every_trial_as_alone(write_study, cli, tmp_path):
    """8 grid trials in arrays of 3 (refilled as trials end): each has its own Optuna trial,
    child run (params, per-epoch metrics, LR curve, state, note) and row in the SQL views (with
    the array it trained in);
    the diverging ones end PRUNED with their reason, the parent run says which size ran."""
    done = cli("run", str(write_study(ARRAY_STUDY)), "--array", "3", "--no-report")
    assert done.returncode == 0, done.stderr
    data = tmp_path / "lrsearch-data"
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{data / 'optuna.db'}").trials
    client = MlflowClient(f"sqlite:///{data / 'mlflow.db'}")
    assert len(trials) == 8 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    diverged = [t for t in trials if t.params["lr"] == 1e6 and t.params["optimizer"] == "sgd"]  # Adam's steps stay ~lr
    assert len(diverged) == 1 and all(
        t.state.name == "PRUNED" and t.user_attrs["reason"].startswith("non-finite") for t in diverged
    )
    runs = {
        r.data.tags["trial_number"]: r
        for r in client.search_runs(
            [client.get_experiment_by_name("tiny").experiment_id], "tags.`lrsearch.role` = 'trial'"
        )
    }
    assert sorted(runs) == sorted(str(t.number) for t in trials)
    for t in trials:
        run = runs[str(t.number)]
        epochs = t.user_attrs["epochs_trained"]
        assert run.info.status == ("FINISHED" if t.state.name == "COMPLETE" else "KILLED")
        assert run.data.tags["state"] == t.state.name and float(run.data.params["lr"]) == t.params["lr"]
        for key in ("val/acc", "val/loss", "train/loss", "lr", "momentum"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(epochs)), (t.number, key)
        assert [m.value for m in client.get_metric_history(run.info.run_id, "lr")] == [t.params["lr"]] * epochs
        assert run.data.tags["mlflow.note.content"].startswith(t.state.name)
    parent = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], "tags.`lrsearch.role` = 'study'"
    )[0]
    assert parent.data.tags["array"] == "3" and parent.data.tags["array.size"] == "3"
    # One worker, one fit, its slots refilled: every trial trained in the same array.
    (array_id,) = {t.user_attrs["array_id"] for t in trials}
    assert re.fullmatch(r"[0-9a-f]{12}", array_id)
    rows = json.loads(
        cli(
            "sql",
            "SELECT trial_number, state, mlflow_status, array_id FROM trials WHERE study_name = 'tiny'",
            "--format",
            "json",
        ).stdout
    )
    assert sorted((r["trial_number"], r["state"], r["mlflow_status"], r["array_id"]) for r in rows) == sorted(
        (t.number, t.state.name, runs[str(t.number)].info.status, array_id) for t in trials
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_an_array_stopped_or_killed_leaves_nothing_running(write_study, tmp_path, sig):
    """Three trials in one array. Ctrl-C: each ends at the epoch boundary, FAIL and queued
    again, its run KILLED. SIGKILL: the rerun fails the three (no heartbeat), queues them
    again and completes them: every trial accounted for, no run left RUNNING."""
    import signal

    from conftest import TINY_STUDY
    from test_signals import _runs, _start, _trials, _wait_running

    study = write_study(TINY_STUDY.replace("epochs = 3", "epochs = 1500"))
    proc = _start(tmp_path, study, "--array", "3")
    _wait_running(tmp_path, proc, 3)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=120)
    if sig == "SIGINT":
        assert proc.returncode == 130, err
        trials = _trials(tmp_path)
        assert [t.state.name for t in trials] == ["FAIL"] * 3 + ["WAITING"] * 3
        assert all(t.user_attrs["reason"].startswith("interrupted at epoch ") for t in trials[:3])
        assert sorted(t.system_attrs["failed_trial"] for t in trials[3:]) == [0, 1, 2]
        assert sorted(r.info.status for r in _runs(tmp_path)) == ["KILLED"] * 4  # the study's and three trials'
        return
    again = _start(tmp_path, study, "--array", "3")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    trials = _trials(tmp_path)
    summary = [(t.number, t.state.name, t.user_attrs.get("reason"), t.system_attrs.get("failed_trial")) for t in trials]
    assert [t.state.name for t in trials] == ["FAIL"] * 3 + ["COMPLETE"] * 3, summary
    assert all(t.user_attrs["reason"].startswith("worker lost") for t in trials[:3]), summary
    assert sorted(t.system_attrs["failed_trial"] for t in trials[3:]) == [0, 1, 2]
    assert [r.info.run_name for r in _runs(tmp_path) if r.info.status == "RUNNING"] == [], summary


@pytest.mark.slow
@pytest.mark.parametrize(
    "moment", ["claimed", "joined", "fit", "batch", "epoch", "boundary", "told", "refilled", "trained"]
)
def test_a_sigterm_at_any_step_of_an_arrays_start_and_end_is_recorded_as_at_an_epoch_boundary(
    write_study, tmp_path, moment
):
    """Four trials, arrays of two (refilled once at the epoch boundary where the first two end),
    SIGTERM at one step of the array's life (core/faults.py): `run` exits 143 in one line;
    nothing is left RUNNING in Optuna or MLflow; each trial it stopped is FAIL and queued
    again; the same command then completes the study."""
    import os
    import subprocess
    import sys

    from conftest import TINY_STUDY
    from test_signals import _runs, _trials

    study = write_study(TINY_STUDY.replace("trials = 3", "trials = 4").replace("epochs = 3", "epochs = 4"))
    env = {**os.environ, "LRSEARCH_DATA": str(tmp_path / "data")}
    command = [sys.executable, "-m", "lrsearch.cli", "run", str(study), "--no-report", "--array", "2"]
    stopped = subprocess.run(
        command, cwd=tmp_path, env={**env, "LRSEARCH_SIGNAL_AT": moment}, capture_output=True, text=True, timeout=300
    )
    trials = _trials(tmp_path)
    seen = [(t.number, t.state.name, t.user_attrs.get("reason")) for t in trials]
    assert stopped.returncode == 143, (stopped.stderr, seen)
    assert stopped.stderr.splitlines()[-1] == (
        "lrsearch: error: interrupted by SIGTERM; run the same command again to resume the study"
    ), stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert all(t.state.name != "RUNNING" for t in trials), seen
    assert all(r.info.status != "RUNNING" for r in _runs(tmp_path)), seen
    interrupted = [t for t in trials if t.state.name == "FAIL"]
    assert all(t.user_attrs["reason"].startswith("interrupted") for t in interrupted), seen
    queued = sorted(t.system_attrs["failed_trial"] for t in trials if t.state.name == "WAITING")
    assert queued == [t.number for t in interrupted], seen
    if moment in ("claimed", "joined", "fit", "batch", "epoch"):
        assert len(interrupted) == 2, seen  # the first array's two, stopped before they ended
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    states = [t.state.name for t in _trials(tmp_path)]
    assert states.count("COMPLETE") == 4 and "RUNNING" not in states and "WAITING" not in states, states
    assert all(r.info.status in ("FINISHED", "KILLED") for r in _runs(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_service_worker_trains_a_submitted_study_in_arrays(store, tmp_path, request):
    """The file-less service worker, `--array 3`, on a submitted 7-trial study: every trial
    done, each with its own complete run, the parent run saying which size ran (and the
    study file's own `array`, 1, is the worker's to override)."""
    from test_service import _cfg, _parent, _submitted, _trials, _wait, _worker

    cfg = _cfg("arr", 7, 4)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, array=1))
    stores = _submitted(cfg, store, tmp_path, request)
    worker = _worker(*stores, 3, array=3)
    row = _wait(stores, "arr", lambda r: r["state"] == "done", [worker])
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    assert (row["complete"] + row["pruned"], row["fail"], row["running"]) == (7, 0, 0)
    client, parent, runs = _parent(stores[1], "arr")
    runs = [r for r in runs if r.data.tags["lrsearch.role"] == "trial"]
    assert parent.data.tags["array"] == "3" and parent.data.tags["array.size"] == "3"
    trials = {str(t.number): t for t in _trials(stores[0], "arr")}
    assert sorted(r.data.tags["trial_number"] for r in runs) == sorted(trials)
    for run in runs:
        trial = trials[run.data.tags["trial_number"]]
        assert run.data.tags["state"] == trial.state.name and run.info.status in ("FINISHED", "KILLED")
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "lr")]
        assert sorted(steps) == list(range(trial.user_attrs["epochs_trained"]))


@ASKS_AS_ANOTHER_CLIENT
def test_the_sampling_window_reads_what_the_database_holds(stores):
    """While an array's new trials are sampled, the study is read once and each write goes
    into that copy too: every read in the window equals a fresh read of the database."""
    from lrsearch.store.storage import open_storage

    store = open_storage(stores[0])
    study = optuna.create_study(
        storage=store,
        study_name="window",
        sampler=optuna.samplers.TPESampler(seed=1, constant_liar=True, multivariate=True),
    )
    for _ in range(3):
        study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), 0.5)
    trials = [study.ask() for _ in range(3)]  # RUNNING, as an array's claim leaves them
    with store.sampling():
        before = store.get_all_trials(study._study_id)
        for i, trial in enumerate(trials):
            trial.suggest_float("x", 0, 1)
            trial.suggest_categorical("opt", ["sgd", "adam"])
            store.set_trial_system_attr(trial._trial_id, f"mark:{i}", i)
            seen = store.get_all_trials(study._study_id, deepcopy=False)
            store._window_thread = None  # read the database itself, for comparison
            fresh = store.get_all_trials(study._study_id)
            store._window_thread = __import__("threading").get_ident()
            assert [(t.number, t.state, t.params, t.distributions, t.system_attrs) for t in seen] == [
                (t.number, t.state, t.params, t.distributions, t.system_attrs) for t in fresh
            ]
    assert [t.params for t in before[3:]] == [{}, {}, {}]  # the copy is the window's own
    assert all(t.params.keys() == {"x", "opt"} for t in store.get_all_trials(study._study_id)[3:])


def test_a_seeded_study_in_arrays_gives_the_same_trials_twice(stores, tmp_path):
    """One worker, a seed: the same trials and values, run after run (the pruning checks see
    the study as it stands at their epoch boundary, whatever the helper thread's timing)."""
    from lrsearch.service.launch import run_study

    cfg = parse_config(
        {
            "study": {"name": "same", "trials": 12, "seed": 3, "prune_every": 1},
            "train": {"epochs": 6, "array": 4},
            "params": {"optimizer": {"choices": ["sgd", "adam"]}, "lr": {"low": 1e-3, "high": 0.3, "log": True}},
        },
        "same.toml",
    )
    results = []
    for i in range(2):
        storage, tracking = (f"sqlite:///{tmp_path / f'optuna{i}.db'}", f"sqlite:///{tmp_path / f'mlflow{i}.db'}")
        study = run_study(cfg, storage=storage, tracking=tracking).study
        results.append([(t.number, t.state.name, t.params, t.value, t.intermediate_values) for t in study.trials])
    assert results[0] == results[1]
    assert {state for _, state, _, _, _ in results[0]} >= {"COMPLETE"}
