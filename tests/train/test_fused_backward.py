"""fused_backward_pass: the optimizer steps each parameter inside backward(); the weights must equal those of the
usual step (sd-scripts' sdxl_train.py, Adafactor only), with each gradient clipped by its own norm."""

from __future__ import annotations


import pytest
import torch

from lorakit.algos.options import OptionError
from lorakit.train.config import load_train_config
from lorakit.train.fused_backward import install_fused_step

transformers = pytest.importorskip("transformers")

ADAFACTOR = dict(lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((6, 5), (5,), (3, 5))]


def _loss(params, x):
    w1, b, w2 = params
    return ((torch.tanh(x @ w1 + b) @ w2.T) ** 2).sum()


@pytest.mark.parametrize("max_norm", [0.0, 0.05])
def test_fused_step_equals_the_usual_step(max_norm):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    usual, fused = _params(), _params()
    opt_u = transformers.optimization.Adafactor([{"params": usual[:2]}, {"params": usual[2:], "lr": 3e-2}],
                                                **ADAFACTOR)
    opt_f = transformers.optimization.Adafactor([{"params": fused[:2]}, {"params": fused[2:], "lr": 3e-2}],
                                                **ADAFACTOR)
    install_fused_step(opt_f, max_norm)
    for k in range(3):  # inputs of changing size: the clip factors differ from step to step
        _loss(usual, x * 4**k).backward()
        if max_norm:  # the reference: every tensor clipped by its own norm, then one step
            for p in usual:
                torch.nn.utils.clip_grad_norm_([p], max_norm)
        opt_u.step()
        opt_u.zero_grad(set_to_none=True)
        _loss(fused, x * 4**k).backward()
        assert all(p.grad is None for p in fused)  # stepped and freed inside backward
    for a, b in zip(usual, fused):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(opt_f.param_groups) == 2 and len(opt_f.param_groups[1]["params"]) == 1  # groups restored
    if max_norm:  # clipping changed the result, and global clipping would have given other weights
        for rule in ("none", "global"):
            other = _params()
            opt_o = transformers.optimization.Adafactor([{"params": other[:2]}, {"params": other[2:], "lr": 3e-2}],
                                                        **ADAFACTOR)
            for k in range(3):
                _loss(other, x * 4**k).backward()
                if rule == "global":
                    torch.nn.utils.clip_grad_norm_(other, max_norm)
                opt_o.step()
                opt_o.zero_grad(set_to_none=True)
            assert (other[0] - fused[0]).abs().max() > 1e-4, rule


def _config(**values):
    base = dict(pretrained_model_name_or_path="m.safetensors", train_data_dir="d", resolution="64", output_dir="o")
    return load_train_config(overrides={**base, **values})


def test_fused_backward_pass_refuses_what_sd_scripts_refuses():
    with pytest.raises(OptionError, match="fused_backward_pass needs optimizer_type = 'Adafactor'"):
        _config(fused_backward_pass=True, optimizer_type="AdamW")
    with pytest.raises(OptionError, match="gradient_accumulation_steps > 1"):
        _config(fused_backward_pass=True, optimizer_type="adafactor", gradient_accumulation_steps=2,
                lr_scheduler="adafactor")
    assert _config(fused_backward_pass=True, optimizer_type="adafactor", lr_scheduler="adafactor").fused_backward_pass
