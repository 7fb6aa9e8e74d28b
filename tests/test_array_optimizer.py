"""ArrayOptimizer against torch.optim: every slot of a stacked array must train as its member
would alone with make_optimizer, fed the same gradients (real torch, no mocks)."""

from __future__ import annotations

import pytest
import torch

from lrsearch.choices.optimizers import OPTIMIZERS, make_optimizer
from lrsearch.fit.array_optimizer import ArrayOptimizer

SHAPES = ((5, 3), (1, 3))  # a layer's weight [in, out] and bias [1, out], stacked as [K, ...]
LRS = (0.003, 0.01, 0.03, 0.1)

# Every option combination a trial can have (space.py: nesterov only with momentum > 0;
# an undeclared option absent from hp, so torch's default).
COMBINATIONS = {
    "sgd": {"optimizer": "sgd"},
    "sgd-momentum-0": {"optimizer": "sgd", "momentum": 0.0},
    "sgd-momentum": {"optimizer": "sgd", "momentum": 0.9, "nesterov": False},
    "sgd-nesterov": {"optimizer": "sgd", "momentum": 0.9, "nesterov": True},
    "adam": {"optimizer": "adam"},
    "rmsprop": {"optimizer": "rmsprop", "momentum": 0.0},
    "rmsprop-momentum": {"optimizer": "rmsprop", "momentum": 0.5},
    "adagrad": {"optimizer": "adagrad"},
    "adamw-decay": {"optimizer": "adamw", "weight_decay": 0.05},
    "adamw-default": {"optimizer": "adamw"},
}
MIXED = [{**hp, "lr": 0.002 * (i + 1)} for i, hp in enumerate(COMBINATIONS.values())]


def test_every_registry_optimizer_is_covered():
    assert {hp["optimizer"] for hp in COMBINATIONS.values()} == set(OPTIMIZERS.names)


class Twin:
    """A stacked array with its ArrayOptimizer, and per slot a copy of that slot's tensors
    with its own torch.optim optimizer: the reference."""

    def __init__(self, hps: list[dict], seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.hps = list(hps)
        self.stacked = [torch.randn(len(hps), *shape, generator=self.generator).requires_grad_() for shape in SHAPES]
        self.array = ArrayOptimizer(self.stacked)
        self.members: list[list[torch.Tensor]] = []
        self.torch_optimizers: list[torch.optim.Optimizer] = []
        for slot, hp in enumerate(hps):
            self.array.assign(slot, hp)
            self.members.append([t[slot].detach().clone().requires_grad_() for t in self.stacked])
            self.torch_optimizers.append(make_optimizer(self.members[slot], hp))

    def step(self, mask: list[bool] | None = None) -> None:
        """The same random gradients for both; only the slots mask allows step."""
        grads = [torch.randn(t.shape, generator=self.generator) for t in self.stacked]
        for t, g in zip(self.stacked, grads):
            t.grad = g.clone()
        for slot, (member, optimizer) in enumerate(zip(self.members, self.torch_optimizers)):
            if mask is None or mask[slot]:
                for t, g in zip(member, grads):
                    t.grad = g[slot].clone()
                optimizer.step()
        self.array.step(None if mask is None else torch.tensor(mask))

    def set_lr(self, slot: int, lr: float) -> None:
        """As a schedule would: the torch optimizer's param_groups, and the array's slot."""
        for group in self.torch_optimizers[slot].param_groups:
            group["lr"] = lr
        self.array.set_lr(slot, lr)

    def assert_match(self) -> None:
        for slot, member in enumerate(self.members):
            for stacked, alone in zip(self.stacked, member):
                torch.testing.assert_close(
                    stacked[slot].detach(),
                    alone.detach(),
                    rtol=1e-5,
                    atol=1e-7,
                    msg=lambda m, slot=slot: f"slot {slot} ({self.hps[slot]}): {m}",
                )


@pytest.mark.parametrize("name", COMBINATIONS)
def test_each_optimizer_matches_torch_with_a_different_lr_per_slot(name):
    twin = Twin([{**COMBINATIONS[name], "lr": lr} for lr in LRS])
    for _ in range(200):
        twin.step()
    twin.assert_match()


@pytest.mark.parametrize(
    "order",
    [
        pytest.param([0, 0, 1, 1], id="contiguous-kinds"),  # each kind a run of slots: updated through views
        pytest.param([0, 1, 0, 1], id="scattered-kinds"),  # interleaved: rows gathered and written back
    ],
)
@pytest.mark.parametrize(
    ("a", "b"), [("adam", "sgd-nesterov"), ("rmsprop-momentum", "adagrad"), ("sgd", "adamw-decay")]
)
def test_two_optimizers_in_one_array(order, a, b):
    kinds = (COMBINATIONS[a], COMBINATIONS[b])
    twin = Twin([{**kinds[kind], "lr": lr} for kind, lr in zip(order, LRS)])
    for _ in range(200):
        twin.step()
    twin.assert_match()


def test_every_combination_in_one_array():
    twin = Twin(MIXED)
    for _ in range(200):
        twin.step()
    twin.assert_match()


def test_set_lr_every_step_as_a_schedule_does():
    twin = Twin(MIXED)
    for t in range(200):
        for slot, hp in enumerate(MIXED):
            # A different schedule per slot: linear decay, halving at 100, constant.
            factor = (1 - t / 250, 0.5 if t >= 100 else 1.0, 1.0)[slot % 3]
            twin.set_lr(slot, hp["lr"] * factor)
        twin.step()
    twin.assert_match()


def test_a_masked_slot_is_left_exactly_unchanged():
    twin = Twin(MIXED)
    for _ in range(20):
        twin.step()
    masked = 3
    mask = [slot != masked for slot in range(len(MIXED))]
    before = [t[masked].detach().clone() for t in twin.stacked]
    twin.step(mask)
    for t, b in zip(twin.stacked, before):
        assert torch.equal(t[masked].detach(), b)
    twin.assert_match()


def test_random_masks_keep_each_slots_own_state_and_step_count():
    twin = Twin(MIXED)
    for t in range(200):
        # Slots drop out now and then (so each has its own step count); all-true and
        # all-but-one masks come up too.
        twin.step([bool((t * 7 + slot * 3) % 5) for slot in range(len(MIXED))])
    twin.assert_match()


def test_rebind_drops_a_slot_and_starts_a_fresh_member():
    hps = [
        {**COMBINATIONS["adam"], "lr": 0.01},
        {**COMBINATIONS["sgd-nesterov"], "lr": 0.05},
        {**COMBINATIONS["rmsprop-momentum"], "lr": 0.001},
        {**COMBINATIONS["adamw-decay"], "lr": 0.003},
    ]
    twin = Twin(hps)
    for _ in range(30):
        twin.step()
    # Slot 1 leaves; a new AdamW member joins between the survivors (its Adam step count
    # starts at 0 while theirs are at 30), and the order changes.
    old_slots = [3, 0, None, 2]
    joining = {**COMBINATIONS["adamw-default"], "lr": 0.02}
    fresh = [torch.randn(*shape, generator=twin.generator) for shape in SHAPES]
    twin.stacked = [
        torch.stack([t[old].detach() if old is not None else f for old in old_slots]).requires_grad_()
        for t, f in zip(twin.stacked, fresh)
    ]
    twin.array.rebind(twin.stacked, old_slots)
    twin.array.assign(2, joining)
    joined = [f.clone().requires_grad_() for f in fresh]
    twin.members = [twin.members[3], twin.members[0], joined, twin.members[2]]
    twin.torch_optimizers = [
        twin.torch_optimizers[3],
        twin.torch_optimizers[0],
        make_optimizer(joined, joining),
        twin.torch_optimizers[2],
    ]
    twin.hps = [hps[3], hps[0], joining, hps[2]]
    for _ in range(50):
        twin.step()
    twin.assert_match()


def test_step_refuses_a_slot_without_a_member_unless_masked_out():
    stacked = [torch.zeros(2, *shape, requires_grad=True) for shape in SHAPES]
    array = ArrayOptimizer(stacked)
    array.assign(0, {"optimizer": "sgd", "lr": 0.1})
    for t in stacked:
        t.grad = torch.ones_like(t)
    with pytest.raises(RuntimeError, match=r"slots \[1\]"):
        array.step()
    array.step(torch.tensor([True, False]))
    assert torch.equal(stacked[0][0].detach(), torch.full(SHAPES[0], -0.1))
    assert torch.equal(stacked[0][1].detach(), torch.zeros(SHAPES[0]))
    array.zero_grad()
    assert all(t.grad is None for t in stacked)


def test_nesterov_without_momentum_is_refused_as_torch_does():
    array = ArrayOptimizer([torch.zeros(1, 2, 2, requires_grad=True)])
    with pytest.raises(ValueError, match="Nesterov"):
        array.assign(0, {"optimizer": "sgd", "lr": 0.1, "nesterov": True})
