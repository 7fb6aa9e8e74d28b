"""The learning-rate range test (Lightning's Tuner.lr_find on the study's data and model):
its suggestion rule, the `lr-find` command and its MLflow record, a flat curve's one-line
answer, and a study whose lr range comes from it (`lr = { find = true }`)."""

from __future__ import annotations

import json
import math

import pytest
from mlflow import MlflowClient

from lrsearch.config import load_config, parse_config
from lrsearch.core import attrs
from lrsearch.fit.lr_find import MAX_LR, MIN_LR, STEPS, NoMinimum, range_test, suggest
from lrsearch.results.ranking import load_study
from lrsearch.service.launch import run_study


def test_the_suggestion_is_the_lowest_loss_before_it_climbs_back():
    # Past the first tenth: a fall, a low at index 60, a climb by more than half, and a
    # lower dip after the climb (ignored: the loss had already turned).
    losses = [5.0] * 10 + [5.0 - 0.08 * i for i in range(51)] + [1.2 + 0.1 * i for i in range(10)] + [0.5] * 29
    assert len(losses) == 100 and suggest(losses) == 60
    assert suggest([2.0] * 100) is None  # flat
    assert suggest([2.0] * 10 + [2.0 + 0.01 * i for i in range(90)]) is None  # rising from the start
    assert suggest([4.0] * 10 + [3.0, 2.0, 1.0, math.nan, 0.1]) == 12  # a NaN ends the sweep


def test_range_test_on_the_classic_problem_suggests_where_sgd_learns(tmp_path):
    cfg = load_config("studies/lr_sweep.toml")
    result = range_test(cfg)
    assert result.optimizer == "sgd" and len(result.sweeps) == 3
    for sweep in result.sweeps:
        assert sweep.lrs[0] == pytest.approx(MIN_LR) and len(sweep.lrs) <= STEPS and sweep.lrs[-1] <= MAX_LR
        assert all(a < b for a, b in zip(sweep.lrs, sweep.lrs[1:]))  # exponentially rising
    found = sorted(s.suggestion for s in result.sweeps)
    assert result.suggestion == found[1]  # the median
    # The classic grid learns well at 0.01-0.1 and nothing at 1e-5 or below; the range
    # test, a few epochs of rising rates, lands just below or in that band.
    assert 0.003 < result.suggestion < 0.1
    assert (result.low, result.high) == pytest.approx((result.suggestion / 10, result.suggestion * 10))


def test_lr_find_prints_records_and_draws(cli, tmp_path, write_study):
    path = write_study('[study]\nname = "sweep"\nseed = 3\n[params]\noptimizer = "sgd"\n')
    out = cli("lr-find", str(path), "--format", "json", "--factor", "5")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # Lightning's progress bar and hints stay quiet
    found = json.loads(out.stdout)
    assert found["optimizer"] == "sgd" and found["factor"] == 5
    assert (found["low"], found["high"]) == pytest.approx((found["suggestion"] / 5, found["suggestion"] * 5))
    plot = tmp_path / "lrsearch-data" / "reports" / "sweep" / "lr_find.png"
    assert found["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lrsearch-data", "study.toml"]  # no checkpoint left

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'lrsearch-data' / 'mlflow.db'}")
    run = client.get_run(found["mlflow_run_id"])
    assert run.info.run_name == "lr-find" and run.info.status == "FINISHED"
    assert run.data.tags["lrsearch.role"] == "lr-find" and "study" not in run.data.tags  # not a trial
    assert float(run.data.params["suggestion"]) == pytest.approx(found["suggestion"])
    lrs = client.get_metric_history(run.info.run_id, "lr_find/lr")
    losses = client.get_metric_history(run.info.run_id, "lr_find/loss")
    assert [m.step for m in lrs] == list(range(len(lrs))) and len(losses) == len(lrs) > 500
    assert found["suggestion"] in [m.value for m in lrs]  # a rate the sweep tried
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["lr_find.png"]

    table = cli("lr-find", str(path), "--optimizer", "adam")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == (
        "lr-find sweep: adam, batch size 32, 3 sweeps of 1000 rates from 1e-07 to 10 (Lightning's Tuner.lr_find)"
    )
    assert lines[1].startswith("suggested learning rate: ") and lines[2].startswith("search range: ")
    assert lines[4].startswith("MLflow: http://127.0.0.1:5000/#/experiments/")


def test_a_flat_curve_has_no_clear_minimum_and_writes_nothing(cli, tmp_path):
    # Constant features with balanced labels: the loss starts at ln 3 and cannot fall.
    (tmp_path / "flat.csv").write_text("a,b,label\n" + "".join(f"0,0,{i % 3}\n" for i in range(300)))
    (tmp_path / "flat.toml").write_text(
        '[study]\nname = "flat"\n[data]\nsource = "csv"\npath = "flat.csv"\n'
        'label = "label"\n[params]\nlr = { find = true }\n'
    )
    for command in (("lr-find", "flat.toml"), ("run", "flat.toml")):  # (run is submit, then workers)
        out = cli(*command)
        assert out.returncode == 1, command
        assert out.stderr == (
            "lrsearch: error: no clear minimum: the loss did not fall between 1e-07 and 10 (sgd, batch size 32)\n"
        ), command
        assert not (tmp_path / "lrsearch-data").exists(), command
    with pytest.raises(NoMinimum):
        range_test(load_config(tmp_path / "flat.toml"))


def test_a_study_with_a_found_range_stores_it_and_keeps_it_on_resume(cli, stores, write_study):
    text = (
        '[study]\nname = "found"\ntrials = 3\nseed = 1\npruner = "none"\n[train]\nepochs = 4\n'
        '[params]\noptimizer = "sgd"\nmomentum = 0.9\nlr = { find = true, factor = 4 }\n'
        'schedule = { choices = ["one_cycle", "cyclic", "cosine"] }\nwarmup_epochs = 1\n'
    )
    path = write_study(text)
    cfg = load_config(path)
    result = run_study(cfg, storage=stores[0], tracking=stores[1], study_file=path)
    study = load_study("found", stores[0])
    found = study.user_attrs[attrs.LR_RANGE]
    assert found["optimizer"] == "sgd" and found["factor"] == 4
    assert (found["low"], found["high"]) == pytest.approx((found["suggestion"] / 4, found["suggestion"] * 4))
    for t in study.trials:  # sampled inside the found range, on a log scale
        assert found["low"] <= t.params["lr"] <= found["high"]
        assert t.distributions["lr"].log
    client = MlflowClient(tracking_uri=stores[1])
    parent = client.get_run(result.parent_run_id).data.params
    assert float(parent["lr_find.low"]) == pytest.approx(found["low"])
    assert float(parent["lr_find.suggestion"]) == pytest.approx(found["suggestion"])
    assert json.loads(parent["params.lr"]) == {"find": True, "factor": 4.0}

    # A resumed study, another worker or validate: the stored range, no second test.
    more = run_study(cfg.with_overrides(trials=4), storage=stores[0], tracking=stores[1], study_file=path)
    assert len(more.study.trials) == 4
    assert load_study("found", stores[0]).user_attrs[attrs.LR_RANGE] == found
    lr_finds = client.search_runs([result.experiment_id], "tags.`lrsearch.role` = 'lr-find'")
    assert len(lr_finds) == 1
    shown = cli("validate", str(path), "--storage", stores[0])
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[1] == (
        f"lr: {found['low']:.3g} to {found['high']:.3g}, log scale (stored with the study in {stores[0]}: "
        f"the range test suggested {found['suggestion']:.3g} for sgd)"
    )


def test_find_is_for_lr_ranges_only():
    base = {"study": {"name": "x"}}
    for params, message in (
        (
            {"momentum": {"find": True}},
            "x.toml: [params].momentum.find: expected no find: only lr's range can come from the range test",
        ),
        ({"lr": {"find": False}}, "x.toml: [params].lr.find: expected true, got false"),
        ({"lr": {"find": True, "factor": 1}}, "x.toml: [params].lr.factor: expected a number > 1"),
        ({"lr": {"find": True, "low": 0.1}}, "x.toml: [params].lr.low: unknown key; a find table has find and factor"),
    ):
        with pytest.raises(Exception) as raised:
            parse_config({**base, "params": params}, "x.toml")
        assert str(raised.value).startswith(message), str(raised.value)
    with pytest.raises(Exception) as raised:
        parse_config({"study": {"name": "x", "sampler": "grid"}, "params": {"lr": {"find": True}}}, "x.toml")
    assert str(raised.value).startswith(
        "x.toml: [params].lr: expected a fixed value or { choices = [...] } for sampler 'grid'"
    )
