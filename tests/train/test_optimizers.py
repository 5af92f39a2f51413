"""Optimizers by kohya's names: the class built, the arguments it received (optimizer.defaults and the groups),
and the messages for missing packages and unknown names."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from lorakit.algos.options import OptionError
from lorakit.train.optimizers import (OPTIMIZER_TYPES, eval_mode, is_schedule_free, make_optimizer,
                                      optimizer_name, parse_kwargs, set_train_mode)


def groups():
    a, b = torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5))
    return [{"params": [a], "lr": 1e-4}, {"params": [b]}]


# --- optimizer_args ---------------------------------------------------------------------------------------------


def test_parse_kwargs_reads_python_literals_like_kohya():
    got = parse_kwargs(
        [
            "weight_decay=0.01",
            "betas=(0.9,0.99)",
            "decouple=True",
            "use_bias_correction=false",
            "d0=1e-6",
            "mode=triangular",
            "eps=None",
            "name='a=b'",
        ]
    )
    assert got == {
        "weight_decay": 0.01,
        "betas": (0.9, 0.99),
        "decouple": True,
        "use_bias_correction": False,
        "d0": 1e-6,
        "mode": "triangular",
        "eps": None,
        "name": "a=b",
    }
    assert parse_kwargs("weight_decay=0.1 momentum=0.5") == {"weight_decay": 0.1, "momentum": 0.5}
    assert parse_kwargs({"betas": "(0.8, 0.9)", "foreach": False}) == {"betas": (0.8, 0.9), "foreach": False}
    assert parse_kwargs(None) == {}


def test_parse_kwargs_takes_any_whitespace_between_and_around_arguments():
    # one string is split on runs of whitespace (a TOML multi-line string, doubled spaces); spaces around "=" and
    # the value are dropped before the value is read, words included
    assert parse_kwargs("weight_decay=0.1  momentum=0.5\n\tnesterov=no") == {
        "weight_decay": 0.1, "momentum": 0.5, "nesterov": False}
    assert parse_kwargs(["decouple = no", "eps = none ", "betas = (0.9, 0.99)"]) == {
        "decouple": False, "eps": None, "betas": (0.9, 0.99)}


@pytest.mark.parametrize(
    "args,match",
    [
        (["weight_decay"], "'weight_decay' is not of the form key=value"),
        (["x=1+"], "x='1\\+' is not a Python literal"),
    ],
)
def test_parse_kwargs_errors_name_the_option(args, match):
    with pytest.raises(OptionError, match="optimizer_args: " + match):
        parse_kwargs(args)


# --- built-in types ---------------------------------------------------------------------------------------------


def test_adamw_with_args_and_groups():
    gs = groups()
    opt = make_optimizer("adamw", gs, 1e-3, ["weight_decay=0.05", "betas=(0.8,0.9)", "eps=1e-6"])
    assert type(opt) is torch.optim.AdamW and optimizer_name(opt) == "torch.optim.adamw.AdamW"
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 0.05
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-6
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-3]  # a group's own lr wins
    assert "lr" not in gs[1]  # the caller's groups are not changed
    assert type(make_optimizer(None, [torch.nn.Parameter(torch.zeros(1))], 1e-3)) is torch.optim.AdamW


def test_sgd_nesterov_gets_momentum():
    opt = make_optimizer("SGDNesterov", groups(), 0.1)
    assert type(opt) is torch.optim.SGD
    assert opt.defaults["nesterov"] is True and opt.defaults["momentum"] == 0.9
    opt = make_optimizer("sgdnesterov", groups(), 0.1, ["momentum=0.5", "weight_decay=1e-4"])
    assert opt.defaults["momentum"] == 0.5 and opt.defaults["weight_decay"] == 1e-4 and opt.defaults["nesterov"]


def test_sgd_nesterov_takes_nesterov_from_optimizer_args_when_given():
    # the documented "nesterov=True unless given": optimizer_args nesterov=False gives plain momentum SGD
    opt = make_optimizer("SGDNesterov", groups(), 0.1, ["nesterov=False"])
    assert opt.defaults["nesterov"] is False and opt.defaults["momentum"] == 0.9


def test_adafactor_relative_step_rules(caplog):
    from transformers.optimization import Adafactor

    gs = groups()
    with caplog.at_level(logging.WARNING):
        opt = make_optimizer("Adafactor", gs, 1e-3, ["scale_parameter=False"])
    assert type(opt) is Adafactor
    # kohya: relative_step defaults to True; then Adafactor picks the step size, lr and group lrs are dropped
    assert opt.defaults["relative_step"] is True and opt.defaults["lr"] is None
    assert opt.defaults["scale_parameter"] is False
    assert all(g["lr"] is None for g in opt.param_groups)
    assert opt.lorakit_initial_lr == 1e-3
    assert "learning rates are ignored" in caplog.text
    assert gs[0]["lr"] == 1e-4  # the caller's group kept its lr


def test_adafactor_with_an_explicit_lr_and_warmup_init():
    opt = make_optimizer(
        "adafactor", groups(), 1e-3, ["relative_step=False", "scale_parameter=False", "warmup_init=False"]
    )
    assert opt.defaults["relative_step"] is False and opt.defaults["lr"] == 1e-3
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-3]
    # warmup_init needs relative_step: kohya turns it on
    opt = make_optimizer("adafactor", groups(), 1e-3, ["relative_step=False", "warmup_init=True"])
    assert opt.defaults["relative_step"] is True and opt.defaults["warmup_init"] is True and opt.defaults["lr"] is None


def test_class_paths():
    opt = make_optimizer("torch.optim.RAdam", groups(), 2e-3, ["weight_decay=0.1", "decoupled_weight_decay=True"])
    assert type(opt) is torch.optim.RAdam
    assert opt.defaults["lr"] == 2e-3 and opt.defaults["weight_decay"] == 0.1 and opt.defaults["decoupled_weight_decay"]
    opt = make_optimizer("Adagrad", groups(), 1e-2, {"lr_decay": 0.5})  # a bare torch.optim name, as kohya
    assert type(opt) is torch.optim.Adagrad and opt.defaults["lr_decay"] == 0.5
    with pytest.raises(OptionError, match="cannot import module 'no_such_pkg'"):
        make_optimizer("no_such_pkg.Opt", groups(), 1e-3)
    with pytest.raises(OptionError, match="module 'torch.optim' has no 'NoSuch'"):
        make_optimizer("torch.optim.NoSuch", groups(), 1e-3)


def test_bad_arguments_and_names():
    with pytest.raises(OptionError, match="optimizer_args .*AdamW.*unexpected keyword argument 'wieght_decay'"):
        make_optimizer("AdamW", groups(), 1e-3, ["wieght_decay=0.1"])
    with pytest.raises(OptionError, match="not in optimizer_args"):
        make_optimizer("AdamW", groups(), 1e-3, ["lr=0.1"])
    with pytest.raises(OptionError, match="unknown optimizer_type 'AdamW8bt'. Did you mean 'AdamW8bit'\\?") as e:
        make_optimizer("AdamW8bt", groups(), 1e-3)
    for name in ("Prodigy", "DAdaptAdam", "Lion", "Adafactor", "SGDNesterov8bit"):
        assert name in str(e.value)
    with pytest.raises(OptionError, match="Did you mean 'Prodigy'"):
        make_optimizer("prodigi", groups(), 1.0)
    with pytest.raises(OptionError, match="'SGDNesterov' needs a learning rate"):
        make_optimizer("sgdnesterov", groups(), None)
    assert make_optimizer("torch.optim.Adagrad", groups(), None).defaults["lr"] == 1e-2  # the class's default
    with pytest.raises(ValueError, match="nothing to train"):
        make_optimizer("AdamW", [], 1e-3)


# --- optional packages ------------------------------------------------------------------------------------------

MISSING = [
    ("Lion", ["lion_pytorch"], "lion-pytorch"),
    ("Prodigy", ["prodigyopt"], "prodigyopt"),
    ("DAdaptAdam", ["dadaptation"], "dadaptation"),
    ("DAdaptLion", ["dadaptation"], "dadaptation"),
    ("DAdaptAdaGrad", ["dadaptation"], "dadaptation"),
    ("DAdaptAdan", ["dadaptation"], "dadaptation"),
    ("DAdaptSGD", ["dadaptation"], "dadaptation"),
    ("DAdaptation", ["dadaptation", "dadaptation.experimental"], "dadaptation"),
    ("DAdaptAdamPreprint", ["dadaptation", "dadaptation.experimental"], "dadaptation"),
]


@pytest.mark.parametrize("name,modules,pip", MISSING)
def test_missing_package_names_pip_package_and_extra(monkeypatch, name, modules, pip):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # import fails as if not installed
    with pytest.raises(OptionError) as e:
        make_optimizer(name, groups(), 1.0)
    msg = str(e.value)
    assert f"optimizer_type '{name}' needs the package '{pip}'" in msg
    assert f"pip install {pip}" in msg and 'pip install "lorakit[optim]"' in msg


BNB = ["AdamW8bit", "PagedAdamW8bit", "PagedAdamW", "PagedAdamW32bit", "Lion8bit", "PagedLion8bit", "SGDNesterov8bit"]


@pytest.mark.parametrize("name", BNB)
def test_8bit_types_are_built_without_cuda_when_bitsandbytes_has_them(monkeypatch, name):
    """bitsandbytes 0.50 runs its 8-bit and paged optimizers on CPU; sd-scripts does not check the device."""
    import types

    attr = "SGD8bit" if name == "SGDNesterov8bit" else name
    fake = types.ModuleType("bitsandbytes.optim")
    setattr(fake, attr, type(attr, (torch.optim.SGD,), {}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", fake)
    assert type(make_optimizer(name, groups(), 1e-3, ["momentum=0.5"])).__name__ == attr


def test_bitsandbytes_8bit_adamw_steps_on_cpu_if_installed():
    bnb = pytest.importorskip("bitsandbytes")
    p = torch.nn.Parameter(torch.ones(64, 64))
    opt = make_optimizer("AdamW8bit", [p], 1e-2)
    assert type(opt) is bnb.optim.AdamW8bit
    p.sum().backward()
    opt.step()
    assert (p < 1).all()


@pytest.mark.parametrize("name", ["AdamW8bit", "SGDNesterov8bit"])
def test_8bit_types_without_bitsandbytes(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(OptionError, match=f"'{name}' needs the package 'bitsandbytes'.*pip install bitsandbytes"):
        make_optimizer(name, groups(), 1e-3)


def test_every_type_is_covered():
    tested = {"AdamW", "SGDNesterov", "Adafactor"} | {m[0] for m in MISSING} | set(BNB) | set(SCHEDULE_FREE)
    assert set(OPTIMIZER_TYPES) - tested == {"DAdaptAdanIP"}  # same package and path as DAdaptAdamPreprint


# --- the real packages, where installed -------------------------------------------------------------------------


def test_lion_if_installed():
    lion = pytest.importorskip("lion_pytorch")
    opt = make_optimizer("Lion", groups(), 1e-4, ["betas=(0.95,0.98)", "weight_decay=0.01"])
    assert type(opt) is lion.Lion and opt.defaults["betas"] == (0.95, 0.98) and opt.defaults["weight_decay"] == 0.01


def test_prodigy_if_installed(caplog):
    prodigyopt = pytest.importorskip("prodigyopt")
    with caplog.at_level(logging.WARNING):
        opt = make_optimizer("prodigy", [torch.nn.Parameter(torch.zeros(3))], 0.1,
                             ["d_coef=2.0", "decouple=True", "use_bias_correction=True"])
    assert type(opt) is prodigyopt.Prodigy
    assert opt.defaults["d_coef"] == 2.0 and opt.defaults["use_bias_correction"] is True
    assert "expect lr around 1.0" in caplog.text


@pytest.mark.parametrize(
    "name,attr",
    [
        ("DAdaptAdam", "DAdaptAdam"),
        ("DAdaptLion", "DAdaptLion"),
        ("DAdaptSGD", "DAdaptSGD"),
        ("DAdaptAdaGrad", "DAdaptAdaGrad"),
        ("DAdaptAdan", "DAdaptAdan"),
        ("DAdaptation", "DAdaptAdamPreprint"),
        ("DAdaptAdanIP", "DAdaptAdanIP"),
    ],
)
def test_dadaptation_if_installed(caplog, name, attr):
    pytest.importorskip("dadaptation")
    p = torch.nn.Parameter(torch.zeros(3))
    with caplog.at_level(logging.WARNING):
        opt = make_optimizer(name, [p], 0.05, ["weight_decay=0.02", "d0=1e-5", "log_every=7"])
    assert type(opt).__name__ == attr and opt.defaults["weight_decay"] == 0.02
    assert opt.defaults["d"] == 1e-5 and opt.defaults["log_every"] == 7  # d0 is stored as the initial d
    assert "expect lr around 1.0" in caplog.text


def test_a_bare_torch_optim_name_in_any_case_builds_that_class():
    assert type(make_optimizer("radam", groups(), 1e-3)) is torch.optim.RAdam
    assert type(make_optimizer("NAdam", groups(), 1e-3)) is torch.optim.NAdam


def test_a_key_given_twice_takes_its_last_value_as_in_sd_scripts():
    """sd-scripts fills a dict from optimizer_args (and lr_scheduler_args): the last value wins."""
    assert parse_kwargs(["weight_decay=0.01", "weight_decay=0.1"]) == {"weight_decay": 0.1}
    opt = make_optimizer("AdamW", groups(), 1e-3, ["weight_decay=0.01", "betas=0.9,0.99", "weight_decay=0.1"])
    assert opt.defaults["weight_decay"] == 0.1


def _two_groups(te_lr):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    return [{"params": [a], "lr": 1.0, "name": "unet"}, {"params": [b], "lr": te_lr, "name": "text_encoder"}]


@pytest.mark.parametrize("name", ["DAdaptation", "DAdaptAdam", "DAdaptLion", "DAdaptSGD", "Prodigy"])
def test_adaptive_optimizers_that_raise_on_unequal_group_lrs_are_refused_before_building(name):
    """DAdaptAdam(Preprint), DAdaptLion, DAdaptSGD and Prodigy raise at their first step when the groups' lrs differ
    (sd-scripts fails the same way): refused with a message naming the groups, before the optimizer is built."""
    pytest.importorskip("prodigyopt" if name == "Prodigy" else "dadaptation")
    with pytest.raises(OptionError, match=f"optimizer_type {name} cannot train parameter groups at different "
                                          "learning rates \\(unet 1.0, text_encoder 0.5\\)"):
        make_optimizer(name, _two_groups(0.5), 1.0)


@pytest.mark.parametrize("name", ["DAdaptAdaGrad", "DAdaptAdan", "DAdaptAdanIP"])
def test_adaptive_optimizers_that_take_unequal_group_lrs_warn_that_the_first_is_used(caplog, name):
    pytest.importorskip("dadaptation")
    groups_ = _two_groups(0.5)
    with caplog.at_level(logging.WARNING):
        opt = make_optimizer(name, groups_, 1.0)
    assert "every group steps with the first group's (1.0)" in caplog.text
    sum(p.sum() for g in groups_ for p in g["params"]).backward()
    opt.step()



SCHEDULE_FREE = ["AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree"]


@pytest.mark.parametrize("name", SCHEDULE_FREE)
def test_schedule_free_without_the_package_names_it(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "schedulefree", None)
    with pytest.raises(OptionError, match=f"'{name}' needs the package 'schedulefree'.*pip install schedulefree$"):
        make_optimizer(name, groups(), 1e-3)


@pytest.mark.parametrize("name", SCHEDULE_FREE + ["schedulefree.AdamWScheduleFree"])
def test_schedule_free_optimizers_train_and_switch_to_their_averaged_weights_if_installed(name):
    """sd-scripts returns them in train mode (a step in eval mode raises) and switches them to eval mode for
    sampling and saving: there the weights are the average x, in train mode the interpolation y."""
    pytest.importorskip("schedulefree")
    p = torch.nn.Parameter(torch.ones(4))
    opt = make_optimizer(name, [p], 0.1)
    assert is_schedule_free(opt) and opt.param_groups[0]["train_mode"]
    for _ in range(8):  # RAdam's first steps move nothing
        opt.zero_grad()
        (p * torch.arange(4.0)).sum().backward()
        opt.step()
    trained = p.detach().clone()
    set_train_mode(opt, False)
    set_train_mode(opt, False)  # idempotent
    assert not opt.param_groups[0]["train_mode"] and not torch.equal(p.detach(), trained)
    set_train_mode(opt, True)
    assert torch.allclose(p.detach(), trained)
    with eval_mode(opt):
        assert not opt.param_groups[0]["train_mode"]
    assert opt.param_groups[0]["train_mode"] and torch.allclose(p.detach(), trained)


def test_set_train_mode_does_nothing_for_other_optimizers():
    opt = make_optimizer("AdamW", groups(), 1e-3)
    assert not is_schedule_free(opt)
    set_train_mode(opt, False)
    set_train_mode(opt, True)
