"""The metrics TrainLogger writes: sd-scripts' names for the learning rates."""

from __future__ import annotations

import pytest
import torch

from lorakit import create_network
from lorakit.train.config import load_train_config
from lorakit.train.logger import TrainLogger

from ..network.tiny import tiny_model


class _Recorder:
    def __init__(self):
        self.logs = []

    def log(self, logs, step):
        self.logs.append(dict(logs))

    def close(self):
        pass


def _logged(groups, lrs=None):
    logger = TrainLogger(load_train_config(overrides={}), total=1, quiet=True)
    logger.writers.append(recorder := _Recorder())
    logger.step(0.5, lrs or [g.get("lr", 1.0) for g in groups], 1, 1, groups=groups)
    return recorder.logs[0]


@pytest.mark.parametrize("kind,kwargs,lrs,expected", [
    ("sd1", {}, {"unet_lr": 1e-3, "text_encoder_lr": 1e-4}, {"lr/unet": 1e-3, "lr/textencoder": 1e-4}),
    ("sd1", {}, {"unet_lr": 1e-3, "text_encoder_lr": 0}, {"lr/unet": 1e-3}),
    ("sd1", {"loraplus_lr_ratio": 4}, {"unet_lr": 1e-3, "text_encoder_lr": 1e-4},
     {"lr/unet": 1e-3, "lr/unet plus": 4e-3, "lr/textencoder": 1e-4, "lr/textencoder plus": 4e-4}),
    ("sdxl", {}, {"unet_lr": 1e-3, "text_encoder_lr": 1e-4},
     {"lr/unet": 1e-3, "lr/textencoder": 1e-4, "lr/textencoder_2": 1e-4}),
])
def test_lr_metrics_have_sd_scripts_names(kind, kwargs, lrs, expected):
    """train_network.py logs lr/<description> with networks.lora's descriptions: textencoder, unet, '... plus'."""
    unet, tes = tiny_model(kind)
    net = create_network(unet, tes, dim=4, alpha=2, **kwargs)
    logs = _logged(net.optimizer_param_groups(**lrs))
    assert {k: pytest.approx(v) for k, v in logs.items() if k.startswith("lr/")} == expected


def test_d_adaptation_and_prodigy_log_d_times_lr():
    """For DAdapt*/Prodigy sd-scripts adds lr/d*lr/<description>: the step size they take (their lr stays ~1)."""
    groups = [{"name": "unet", "lr": 1.0, "d": 2e-5}, {"name": "text_encoder", "lr": 0.5, "d": 2e-5}]
    logs = _logged(groups)
    assert logs["lr/d*lr/unet"] == pytest.approx(2e-5) and logs["lr/d*lr/textencoder"] == pytest.approx(1e-5)
    assert logs["lr/unet"] == 1.0 and logs["lr/textencoder"] == 0.5


def test_prodigy_groups_carry_d_if_installed():
    pytest.importorskip("prodigyopt")
    from lorakit.train.optimizers import make_optimizer

    optimizer = make_optimizer("Prodigy", [{"params": [torch.nn.Parameter(torch.ones(3))], "name": "unet"}], 1.0)
    logs = _logged(optimizer.param_groups)
    assert logs["lr/d*lr/unet"] == pytest.approx(optimizer.param_groups[0]["d"])


def test_without_the_groups_the_lrs_are_numbered():
    logger = TrainLogger(load_train_config(overrides={}), total=1, quiet=True)
    logger.writers.append(recorder := _Recorder())
    logger.step(0.5, [1e-3, 1e-4], 1, 1)
    assert {k for k in recorder.logs[0] if k.startswith("lr/")} == {"lr/group0", "lr/group1"}
