"""Learning-rate schedulers by kohya's `lr_scheduler` names, with the curves of diffusers.optimization (which
kohya's get_scheduler_fix calls), written here so that training needs only torch.

Each built-in is a `LambdaLR` whose factor is a small callable object: `state_dict()`/`load_state_dict()` save and
restore the step count and the factor's settings, so a resumed run continues the same curve. With w warmup steps
and T training steps, at step s (p = (s - w) / max(1, T - w) after warmup):

| name | factor |
| --- | --- |
| constant | 1 |
| constant_with_warmup | s / max(1, w) during warmup, then 1 |
| linear | warmup, then max(0, (T - s) / max(1, T - w)) |
| cosine | warmup, then max(0, (1 + cos(pi p)) / 2) |
| cosine_with_restarts | warmup, then (1 + cos(pi ((n p) mod 1))) / 2 for p < 1, else 0 (n = num_cycles) |
| polynomial | warmup, then ((lr0 - lr_end) (1 - p)^power + lr_end) / lr0, lr_end / lr0 after T (lr0 = optimizer lr) |
| adafactor | transformers' AdafactorSchedule: reports Adafactor's own relative step size |
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Any, Iterable, Mapping

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..algos.options import OptionError, suggest
from .checks import ADAFACTOR_SCHEDULE_WITHOUT_RELATIVE_STEP, refuse_warmup
from .optimizers import is_schedule_free, parse_kwargs

logger = logging.getLogger(__name__)

SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "adafactor",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "piecewise_constant",
)
_NEEDS_TOTAL = {"linear", "cosine", "cosine_with_restarts", "polynomial", "cosine_with_min_lr", "warmup_stable_decay"}


def warmup_steps(num_warmup_steps: int | float | None, num_training_steps: int) -> int:
    """kohya's lr_warmup_steps: an int is a step count, a float in [0, 1] a ratio of the training steps."""
    if num_warmup_steps is None:
        return 0
    if isinstance(num_warmup_steps, bool):
        raise OptionError(f"lr_warmup_steps={num_warmup_steps}: expected a step count or a ratio in [0, 1]")
    if isinstance(num_warmup_steps, float):
        if not 0.0 <= num_warmup_steps <= 1.0:
            raise OptionError(
                f"lr_warmup_steps={num_warmup_steps}: a float is a ratio of the training steps and must be in [0, 1]; "
                "give an integer for a number of steps"
            )
        return int(num_warmup_steps * num_training_steps)
    if num_warmup_steps < 0:
        raise OptionError(f"lr_warmup_steps={num_warmup_steps}: expected a number >= 0")
    return int(num_warmup_steps)


class _Warmup:
    """Linear warmup from 0 to 1 over `warmup` steps, then `after(step)`."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return float(step) / float(max(1, self.warmup))
        return self.after(step)

    def progress(self, step: int) -> float:
        return float(step - self.warmup) / float(max(1, self.total - self.warmup))

    def after(self, step: int) -> float:
        return 1.0


class ConstantFactor(_Warmup):
    pass


class LinearFactor(_Warmup):
    def after(self, step):
        return max(0.0, float(self.total - step) / float(max(1, self.total - self.warmup)))


class CosineFactor(_Warmup):
    def __init__(self, warmup, total, num_cycles: float = 0.5):
        super().__init__(warmup, total)
        self.num_cycles = num_cycles

    def after(self, step):
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(self.num_cycles) * 2.0 * self.progress(step))))


class CosineRestartsFactor(_Warmup):
    def __init__(self, warmup, total, num_cycles: int = 1):
        super().__init__(warmup, total)
        self.num_cycles = num_cycles

    def after(self, step):
        p = self.progress(step)
        if p >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(self.num_cycles) * p) % 1.0))))


class PolynomialFactor(_Warmup):
    def __init__(self, warmup, total, lr_init: float, lr_end: float = 1e-7, power: float = 1.0):
        super().__init__(warmup, total)
        self.lr_init, self.lr_end, self.power = lr_init, lr_end, power

    def after(self, step):
        if step > self.total:
            return self.lr_end / self.lr_init
        remaining = 1.0 - float(step - self.warmup) / float(self.total - self.warmup)
        return ((self.lr_init - self.lr_end) * remaining**self.power + self.lr_end) / self.lr_init


class InverseSqrtFactor(_Warmup):
    """transformers' inverse_sqrt: 1 / sqrt((s + timescale - w) / timescale) after warmup."""

    def __init__(self, warmup, total, timescale: int):
        super().__init__(warmup, total)
        self.timescale = timescale

    def after(self, step):
        return 1.0 / math.sqrt((step + self.timescale - self.warmup) / self.timescale)


class CosineMinLrFactor(CosineFactor):
    """transformers' cosine_with_min_lr: the cosine rescaled into [min_lr_rate, 1]."""

    def __init__(self, warmup, total, num_cycles: float, min_lr_rate: float):
        super().__init__(warmup, total, num_cycles)
        self.min_lr_rate = min_lr_rate

    def after(self, step):
        cos = 0.5 * (1.0 + math.cos(math.pi * float(self.num_cycles) * 2.0 * self.progress(step)))
        return max(0.0, cos * (1.0 - self.min_lr_rate) + self.min_lr_rate)


class WarmupStableDecayFactor:
    """transformers' get_wsd_schedule: warmup from min_lr_ratio to 1, stable at 1, decay back to min_lr_ratio."""

    SHAPES = ("linear", "cosine", "1-sqrt")

    def __init__(self, warmup: int, stable: int, decay: int, min_lr_ratio: float = 0.0, num_cycles: float = 0.5,
                 warmup_type: str = "linear", decay_type: str = "cosine"):
        self.warmup, self.stable, self.decay = warmup, stable, decay
        self.min_lr_ratio, self.num_cycles = min_lr_ratio, num_cycles
        self.warmup_type, self.decay_type = warmup_type, decay_type

    def __call__(self, step: int) -> float:
        lo = self.min_lr_ratio
        if step < self.warmup:
            p = float(step) / float(max(1, self.warmup))
            f = {"linear": p, "cosine": 0.5 * (1.0 - math.cos(math.pi * p)), "1-sqrt": 1.0 - math.sqrt(1.0 - p)}
            return max(0.0, f[self.warmup_type] * (1.0 - lo) + lo)
        if step < self.warmup + self.stable:
            return 1.0
        if step < self.warmup + self.stable + self.decay:
            p = float(step - self.warmup - self.stable) / float(max(1, self.decay))
            f = {"linear": 1.0 - p, "cosine": 0.5 * (1.0 + math.cos(math.pi * float(self.num_cycles) * 2.0 * p)),
                 "1-sqrt": 1.0 - math.sqrt(p)}
            return max(0.0, f[self.decay_type] * (1.0 - lo) + lo)
        return lo


class PiecewiseConstantFactor:
    """diffusers' piecewise_constant: step_rules "1:10,0.1:20,0.01" = factor 1 before step 10, 0.1 before step 20,
    then 0.01."""

    def __init__(self, step_rules: str):
        try:
            *rules, last = str(step_rules).split(",")
            self.rules = sorted((int(steps), float(value)) for value, steps in (r.split(":") for r in rules))
            self.last = float(last)
        except ValueError:
            raise OptionError(f"lr_scheduler_args step_rules={step_rules!r}: expected 'factor:step,...,factor' such "
                              "as '1:10,0.1:20,0.01'") from None

    def __call__(self, step: int) -> float:
        for until, value in self.rules:
            if step < until:
                return value
        return self.last


_OWN_FACTORS = (_Warmup, WarmupStableDecayFactor, PiecewiseConstantFactor)


def _own_curve(scheduler) -> bool:
    return isinstance(scheduler, LambdaLR) and all(isinstance(f, _OWN_FACTORS) for f in scheduler.lr_lambdas)


def load_scheduler_state(scheduler, state: dict) -> None:
    """A resume: the saved step count. lorakit's own curves keep the factors this run built from its config, which
    the resume checked equal but for the length; a longer run's curve thus follows the new length, as in
    sd-scripts, where only the step count comes back (diffusers' lambdas are closures, which LambdaLR does not
    save). Any other scheduler gets its whole saved state."""
    if _own_curve(scheduler):
        state = {**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)}
    scheduler.load_state_dict(state)


def follow_new_length(scheduler) -> None:
    """After a resume, the optimizer's lr at the restored step from this run's curve. The optimizer state brought
    back the saved run's lr, which differs from it when the run was made longer; for the same length the two are
    the same number."""
    if not _own_curve(scheduler):
        return
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _reject_args(name: str, args: dict, allowed: Iterable[str] = ()) -> None:
    extra = sorted(set(args) - set(allowed))
    if extra:
        takes = f" (it takes {', '.join(sorted(allowed))})" if allowed else " (it takes none)"
        raise OptionError(f"lr_scheduler_args {extra} are not arguments of the '{name}' scheduler{takes}")


def _is_relative_step_adafactor(optimizer) -> bool:
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


def _class_scheduler(name: str, optimizer, args: dict):
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise OptionError(f"lr_scheduler {name!r}: cannot import module '{module_name}' ({e})") from e
    else:
        module, attr = torch.optim.lr_scheduler, name
    factory = getattr(module, attr, None)  # a class, or a function that builds one (sd-scripts calls either)
    if not callable(factory):
        raise OptionError(f"lr_scheduler {name!r}: {module.__name__} has no scheduler class or function '{attr}'")
    try:
        scheduler = factory(optimizer, **args)
    except TypeError as e:
        raise OptionError(f"lr_scheduler_args {args} for {name}: {e}") from e
    if not callable(getattr(scheduler, "step", None)):
        raise OptionError(f"lr_scheduler {name!r} returned {type(scheduler).__name__}, not a scheduler")
    return scheduler


def make_scheduler(
    name: str | None,
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_warmup_steps: int | float | None = 0,
    num_cycles: int | float = 1,
    power: float = 1.0,
    scheduler_args: Iterable[str] | Mapping[str, Any] | str | None = None,
    num_decay_steps: int | float | None = 0,
    timescale: int | None = None,
    min_lr_ratio: float | None = None,
    scheduler_type: str | None = None,
):
    """The scheduler kohya builds for `lr_scheduler` `name` (None/"" = constant). Call `.step()` once per
    optimizer step. `num_warmup_steps` is an int or a float ratio of `num_training_steps`; `num_cycles` is
    lr_scheduler_num_cycles (cosine_with_restarts), `power` lr_scheduler_power (polynomial); `scheduler_args`
    ("key=value" strings or a dict) go to a class-path scheduler (`torch.optim.lr_scheduler.OneCycleLR`, or a bare
    torch.optim.lr_scheduler class name), or give polynomial's `lr_end`, piecewise_constant's `step_rules`,
    cosine_with_min_lr's `min_lr`, warmup_stable_decay's `warmup_type`/`decay_type`. `num_decay_steps`
    (lr_decay_steps, an int or a ratio), `timescale` (lr_scheduler_timescale) and `min_lr_ratio`
    (lr_scheduler_min_lr_ratio) are those of warmup_stable_decay, inverse_sqrt and cosine_with_min_lr, passed as
    sd-scripts' get_scheduler_fix passes them. `scheduler_type` (lr_scheduler_type) is a class path, or the path of a
    function that builds the scheduler (`transformers.optimization.get_cosine_schedule_with_warmup`), called as
    `factory(optimizer, **scheduler_args)`; it replaces `name`, as there.

    A schedule-free optimizer keeps its lr (its own warmup is its optimizer_args warmup_steps): a constant schedule,
    whatever the arguments say, as sd-scripts gives it a dummy scheduler.

    An Adafactor with relative_step (kohya's default) sets its own step size: it gets the 'adafactor' scheduler
    whatever `name` says, as in kohya."""
    if is_schedule_free(optimizer):  # sd-scripts' get_scheduler_fix: a dummy scheduler that keeps the lr
        return LambdaLR(optimizer, ConstantFactor(0, num_training_steps))
    args = parse_kwargs(scheduler_args, "lr_scheduler_args")
    name = (name or "constant").strip()
    warmup = warmup_steps(num_warmup_steps, num_training_steps)
    if scheduler_type:  # sd-scripts checks lr_scheduler_type first, whatever the optimizer
        if warmup:
            raise OptionError(f"lr_scheduler_type {scheduler_type!r} takes no lr_warmup_steps (got {warmup}); set it "
                              "to 0")
        return _class_scheduler(scheduler_type, optimizer, args)
    if num_training_steps < 1 and name.lower() in _NEEDS_TOTAL:
        raise OptionError(f"lr_scheduler '{name}' needs the number of training steps (got {num_training_steps})")

    key = name.lower()
    if key.startswith("adafactor:"):  # kohya's internal spelling "adafactor:<initial lr>"
        key = "adafactor"
    if _is_relative_step_adafactor(optimizer) and key != "adafactor":
        logger.warning(
            "Adafactor with relative_step computes its own learning rate: using the 'adafactor' scheduler, not %r", name
        )
        key, warmup = "adafactor", 0
    if key not in SCHEDULERS:
        if "." in name or isinstance(getattr(torch.optim.lr_scheduler, name, None), type):
            if warmup:
                raise OptionError(f"lr_scheduler {name!r} takes no lr_warmup_steps (got {warmup}); set it to 0")
            return _class_scheduler(name, optimizer, args)
        raise OptionError(
            f"unknown lr_scheduler {name!r}{suggest(key, SCHEDULERS)}; known: {', '.join(SCHEDULERS)}, "
            "or a class path such as torch.optim.lr_scheduler.OneCycleLR"
        )
    refuse_warmup(key, warmup)

    if key == "adafactor":
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor):
            raise OptionError(f"lr_scheduler 'adafactor' needs the Adafactor optimizer, not {type(optimizer).__name__}")
        if not _is_relative_step_adafactor(optimizer):
            raise OptionError(ADAFACTOR_SCHEDULE_WITHOUT_RELATIVE_STEP)
        _reject_args(key, args)
        return AdafactorSchedule(optimizer, getattr(optimizer, "lorakit_initial_lr", 0.0))

    if key == "polynomial":
        _reject_args(key, args, ("lr_end",))
        lr_init = optimizer.defaults["lr"]
        lr_end = float(args.get("lr_end", 1e-7))
        if not lr_init > lr_end:
            raise OptionError(
                f"lr_scheduler 'polynomial': lr_end ({lr_end}) must be smaller than the learning rate ({lr_init})"
            )
        factor = PolynomialFactor(warmup, num_training_steps, lr_init, lr_end, power)
    elif key in ("inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant"):
        factor = _newer_factor(key, args, optimizer, warmup, num_training_steps, num_cycles, num_decay_steps,
                               timescale, min_lr_ratio)
    else:
        _reject_args(key, args)
        factor = {
            "constant": lambda: ConstantFactor(0, num_training_steps),
            "constant_with_warmup": lambda: ConstantFactor(warmup, num_training_steps),
            "linear": lambda: LinearFactor(warmup, num_training_steps),
            "cosine": lambda: CosineFactor(warmup, num_training_steps),  # half a cosine, as kohya (num_cycles unused)
            "cosine_with_restarts": lambda: CosineRestartsFactor(warmup, num_training_steps, num_cycles),
        }[key]()
    return LambdaLR(optimizer, factor)


def _newer_factor(key, args, optimizer, warmup, total, num_cycles, num_decay_steps, timescale, min_lr_ratio):
    """The factors of the schedulers sd-scripts takes from transformers (inverse_sqrt, cosine_with_min_lr,
    warmup_stable_decay) and diffusers (piecewise_constant), with the arguments get_scheduler_fix gives them."""
    if key == "piecewise_constant":
        _reject_args(key, args, ("step_rules",))
        if "step_rules" not in args:
            raise OptionError("lr_scheduler 'piecewise_constant' needs lr_scheduler_args step_rules='1:10,0.1:20,0.01' "
                              "(factor 1 before step 10, 0.1 before step 20, then 0.01)")
        return PiecewiseConstantFactor(args["step_rules"])
    if key == "inverse_sqrt":
        _reject_args(key, args)
        return InverseSqrtFactor(warmup, total, timescale if timescale is not None else warmup or 10_000)
    if key == "cosine_with_min_lr":
        _reject_args(key, args, ("min_lr",))
        if "min_lr" in args and min_lr_ratio is not None:
            raise OptionError("lr_scheduler 'cosine_with_min_lr': give lr_scheduler_min_lr_ratio or lr_scheduler_args "
                              "min_lr, not both")
        if "min_lr" in args:
            min_lr_ratio = float(args["min_lr"]) / optimizer.defaults["lr"]
        if min_lr_ratio is None:
            raise OptionError("lr_scheduler 'cosine_with_min_lr' needs lr_scheduler_min_lr_ratio (the lowest lr as a "
                              "ratio of the initial one, e.g. 0.1)")
        return CosineMinLrFactor(warmup, total, num_cycles / 2, min_lr_ratio)  # half a cosine per cycle, as sd-scripts
    _reject_args(key, args, ("warmup_type", "decay_type"))
    for arg in ("warmup_type", "decay_type"):
        if args.get(arg, "linear") not in WarmupStableDecayFactor.SHAPES:
            raise OptionError(f"lr_scheduler_args {arg}={args[arg]!r}: expected one of "
                              f"{', '.join(WarmupStableDecayFactor.SHAPES)}")
    decay = int(num_decay_steps * total) if isinstance(num_decay_steps, float) else int(num_decay_steps or 0)
    stable = total - warmup - decay
    if stable < 0:
        raise OptionError(f"lr_scheduler 'warmup_stable_decay': lr_warmup_steps ({warmup}) + lr_decay_steps ({decay}) "
                          f"exceed the {total} training steps")
    return WarmupStableDecayFactor(warmup, stable, decay, min_lr_ratio if min_lr_ratio is not None else 0.0,
                                   num_cycles / 2, args.get("warmup_type", "linear"), args.get("decay_type", "cosine"))
