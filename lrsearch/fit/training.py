"""Training: trials of a study, alone or many at once (a trial array), in one Lightning fit each."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from lrsearch.choices.data import Dataset
from lrsearch.choices.sampling import check_interval
from lrsearch.config import Config
from lrsearch.core.stopping import StopFlag, TrialStop
from lrsearch.fit.logger import ArrayLogger
from lrsearch.fit.member import Member, TrainResult
from lrsearch.fit.model import ArrayClassifier, ArrayHost
from lrsearch.fit.population import Population
from lrsearch.fit.pruning import Pruning


class _WholeSet(TorchDataset[tuple[torch.Tensor, torch.Tensor]]):
    """A one-item dataset: the whole tensor pair is the epoch's only batch (see ArrayClassifier)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.pair = (x, y)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pair


def _whole(x: torch.Tensor, y: torch.Tensor) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    return DataLoader(_WholeSet(x, y), batch_size=None)


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners and hints, which repeat on every trial."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")


def fit_array(
    cfg: Config,
    data: Dataset,
    members: Sequence[Member],
    host: ArrayHost | None = None,
    stop: StopFlag | TrialStop | None = None,
    population: Population | None = None,
    accelerator: str | None = None,
) -> ArrayClassifier | None:
    """Train ``members`` (trials of the study ``cfg``, each with its own hyperparameters,
    seed and epochs) at once, in one Lightning fit, until every member has left: finished,
    pruned, diverged, or stopped at an epoch boundary once ``stop`` is requested. The
    ``host`` hears of each member as it leaves and may send new members in its place.
    ``population``: population-based training's exploits (default: the study's, if it
    searches by PBT). ``accelerator``: Lightning's (default: the study's ``[train]
    accelerator``); the module's tensors follow the device it picks."""
    pruning = (
        Pruning(cfg.study.metric, check_interval(cfg.train.epochs, cfg.study.prune_every))
        if cfg.study.pruner != "none"
        else None
    )
    if population is None and cfg.population:
        population = Population(
            cfg.pbt, cfg.params, cfg.study.metric, cfg.study.direction, cfg.train.epochs, cfg.study.seed
        )
    module = ArrayClassifier(
        cfg,
        data.n_features,
        data.n_classes,
        (data.x_val, data.y_val),
        -(-len(data.x_train) // cfg.train.batch_size),
        members,
        host,
        stop,
        pruning,
        population,
    )
    trainer = pl.Trainer(
        max_epochs=-1,  # each member counts its own epochs; the fit ends when none is left
        accelerator=accelerator or cfg.train.accelerator,
        devices=1,
        logger=ArrayLogger(lambda: module.members),
        callbacks=[LearningRateMonitor(logging_interval="epoch", log_momentum=True)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=None,
    )
    try:
        trainer.fit(module, train_dataloaders=_whole(data.x_train, data.y_train))
        return module
    except SIGTERMException:
        # Lightning's own SIGTERM handler ends fit with a SystemExit; our handler, which
        # Lightning chains, has set `stop`, and the caller records the interruption.
        if stop is None or not stop.requested:
            raise
    return None


def train(
    cfg: Config,
    data: Dataset,
    hp: Mapping[str, Any],
    seed: int,
    trial: optuna.trial.Trial | None = None,
    result: TrainResult | None = None,
    stop: StopFlag | TrialStop | None = None,
) -> TrainResult:
    """Train the study's MLP with ``hp`` for ``cfg.train.epochs`` epochs: an array of one.

    ``result`` may be passed in so its history survives an exception inside ``fit``;
    ``stop`` ends training at the next epoch boundary once a signal sets it.
    """
    member = Member(
        "0", hp, seed, cfg.train.epochs, trial if cfg.study.pruner != "none" else None, result=result or TrainResult()
    )
    fit_array(cfg, data, [member], stop=stop)
    return member.result


# Sizes the auto probe times (up to the largest that memory allows, and the study's total).
PROBE_SIZES = (1, 4, 8, 16, 32, 64)
PROBE_EPOCHS = 5  # per size: the first is a warm-up, the others are timed (their median)
PROBE_BUDGET_S = 2.0  # no larger size is tried once the probe has taken this long
MIN_GAIN = 0.20  # a larger array must be this much faster per trial than the last size kept
MAX_ARRAY_BYTES = 512 * 2**20  # an array's weights, gradients, optimizer state and activations
_PROBE_HP = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "schedule": "constant"}


def member_bytes(cfg: Config, data: Dataset) -> int:
    """What one member of an array holds: its weights, their gradients and up to two
    optimizer buffers (Adam's), and the activations of a minibatch (kept for the backward
    pass) and of the whole validation set (float32)."""
    widths = [*cfg.model.hidden, data.n_classes]
    sizes = [data.n_features, *widths]
    parameters = sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))
    activations = (min(cfg.train.batch_size, len(data.x_train)) * 3 + len(data.x_val)) * (data.n_features + sum(widths))
    return 4 * (4 * parameters + activations)


def largest_array(cfg: Config, data: Dataset) -> int:
    """The largest array whose members fit in ``MAX_ARRAY_BYTES`` (at least one)."""
    from lrsearch.config import MAX_ARRAY

    return max(1, min(MAX_ARRAY, MAX_ARRAY_BYTES // member_bytes(cfg, data)))


def choose_array_size(cfg: Config, data: Dataset, trials: int | None = None, accelerator: str | None = None) -> int:
    """The array size ``array = "auto"`` uses, timed on this machine with this study's data
    and network, a few epochs per size: going up ``PROBE_SIZES`` (to the largest size that
    memory allows, and the study's total of ``trials``) while each size is at least
    ``MIN_GAIN`` faster per trial than the last one kept. The knee, not the fastest: beyond
    it an array buys little speed (a learning sampler's arrays grow to it as the study goes:
    ``sampling.array_target``). 1 where arrays do not pay (wide networks, big batches). Each
    size's time is its fastest timed epoch: what else runs meanwhile (the tracking process
    starting, on this machine's other core) only ever slows one down."""
    import time

    cap = largest_array(cfg, data)
    if trials is not None:
        cap = min(cap, trials)
    if cap == 1:
        return 1
    chosen, best = 1, math.inf
    started = time.perf_counter()
    for k in sorted({*(k for k in PROBE_SIZES if k <= cap), cap}):
        members = [Member(str(i), _PROBE_HP, i, PROBE_EPOCHS) for i in range(k)]
        module = fit_array(cfg, data, members, accelerator=accelerator)
        assert module is not None
        ends = module.epoch_ends
        per_trial = min(b - a for a, b in zip(ends, ends[1:])) / k
        if per_trial > (1 - MIN_GAIN) * best:
            break
        chosen, best = k, per_trial
        if time.perf_counter() - started > PROBE_BUDGET_S:
            break
    return chosen
