"""The CLI as a user runs it: exit codes, one-line messages, outputs (its `main`, in this
process; the program itself where a process matters)."""

from __future__ import annotations

import json
import os
import re

import pytest

BAD_STUDY = '[study]\nname = "x"\n[params]\nlr = { low = 1.0, high = 0.1 }\n'


def _one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_help_lists_the_commands(cli_process):  # the program itself, as `python -m lrsearch.cli`
    result = cli_process("--help")
    assert result.returncode == 0
    for command in ("run", "worker", "server", "best", "validate", "ui"):
        assert command in result.stdout


def test_validate(cli, write_study, tmp_path):
    good = cli("validate", str(write_study()))
    assert good.returncode == 0 and "ok" in good.stdout
    bad = cli("validate", str(write_study(BAD_STUDY, "bad.toml")))
    assert bad.returncode == 2
    message = _one_line_error(bad.stderr)
    assert (
        message == f"lrsearch: error: {tmp_path / 'bad.toml'}: [params].lr: expected low <= high, got low=1.0, high=0.1"
    )


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
    assert message == "lrsearch: error: cannot reach MLflow tracking at http://127.0.0.1:9: connection refused"
    assert not (tmp_path / "lrsearch-data" / "optuna.db").exists()


def test_run_then_best_on_the_embedded_default(cli, write_study, tmp_path):
    run = cli("run", str(write_study()), "--trials", "2", "--epochs", "2")
    assert run.returncode == 0, run.stderr
    assert "study 'tiny': 2 trials (2 COMPLETE), target 2" in run.stdout
    assert "2/2" in run.stderr
    [row] = json.loads(cli("status", "--format", "json").stdout)
    assert row["state"] == "done" and row["created"] and "submitted" not in row  # nobody submitted it
    lines = run.stdout.splitlines()
    links = lines[lines.index(next(line for line in lines if line.startswith("MLflow: "))) :]
    assert re.fullmatch(
        r"MLflow: http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]{32}\?workflowType="
        r"machine_learning  \(the study: outcome, top trials, figures\)",
        links[0],
    )
    assert re.fullmatch(
        r" {8}http://127\.0\.0\.1:5000/#/experiments/\d+/runs\?viewStateShareKey=lrsearch-trials"
        r"&workflowType=machine_learning  \(its trials, best first\)",
        links[1],
    )
    assert links[2] == "        (served by `lrsearch ui`, on its default port 5000; with --port P, use port P)"
    assert (tmp_path / "lrsearch-data" / "optuna.db").is_file()
    assert (tmp_path / "lrsearch-data" / "mlflow.db").is_file()

    best = cli("best", "tiny", "--format", "json")
    assert best.returncode == 0, best.stderr
    rows = json.loads(best.stdout)
    assert len(rows) == 2 and rows[0]["value"] >= rows[1]["value"]
    assert set(rows[0]) >= {"number", "value", "state", "params", "mlflow_run_id"}
    assert rows[0]["params"]["schedule"] == "time_decay" and len(rows[0]["mlflow_run_id"]) == 32
    assert list(rows[0]) == [  # one key a fact: no typed copies of params, the run's id once
        "rank",
        "number",
        "value",
        "state",
        "params",
        "epochs_trained",
        "duration_s",
        "wall_s",
        "mlflow_run_id",
        "mlflow_url",
        "mlflow_status",
        "val_acc",
        "val_loss",
        "train_loss",
        "model",
    ]
    assert rows[0]["mlflow_url"].startswith("http://127.0.0.1:5000/#/experiments/")  # lrsearch ui's
    assert rows[0]["mlflow_url"].split("/runs/")[1].startswith(rows[0]["mlflow_run_id"])
    from lrsearch.results.ranking import load_study

    sampled = {t.number: t.params for t in load_study("tiny", f"sqlite:///{tmp_path}/lrsearch-data/optuna.db").trials}
    assert [r["params"] for r in rows] == [sampled[r["number"]] for r in rows]  # to the last digit

    table = cli("best", "tiny", "--top", "1")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:4] == ["rank", "number", "value", "state"]
    assert len(table.stdout.strip().splitlines()) == 3
    assert table.stdout.splitlines()[2].startswith(f"model: models:/tiny@best (trial {rows[0]['number']};")

    # run's summary and best show the same trials alike: params in sampling order, the run's id
    # (an embedded store: no UI known) where a tracking server would give its page.
    def split(line: str) -> list[str]:
        return re.split(r"\s{2,}", line.strip())

    # (the probe's timing decides: 2 trials at once, or 1 where arrays would not pay)
    assert lines[1] in (
        "trials trained together: 2 at a time on cpu (auto: arrays of 2 train fastest a trial on this machine)",
        "trials trained together: 1 at a time on cpu (auto: larger arrays train no faster a trial here)",
    )
    summary = lines[2 : lines.index(links[0])]
    assert split(summary[0]) == ["number", "value", "state", "params", "duration_s", "wall_s", "mlflow"]
    by_run = [split(line) for line in summary[1:]]
    by_best = [split(line)[1:] for line in cli("best", "tiny").stdout.splitlines()[1:-1]]  # without rank, model
    assert len(by_run) == 2 and by_best == by_run  # durations too: one rounding (results.duration_s)
    assert by_best[0][6] == rows[0]["mlflow_run_id"]
    # Its share of the array's training time beside its wall time (claim to end).
    assert all(float(r[4]) <= float(r[5]) for r in by_run)
    assert by_best[0][3] == " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[0]["params"].items()
    )
    csv_out = cli("best", "tiny", "--format", "csv")
    assert csv_out.stdout.splitlines()[0] == (
        "rank,number,value,state,params,epochs_trained,"
        "duration_s,wall_s,mlflow_run_id,mlflow_url,mlflow_status,val_acc,val_loss,train_loss,model"
    )

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
    assert _one_line_error(unknown.stderr).endswith(
        f"no study named 'nope' in sqlite:///{tmp_path / 'lrsearch-data' / 'optuna.db'} (studies: tiny)"
    )


def test_best_without_any_store_exits_2(cli, tmp_path):
    result = cli("best", "tiny")
    assert result.returncode == 2 and "no lrsearch store at" in _one_line_error(result.stderr)
    assert not (tmp_path / "lrsearch-data").exists()


# -- study files and stores someone else wrote ----------------------------------------------


def test_names_that_would_leave_the_data_folder_are_refused_before_anything_is_created(cli, write_study, tmp_path):
    from conftest import TINY_STUDY

    for name in ("../../x", "/abs/path/x", "x" * 300):
        path = write_study(TINY_STUDY.replace('name = "tiny"', f'name = "{name}"'), "escape.toml")
        result = cli("run", str(path))
        assert result.returncode == 2
        assert "[study].name: expected 1 to 100 letters, digits" in _one_line_error(result.stderr)
    result = cli("run", str(write_study()), "--name", "../x")
    assert result.returncode == 2 and "--name: expected 1 to 100 letters" in _one_line_error(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["escape.toml", "study.toml"]  # nothing else written
    assert not (tmp_path.parent / "x").exists()


def test_a_study_file_in_another_encoding_exits_2_naming_it(cli, tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[study]\nname = "caf\xe9"\n'.encode("latin-1"))
    result = cli("validate", str(path))
    assert result.returncode == 2
    assert _one_line_error(result.stderr) == f"lrsearch: error: {path}: expected UTF-8 text, got byte 0xe9 at offset 19"


def test_values_that_would_crash_or_exhaust_memory_are_refused(cli, write_study):
    cases = {
        "lr = { low = 1e-5, high = inf }": "[params].lr.high: expected a finite number > 0, got inf",
        "lr = inf": "[params].lr: expected a finite number > 0, got inf",
        "[data]\ncluster_std = inf": "[data].cluster_std: expected a finite number > 0, got inf",
        "[data]\nn_samples = 1000000000000": "[data].n_samples: expected an integer in [4, 1000000]",
        "[model]\nhidden = [1000000000]": "[model].hidden: expected a list of 1 to 8 integers in [1, 4096]",
    }
    for text, message in cases.items():
        body = (
            f'[study]\nname = "x"\n[params]\n{text}\n' if not text.startswith("[") else f'[study]\nname = "x"\n{text}\n'
        )
        result = cli("run", str(write_study(body, "big.toml")))
        assert result.returncode == 2, text
        assert message in _one_line_error(result.stderr), result.stderr


def test_another_applications_sqlite_file_is_refused_and_left_unchanged(cli, write_study, tmp_path):
    import hashlib
    import sqlite3

    foreign = tmp_path / "app.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO customers (name) VALUES ('ada')")
    digest = hashlib.sha256(foreign.read_bytes()).hexdigest()
    for flag, kind in (("--storage", "Optuna storage"), ("--tracking-uri", "MLflow tracking store")):
        result = cli("run", str(write_study()), flag, f"sqlite:///{foreign}")
        assert result.returncode == 2
        assert _one_line_error(result.stderr) == (
            f"lrsearch: error: {foreign} holds another application's tables (customers) and no {kind}; "
            f"it was left unchanged: pass another {flag}"
        )
        assert hashlib.sha256(foreign.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "study.toml"]  # no lock file, no store


@pytest.mark.slow
def test_other_files_given_as_stores(cli, write_study, tmp_path):
    import optuna

    junk = tmp_path / "junk.db"
    junk.write_bytes(bytes(range(256)) * 8)
    result = cli("run", str(write_study()), "--storage", f"sqlite:///{junk}")
    assert result.returncode == 2 and "junk.db is not an SQLite database" in _one_line_error(result.stderr)

    empty = tmp_path / "empty.db"  # an empty file is an empty database: it becomes the store
    empty.touch()
    result = cli(
        "run", str(write_study()), "--trials", "1", "--epochs", "1", "--storage", f"sqlite:///{empty}", "--no-report"
    )
    assert result.returncode == 0, result.stderr
    assert "report:" not in result.stdout and not (tmp_path / "reports").exists()  # reports go beside the store

    shared = f"sqlite:///{tmp_path / 'shared.db'}"  # another tool's Optuna study in the same file
    optuna.create_study(storage=shared, study_name="theirs").optimize(lambda t: t.suggest_float("x", 0, 1), 2)
    result = cli("run", str(write_study()), "--trials", "1", "--epochs", "1", "--storage", shared, "--no-report")
    assert result.returncode == 0, result.stderr
    assert len(optuna.load_study(study_name="theirs", storage=shared).trials) == 2

    blocked = tmp_path / "a-file"  # a folder that cannot be made (root may write anywhere else)
    blocked.write_text("")
    result = cli("run", str(write_study()), "--storage", f"sqlite:///{blocked / 'optuna.db'}")
    assert result.returncode == 1
    assert _one_line_error(result.stderr) == f"lrsearch: error: cannot create the folder {blocked}: File exists"


def test_sql_into_a_closed_pipe_ends_quietly(cli, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "LRSEARCH_DATA": str(tmp_path / "data")}
    pipe = subprocess.run(
        f"{sys.executable} -m lrsearch.cli sql --schema | head -1",
        shell=True,
        cwd=tmp_path,
        env={
            **env,
            "LRSEARCH_STORAGE": f"sqlite:///{tmp_path}/o.db",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db",
        },
        capture_output=True,
        text=True,
        timeout=60,
        executable="/bin/bash",
    )
    assert pipe.stdout.startswith("ATTACH DATABASE")
    assert pipe.stderr == ""  # no BrokenPipeError, no "Exception ignored"


def test_an_unreachable_database_is_one_line_without_the_password(cli, write_study):
    result = cli("run", str(write_study()), "--storage", "postgresql+psycopg://me:s3cret@127.0.0.1:5999/db")
    assert result.returncode == 1
    assert _one_line_error(result.stderr) == (
        "lrsearch: error: cannot connect to postgresql+psycopg://me:***@127.0.0.1:5999/db: connection refused"
    )


def test_credentials_in_a_tracking_uri_are_hidden(cli, write_study):
    result = cli("run", str(write_study()), "--tracking-uri", "http://bob:tr4ck-s3cret@127.0.0.1:9")
    assert result.returncode == 1
    line = _one_line_error(result.stderr)
    assert line.startswith("lrsearch: error: cannot reach MLflow tracking at http://bob:***@127.0.0.1:9: ")
    assert "tr4ck-s3cret" not in result.stderr + result.stdout


def test_a_long_name_is_echoed_cut_short(cli, write_study):
    """A value the user gave comes back in a message at a readable length, not whole."""
    assert cli("run", str(write_study()), "--trials", "1", "--epochs", "1", "--no-report").returncode == 0
    name = "n" * 1500
    for args in (
        ("status", name),
        ("cancel", name),
        ("best", name),
        ("report", name),
        ("run", str(write_study()), "--name", name),
    ):
        result = cli(*args)
        line = _one_line_error(result.stderr)
        assert result.returncode == 2 and len(line) < 250, (args, len(line))
        assert "'" + "n" * 58 + "…" in line and "n" * 59 not in line, line


def test_the_progress_bar_counts_each_trial_once_when_an_array_ends_together():
    # An array's trials are told together, then the callbacks run one by one: the first one
    # reads the store (which already has all four), the others must not count theirs again.
    import optuna

    from lrsearch.cli.output import Progress

    study = optuna.create_study(direction="maximize")
    trials = [study.ask() for _ in range(4)]
    for i, t in enumerate(trials):
        study.tell(t, 0.5 + i / 10 if i != 2 else None, state=optuna.trial.TrialState.PRUNED if i == 2 else None)
    bar = Progress("p")
    bar.start(total=10, done=0)
    shown = []
    for frozen in study.trials:
        bar(study, frozen)
        shown.append(bar.bar.n)
    assert shown == [4, 4, 4, 4]
    assert bar.bar.postfix == "best 0.8 (trial 3)"
    bar.__exit__(None, None, None)
