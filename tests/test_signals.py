"""Processes and signals, as an operator meets them: a `run --workers` command killed outright,
and Ctrl-C pressed twice in any rhythm. Nothing is left RUNNING, nothing outlives its parent,
no retry is stranded."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import TINY_STUDY
from mlflow import MlflowClient

from lrsearch.core.stopping import Interrupted, StopFlag

# Worker processes, servers or a browser: seconds each (python -m pytest -m "not slow" leaves them out).
pytestmark = pytest.mark.slow


def _start(tmp_path: Path, study: Path, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "LRSEARCH_DATA": str(tmp_path / "data"),
        "LRSEARCH_HEARTBEAT_INTERVAL": "1",
        "LRSEARCH_HEARTBEAT_GRACE": "3",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "lrsearch.cli", "run", str(study), "--no-report", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _trials(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'data' / 'optuna.db'}").trials
    except Exception:  # not created yet
        return []


def _wait_until(tmp_path: Path, proc: subprocess.Popen, done) -> None:
    """Until ``done(trials)`` holds for the study's trials, while ``proc`` runs."""
    deadline = time.monotonic() + 120
    while not done(_trials(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)


def _wait_running(tmp_path: Path, proc: subprocess.Popen, n: int) -> None:
    """Until ``n`` trials are training (RUNNING, their hyperparameters sampled)."""
    _wait_until(
        tmp_path,
        proc,
        lambda trials: sum(t.state.name == "RUNNING" and "hyperparameters" in t.user_attrs for t in trials) >= n,
    )


def _runs(tmp_path: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("tiny").experiment_id])


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    return [int(line.split()[0]) for line in out if "lrsearch.cli worker" in line and line.split()[1] == str(pid)]


def test_a_killed_run_command_takes_its_workers_with_it_and_its_retry_runs(write_study, tmp_path):
    # Trials long enough to kill the command inside them, short enough to resume (same file).
    study = write_study(TINY_STUDY.replace("epochs = 3", "epochs = 2000"))
    proc = _start(tmp_path, study, "--workers", "2", "--array", "1")
    _wait_running(tmp_path, proc, 2)
    children = _children_of(proc.pid)
    assert len(children) == 1
    proc.kill()  # SIGKILL: no chance to pass anything on
    proc.communicate()
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in children):
        assert time.monotonic() < deadline, "the child worker outlived its parent"
        time.sleep(0.2)
    # The two trials running when it was killed (one may have finished before, on a loaded
    # machine): the parent's, RUNNING; its child's, interrupted (FAIL) and queued again.
    states = sorted(t.state.name for t in _trials(tmp_path) if t.state.name != "COMPLETE")
    assert states in (["FAIL", "RUNNING", "WAITING"], ["RUNNING"]), [
        (t.state.name, t.user_attrs) for t in _trials(tmp_path)
    ]
    assert all(t.user_attrs["reason"].startswith("interrupted") for t in _trials(tmp_path) if t.state.name == "FAIL")

    again = _start(tmp_path, study, "--workers", "2", "--array", "1")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    trials = _trials(tmp_path)
    summary = [(t.number, t.state.name, t.user_attrs.get("reason"), t.system_attrs.get("failed_trial")) for t in trials]
    assert sorted(t.state.name for t in trials).count("COMPLETE") == 3, (summary, err)
    assert {t.state.name for t in trials} == {"COMPLETE", "FAIL"}, summary  # nothing RUNNING, no retry WAITING
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert sorted(t.user_attrs["reason"].split(":")[0].split(" at ")[0] for t in failed) == (
        ["interrupted", "worker lost"] if len(states) == 3 else ["worker lost"]
    ), summary
    for dead in failed:  # every FAIL trial accounted for: queued again, and run to the end
        retry = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
        assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == dead.params, summary
    assert [r.info.run_name for r in _runs(tmp_path) if r.info.status == "RUNNING"] == [], summary


# Epochs of seconds (batch size 1 on 12,000 training samples): two signals 0.1 s apart
# land inside an epoch, where only the second can end it, unless that worker's epoch happens
# to end between them (the two workers' epochs are not in step), so at least one trial is cut
# short. (Much closer, on a loaded machine, the kernel may still hold the first signal
# pending when the second comes: one signal, not two.)
LONG_EPOCHS = ('pruner = "median"\nprune_every = 1', "batch_size = 1", "\n[data]\nn_samples = 15000\n")


@pytest.mark.parametrize(
    "gap, long_epochs",
    [(None, False), (0.1, True), (0.5, False)],
    ids=["one", "two-inside-an-epoch", "two-half-a-second-apart"],
)
def test_ctrl_c_stops_every_worker_and_leaves_nothing_running(write_study, tmp_path, gap, long_epochs):
    """`run --workers 2` is worker 0 plus one child in its own session: a SIGINT to the
    command reaches the child too. The first ends each trial at its epoch's end; a second
    stops training at once; in any rhythm both trials end FAIL, their runs KILLED."""
    text = TINY_STUDY.replace("epochs = 3", "epochs = 20000")
    if long_epochs:
        prune, batch, data = LONG_EPOCHS
        text = text.replace('pruner = "none"', prune).replace("batch_size = 64", batch) + data
    proc = _start(tmp_path, write_study(text), "--workers", "2", "--array", "1")
    _wait_running(tmp_path, proc, 2)
    if long_epochs:  # both past epoch 0
        _wait_until(tmp_path, proc, lambda trials: all(t.intermediate_values for t in trials))
    proc.send_signal(signal.SIGINT)
    if gap is not None:
        time.sleep(gap)
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        "lrsearch: error: interrupted by SIGINT; run the same command again to resume the study"
    )
    assert "Traceback" not in err and "UnboundLocalError" not in err
    trials = _trials(tmp_path)
    # both interrupted, and queued again (WAITING) for the run that resumes the study
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "WAITING", "WAITING"]
    assert sorted(t.system_attrs["failed_trial"] for t in trials[2:]) == [0, 1]
    assert [t.params for t in trials[2:]] == [trials[t.system_attrs["failed_trial"]].params for t in trials[2:]]
    trials = trials[:2]
    reasons = [t.user_attrs["reason"] for t in trials]
    if gap is None:  # the epoch each trial was in ended first
        assert all(r.startswith("interrupted at epoch ") for r in reasons), reasons
    elif long_epochs:  # the second signal cut the epoch short: one signal alone says "at epoch N"
        assert "interrupted" in reasons and all(r.startswith("interrupted") for r in reasons), reasons
    else:  # the second lands where it may: in an epoch, or while the trial's end is recorded
        assert all(r.startswith("interrupted") for r in reasons), reasons
    assert sorted((r.data.tags["lrsearch.role"], r.info.status) for r in _runs(tmp_path)) == [
        ("study", "KILLED"),
        ("trial", "KILLED"),
        ("trial", "KILLED"),
    ]
    # status says interrupted (resumable), and why, until a worker takes the study up again
    from lrsearch.service.queue import status

    row = status(
        storage=f"sqlite:///{tmp_path / 'data' / 'optuna.db'}", tracking=f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}"
    )[0]
    assert (row["state"], row["running"], row["workers"]) == ("interrupted", 0, 0)
    assert re.fullmatch(r"stopped by SIGINT at 20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", row["reason"]), row


def test_a_second_signal_inside_a_finalizer_prints_no_traceback(monkeypatch):
    # The second Ctrl-C raises where the main thread is; inside a weakref callback Python
    # cannot raise it and would print "Exception ignored … Traceback": lrsearch's hook drops
    # it (the first signal's flag stops the trial at its next epoch), and passes on the rest.
    import gc
    import weakref

    from lrsearch.core.stopping import Interrupted, StopFlag

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(type(u.exc_value).__name__))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # leave pytest's own handlers alone
    StopFlag().install()

    class Thing:
        pass

    def interrupted(_):
        raise Interrupted(signal.SIGINT)

    def broken(_):
        raise ValueError("a real bug")

    refs = []  # a weakref calls back only while it is alive itself
    for callback in (interrupted, broken):
        thing = Thing()
        refs.append(weakref.ref(thing, callback))
        del thing
        gc.collect()
    assert seen == ["ValueError"]


def test_ctrl_c_ends_a_status_watch_quietly(write_study, tmp_path, cli):
    """Ctrl-C is the only way out of `status --watch` on a study that is not done: it ends the
    watch with exit 0 and nothing on stderr, not as an interrupted command (130)."""
    from conftest import server_study

    assert cli("submit", str(write_study(server_study("watched", 2, 2)))).returncode == 0  # queued: never done
    env = {k: v for k, v in os.environ.items() if k not in ("LRSEARCH_STORAGE", "MLFLOW_TRACKING_URI", "LRSEARCH_DATA")}
    watch = subprocess.Popen(
        [sys.executable, "-m", "lrsearch.cli", "status", "--watch", "--interval", "0.2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = watch.stdout.readline()  # the table's header: the watch is in its loop
        assert first.startswith("name "), (first, watch.poll())
        assert watch.stdout.readline().split()[:2] == ["watched", "queued"]
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=60)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, err
    assert err == ""


def test_a_second_signal_a_finalizer_swallowed_still_stops_training():
    """Python drops an exception raised inside a finalizer: the second signal's own would be
    lost there, and training would go on to the epoch's end. It is sent again instead."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook
    flag = StopFlag()
    flag.install()

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the second signal, handled in here
            for _ in range(1000):  # bytecodes for the handler to run between
                pass

    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: only sets the flag
        assert flag.requested
        with pytest.raises(Interrupted):
            with flag.interruptible():
                Finalized()  # dropped at once: __del__ runs, its exception goes to the hook
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:  # training
                    pass
                raise AssertionError("training went on past the second signal")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = hook


def test_a_second_signal_waits_for_a_shielded_part_then_stops_at_once():
    """An array records a trial's end while its other trials train: a second signal then
    must not cut the record in half (a trial told but not queued again); it is raised as
    soon as the record is made."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook
    flag = StopFlag()
    flag.install()
    recorded = []
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: only sets the flag
        with pytest.raises(Interrupted):
            with flag.interruptible():
                with flag.shielded():
                    os.kill(os.getpid(), signal.SIGINT)  # the second, while the record is made
                    for _ in range(1000):
                        pass
                    recorded.append("told")
                    recorded.append("queued again")
                recorded.append("trained on")  # not reached: raised as the shielded part ended
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = hook
    assert recorded == ["told", "queued again"]
