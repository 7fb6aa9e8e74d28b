"""Lightning's accelerators: trial arrays on a GPU against the same arrays on the CPU.

Where torch sees a GPU (CUDA, or Apple's MPS), for K = 1, 16 and 64 members of the default
problem (blobs, MLP width 50, batch 32, pruner none; SGD with momentum 0.9, each member its
own lr, log-spaced 0.003 to 0.03, and seed), ``fit_array`` on each device:

- **Parity**: the same members trained on both devices. Their initial weights and data
  orders are drawn on the CPU, so after one epoch the GPU's weights must match the CPU's to
  float32 rounding (max |difference| <= 1e-4), and after ``--epochs`` every member's
  val/acc must be within 0.02 of the CPU's (kernels round differently; the difference
  compounds over the updates).
- **Speed**: seconds per trial (the fit's wall time / K), the median of ``--repeats``, on
  each device, beside a bare PyTorch loop training one trial on that device (same network,
  steps and per-epoch validation).

Where torch sees no GPU it says so and exits 0: no comparison is possible, and the CPU's
figures are bench/arrays.py's part 1. ``--quick`` runs the CPU half with tiny sizes (the
script's own check).

    python bench/device.py [--epochs 50] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lrsearch.choices.accelerators import unavailable  # noqa: E402
from lrsearch.choices.data import load_data  # noqa: E402
from lrsearch.choices.network import build_mlp  # noqa: E402
from lrsearch.choices.optimizers import make_optimizer  # noqa: E402
from lrsearch.config import parse_config  # noqa: E402
from lrsearch.fit.member import Member  # noqa: E402
from lrsearch.fit.training import fit_array, quiet_lightning  # noqa: E402

KS = (1, 16, 64)


def members(k: int, epochs: int) -> list[Member]:
    lrs = [0.003 * 10 ** (i / max(1, k - 1)) for i in range(k)]
    return [
        Member(str(i), {"optimizer": "sgd", "lr": lr, "momentum": 0.9, "schedule": "constant"}, i, epochs)
        for i, lr in enumerate(lrs)
    ]


def fit(cfg, data, k: int, epochs: int, accelerator: str) -> tuple[float, list[Member]]:
    trained = members(k, epochs)
    started = time.perf_counter()
    module = fit_array(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs)),
        data,
        trained,
        accelerator=accelerator,
    )
    seconds = time.perf_counter() - started
    assert module is not None and all(m.result.epochs == epochs for m in trained), "every member trains all its epochs"
    return seconds, trained


def _final(member: Member) -> float:
    value = member.result.final("val/acc")
    assert value is not None
    return value


def bare_loop(cfg, data, epochs: int, device: torch.device) -> float:
    """One trial in plain PyTorch on ``device``: whole-tensor minibatches, validation every epoch."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    net = build_mlp(data.n_features, data.n_classes, cfg.model, generator).to(device)
    opt = make_optimizer(net.parameters(), {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9})
    x, y, xv, yv = (t.to(device) for t in (data.x_train, data.y_train, data.x_val, data.y_val))
    n, bs = len(x), cfg.train.batch_size
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator, device="cpu").to(device)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            int((net(xv).argmax(1) == yv).sum())
    return time.perf_counter() - started


def machine(gpu: str | None) -> str:
    return (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch thread(s); torch {torch.__version__}; GPU: {gpu or 'none'}"
    )


def gpu_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "mps")


def gpu_name() -> str | None:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    if torch.backends.mps.is_available():
        return "Apple MPS"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quiet_lightning()
    gpu = gpu_name()
    print(machine(gpu))
    cfg = parse_config({"study": {"name": "device", "pruner": "none"}}, "bench/device.py")
    data = load_data(cfg.data)
    ks, epochs, repeats = ((1, 4), 2, 1) if args.quick else (KS, args.epochs, args.repeats)
    if unavailable("gpu") is not None:
        print("no GPU on this host (torch sees no CUDA or MPS device): nothing to compare.")
        if not args.quick:
            return 0
    devices = ["cpu"] + (["gpu"] if gpu else [])
    device_of = {"cpu": torch.device("cpu"), "gpu": gpu_device()}

    ok = True
    if gpu:
        print(f"\n## Parity: the same members on the CPU and on {gpu}\n")
        print(
            "| K | max abs weight difference after 1 epoch | max val/acc difference after "
            f"{epochs} epochs | verdict |\n|---|---|---|---|"
        )
        for k in ks:
            _, one_cpu = fit(cfg, data, k, 1, "cpu")
            _, one_gpu = fit(cfg, data, k, 1, "gpu")
            weights = max(
                float((a - b).abs().max())
                for m, g in zip(one_cpu, one_gpu)
                for a, b in zip(m.result.weights, g.result.weights)
            )
            _, full_cpu = fit(cfg, data, k, epochs, "cpu")
            _, full_gpu = fit(cfg, data, k, epochs, "gpu")
            acc = max(abs(_final(m) - _final(g)) for m, g in zip(full_cpu, full_gpu))
            passed = weights <= 1e-4 and acc <= 0.02
            ok &= passed
            print(f"| {k} | {weights:.2e} | {acc:.3f} | {'ok' if passed else 'FAILED'} |")

    print(f"\n## Seconds per trial, {epochs} epochs (median of {repeats})\n")
    print("| device | bare loop, 1 trial | " + " | ".join(f"K={k}" for k in ks) + " |")
    print("|---|---|" + "---|" * len(ks))
    for device in devices:
        fit(cfg, data, ks[0], 1, device)  # warm-up: the device's first kernels
        bare = statistics.median(bare_loop(cfg, data, epochs, device_of[device]) for _ in range(repeats))
        per_trial = [statistics.median(fit(cfg, data, k, epochs, device)[0] / k for _ in range(repeats)) for k in ks]
        cells = " | ".join(f"{s:.3f} ({s / bare:.2f}x)" for s in per_trial)
        print(f"| {device if device == 'cpu' else gpu} | {bare:.3f} | {cells} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
