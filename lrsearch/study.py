"""Studies: create or resume one from a config, run its trials, and read back the best."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from lrsearch.config import DEFAULT_TRIALS, Config
from lrsearch.data import load_data
from lrsearch.errors import UsageError
from lrsearch.objective import MLFLOW_RUN_ATTR, Objective
from lrsearch.space import grid_size, grid_space
from lrsearch.storage import open_storage, redact, storage_url, tracking_uri
from lrsearch.tracking import Tracker

PARENT_RUN_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment_id"
# Trials that count towards a study's total: a FAIL is retried, a PRUNED one is an answer.
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)

TrialCallback = Callable[[optuna.Study, FrozenTrial], None]


@dataclass
class StudyRun:
    """A study after ``run_study``: where its records are and how to find them."""

    study: optuna.Study
    target: int
    experiment_id: str
    parent_run_id: str
    url: str


def target_trials(cfg: Config) -> int:
    """The study's total: ``trials``, capped at the grid's size for a grid study."""
    if cfg.study.sampler == "grid":
        size = grid_size(cfg.params)
        return min(cfg.study.trials or size, size)
    return cfg.study.trials or DEFAULT_TRIALS


def make_sampler(cfg: Config, n_existing: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler. A seeded sampler is re-seeded from the trials already run, so
    a resumed study continues its sequence instead of proposing its first trials again."""
    seed = None if cfg.study.seed is None else (cfg.study.seed + 7919 * n_existing) % 2**31
    name = cfg.study.sampler
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid_space(cfg.params), seed=seed)
    return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    """The study's pruner; epochs are its steps."""
    epochs = cfg.train.epochs
    name = cfg.study.pruner
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, epochs // 10))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


def run_study(cfg: Config, *, storage: str | None = None, tracking: str | None = None,
              study_file: Path | None = None, callbacks: Sequence[TrialCallback] = (),
              on_start: Callable[[int, int], None] | None = None) -> StudyRun:
    """Create or resume the study ``cfg`` describes and run trials until its total is reached.

    ``on_start(target, finished)`` is called once the study is open; ``callbacks`` after
    each trial, as ``study.optimize`` calls them.
    """
    data = load_data(cfg.data)  # bad data is reported before any store is created
    tracker = Tracker(tracking_uri(tracking))
    tracker.check()
    url = storage_url(storage)
    study = _open_study(cfg, url)
    experiment_id = tracker.experiment(cfg.study.name)
    parent_run_id = tracker.start_study(
        experiment_id, cfg.study.name, params=_flatten(cfg.to_dict()),
        tags={"sampler": cfg.study.sampler, "pruner": cfg.study.pruner, "storage": redact(url),
              "direction": cfg.study.direction, "metric": cfg.study.metric},
        study_file=study_file, run_id=study.user_attrs.get(PARENT_RUN_ATTR),
    )
    study.set_user_attr(PARENT_RUN_ATTR, parent_run_id)
    study.set_user_attr(EXPERIMENT_ATTR, experiment_id)
    target = target_trials(cfg)
    objective = Objective(cfg, data, tracker, experiment_id, parent_run_id)
    status = "FAILED"
    try:
        remaining = target - count_finished(study)
        if on_start is not None:
            on_start(target, target - remaining)
        if remaining > 0:
            limit = optuna.study.MaxTrialsCallback(target, states=FINISHED_STATES)
            study.optimize(objective, n_trials=remaining, callbacks=[limit, *callbacks], gc_after_trial=False)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end_run(parent_run_id, status, _summary(study))
    return StudyRun(study, target, experiment_id, parent_run_id, tracker.run_url(experiment_id, parent_run_id))


def _open_study(cfg: Config, url: str) -> optuna.Study:
    storage = open_storage(url)
    name = cfg.study.name
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    n_existing = existing[name].n_trials if name in existing else 0
    study = optuna.create_study(storage=storage, study_name=name, direction=cfg.study.direction,
                                sampler=make_sampler(cfg, n_existing), pruner=make_pruner(cfg),
                                load_if_exists=True)
    if study.direction.name.lower() != cfg.study.direction:
        raise UsageError(f"study {name!r} in {redact(url)} was created with direction "
                         f"{study.direction.name.lower()}; the study file says {cfg.study.direction}")
    return study


def load_study(name: str, storage: str | None = None) -> optuna.Study:
    """An existing study, or :class:`UsageError` naming the studies that do exist."""
    url = storage_url(storage)
    store = open_storage(url, create=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)]
    if name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise UsageError(f"no study named {name!r} in {redact(url)} (studies: {known})")
    return optuna.load_study(study_name=name, storage=store)


def best_trials(study: optuna.Study, top: int = 10) -> list[dict[str, Any]]:
    """The ``top`` COMPLETE trials with a finite value, best first, as plain dicts."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    done.sort(key=lambda t: (-t.value if maximize else t.value, t.number))
    return [trial_record(t) for t in done[:top]]


def trial_record(t: FrozenTrial) -> dict[str, Any]:
    """One trial as ``lrsearch best`` shows it."""
    duration = t.duration.total_seconds() if t.duration is not None else None
    return {"number": t.number, "value": t.value, "state": t.state.name,
            "params": t.user_attrs.get("hyperparameters", t.params),
            "duration_s": duration, "mlflow_run_id": t.user_attrs.get(MLFLOW_RUN_ATTR)}


def _summary(study: optuna.Study) -> dict[str, float]:
    trials = study.get_trials(deepcopy=False)
    summary = {f"n_{s.name.lower()}": float(sum(t.state == s for t in trials))
               for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    best = best_trials(study, 1)
    if best:
        summary["best_value"] = best[0]["value"]
        summary["best_trial"] = float(best[0]["number"])
    return summary


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "":
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
