"""The LightningModule that trains an array of K MLPs of one architecture at once: their
weights stacked (``[K, in, out]``, biases ``[K, 1, out]``), one batched matmul per layer for
all of them, one batched optimizer update. A trial trained alone is an array of one."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lrsearch.choices.network import build_mlp
from lrsearch.choices.optimizers import make_optimizer
from lrsearch.choices.schedules import Schedule, make_schedule
from lrsearch.core import faults
from lrsearch.fit.array_optimizer import ArrayOptimizer
from lrsearch.fit.member import Member

if TYPE_CHECKING:
    from lrsearch.config import Config
    from lrsearch.core.stopping import StopFlag, TrialStop
    from lrsearch.fit.population import Population
    from lrsearch.fit.pruning import Pruning

# LearningRateMonitor logs member KEY's learning rate as "lr@KEY" (and its momentum as
# "lr@KEY-momentum"); the array's logger files them under LR_NAME for that member.
LR_NAME = "lr"


class ArrayHost(Protocol):
    """Who the array reports to at each epoch boundary: every member (its epoch done) and
    those that ended (finished, pruned, diverged, or stopped: they leave now); it returns
    new members to train from now on (none unless ``refill``: the array is stopping)."""

    def boundary(self, members: Sequence[Member], leaving: Sequence[Member], refill: bool) -> Sequence[Member]: ...


class ArrayClassifier(pl.LightningModule):
    """Trains with manual optimization: one Lightning "batch" is the whole epoch, sliced into
    minibatches here (each member in its own order), so Lightning's per-step hooks run once
    per epoch instead of once per optimizer update (they cost more than these small
    networks' compute). It validates each member on the whole validation set at the end of
    its epoch, in one batched forward pass, rather than through Lightning's validation loop.

    Each member keeps what a trial trained alone has: its own initial weights (drawn by its
    own generator, as alone), its own data order, optimizer, schedule (PyTorch's scheduler,
    stepped on a weightless "shadow" optimizer whose learning rate is copied into the
    batched update), divergence check and pruning checks. At each epoch boundary the members
    that ended leave (their slices are dropped) and the host may send new ones in their
    place; the fit ends when no member is left.
    """

    def __init__(
        self,
        cfg: Config,
        n_features: int,
        n_classes: int,
        val: tuple[torch.Tensor, torch.Tensor],
        steps_per_epoch: int,
        members: Sequence[Member],
        host: ArrayHost | None = None,
        stop: StopFlag | TrialStop | None = None,
        pruning: Pruning | None = None,
        population: Population | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.cfg = cfg
        self.shape = (n_features, n_classes)
        self.val = val
        self.batch_size = cfg.train.batch_size
        self.steps_per_epoch = steps_per_epoch  # optimizer updates per epoch
        self.host = host
        self.stop = stop
        self.pruning = pruning
        self.population = population  # population-based training's exploits (fit/population.py), or None
        self.activation = getattr(torch.nn, _activation_class(cfg))()
        self.members: list[Member] = []
        # Every member's parameters in one row of one leaf tensor ([K, 1, P]); the layers are
        # views of it (``weights``): the batched update is one set of operations per
        # optimizer for the whole network, not one per layer (a mixed array of 8 spent most of
        # its epoch in those operations' dispatch).
        self.flat: torch.Tensor | None = None
        self._layout: list[tuple[int, int, tuple[int, ...]]] = []  # each layer's (start, end, shape) in a row
        self.weights: list[torch.Tensor] = []  # W0, b0, W1, b1, ...: views of ``flat``, dim 0 = member
        self.optimizer: ArrayOptimizer | None = None
        self.epoch_ends: list[float] = []  # perf_counter() at each epoch's end (the array-size probe reads them)
        self.trained_on: torch.device | None = None  # the device Lightning picked (it moves the module back after)
        self._first = list(members)

    # -- membership ----------------------------------------------------------------------

    def _stack(self, keep: Sequence[int], new: Sequence[Member]) -> None:
        """The stacked weights of the members at ``keep`` (indices into ``self.members``) and
        of ``new`` ones, initialized as each would be alone; the optimizer's state follows
        them. Members are ordered by optimizer, so that each optimizer's batched update
        reads one contiguous run of slots."""
        fresh = [self._initial_weights(m) for m in new]
        rows = [*((self.members[i], i, None) for i in keep), *((m, None, f) for m, f in zip(new, fresh))]
        rows.sort(key=lambda row: _kind(row[0].hp))
        if not self._layout:
            start = 0
            for t in fresh[0]:
                self._layout.append((start, start + t.numel(), tuple(t.shape)))
                start += t.numel()
        old = self.flat.detach() if keep and self.flat is not None else None
        self.flat = torch.stack(
            [
                old[i]
                if old is not None and i is not None
                else torch.cat([t.reshape(1, -1) for t in f or ()], dim=1).to(self.device)
                for _, i, f in rows
            ]
        ).requires_grad_(True)
        self.weights = self._views()
        self.members = [m for m, _, _ in rows]
        if self.optimizer is None:
            self.optimizer = ArrayOptimizer([self.flat])
        else:
            self.optimizer.rebind([self.flat], [i for _, i, _ in rows])
        for slot, (member, i, _) in enumerate(rows):
            if i is None:
                self._start(member, slot)

    def _views(self) -> list[torch.Tensor]:
        """The layers, as views of ``flat``: W ``[K, in, out]``, b ``[K, 1, out]``."""
        assert self.flat is not None
        k = self.flat.shape[0]
        return [self.flat[:, 0, start:end].view(k, *shape) for start, end, shape in self._layout]

    def _initial_weights(self, member: Member) -> list[torch.Tensor]:
        """The weights ``build_mlp`` gives this member's seed: the same as alone, and on every
        device (drawn on the CPU, by the member's own generator, which also draws its data
        order)."""
        member.generator = torch.Generator(device="cpu").manual_seed(member.seed)
        net = build_mlp(*self.shape, self.cfg.model, member.generator)
        return [
            t
            for layer in net
            if isinstance(layer, torch.nn.Linear)
            for t in (layer.weight.detach().t(), layer.bias.detach().unsqueeze(0))
        ]

    def _start(self, member: Member, slot: int) -> None:
        """Its optimizer settings in the batched update, and its schedule on a shadow
        optimizer, listed where Lightning's LearningRateMonitor finds it."""
        assert self.optimizer is not None
        self._shadow(member)
        self.optimizer.assign(slot, member.hp)
        self.optimizer.set_lr(slot, member.lr)

    def _shadow(self, member: Member) -> None:
        member.shadow = make_optimizer([torch.zeros(1, requires_grad=True, device="cpu")], member.hp)
        member.shadow._opt_called = True  # type: ignore[attr-defined]  # its scheduler never sees a step
        member.schedule = make_schedule(member.shadow, member.hp, member.epochs, self.steps_per_epoch)
        from pytorch_lightning.utilities.types import LRSchedulerConfig

        self.trainer.strategy.lr_scheduler_configs.append(
            LRSchedulerConfig(_schedule(member).scheduler, name=f"{LR_NAME}@{member.key}", interval="epoch")
        )

    def copy_members(self, copies: Sequence[tuple[Member, Member, Mapping[str, Any]]]) -> None:
        """Population-based training's exploits, all at once: each copier takes its source's
        weights and optimizer state as they are now (a source copied by another member in
        the same step still gives its own), then trains with ``hp`` (its source's, explored):
        a new learning rate, momentum or weight decay in the batched update, and on its
        shadow optimizer, where LearningRateMonitor reads them."""
        assert self.flat is not None and self.optimizer is not None
        members = self.members
        take = list(range(len(members)))  # the row each slot takes its weights and state from
        for copier, source, hp in copies:
            take[members.index(copier)] = members.index(source)
            copier.hp = dict(hp)
            copier.retune_shadow(hp)
        # One gather of every stacked tensor does the copies and puts each optimizer's slots
        # in one contiguous run again (a copier may have taken another optimizer).
        order = sorted(range(len(members)), key=lambda i: _kind(members[i].hp))
        rows = [take[i] for i in order]
        self.flat = self.flat.detach()[rows].requires_grad_(True)
        self.weights = self._views()
        self.members = [members[i] for i in order]
        self.optimizer.rebind([self.flat], rows)
        for copier, _, _ in copies:
            slot = self.members.index(copier)
            self.optimizer.retune(slot, copier.hp)
            self.optimizer.set_lr(slot, copier.lr)

    def _forget(self, member: Member) -> None:
        """Its schedule off LearningRateMonitor's list."""
        configs = self.trainer.strategy.lr_scheduler_configs
        configs[:] = [c for c in configs if c.scheduler is not _schedule(member).scheduler]

    def configure_optimizers(self) -> None:
        # The members' shadow optimizers and schedulers are listed as they join (``_start``).
        return None

    def on_fit_start(self) -> None:
        # Lightning has moved the module (and moves each batch) to the device it chose; the
        # stacked weights are no module parameter, and the validation set no batch.
        self.trained_on = self.device
        self.val = (self.val[0].to(self.device), self.val[1].to(self.device))
        self._stack([], self._first)
        self._first = []
        self._epoch_started = time.perf_counter()
        if self.host is not None:
            faults.point("fit")

    # -- one epoch -----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[K, batch, classes]`` for inputs ``[K, batch, features]``."""
        w = self.weights
        for i in range(0, len(w), 2):
            x = torch.baddbmm(w[i + 1], x, w[i])
            if i + 2 < len(w):
                x = self.activation(x)
        return x

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        members, optimizer = self.members, self.optimizer
        assert optimizer is not None
        k, n = len(members), len(x)
        # Each member's order from its own CPU generator, as alone and on every device.
        orders = torch.stack([torch.randperm(n, generator=m.generator, device="cpu") for m in members]).to(x.device)
        # The schedules that move the learning rate after every update (or are warming up).
        stepped = [(slot, m) for slot, m in enumerate(members) if _schedule(m).per_update]
        loss_sum = torch.zeros(k, dtype=_sum_dtype(x.device), device=x.device)
        correct = torch.zeros(k, dtype=torch.long, device=x.device)
        active: torch.Tensor | None = None  # None: every member still updates this epoch
        broken: dict[int, float] = {}  # slot -> its non-finite training loss
        for start in range(0, n, self.batch_size):
            if start == self.batch_size and self.host is not None:
                faults.point("batch")  # (an epoch is one step of the fit: its minibatches are these)
            idx = orders[:, start : start + self.batch_size]
            yb = y[idx]
            logits = self(x[idx])
            losses = F.cross_entropy(logits.transpose(1, 2), yb, reduction="none").mean(1)
            values = losses.detach()
            finite = torch.isfinite(values)
            if not bool(finite.all()) and (active is None or bool((active & ~finite).any())):
                for slot in (~finite).nonzero().flatten().tolist():
                    if slot not in broken:
                        broken[slot] = float(values[slot])
                        self._diverge(members[slot], "train/loss")
                active = finite if active is None else active & finite
                if not bool(active.any()):
                    break
            optimizer.zero_grad()
            total = losses.sum() if active is None else torch.where(active, losses, 0.0).sum()
            total.backward()  # type: ignore[no-untyped-call]  # (torch's stubs leave backward untyped)
            optimizer.step(active)
            for slot, m in stepped:
                _schedule(m).step_update()
                optimizer.set_lr(slot, m.lr)
            b = idx.shape[1]
            counted = values if active is None else torch.where(active, values, 0.0)
            loss_sum += counted.to(loss_sum.dtype) * b
            correct += (
                (logits.argmax(-1) == yb).sum(1) if active is None else ((logits.argmax(-1) == yb).sum(1) * active)
            )
        train_loss = [total / n for total in loss_sum.tolist()]
        for slot, value in broken.items():
            train_loss[slot] = value
        train_acc = [c / n for c in correct.tolist()]  # (as a float64 division: Python's)
        self._end_epoch(train_loss, train_acc)

    @torch.no_grad()
    def _validate(self) -> tuple[list[float], list[float]]:
        x, y = self.val
        k = len(self.members)
        logits = self(x.expand(k, -1, -1))
        losses = F.cross_entropy(logits.transpose(1, 2), y.expand(k, -1), reduction="none").mean(1)
        correct = (logits.argmax(-1) == y).sum(1)
        return losses.tolist(), [c / len(y) for c in correct.tolist()]

    def _diverge(self, member: Member, key: str) -> None:
        """It ends at the end of this epoch: ``key`` is not finite (the trial ends PRUNED, saying so)."""
        if member.result.diverged_at is None:
            member.result.diverged_at, member.result.diverged_on = member.epoch, key

    # -- the epoch boundary --------------------------------------------------------------

    def _end_epoch(self, train_loss: list[float], train_acc: list[float]) -> None:
        """Each member's metrics, schedule and pruning check; then the members that ended
        leave, the host fills their slots, and the fit ends once no member is left."""
        if self.host is not None:  # a study's trials (not the auto probe's)
            faults.point("epoch")
        val_loss, val_acc = self._validate()
        self.epoch_ends.append(time.perf_counter())
        share = (self.epoch_ends[-1] - self._epoch_started) / len(self.members)  # of this epoch's training
        stopping = self.stop is not None and self.stop.requested
        assert self.optimizer is not None
        due = []  # (member, value) of the pruning checks at this boundary
        for slot, m in enumerate(self.members):
            metrics = {
                "train/loss": train_loss[slot],
                "train/acc": train_acc[slot],
                "val/loss": val_loss[slot],
                "val/acc": val_acc[slot],
            }
            m.result.logger.log_metrics(metrics, step=m.epoch)
            m.result.seconds += share
            # Whatever the metric: a NaN validation loss still leaves a finite val/acc (argmax
            # of NaN logits), which would rank the trial COMPLETE.
            if not math.isfinite(val_loss[slot]):
                self._diverge(m, "val/loss")
            if m.result.diverged_at is None:
                _schedule(m).step_epoch(metrics)
                self.optimizer.set_lr(slot, m.lr)
            if self.pruning is not None:
                value = self.pruning.due(m, metrics, last=m.epoch + 1 >= m.epochs, stopping=stopping)
                if value is not None:
                    due.append((m, value))
        if self.pruning is not None:
            self.pruning.check(due)  # the members checked now, judged together
        if self.population is not None and not stopping:  # (every member leaves now)
            self.population.step(
                self,
                [
                    {
                        "train/loss": train_loss[slot],
                        "train/acc": train_acc[slot],
                        "val/loss": val_loss[slot],
                        "val/acc": val_acc[slot],
                    }
                    for slot in range(len(self.members))
                ],
            )
        for m in self.members:
            m.result.epochs += 1
        leaving = [m for m in self.members if stopping or m.ended_early or m.epoch >= m.epochs]
        for m in leaving:
            # Its final network, kept with its result on the CPU, where it is saved and served (a
            # copy: the stacked weights are restacked).
            slot = self.members.index(m)
            m.result.weights = [w[slot].detach().to("cpu", copy=True) for w in self.weights]
            self._forget(m)
        keep = [i for i, m in enumerate(self.members) if m not in leaving]
        new = list(self.host.boundary(self.members, leaving, refill=not stopping)) if self.host is not None else []
        if leaving or new:
            if not keep and not new:
                self.members = []
                self.trainer.should_stop = True
                return
            self._stack(keep, new)
        self._epoch_started = time.perf_counter()  # the host's time at the boundary is no member's training

    def on_train_epoch_end(self) -> None:
        if not self.members:
            self.trainer.should_stop = True


def _sum_dtype(device: torch.device) -> torch.dtype:
    """The epoch's loss total in doubles, where the device has them (Apple's MPS has not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _schedule(member: Member) -> Schedule:
    """A member's schedule, once it trains (``ArrayClassifier._shadow`` made it)."""
    assert member.schedule is not None
    return member.schedule


def _kind(hp: Mapping[str, Any]) -> tuple[str, bool, bool]:
    """Members that share one batched update: one optimizer, momentum or not, Nesterov or not."""
    return hp["optimizer"], bool(hp.get("momentum")), bool(hp.get("nesterov"))


def _activation_class(cfg: Config) -> str:
    from lrsearch.choices.network import ACTIVATIONS

    return ACTIVATIONS[cfg.model.activation].torch_class
