"""How much a fully tracked lrsearch trial costs over a bare PyTorch loop.

Every row trains the same MLP on the same blobs data with the same number of optimizer
steps and the same per-epoch validation; all rows run in this one process, each repeated,
and the table shows medians and ratios to the bare loop of this run. Beside lrsearch's rows,
the naive way (Lightning with DataLoader(TensorDataset) and epoch-level self.log, then with
Lightning's MLFlowLogger and LearningRateMonitor). The last rows track through an
`lrsearch server` subprocess on a scratch PostgreSQL database when one is reachable.

    python bench/trial_overhead.py [--epochs 50] [--repeats 5] [--batch 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from scratch import lrsearch_server, scratch_database

from lrsearch.choices.data import load_data
from lrsearch.choices.network import build_mlp
from lrsearch.choices.optimizers import make_optimizer
from lrsearch.choices.sampling import make_pruner
from lrsearch.config import parse_config
from lrsearch.fit.training import quiet_lightning, train
from lrsearch.service.objective import Objective
from lrsearch.store.storage import open_storage
from lrsearch.track.tracking import Tracker

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
            idx = order[start : start + bs]
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


class _NaiveModule(pl.LightningModule):
    """The usual way to write it: automatic optimization, one Lightning step per minibatch,
    epoch-level self.log of the same four metrics."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def configure_optimizers(self):
        return make_optimizer(self.net.parameters(), HP)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        self.log("train/acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean())


def make_naive(tracking: str | None) -> Callable[[object, object], None]:
    """Lightning with DataLoader(TensorDataset) and, given a tracking URI, its MLFlowLogger
    (one MLflow run per trial, metrics sent as logged) and LearningRateMonitor."""
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, TensorDataset

    def run(cfg, data) -> None:
        generator = torch.Generator().manual_seed(0)
        module = _NaiveModule(build_mlp(data.n_features, data.n_classes, cfg.model, generator))
        train = DataLoader(
            TensorDataset(data.x_train, data.y_train),
            batch_size=cfg.train.batch_size,
            shuffle=True,
            generator=generator,
        )
        val = DataLoader(TensorDataset(data.x_val, data.y_val), batch_size=len(data.x_val))
        logger = MLFlowLogger(experiment_name="naive", tracking_uri=tracking) if tracking else False
        callbacks = [LearningRateMonitor(logging_interval="epoch")] if tracking else []
        trainer = pl.Trainer(
            max_epochs=cfg.train.epochs,
            accelerator="cpu",
            devices=1,
            logger=logger,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, train, val)

    return run


def back_to_back(one_trial: Callable[[object, object], None]) -> Callable[[object, object, int], None]:
    def run(cfg, data, n: int) -> None:
        for _ in range(n):
            one_trial(cfg, data)

    return run


class _ChecksButKeeps(optuna.pruners.BasePruner):
    """The study's median pruner doing all its reads, its verdict ignored: every repetition
    trains all its epochs, as the bare loop does, and still pays for pruning."""

    def __init__(self, pruner: optuna.pruners.BasePruner) -> None:
        self.pruner = pruner

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        self.pruner.prune(study, trial)
        return False


def make_tracked(cfg, data, storage: str, tracking: str) -> Callable[[object, object], None]:
    """A full trial through the Objective: an Optuna trial and its MLflow runs."""
    tracker = Tracker(tracking)
    experiment_id = tracker.experiment(cfg.study.name)
    parent = tracker.start_study(experiment_id, cfg.study.name, {}, {}, None)
    study = optuna.create_study(
        storage=open_storage(storage),
        study_name=cfg.study.name,
        direction="maximize",
        pruner=_ChecksButKeeps(make_pruner(cfg.study.pruner, cfg.train.epochs, cfg.study.prune_every)),
    )
    objective = Objective(cfg, data, tracker, experiment_id, parent)

    def run(cfg, data, n: int) -> None:
        study.optimize(objective, n_trials=n)
        assert not objective.drain()  # the last trial's MLflow record is written before the clock stops

    return run


@contextlib.contextmanager
def _postgres_and_server(admin_url: str, folder: Path) -> Iterator[tuple[str, str] | None]:
    """A scratch PostgreSQL database and an `lrsearch server` on it: (storage URL, tracking URI),
    or None when no PostgreSQL answers."""
    with scratch_database(admin_url) as url:
        if url is None:
            yield None
            return
        with lrsearch_server(url, folder) as uri:
            yield url, uri


def measure(fn, cfg, data, repeats: int, batch: int) -> float:
    """Median over ``repeats`` of the wall time per trial of ``batch`` trials run back to back,
    as in a study (a tracked trial's MLflow record travels while the next one trains, and the
    clock stops only when the last record is written)."""
    fn(cfg, data, 1)  # warm-up: first-call imports and caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(cfg, data, batch)
        times.append((time.perf_counter() - start) / batch)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=5, help="trials per repetition, back to back")
    parser.add_argument(
        "--pg",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="admin URL of a PostgreSQL for the server row (skipped if unreachable)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet_lightning()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = parse_config(
        {
            "study": {"name": "bench", "pruner": "median"},
            "train": {"epochs": args.epochs, "batch_size": 32},
            "params": {k: v for k, v in HP.items()},
        },
        "bench",
    )
    data = load_data(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            ("bare PyTorch loop", back_to_back(bare_loop)),
            ("naive Lightning, DataLoader(TensorDataset), no logger", back_to_back(make_naive(None))),
            ("naive Lightning + MLFlowLogger on SQLite", back_to_back(make_naive(f"sqlite:///{tmp}/naive.db"))),
            ("lrsearch Lightning module, no tracking", back_to_back(lightning_untracked)),
            (
                "lrsearch trial, tracked (Optuna + MLflow on SQLite)",
                make_tracked(cfg, data, f"sqlite:///{tmp}/optuna.db", f"sqlite:///{tmp}/mlflow.db"),
            ),
        ]
        results = [(name, measure(fn, cfg, data, args.repeats, args.batch)) for name, fn in rows]
        # The server, even idle, takes CPU on this 2-core machine: its rows are measured while
        # it runs, the bare loop again included, and compared with that.
        with _postgres_and_server(args.pg, Path(tmp)) as server:
            if server is not None:
                results.append(
                    (
                        "bare PyTorch loop, with the server running",
                        measure(back_to_back(bare_loop), cfg, data, args.repeats, args.batch),
                    )
                )
                results.append(
                    (
                        "lrsearch trial, tracked (PostgreSQL + lrsearch server)",
                        measure(make_tracked(cfg, data, *server), cfg, data, args.repeats, args.batch),
                    )
                )
                results.append(
                    (
                        "naive Lightning + MLFlowLogger to the server",
                        measure(back_to_back(make_naive(server[1])), cfg, data, args.repeats, args.batch),
                    )
                )
    print(
        f"{args.epochs} epochs, batch 32, blobs MLP, 1 torch thread; per trial: median of {args.repeats} "
        f"runs of {args.batch} trials back to back"
    )
    print(f"{'setup':<58} {'s/trial':>8} {'x bare':>7}")
    base = results[0][1]
    for name, seconds in results:
        if name.startswith("bare PyTorch loop"):
            base = seconds  # each group is compared with the bare loop measured beside it
        print(f"{name:<58} {seconds:>8.3f} {seconds / base:>7.2f}")


if __name__ == "__main__":
    main()
