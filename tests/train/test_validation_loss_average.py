"""The validation loss Validator computes (sd-scripts' train_network.py validation): each held-out batch at the 4
fixed timesteps 200, 400, 600, 800 (np.linspace(0, 1000, 6, dtype=int)[1:-1]), the adapters in eval mode (no
dropout) and the value the mean over every (batch, timestep) loss. batch_loss is replaced by a stand-in whose loss
is the timestep / 1000, so the expected value is worked out by hand."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import lorakit.train.validation as validation
from lorakit.train.noise import NoiseOptions
from lorakit.train.step import StepContext


class _HeldOut:
    """Three held-out images in batches of 2: [0, 1], [2]."""

    def batches(self, batch_size):
        return [[0, 1], [2]]

    def __getitem__(self, key):
        return key

    def collate(self, items):
        return items


def _validator(network):
    ctx = StepContext(model=None, noise_scheduler=SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000)),
                      noise=NoiseOptions(), loss=None, device=torch.device("cpu"), weight_dtype=torch.float32,
                      autocast_dtype=None, clip_skip=None, max_token_length=None)
    return validation.Validator(ctx, _HeldOut(), network, seed=7)


def test_the_value_is_the_mean_over_batches_and_timesteps_in_eval_mode(monkeypatch):
    network = torch.nn.Dropout(0.5)
    calls = []

    def loss_of(ctx, batch, generator, train_text):
        assert ctx.noise.min_timestep == ctx.noise.max_timestep  # one fixed timestep per call
        calls.append((tuple(batch), ctx.noise.min_timestep, network.training))
        return torch.tensor(ctx.noise.min_timestep / 1000)

    monkeypatch.setattr(validation, "batch_loss", loss_of)
    network.train()
    value = _validator(network)()
    assert calls == [(keys, t, False) for keys in ((0, 1), (2,)) for t in (200, 400, 600, 800)]
    assert abs(value - (0.2 + 0.4 + 0.6 + 0.8) / 4) < 1e-6  # 8 (float32) losses; their mean, 0.5
    assert network.training  # back in train mode for the next training step


def test_a_validation_leaves_the_random_stream_and_the_mode_as_it_found_them(monkeypatch):
    """sd-scripts switches to the validation seed's random state for a validation and restores the training's after
    it (switch_rng_state / restore_rng_state): the draws a validation makes from torch's global RNG (dropouts,
    augmentations) do not move the training's stream on. A network in eval mode stays in it."""
    monkeypatch.setattr(validation, "batch_loss", lambda ctx, batch, generator, train_text: torch.rand(()))
    network = torch.nn.Dropout(0.5)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    _validator(network)()
    assert torch.equal(torch.rand(3), expected)
    network.eval()
    _validator(network)()
    assert not network.training
