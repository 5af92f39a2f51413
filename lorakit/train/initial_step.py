"""sd-scripts' ``initial_epoch`` / ``initial_step`` / ``skip_until_initial_step`` (train_network.py): a run that
goes on from a step of an earlier one (typically with ``network_weights`` from its save) counts its steps and epochs
from there, so its saves, their ``ss_steps``/``ss_epoch`` and the step and epoch triggers carry on.

- ``initial_step`` N (or ``initial_epoch`` E: N = (E - 1) x optimizer steps per epoch; initial_step wins) must be
  below the training steps; the run trains steps N+1 .. max_train_steps, starting in epoch N // steps_per_epoch + 1.
- with ``skip_until_initial_step`` the batches of the first N steps are skipped: the run sees the data an
  uninterrupted run would have seen from step N on. Without it the run starts at the first batch of that epoch.
- the lr schedule is not advanced (sd-scripts: "lr scheduler will start from 0 without --resume").

Where lorakit differs: sd-scripts counts ``global_step`` from 0 without skip_until_initial_step (only the epoch
number moves) and from the step's remainder within its epoch with it; here the step counter starts at N in both.
A resumed state knows where its run stands, so with ``resume`` these options are ignored (sd-scripts lets them
override the state's step, which replays steps when the saved config is reused).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from ..algos.options import OptionError

__all__ = ["initial_progress"]

log = logging.getLogger(__name__)


def initial_progress(config, progress, updates_per_epoch: int, max_steps: int):
    """The Progress the loop starts from (``progress`` itself without initial_epoch/initial_step or with resume)."""
    if config.initial_step is None and config.initial_epoch is None:
        return progress
    if config.resume:
        log.warning("initial_epoch/initial_step ignored: resume=%s continues where its state stopped", config.resume)
        return progress
    if config.initial_step is not None:
        step, what = config.initial_step, f"initial_step ({config.initial_step})"
    else:
        step = (config.initial_epoch - 1) * updates_per_epoch
        what = f"initial_epoch {config.initial_epoch} (step {step} at {updates_per_epoch} steps per epoch)"
    if step == 0:
        return progress
    if step >= max_steps:
        raise OptionError(f"{what} must be below the {max_steps} training steps (max_train_steps / "
                          "max_train_epochs): there would be nothing left to train")
    epoch, within = divmod(step, updates_per_epoch)
    batches = within * config.gradient_accumulation_steps if config.skip_until_initial_step else 0
    return replace(progress, epoch=epoch + 1, step_in_epoch=batches, global_step=step)
