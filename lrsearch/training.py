"""One training run: hyperparameters and data in, a Lightning fit, a metric history out."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import optuna
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from lrsearch import faults
from lrsearch.config import Config
from lrsearch.data import Dataset
from lrsearch.logger import MemoryLogger
from lrsearch.model import MLPClassifier
from lrsearch.network import build_mlp
from lrsearch.pruning import PruningCallback
from lrsearch.sampling import check_interval
from lrsearch.stopping import StopFlag, TrialStop


@dataclass
class TrainResult:
    """What a fit produced: the per-epoch history and why it stopped early, if it did."""

    logger: MemoryLogger = field(default_factory=MemoryLogger)
    epochs: int = 0
    pruned_at: int | None = None
    diverged_at: int | None = None  # the epoch a loss became non-finite
    diverged_on: str | None = None  # which loss: train/loss or val/loss

    @property
    def history(self) -> dict[str, list[tuple[int, float, int]]]:
        return self.logger.history

    def final(self, key: str) -> float | None:
        return self.logger.last(key)

    def at(self, key: str, epoch: int) -> float | None:
        """``key``'s value at ``epoch`` (its step), if logged."""
        return next((v for step, v, _ in self.history.get(key, []) if step == epoch), None)


class _WholeSet(TorchDataset):
    """A one-item dataset: the whole tensor pair is the epoch's only batch (see MLPClassifier)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.pair = (x, y)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pair


def _whole(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    return DataLoader(_WholeSet(x, y), batch_size=None)


class StopCallback(pl.Callback):
    """Ends ``fit`` at the end of the current epoch once a stop is requested."""

    def __init__(self, flag: StopFlag | TrialStop) -> None:
        self.flag = flag

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        faults.point("epoch")
        if self.flag.requested:
            trainer.should_stop = True


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners and hints, which repeat on every trial."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")


def train(
    cfg: Config,
    data: Dataset,
    hp: Mapping[str, Any],
    seed: int,
    trial: optuna.trial.Trial | None = None,
    result: TrainResult | None = None,
    stop: StopFlag | TrialStop | None = None,
) -> TrainResult:
    """Train the study's MLP with ``hp`` for ``cfg.train.epochs`` epochs.

    ``result`` may be passed in so its history survives an exception inside ``fit``;
    ``stop`` ends training at the next epoch boundary once a signal sets it.
    """
    result = result or TrainResult()
    generator = torch.Generator().manual_seed(seed)
    net = build_mlp(data.n_features, data.n_classes, cfg.model, generator)
    module = MLPClassifier(net, hp, cfg.train.batch_size, generator, (data.x_val, data.y_val),
                           steps_per_epoch=-(-len(data.x_train) // cfg.train.batch_size))
    callbacks: list[pl.Callback] = [LearningRateMonitor(logging_interval="epoch", log_momentum=True)]
    # With no pruner nothing reads intermediate values: none are written.
    pruning = (PruningCallback(trial, cfg.study.metric, check_interval(cfg))
               if trial is not None and cfg.study.pruner != "none" else None)
    if pruning is not None:
        callbacks.append(pruning)
    if stop is not None:
        callbacks.append(StopCallback(stop))
    trainer = pl.Trainer(
        max_epochs=cfg.train.epochs,
        accelerator="cpu",
        devices=1,
        logger=result.logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=None,
    )
    try:
        trainer.fit(module, train_dataloaders=_whole(data.x_train, data.y_train))
    except SIGTERMException:
        # Lightning's own SIGTERM handler ends fit with a SystemExit; our handler, which
        # Lightning chains, has set `stop`, and the caller records the interruption.
        if stop is None or not stop.requested:
            raise
    finally:
        if pruning is not None:
            pruning.close()
    result.epochs = trainer.current_epoch
    result.diverged_at, result.diverged_on = module.diverged_at, module.diverged_on
    result.pruned_at = pruning.pruned_at if pruning is not None else None
    return result
