"""Study-file validation: every mistake named by file and key, before anything is created."""

from __future__ import annotations

from pathlib import Path

import pytest

from lrsearch.choices.space import Choices, Fixed, Range
from lrsearch.config import load_config, parse_config, to_toml_text
from lrsearch.core.errors import ConfigError


def _raw(params: dict | None = None, **sections: dict) -> dict:
    raw = {"study": {"name": "s"}, "params": params or {}}
    for name, table in sections.items():
        raw.setdefault(name, {}).update(table)
    return raw


def test_example_from_the_docs_parses(tmp_path):
    cfg = load_config("studies/quickstart.toml")
    assert cfg.study.name == "quickstart"
    assert cfg.params["optimizer"] == Choices(("sgd", "adam", "rmsprop", "adagrad"))
    assert cfg.params["lr"] == Range(1e-5, 1.0, log=True)
    assert cfg.params["patience"] == Choices((2, 5, 10, 15))
    assert cfg.data.source == "blobs" and cfg.data.cluster_std == 2.0 and cfg.data.random_state == 2


def test_defaults_and_fixed_values():
    cfg = parse_config(_raw({"lr": 0.1, "optimizer": "adam"}), "f.toml")
    assert cfg.params == {"lr": Fixed(0.1), "optimizer": Fixed("adam")}
    assert (cfg.study.direction, cfg.study.metric, cfg.study.sampler) == ("maximize", "val/acc", "tpe")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.model.hidden) == (200, 32, (50,))
    assert (cfg.study.prune_every, cfg.tracking.trial_plots) == (None, False)


def test_pruning_checks_every_fifth_of_the_epochs_unless_set():
    from lrsearch.choices.sampling import check_interval

    def interval(cfg):
        return check_interval(cfg.train.epochs, cfg.study.prune_every)

    assert interval(parse_config(_raw({}), "f.toml")) == 40  # 200 epochs
    assert interval(parse_config(_raw({}, train={"epochs": 5}), "f.toml")) == 1
    raw = {"study": {"name": "s", "prune_every": 3}, "tracking": {"trial_plots": True}}
    cfg = parse_config(raw, "f.toml")
    assert interval(cfg) == 3 and cfg.tracking.trial_plots is True


def test_integers_are_accepted_where_numbers_are_expected():
    cfg = parse_config(_raw({"momentum": {"low": 0, "high": 0.9}}, data={"cluster_std": 1}), "f.toml")
    assert cfg.params["momentum"] == Range(0.0, 0.9)
    assert cfg.data.cluster_std == 1.0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"study": {"name": "s", "trails": 3}},
            "f.toml: [study].trails: unknown key; expected one of name, direction, metric, trials, sampler, seed, "
            "pruner, prune_every, priority (did you mean 'trials'?)",
        ),
        (
            {"study": {"name": "s"}, "prams": {}},
            "f.toml: [prams]: unknown table; expected one of study, data, model, "
            "train, params, tracking, pbt (did you mean 'params'?)",
        ),
        ({"study": {"name": "s"}, "optimizer": {}}, "f.toml: [optimizer]: unknown table"),
        (
            {"study": {}},
            "f.toml: [study].name: expected 1 to 100 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (it is required)",
        ),
        (
            {"study": {"name": "../../x"}},
            "f.toml: [study].name: expected 1 to 100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, got '../../x'",
        ),
        ({"study": {"name": "/abs/path/x"}}, "f.toml: [study].name: expected 1 to 100 letters"),
        ({"study": {"name": "x" * 300}}, "f.toml: [study].name: expected 1 to 100 letters"),
        ({}, "f.toml: [study]: expected this table (it is required)"),
        (
            {"study": {"name": "s", "trials": "ten"}},
            "f.toml: [study].trials: expected an integer in [1, 100000], got 'ten'",
        ),
        ({"study": {"name": "s", "trials": 0}}, "f.toml: [study].trials: expected an integer in [1, 100000], got 0"),
        (
            {"study": {"name": "s", "sampler": "bayes"}},
            "f.toml: [study].sampler: expected one of 'tpe', 'random', 'grid', 'qmc', 'pbt', got 'bayes'",
        ),
        ({"study": {"name": "s", "direction": "up"}}, "f.toml: [study].direction: expected one of 'maximize'"),
        ({"study": {"name": "s", "pruner": "early"}}, "f.toml: [study].pruner: expected one of 'none'"),
        ({"study": {"name": "s", "metric": "acc"}}, "f.toml: [study].metric: expected one of 'val/acc'"),
        ({"study": {"name": "s", "prune_every": 0}}, "f.toml: [study].prune_every: expected an integer >= 1, got 0"),
        (
            {"study": {"name": "s"}, "tracking": {"trial_plots": 1}},
            "f.toml: [tracking].trial_plots: expected true or false, got 1",
        ),
        ({"study": {"name": "s"}, "tracking": {"plots": True}}, "f.toml: [tracking].plots: unknown key"),
        (_raw(train={"epochs": 2.5}), "f.toml: [train].epochs: expected an integer in [1, 100000], got 2.5"),
        (_raw(train={"batch_size": True}), "f.toml: [train].batch_size: expected an integer in [1, 1000000], got true"),
        (_raw(data={"source": "mnist"}), "f.toml: [data].source: expected one of 'blobs', 'moons', 'digits', 'csv'"),
        (_raw(data={"val_fraction": 1.0}), "f.toml: [data].val_fraction: expected a number in (0, 1), got 1.0"),
        (_raw(data={"source": "csv", "label": "y"}), "f.toml: [data].path: expected the CSV file's path"),
        (
            _raw(data={"source": "csv", "path": "missing.csv", "label": "y"}),
            "f.toml: [data].path: expected an existing CSV file, got 'missing.csv'",
        ),
        (
            _raw(model={"hidden": [50, 0]}),
            "f.toml: [model].hidden: expected a list of 1 to 8 integers in [1, 4096], got [50, 0]",
        ),
        (_raw(model={"hidden": [1_000_000_000]}), "f.toml: [model].hidden: expected a list of 1 to 8 integers"),
        (_raw(model={"hidden": [1e9]}), "f.toml: [model].hidden: expected a list of 1 to 8 integers"),
        (_raw(data={"n_samples": 10**12}), "f.toml: [data].n_samples: expected an integer in [4, 1000000], got "),
        (
            _raw(data={"n_samples": 1e12}),
            "f.toml: [data].n_samples: expected an integer in [4, 1000000], got 1000000000000.0",
        ),
        (
            _raw(data={"n_samples": 1_000_000, "n_features": 1000}),
            "f.toml: [data].n_samples: expected n_samples x n_features <= 20,000,000 (about 160 MB), "
            "got 1,000,000 x 1,000",
        ),
        (_raw(data={"cluster_std": float("inf")}), "f.toml: [data].cluster_std: expected a finite number > 0, got inf"),
        (_raw(data={"noise": float("nan")}), "f.toml: [data].noise: expected a finite number >= 0, got nan"),
        (_raw(data={"random_state": 2**40}), "f.toml: [data].random_state: expected an integer in [0, 4294967295]"),
        (_raw({"lr": float("inf")}), "f.toml: [params].lr: expected a finite number > 0, got inf"),
        (
            _raw({"lr": {"low": 1e-5, "high": float("inf")}}),
            "f.toml: [params].lr.high: expected a finite number > 0, got inf",
        ),
        (
            _raw({"lr": {"choices": [0.1, float("nan")]}}),
            "f.toml: [params].lr.choices: expected a finite number > 0, got nan",
        ),
        (
            _raw({"momentum": {"low": 0.0, "high": 0.9, "step": float("inf")}}),
            "f.toml: [params].momentum.step: expected a finite number > 0, got inf",
        ),
        (_raw(model={"activation": "swish"}), "f.toml: [model].activation: expected one of 'relu'"),
        (
            _raw({"learning_rate": 0.1}),
            "f.toml: [params].learning_rate: unknown hyperparameter; expected one of optimizer, lr,",
        ),
        (_raw({"nesterov": 1}), "f.toml: [params].nesterov: expected true or false, got 1"),
        (
            _raw({"nesterov": {"choices": [True, "yes"]}}),
            "f.toml: [params].nesterov.choices: expected true or false, got 'yes'",
        ),
        (_raw({"nesterov": {"low": 0, "high": 1}}), "f.toml: [params].nesterov: expected true or false, or { choices"),
        (_raw({"weight_decay": -0.1}), "f.toml: [params].weight_decay: expected a finite number >= 0, got -0.1"),
        (
            _raw({"moment": 0.9}),
            "f.toml: [params].moment: unknown hyperparameter; expected one of optimizer, lr, "
            "momentum, nesterov, weight_decay, warmup_epochs, schedule, decay, step_size, gamma, t_max, patience, "
            "factor, "
            "pct_start, anneal, mode, base_fraction, half_cycle (did you mean 'momentum'?)",
        ),
        (
            _raw({"schedule": "one_cycle", "anneal": "cosine"}),
            "f.toml: [params].anneal: expected one of 'cos', 'linear', got 'cosine'",
        ),
        (_raw({"warmup_epochs": -1}), "f.toml: [params].warmup_epochs: expected an integer >= 0 (epochs), got -1"),
        (_raw({"lr": {"low": 1.0, "high": 0.1}}), "f.toml: [params].lr: expected low <= high, got low=1.0, high=0.1"),
        (
            _raw({"lr": {"low": 0.0, "high": 0.1, "log": True}}),
            "f.toml: [params].lr.low: expected a finite number > 0, got 0.0",
        ),
        (
            _raw({"decay": {"low": 0.0, "high": 0.1, "log": True}}),
            "f.toml: [params].decay.low: expected a finite number > 0 when log = true, got 0.0",
        ),
        (_raw({"lr": {"low": 0.1}}), "f.toml: [params].lr.high: expected a high bound (a finite number > 0)"),
        (_raw({"lr": {"low": 0.1, "high": 1, "scale": "log"}}), "f.toml: [params].lr.scale: unknown key"),
        (
            _raw({"lr": {"choices": []}}),
            "f.toml: [params].lr.choices: expected a non-empty list of a finite number > 0, got []",
        ),
        (
            _raw({"lr": {"choices": [0.1, "fast"]}}),
            "f.toml: [params].lr.choices: expected a finite number > 0, got 'fast'",
        ),
        (_raw({"momentum": 1.5}), "f.toml: [params].momentum: expected a number in [0, 1), got 1.5"),
        (
            _raw({"optimizer": "lamb"}),
            "f.toml: [params].optimizer: expected one of 'sgd', 'adam', 'rmsprop', 'adagrad', 'adamw', got 'lamb'",
        ),
        (
            _raw({"optimizer": {"choices": ["sgd", "lbfgs"]}}),
            "f.toml: [params].optimizer.choices: expected one of 'sgd', 'adam', 'rmsprop', 'adagrad', 'adamw', "
            "got 'lbfgs'",
        ),
        (_raw({"schedule": "warmup"}), "f.toml: [params].schedule: expected one of 'constant', 'time_decay'"),
        (_raw({"optimizer": {"low": 0, "high": 1}}), "f.toml: [params].optimizer: expected one of 'sgd'"),
        (
            _raw({"patience": {"low": 2.5, "high": 10}}),
            "f.toml: [params].patience.low: expected an integer >= 0 (epochs), got 2.5",
        ),
        (
            _raw({"lr": {"low": 1e-3, "high": 1.0}}, study={"sampler": "grid"}),
            "f.toml: [params].lr: expected a fixed value or { choices = [...] } for sampler 'grid'",
        ),
        (
            _raw(study={"sampler": "grid"}),
            "f.toml: [params]: expected at least one entry with choices for sampler 'grid'",
        ),
    ],
)
def test_mistakes_are_reported_with_file_and_key(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "f.toml")
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[study\nname = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML: "):
        load_config(bad)


def test_csv_path_is_relative_to_the_study_file(tmp_path):
    (tmp_path / "d.csv").write_text("a,b,y\n1,2,x\n")
    study = tmp_path / "s.toml"
    study.write_text('[study]\nname = "s"\n[data]\nsource = "csv"\npath = "d.csv"\nlabel = "y"\n')
    assert load_config(study).data.path == (tmp_path / "d.csv").resolve()


@pytest.mark.parametrize("study", sorted(Path("studies").glob("*.toml")), ids=lambda p: p.stem)
def test_a_stored_configuration_written_as_a_study_file_reads_back_equal(tmp_path, study):
    """``to_toml_text``: the ``study.toml`` a worker logs for a study it has no file of."""
    cfg = load_config(study)
    back = load_config(_written(tmp_path, to_toml_text(cfg)))
    assert back.to_toml() == cfg.to_toml() and back.differences(cfg) == []


def test_a_written_study_file_keeps_every_kind_of_spec_and_a_csv_path(tmp_path):
    (tmp_path / 'd "1".csv').write_text("a,b,y\n1,2,x\n")
    params = {
        "lr": {"find": True, "factor": 3.0},
        "momentum": {"low": 0.0, "high": 0.9, "step": 0.1},
        "optimizer": {"choices": ["sgd", "adam"]},
        "nesterov": True,
    }
    data = {"source": "csv", "path": 'd "1".csv', "label": "y"}
    cfg = parse_config(_raw(params, data=data, model={"hidden": [8, 4]}), "f.toml", base_dir=tmp_path)
    back = load_config(_written(tmp_path, to_toml_text(cfg)))
    assert back.params == cfg.params and back.data == cfg.data and back.model == cfg.model
    assert back.differences(cfg) == []


def _written(folder: Path, text: str) -> Path:
    assert text.startswith("# study ")
    (folder / "written.toml").write_text(text)
    return folder / "written.toml"


def test_a_study_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[study]\nname = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: expected UTF-8 text, got byte 0xe9 at offset 19"


def test_a_bad_name_on_the_command_line_is_refused():
    from lrsearch.core.errors import UsageError

    cfg = parse_config(_raw(), "f.toml")
    with pytest.raises(UsageError, match=r"^--name: expected 1 to 100 letters, .*got '\.\./x'$"):
        cfg.with_overrides(name="../x")


def test_overrides_replace_trials_epochs_and_name():
    cfg = parse_config(_raw(study={"trials": 5}), "f.toml").with_overrides(trials=9, epochs=4, name="other")
    assert (cfg.study.trials, cfg.train.epochs, cfg.study.name) == (9, 4, "other")


def test_the_docs_tables_are_generated_from_the_registries():
    from lrsearch.results.docs import DOCS, main, render

    page = (DOCS / "study-files.md").read_text()
    assert "<!-- lrsearch.docs: hyperparameters -->" in page and "<!-- lrsearch.docs: choices -->" in page
    assert render(page) == page, "docs tables are out of date: run python -m lrsearch.results.docs"
    assert "| `weight_decay` | optimizer is `adamw` |" in page
    assert "| `nesterov` | optimizer is `sgd`, momentum > 0 | `true`, `false` | `false` |" in page
    # Every key of every section, in the words its error message uses (one constraint object each).
    import dataclasses

    from lrsearch.config import DataConfig, ModelConfig, StudyConfig, TrackingConfig, TrainConfig

    for section, schema in (
        ("study", StudyConfig),
        ("data", DataConfig),
        ("model", ModelConfig),
        ("train", TrainConfig),
        ("tracking", TrackingConfig),
    ):
        for f in dataclasses.fields(schema):
            assert f"| `[{section}].{f.name}` |" in page
    assert '| `[train].array` | string or integer | `auto` | "auto" or an integer in [1, 256] |' in page
    with pytest.raises(ConfigError, match=r'\[train\]\.array: expected "auto" or an integer in \[1, 256\], got 0'):
        parse_config(_raw({}, train={"array": 0}), "f.toml")
    states = (DOCS / "service.md").read_text()
    assert "<!-- lrsearch.docs: phases -->" in states and render(states) == states
    assert main(["--check"]) == 0  # every page, as CI checks them
