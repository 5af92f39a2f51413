"""DeepSpeed fp16: a step the engine skips for overflowing gradients holds the lr schedule, as accelerate's
AcceleratedScheduler does for sd-scripts (it returns when the DeepSpeed optimizer reports overflow). DeepSpeed's CPU
accelerator has no fp16, so the engine's report of the first step is made an overflow here."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from lorakit.train import deepspeed_engine  # noqa: E402
from lorakit.train.run import train  # noqa: E402

from . import deepspeed_gloo  # noqa: E402,F401  (collectives through gloo: no C++ op to compile)
from .test_run import _config, base  # noqa: E402,F401  (the shared model/data fixture)


def test_a_step_deepspeed_skipped_holds_the_lr_schedule(base, tmp_path, monkeypatch):  # noqa: F811
    reports = iter([False])  # the first boundary overflowed, the rest stepped
    monkeypatch.setattr(deepspeed_engine.DeepSpeedEngine, "step_applied", property(lambda self: next(reports, True)))
    train(_config(base, tmp_path, deepspeed=True, zero_stage=0, max_train_steps=3, save_every_n_steps=3,
                  save_state=True))
    saved = torch.load(tmp_path / "t-step00000003-state" / "optimizer.pt", weights_only=True)
    assert saved["scheduler"]["last_epoch"] == 2  # 3 steps counted, 2 of them stepped the schedule
