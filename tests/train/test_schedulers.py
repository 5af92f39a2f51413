"""lr schedulers: the curves against closed-form formulas written here and against diffusers.optimization's
get_scheduler (what kohya calls) step by step, warmup ratios, resume through state_dict, and named errors."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch

from lorakit.algos.options import OptionError
from lorakit.train.optimizers import make_optimizer
from lorakit.train.schedulers import make_scheduler, warmup_steps

LR = 2e-3
T, W = 100, 10


def optimizer(lr=LR):
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    return torch.optim.SGD([{"params": [p]}, {"params": [q], "lr": lr / 4}], lr=lr)


def curve(sched, steps=T + 10):
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": no training here
        for _ in range(steps):
            lrs.append(list(sched.get_last_lr()))
            sched.step()
    return lrs


def closed_form(name, s, w=W, total=T, cycles=1, power=1.0, lr0=LR, lr_end=1e-7):
    """The factor at step s, written from the definitions."""
    if name == "constant":
        return 1.0
    if s < w:
        return s / w
    if name == "constant_with_warmup":
        return 1.0
    p = (s - w) / (total - w)
    if name == "linear":
        return max(0.0, 1.0 - p)
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * p)))
    if name == "cosine_with_restarts":
        return 0.0 if p >= 1 else 0.5 * (1.0 + math.cos(math.pi * ((cycles * p) % 1.0)))
    if name == "polynomial":
        if s > total:
            return lr_end / lr0
        return ((lr0 - lr_end) * (1.0 - p) ** power + lr_end) / lr0
    raise AssertionError(name)


CASES = [
    ("constant", {}),
    ("constant_with_warmup", {}),
    ("linear", {}),
    ("cosine", {}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {"power": 2.0}),
    ("polynomial", {"power": 0.5}),
]


@pytest.mark.parametrize("name,kw", CASES)
def test_curves_match_closed_form_and_diffusers(name, kw):
    from diffusers.optimization import get_scheduler

    w = 0 if name == "constant" else W
    ours = curve(make_scheduler(name, optimizer(), T, w, **kw))
    ref = curve(get_scheduler(name, optimizer(), num_warmup_steps=w, num_training_steps=T, **kw))
    cycles, power = kw.get("num_cycles", 1), kw.get("power", 1.0)
    for s, (got, theirs) in enumerate(zip(ours, ref)):
        f = closed_form(name, s, w, T, cycles, power)
        assert got == pytest.approx([LR * f, LR / 4 * f], rel=1e-12, abs=1e-15), (name, s)
        assert got == pytest.approx(theirs, rel=1e-12, abs=1e-15), (name, s)


def test_spot_values():
    lrs = curve(make_scheduler("cosine", optimizer(), T, W))
    assert lrs[0][0] == 0.0 and lrs[5][0] == pytest.approx(LR / 2) and lrs[10][0] == pytest.approx(LR)
    assert lrs[55][0] == pytest.approx(LR / 2) and lrs[100][0] == pytest.approx(0.0, abs=1e-18)
    restarts = curve(make_scheduler("cosine_with_restarts", optimizer(), T, 0, num_cycles=2))
    assert restarts[50][0] == pytest.approx(LR) and restarts[25][0] == pytest.approx(LR / 2)  # restart at half way
    assert curve(make_scheduler("linear", optimizer(), T, W))[55][0] == pytest.approx(LR / 2)


def test_warmup_as_a_ratio_of_the_steps():
    assert warmup_steps(0.1, 250) == 25 and warmup_steps(0.05, 30) == 1 and warmup_steps(7, 30) == 7
    assert warmup_steps(None, 30) == 0 and warmup_steps(1.0, 30) == 30
    ratio = curve(make_scheduler("linear", optimizer(), T, 0.1))
    steps = curve(make_scheduler("linear", optimizer(), T, 10))
    assert ratio == steps
    with pytest.raises(OptionError, match="lr_warmup_steps=5.0: a float is a ratio"):
        warmup_steps(5.0, 100)
    with pytest.raises(OptionError, match="lr_warmup_steps=-1"):
        warmup_steps(-1, 100)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant_with_warmup"])
def test_num_cycles_and_power_leave_the_other_curves_alone(name):
    # sd-scripts' get_scheduler_fix gives lr_scheduler_num_cycles to cosine_with_restarts only and lr_scheduler_power
    # to polynomial only: a plain cosine stays half a cosine whatever num_cycles says
    got = curve(make_scheduler(name, optimizer(), T, W, num_cycles=3, power=2.0))
    for s, lrs in enumerate(got):
        f = closed_form(name, s)
        assert lrs == pytest.approx([LR * f, LR / 4 * f], rel=1e-12, abs=1e-15), (name, s)


@pytest.mark.parametrize("name,kw", CASES)
def test_resume_through_state_dict(name, kw):
    w = 0 if name == "constant" else 0.1
    full = curve(make_scheduler(name, optimizer(), T, w, **kw), 80)
    first = make_scheduler(name, optimizer(), T, w, **kw)
    curve(first, 37)
    state = first.state_dict()
    opt2 = optimizer()
    resumed = make_scheduler(name, opt2, T, w, **kw)
    resumed.load_state_dict(state)
    # what a resumed run sees: the lr continues where it stopped, in the scheduler and in the optimizer
    assert resumed.get_last_lr() == full[37]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed.step()
    assert [g["lr"] for g in opt2.param_groups] == full[38]
    assert curve(resumed, 42) == full[38:80]


def test_class_path_schedulers():
    opt = optimizer()
    sched = make_scheduler("torch.optim.lr_scheduler.StepLR", opt, T, 0, scheduler_args=["step_size=10", "gamma=0.5"])
    assert type(sched) is torch.optim.lr_scheduler.StepLR
    lrs = curve(sched, 35)
    assert [x[0] for x in lrs] == pytest.approx([LR * 0.5 ** (s // 10) for s in range(35)], rel=1e-12)
    sched = make_scheduler("ExponentialLR", optimizer(), T, 0, scheduler_args={"gamma": "0.9"})  # bare torch name
    assert [x[0] for x in curve(sched, 5)] == pytest.approx([LR * 0.9**s for s in range(5)], rel=1e-12)
    with pytest.raises(OptionError, match="takes no lr_warmup_steps"):
        make_scheduler("torch.optim.lr_scheduler.StepLR", optimizer(), T, 5, scheduler_args=["step_size=10"])
    with pytest.raises(OptionError, match="lr_scheduler_args .*StepLR"):
        make_scheduler("torch.optim.lr_scheduler.StepLR", optimizer(), T, 0, scheduler_args=["stp_size=10"])
    with pytest.raises(OptionError, match="cannot import module 'no_such_mod'"):
        make_scheduler("no_such_mod.Sched", optimizer(), T)


def test_adafactor_schedule_reports_adafactors_own_step_size():
    from transformers.optimization import AdafactorSchedule

    p = torch.nn.Parameter(torch.ones(4))
    opt = make_optimizer("Adafactor", [p], 1e-3, ["scale_parameter=False"])
    sched = make_scheduler("adafactor", opt, T)
    assert type(sched) is AdafactorSchedule
    assert sched.get_last_lr() == [1e-3]  # before the first step: the requested lr, as kohya's "adafactor:<lr>"
    for step in (1, 2, 3):
        p.grad = torch.full_like(p, 0.5)
        opt.step()
        sched.step()
        # relative step size min(1e-2, 1/sqrt(step)) without warmup_init or parameter scale
        assert sched.get_last_lr() == [pytest.approx(min(1e-2, 1 / math.sqrt(step)))]


def test_relative_step_adafactor_overrides_the_scheduler(caplog):
    from transformers.optimization import AdafactorSchedule

    opt = make_optimizer("Adafactor", [torch.nn.Parameter(torch.ones(2))], 1e-3)
    with caplog.at_level(logging.WARNING):
        sched = make_scheduler("cosine", opt, T, W)
    assert type(sched) is AdafactorSchedule and "using the 'adafactor' scheduler" in caplog.text
    # with relative_step=False the lr is the scheduler's
    opt = make_optimizer("Adafactor", [torch.nn.Parameter(torch.ones(2))], 1e-3, ["relative_step=False"])
    assert type(make_scheduler("cosine", opt, T, W)) is torch.optim.lr_scheduler.LambdaLR


def test_errors_name_the_option():
    with pytest.raises(OptionError, match="unknown lr_scheduler 'cosin' \\(did you mean 'cosine'\\?\\)"):
        make_scheduler("cosin", optimizer(), T)
    with pytest.raises(OptionError, match="'constant' takes no warmup.*constant_with_warmup"):
        make_scheduler("constant", optimizer(), T, 10)
    with pytest.raises(OptionError, match="'adafactor' needs the Adafactor optimizer"):
        make_scheduler("adafactor", optimizer(), T)
    with pytest.raises(OptionError, match="lr_end .* must be smaller"):
        make_scheduler("polynomial", optimizer(lr=1e-8), T, W)
    with pytest.raises(OptionError, match="lr_scheduler_args \\['power'\\] are not arguments of the 'cosine'"):
        make_scheduler("cosine", optimizer(), T, W, scheduler_args=["power=2"])
    with pytest.raises(OptionError, match="needs the number of training steps"):
        make_scheduler("linear", optimizer(), 0, 0)
    end = curve(make_scheduler("polynomial", optimizer(), T, W, power=1.0, scheduler_args=["lr_end=1e-4"]))
    assert end[T][0] == pytest.approx(1e-4) and end[55][0] == pytest.approx((LR - 1e-4) * 0.5 + 1e-4)


def _sd_scripts_reference(name, opt, total, w, cycles=1, decay=0, timescale=None, min_lr_ratio=None, **kwargs):
    """What sd-scripts' train_util.get_scheduler_fix builds: the transformers (diffusers for piecewise_constant)
    functions with its arguments (decay steps and ratios already turned into steps)."""
    from diffusers.optimization import get_piecewise_constant_schedule
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    if name == "piecewise_constant":
        return get_piecewise_constant_schedule(opt, **kwargs)
    fn = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    if name == "inverse_sqrt":
        return fn(opt, num_warmup_steps=w, timescale=timescale, **kwargs)
    if name == "cosine_with_min_lr":
        return fn(opt, num_warmup_steps=w, num_training_steps=total, num_cycles=cycles / 2, min_lr_rate=min_lr_ratio,
                  **kwargs)
    return fn(opt, num_warmup_steps=w, num_stable_steps=total - w - decay, num_decay_steps=decay,
              num_cycles=cycles / 2, min_lr_ratio=min_lr_ratio if min_lr_ratio is not None else 0.0, **kwargs)


def flat(lrs):
    return [x for row in lrs for x in row]


NEWER = [  # (name, lorakit kwargs, reference kwargs)
    ("inverse_sqrt", {}, {}),
    ("inverse_sqrt", {"timescale": 25}, {"timescale": 25}),
    ("cosine_with_min_lr", {"min_lr_ratio": 0.1}, {"min_lr_ratio": 0.1}),
    ("cosine_with_min_lr", {"min_lr_ratio": 0.2, "num_cycles": 3}, {"min_lr_ratio": 0.2, "cycles": 3}),
    ("cosine_with_min_lr", {"scheduler_args": ["min_lr=5e-4"]}, {"min_lr_ratio": 5e-4 / LR}),
    ("warmup_stable_decay", {"num_decay_steps": 30}, {"decay": 30}),
    ("warmup_stable_decay", {"num_decay_steps": 0.25, "min_lr_ratio": 0.05}, {"decay": 25, "min_lr_ratio": 0.05}),
    ("warmup_stable_decay", {"num_decay_steps": 40, "scheduler_args": ["warmup_type=cosine", "decay_type='1-sqrt'"]},
     {"decay": 40, "warmup_type": "cosine", "decay_type": "1-sqrt"}),
    ("warmup_stable_decay", {"num_decay_steps": 20, "num_cycles": 2, "scheduler_args": ["decay_type='linear'"]},
     {"decay": 20, "cycles": 2, "decay_type": "linear"}),
    ("piecewise_constant", {"scheduler_args": ["step_rules='1:10,0.1:20,0.01:60,0.005'"]},
     {"step_rules": "1:10,0.1:20,0.01:60,0.005"}),
]


@pytest.mark.parametrize("name,kw,ref", NEWER)
def test_newer_schedulers_match_transformers_as_sd_scripts_calls_them(name, kw, ref):
    w = 0 if name == "piecewise_constant" else W
    ours = flat(curve(make_scheduler(name, optimizer(), T, w, **kw)))
    theirs = flat(curve(_sd_scripts_reference(name, optimizer(), T, w, **ref)))
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    assert len({round(x, 12) for x in ours}) > 3  # the curve moves: a flat line would pass against itself
    # a resumed run continues the curve
    first = make_scheduler(name, optimizer(), T, w, **kw)
    curve(first, 37)
    resumed = make_scheduler(name, optimizer(), T, w, **kw)
    resumed.load_state_dict(first.state_dict())
    assert flat(curve(resumed, T + 10 - 37)) == pytest.approx(ours[2 * 37:], rel=1e-12, abs=1e-15)


def test_newer_scheduler_spot_values():
    wsd = curve(make_scheduler("warmup_stable_decay", optimizer(), T, W, num_decay_steps=20, min_lr_ratio=0.1))
    assert wsd[5][0] == pytest.approx(LR * (0.1 + 0.9 * 0.5)) and wsd[50][0] == LR  # warmup starts at the minimum
    assert wsd[90][0] == pytest.approx(LR * (0.1 + 0.9 * 0.5)) and wsd[T][0] == pytest.approx(LR * 0.1)
    inv = curve(make_scheduler("inverse_sqrt", optimizer(), T, W))  # timescale = warmup
    assert inv[W][0] == pytest.approx(LR) and inv[4 * W][0] == pytest.approx(LR / 2)
    assert make_scheduler("inverse_sqrt", optimizer(), T, 0).lr_lambdas[0].timescale == 10_000  # no warmup
    cmin = curve(make_scheduler("cosine_with_min_lr", optimizer(), T, W, min_lr_ratio=0.2))
    assert cmin[55][0] == pytest.approx(LR * 0.6) and cmin[T][0] == pytest.approx(LR * 0.2)


def test_lr_scheduler_type_replaces_lr_scheduler():
    sched = make_scheduler("cosine", optimizer(), T, 0, scheduler_args=["step_size=10", "gamma=0.5"],
                           scheduler_type="torch.optim.lr_scheduler.StepLR")
    assert type(sched) is torch.optim.lr_scheduler.StepLR
    assert [x[0] for x in curve(sched, 25)] == pytest.approx([LR * 0.5 ** (s // 10) for s in range(25)], rel=1e-12)
    assert type(make_scheduler("constant", optimizer(), T, 0, scheduler_args=["T_max=50"],
                               scheduler_type="CosineAnnealingLR")) is torch.optim.lr_scheduler.CosineAnnealingLR
    with pytest.raises(OptionError, match="lr_scheduler_type 'StepLR' takes no lr_warmup_steps"):
        make_scheduler("constant", optimizer(), T, 5, scheduler_args=["step_size=10"], scheduler_type="StepLR")


def test_newer_scheduler_errors_name_the_option():
    with pytest.raises(OptionError, match="'cosine_with_min_lr' needs lr_scheduler_min_lr_ratio"):
        make_scheduler("cosine_with_min_lr", optimizer(), T, W)
    with pytest.raises(OptionError, match="not both"):
        make_scheduler("cosine_with_min_lr", optimizer(), T, W, min_lr_ratio=0.1, scheduler_args=["min_lr=1e-4"])
    with pytest.raises(OptionError, match="lr_warmup_steps \\(10\\) \\+ lr_decay_steps \\(95\\) exceed the 100"):
        make_scheduler("warmup_stable_decay", optimizer(), T, W, num_decay_steps=95)
    with pytest.raises(OptionError, match="decay_type='cos': expected one of linear, cosine, 1-sqrt"):
        make_scheduler("warmup_stable_decay", optimizer(), T, W, scheduler_args=["decay_type=cos"])
    with pytest.raises(OptionError, match="needs lr_scheduler_args step_rules"):
        make_scheduler("piecewise_constant", optimizer(), T)
    with pytest.raises(OptionError, match="step_rules='1-10,0.1': expected 'factor:step"):
        make_scheduler("piecewise_constant", optimizer(), T, scheduler_args=["step_rules='1-10,0.1'"])
    with pytest.raises(OptionError, match="\\['timescale'\\] are not arguments of the 'inverse_sqrt'"):
        make_scheduler("inverse_sqrt", optimizer(), T, W, scheduler_args=["timescale=3"])


def test_the_adafactor_schedule_refuses_an_adafactor_without_relative_step():
    opt = make_optimizer("Adafactor", [torch.nn.Parameter(torch.ones(2))], 1e-3, ["relative_step=False"])
    with pytest.raises(OptionError, match="lr_scheduler 'adafactor'.*relative_step=False"):
        make_scheduler("adafactor", opt, T)
    assert opt.param_groups[0]["lr"] == 1e-3  # not set to 0


def test_piecewise_constant_ignores_the_warmup_as_sd_scripts():
    """get_scheduler_fix returns diffusers' piecewise_constant before its warmup check, without the warmup."""
    with_warmup = make_scheduler("piecewise_constant", optimizer(), T, 5, scheduler_args=["step_rules='1:10,0.1'"])
    without = make_scheduler("piecewise_constant", optimizer(), T, 0, scheduler_args=["step_rules='1:10,0.1'"])
    assert curve(with_warmup) == curve(without)


def test_lr_scheduler_type_may_be_a_function_that_builds_the_scheduler():
    """sd-scripts' get_scheduler_fix calls getattr(module, name)(optimizer, **lr_scheduler_args): a factory too."""
    transformers = pytest.importorskip("transformers.optimization")
    args = ["num_warmup_steps=2", "num_training_steps=20"]
    ours = make_scheduler("constant", optimizer(), 20, 0, scheduler_args=args,
                          scheduler_type="transformers.optimization.get_cosine_schedule_with_warmup")
    theirs = transformers.get_cosine_schedule_with_warmup(optimizer(), 2, 20)
    assert curve(ours, 20) == curve(theirs, 20)
    with pytest.raises(OptionError, match="returned int, not a scheduler"):
        make_scheduler("constant", optimizer(), 20, scheduler_type="builtins.id")


class _ScheduleFree(torch.optim.SGD):
    """Has train/eval modes, as schedulefree's optimizers."""

    def train(self):
        pass

    def eval(self):
        pass


def test_a_schedule_free_optimizer_keeps_its_lr_whatever_the_scheduler_as_in_sd_scripts():
    """get_scheduler_fix returns a dummy scheduler for it, before looking at lr_scheduler and the warmup."""
    sched = make_scheduler("cosine", _ScheduleFree([torch.nn.Parameter(torch.zeros(2))], lr=LR), T, W)
    assert set(flat(curve(sched))) == {LR}
    sched = make_scheduler("constant", _ScheduleFree([torch.nn.Parameter(torch.zeros(2))], lr=LR), T, W,
                           scheduler_type="StepLR")
    assert set(flat(curve(sched))) == {LR}
