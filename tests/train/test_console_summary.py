"""What a run prints: sd-scripts' dataset lines, its "running training" block, "epoch k/N" and the path of each
save, at INFO; `lorakit train` shows them without any console option, as sd-scripts does by default."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.cli import main  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402

from .tiny_run import make_base, run_options  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("summary"), images=3, repeats=2)


def _options(base, out, **overrides):
    return run_options(base, out, dict(network_dim=2, learning_rate=1e-3, max_train_steps=4, optimizer_type="AdamW"),
                       overrides)


def test_a_run_logs_the_dataset_the_schedule_the_epochs_and_each_save(base, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lorakit")
    train(load_train_config(overrides=_options(base, tmp_path, save_every_n_steps=3, save_state=True)))
    lines = [r.getMessage() for r in caplog.records if r.name == "lorakit.train.run"]
    folder = base / "data" / "2_magenta"
    # 3 images x 2 repeats = 6 samples, 3 batches of 2 per epoch: 4 steps are 2 epochs
    expected = [f"found directory {folder} contains 3 image files (2 repeats)", "6 train images with repeating.",
                "0 reg images.", "running training / 学習開始",
                "  num train images * repeats / 学習画像の数×繰り返し回数: 6",
                "  num validation images * repeats / 学習画像の数×繰り返し回数: 0",
                "  num reg images / 正則化画像の数: 0", "  num batches per epoch / 1epochのバッチ数: 3",
                "  num epochs / epoch数: 2", "  batch size per device / バッチサイズ: 2",
                "  gradient accumulation steps / 勾配を合計するステップ数 = 1",
                "  total optimization steps / 学習ステップ数: 4", "epoch 1/2",
                f"saving checkpoint: {tmp_path / 't-step00000003.safetensors'}",
                f"saving state: {tmp_path / 't-step00000003-state'}", "epoch 2/2",
                f"saving checkpoint: {tmp_path / 't.safetensors'}", "model saved.",
                f"saving state: {tmp_path / 't-state'}"]
    assert [line for line in lines if line in expected] == expected


def test_lorakit_train_shows_the_summary_without_console_options(base, tmp_path, capsys):
    args = [f"--{k}={v}" for k, v in _options(base, tmp_path, max_train_steps=1).items()]
    assert main(["train", *args]) == 0
    err = capsys.readouterr().err
    assert "\n  total optimization steps / 学習ステップ数: 1\n" in err  # messages only, as sd-scripts prints them
    assert "epoch 1/1" in err and f"saving checkpoint: {tmp_path / 't.safetensors'}" in err
    assert not logging.getLogger("lorakit").handlers  # gone with the run


@pytest.mark.parametrize("extra, message", [
    ([], "network_weights names no adapter file"),
    (["--network_weights=x.safetensors", "--deepspeed"], "deepspeed cannot be used (the rates are one small vector)")])
def test_explore_refusals_carry_the_command_name_once(base, tmp_path, capsys, extra, message):
    args = [f"--{k}={v}" for k, v in _options(base, tmp_path).items()]
    assert main(["explore", *args, *extra]) == 1
    err = capsys.readouterr().err
    assert f"lorakit explore: error: {message}" in err and err.count("lorakit explore") == 1
