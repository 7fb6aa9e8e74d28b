"""How much a fully tracked lrsearch trial costs over a bare PyTorch loop.

Every row trains the same MLP on the same blobs data with the same optimizer steps and the
same per-epoch validation; all rows run in this one process, each repeated, and the table
shows medians and ratios to the bare loop of this run.

    python bench/trial_overhead.py [--epochs 50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import optuna
import torch
import torch.nn.functional as F

from lrsearch.config import parse_config
from lrsearch.data import load_data
from lrsearch.model import build_mlp
from lrsearch.objective import Objective
from lrsearch.optim import make_optimizer
from lrsearch.storage import open_storage
from lrsearch.tracking import Tracker
from lrsearch.training import quiet_lightning, train

HP = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "schedule": "constant"}


def bare_loop(cfg, data) -> None:
    """The reference: plain PyTorch, whole-tensor minibatches, validation every epoch."""
    generator = torch.Generator().manual_seed(0)
    net = build_mlp(data.n_features, data.n_classes, cfg.model, generator)
    opt = make_optimizer(net.parameters(), HP)
    n, bs = len(data.x_train), cfg.train.batch_size
    for _ in range(cfg.train.epochs):
        order = torch.randperm(n, generator=generator)
        loss_sum = correct = 0.0
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            xb, yb = data.x_train[idx], data.y_train[idx]
            logits = net(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        with torch.no_grad():
            val_logits = net(data.x_val)
            F.cross_entropy(val_logits, data.y_val).item()
            int((val_logits.argmax(1) == data.y_val).sum())


def lightning_untracked(cfg, data) -> None:
    train(cfg, data, HP, 0)


def make_tracked(cfg, data, folder: Path) -> Callable[[object, object], None]:
    """A full trial through the Objective: Optuna trial on SQLite, MLflow runs on SQLite."""
    tracker = Tracker(f"sqlite:///{folder / 'mlflow.db'}")
    experiment_id = tracker.experiment(cfg.study.name)
    parent = tracker.start_study(experiment_id, cfg.study.name, {}, {}, None)
    study = optuna.create_study(storage=open_storage(f"sqlite:///{folder / 'optuna.db'}"),
                                study_name=cfg.study.name, direction="maximize")
    objective = Objective(cfg, data, tracker, experiment_id, parent)

    def run(cfg, data) -> None:
        study.optimize(objective, n_trials=1)

    return run


def measure(fn, cfg, data, repeats: int) -> float:
    fn(cfg, data)  # warm-up: first-call imports and caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(cfg, data)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet_lightning()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = parse_config({"study": {"name": "bench", "pruner": "none"},
                        "train": {"epochs": args.epochs, "batch_size": 32},
                        "params": {k: v for k, v in HP.items()}}, "bench")
    data = load_data(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            ("bare PyTorch loop", bare_loop),
            ("lrsearch Lightning module, no tracking", lightning_untracked),
            ("lrsearch trial, tracked (Optuna + MLflow on SQLite)", make_tracked(cfg, data, Path(tmp))),
        ]
        results = [(name, measure(fn, cfg, data, args.repeats)) for name, fn in rows]
    base = results[0][1]
    print(f"{args.epochs} epochs, batch 32, blobs MLP, median of {args.repeats}, 1 torch thread")
    print(f"{'setup':<55} {'s/trial':>8} {'x bare':>7}")
    for name, seconds in results:
        print(f"{name:<55} {seconds:>8.3f} {seconds / base:>7.2f}")


if __name__ == "__main__":
    main()
