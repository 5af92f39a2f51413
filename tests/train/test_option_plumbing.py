"""Options that only act through a whole run, checked there: the scheduler's num_cycles and power reach the lr
curve, save_last_n_epochs(_state) prune the epoch saves as sd-scripts does, training_comment lands in the file."""

from __future__ import annotations

import importlib.machinery
import math
import sys
import types

import pytest

pytest.importorskip("diffusers")

from lorakit.formats.safetensors_io import read_metadata  # noqa: E402
from lorakit.models.demo_data import write_concept_folder  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("plumbing")
    write_concept_folder(root / "data", n=3, repeats=1, size=64)
    return root / "data"


@pytest.fixture
def logged_lrs(monkeypatch):
    """A stand-in wandb that records the unet lr of every step log."""
    lrs = []
    run = types.SimpleNamespace(log=lambda logs, **k: "lr/unet" in logs and lrs.append(logs["lr/unet"]),
                                define_metric=lambda *a, **k: None, finish=lambda: None)
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # found as installed
    wandb.init = lambda **kw: run
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return lrs


def _train(data, out, **overrides):
    values = dict(pretrained_model_name_or_path="demo:tiny-sd", train_data_dir=str(data), resolution="64",
                  output_dir=str(out), output_name="t", network_dim=2, learning_rate=1e-3, train_batch_size=1,
                  seed=1, max_data_loader_n_workers=0, optimizer_type="AdamW", network_train_unet_only=True)
    values.update(overrides)
    return train(load_train_config(overrides=values))


@pytest.mark.parametrize("scheduler, extra, curve", [
    ("cosine_with_restarts", {"lr_scheduler_num_cycles": 2},
     lambda t: 0.5 * (1 + math.cos(math.pi * ((2 * t) % 1.0))) if t < 1 else 0.0),
    ("polynomial", {"lr_scheduler_power": 2.0}, lambda t: (1 - t) ** 2),
])
def test_num_cycles_and_power_reach_the_runs_lr_curve(data, tmp_path, logged_lrs, scheduler, extra, curve):
    _train(data, tmp_path, max_train_steps=6, lr_scheduler=scheduler, log_with="wandb", **extra)
    # diffusers' schedules (no warmup), logged after step k's scheduler step as sd-scripts logs them: lr x
    # curve(k / 6); polynomial decays to its lr_end 1e-7
    expected = [1e-3 * curve(k / 6) if scheduler != "polynomial" else (1e-3 - 1e-7) * curve(k / 6) + 1e-7
                for k in range(1, 7)]
    assert logged_lrs == pytest.approx(expected, rel=1e-6)


def test_save_last_n_epochs_and_its_state_keep_the_newest_epoch_saves(data, tmp_path):
    _train(data, tmp_path, max_train_epochs=4, save_every_n_epochs=1, save_last_n_epochs=2, save_state=True,
           save_last_n_epochs_state=1, training_comment="a comment")
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("t"))
    # epochs 1-3 are saved as epoch files (4 is the final file); the last 2 files and the last state stay
    assert names == ["t-000002.safetensors", "t-000003-state", "t-000003.safetensors", "t-state", "t.safetensors",
                     "t_config.toml"]
    assert read_metadata(tmp_path / "t.safetensors")["ss_training_comment"] == "a comment"
