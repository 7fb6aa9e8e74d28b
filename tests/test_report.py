"""Reports from tiny real studies (grid and TPE), the results table, and the shipped studies."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from lrsearch.config import load_config, parse_config
from lrsearch.results.report import results_table, write_report
from lrsearch.service.launch import run_study

STUDIES = sorted((Path(__file__).parent.parent / "studies").glob("*.toml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_every_shipped_study_validates(path):
    cfg = load_config(path)
    assert cfg.study.name == path.stem
    assert path.read_text().startswith("#")  # each names its purpose at the top


def test_the_classic_studies_follow_the_protocol():
    for name in ("lr_sweep", "momentum", "time_decay", "plateau", "adaptive", "schedules"):
        cfg = load_config(Path("studies") / f"{name}.toml")
        assert cfg.study.sampler == "grid" and cfg.train.epochs == 200 and cfg.train.batch_size == 32
        assert (
            cfg.data.source,
            cfg.data.n_samples,
            cfg.data.centers,
            cfg.data.cluster_std,
            cfg.data.random_state,
            cfg.data.val_fraction,
        ) == ("blobs", 1000, 3, 2.0, 2, 0.5)
        assert (cfg.model.hidden, cfg.model.activation, cfg.model.init) == ((50,), "relu", "he_uniform")


def _grid(stores, tmp_path):
    cfg = parse_config(
        {
            "study": {"name": "grid", "sampler": "grid", "pruner": "none", "seed": 1},
            "train": {"epochs": 4, "batch_size": 64},
            "params": {"optimizer": "sgd", "lr": {"choices": [0.5, 0.05, 1e-6]}},
        },
        "grid.toml",
    )
    return run_study(cfg, storage=stores[0], tracking=stores[1])


def test_grid_report_has_the_figure_grid_and_is_logged(stores, tmp_path):
    result = _grid(stores, tmp_path)
    paths = write_report("grid", storage=stores[0], tracking=stores[1], out=tmp_path / "report")
    names = sorted(p.name for p in paths)
    assert names == [
        "grid_accuracy.png",
        "grid_lr.png",
        "objective_vs_lr.png",
        "optimization_history.png",
        "parallel_coordinate.png",
        "param_importances.png",
        "report.html",
        "slices.png",
    ]
    for p in paths:
        assert p.stat().st_size > 1000
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert _png_size(p)[0] >= 1600, p.name  # hi-dpi: sharp at full page width
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 7 and "lr=0.05" in page
    assert "img{width:100%" in page
    client = MlflowClient(tracking_uri=stores[1])
    logged = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert logged == {f"report/{n}" for n in names} | {"report/preview"}
    # The description's copies, small enough for MLflow's description box.
    previews = {a.path: a for a in client.list_artifacts(result.parent_run_id, "report/preview")}
    assert set(previews) == {
        f"report/preview/{n}" for n in ("grid_accuracy.png", "optimization_history.png", "objective_vs_lr.png")
    }


def test_tpe_report_has_no_grid_figures(stores, tmp_path):
    cfg = parse_config(
        {
            "study": {"name": "tpe", "trials": 4, "seed": 3, "pruner": "none"},
            "train": {"epochs": 3, "batch_size": 64},
            "params": {"optimizer": {"choices": ["sgd", "adam"]}, "lr": {"low": 1e-3, "high": 0.3, "log": True}},
        },
        "tpe.toml",
    )
    run_study(cfg, storage=stores[0], tracking=stores[1])
    paths = write_report("tpe", storage=stores[0], tracking=stores[1], out=tmp_path / "tpe")
    assert {p.name for p in paths} == {
        "objective_vs_lr.png",
        "optimization_history.png",
        "lr_curves.png",
        "param_importances.png",
        "parallel_coordinate.png",
        "slices.png",
        "report.html",
    }


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_a_minimize_study_report_ranks_complete_before_pruned_with_why_and_where(stores, tmp_path):
    # lr 1e8 diverges at once: PRUNED, with its reason. The others rank by val/loss, lowest first.
    cfg = parse_config(
        {
            "study": {
                "name": "mini",
                "sampler": "grid",
                "pruner": "none",
                "seed": 1,
                "direction": "minimize",
                "metric": "val/loss",
            },
            "train": {"epochs": 3, "batch_size": 64},
            "params": {"optimizer": "sgd", "lr": {"choices": [0.002, 0.05, 1e8]}, "momentum": {"choices": [0.0, 0.9]}},
        },
        "mini.toml",
    )
    result = run_study(cfg, storage=stores[0], tracking=stores[1])
    write_report("mini", storage=stores[0], tracking=stores[1], out=tmp_path / "mini")
    page = (tmp_path / "mini" / "report.html").read_text()
    assert "<h2>Trials, best first (minimize; COMPLETE before PRUNED, then trials without a value)" in page
    body = page.split("<th>MLflow run</th></tr>", 1)[1]
    rows = [[c.split(">", 1)[1] for c in row.split("</td>")[:-1]] for row in body.split("</tr>")[:-1]]
    trials = {t.number: t for t in result.study.trials}
    complete = sorted((t for t in trials.values() if t.state.name == "COMPLETE"), key=lambda t: (t.value, t.number))
    pruned = sorted((t for t in trials.values() if t.state.name == "PRUNED"), key=lambda t: t.number)
    assert len(complete) == 4 and len(pruned) == 2
    assert [int(r[1]) for r in rows] == [t.number for t in complete + pruned]
    for row in rows:
        t = trials[int(row[1])]
        assert row[2] == t.state.name and row[4] == str(t.user_attrs["epochs_trained"])
        # Its share of its array's training time, then its wall time (claim to end).
        assert float(row[5]) == pytest.approx(t.user_attrs["train_seconds"], abs=0.0051)
        assert float(row[6]) == pytest.approx(t.duration.total_seconds(), abs=0.0051)
        assert float(row[5]) < float(row[6])
        assert row[8] == (t.user_attrs.get("reason") or "")
        run_id = t.user_attrs["mlflow_run_id"]
        assert row[9] == (
            f'<a href="http://127.0.0.1:5000/#/experiments/{result.experiment_id}/runs/{run_id}'
            f'?workflowType=machine_learning">{run_id[:8]}</a>'
        )
    assert rows[-1][8].startswith("non-finite train/loss at epoch ")
    # With momentum searched beside lr: Optuna's contour of the two.
    assert (tmp_path / "mini" / "contour_lr_momentum.png").is_file()


def test_results_table_from_the_stores(stores, tmp_path):
    result = _grid(stores, tmp_path)
    table = results_table("grid", storage=stores[0], tracking=stores[1]).splitlines()
    assert table[0] == "| lr | final val acc | first epoch with val acc ≥ 0.80 |"
    assert [row.split("|")[1].strip() for row in table[2:]] == ["0.5", "0.05", "1e-06"]
    by_lr = {t.params["lr"]: t for t in result.study.trials}
    client = MlflowClient(tracking_uri=stores[1])
    for row in table[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        trial = by_lr[float(cells[0])]
        assert float(cells[1]) == pytest.approx(trial.value, abs=5e-4)  # the stored final val acc
        history = sorted(
            (m.step, m.value) for m in client.get_metric_history(trial.user_attrs["mlflow_run_id"], "val/acc")
        )
        first = next((step + 1 for step, value in history if value >= 0.80), None)  # epochs counted from 1
        assert cells[2] == ("never" if first is None else str(first))


@pytest.mark.slow
def test_the_experiments_script_prints_tables_from_a_tiny_run(tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    script = Path(__file__).parent.parent / "bench" / "experiments.py"
    monkeypatch.setenv("LRSEARCH_DATA", "")  # the script sets it from --data: put back after
    monkeypatch.setattr(sys, "argv", [str(script), "--data", str(tmp_path / "data"), "--epochs", "1"])
    runpy.run_path(str(script), run_name="__main__")  # in this process: no second start-up
    out = capsys.readouterr().out
    for header in (
        "| lr | final val acc |",
        "| momentum | final val acc |",
        "| decay | final val acc |",
        "| patience | final val acc |",
        "| optimizer | final val acc |",
        "| optimizer | warmup_epochs | schedule | final val acc |",
    ):
        assert header in out
    trials = load_config(Path(__file__).parent.parent / "studies" / "search.toml").study.trials
    assert "| the five grids (24 trials) |" in out and f"| TPE search ({trials} trials" in out
    last_cells = [
        line.strip("|").split("|")[-1].strip()
        for line in out.splitlines()
        if line.startswith("| ")
        and "final val acc" not in line
        and "epochs trained" not in line
        and not line.startswith("| the five")
        and not line.startswith("| TPE")
    ]
    # 24 grid trials and 16 schedule trials; one epoch: 0.80 at epoch 1, or never
    assert len(last_cells) == 40 and set(last_cells) <= {"never", "1"}


# -- the figures as drawn: properties a reader sees ------------------------------------------


def _search_like_study(trials: int = 24):
    """A real (in-memory) Optuna study over search.toml's space, with made-up objective values:
    the figures depend only on the trials' params and values, so nothing is trained."""
    import optuna

    def objective(trial):
        optimizer = trial.suggest_categorical("optimizer", ["sgd", "adam", "rmsprop", "adagrad"])
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        if optimizer in ("sgd", "rmsprop"):
            trial.suggest_float("momentum", 0.0, 0.99)
        schedule = trial.suggest_categorical("schedule", ["constant", "time_decay", "step", "cosine", "plateau"])
        if schedule == "time_decay":
            trial.suggest_float("decay", 1e-4, 1e-1, log=True)
        if schedule == "plateau":
            trial.suggest_categorical("patience", [2, 5, 10])
        return 0.85 - 0.05 * abs(math.log10(lr) + 1.5)

    import math

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="search", direction="maximize", sampler=optuna.samplers.RandomSampler(seed=3)
    )
    study.optimize(objective, n_trials=trials)
    return study


def _drawn_texts(fig):
    """Every piece of text the figure draws, with its extent on the canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    if not isinstance(fig.canvas, FigureCanvasAgg):  # a Figure without pyplot
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks, drawn = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_transform().transform(axis.get_view_interval()))
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                labels = (tick.label1, tick.label2)
                ticks.update(map(id, labels))
                where = axis.get_transform().transform(tick.get_loc())
                if ax.get_visible() and low - 1e-9 <= where <= high + 1e-9:  # drawn
                    drawn += [t for t in labels if t.get_visible() and t.get_text()]
    drawn += [
        t
        for t in fig.findobj(Text)
        if id(t) not in ticks and t.get_visible() and t.get_text().strip() and (t.axes is None or t.axes.get_visible())
    ]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in drawn]


def _overlapping(fig):
    texts = _drawn_texts(fig)
    return [(a, b) for i, (a, box_a) in enumerate(texts) for b, box_b in texts[i + 1 :] if box_a.overlaps(box_b)]


def test_slices_labels_keep_clear_of_each_other():
    from lrsearch.results.optuna_figures import slices_figure

    with slices_figure(_search_like_study(), "search") as fig:
        assert _overlapping(fig) == []
        panels = [
            ax for ax in fig.axes if ax.get_xlabel() in ("optimizer", "schedule", "lr", "momentum", "decay", "patience")
        ]
        assert len(panels) == 6
        texts = [text for text, _ in _drawn_texts(fig)]
        assert {"adagrad", "time_decay", "plateau"} <= set(texts)  # categories unquoted, every one shown
        # One colour scale for every panel: a trial has one colour everywhere.
        norms = {
            (c.norm.vmin, c.norm.vmax)
            for ax in panels
            for c in ax.collections
            if c.get_array() is not None and len(c.get_array())
        }
        assert norms == {(0, 23)}
    import matplotlib

    assert matplotlib.rcParams["axes.facecolor"] == "white"  # Optuna's ggplot style stayed in its figure


def test_parallel_coordinates_labels_read_over_the_lines():
    from lrsearch.results.optuna_figures import parallel_figure

    with parallel_figure(_search_like_study(), "search") as fig:
        assert _overlapping(fig) == []
        (ax,) = [a for a in fig.axes if a.collections and a.get_title()]
        twins = [a for a in ax.get_shared_x_axes().get_siblings(ax) if a is not ax]
        assert len(twins) == 6  # one axis per parameter
        assert all(fig.axes.index(t) > fig.axes.index(ax) and t.get_zorder() >= ax.get_zorder() for t in twins)
        labels = [label for twin in twins for label in twin.get_yticklabels() if label.get_text()]
        assert len(labels) >= 12
        for label in labels:  # on a white ground, drawn after (above) the lines
            ground = label.get_bbox_patch()
            assert ground is not None and ground.get_facecolor()[:3] == (1.0, 1.0, 1.0), label.get_text()
            assert ground.get_alpha() >= 0.8


def test_lr_curves_legend_reads_in_the_description():
    from lrsearch.results.figures import PREVIEW_WIDTH, lr_figure
    from lrsearch.results.trial_curves import TrialCurves

    params = {
        "optimizer": "rmsprop",
        "lr": 0.019012345,
        "momentum": 0.403312,
        "schedule": "plateau",
        "patience": 10,
        "decay": 0.000123456,
    }
    trials = [
        TrialCurves(n, "COMPLETE", 0.83 - n / 100, params, params, {"lr": [(e, 0.019 / (1 + e)) for e in range(20)]})
        for n in range(5)
    ]
    fig = lr_figure(trials, [], "search: learning rate per epoch of the top 5 trials", rank=True)
    legend = fig.axes[0].get_legend()
    pixels_per_point = PREVIEW_WIDTH / (fig.get_figwidth() * 72)  # in the description's copy
    assert all(t.get_fontsize() * pixels_per_point >= 13 for t in legend.get_texts())
    assert _overlapping(fig) == []
    inside = fig.bbox.padded(-1)  # the whole legend in the figure: long labels wrap, not cut
    box = legend.get_window_extent()
    assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0
    ticks = [float(t.get_text().replace("−", "-")) for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert ticks and all(t == int(t) for t in ticks)  # epochs
