"""Does search beat the grids? studies/search.toml (TPE) and the same study with random
sampling, and with TPE over the lr range the range test finds (lr = { find = true }: the
test runs once per study, with its seed), over several seeds, against the best trial of all
five classic grid studies.

Reports, per sampler, the median over seeds of the best validation accuracy and of the epochs
trained (pruned trials count the epochs they ran), beside the grids' best and total epochs.

    python bench/search_efficiency.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
from pathlib import Path

STUDIES = Path(__file__).resolve().parent.parent / "studies"
GRIDS = ("lr_sweep", "momentum", "time_decay", "plateau", "adaptive")


def best_and_epochs(study) -> tuple[float, int]:
    from lrsearch.core.attrs import EPOCHS_TRAINED
    from lrsearch.results.ranking import direction, ranking

    best = ranking(study.trials, direction(study))[0]
    return best.value, sum(t.user_attrs.get(EPOCHS_TRAINED, 0) for t in study.trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LRSEARCH_DATA"] = tmp
        import optuna
        import torch

        from lrsearch.choices.space import Find
        from lrsearch.config import load_config
        from lrsearch.core.attrs import LR_RANGE
        from lrsearch.fit.training import quiet_lightning
        from lrsearch.service.launch import run_study

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        torch.set_num_threads(1)
        quiet_lightning()
        grid_best, grid_epochs = 0.0, 0
        for name in GRIDS:
            best, epochs = best_and_epochs(run_study(load_config(STUDIES / f"{name}.toml")).study)
            grid_best, grid_epochs = max(grid_best, best), grid_epochs + epochs
        base = load_config(STUDIES / "search.toml")
        found = {**base.params, "lr": Find(10.0)}  # search.toml's hand-written lr range: 1e-4 to 1
        rows = {
            "tpe": ("tpe", base.params, "tpe"),
            "random": ("random", base.params, "random"),
            "tpe, lr found": ("tpe", found, "found"),
        }
        results: dict[str, list[tuple[float, int]]] = {row: [] for row in rows}
        ranges: list[str] = []
        for row, (sampler, params, key) in rows.items():
            for seed in range(1, args.seeds + 1):
                study_cfg = dataclasses.replace(base.study, name=f"search-{key}-{seed}", sampler=sampler, seed=seed)
                run = run_study(dataclasses.replace(base, study=study_cfg, params=params))
                results[row].append(best_and_epochs(run.study))
                found_range = run.study.user_attrs.get(LR_RANGE)
                if found_range:
                    ranges.append(f"{found_range['low']:.2g}-{found_range['high']:.2g}")
    print(
        f"search.toml ({base.study.trials} trials, <= {base.train.epochs} epochs, {base.study.pruner} pruning), "
        f"{args.seeds} seeds; medians"
    )
    print(f"{'':<24} {'best val acc':>12} {'epochs trained':>15}")
    print(f"{'five classic grids':<24} {grid_best:>12.3f} {grid_epochs:>15}")
    for sampler, rows in results.items():
        bests, epochs = [b for b, _ in rows], [e for _, e in rows]
        print(
            f"{sampler + ' (median)':<24} {statistics.median(bests):>12.3f} {statistics.median(epochs):>15.0f}"
            f"   per seed: {', '.join(f'{b:.3f}/{e}' for b, e in rows)}"
        )
    print(f"target: best >= {grid_best:.3f} with <= {grid_epochs // 4} epochs")
    print(f"lr ranges found (sgd, the first optimizer choice), per seed: {', '.join(ranges)}")


if __name__ == "__main__":
    main()
