"""The classic learning-rate experiments, and what a search adds: results tables for docs/experiments.md.

Runs each study in studies/ that is not finished yet on the embedded store (or the one
given), then prints, from the stored results only, a Markdown table per classic experiment
(final validation accuracy, first epoch reaching 0.80) and a comparison of the TPE search
with the grids.

    python bench/experiments.py [--data lrsearch-data] [--epochs N]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

CLASSIC = {
    "lr_sweep": "Learning rate (SGD, no momentum)",
    "momentum": "Momentum (SGD, lr 0.01)",
    "time_decay": "Time-based decay per update (SGD, lr 0.01)",
    "plateau": "ReduceLROnPlateau patience (SGD, lr 0.01, factor 0.1)",
    "adaptive": "Optimizer at its default learning rate",
}
# Beyond the classic experiments: each printed as a table too, outside the grids' comparison.
MORE = {
    "schedules": "Schedules, with and without 10 epochs of warm-up (SGD with momentum 0.9 at lr 0.01, Adam at lr 0.001)"
}
STUDIES = Path(__file__).resolve().parent.parent / "studies"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="lrsearch-data", help="the embedded store's folder")
    parser.add_argument("--epochs", type=int, help="override every study's epochs (a quick smoke run)")
    args = parser.parse_args()
    os.environ["LRSEARCH_DATA"] = args.data
    import optuna
    import torch

    from lrsearch.config import load_config
    from lrsearch.core.attrs import EPOCHS_TRAINED
    from lrsearch.fit.training import quiet_lightning
    from lrsearch.results.ranking import direction, load_study, ranking
    from lrsearch.results.report import results_table
    from lrsearch.service.launch import run_study

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(1)
    quiet_lightning()
    for name in [*CLASSIC, *MORE, "search"]:
        cfg = load_config(STUDIES / f"{name}.toml").with_overrides(epochs=args.epochs)
        run_study(cfg, study_file=STUDIES / f"{name}.toml")

    grid_best, grid_epochs = 0.0, 0
    for name, title in CLASSIC.items():
        study = load_study(name)
        grid_best = max(grid_best, ranking(study.trials, direction(study))[0].value)
        grid_epochs += sum(t.user_attrs.get(EPOCHS_TRAINED, 0) for t in study.trials)
        print(f"**{title}** (`studies/{name}.toml`)\n\n{results_table(name)}\n")
    for name, title in MORE.items():
        print(f"**{title}** (`studies/{name}.toml`)\n\n{results_table(name)}\n")
    search = load_study("search")
    done = ranking(search.trials, direction(search))
    best = done[0]
    epochs = sum(t.user_attrs.get(EPOCHS_TRAINED, 0) for t in search.trials)
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    print("| | best val acc | epochs trained |\n|---|---|---|")
    print(
        f"| the five grids ({sum(len(load_study(n).trials) for n in CLASSIC)} trials) | {grid_best:.3f} "
        f"| {grid_epochs} |"
    )
    print(
        f"| TPE search ({len(search.trials)} trials, {len(search.trials) - len(done)} pruned) "
        f"| {best.value:.3f} | {epochs} |"
    )
    print(f"\nBest search trial: #{best.number}, {params}.")


if __name__ == "__main__":
    main()
