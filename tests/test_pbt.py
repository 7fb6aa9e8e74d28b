"""Population-based training in one fit: exploits copy a member exactly, a study records
where each change came from, and a study file that asks for what PBT cannot do is refused."""

from __future__ import annotations

import json
import random

import optuna
import pytest
import torch
from mlflow import MlflowClient

from lrsearch.choices.data import load_data
from lrsearch.choices.population import explore, pairs
from lrsearch.choices.space import Range
from lrsearch.config import parse_config
from lrsearch.fit.member import Member
from lrsearch.fit.population import COPIED_FROM, Population
from lrsearch.fit.training import fit_array

PBT_STUDY = """\
[study]
name = "pbt"
trials = {trials}
sampler = "pbt"
seed = 3

[train]
epochs = {epochs}
batch_size = 64

[params]
optimizer = {{ choices = ["sgd", "adam"] }}
lr = {{ low = 1e-5, high = 0.3, log = true }}
momentum = {{ low = 0.0, high = 0.95 }}

[pbt]
population = {population}
interval = {interval}
"""


class _Aligned(Population):
    """A population whose copiers also take their source's data order: from the exploit on,
    a copier then trains exactly as its source does, if it took all of its state."""

    def step(self, array, values):
        before = {m: len(m.result.exploits) for m in array.members}
        super().step(array, values)
        by_key = {m.key: m for m in array.members}
        for m in array.members:
            if len(m.result.exploits) > before[m]:
                m.generator.set_state(by_key[str(m.result.exploits[-1]["source"])].generator.get_state())


def test_an_exploited_member_continues_exactly_from_its_sources_weights_and_optimizer_state():
    """Four members of two optimizers; at epoch 1 the worst (SGD at a tiny rate) copies the
    best (Adam: its moments and step count matter) with no perturbation. With the source's
    data order too, the two train bit for bit alike from then on: nothing of the source's
    state was left behind, and the copier took the source's optimizer."""
    cfg = parse_config(
        {
            "study": {"name": "exact", "sampler": "pbt", "seed": 1},
            "train": {"epochs": 4},
            "params": {"lr": {"low": 1e-5, "high": 0.1, "log": True}},
            "pbt": {"interval": 2, "quantile": 0.25, "perturb": [1.0], "resample": 0.0},
        },
        "exact.toml",
    )
    data = load_data(cfg.data)
    hps = [
        {"optimizer": "adam", "lr": 0.01, "schedule": "constant"},
        {"optimizer": "sgd", "lr": 1e-5, "momentum": 0.5, "nesterov": False, "schedule": "constant"},
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "schedule": "constant"},
        {"optimizer": "adam", "lr": 0.003, "schedule": "constant"},
    ]
    members = [Member(str(i), hp, 10 + i, 4) for i, hp in enumerate(hps)]
    fit_array(cfg, data, members, population=_Aligned(cfg.pbt, cfg.params, "val/acc", "maximize", 4, cfg.study.seed))
    worst = members[1]
    assert [(e["epoch"], e["source"]) for e in worst.result.exploits] == [(1, 0)]
    assert worst.hp["optimizer"] == "adam" and worst.hp["lr"] == 0.01
    source = members[0]
    for mine, theirs in zip(worst.result.weights, source.result.weights):
        assert torch.equal(mine, theirs)
    for key in ("val/acc", "val/loss", "train/loss", "lr"):
        mine = [v for step, v, _ in worst.result.history[key] if step >= 2]
        theirs = [v for step, v, _ in source.result.history[key] if step >= 2]
        assert mine == theirs and len(mine) == 2, key
    assert [v for step, v, _ in worst.result.history[COPIED_FROM]] == [0.0]
    assert [v for _, v, _ in worst.result.history["lr"]] == [1e-5, 1e-5, 0.01, 0.01]


def test_the_bottom_quantile_copies_the_top_and_explores_within_the_range():
    rng = random.Random(0)
    values = [0.5, 0.9, 0.1, 0.7, float("nan"), 0.8, 0.6, 0.3]
    chosen = pairs(values, "maximize", 0.25, rng)
    assert sorted(i for i, _ in chosen) == [2, 4]  # the two worst (NaN last)
    assert all(source in (1, 5) for _, source in chosen)  # from the two best
    assert pairs(values, "minimize", 0.25, rng)[0][1] in (2, 7)
    space = {"lr": Range(1e-4, 0.1, log=True), "momentum": Range(0.0, 0.9)}
    cfg = parse_config(
        {
            "study": {"name": "x", "sampler": "pbt"},
            "params": {"lr": {"low": 1e-4, "high": 0.1}},
            "pbt": {"resample": 0.0, "perturb": [0.8, 1.2]},
        },
        "x.toml",
    ).pbt
    for _ in range(50):
        new = explore({"optimizer": "sgd", "lr": 0.1, "momentum": 0.5}, space, cfg, rng)
        assert round(new["lr"], 12) in (0.08, 0.1) and round(new["momentum"], 12) in (0.4, 0.6)  # 0.12: kept in range
        assert new["optimizer"] == "sgd"


def test_a_diverged_member_copies_a_good_one_at_once_and_trains_on():
    """lr 1e8 diverges in its first epoch: at that epoch's end it copies one of the others
    (not at an exploit epoch: interval 3), clears its divergence and trains all its epochs;
    when every member diverges, none copies, and all leave as diverged."""
    cfg = parse_config(
        {
            "study": {"name": "wild", "sampler": "pbt", "seed": 2},
            "train": {"epochs": 5},
            "params": {"lr": {"low": 1e-4, "high": 0.1, "log": True}},
            "pbt": {"interval": 3},
        },
        "wild.toml",
    )
    data = load_data(cfg.data)
    calm = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.5, "nesterov": False, "schedule": "constant"}
    wild = {**calm, "lr": 1e8, "momentum": 0.0}
    members = [Member("0", calm, 1, 5), Member("1", wild, 2, 5), Member("2", {**calm, "lr": 0.01}, 3, 5)]
    fit_array(cfg, data, members)
    first = members[1].result.exploits[0]
    assert first["epoch"] == 0 and first["source"] in (0, 2) and first["reason"].startswith("diverged")
    assert members[1].result.epochs == 5 and members[1].result.diverged_at is None
    assert all(v == v for _, v, _ in members[1].result.history["val/loss"][1:])  # finite from then on
    assert 1e-4 <= members[1].hp["lr"] <= 0.1  # its source's, explored inside the range
    broken = [Member(str(i), {**wild, "lr": 1e8 * (i + 1)}, i, 5) for i in range(3)]
    fit_array(cfg, data, broken)
    assert all(not m.result.exploits and m.result.diverged_at == 0 and m.result.epochs == 1 for m in broken)


def test_explore_resamples_keeps_steps_and_never_leaves_nesterov_without_momentum():
    rng = random.Random(5)
    space = {"momentum": Range(0.0, 0.9, step=0.1), "lr": Range(0.001, 0.1)}
    cfg = parse_config(
        {
            "study": {"name": "x", "sampler": "pbt"},
            "params": {"lr": {"low": 0.001, "high": 0.1}},
            "pbt": {"resample": 1.0},
        },
        "x.toml",
    ).pbt
    seen = set()
    for _ in range(300):
        new = explore({"optimizer": "sgd", "lr": 0.01, "momentum": 0.5, "nesterov": True}, space, cfg, rng)
        assert 0.001 <= new["lr"] <= 0.1 and new["lr"] != 0.01  # drawn afresh
        assert round(new["momentum"] * 10, 9) == round(new["momentum"] * 10)  # on the step
        assert new["nesterov"] == (new["momentum"] > 0)
        seen.add(round(new["momentum"], 9))
    assert 0.0 in seen and len(seen) == 10


class _Trial:
    def __init__(self, number, lr, epochs, exploits=()):
        self.number = number
        self.params = {"optimizer": "sgd", "lr": lr}
        self.user_attrs = {
            "hyperparameters": dict(self.params),
            "epochs_trained": epochs,
            "pbt": {"final": {}, "exploits": list(exploits)},
        }


def _copy(epoch, source, before, after):
    return {
        "epoch": epoch,
        "source": source,
        "reason": "",
        "before": {"optimizer": "sgd", "lr": before},
        "after": {"optimizer": "sgd", "lr": after},
    }


def test_a_members_line_follows_its_network_back_through_each_copy():
    """Trial 1 copied trial 0 after epoch 2: its network was trained by 0 (epochs 0-2), then by
    1. Trial 2's last copy was of trial 0 after epoch 7: 0 trained epochs 0-7 of its network
    (2's earlier copy of 1 was overwritten). Trial 3 copied 1 after epoch 5: 0, 1, then 3."""
    from lrsearch.results.lineage import line, schedule_text

    t0 = _Trial(0, 0.1, 10)
    t1 = _Trial(1, 0.01, 10, [_copy(2, 0, 0.01, 0.08)])
    t2 = _Trial(2, 0.001, 10, [_copy(5, 1, 0.001, 0.064), _copy(7, 0, 0.064, 0.12)])
    stretches = line([t0, t1, t2], t2)
    assert [(s.trial, s.first, s.last, s.lr) for s in stretches] == [(0, 0, 7, 0.1), (2, 8, 9, 0.12)]
    stretches = line([t0, t1, t2], t1)
    assert [(s.trial, s.first, s.last, s.lr) for s in stretches] == [(0, 0, 2, 0.1), (1, 3, 9, 0.08)]
    t3 = _Trial(3, 0.5, 10, [_copy(5, 1, 0.5, 0.064)])
    assert [(s.trial, s.first, s.last) for s in line([t0, t1, t3], t3)] == [(0, 0, 2), (1, 3, 5), (3, 6, 9)]
    assert schedule_text(line([t0, t1, t3], t3)).startswith("lr 0.1 (sgd, epochs 0–2, trial 0) → 0.08 (sgd")


@pytest.mark.parametrize(
    "table, key",
    [
        (
            '[params]\nschedule = { choices = ["cosine", "constant"] }\nlr = { low = 0.001, high = 0.1 }',
            "[params].schedule",
        ),
        ("[params]\nlr = { choices = [0.01, 0.1] }", "[params].lr"),
        ('[params]\noptimizer = "adam"', "[params]"),
        ("[params]\nlr = { low = 0.001, high = 0.1 }\nwarmup_epochs = 3", "[params].warmup_epochs"),
        ("[params]\nlr = { low = 0.001, high = 0.1 }\n[pbt]\nquantile = 0.75", "[pbt].quantile"),
    ],
)
def test_a_study_file_asking_pbt_for_what_it_cannot_change_is_refused_at_the_door(
    write_study, cli, tmp_path, table, key
):
    path = write_study(f'[study]\nname = "p"\nsampler = "pbt"\n{table}\n')
    done = cli("run", str(path))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and f"{path}: {key}:" in done.stderr
    assert not (tmp_path / "lrsearch-data").exists()  # checked before anything was made


def test_a_pbt_study_records_each_exploit_and_registers_the_best_member(write_study, cli, tmp_path):
    """8 members, 8 epochs, exploits every 2: in Optuna each trial keeps its first draw as
    params and what it ended with and how in its `pbt` attribute; in MLflow its lr curve
    changes at the epoch after each copy to the copy's value, its run logs the source at the
    copy's epoch and holds pbt.json; `best`, the SQL views, the parent's description and the
    report show the members as they ended; the registered model is the best member's."""
    done = cli("run", str(write_study(PBT_STUDY.format(trials=8, epochs=8, population=8, interval=2))))
    assert done.returncode == 0, done.stderr
    assert "a population of 8, [pbt].population" in done.stdout
    data = tmp_path / "lrsearch-data"
    study = optuna.load_study(study_name="pbt", storage=f"sqlite:///{data / 'optuna.db'}")
    trials = study.trials
    assert len(trials) == 8 and all(t.state.name == "COMPLETE" for t in trials)
    copied = [t for t in trials if t.user_attrs["pbt"]["exploits"]]
    assert len(copied) >= 2  # at epochs 1, 3 and 5, the bottom 2 of 8
    client = MlflowClient(f"sqlite:///{data / 'mlflow.db'}")
    for t in copied:
        run_id = t.user_attrs["mlflow_run_id"]
        exploits = t.user_attrs["pbt"]["exploits"]
        lrs = {m.step: m.value for m in client.get_metric_history(run_id, "lr")}
        for e in exploits:
            assert e["before"]["lr"] == pytest.approx(lrs[e["epoch"]]) and e["after"]["lr"] == pytest.approx(
                lrs[e["epoch"] + 1]
            )
        sources = {m.step: int(m.value) for m in client.get_metric_history(run_id, COPIED_FROM)}
        assert sources == {e["epoch"]: e["source"] for e in exploits}
        assert (
            json.loads(
                client.download_artifacts(run_id, "pbt.json", str(tmp_path)) and (tmp_path / "pbt.json").read_text()
            )
            == t.user_attrs["pbt"]
        )
        run = client.get_run(run_id)
        assert (
            "ended with" in run.data.tags["mlflow.note.content"]
            and "copied trial" in run.data.tags["mlflow.note.content"]
        )
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"], rel=1e-3)  # the first draw
        assert t.user_attrs["pbt"]["final"]["lr"] == pytest.approx(lrs[7])
    best = json.loads(cli("best", "pbt", "--format", "json").stdout)
    top = study.best_trial
    assert best[0]["number"] == top.number and best[0]["params"] == top.user_attrs["pbt"]["final"]
    assert best[0]["drawn"] == top.params  # the SQL view's params, to the last digit
    model = study.user_attrs["lrsearch_model"]
    assert model["trial"] == top.number and model["uri"] == "models:/pbt@best"
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert "discovered schedule" in parent.data.tags["mlflow.note.content"]
    assert (data / "reports" / "pbt" / "pbt_schedule.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_service_worker_trains_populations_of_a_submitted_pbt_study(store, tmp_path, request):
    """`submit` + the file-less `worker` on a 6-member study with populations of 4: a
    population of 4, then one of the 2 left; every member done with its own complete run
    and its `pbt` record; the worker's --array does not change a population's size."""
    import tomllib

    from test_service import _parent, _submitted, _trials, _wait, _worker

    cfg = parse_config(tomllib.loads(PBT_STUDY.format(trials=6, epochs=6, population=4, interval=2)), "pbt.toml")
    stores = _submitted(cfg, store, tmp_path, request)
    worker = _worker(*stores, 3, array=1)
    row = _wait(stores, "pbt", lambda r: r["state"] == "done", [worker])
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    assert (row["complete"] + row["pruned"], row["fail"], row["running"]) == (6, 0, 0)
    client, parent, runs = _parent(stores[1], "pbt")
    assert parent.data.tags["array"] == "4" and parent.data.tags["array.size"] == "4"
    trials = {str(t.number): t for t in _trials(stores[0], "pbt")}
    assert all("pbt" in t.user_attrs for t in trials.values())
    for run in (r for r in runs if r.data.tags["lrsearch.role"] == "trial"):
        trial = trials[run.data.tags["trial_number"]]
        assert run.data.tags["state"] == trial.state.name == "COMPLETE"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "lr")] == list(range(6))
        copies = sorted(m.step for m in client.get_metric_history(run.info.run_id, COPIED_FROM))
        assert copies == [e["epoch"] for e in trial.user_attrs["pbt"]["exploits"]]
    from lrsearch.sql.queries import ResultsDatabase

    with ResultsDatabase(*stores) as db:  # the views' typed columns: what each member ended with
        rows = db.query(
            "SELECT trial_number, optimizer, lr, momentum, pbt FROM trials WHERE study_name = 'pbt'"
        ).records()
    for row in rows:
        final = trials[str(row["trial_number"])].user_attrs["pbt"]["final"]
        assert (row["optimizer"], row["lr"], row["momentum"]) == (
            final["optimizer"],
            pytest.approx(final["lr"]),
            final.get("momentum"),
        )
        assert (json.loads(row["pbt"]) if isinstance(row["pbt"], str) else row["pbt"])["final"] == pytest.approx(final)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["epoch", "boundary"])
def test_a_sigterm_mid_population_ends_it_and_the_rest_start_a_new_one(write_study, tmp_path, moment):
    """SIGTERM while a population of 4 trains (at an epoch's end, or at the host's boundary
    after an exploit): `run` exits 143 in one line, nothing RUNNING in Optuna or MLflow, the
    members FAIL and queued again with their first draws; the same command then trains them
    as a new population, from epoch 0, and completes the study."""
    import os
    import subprocess
    import sys

    def _trials(tmp_path):
        return optuna.load_study(study_name="pbt", storage=f"sqlite:///{tmp_path / 'data' / 'optuna.db'}").trials

    def _runs(tmp_path):
        client = MlflowClient(f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}")
        return client.search_runs([client.get_experiment_by_name("pbt").experiment_id])

    study = write_study(PBT_STUDY.format(trials=4, epochs=6, population=4, interval=1))
    env = {**os.environ, "LRSEARCH_DATA": str(tmp_path / "data")}
    command = [sys.executable, "-m", "lrsearch.cli", "run", str(study), "--no-report"]
    stopped = subprocess.run(
        command, cwd=tmp_path, env={**env, "LRSEARCH_SIGNAL_AT": moment}, capture_output=True, text=True, timeout=300
    )
    trials = _trials(tmp_path)
    seen = [(t.number, t.state.name, t.user_attrs.get("reason")) for t in trials]
    assert stopped.returncode == 143 and "Traceback" not in stopped.stderr, (stopped.stderr, seen)
    assert all(t.state.name != "RUNNING" for t in trials) and all(r.info.status != "RUNNING" for r in _runs(tmp_path))
    interrupted = {t.number: t.params for t in trials if t.state.name == "FAIL"}
    assert len(interrupted) == 4, seen
    queued = {t.system_attrs["failed_trial"]: t.params for t in trials if t.state.name == "WAITING"}
    assert queued == interrupted  # their first draws, not what they had become
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    done = [t for t in _trials(tmp_path) if t.state.name == "COMPLETE"]
    assert len(done) == 4 and all(t.user_attrs["epochs_trained"] == 6 for t in done)
    assert sorted(t.system_attrs["failed_trial"] for t in done) == sorted(interrupted)
    assert all(e["source"] in {t.number for t in done} for t in done for e in t.user_attrs["pbt"]["exploits"])
