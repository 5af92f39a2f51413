"""max_grad_norm in the training loop, on the tiny SD model: sd-scripts' train_network.py calls
accelerator.clip_grad_norm_(params, max_grad_norm), which clips the global norm of the UNSCALED gradients (accelerate
unscales fp16 gradients first, as torch's AMP docs require before clip_grad_norm_).

One SGDNesterov step (torch SGD, momentum 0.9, nesterov) from lora_up = 0: the first step moves each weight by
-lr (g + 0.9 g) (the momentum buffer starts as g), and only lora_up has a gradient (lora_down's is proportional to
lora_up). So the saved lora_up weights have the global norm lr x 1.9 x max_grad_norm when the clip binds."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402

from .tiny_run import make_base, run_options  # noqa: E402

LR, MAX_GRAD_NORM = 0.5, 1e-4  # the tiny model's gradient norm is far above 1e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("clipping"), images=2)


def _one_step(base, out, **overrides):
    values = run_options(base, out, dict(network_dim=4, network_alpha=2, learning_rate=LR, max_train_steps=1,
                                         cache_latents=True, optimizer_type="SGDNesterov", lr_scheduler="constant",
                                         save_precision="float", max_grad_norm=MAX_GRAD_NORM), overrides)
    return load_file(train(load_train_config(overrides=values)))[0]


def _norm(tensors, part):
    return math.sqrt(sum(float(t.double().pow(2).sum()) for k, t in tensors.items() if part in k))


@pytest.mark.parametrize("mixed_precision", ["no", "fp16"])
def test_max_grad_norm_clips_the_global_norm_of_the_unscaled_gradients(base, tmp_path, mixed_precision):
    tensors = _one_step(base, tmp_path, mixed_precision=mixed_precision)
    assert _norm(tensors, "lora_up") == pytest.approx(LR * 1.9 * MAX_GRAD_NORM, rel=1e-3)
