"""Every batch of a run draws its own random numbers, across epochs too: sd-scripts draws the noise, the timesteps
and the dropouts from one running random stream, so no two batches of a run share them. Here each batch seeds its
generator and the global RNG (dropouts) from (seed, epoch, batch), which a resume repeats; the batch at the same
position of the next epoch must not get the same draws. The loss is a stand-in: only the draws are looked at."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from .tiny_run import train_with_stand_in_loss  # noqa: E402


def test_the_same_batch_position_of_another_epoch_draws_other_numbers(tmp_path):
    """2 images at batch 1: 2 epochs of 2 batches; the 4 batches' generator and global RNG draws all differ."""
    _, draws = train_with_stand_in_loss(tmp_path, max_train_epochs=2)
    assert len(draws) == 4
    for which in (0, 1):  # the noise generator's, the dropouts' (global RNG)
        firsts = {tuple(d[which].tolist()) for d in draws}
        assert len(firsts) == 4, which
