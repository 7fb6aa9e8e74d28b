"""The study's model: the best trial's network registered in MLflow's Model Registry at the
study's end (a new version only for a new best trial), loaded in a fresh process and served
by `mlflow models serve`, predicting a CSV file's own labels from its raw rows; and the
data each run learned from, recorded as MLflow datasets. On SQLite and on PostgreSQL
through `lrsearch server`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, stop_process_group, wait_for_http
from mlflow import MlflowClient

from lrsearch.choices import data as data_module
from lrsearch.config import load_config

LABELS = {0: "setosa", 1: "versicolor", 2: "virginica"}
STUDY = """\
[study]
name = "{name}"
trials = 3
seed = 5
sampler = "random"
pruner = "none"

[data]
source = "csv"
path = "flowers.csv"
label = "species"
val_fraction = 0.25

[train]
epochs = 6
batch_size = 32
array = 3  # the three trials in one fit: each trial's network is its slice of the stacked weights

[params]
optimizer = "adam"
lr = {{ low = 3e-3, high = 3e-2, log = true }}
"""
# Predicts a CSV file's rows with a registered model, in a process of its own: argv is the
# tracking URI, the model URI, the CSV file; prints the labels as JSON.
LOAD = """\
import json, sys
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
out = model.predict(pd.read_csv(sys.argv[3]))
print(json.dumps({"labels": out["label"].tolist(), "columns": list(out.columns)}))
"""


def _flowers(folder: Path, name: str = "flowers") -> Path:
    """A CSV of three classes whose columns differ in scale by 1000x (unscaled, an MLP
    learns little of it), labels as words; and its study file."""
    from sklearn.datasets import make_blobs

    x, y = make_blobs(n_samples=400, centers=3, n_features=4, cluster_std=1.5, random_state=3)
    x = x * [1, 10, 100, 1000] + [0, 5, 50, 500]
    rows = ["sepal,petal,stem,root,species"] + [
        ",".join([*(f"{v:.6g}" for v in row), LABELS[int(c)]]) for row, c in zip(x, y)
    ]
    (folder / "flowers.csv").write_text("\n".join(rows) + "\n")
    path = folder / f"{name}.toml"
    path.write_text(STUDY.format(name=name))
    return path


def _validation_rows(study_file: Path) -> tuple[list[str], np.ndarray]:
    """The raw CSV lines of the study's validation rows, and their labels."""
    cfg = load_config(study_file)
    lines = cfg.data.path.read_text().splitlines()
    val = data_module._split(cfg.data).val
    return [lines[0], *(lines[i + 1] for i in val)], np.array([lines[i + 1].rsplit(",", 1)[1] for i in val])


def _predict_elsewhere(tracking: str, model: str, csv: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, tracking, model, str(csv)],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def _serve(tracking: str, model: str, csv: Path, folder: Path) -> list:
    """POST the CSV's rows to `mlflow models serve -m MODEL` (as MLflow's docs run it, with
    the environment it runs in) and return its predictions."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # its uvicorn
    log = open(folder / "serve.log", "w+b")
    server = subprocess.Popen(
        [
            Path(sys.executable).with_name("mlflow"),
            "models",
            "serve",
            "-m",
            model,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=folder,
        start_new_session=True,
    )
    server.stderr = log
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server)
        import pandas as pd

        frame = pd.read_csv(csv)
        body = json.dumps({"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["predictions"]
    finally:
        stop_process_group(server)


def _accuracy(labels, truth: np.ndarray) -> float:
    return float(np.mean(np.array(labels) == truth))


def _check_records(client: MlflowClient, name: str, study) -> tuple[str, dict]:
    """The registry, the runs' datasets and network files as a finished study leaves them;
    returns the best trial's run id and the version."""
    best = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: (t.value, -t.number))
    run_id = best.user_attrs["mlflow_run_id"]
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1
    version = client.get_model_version_by_alias(name, "best")
    assert str(version.version) == str(versions[0].version) == "1"
    assert version.run_id == run_id
    assert {k: version.tags[k] for k in ("lrsearch.study", "lrsearch.trial", "lrsearch.run_id")} == {
        "lrsearch.study": name,
        "lrsearch.trial": str(best.number),
        "lrsearch.run_id": run_id,
    }
    assert float(version.tags["lrsearch.value"]) == best.value
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert (  # linked to its page: one click from the study's run
        f"Model: [`models:/{name}@best`](#/models/{name}/versions/1) (version 1, trial {best.number})"
        in parent.data.tags["mlflow.note.content"]
    )
    assert study.user_attrs["lrsearch_model"] == {
        "name": name,
        "version": "1",
        "trial": best.number,
        "run_id": run_id,
        "uri": f"models:/{name}@best",
    }
    for run_id_ in [parent.info.run_id, *(t.user_attrs["mlflow_run_id"] for t in study.trials)]:
        inputs = client.get_run(run_id_).inputs.dataset_inputs
        seen = {(i.tags[0].value, i.dataset.name, json.loads(i.dataset.profile)["num_rows"]) for i in inputs}
        assert seen == {("training", "flowers.csv", 300), ("validation", "flowers.csv", 100)}, run_id_
        assert json.loads(inputs[0].dataset.schema)["mlflow_colspec"][-1]["name"] == "species"
    for t in study.trials:  # every trial keeps its network, a few kilobytes
        files = {f.path: f.file_size for f in client.list_artifacts(t.user_attrs["mlflow_run_id"])}
        assert 0 < files["network.pt"] < 20_000, files
    return run_id, best


def test_a_study_ends_with_its_best_network_registered_which_predicts_the_csv_labels(cli, tmp_path):
    study_file = _flowers(tmp_path)
    result = cli("run", str(study_file), "--no-report")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    tracking = f"sqlite:///{tmp_path / 'lrsearch-data' / 'mlflow.db'}"
    import optuna

    study = optuna.load_study(study_name="flowers", storage=f"sqlite:///{tmp_path / 'lrsearch-data' / 'optuna.db'}")
    client = MlflowClient(tracking, registry_uri=tracking)
    run_id, best = _check_records(client, "flowers", study)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()  # only the data folder
    assert f"model: models:/flowers@best (version 1: trial {best.number};" in result.stdout
    params = client.get_run(study.user_attrs["mlflow_parent_run_id"]).data.params
    assert params["data.label"] == "species" and params["data.scale"] == "standard"
    assert "data.n_samples" not in params and "data.centers" not in params  # make_blobs' keys: not a CSV's

    shown = cli("best", "flowers", "--format", "json")
    rows = json.loads(shown.stdout)
    assert [r["model"] for r in rows] == [
        "models:/flowers@best" if r["mlflow_run_id"] == run_id else None for r in rows
    ]
    table = cli("best", "flowers").stdout.splitlines()
    assert table[-1].startswith(f"model: models:/flowers@best (trial {best.number};")
    again = cli("best", "flowers", "--register", "--top", "1")
    assert again.returncode == 0, again.stderr
    assert (
        again.stdout.splitlines()[0] == f"model: models:/flowers@best (version 1: trial {best.number}; "
        "already registered)"
    )
    assert len(client.search_model_versions("name = 'flowers'")) == 1

    # Raw rows in, the CSV's own labels out: on the validation rows, exactly the trial's val/acc.
    lines, truth = _validation_rows(study_file)
    (tmp_path / "val.csv").write_text("\n".join(lines) + "\n")
    loaded = _predict_elsewhere(tracking, "models:/flowers@best", tmp_path / "val.csv")
    assert loaded["columns"] == ["label", "proba_setosa", "proba_versicolor", "proba_virginica"]
    assert set(loaded["labels"]) <= set(LABELS.values())
    assert _accuracy(loaded["labels"], truth) == pytest.approx(best.value, abs=1e-9)


def test_a_new_best_trial_makes_a_new_version_and_moves_the_alias(cli, tmp_path):
    from lrsearch.track.models import Candidate, log_model, register_version
    from lrsearch.track.tracking import Tracker

    study_file = _flowers(tmp_path, "moving")
    assert cli("run", str(study_file), "--no-report").returncode == 0
    tracking = f"sqlite:///{tmp_path / 'lrsearch-data' / 'mlflow.db'}"
    import optuna

    storage = f"sqlite:///{tmp_path / 'lrsearch-data' / 'optuna.db'}"
    study = optuna.load_study(study_name="moving", storage=storage)
    tracker = Tracker(tracking)
    best = tracker.client.get_model_version_by_alias("moving", "best")
    experiment_id = study.user_attrs["mlflow_experiment_id"]
    same = Candidate(int(best.tags["lrsearch.trial"]), best.run_id, "val/acc", float(best.tags["lrsearch.value"]))
    logged = [o.model_id for o in tracker.client.get_run(best.run_id).outputs.model_outputs]
    assert [log_model(tracker, experiment_id, "moving", same)] == logged  # the one already logged
    again = register_version(tracker, "moving", logged[0], same)
    assert (again.version, again.new) == ("1", False)
    other = next(t for t in study.trials if t.user_attrs["mlflow_run_id"] != best.run_id)
    candidate = Candidate(other.number, other.user_attrs["mlflow_run_id"], "val/acc", other.value)
    moved = register_version(tracker, "moving", log_model(tracker, experiment_id, "moving", candidate), candidate)
    assert (moved.version, moved.new) == ("2", True)
    assert str(tracker.client.get_model_version_by_alias("moving", "best").version) == "2"
    assert len(tracker.client.search_model_versions("name = 'moving'")) == 2

    # The study resumed with more trials: its end registers its best trial, a new version only
    # if that trial changed (here the alias points at trial `other`, not the best: it moves back).
    result = cli("run", str(study_file), "--no-report", "--trials", "5")
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    study = optuna.load_study(study_name="moving", storage=storage)
    top = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: (t.value, -t.number))
    aliased = tracker.client.get_model_version_by_alias("moving", "best")
    assert aliased.run_id == top.user_attrs["mlflow_run_id"]
    versions = tracker.client.search_model_versions("name = 'moving'")
    assert len(versions) == (2 if top.user_attrs["mlflow_run_id"] == best.run_id else 3)
    assert study.user_attrs["lrsearch_model"]["version"] == str(aliased.version)
    shown = cli("best", "moving", "--register", "--format", "json")
    assert json.loads(shown.stdout)[0]["model"] == "models:/moving@best"  # JSON stays JSON
    assert shown.stderr.startswith("model: models:/moving@best (version ")


def test_every_trial_of_an_array_keeps_its_own_network(cli, tmp_path):
    """Five trials of two optimizers in arrays of two, pruned or not: each trial's network.pt
    (its slice of the stacked weights when it left) predicts its own final val/acc exactly."""
    import types

    import optuna
    import pandas as pd

    from lrsearch.track.served_model import StudyNetwork

    study_file = _flowers(tmp_path, "slices")
    text = study_file.read_text().replace("trials = 3", "trials = 5").replace('pruner = "none"', 'pruner = "median"')
    text = text.replace("array = 3", "array = 2").replace(
        'optimizer = "adam"', 'optimizer = { choices = ["adam", "sgd"] }'
    )
    study_file.write_text(text + "momentum = { low = 0.5, high = 0.9 }\n")
    assert cli("run", str(study_file), "--no-report").returncode == 0
    tracking = f"sqlite:///{tmp_path / 'lrsearch-data' / 'mlflow.db'}"
    client = MlflowClient(tracking)
    study = optuna.load_study(study_name="slices", storage=f"sqlite:///{tmp_path / 'lrsearch-data' / 'optuna.db'}")
    lines, truth = _validation_rows(study_file)
    (tmp_path / "val.csv").write_text("\n".join(lines) + "\n")
    rows = pd.read_csv(tmp_path / "val.csv")
    assert len({t.params["optimizer"] for t in study.trials}) == 2
    for t in study.trials:
        run_id = t.user_attrs["mlflow_run_id"]
        network = client.download_artifacts(run_id, "network.pt", str(tmp_path / f"n{t.number}"))
        model = StudyNetwork()
        model.load_context(types.SimpleNamespace(artifacts={"network": network}))
        final = client.get_metric_history(run_id, "val/acc")[-1].value
        assert _accuracy(model.predict(None, rows)["label"], truth) == pytest.approx(final, abs=1e-9), t.number


def test_the_served_model_knows_every_activation_a_study_can_choose():
    from lrsearch.choices.network import ACTIVATIONS
    from lrsearch.track.served_model import ACTIVATIONS as SERVED

    assert sorted(SERVED) == sorted(a.torch_class for a in ACTIVATIONS)


def test_scale_is_fitted_on_the_training_rows_and_kept_in_the_data(tmp_path):
    study_file = _flowers(tmp_path)
    cfg = load_config(study_file)
    scaled = data_module.load_data(cfg.data)
    assert np.allclose(scaled.x_train.double().mean(0).numpy(), 0, atol=1e-5)
    assert np.allclose(scaled.x_train.double().std(0, unbiased=False).numpy(), 1, atol=1e-4)
    assert abs(scaled.x_val.double().mean(0)).max() > 1e-3  # the validation rows: the training rows' scaling
    assert scaled.features == ("sepal", "petal", "stem", "root") and scaled.classes == tuple(LABELS.values())
    import dataclasses

    raw = data_module.load_data(dataclasses.replace(cfg.data, scale="none"))
    assert raw.mean is None and float(raw.x_train[:, 3].abs().max()) > 1000
    table = data_module._split(cfg.data)
    expected = (table.x[table.val].astype(np.float64) - np.array(scaled.mean)) / np.array(scaled.std)
    assert np.allclose(scaled.x_val.numpy(), expected, atol=1e-5)
    assert scaled.digests[0] != raw.digests[0] and scaled.digests[0] != scaled.digests[1]


# Class indices follow the labels' order as text (as they always have: seeded studies keep them).
@pytest.mark.parametrize(
    "labels, values",
    [(["3", "10", "3"], (10, 3)), (["0.5", "2", "0.5"], (0.5, 2.0)), (["b", "a", "10"], ("10", "a", "b"))],
)
def test_labels_keep_the_type_a_reader_of_the_file_gives_them(tmp_path, labels, values):
    (tmp_path / "flowers.csv").write_text("x,species\n" + "".join(f"{i},{label}\n" for i, label in enumerate(labels)))
    (tmp_path / "s.toml").write_text(STUDY.format(name="s").replace("0.25", "0.34"))
    loaded = data_module.load_data(load_config(tmp_path / "s.toml").data)
    assert loaded.classes == values and loaded.label == "species"


@pytest.mark.slow
def test_the_registered_model_is_served_by_mlflow_models_serve(cli, tmp_path):
    study_file = _flowers(tmp_path, "served")
    assert cli("run", str(study_file), "--no-report").returncode == 0
    tracking = f"sqlite:///{tmp_path / 'lrsearch-data' / 'mlflow.db'}"
    predictions = _serve(tracking, "models:/served@best", tmp_path / "flowers.csv", tmp_path)
    loaded = _predict_elsewhere(tracking, "models:/served@best", tmp_path / "flowers.csv")
    assert [p["label"] for p in predictions] == loaded["labels"]
    assert set(predictions[0]) == {"label", "proba_setosa", "proba_versicolor", "proba_virginica"}
    assert sum(predictions[0][f"proba_{label}"] for label in LABELS.values()) == pytest.approx(1, abs=1e-5)


@pytest.mark.slow
def test_on_postgres_the_model_is_registered_through_the_tracking_server(
    pg_url, tracking_server, tmp_path, monkeypatch
):
    import optuna

    from lrsearch.store.urls import schema_url

    monkeypatch.setenv("LRSEARCH_DATA", str(tmp_path / "data"))
    study_file = _flowers(tmp_path, "pgflowers")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lrsearch.cli",
            "run",
            str(study_file),
            "--no-report",
            "--storage",
            pg_url,
            "--tracking-uri",
            tracking_server,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    study = optuna.load_study(study_name="pgflowers", storage=schema_url(pg_url, "optuna"))
    run_id, best = _check_records(MlflowClient(tracking_server, registry_uri=tracking_server), "pgflowers", study)
    lines, truth = _validation_rows(study_file)
    (tmp_path / "val.csv").write_text("\n".join(lines) + "\n")
    loaded = _predict_elsewhere(tracking_server, "models:/pgflowers@best", tmp_path / "val.csv")
    assert _accuracy(loaded["labels"], truth) == pytest.approx(best.value, abs=1e-9)
    predictions = _serve(tracking_server, "models:/pgflowers@best", tmp_path / "val.csv", tmp_path)
    assert [p["label"] for p in predictions] == loaded["labels"]


def test_scale_is_stored_resolved_and_a_study_stored_before_it_keeps_raw_features(tmp_path):
    from lrsearch.config import stored_config

    cfg = load_config(_flowers(tmp_path))
    raw = cfg.to_toml()
    assert cfg.data.scale == "standard" and raw["data"]["scale"] == "standard"  # the default, said
    del raw["data"]["scale"]  # as a study submitted before [data].scale existed was stored
    assert stored_config(raw, "flowers").data.scale == "none"
