"""sd-scripts' validation loss (train_network.py): the loss on the images ``validation_split`` holds out, at fixed
timesteps and fixed noise, so that values from different steps compare.

Each validation runs over the first ``max_validation_steps`` batches of the held-out images (all by default), each
at the 4 timesteps np.linspace(min_timestep, max_timestep, 6, dtype=int)[1:-1] (200, 400, 600, 800 by default),
with the adapters in eval mode (no dropout), no gradients, and every random draw (VAE sample, noise) from a
generator seeded with ``validation_seed`` (else the training seed) at the start of each validation: the same draws
every time. The value is the mean over batches and timesteps, logged as ``loss/validation/step_average`` (every
``validate_every_n_steps``) or ``loss/validation/epoch_average`` (every ``validate_every_n_epochs``, by default
every epoch), with ``.../*_divergence`` = validation average - training average loss. The held-out batches and
their augmentations (flips) are the same at every validation. (sd-scripts' average runs on over all validations
of the first epoch; here each validation's own mean is logged.)
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .step import StepContext, batch_loss

__all__ = ["NUM_VALIDATION_TIMESTEPS", "validation_timesteps", "Validator"]

NUM_VALIDATION_TIMESTEPS = 4  # sd-scripts' constant


def validation_timesteps(min_timestep: int | None, max_timestep: int | None,
                         num_train_timesteps: int = 1000) -> list[int]:
    """sd-scripts' fixed validation timesteps: the inner points of 6 evenly spaced ones, truncated to integers."""
    lo = 0 if min_timestep is None else min_timestep
    hi = num_train_timesteps if max_timestep is None else max_timestep
    points = np.linspace(lo, hi, NUM_VALIDATION_TIMESTEPS + 2, dtype=int)[1:-1]
    return [min(int(t), num_train_timesteps - 1) for t in points]


class Validator:
    """The validation loss of ``dataset`` (a TrainDataset built with ``validation=True``) for a run's model."""

    def __init__(self, ctx: StepContext, dataset, network, seed: int, max_steps: int | None = None):
        self.ctx, self.dataset, self.network, self.seed = ctx, dataset, network, seed
        self.batches = dataset.batches(1)  # one fixed order and augmentation for every validation
        if max_steps is not None:
            self.batches = self.batches[:max_steps]
        noise = ctx.noise
        self.timesteps = validation_timesteps(noise.min_timestep, noise.max_timestep,
                                              ctx.noise_scheduler.config.num_train_timesteps)

    def __call__(self) -> float:
        ctx = self.ctx
        rng = torch.get_rng_state()
        was_training = self.network.training
        self.network.eval()
        generator = torch.Generator(device=ctx.device).manual_seed(self.seed)
        losses = []
        try:
            with torch.no_grad():
                for keys in self.batches:
                    batch = self.dataset.collate([self.dataset[k] for k in keys])
                    for t in self.timesteps:
                        fixed = replace(ctx, noise=replace(ctx.noise, min_timestep=t, max_timestep=t))
                        losses.append(batch_loss(fixed, batch, generator, train_text=False).item())
        finally:
            torch.set_rng_state(rng)
            self.network.train(was_training)
        return sum(losses) / len(losses)
