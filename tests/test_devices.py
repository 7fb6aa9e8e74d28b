"""Lightning's accelerators: ``[train] accelerator`` and ``--accelerator``, and tensors that
follow the module's device. This machine has no GPU, so two checks stand in for one (a real
GPU's parity and speed: ``bench/device.py``): no tensor of lrsearch's training is made
without saying its device (on a GPU it would land on the CPU beside CUDA weights), and the
batched optimizer steps parameters that live on another device than its per-slot arrays
(PyTorch's ``meta`` device: shapes only, and an error on any mix with CPU tensors)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import lrsearch
from lrsearch.choices.accelerators import ACCELERATORS, unavailable
from lrsearch.choices.data import load_data
from lrsearch.config import parse_config
from lrsearch.core.errors import ConfigError
from lrsearch.fit.array_optimizer import ArrayOptimizer
from lrsearch.fit.member import Member
from lrsearch.fit.training import fit_array

PACKAGE = Path(lrsearch.__file__).parent
_DISPATCH = ("torch/overrides.py", "torch/utils/_device.py")
HAS_GPU = unavailable("gpu") is None
no_gpu = pytest.mark.skipif(HAS_GPU, reason="this host has a GPU: 'gpu' is not refused here")


class ImplicitDevices(TorchFunctionMode):
    """Records each tensor factory (``torch.zeros``, ``torch.tensor``, ``torch.randperm``, …)
    that lrsearch's own code calls without a ``device``: on a GPU such a tensor lands on the
    CPU. (Factories torch and Lightning call inside themselves are theirs.)"""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.factories = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in self.factories and kwargs.get("device") is None:
            frame = sys._getframe(1)  # who called the factory (torch's dispatch of a Python function aside)
            while frame is not None and frame.f_code.co_filename.endswith(_DISPATCH):
                frame = frame.f_back
            if frame is not None and PACKAGE in Path(frame.f_code.co_filename).parents:
                self.calls.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


class Refill:
    """An array host that sends one new member when the first leaves (a restack with an empty
    slot: the optimizer's state copied by index)."""

    def __init__(self) -> None:
        self.sent = False

    def boundary(self, members, leaving, refill):  # type: ignore[no-untyped-def]
        if leaving and refill and not self.sent:
            self.sent = True
            return [Member("new", {"optimizer": "adagrad", "lr": 0.05, "schedule": "constant"}, 9, 2)]
        return []


def _members() -> list[Member]:
    hps = [
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "time_decay", "decay": 0.01},
        {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.01, "schedule": "constant"},
        {"optimizer": "rmsprop", "lr": 0.001, "momentum": 0.5, "schedule": "cosine", "t_max": 3},
        {"optimizer": "sgd", "lr": 1e6, "schedule": "constant"},  # diverges: the masked update
    ]
    return [Member(str(i), hp, i, 1 if i == 0 else 3) for i, hp in enumerate(hps)]


def test_training_makes_no_tensor_without_its_device():
    cfg = parse_config({"study": {"name": "d", "pruner": "none"}, "train": {"epochs": 3, "batch_size": 64}}, "d.toml")
    data = load_data(cfg.data)
    members = _members()
    with ImplicitDevices() as spy:
        module = fit_array(cfg, data, members, host=Refill(), accelerator="cpu")
    assert module is not None and module.device.type == "cpu"
    assert spy.calls == []
    assert [m.result.epochs for m in members] == [1, 3, 3, 1]  # the sgd at 1e6 diverged in its first epoch
    assert all(w.device.type == "cpu" for m in members for w in m.result.weights)


def test_population_based_training_makes_no_tensor_without_its_device():
    cfg = parse_config(
        {
            "study": {"name": "p", "sampler": "pbt", "pruner": "none", "seed": 3},
            "train": {"epochs": 4, "batch_size": 64},
            "pbt": {"population": 4, "interval": 1},
            "params": {"optimizer": "sgd", "lr": {"low": 0.001, "high": 0.1, "log": True}},
        },
        "p.toml",
    )
    data = load_data(cfg.data)
    hps = [{"optimizer": "sgd", "lr": 0.01 * (i + 1), "momentum": 0.5, "schedule": "constant"} for i in range(4)]
    members = [Member(str(i), hp, i, 4) for i, hp in enumerate(hps)]
    with ImplicitDevices() as spy:
        assert fit_array(cfg, data, members, accelerator="cpu") is not None
    assert spy.calls == []


def test_the_spy_sees_a_tensor_made_without_its_device():
    # The check above can fail: a factory called here, in lrsearch's package, without a device.
    from lrsearch.fit import array_optimizer

    with ImplicitDevices() as spy:
        array_optimizer.ArrayOptimizer([torch.zeros(2, 3, 4, device="cpu")])  # (its own factories say "cpu")
        eval(compile("torch.zeros(3)", array_optimizer.__file__, "eval"), {"torch": torch})
    assert len(spy.calls) == 1 and spy.calls[0].startswith("array_optimizer.py:") and spy.calls[0].endswith("zeros")


def test_the_batched_optimizer_steps_parameters_on_another_device():
    hps = [
        {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.1},
        {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"optimizer": "adamw", "lr": 0.02, "weight_decay": 0.1},  # the adams apart: updated by index
        {"optimizer": "rmsprop", "lr": 0.01, "momentum": 0.5},
    ]
    params = [torch.zeros(4, 5, 3, device="meta", requires_grad=True), torch.zeros(4, 1, 3, device="meta")]
    optimizer = ArrayOptimizer(params)
    for slot, hp in enumerate(hps):
        optimizer.assign(slot, hp)

    def step(mask: torch.Tensor | None = None) -> None:
        for p in optimizer._params:
            p.grad = torch.zeros_like(p)
        optimizer.step(mask)

    step()
    step(torch.tensor([True, False, True, True]))  # a diverged member's slot masked out
    optimizer.set_lr(1, 0.05)
    optimizer.retune(3, {"optimizer": "adagrad", "lr": 0.1})
    step()
    # Restacked: every slot an old one's (population-based training's copies) ...
    optimizer.rebind([torch.zeros(4, 5, 3, device="meta"), torch.zeros(4, 1, 3, device="meta")], [0, 0, 2, 3])
    step()
    # ... and with a new, empty slot (a member joined).
    optimizer.rebind([torch.zeros(3, 5, 3, device="meta"), torch.zeros(3, 1, 3, device="meta")], [1, None, 3])
    optimizer.assign(1, {"optimizer": "sgd", "lr": 0.1})
    step(torch.tensor([True, True, False]))
    assert all(s.device.type == "meta" for s in (*optimizer._first, *optimizer._second))
    # Steps counted on the CPU, where schedules write: slot 0 copied old slot 1 (4 steps),
    # slot 1 is new, slot 2 was masked out.
    assert optimizer._slots["step"].tolist() == [5.0, 1.0, 4.0]


def test_the_accelerators_registry_is_lightnings():
    import pytorch_lightning as pl
    from lightning_fabric.accelerators import ACCELERATOR_REGISTRY

    assert ACCELERATORS.names == ("auto", "cpu", "gpu")
    # Lightning's names: its registry's, and "auto" and "gpu" (CUDA or MPS), which its
    # Trainer resolves; each builds a Trainer here but "gpu", which this host may lack.
    assert {"cpu", "cuda", "mps"} <= set(ACCELERATOR_REGISTRY.available_accelerators())
    for name in ACCELERATORS.names:
        if unavailable(name) is None:
            assert pl.Trainer(accelerator=name, devices=1, logger=False).accelerator is not None
    assert unavailable("auto") is None and unavailable("cpu") is None


def test_a_study_file_names_its_accelerator():
    cfg = parse_config({"study": {"name": "a"}, "train": {"accelerator": "cpu"}}, "a.toml")
    assert cfg.train.accelerator == "cpu"
    assert parse_config({"study": {"name": "a"}}, "a.toml").train.accelerator == "auto"  # Lightning's default
    with pytest.raises(ConfigError) as e:
        parse_config({"study": {"name": "a"}, "train": {"accelerator": "tpu"}}, "a.toml")
    assert str(e.value) == "a.toml: [train].accelerator: expected one of 'auto', 'cpu', 'gpu', got 'tpu'"


@no_gpu
def test_run_refuses_a_gpu_this_host_lacks_before_making_anything(cli, write_study, tmp_path):
    path = write_study()
    r = cli("run", str(path), "--accelerator", "gpu")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "lrsearch: error: --accelerator: 'gpu' asked for, but torch sees no GPU on this host "
        "(no CUDA or MPS device): use 'auto' or 'cpu'"
    ]
    assert not (tmp_path / "lrsearch-data").exists()
    text = path.read_text().replace("[train]\n", '[train]\naccelerator = "gpu"\n')
    r = cli("run", str(write_study(text, "gpu.toml")))
    assert r.returncode == 2 and r.stderr.startswith(
        f"lrsearch: error: {tmp_path / 'gpu.toml'}: [train].accelerator: 'gpu' asked for, but torch sees no GPU"
    )
    assert not (tmp_path / "lrsearch-data").exists()
    r = cli("run", str(path), "--accelerator", "tpu")
    assert r.returncode == 2 and "--accelerator: expected one of 'auto', 'cpu', 'gpu', got 'tpu'" in r.stderr


@no_gpu
def test_a_worker_without_a_gpu_skips_a_study_that_asks_for_one_and_says_why(cli, write_study, tmp_path):
    from conftest import TINY_STUDY

    text = TINY_STUDY.replace("[train]\n", '[train]\naccelerator = "gpu"\n')
    assert cli("submit", str(write_study(text))).returncode == 0  # the submitting host need not train
    r = cli("worker", "--max-idle", "0.5")
    assert r.returncode == 0
    assert (
        "lrsearch: warning: study 'tiny' skipped: [train].accelerator: 'gpu' asked for, but torch sees no GPU "
        "on this host (no CUDA or MPS device): use 'auto' or 'cpu'"
    ) in r.stderr
    (row,) = json.loads(cli("status", "tiny", "--format", "json").stdout)
    assert row["state"] == "unrunnable" and row["reason"].endswith(
        "cannot run it: [train].accelerator: 'gpu' asked for, but torch sees no GPU on this host "
        "(no CUDA or MPS device): use 'auto' or 'cpu'"
    )
    # The same study trained on the CPU by a worker told so: --accelerator is the worker's.
    r = cli("worker", "--max-idle", "0.5", "--accelerator", "cpu", "--array", "3")
    assert r.returncode == 0 and "study 'tiny' taken up" in r.stderr
    assert "trials trained together: 3 at a time on cpu (array 3 asked for)" in r.stdout.splitlines()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'lrsearch-data' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`lrsearch.role` = 'study'")
    assert parent.data.tags["accelerator"] == "cpu" and parent.data.tags["device"] == "cpu"  # asked; picked
    (row,) = json.loads(cli("status", "tiny", "--format", "json").stdout)
    assert (row["state"], row["complete"]) == ("done", 3)


@pytest.mark.slow
def test_the_device_benchmark_runs_and_says_where_there_is_no_gpu():
    import subprocess

    script = Path(__file__).parent.parent / "bench" / "device.py"
    r = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("machine: ") and lines[-1].startswith("| cpu | ")
    assert ("no GPU on this host (torch sees no CUDA or MPS device): nothing to compare." in lines) is not HAS_GPU
    assert (
        "| K | max abs weight difference after 1 epoch | max val/acc difference after 2 epochs | verdict |" in lines
    ) is HAS_GPU
