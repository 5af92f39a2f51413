"""The trainer: configuration, optimizers, schedulers, noise and loss, the loop, checkpoints, sampling, logging."""
