"""One optimizer for a trial array: K members trained at once, each layer stacked as one tensor.

``torch.optim`` takes one learning rate per parameter group, a float or a 1-element
tensor, so K members stacked along dim 0 cannot each have their own rate, schedule or
optimizer there. ``ArrayOptimizer`` updates the stacked tensors itself: per-slot
hyperparameters are ``[K, 1, 1]`` tensors broadcasting over each stacked weight and bias,
and every optimizer variant in the array is one batched update over its slots.

The updates follow torch's single-tensor (CPU, non-foreach) code operation by operation,
with torch's defaults for everything a trial does not set (``Optimizer.build`` passes only
the options a trial's hyperparameters hold), so a member trains as it would alone with
``make_optimizer``. Where torch folds a Python scalar into a kernel (``value=-lr``), the
same float product is formed here from the per-slot tensor, rounded the way the kernel
rounds it: on torch 2.13 (CPU) every slot came out bit-identical to torch.optim over 200
updates, for every optimizer and option (tests/test_array_optimizer.py allows 1e-5).

The stacked parameters and their state live on the module's device; the per-slot
hyperparameters and step counts stay on the CPU, where a schedule writes them through NumPy
views. On another device (a GPU) each step sends the few ``[K]`` scalars its rules read, in
the parameters' dtype (MPS has no float64), and the rows it reaches by index.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lrsearch.choices.optimizers import OPTIMIZERS


@functools.cache  # inspect.signature takes ~0.1 ms: population-based training retunes often
def _torch_default(optimizer: str, argument: str) -> Any:
    """Torch's default for an argument of the optimizer's class, read from its signature so the
    two cannot drift apart."""
    cls = getattr(torch.optim, OPTIMIZERS[optimizer].torch_class)
    return inspect.signature(cls).parameters[argument].default


_BETA1, _BETA2 = _torch_default("adam", "betas")
_ADAM_EPS = _torch_default("adam", "eps")
_ALPHA = _torch_default("rmsprop", "alpha")
_RMSPROP_EPS = _torch_default("rmsprop", "eps")
_ADAGRAD_EPS = _torch_default("adagrad", "eps")
# Adagrad's lr_decay is not an option, and at torch's default 0 its rate lr / (1 + (step - 1)
# * lr_decay) is exactly lr: the update needs no step count.
assert _torch_default("adagrad", "lr_decay") == 0 and _torch_default("adagrad", "initial_accumulator_value") == 0

# Which slots a group updates: all of them (the tensors themselves), a contiguous range (views
# updated in place) or scattered slots (rows gathered, updated, written back).
_Rows = None | slice | torch.Tensor


def _take(tensor: torch.Tensor, rows: _Rows) -> torch.Tensor:
    if rows is None:
        return tensor
    if isinstance(rows, slice):
        return tensor[rows]
    return tensor.index_select(0, rows if rows.device == tensor.device else rows.to(tensor.device))


@dataclass(frozen=True)
class _Group:
    """The slots that share one update rule, found once per assign/rebind, not per step."""

    variant: str
    index: torch.Tensor  # the slots, ascending
    rows: _Rows  # how step() reaches them when no mask narrows them
    # The per-slot arrays as [G, 1, 1] views for those rows, when they are views (all slots or
    # a contiguous run): set_lr's writes show through, so they are made once, not per step.
    hyper: dict[str, torch.Tensor] | None
    decays: bool  # some AdamW slot has weight_decay != 0 (Adam alone skips the multiply)


class ArrayOptimizer:
    """Batched torch.optim-equivalent updates over stacked parameters, each slot (dim 0) a
    member with its own optimizer, learning rate, options and state."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self._bind(params)
        size = self._size
        self._variant: list[str | None] = [None] * size
        # Two state buffers per parameter serve every optimizer (each slot has one kind):
        # `first` is the momentum buffer or Adam's exp_avg, `second` Adam's exp_avg_sq,
        # RMSprop's square_avg or Adagrad's sum. Zeros are every kind's fresh state (SGD's
        # first update, buf * momentum + grad from zero, is exactly torch's buf = grad).
        self._first = [torch.zeros_like(p) for p in self._params]
        self._second = [torch.zeros_like(p) for p in self._params]
        self._slots = self._slot_arrays(size)
        self._groups: list[_Group] | None = None  # made by the first step()

    def _bind(self, params: list[torch.Tensor]) -> None:
        if not params:
            raise ValueError("ArrayOptimizer needs at least one stacked parameter")
        size = params[0].shape[0]
        # Weights [K, in, out] and biases [K, 1, out]: the [K, 1, 1] hyperparameters broadcast.
        if any(p.dim() != 3 or p.shape[0] != size for p in params):
            raise ValueError("every stacked parameter must be 3-D with dim 0 = the K slots")
        self._params = list(params)
        self._size = size
        self._device = params[0].device  # the parameters' and their state's (the slot arrays are the CPU's)

    def _slot_arrays(self, size: int) -> dict[str, torch.Tensor]:
        """Per-slot hyperparameters and step counts, flat ``[K]``; the update reads them as
        ``[K, 1, 1]`` views. Doubles where torch computes in Python floats (lr, weight decay,
        steps feed Adam's bias corrections); the others as the parameters' dtype, since torch's
        kernels cast a Python scalar to it."""
        dtype = self._params[0].dtype
        cpu = torch.device("cpu")
        arrays = {name: torch.zeros(size, dtype=torch.float64, device=cpu) for name in ("lr", "weight_decay", "step")}
        arrays.update({name: torch.zeros(size, dtype=dtype, device=cpu) for name in ("neg_lr", "momentum")})
        # NumPy views write one slot's value in place in well under a microsecond.
        self._numpy = {name: array.numpy() for name, array in arrays.items()}
        return arrays

    def assign(self, slot: int, hp: Mapping[str, Any]) -> None:
        """Give ``slot`` a member: its optimizer, learning rate and options from ``hp`` (torch's
        defaults for options ``hp`` lacks), and fresh state."""
        self.retune(slot, hp)
        self._numpy["step"][slot] = 0.0
        with torch.no_grad():
            for state in (*self._first, *self._second):
                state[slot].zero_()

    def retune(self, slot: int, hp: Mapping[str, Any]) -> None:
        """``slot``'s optimizer, learning rate and options from ``hp``, its state kept (as
        torch keeps an optimizer's state when a param group's values change: a momentum
        buffer that was never used starts from zero, as torch's starts from the gradient)."""
        name = hp["optimizer"]
        options = {option: hp.get(option, _torch_default(name, option)) for option in OPTIMIZERS[name].options}
        momentum = float(options.get("momentum", 0.0))
        if name == "sgd":
            if options["nesterov"] and momentum <= 0:
                raise ValueError("Nesterov momentum requires a momentum (torch.optim.SGD refuses it too)")
            variant = "nesterov" if options["nesterov"] else "momentum" if momentum else "sgd"
        elif name in ("adam", "adamw"):
            variant = "adam"  # Adam is AdamW with no decay: one batched update for both
        elif name == "rmsprop":
            # Not merged with momentum 0: torch's plain step rounds lr * grad / avg differently.
            variant = "rmsprop_momentum" if momentum else "rmsprop"
        elif name == "adagrad":
            variant = "adagrad"
        else:
            raise ValueError(f"ArrayOptimizer has no batched update for optimizer {name!r}")
        self._variant[slot] = variant
        self._numpy["momentum"][slot] = momentum
        self._numpy["weight_decay"][slot] = float(options.get("weight_decay", 0.0))
        self.set_lr(slot, hp["lr"])
        self._groups = None

    def set_lr(self, slot: int, lr: float) -> None:
        """A schedule moved this slot's rate: two scalar writes, no tensor op."""
        self._numpy["lr"][slot] = lr
        self._numpy["neg_lr"][slot] = -lr  # rounded to the parameters' dtype as torch's kernels round alpha

    def zero_grad(self) -> None:
        for p in self._params:
            p.grad = None

    def rebind(self, params: list[torch.Tensor], old_slots: Sequence[int | None]) -> None:
        """The stacked tensors were rebuilt: new slot i takes over old slot ``old_slots[i]``'s
        state, hyperparameters and step count, or is empty (None) until assigned. An old
        slot may be taken by several new ones (population-based training's copies)."""
        if len(params) != len(self._params) or any(
            new.shape[1:] != old.shape[1:] for new, old in zip(params, self._params)
        ):
            raise ValueError("rebind needs the same parameters, restacked: only dim 0 may change")
        if params[0].shape[0] != len(old_slots):
            raise ValueError(f"{len(old_slots)} old_slots for {params[0].shape[0]} slots")
        old_first, old_second, old_slots_arrays = self._first, self._second, self._slots
        if None not in old_slots:  # every slot an old one's: one gather (a slot may be copied twice)
            self._bind(params)
            index = torch.tensor(old_slots, dtype=torch.long, device="cpu")
            with torch.no_grad():
                self._first = [_take(s, index) for s in old_first]
                self._second = [_take(s, index) for s in old_second]
            self._slots = {name: array.index_select(0, index) for name, array in old_slots_arrays.items()}
            self._numpy = {name: array.numpy() for name, array in self._slots.items()}
            self._variant = [self._variant[old] for old in old_slots]  # type: ignore[index]
            self._groups = None
            return
        self._bind(params)
        kept = [(new, old) for new, old in enumerate(old_slots) if old is not None]
        dst = torch.tensor([new for new, _ in kept], dtype=torch.long, device="cpu")
        src = torch.tensor([old for _, old in kept], dtype=torch.long, device="cpu")
        dst_here, src_here = dst.to(self._device), src.to(self._device)
        self._first = [
            torch.zeros_like(p).index_copy_(0, dst_here, s.index_select(0, src_here))
            for p, s in zip(self._params, old_first)
        ]
        self._second = [
            torch.zeros_like(p).index_copy_(0, dst_here, s.index_select(0, src_here))
            for p, s in zip(self._params, old_second)
        ]
        self._slots = self._slot_arrays(self._size)
        for name, array in self._slots.items():
            array.index_copy_(0, dst, old_slots_arrays[name].index_select(0, src))
        self._variant = [None if old is None else self._variant[old] for old in old_slots]
        self._groups = None

    def _regroup(self) -> list[_Group]:
        """One group per update rule, with its slots' index tensor precomputed; a group that is
        every slot, or a contiguous run of them, is updated through views, without gathering."""
        groups = []
        for variant in dict.fromkeys(v for v in self._variant if v is not None):
            slots = [slot for slot, v in enumerate(self._variant) if v == variant]
            index = torch.tensor(slots, dtype=torch.long, device="cpu")
            if len(slots) == self._size:
                rows: _Rows = None
            elif slots[-1] - slots[0] + 1 == len(slots):
                rows = slice(slots[0], slots[-1] + 1)
            else:
                rows = index
            hyper = None if isinstance(rows, torch.Tensor) else self._hyper(rows)
            decays = variant == "adam" and bool(self._slots["weight_decay"][index].any())
            groups.append(_Group(variant, index, rows, hyper, decays))
        self._empty = torch.tensor(
            [slot for slot, v in enumerate(self._variant) if v is None], dtype=torch.long, device="cpu"
        )
        return groups

    def _hyper(self, rows: _Rows) -> dict[str, torch.Tensor]:
        return {name: _take(array, rows).view(-1, 1, 1) for name, array in self._slots.items()}

    @torch.no_grad()
    def step(self, mask: torch.Tensor | None = None) -> None:
        """One update of every assigned slot (those where the bool ``[K]`` mask is True),
        from each parameter's ``.grad``; other slots keep weights, state and step count."""
        if self._groups is None:
            self._groups = self._regroup()
        if mask is not None and mask.device.type != "cpu":
            mask = mask.cpu()  # which slots update is the CPU's business (the step counts live there)
        empty = self._empty
        if empty.numel() and (mask is None or bool(mask[empty].any())):
            raise RuntimeError(f"slots {empty.tolist()} have no member: assign() them before step(), or mask them out")
        steps = self._slots["step"]
        if mask is None:
            steps.add_(1)
        else:
            steps.add_(mask)
        for group in self._groups:
            rows, hyper = group.rows, group.hyper
            if mask is not None:
                chosen = group.index[mask.index_select(0, group.index)]
                if chosen.numel() == 0:
                    continue
                if chosen.numel() < group.index.numel():
                    rows, hyper = chosen, None
            self._update(group, rows, hyper if hyper is not None else self._hyper(rows))

    def _update(self, group: _Group, rows: _Rows, hyper: dict[str, torch.Tensor]) -> None:
        """One batched update of ``group``'s slots ``rows``, parameter by parameter."""
        rule, uses_first, uses_second = _RULES[group.variant]
        if group.variant == "adam":
            hyper = {**hyper, **_adam_scalars(hyper, group.decays)}
        if self._device.type != "cpu":
            hyper = _sent(hyper, self._device, self._params[0].dtype)
            if isinstance(rows, torch.Tensor):
                rows = rows.to(self._device)
        for p, first, second in zip(self._params, self._first, self._second):
            if p.grad is None:
                continue
            rows_p = _take(p, rows)
            rows_first = _take(first, rows) if uses_first else first  # gathered only if the rule uses it
            rows_second = _take(second, rows) if uses_second else second
            rule(rows_p, _take(p.grad, rows), rows_first, rows_second, hyper)
            if isinstance(rows, torch.Tensor):  # gathered: written back
                p.index_copy_(0, rows, rows_p)
                if uses_first:
                    first.index_copy_(0, rows, rows_first)
                if uses_second:
                    second.index_copy_(0, rows, rows_second)


def _sent(hyper: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What the rules read (the parameters' dtype: the doubles only feed Adam's scalars), on
    ``device``: a handful of ``[G]`` copies a step."""
    return {name: array.to(device) for name, array in hyper.items() if array.dtype == dtype}


def _adam_scalars(hyper: dict[str, torch.Tensor], decays: bool) -> dict[str, torch.Tensor]:
    """Adam's per-slot step size, bias correction and decoupled decay, in doubles as torch
    computes them in Python floats, then rounded once to the parameters' dtype as its kernels
    round a scalar argument (each slot has its own step count: a member that joined later has
    taken fewer steps)."""
    dtype = hyper["neg_lr"].dtype
    step = hyper["step"]
    neg_step_size = hyper["lr"].div(torch.pow(_BETA1, step).neg_().add_(1)).neg_().to(dtype)
    bias_correction2_sqrt = torch.pow(_BETA2, step).neg_().add_(1).sqrt_().to(dtype)
    scalars = {"neg_step_size": neg_step_size, "bias_correction2_sqrt": bias_correction2_sqrt}
    if decays:
        scalars["decay"] = hyper["lr"].mul(hyper["weight_decay"]).neg_().add_(1).to(dtype)
    return scalars


# The update rules, each torch's single-tensor step for one variant with per-slot tensors in
# place of its scalars: p the slots' weights, g their gradients, first/second their state.
# torch's p.add_(x, alpha=-lr) is p + (-lr) * x: here p.addcmul_(x, neg_lr); its
# p.addcdiv_(a, b, value=-s) is p + ((-s) * a) / b: here p.addcdiv_(a * neg_s, b).


def _sgd(
    p: torch.Tensor, g: torch.Tensor, first: torch.Tensor, second: torch.Tensor, h: dict[str, torch.Tensor]
) -> None:
    p.addcmul_(g, h["neg_lr"])


def _momentum(
    p: torch.Tensor, g: torch.Tensor, first: torch.Tensor, second: torch.Tensor, h: dict[str, torch.Tensor]
) -> None:
    first.mul_(h["momentum"]).add_(g)  # dampening 0
    p.addcmul_(first, h["neg_lr"])


def _nesterov(
    p: torch.Tensor, g: torch.Tensor, first: torch.Tensor, second: torch.Tensor, h: dict[str, torch.Tensor]
) -> None:
    first.mul_(h["momentum"]).add_(g)
    p.addcmul_(torch.addcmul(g, first, h["momentum"]), h["neg_lr"])


def _adam(
    p: torch.Tensor, g: torch.Tensor, first: torch.Tensor, second: torch.Tensor, h: dict[str, torch.Tensor]
) -> None:
    if "decay" in h:
        p.mul_(h["decay"])  # AdamW's decoupled decay, before the moments as in torch
    first.lerp_(g, 1 - _BETA1)
    second.mul_(_BETA2).addcmul_(g, g, value=1 - _BETA2)
    denom = second.sqrt().div_(h["bias_correction2_sqrt"]).add_(_ADAM_EPS)
    p.addcdiv_(first * h["neg_step_size"], denom)


def _rmsprop(
    p: torch.Tensor, g: torch.Tensor, first: torch.Tensor, second: torch.Tensor, h: dict[str, torch.Tensor]
) -> None:
    second.mul_(_ALPHA).addcmul_(g, g, value=1 - _ALPHA)
    avg = second.sqrt().add_(_RMSPROP_EPS)
    p.addcdiv_(g * h["neg_lr"], avg)


def _rmsprop_momentum(
    p: torch.Tensor, g: torch.Tensor, first: torch.Tensor, second: torch.Tensor, h: dict[str, torch.Tensor]
) -> None:
    second.mul_(_ALPHA).addcmul_(g, g, value=1 - _ALPHA)
    avg = second.sqrt().add_(_RMSPROP_EPS)
    first.mul_(h["momentum"]).addcdiv_(g, avg)
    p.addcmul_(first, h["neg_lr"])


def _adagrad(
    p: torch.Tensor, g: torch.Tensor, first: torch.Tensor, second: torch.Tensor, h: dict[str, torch.Tensor]
) -> None:
    second.addcmul_(g, g)
    std = second.sqrt().add_(_ADAGRAD_EPS)
    p.addcdiv_(g * h["neg_lr"], std)


# variant -> (rule, uses first, uses second): what a gathered update must gather and write back.
_RULES: dict[str, tuple[Callable[..., None], bool, bool]] = {
    "sgd": (_sgd, False, False),
    "momentum": (_momentum, True, False),
    "nesterov": (_nesterov, True, False),
    "adam": (_adam, True, True),
    "rmsprop": (_rmsprop, False, True),
    "rmsprop_momentum": (_rmsprop_momentum, True, True),
    "adagrad": (_adagrad, False, True),
}
