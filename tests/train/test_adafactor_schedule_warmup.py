"""The adafactor lr schedule takes no warmup: sd-scripts' get_scheduler_fix wraps AdafactorSchedule in
wrap_check_needless_num_warmup_steps, which raises when lr_warmup_steps is given (as for 'constant')."""

from __future__ import annotations

import pytest
import torch

from lorakit.algos.options import OptionError
from lorakit.train.checks import check_runnable
from lorakit.train.config import load_train_config
from lorakit.train.optimizers import make_optimizer
from lorakit.train.schedulers import make_scheduler


def _config(tmp_path, warmup):
    return load_train_config(overrides=dict(optimizer_type="Adafactor", lr_scheduler="adafactor",
                                            lr_warmup_steps=warmup, pretrained_model_name_or_path="demo:tiny-sd",
                                            output_dir=str(tmp_path), train_data_dir=str(tmp_path), resolution="64"))


def _scheduler(config):
    optimizer = make_optimizer(config.optimizer_type, [torch.nn.Parameter(torch.zeros(4, 4))],
                               config.learning_rate, config.optimizer_args)
    return make_scheduler(config.lr_scheduler, optimizer, 100, config.lr_warmup_steps)


def test_adafactor_schedule_with_a_warmup_is_refused(tmp_path):
    config = _config(tmp_path, 10)
    with pytest.raises(OptionError, match="'adafactor' takes no warmup: lr_warmup_steps must be 0, got 10"):
        check_runnable(config)
    with pytest.raises(OptionError, match="'adafactor' takes no warmup"):
        _scheduler(config)


def test_adafactor_schedule_without_warmup_is_built(tmp_path):
    config = _config(tmp_path, 0)
    check_runnable(config)
    assert type(_scheduler(config)).__name__ == "AdafactorSchedule"
