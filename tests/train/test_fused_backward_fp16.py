"""fused_backward_pass with mixed_precision fp16: the optimizer steps each parameter inside backward(), before
anything could unscale its gradient or skip an inf step, so no loss scaler runs there (loss_scale.make_loss_scaler;
DeepSpeed's engine owns the scale too). A scaled loss would step full_fp16 adapters with gradients x65536."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorakit.train.fused_backward import install_fused_step
from lorakit.train.loss_scale import make_loss_scaler

transformers = pytest.importorskip("transformers")

ADAFACTOR = dict(lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)


def _scaler(mixed_precision="fp16", deepspeed=False, fused_backward_pass=False):
    config = SimpleNamespace(mixed_precision=mixed_precision, deepspeed=deepspeed,
                             fused_backward_pass=fused_backward_pass)
    return make_loss_scaler(torch.device("cpu"), config)


def test_the_loss_scaler_runs_for_fp16_unless_the_step_is_fused_or_deepspeeds():
    assert _scaler().is_enabled()
    assert not _scaler(fused_backward_pass=True).is_enabled()
    assert not _scaler(deepspeed=True).is_enabled()
    assert not _scaler(mixed_precision="bf16").is_enabled()


def test_a_fused_fp16_step_equals_adafactor_on_the_unscaled_gradient():
    fused = torch.nn.Parameter(torch.full((4, 4), 0.5, dtype=torch.float16))
    optimizer = transformers.optimization.Adafactor([fused], **ADAFACTOR)
    install_fused_step(optimizer, 1.0)
    scaler = _scaler(fused_backward_pass=True)
    scaler.scale((fused.float() * 2.0).sum()).backward()  # gradient 2.0 everywhere (x65536 would be inf in fp16)
    usual = torch.nn.Parameter(torch.full((4, 4), 0.5, dtype=torch.float16))
    reference = transformers.optimization.Adafactor([usual], **ADAFACTOR)
    usual.grad = torch.full((4, 4), 2.0, dtype=torch.float16)
    torch.nn.utils.clip_grad_norm_([usual], 1.0)  # fused clipping: each tensor by its own norm
    reference.step()
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused.detach(), usual.detach(), rtol=0, atol=0)
