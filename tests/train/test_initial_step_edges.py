"""initial_step / initial_epoch (initial_step.initial_progress) at their edges, against sd-scripts' train_network.py:
skip_until_initial_step skips initial_step x gradient_accumulation_steps batches (`initial_step *=
args.gradient_accumulation_steps`), `assert args.max_train_steps > initial_step`, initial_step is used when both are
given; and, lorakit's documented rule (docs/training.md), with resume the state's position wins."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lorakit.algos.options import OptionError
from lorakit.train.initial_step import initial_progress
from lorakit.train.state import Progress

UPDATES_PER_EPOCH, MAX_STEPS = 5, 20


def _config(**values):
    base = dict(initial_step=None, initial_epoch=None, resume=None, skip_until_initial_step=False,
                gradient_accumulation_steps=1)
    return SimpleNamespace(**{**base, **values})


def _start(**values):
    return initial_progress(_config(**values), Progress(), UPDATES_PER_EPOCH, MAX_STEPS)


def test_skip_until_initial_step_skips_the_accumulated_batches_of_each_step():
    # step 8 = epoch 2's 4th step (5 steps per epoch): 3 steps of 4 batches each already seen in epoch 2
    p = _start(initial_step=8, skip_until_initial_step=True, gradient_accumulation_steps=4)
    assert (p.epoch, p.step_in_epoch, p.global_step) == (2, 3 * 4, 8)


def test_initial_step_must_be_below_the_training_steps():
    with pytest.raises(OptionError, match=r"initial_step \(20\) must be below the 20 training steps"):
        _start(initial_step=MAX_STEPS)
    assert _start(initial_step=MAX_STEPS - 1).global_step == MAX_STEPS - 1  # the last step is still trained


def test_initial_step_wins_over_initial_epoch():
    p = _start(initial_step=3, initial_epoch=3)  # initial_epoch 3 alone would start at step 10
    assert (p.epoch, p.global_step) == (1, 3)


def test_resume_keeps_the_states_position():
    saved = Progress(epoch=2, step_in_epoch=2, global_step=7)
    for option in (dict(initial_step=3), dict(initial_epoch=4)):
        p = initial_progress(_config(resume="state", **option), saved, UPDATES_PER_EPOCH, MAX_STEPS)
        assert (p.epoch, p.step_in_epoch, p.global_step) == (2, 2, 7), option
