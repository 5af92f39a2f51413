"""Every batch of a run draws its own random numbers, across epochs too: sd-scripts draws the noise, the timesteps
and the dropouts from one running random stream, so no two batches of a run share them. Here each batch seeds its
generator and the global RNG (dropouts) from (seed, epoch, batch), which a resume repeats; the batch at the same
position of the next epoch must not get the same draws. The loss is a stand-in: only the draws are looked at."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import lorakit.network.create as create  # noqa: E402
import lorakit.train.run as run  # noqa: E402
from lorakit.models.demo_data import write_concept_folder  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402


def test_the_same_batch_position_of_another_epoch_draws_other_numbers(tmp_path):
    """2 images at batch 1: 2 epochs of 2 batches; the 4 batches' generator and global RNG draws all differ."""
    networks, draws = [], []
    make_network = create.create_network

    def recording(*args, **kwargs):
        networks.append(make_network(*args, **kwargs))
        return networks[-1]

    def stand_in_loss(ctx, batch, generator, train_text):
        draws.append((torch.rand(4, generator=generator), torch.rand(4)))
        return sum(p.sum() for p in networks[0].parameters() if p.requires_grad)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(create, "create_network", recording)
        patch.setattr(run, "batch_loss", stand_in_loss)
        write_concept_folder(tmp_path / "data", n=2, repeats=1, size=64)
        run.train(load_train_config(overrides=dict(
            pretrained_model_name_or_path="demo:tiny-sd", train_data_dir=str(tmp_path / "data"), resolution="64",
            output_dir=str(tmp_path / "out"), output_name="t", network_dim=2, max_train_epochs=2,
            train_batch_size=1, seed=3, max_data_loader_n_workers=0, lr_scheduler="constant")))
    assert len(draws) == 4
    for which in (0, 1):  # the noise generator's, the dropouts' (global RNG)
        firsts = {tuple(d[which].tolist()) for d in draws}
        assert len(firsts) == 4, which
