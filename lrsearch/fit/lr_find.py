"""The learning-rate range test (Leslie Smith's; fastai's ``lr_find``) on a study's data and
model, with Lightning's own ``Tuner.lr_find``.

The study's ``ArrayClassifier`` trains a whole epoch in one Lightning step with manual
optimization, which ``lr_find`` cannot drive (it steps its own scheduler once per
automatically optimized batch and reads each batch's loss). The test therefore trains the
same network (``build_mlp`` with the study's ``[model]``), on the same training split, with
the same optimizer and batch size, in a small automatic-optimization module: one Lightning
step per minibatch, the learning rate rising exponentially from ``MIN_LR`` to ``MAX_LR``.
Lightning sweeps the rates, smooths the loss (a running mean with a memory of about 50
steps) and ends the sweep once the loss passes 4 times its best. The suggestion is the rate at
the lowest smoothed loss before the loss climbs back by half again (Smith's upper bound: the
largest rate that still lowers the loss), not Lightning's ``suggestion()``: that one takes
the steepest fall against the rate on a linear scale, which on this problem lands on the
first rates tried (2e-7), where the loss of a fresh network only wobbles; the steepest fall
per decade lands where the network escapes its initialization (1e-4), a rate that learns
little in 200 epochs. The search range is ``factor`` times either side of the suggestion,
on a log scale.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrsearch.choices.optimizers import OPTIMIZERS
from lrsearch.choices.space import Choices, Find, Fixed
from lrsearch.config import Config
from lrsearch.core.errors import LrsearchError

if TYPE_CHECKING:
    from lrsearch.choices.data import Dataset

MIN_LR, MAX_LR = 1e-7, 10.0
# Rates tried: many against the smoothing's memory, so the smoothed loss lags the rate by
# less than half a decade (Lightning's default of 100 lags by more than one).
STEPS = 1000
SKIP = 0.1  # the first tenth: the smoothing's own warm-up
CLIMB = 1.5  # the loss has climbed back when it passes its lowest so far by half
SWEEPS = 3  # one sweep's suggestion moves with the seed (by 2.5x for SGD here): the median of three
# Below this fall of the smoothed loss (its lowest against its first value) the curve is
# flat: there is no minimum worth suggesting.
MIN_FALL = 0.10


class NoMinimum(LrsearchError):
    """The loss did not fall: no learning rate to suggest."""


@dataclass
class Sweep:
    """One pass of rising rates: the rates tried, the smoothed loss after each, and the rate
    this pass suggests (None: its loss did not fall)."""

    seed: int
    lrs: list[float]
    losses: list[float]
    suggestion: float | None


@dataclass
class RangeTest:
    """A range test: its sweeps (one per seed), the suggestion (their median) and the search
    range ``factor`` times either side of it, within the rates tried."""

    optimizer: str
    factor: float
    sweeps: list[Sweep] = field(default_factory=list)
    suggestion: float = math.nan

    @property
    def low(self) -> float:
        return max(MIN_LR, self.suggestion / self.factor)

    @property
    def high(self) -> float:
        return min(MAX_LR, self.suggestion * self.factor)

    @property
    def median_sweep(self) -> Sweep:
        """The sweep whose suggestion is the test's (else the first)."""
        return next((s for s in self.sweeps if s.suggestion == self.suggestion), self.sweeps[0])

    def record(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "suggestion": self.suggestion,
            "low": self.low,
            "high": self.high,
            "factor": self.factor,
            "sweeps": [s.suggestion for s in self.sweeps],
        }


def optimizer_for(cfg: Config, name: str | None = None) -> str:
    """The optimizer the test uses: ``name``, else the study's (its first choice when searched)."""
    if name is not None:
        OPTIMIZERS[name]  # KeyError naming the choices
        return name
    spec = cfg.params.get("optimizer")
    if isinstance(spec, Fixed):
        return spec.value
    if isinstance(spec, Choices):
        return spec.values[0]
    return "sgd"


def range_test(
    cfg: Config, optimizer: str | None = None, factor: float | None = None, accelerator: str | None = None
) -> RangeTest:
    """Run the range test for the study ``cfg`` describes: ``SWEEPS`` sweeps from the study's
    seed on, the suggestion their median. :class:`NoMinimum` when no sweep's loss falls
    between ``MIN_LR`` and ``MAX_LR``. ``accelerator``: Lightning's (default: the study's,
    where this host has it, else the CPU: ``submit`` runs the test on the submitting host,
    which need not be the GPU host that trains)."""
    from lrsearch.choices.accelerators import unavailable

    if accelerator is None:
        accelerator = cfg.train.accelerator if unavailable(cfg.train.accelerator) is None else "cpu"
    name = optimizer_for(cfg, optimizer)
    spec = cfg.params.get("lr")
    result = RangeTest(name, factor or (spec.factor if isinstance(spec, Find) else Find.factor))
    seed = cfg.study.seed if cfg.study.seed is not None else 0
    from lrsearch.choices.data import load_data

    data = load_data(cfg.data)
    result.sweeps = [_sweep(cfg, data, name, seed + i, accelerator) for i in range(SWEEPS)]
    found = sorted(s.suggestion for s in result.sweeps if s.suggestion is not None)
    if not found:
        raise NoMinimum(
            f"no clear minimum: the loss did not fall between {MIN_LR:g} and {MAX_LR:g} "
            f"({name}, batch size {cfg.train.batch_size})"
        )
    result.suggestion = found[len(found) // 2] if len(found) % 2 else math.sqrt(found[0] * found[-1])
    return result


def _sweep(cfg: Config, data: Dataset, name: str, seed: int, accelerator: str) -> Sweep:
    """One sweep with Lightning's ``Tuner.lr_find``, from a fresh network seeded ``seed``."""
    import warnings

    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    from pytorch_lightning.tuner.tuning import Tuner
    from torch.utils.data import DataLoader, TensorDataset

    from lrsearch.choices.network import build_mlp
    from lrsearch.choices.optimizers import make_optimizer
    from lrsearch.fit.training import quiet_lightning

    # The optimizer's own settings as the study fixes them (e.g. momentum), else its defaults.
    hp: dict[str, Any] = {"optimizer": name, "lr": MIN_LR, **OPTIMIZERS[name].options}
    hp.update(
        {k: spec.value for k, spec in cfg.params.items() if isinstance(spec, Fixed) and k in OPTIMIZERS[name].options}
    )
    net = build_mlp(data.n_features, data.n_classes, cfg.model, torch.Generator(device="cpu").manual_seed(seed))

    class RangeTestModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self.net.parameters(), hp)

    loader = DataLoader(
        TensorDataset(data.x_train, data.y_train),
        batch_size=cfg.train.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    quiet_lightning()
    # lr_find saves the model's state in a checkpoint and restores it after the sweep: in a
    # scratch folder, not the working directory. Its progress bar (tqdm, always on) goes nowhere.
    with (
        tempfile.TemporaryDirectory(prefix="lrsearch-lr-find-") as scratch,
        warnings.catch_warnings(),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            max_epochs=-1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=scratch,
        )
        finder = Tuner(trainer).lr_find(
            RangeTestModule(),
            train_dataloaders=loader,
            min_lr=MIN_LR,
            max_lr=MAX_LR,
            num_training=STEPS,
            update_attr=False,
        )
    lrs = [float(v) for v in finder.results["lr"]] if finder is not None else []
    losses = [float(v) for v in finder.results["loss"]] if finder is not None else []
    at = suggest(losses)
    return Sweep(seed, lrs, losses, None if at is None else lrs[at])


def suggest(losses: list[float]) -> int | None:
    """The index of the lowest smoothed loss before it climbs back by half (past the first
    tenth), or None when the loss never fell by ``MIN_FALL`` of its value there."""
    start = int(len(losses) * SKIP)
    best: int | None = None
    for i in range(start, len(losses)):
        loss = losses[i]
        if not math.isfinite(loss):
            break
        if best is None or loss < losses[best]:
            best = i
        elif loss > CLIMB * losses[best]:
            break
    if best is None or losses[best] > (1 - MIN_FALL) * losses[start]:
        return None
    return best


# tracker: a Tracker (track/tracking.py), which fit/ is below, so it cannot name it.
def record_range_test(result: RangeTest, cfg: Config, tracker: Any, experiment_id: str, out: Path) -> tuple[Path, str]:
    """Draw the test into ``out`` and record it as the ``lr-find`` run of the study's
    experiment; the plot's path and the run's id."""
    out.mkdir(parents=True, exist_ok=True)
    path = plot(
        result,
        f"{cfg.study.name}: learning-rate range test ({result.optimizer}, batch size {cfg.train.batch_size})",
        out / "lr_find.png",
    )
    sweep = result.median_sweep
    run_id = tracker.log_range_test(
        experiment_id, cfg.study.name, result.record(), list(zip(sweep.lrs, sweep.losses)), path
    )
    return path, run_id


def plot(result: RangeTest, title: str, path: Path) -> Path:
    """Loss against learning rate on a log axis, one line per sweep, the suggestion and the
    search range marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5))
    ax = fig.subplots()
    tops = []
    for sweep in result.sweeps:
        (line,) = ax.plot(
            sweep.lrs,
            sweep.losses,
            label=f"seed {sweep.seed}: "
            + (f"{sweep.suggestion:.3g}" if sweep.suggestion is not None else "no minimum"),
        )
        finite = [v for v in sweep.losses if math.isfinite(v)]
        if finite:
            tops.append(finite[int(len(finite) * SKIP)])
        if sweep.suggestion is not None:
            at = sweep.lrs.index(sweep.suggestion)
            ax.plot([sweep.suggestion], [sweep.losses[at]], "o", color=line.get_color())
    if math.isfinite(result.suggestion):
        ax.axvline(result.suggestion, color="tab:red", label=f"suggestion (median) {result.suggestion:.3g}")
        ax.axvspan(
            result.low,
            result.high,
            color="tab:green",
            alpha=0.12,
            label=f"search range {result.low:.3g} – {result.high:.3g}",
        )
    if tops:  # the divergence at the end would squash the rest
        ax.set_ylim(0, 1.2 * max(tops))
    ax.set_xscale("log")
    ax.set(title=title, xlabel="learning rate (log scale)", ylabel="training loss (smoothed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return path
