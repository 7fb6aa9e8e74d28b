"""A real study on temporary SQLite files: the Optuna side and the MLflow structure."""

from __future__ import annotations

import json
import math

import optuna
import pytest
from conftest import ASKS_AS_ANOTHER_CLIENT
from mlflow import MlflowClient

from lrsearch.choices.data import load_data
from lrsearch.config import load_config, parse_config
from lrsearch.results.ranking import best_trials, load_study
from lrsearch.service.launch import run_study
from lrsearch.service.objective import Objective
from lrsearch.store.storage import open_storage
from lrsearch.store.urls import redact
from lrsearch.track.tracking import Tracker


def _children(client: MlflowClient, experiment_id: str, parent_id: str):
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return sorted(runs, key=lambda r: int(r.data.tags["trial_number"]))


def test_three_trial_study_records_everything(write_study, stores, tmp_path):
    storage, tracking = stores
    path = write_study()
    result = run_study(load_config(path), storage=storage, tracking=tracking, study_file=path)

    # Optuna: three finished trials, each pointing at its MLflow run.
    trials = result.study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert all(0 <= t.value <= 1 for t in trials)
    assert result.study.user_attrs["mlflow_parent_run_id"] == result.parent_run_id

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("tiny")
    assert experiment.experiment_id == result.experiment_id
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny"
    assert parent.data.tags["sampler"] == "tpe" and parent.data.tags["pruner"] == "none"
    assert parent.data.tags["storage"] == storage
    assert parent.data.params["study.name"] == "tiny"
    assert json.loads(parent.data.params["params.lr"]) == {"low": 0.001, "high": 0.1, "log": True}
    assert parent.data.metrics["n_complete"] == 3
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["study.toml"]
    assert result.url.endswith(
        f"/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning"
    )

    children = _children(client, experiment.experiment_id, parent.info.run_id)
    assert [c.info.run_name for c in children] == ["trial-0", "trial-1", "trial-2"]
    for trial, child in zip(trials, children):
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        assert child.info.status == "FINISHED"
        assert child.data.tags["state"] == "COMPLETE" and child.data.tags["study"] == "tiny"
        assert child.data.params["optimizer"] == trial.params["optimizer"]
        # Floats read whole in MLflow's narrow columns (4 significant digits, as the descriptions
        # write them); the exact value stays in Optuna and the run's trial_config.json.
        assert child.data.params["lr"] == f"{trial.params['lr']:.4g}" != repr(trial.params["lr"])
        assert float(child.data.params["lr"]) == pytest.approx(trial.params["lr"], rel=1e-3)
        assert ("momentum" in child.data.params) == (trial.params["optimizer"] == "sgd")
        if "momentum" in trial.params:
            assert child.data.params["momentum"] == f"{trial.params['momentum']:.4g}"
        assert child.data.params["decay"] == "0.01"  # a fixed float: short too (json.dumps gave the same)
        assert child.data.params["schedule"] == "time_decay" and child.data.params["epochs"] == "3"
        lr = client.get_metric_history(child.info.run_id, "lr")
        assert [m.step for m in lr] == [0, 1, 2]
        assert lr[0].value == pytest.approx(trial.params["lr"])
        assert lr[1].value < lr[0].value  # time decay
        val_acc = client.get_metric_history(child.info.run_id, "val/acc")
        assert [m.step for m in val_acc] == [0, 1, 2] and val_acc[-1].value == trial.value
        for key in ("train/loss", "train/acc", "val/loss", "momentum"):
            assert len(client.get_metric_history(child.info.run_id, key)) == 3, key
        names = sorted(a.path for a in client.list_artifacts(child.info.run_id))
        assert names == ["network.pt", "trial_config.json"]  # its network; learning-curve PNGs are opt-in
        config = json.loads(
            open(client.download_artifacts(child.info.run_id, "trial_config.json", str(tmp_path))).read()
        )
        assert config["hyperparameters"]["lr"] == trial.params["lr"] and config["trial"] == trial.number


def test_resume_reaches_the_new_total_under_the_same_parent_run(write_study, stores):
    storage, tracking = stores
    cfg = load_config(write_study())
    first = run_study(cfg, storage=storage, tracking=tracking)
    second = run_study(cfg.with_overrides(trials=5), storage=storage, tracking=tracking)
    assert second.parent_run_id == first.parent_run_id
    assert len(second.study.trials) == 5
    params = [tuple(sorted(t.params.items())) for t in second.study.trials]
    assert len(set(params)) == 5  # the re-seeded sampler does not repeat the first trials
    again = run_study(cfg.with_overrides(trials=5), storage=storage, tracking=tracking)
    assert len(again.study.trials) == 5  # already at its total: nothing more runs
    runs = MlflowClient(tracking_uri=tracking).search_runs([first.experiment_id])
    assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}


def test_same_seed_same_params_and_metrics(write_study, tmp_path):
    cfg = load_config(write_study())
    results = []
    for i in range(2):
        run = run_study(cfg, storage=f"sqlite:///{tmp_path}/o{i}.db", tracking=f"sqlite:///{tmp_path}/m{i}.db")
        results.append([(t.params, t.value, t.intermediate_values) for t in run.study.trials])
    assert results[0] == results[1]


def test_trial_plots_are_opt_in(write_study, stores):
    from conftest import TINY_STUDY

    path = write_study(TINY_STUDY.replace("trials = 3", "trials = 1") + "\n[tracking]\ntrial_plots = true\n")
    result = run_study(load_config(path), storage=stores[0], tracking=stores[1])
    client = MlflowClient(tracking_uri=stores[1])
    run_id = result.study.trials[0].user_attrs["mlflow_run_id"]
    assert sorted(a.path for a in client.list_artifacts(run_id)) == [
        "learning_curves.png",
        "network.pt",
        "trial_config.json",
    ]
    with open(client.download_artifacts(run_id, "learning_curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _objective(cfg, storage, tracking):
    tracker = Tracker(tracking)
    experiment_id = tracker.experiment(cfg.study.name)
    parent = tracker.start_study(experiment_id, cfg.study.name, {}, {}, None)
    study = optuna.create_study(
        storage=open_storage(storage),
        study_name=cfg.study.name,
        direction=cfg.study.direction,
        pruner=optuna.pruners.ThresholdPruner(lower=0.99),
    )
    return study, Objective(cfg, load_data(cfg.data), tracker, experiment_id, parent), tracker.client


def test_pruned_trial_is_killed_in_mlflow_with_its_history(write_study, stores):
    text = write_study().read_text().replace('pruner = "none"', 'pruner = "median"\nprune_every = 2')
    cfg = load_config(write_study(text)).with_overrides(epochs=6)
    study, objective, client = _objective(cfg, *stores)
    study.optimize(objective, n_trials=1)
    assert objective.drain() == []
    trial = study.trials[0]
    assert trial.state.name == "PRUNED"
    # Checked at epoch 1 (every 2 epochs): it stops there, at that epoch's end.
    assert trial.user_attrs["epochs_trained"] == 2
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert [m.step for m in history] == [0, 1]
    assert trial.intermediate_values == {1: history[1].value}
    # The reason gives the value the pruner judged, and the study's pruner's rule.
    reason = (
        f"pruned at epoch 1: val/acc={history[1].value:.4g}, worse than the median of the other trials at that epoch"
    )
    assert trial.user_attrs["reason"] == reason
    assert run.data.tags["state"] == "PRUNED" and run.data.tags["reason"] == reason
    # The run's description (MLflow's note) says it on the run page, with the trial's params.
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    assert run.data.tags["mlflow.note.content"] == f"PRUNED: {reason} · {params}"
    assert "objective" not in run.data.metrics  # only COMPLETE trials rank in the trials view


def test_diverging_trial_is_pruned_never_complete(write_study, stores):
    cfg = parse_config(
        {
            "study": {"name": "div", "pruner": "none"},
            "train": {"epochs": 5},
            "params": {"optimizer": "sgd", "lr": 1e8, "momentum": 0.9},
        },
        "div.toml",
    )
    study, objective, client = _objective(cfg, *stores)
    study.pruner = optuna.pruners.NopPruner()
    study.optimize(objective, n_trials=1)
    assert objective.drain() == []
    trial = study.trials[0]
    assert trial.state.name == "PRUNED"
    assert trial.user_attrs["reason"].startswith("non-finite train/loss at epoch ")
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["state"] == "PRUNED"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert not math.isfinite(losses[-1].value)  # the non-finite value is recorded, not dropped


def test_a_non_finite_validation_loss_prunes_the_trial_whatever_the_metric(stores):
    cfg = parse_config(
        {
            "study": {"name": "nanval", "pruner": "none", "metric": "val/acc"},
            "train": {"epochs": 3},
            "params": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.0},
        },
        "nanval.toml",
    )
    study, objective, client = _objective(cfg, *stores)
    study.pruner = optuna.pruners.NopPruner()
    x_val = objective.data.x_val.clone()
    x_val[0, 0] = math.nan
    objective.data = type(objective.data)(
        objective.data.x_train, objective.data.y_train, x_val, objective.data.y_val, objective.data.n_classes
    )
    study.optimize(objective, n_trials=1)
    assert objective.drain() == []
    trial = study.trials[0]
    assert trial.state.name == "PRUNED" and trial.user_attrs["reason"] == "non-finite val/loss at epoch 0"
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.tags["state"] == "PRUNED" and run.data.tags["reason"] == "non-finite val/loss at epoch 0"


def test_a_crashing_trial_fails_in_both_stores(write_study, stores):
    cfg = load_config(write_study())
    study, objective, client = _objective(cfg, *stores)
    # Labels beyond the output layer: cross_entropy raises inside Lightning's fit.
    objective.data = type(objective.data)(
        objective.data.x_train,
        objective.data.y_train + 5,
        objective.data.x_val,
        objective.data.y_val,
        objective.data.n_classes,
    )
    with pytest.raises(IndexError):
        study.optimize(objective, n_trials=1)
    assert objective.drain() == []
    trial = study.trials[0]
    assert trial.state.name == "FAIL" and trial.user_attrs["reason"].startswith("IndexError")
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["state"] == "FAIL"


def test_best_trials_follow_the_direction(write_study, stores):
    storage, tracking = stores
    cfg = load_config(write_study()).with_overrides(trials=4)
    loss = parse_config(
        {
            "study": {
                "name": "loss",
                "direction": "minimize",
                "metric": "val/loss",
                "trials": 4,
                "seed": 1,
                "pruner": "none",
            },
            "train": {"epochs": 2},
            "params": {"lr": {"low": 1e-3, "high": 0.5, "log": True}},
        },
        "loss.toml",
    )
    run_study(cfg, storage=storage, tracking=tracking)
    run_study(loss, storage=storage, tracking=tracking)
    acc_best = best_trials(load_study("tiny", storage), 10)
    loss_best = best_trials(load_study("loss", storage), 10)
    assert [r["value"] for r in acc_best] == sorted((r["value"] for r in acc_best), reverse=True)
    assert [r["value"] for r in loss_best] == sorted(r["value"] for r in loss_best)
    assert set(acc_best[0]) >= {"number", "value", "state", "params", "mlflow_run_id"}


def test_redact_hides_passwords():
    assert redact("postgresql+psycopg://bob:s3cret@db:5432/lr") == "postgresql+psycopg://bob:***@db:5432/lr"
    assert "s3cret" not in redact("http://bob:s3cret@host:5000")
    assert redact("sqlite:///x/optuna.db") == "sqlite:///x/optuna.db"


def test_embedded_stores_are_wal_and_checkpointed_when_the_loop_ends(write_study, stores, tmp_path):
    import sqlite3

    from conftest import TINY_STUDY

    run_study(
        load_config(write_study(TINY_STUDY.replace("trials = 3", "trials = 1"))), storage=stores[0], tracking=stores[1]
    )
    for name in ("optuna.db", "mlflow.db"):
        with sqlite3.connect(tmp_path / name) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        wal = tmp_path / f"{name}-wal"
        assert not wal.exists() or wal.stat().st_size == 0, name  # the .db file alone is complete


def test_log_batch_calls_stay_within_mlflows_limits():
    from lrsearch.track.records import _batches

    batches = list(_batches(list(range(150)), list(range(5)), list(range(2500))))
    assert [(len(b["params"]), len(b["tags"]), len(b["metrics"])) for b in batches] == [
        (100, 5, 895),
        (50, 0, 950),
        (0, 0, 655),
    ]  # <= 100 params, 100 tags, 1000 entities a call
    assert sum((b["metrics"] for b in batches), []) == list(range(2500))  # every point, in order
    assert list(_batches([], [], [])) == []


def test_a_run_whose_last_records_were_lost_is_closed_as_its_trial_ended(write_study, stores, monkeypatch):
    """A trial's run still RUNNING after its trial ended (its worker died before sending the
    records, or the tracking store was away longer than the outage window) is closed when a
    later session closes the study: status from the trial's state, and a tag saying why."""
    from conftest import TINY_STUDY

    storage, tracking = stores
    cfg = load_config(write_study(TINY_STUDY.replace("trials = 3", "trials = 1")))
    first = run_study(cfg, storage=storage, tracking=tracking)
    client = MlflowClient(tracking_uri=tracking)
    lost = first.study.trials[0].user_attrs["mlflow_run_id"]
    client.update_run(lost, status="RUNNING")  # as if its closing calls never arrived
    monkeypatch.setenv("LRSEARCH_OUTAGE_S", "0")
    # Its trial's last heartbeat is a moment old: a short grace period (not the default's
    # seconds) tells the next session its worker is gone.
    monkeypatch.setenv("LRSEARCH_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("LRSEARCH_HEARTBEAT_GRACE", "2")
    run_study(cfg.with_overrides(trials=2), storage=storage, tracking=tracking)
    run = client.get_run(lost)
    assert run.info.status == "FINISHED" and run.data.tags["state"] == "COMPLETE"
    assert run.data.tags["tracking_error"].startswith("the trial's last records were lost")
    assert {r.info.status for r in client.search_runs([first.experiment_id])} == {"FINISHED"}


def test_trials_claimed_but_never_begun_are_ended_on_an_error_and_queued_ones_queued_again(write_study, stores):
    """Between an array's claim and its fit (the parent run made, say), an error ends the
    claimed trials FAIL at once instead of leaving them RUNNING until their heartbeats go
    stale; a queued trial it had taken (with its parameters) is queued again."""
    import optuna
    import pytest
    from conftest import TINY_STUDY

    from lrsearch.service.claims import _released_on_error
    from lrsearch.service.session import open_session

    cfg = load_config(write_study(TINY_STUDY.replace("trials = 3", "trials = 4")))
    session = open_session(cfg, storage=stores[0], tracking=stores[1])
    session.study.enqueue_trial({"optimizer": "adam", "lr": 0.01})
    claimed = session.store.claim_trials(session.study_id, 2)  # the queued one first, then a new one
    with pytest.raises(RuntimeError, match="the store went away"):
        with _released_on_error(session, claimed):
            raise RuntimeError("the store went away")
    trials = session.study.get_trials(deepcopy=False)
    ended = [t for t in trials if t._trial_id in claimed]
    assert [t.state.name for t in ended] == ["FAIL", "FAIL"]
    assert all(t.user_attrs["reason"] == "not told: RuntimeError: the store went away" for t in ended)
    again = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(again) == 1 and again[0].system_attrs["fixed_params"] == {"optimizer": "adam", "lr": 0.01}


@ASKS_AS_ANOTHER_CLIENT
def test_a_claim_made_without_the_lock_never_passes_the_total(write_study, stores):
    """What the worker loop does with a trial claimed while the store lock's connection was
    down (another worker may have claimed the same slot): kept if the trials before it leave
    it a slot, else ended FAIL at once, untrained, with the reason."""
    from conftest import TINY_STUDY

    from lrsearch.service.claims import _confirm_claim
    from lrsearch.service.session import open_session

    cfg = load_config(write_study(TINY_STUDY.replace("trials = 3", "trials = 2")))
    session = open_session(cfg, storage=stores[0], tracking=stores[1])
    first = session.study.ask()
    assert _confirm_claim(session, first._trial_id) == first._trial_id  # nothing ahead of it
    session.study.tell(first, 0.5)
    second = session.study.ask()
    third = session.study.ask()  # a slot claimed twice
    assert _confirm_claim(session, second._trial_id) == second._trial_id
    assert _confirm_claim(session, third._trial_id) is None
    ended = session.store.get_trial(third._trial_id)
    assert ended.state.name == "FAIL" and ended.user_attrs["reason"].startswith("over the study's total")


def test_adamw_and_nesterov_end_to_end(write_study, stores, tmp_path):
    """A study that searches the two newest registry entries: sampled only where they apply,
    decoded by the SQL views (a boolean stays a boolean), in the MLflow runs and the report."""
    from conftest import TINY_STUDY

    from lrsearch.results.report import write_report
    from lrsearch.sql.queries import ResultsDatabase

    text = (
        TINY_STUDY.replace('sampler = "tpe"', 'sampler = "random"')
        .replace("trials = 3", "trials = 6")
        .replace("seed = 7", "seed = 1")
        .replace('optimizer = { choices = ["sgd", "adam"] }', 'optimizer = { choices = ["sgd", "adamw"] }')
        .replace(
            "momentum = { low = 0.0, high = 0.9 }",
            "momentum = { choices = [0.0, 0.9] }\nnesterov = { choices = [true, false] }\n"
            "weight_decay = { low = 1e-4, high = 1e-1, log = true }",
        )
    )
    path = write_study(text)
    result = run_study(load_config(path).with_overrides(epochs=2), storage=stores[0], tracking=stores[1])
    trials = result.study.trials
    for t in trials:
        hp = t.user_attrs["hyperparameters"]
        assert ("weight_decay" in t.params) == (hp["optimizer"] == "adamw")
        assert ("nesterov" in t.params) == (hp["optimizer"] == "sgd" and hp["momentum"] > 0)
    kinds = {(t.params["optimizer"], t.params.get("nesterov")) for t in trials}
    assert {("adamw", None), ("sgd", True), ("sgd", False)} <= kinds  # the seed covers each case

    with ResultsDatabase(*stores) as db:
        rows = db.query("SELECT trial_number, optimizer, params FROM trials ORDER BY trial_number").records()
    for row, t in zip(rows, trials, strict=True):
        params = json.loads(row["params"]) if isinstance(row["params"], str) else row["params"]
        assert set(params) == set(t.params)  # a JSON object: its order is the database's
        for name, value in t.params.items():  # nesterov as JSON true/false, weight_decay a number
            assert type(params[name]) is type(value)
            assert params[name] == (pytest.approx(value, rel=1e-12) if type(value) is float else value)
    client = MlflowClient(tracking_uri=stores[1])
    adamw = next(t for t in trials if t.params["optimizer"] == "adamw")
    assert "weight_decay" in client.get_run(adamw.user_attrs["mlflow_run_id"]).data.params
    report = write_report("tiny", storage=stores[0], tracking=stores[1], out=tmp_path / "report")
    page = report[-1].read_text()
    assert "weight_decay=" in page and "nesterov=True" in page


def test_the_study_samples_with_multivariate_grouped_tpe_and_a_constant_liar(write_study, stores):
    from lrsearch.service.session import open_session

    sampler = open_session(load_config(write_study()), storage=stores[0], tracking=stores[1]).study.sampler
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert (sampler._multivariate, sampler._group, sampler._constant_liar) == (True, True, True)


def test_heartbeat_defaults(monkeypatch, stores):
    from lrsearch.store.heartbeat import grace_period, heartbeat_interval

    for name in ("LRSEARCH_HEARTBEAT_INTERVAL", "LRSEARCH_HEARTBEAT_GRACE"):
        monkeypatch.delenv(name, raising=False)
    assert (heartbeat_interval(), grace_period()) == (5, 20)
    assert open_storage(stores[0]).get_heartbeat_interval() == 5


# Slow: it waits for the database's clock, which stores a heartbeat to the second (SQLite's
# now()); a clock of its own would not be the one the rule reads.
@pytest.mark.slow
def test_a_trial_that_never_beat_is_left_alone_and_lrsearchs_own_beat_from_their_claim(monkeypatch, stores):
    """Optuna's rule: a RUNNING trial with no heartbeat is another client's (``study.ask()``
    on the same store), never stale. lrsearch's trials, new or taken from the queue, beat
    from their claim, in its transaction, so none of them is ever without one."""
    import time

    monkeypatch.setenv("LRSEARCH_HEARTBEAT_GRACE", "1")
    store = open_storage(stores[0])
    study = optuna.create_study(storage=store, study_name="beats")
    asked = store.create_new_trial(study._study_id)  # as study.ask() makes one: no heartbeat
    study.enqueue_trial({"x": 1.0})
    claimed = store.claim_trials(study._study_id, 2)  # the queued one, then a new one
    assert len(claimed) == 2 and asked not in claimed
    assert set(store.heartbeat_ages(study._study_id, claimed)) == set(claimed)  # both beat from the claim
    time.sleep(2.5)  # (SQLite's clock counts whole seconds)
    assert sorted(store._get_stale_trial_ids(study._study_id)) == sorted(claimed)  # not `asked`


def test_the_storage_pickles_and_leaves_no_attribute_of_its_own_on_a_trial(stores):
    """As Optuna's RDB storage: a study on it can go to a process pool (engine and locks made
    anew), and its trials hold what Optuna's own storage would hold (the token that makes a
    repeated create safe is gone once the trial is found)."""
    import pickle

    store = open_storage(stores[0])
    study = optuna.create_study(storage=store, study_name="plain")
    study.enqueue_trial({"x": 0.5})
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = optuna.load_study(study_name="plain", storage=pickle.loads(pickle.dumps(store)))
    again.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert len(again.trials) == 3
    assert [t.system_attrs for t in again.trials] == [{"fixed_params": {"x": 0.5}}, {}, {}]
    assert "system_attrs_lrsearch_claim" not in again.trials_dataframe().columns


@pytest.mark.parametrize("variable", ["LRSEARCH_HEARTBEAT_INTERVAL", "LRSEARCH_HEARTBEAT_GRACE"])
def test_a_wrong_heartbeat_setting_is_named(write_study, cli, monkeypatch, tmp_path, variable):
    monkeypatch.setenv(variable, "5s")
    done = cli("run", str(write_study()))
    assert done.returncode == 2
    assert done.stderr == f"lrsearch: error: {variable}: expected a whole number of seconds >= 1, got '5s'\n"
    assert not (tmp_path / "lrsearch-data").exists()


# Slow: it waits for the database's clock, which stores a heartbeat to the second (SQLite's
# now()); a clock of its own would not be the one the rule reads.
@pytest.mark.slow
@ASKS_AS_ANOTHER_CLIENT
def test_a_lost_trial_is_queued_again_twice_at_most(write_study, stores, monkeypatch):
    """Each time its worker is lost, a trial ends FAIL and its params are queued again, with
    the trials it retries in ``retry_history``; the third loss queues nothing."""
    import time

    from lrsearch.service.claims import MAX_RETRIES, _fail_stale_trials
    from lrsearch.service.session import open_session

    monkeypatch.setenv("LRSEARCH_HEARTBEAT_GRACE", "1")
    monkeypatch.setenv("LRSEARCH_HEARTBEAT_INTERVAL", "1")
    session = open_session(load_config(write_study()), storage=stores[0], tracking=stores[1])
    for _ in range(MAX_RETRIES + 1):
        trial = session.study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 0.1, log=True)})
        session.store.record_heartbeat(trial._trial_id)
        time.sleep(2.2)  # no beat since: stale (the database clock counts whole seconds)
        _fail_stale_trials(session)  # the first look
        assert session.study.trials[-1].state.name == "RUNNING"
        time.sleep(2.0)  # two intervals on, the same last beat: lost
        _fail_stale_trials(session)
    trials = session.study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["FAIL"] * (MAX_RETRIES + 1) == ["FAIL"] * 3
    assert [t.system_attrs.get("retry_history") for t in trials] == [None, [0], [0, 1]]
    assert len({t.params["lr"] for t in trials}) == 1  # the same params each time
    assert all(t.user_attrs["reason"] == "worker lost: no heartbeat for 1 s" for t in trials)


# Slow: it waits for the database's clock, which stores a heartbeat to the second (SQLite's
# now()); a clock of its own would not be the one the rule reads.
@pytest.mark.slow
@ASKS_AS_ANOTHER_CLIENT
def test_a_trial_that_beats_again_between_two_looks_is_not_failed(write_study, stores, monkeypatch):
    """A worker that saw no outage finds another's trial stale: one look cannot tell a lost
    worker from one whose beats an outage held back. The live one beats again within an
    interval of the database's return, and the second look, two intervals on, leaves its
    trial alone; a trial that went on without a beat is failed then."""
    import time

    from lrsearch.service.claims import _fail_stale_trials
    from lrsearch.service.session import open_session

    monkeypatch.setenv("LRSEARCH_HEARTBEAT_GRACE", "1")
    monkeypatch.setenv("LRSEARCH_HEARTBEAT_INTERVAL", "1")
    session = open_session(load_config(write_study()), storage=stores[0], tracking=stores[1])
    held, lost = (
        session.study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 0.1, log=True)}) for _ in range(2)
    )
    for trial in (held, lost):
        session.store.record_heartbeat(trial._trial_id)
    time.sleep(2.2)  # neither has beaten since: both stale (the database clock counts whole seconds)
    _fail_stale_trials(session)
    session.store.record_heartbeat(held._trial_id)  # the outage over: its worker beats again
    time.sleep(2.2)  # stale again by now, with a newer beat: a first look at it, not a second
    _fail_stale_trials(session)
    states = {t.number: t.state.name for t in session.study.trials}
    assert states[held.number] == "RUNNING" and states[lost.number] == "FAIL"


@ASKS_AS_ANOTHER_CLIENT
def test_a_trial_is_failed_with_its_reason_in_one_step_unless_its_worker_told_it_first(write_study, stores):
    """Failing a stale trial writes its reason and its FAIL state together, holding its row:
    a trial its own worker told meanwhile is left as told, without the reason."""
    from lrsearch.service.session import open_session

    session = open_session(load_config(write_study()), storage=stores[0], tracking=stores[1])
    lr = {"lr": optuna.distributions.FloatDistribution(1e-3, 0.1, log=True)}
    lost, told = session.study.ask(lr), session.study.ask(lr)
    session.study.tell(told, 0.5)
    assert session.store.fail_trial(lost._trial_id, {"reason": "worker lost"}) is True
    assert session.store.fail_trial(told._trial_id, {"reason": "worker lost"}) is False
    trials = session.study.get_trials(deepcopy=False)
    assert [(t.state.name, t.user_attrs.get("reason")) for t in trials] == [("FAIL", "worker lost"), ("COMPLETE", None)]


def test_an_array_whose_trials_were_all_ended_elsewhere_before_they_began_trains_nothing(write_study, stores):
    """A worker that claimed trials, then paused past the grace period while another worker
    failed them, finds them ended as it begins them: it says so and goes on (no fit of an
    empty array, no error)."""
    from lrsearch.core.stopping import StopFlag
    from lrsearch.service.array_host import _Array
    from lrsearch.service.claims import _claim
    from lrsearch.service.session import open_session
    from lrsearch.service.worker import Worker

    session = open_session(load_config(write_study()), storage=stores[0], tracking=stores[1])
    worker = Worker(session.store, session.url, session.tracker)
    worker.add(session)
    trials = _claim(session, 2)
    assert len(trials) == 2
    for trial_id in trials:
        assert session.store.fail_trial(trial_id, {"reason": "worker lost: no heartbeat for 20 s"})
    _Array(
        session, worker.sessions[session.study.study_name][1], StopFlag(), (), refill=False, beats=worker.beats
    ).train(trials)
    assert session.warnings == [f"trial {n} was ended by another worker before it began here" for n in (0, 1)]
    assert [t.state.name for t in session.study.get_trials(deepcopy=False)] == ["FAIL", "FAIL"]


def test_schedule_shapes_reach_mlflow_through_learning_rate_monitor(stores):
    # Two warm-up epochs before each schedule; the lr curves MLflow holds (one point per
    # epoch, as LearningRateMonitor logs them at each epoch's start) have their shapes.
    cfg = parse_config(
        {
            "study": {"name": "shapes", "sampler": "grid", "pruner": "none", "seed": 3},
            "train": {"epochs": 12, "batch_size": 64},
            "params": {
                "optimizer": "sgd",
                "lr": 0.1,
                "momentum": 0.9,
                "warmup_epochs": 2,
                "schedule": {"choices": ["one_cycle", "cyclic", "cosine"]},
                "half_cycle": 2,
            },
        },
        "shapes.toml",
    )
    result = run_study(cfg, storage=stores[0], tracking=stores[1])
    client = MlflowClient(tracking_uri=stores[1])
    curves = {}
    for t in result.study.trials:
        assert t.state.name == "COMPLETE"
        history = sorted((m.step, m.value) for m in client.get_metric_history(t.user_attrs["mlflow_run_id"], "lr"))
        assert [step for step, _ in history] == list(range(12))
        curves[t.params["schedule"]] = [v for _, v in history]
    for name, lr in curves.items():
        assert lr[0] < lr[1] < lr[2], name  # warm-up: rising to the rate the schedule starts at
    one_cycle, cyclic, cosine = curves["one_cycle"], curves["cyclic"], curves["cosine"]
    assert one_cycle[2] == pytest.approx(0.1 / 25) and max(one_cycle) == pytest.approx(0.1, rel=0.05)
    peak = one_cycle.index(max(one_cycle))
    assert (
        2 < peak < 11
        and one_cycle[-1] < one_cycle[2]
        and all(a > b for a, b in zip(one_cycle[peak:], one_cycle[peak + 1 :]))
    )  # up, then down
    assert cyclic[2::2] == pytest.approx([0.01, 0.1, 0.01, 0.1, 0.01])  # triangles: base, peak, base …
    assert cosine[2] == pytest.approx(0.1) and all(a > b for a, b in zip(cosine[2:], cosine[3:]))
    # t_max's default counts the schedule's epochs, after the warm-up: 10.
    cosine_trial = next(t for t in result.study.trials if t.params["schedule"] == "cosine")
    assert cosine_trial.user_attrs["hyperparameters"]["t_max"] == 10
