"""The CLI through a subprocess, as a user runs it: exit codes, one-line messages, outputs."""

from __future__ import annotations

import json

BAD_STUDY = '[study]\nname = "x"\n[params]\nlr = { low = 1.0, high = 0.1 }\n'


def _one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.returncode == 0
    for command in ("run", "worker", "server", "best", "validate", "ui"):
        assert command in result.stdout


def test_validate(cli, write_study, tmp_path):
    good = cli("validate", str(write_study()))
    assert good.returncode == 0 and "ok" in good.stdout
    bad = cli("validate", str(write_study(BAD_STUDY, "bad.toml")))
    assert bad.returncode == 2
    message = _one_line_error(bad.stderr)
    assert message == f"lrsearch: error: {tmp_path / 'bad.toml'}: [params].lr: expected low <= high, got low=1.0, high=0.1"


def test_bad_input_creates_nothing(cli, write_study, tmp_path):
    bad = cli("run", str(write_study('[study]\nname = "x"\ntrails = 3\n', "typo.toml")))
    assert bad.returncode == 2
    assert "[study].trails: unknown key" in _one_line_error(bad.stderr)
    missing = cli("run", "no-such.toml")
    assert missing.returncode == 2 and "no-such.toml: no such file" in _one_line_error(missing.stderr)
    assert not (tmp_path / "lrsearch-data").exists()


def test_bad_options_exit_2(cli, write_study):
    assert cli("run", str(write_study()), "--trials", "0").returncode == 2
    bad_url = cli("run", str(write_study()), "--storage", "nosuchdb://x", "--tracking-uri", "sqlite:///m.db")
    assert bad_url.returncode == 2 and "bad storage URL nosuchdb://x" in _one_line_error(bad_url.stderr)


def test_unreachable_tracking_server_fails_before_any_trial(cli, write_study, tmp_path):
    result = cli("run", str(write_study()), "--tracking-uri", "http://127.0.0.1:9")
    assert result.returncode == 1
    message = _one_line_error(result.stderr)
    assert message.startswith("lrsearch: error: cannot reach MLflow tracking at http://127.0.0.1:9: ")
    assert "Failed to convert" not in message and "Connection refused" in message or "Max retries" in message
    assert not (tmp_path / "lrsearch-data" / "optuna.db").exists()


def test_run_then_best_on_the_embedded_default(cli, write_study, tmp_path):
    run = cli("run", str(write_study()), "--trials", "2", "--epochs", "2")
    assert run.returncode == 0, run.stderr
    assert "study 'tiny': 2 trials (2 COMPLETE), target 2" in run.stdout
    assert "?workflowType=machine_learning" in run.stdout and "2/2" in run.stderr
    assert (tmp_path / "lrsearch-data" / "optuna.db").is_file()
    assert (tmp_path / "lrsearch-data" / "mlflow.db").is_file()

    best = cli("best", "tiny", "--format", "json")
    assert best.returncode == 0, best.stderr
    rows = json.loads(best.stdout)
    assert len(rows) == 2 and rows[0]["value"] >= rows[1]["value"]
    assert set(rows[0]) >= {"number", "value", "state", "params", "mlflow_run_id"}
    assert rows[0]["params"]["schedule"] == "time_decay" and len(rows[0]["mlflow_run_id"]) == 32

    table = cli("best", "tiny", "--top", "1")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:4] == ["rank", "number", "value", "state"]
    assert len(table.stdout.strip().splitlines()) == 2
    csv_out = cli("best", "tiny", "--format", "csv")
    assert csv_out.stdout.splitlines()[0] == ("rank,number,value,state,params,optimizer,lr,momentum,schedule,"
                                              "duration_s,mlflow_run_id,mlflow_status,val_acc,val_loss,train_loss")

    sql = cli("sql", "select optimizer, max(value) as best from best_trials group by optimizer", "--format", "json")
    assert sql.returncode == 0, sql.stderr
    by_optimizer = {r["optimizer"]: r["best"] for r in json.loads(sql.stdout)}
    assert max(by_optimizer.values()) == rows[0]["value"] and set(by_optimizer) <= {"sgd", "adam"}
    refused = cli("sql", "delete from optuna.trials")
    assert refused.returncode == 2
    assert _one_line_error(refused.stderr).startswith("lrsearch: error: lrsearch sql runs read-only queries: ")
    schema = cli("sql", "--schema")
    assert schema.returncode == 0 and schema.stdout.startswith("ATTACH DATABASE ")
    assert "CREATE TEMP VIEW best_trials AS" in schema.stdout

    unknown = cli("best", "nope")
    assert unknown.returncode == 2
    assert _one_line_error(unknown.stderr).endswith("no study named 'nope' in "
                                                    f"sqlite:///{tmp_path / 'lrsearch-data' / 'optuna.db'} (studies: tiny)")


def test_best_without_any_store_exits_2(cli, tmp_path):
    result = cli("best", "tiny")
    assert result.returncode == 2 and "no lrsearch store at" in _one_line_error(result.stderr)
    assert not (tmp_path / "lrsearch-data").exists()


def test_ctrl_c_on_run_with_workers_stops_every_worker_and_resumes(write_study, tmp_path):
    """`run --workers 2` is worker 0 plus one child in its own session: a SIGINT to the
    command reaches the child too, both trials end FAIL/KILLED, and the command resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import optuna
    from mlflow import MlflowClient

    from conftest import TINY_STUDY

    path = write_study(TINY_STUDY.replace("trials = 3", "trials = 4").replace("epochs = 3", "epochs = 20000"))
    env = {**os.environ, "LRSEARCH_DATA": str(tmp_path / "data")}
    command = [sys.executable, "-m", "lrsearch.cli", "run", str(path), "--workers", "2"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    storage = f"sqlite:///{tmp_path / 'data' / 'optuna.db'}"
    deadline = time.monotonic() + 120
    while True:  # both workers inside a trial
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        try:
            trials = optuna.load_study(study_name="tiny", storage=storage).trials
        except Exception:  # not created yet
            trials = []
        if sum(t.state.name == "RUNNING" for t in trials) == 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("lrsearch: error: interrupted by SIGINT; "
                                            "run the same command again to resume the study")
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert sorted((r.data.tags["lrsearch.role"], r.info.status) for r in runs) == [
        ("study", "KILLED"), ("trial", "KILLED"), ("trial", "KILLED")]

    again = subprocess.run([*command[:-2], "--workers", "2", "--epochs", "2"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    states = [t.state.name for t in optuna.load_study(study_name="tiny", storage=storage).trials]
    assert states.count("COMPLETE") == 4 and "RUNNING" not in states
