"""The batches of an accumulated optimizer step (gradient_accumulation_steps 2): each draws its own noise and
timesteps (sd-scripts draws every batch's from the running random stream, so no two batches share them), and the
step applies the mean of their gradients, as accelerate's accumulate() gives sd-scripts (each loss is divided by
gradient_accumulation_steps before backward). The loss is a stand-in, the sum of every adapter weight, whose
gradient is 1 for each of them: plain SGD (lr 0.125, no momentum, no clipping) moves every weight by exactly
-0.125 in the one step of 2 batches, so the lora_up weights, which start at 0, end at -0.125."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file  # noqa: E402

from .tiny_run import train_with_stand_in_loss  # noqa: E402


@pytest.fixture(scope="module")
def accumulated_step(tmp_path_factory):
    """One optimizer step over the 2 batches of one epoch: the saved adapter and each batch's first random draw."""
    final, draws = train_with_stand_in_loss(
        tmp_path_factory.mktemp("accumulated"), learning_rate=0.125, max_train_steps=1, gradient_accumulation_steps=2,
        optimizer_type="SGDNesterov", optimizer_args=["momentum=0", "nesterov=False"], max_grad_norm=0)
    return load_file(final)[0], [generator_draw for generator_draw, _ in draws]


def test_the_step_applies_the_mean_gradient_of_its_batches(accumulated_step):
    ups = [v for k, v in accumulated_step[0].items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.equal(u, torch.full_like(u, -0.125)) for u in ups)  # not -0.25, the gradients' sum


def test_each_batch_draws_its_own_noise(accumulated_step):
    first, second = accumulated_step[1]
    assert not torch.equal(first, second)
