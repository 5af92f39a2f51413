"""Optimizers by kohya sd-scripts' `optimizer_type` names, with `optimizer_args` given as "key=value" strings.

The optional optimizer packages are the `optim` extra (`pip install "lorakit[optim]"`): bitsandbytes (8-bit and
paged types, on whatever device the installed bitsandbytes runs them: 0.50 runs them on CPU too), lion-pytorch
(Lion), dadaptation (DAdapt*), prodigyopt (Prodigy). Adafactor is transformers' (the `sd` extra); the schedule-free
types are the `schedulefree` package's. Any other optimizer: a class path such as `torch.optim.RAdam` or
`module.Class`, or a bare `torch.optim` class name (`RAdam`), constructed as `Class(param_groups, lr=lr, **args)`.

A schedule-free optimizer (one with train() and eval(), such as schedulefree's) is returned in train mode, as
sd-scripts returns it; `set_train_mode` switches it (eval for sampling, validation and saving, which then see its
averaged weights), and does nothing for other optimizers.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from ..algos.options import OptionError
from .checks import REFUSE_UNEQUAL_LRS, unequal_lrs_message

logger = logging.getLogger(__name__)

OPTIM_EXTRA = 'pip install "lorakit[optim]"'


@dataclass(frozen=True)
class OptimizerSpec:
    name: str  # kohya's spelling
    module: str
    attr: str
    pip: str | None = None  # the package to install when `module` is missing (None: a core dependency)
    extra: str | None = None  # the lorakit extra that brings it


def _bnb(name: str, attr: str | None = None) -> OptimizerSpec:
    return OptimizerSpec(name, "bitsandbytes.optim", attr or name, "bitsandbytes", "optim")


def _schedulefree(name: str) -> OptimizerSpec:
    return OptimizerSpec(name, "schedulefree", name, "schedulefree")


def _dadapt(name: str, attr: str | None = None, experimental: bool = False) -> OptimizerSpec:
    module = "dadaptation.experimental" if experimental else "dadaptation"
    return OptimizerSpec(name, module, attr or name, "dadaptation", "optim")


SPECS: dict[str, OptimizerSpec] = {
    s.name.lower(): s
    for s in (
        OptimizerSpec("AdamW", "torch.optim", "AdamW"),
        OptimizerSpec("SGDNesterov", "torch.optim", "SGD"),
        _bnb("AdamW8bit"),
        _bnb("PagedAdamW"),
        _bnb("PagedAdamW8bit"),
        _bnb("PagedAdamW32bit"),
        _bnb("Lion8bit"),
        _bnb("PagedLion8bit"),
        _bnb("SGDNesterov8bit", "SGD8bit"),
        OptimizerSpec("Lion", "lion_pytorch", "Lion", "lion-pytorch", "optim"),
        _dadapt("DAdaptation", "DAdaptAdamPreprint", experimental=True),  # kohya's alias
        _dadapt("DAdaptAdamPreprint", experimental=True),
        _dadapt("DAdaptAdanIP", experimental=True),
        _dadapt("DAdaptAdam"),
        _dadapt("DAdaptAdaGrad"),
        _dadapt("DAdaptAdan"),
        _dadapt("DAdaptLion"),
        _dadapt("DAdaptSGD"),
        OptimizerSpec("Prodigy", "prodigyopt", "Prodigy", "prodigyopt", "optim"),
        OptimizerSpec("Adafactor", "transformers.optimization", "Adafactor", "transformers", "sd"),
        _schedulefree("AdamWScheduleFree"),
        _schedulefree("RAdamScheduleFree"),
        _schedulefree("SGDScheduleFree"),
    )
}
OPTIMIZER_TYPES = tuple(s.name for s in SPECS.values())
# Optimizers whose step size comes from sums over all the weights (D-Adaptation, Prodigy): wrong when each process
# holds only a slice of them (DeepSpeed ZeRO on several processes).
GLOBAL_STATISTICS = frozenset(s.attr for s in SPECS.values() if s.module.startswith("dadaptation")) | {"Prodigy"}

_WORDS = {"true": True, "false": False, "yes": True, "no": False, "none": None, "null": None}
_BARE_WORD = re.compile(r"^[A-Za-z_][\w.\-]*$")


def parse_value(key: str, text: str, option: str = "optimizer_args") -> Any:
    """A Python literal as kohya reads it (`0.01`, `(0.9, 0.99)`, `True`); also `true`/`false`/`none` in any case,
    and a bare word (`triangular`) as a string. Anything else is an error naming the option and key."""
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    if _BARE_WORD.match(text):
        return text
    raise OptionError(
        f"{option}: {key}={text!r} is not a Python literal (a number, a tuple like (0.9, 0.99), True, 'text')"
    )


def parse_kwargs(
    args: Iterable[str] | Mapping[str, Any] | str | None, option: str = "optimizer_args"
) -> dict[str, Any]:
    """kohya's `optimizer_args`/`lr_scheduler_args`: "key=value" strings (a list, or one string split on
    spaces) or a mapping whose string values are parsed the same way. A key given twice takes its last value, as
    in kohya's dict (the config's warnings name it)."""
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return {str(k): parse_value(str(k), v, option) if isinstance(v, str) else v for k, v in args.items()}
    if isinstance(args, str):
        args = args.split()
    kwargs: dict[str, Any] = {}
    for arg in args:
        key, sep, value = str(arg).partition("=")
        key = key.strip()
        if not sep or not key:
            raise OptionError(f"{option}: {arg!r} is not of the form key=value")
        kwargs[key] = parse_value(key, value, option)
    return kwargs


def _copy_groups(param_groups) -> list:
    """A list of fresh group dicts (the caller's are not changed), or of tensors."""
    if isinstance(param_groups, torch.Tensor):
        raise TypeError("param_groups: expected an iterable of parameters or of parameter-group dicts, got one tensor")
    groups = [dict(g) if isinstance(g, Mapping) else g for g in param_groups]
    if not groups:
        raise ValueError("param_groups is empty: there is nothing to train")
    return groups


def _resolve(optimizer_type: str) -> OptimizerSpec:
    key = optimizer_type.strip().lower()
    if key in SPECS:
        return SPECS[key]
    name = optimizer_type.strip()
    if "." in name:
        module, _, attr = name.rpartition(".")
        return OptimizerSpec(name, module, attr)
    bare = torch_optimizer_name(name)
    if bare is not None:  # kohya: a bare name is looked up in torch.optim
        return OptimizerSpec(bare, "torch.optim", bare)
    close = difflib.get_close_matches(key, list(SPECS), n=1, cutoff=0.5)
    hint = f" Did you mean '{SPECS[close[0]].name}'?" if close else ""
    raise OptionError(
        f"unknown optimizer_type {optimizer_type!r}.{hint} Known: {', '.join(OPTIMIZER_TYPES)}; "
        "or a class path such as torch.optim.RAdam or module.Class"
    )


def torch_optimizer_name(name: str) -> str | None:
    """The torch.optim optimizer class a bare name (any case) means, as sd-scripts' get_optimizer looks up a name it
    does not know and that has no dot (`RAdam`, `SGD`); None if there is none."""
    classes = {attr.lower(): attr for attr, cls in vars(torch.optim).items()
               if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer}
    return classes.get(name.strip().lower())


def check_optimizer_installed(optimizer_type: str | None) -> None:
    """Refuses an unknown optimizer_type, or one whose package is missing, from the config alone (before a model
    loads), with the error make_optimizer would give after it."""
    _load_class(_resolve(optimizer_type or "AdamW"))


def _load_class(spec: OptimizerSpec):
    try:
        module = importlib.import_module(spec.module)
    except ImportError as e:
        if spec.pip is None:
            raise OptionError(f"optimizer_type '{spec.name}': cannot import module '{spec.module}' ({e})") from e
        extra = f'  (or pip install "lorakit[{spec.extra}]")' if spec.extra else ""
        raise OptionError(
            f"optimizer_type '{spec.name}' needs the package '{spec.pip}', which is not installed: "
            f"pip install {spec.pip}{extra}"
        ) from e
    cls = getattr(module, spec.attr, None)
    if cls is None:
        why = f"; upgrade it: pip install -U {spec.pip}" if spec.pip else ""
        raise OptionError(f"optimizer_type '{spec.name}': module '{spec.module}' has no '{spec.attr}'{why}")
    return cls


def _group_lrs(groups: list, lr) -> list:
    return [g.get("lr", lr) for g in groups if isinstance(g, dict)] or [lr]


def _check_adaptive_lr(spec: OptimizerSpec, groups: list, lr) -> None:
    # D-Adaptation and Prodigy estimate the step size: lr is a multiplier on it, ~1.0 (kohya warns the same)
    lrs = _group_lrs(groups, lr)
    if lrs[0] is not None and lrs[0] <= 0.1:
        logger.warning("%s: learning rate %s is low; these optimizers expect lr around 1.0", spec.name, lrs[0])
    if len(set(lrs)) == 1:
        return
    if spec.name in REFUSE_UNEQUAL_LRS:
        named = [(g.get("name", f"group {i}"), g.get("lr", lr)) for i, g in enumerate(groups) if isinstance(g, dict)]
        raise OptionError(unequal_lrs_message(spec.name, ", ".join(f"{name} {value}" for name, value in named)))
    logger.warning("%s: parameter groups have different learning rates %s; every group steps with the first "
                   "group's (%s), as sd-scripts warns", spec.name, sorted(set(lrs)), lrs[0])


def adafactor_relative_step(kwargs: Mapping[str, Any]) -> bool:
    """Whether Adafactor with these optimizer_args picks its own step size: kohya's rule, relative_step defaults to
    True and warmup_init=True forces it."""
    return bool(kwargs.get("relative_step", True) or kwargs.get("warmup_init"))


def _adafactor(groups: list, lr, kwargs: dict):
    """With a relative step (kohya_kwargs set relative_step) Adafactor picks its own step size, so lr and the groups'
    lrs are dropped and the scheduler must be 'adafactor'."""
    if not kwargs["relative_step"]:
        return lr, groups
    if any(isinstance(g, dict) and g.pop("lr", None) is not None for g in groups):
        logger.warning("Adafactor with relative_step: the parameter groups' learning rates are ignored")
    return None, groups


def kohya_kwargs(optimizer_type: str | None, optimizer_args) -> dict[str, Any]:
    """The keyword arguments kohya's get_optimizer builds from `optimizer_args`: parsed, plus what it adds to them
    (momentum 0.9 for SGDNesterov(8bit); relative_step for Adafactor). Not nesterov, which it passes apart."""
    key = _resolve(optimizer_type or "AdamW").name.lower()
    kwargs = parse_kwargs(optimizer_args, "optimizer_args")
    if key in ("sgdnesterov", "sgdnesterov8bit"):
        kwargs.setdefault("momentum", 0.9)  # Nesterov needs momentum
    elif key == "adafactor":
        kwargs["relative_step"] = adafactor_relative_step(kwargs)
    return kwargs


def make_optimizer(
    optimizer_type: str,
    param_groups,
    lr: float | None,
    optimizer_args: Iterable[str] | Mapping[str, Any] | str | None = None,
) -> torch.optim.Optimizer:
    """Builds the optimizer kohya builds for `optimizer_type` (case-insensitive; None/"" = AdamW) over
    `param_groups` (e.g. `Network.optimizer_param_groups(...)`; groups without an lr get `lr`).

    `lr=None` leaves the class's default lr (1.0 for DAdapt* and Prodigy); AdamW, SGDNesterov and the bitsandbytes
    types need one. `optimizer_args` are extra constructor keywords: ["weight_decay=0.01", "betas=(0.9,0.99)"] or
    a dict. SGDNesterov(8bit) get nesterov=True and momentum 0.9 unless given; torch's Adam/AdamW take their fused
    kernel unless optimizer_args choose (`_construct`). An Adafactor with relative_step keeps the
    requested lr as `optimizer.lorakit_initial_lr` for the 'adafactor' scheduler to report before the first step."""
    spec = _resolve(optimizer_type or "AdamW")
    kwargs = kohya_kwargs(spec.name, optimizer_args)
    groups = _copy_groups(param_groups)
    cls = _load_class(spec)
    requested_lr = lr
    key = spec.name.lower()
    if key in ("sgdnesterov", "sgdnesterov8bit"):
        kwargs.setdefault("nesterov", True)
    elif key.startswith("dadapt") or key == "prodigy":
        _check_adaptive_lr(spec, groups, lr)
    elif key == "adafactor":
        lr, groups = _adafactor(groups, lr, kwargs)
    if "lr" in kwargs:
        raise OptionError("optimizer_args: give the learning rate as learning_rate (lr), not in optimizer_args")
    if lr is None and key != "adafactor":
        if key in SPECS and spec.module in ("torch.optim", "bitsandbytes.optim"):
            raise OptionError(f"optimizer_type '{spec.name}' needs a learning rate (learning_rate / lr)")
    else:
        kwargs["lr"] = (
            lr  # None only for a relative-step Adafactor; otherwise the class's default (DAdapt*, Prodigy: 1.0)
        )
    try:
        optimizer = _construct(cls, groups, kwargs)
    except TypeError as e:
        shown = {k: v for k, v in kwargs.items() if k != "lr"}
        raise OptionError(f"optimizer_args {shown} for {spec.name} ({cls.__module__}.{cls.__name__}): {e}") from e
    if key == "adafactor" and lr is None:
        optimizer.lorakit_initial_lr = requested_lr or 0.0
    set_train_mode(optimizer, True)  # sd-scripts: a schedule-free optimizer trains only in train mode
    return optimizer


def _construct(cls, groups: list, kwargs: dict) -> torch.optim.Optimizer:
    """cls(groups, **kwargs). torch's Adam and AdamW, given neither `fused` nor `foreach`, get the fused kernel where
    torch has one for the parameters (torch >= 2.4 on a CPU): there torch otherwise steps tensor by tensor in Python
    (AdamW over demo:tiny-sd's 420 LoRA tensors: 15 ms per step, against 2.5 ms fused). The update is the same up to
    float rounding. Only these two: torch 2.13's fused SGD on a CPU leaves bf16/fp16 weights unchanged. An explicit
    choice in optimizer_args stands."""
    if cls in (torch.optim.Adam, torch.optim.AdamW) and "fused" not in kwargs and "foreach" not in kwargs:
        try:
            return cls(groups, **kwargs, fused=True)
        except RuntimeError:  # no fused kernel for these parameters' device or dtype, or not with these options
            pass
    return cls(groups, **kwargs)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict(state), keeping this run's kernel choice (`fused`, `foreach`) over the saved run's:
    torch takes every group setting from the state, so a state saved by a per-tensor AdamW would turn the fused one
    back, and under a loss scale (which hands fused steps its inf check) the per-tensor step then fails."""
    chosen = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kernel in zip(optimizer.param_groups, chosen):
        group.update(kernel)
        if kernel.get("fused"):  # the fused kernel keeps the step count as float32 beside each weight
            for param in group["params"]:
                step = optimizer.state.get(param, {}).get("step")
                if torch.is_tensor(step):
                    optimizer.state[param]["step"] = step.to(device=param.device, dtype=torch.float32)


def is_schedule_free(optimizer) -> bool:
    """An optimizer with train()/eval() modes (schedulefree's, ProdigyPlusScheduleFree): its weights are an
    interpolation while training and the averaged weights in eval mode."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


@contextlib.contextmanager
def eval_mode(optimizer):
    """A schedule-free optimizer in eval mode (its averaged weights) for the block, back in train mode after: wrap
    sampling, validation and saves in it."""
    set_train_mode(optimizer, False)
    try:
        yield
    finally:
        set_train_mode(optimizer, True)


def set_train_mode(optimizer, training: bool) -> None:
    """Switches a schedule-free optimizer to train mode (before training steps) or eval mode (before sampling,
    validation and saving, as sd-scripts' optimizer_eval_fn); nothing for other optimizers. Both are idempotent."""
    if is_schedule_free(optimizer):
        optimizer.train() if training else optimizer.eval()


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """module.Class, as kohya writes it in `ss_optimizer` (followed there by "(k=v,...)" of the args)."""
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__name__}"
