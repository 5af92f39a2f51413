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

import lorakit.network.create as create  # noqa: E402
import lorakit.train.run as run  # noqa: E402
from lorakit.formats.safetensors_io import load_file  # noqa: E402
from lorakit.models.demo_data import write_concept_folder  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402


@pytest.fixture(scope="module")
def accumulated_step(tmp_path_factory):
    """One optimizer step over the 2 batches of one epoch: the saved adapter and each batch's first random draw."""
    root = tmp_path_factory.mktemp("accumulated")
    networks, draws = [], []
    make_network = create.create_network

    def recording(*args, **kwargs):
        networks.append(make_network(*args, **kwargs))
        return networks[-1]

    def stand_in_loss(ctx, batch, generator, train_text):
        draws.append(torch.rand(4, generator=generator))
        return sum(p.sum() for p in networks[0].parameters() if p.requires_grad)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(create, "create_network", recording)
        patch.setattr(run, "batch_loss", stand_in_loss)
        write_concept_folder(root / "data", n=2, repeats=1, size=64)
        final = run.train(load_train_config(overrides=dict(
            pretrained_model_name_or_path="demo:tiny-sd", train_data_dir=str(root / "data"), resolution="64",
            output_dir=str(root / "out"), output_name="t", network_dim=2, learning_rate=0.125, max_train_steps=1,
            train_batch_size=1, gradient_accumulation_steps=2, seed=3, max_data_loader_n_workers=0,
            optimizer_type="SGDNesterov", optimizer_args=["momentum=0", "nesterov=False"], max_grad_norm=0,
            lr_scheduler="constant")))
    return load_file(final)[0], draws


def test_the_step_applies_the_mean_gradient_of_its_batches(accumulated_step):
    ups = [v for k, v in accumulated_step[0].items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.equal(u, torch.full_like(u, -0.125)) for u in ups)  # not -0.25, the gradients' sum


def test_each_batch_draws_its_own_noise(accumulated_step):
    first, second = accumulated_step[1]
    assert not torch.equal(first, second)
