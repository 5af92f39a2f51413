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
        self.logs, self.steps, self.drawn, self.events = [], [], [], []

    def log(self, logs, step, **_):
        self.logs.append(dict(logs))
        self.steps.append(step)
        self.events.append("log")

    def samples(self, drawn):
        self.drawn.append(drawn)
        self.events.append("samples")

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


def test_max_norm_metrics_have_sd_scripts_names():
    """scale_weight_norms: current sd-scripts (train_network.py generate_step_logs) logs max_norm/keys_scaled,
    max_norm/max_key_norm and norm/avg_key_norm every step."""
    logger = TrainLogger(load_train_config(overrides={}), total=2, quiet=True)
    logger.writers.append(recorder := _Recorder())
    logger.step(0.5, [1e-3], 1, 1, max_norm=(3, 0.5, 1.0))
    logger.step(0.5, [1e-3], 2, 1)
    assert {k: v for k, v in recorder.logs[0].items() if k.startswith(("max_norm/", "norm/"))} == {
        "max_norm/keys_scaled": 3, "max_norm/max_key_norm": 1.0, "norm/avg_key_norm": 0.5}
    assert not any(k.startswith(("max_norm/", "norm/")) for k in recorder.logs[1])  # no scale_weight_norms: none



def test_loss_average_is_the_mean_of_the_last_100_steps():
    """docs/training.md: the progress bar's loss (and loss/average) is averaged over the last 100 steps; losses
    0, 1, ..., 149 give (50 + ... + 149) / 100 = 99.5 at the last step, and 0.5 after the first two."""
    logger = TrainLogger(load_train_config(overrides={}), total=150, quiet=True)
    logger.writers.append(recorder := _Recorder())
    for step in range(150):
        logger.step(float(step), [1e-3], step + 1, 1)
    assert recorder.logs[1]["loss/average"] == pytest.approx(0.5)
    assert recorder.logs[-1]["loss/average"] == pytest.approx(99.5)


def test_validation_logs_the_divergence_from_the_training_average_at_its_own_x():
    """sd-scripts' validation logs: loss/validation/<kind>_average and <kind>_divergence = validation loss minus
    the training average (docs/training.md), at x = the step for "step" and x = the epoch for "epoch"."""
    logger = TrainLogger(load_train_config(overrides={}), total=2, quiet=True)
    logger.writers.append(recorder := _Recorder())
    logger.step(0.25, [1e-3], 7, 3)
    logger.step(0.75, [1e-3], 8, 3)
    logger.validation("step", 0.875, 8, 3)
    logger.validation("epoch", 0.125, 8, 3)
    assert recorder.logs[2:] == [{"loss/validation/step_average": 0.875, "loss/validation/step_divergence": 0.375},
                                 {"loss/validation/epoch_average": 0.125, "loss/validation/epoch_divergence": -0.375}]
    assert recorder.steps[2:] == [8, 3]

def test_a_run_with_scale_weight_norms_logs_what_the_regularisation_returns(tmp_path, monkeypatch):
    """The trainer hands each step's (adapters scaled, mean norm, max norm) to the logger."""
    from pathlib import Path

    from lorakit.network.network import Network
    from lorakit.train.run import train

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # the example's paths are relative to the repository
    returned, recorder = [], _Recorder()
    regularise = Network.apply_max_norm_regularization
    monkeypatch.setattr(Network, "apply_max_norm_regularization",
                        lambda self, *a, **k: returned.append(regularise(self, *a, **k)) or returned[-1])
    start = TrainLogger.__init__
    monkeypatch.setattr(TrainLogger, "__init__",
                        lambda self, *a, **k: start(self, *a, **k) or self.writers.append(recorder))
    config = load_train_config(root / "examples" / "quickstart.toml", overrides={
        "output_dir": str(tmp_path), "sample_prompts": None, "sample_at_first": False, "sample_every_n_steps": None,
        "max_train_steps": 2, "scale_weight_norms": 1e-4, "train_batch_size": 2, "cache_latents": False})
    train(config)
    logged = [tuple(logs[k] for k in ("max_norm/keys_scaled", "norm/avg_key_norm", "max_norm/max_key_norm"))
              for logs in recorder.logs if "loss/current" in logs]
    assert len(returned) == 2 and logged == returned and returned[-1][0] > 0


def test_epoch_average_is_logged_at_each_epoch_end_at_x_epoch(tmp_path, monkeypatch):
    """sd-scripts' train_network.py logs loss/epoch_average at every epoch's end (the last, part-way one too) with
    the epoch as TensorBoard's x."""
    pytest.importorskip("diffusers")
    from lorakit.models.demo import random_model
    from lorakit.models.demo_data import write_concept_folder
    from lorakit.models.save import save_checkpoint
    from lorakit.train.run import train

    save_checkpoint(random_model("tiny-sd", seed=0), tmp_path / "sd.safetensors", dtype=None)
    write_concept_folder(tmp_path / "data", n=2, repeats=1)
    recorder = _Recorder()
    start = TrainLogger.__init__
    monkeypatch.setattr(TrainLogger, "__init__",
                        lambda self, *a, **k: start(self, *a, **k) or self.writers.append(recorder))
    train(load_train_config(overrides=dict(
        pretrained_model_name_or_path=str(tmp_path / "sd.safetensors"), train_data_dir=str(tmp_path / "data"),
        resolution="64", output_dir=str(tmp_path / "out"), network_dim=2, max_train_steps=3, train_batch_size=1,
        seed=1, max_data_loader_n_workers=0)))
    steps = [logs["loss/current"] for logs in recorder.logs if "loss/current" in logs]
    epochs = [(x, logs["loss/epoch_average"]) for logs, x in zip(recorder.logs, recorder.steps)
              if "loss/epoch_average" in logs]
    assert epochs == [(1, pytest.approx((steps[0] + steps[1]) / 2)), (2, pytest.approx(steps[2]))]


def test_tensorboard_files_go_where_sd_scripts_puts_them(tmp_path, monkeypatch):
    """accelerate (sd-scripts' trackers): logging_dir/<log_prefix><time>/<log_tracker_name or network_train>."""
    import re
    import sys
    import types

    folders = []

    class FakeWriter:
        def __init__(self, log_dir, **kwargs):
            folders.append(log_dir)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    for extra in ({}, {"log_tracker_name": "mine"}):
        TrainLogger(load_train_config(overrides={"logging_dir": str(tmp_path), "log_prefix": "pre_", **extra}),
                    total=1)
    pattern = re.escape(str(tmp_path)) + r"/pre_\d{14}/"
    assert re.fullmatch(pattern + "network_train", folders[0]) and re.fullmatch(pattern + "mine", folders[1])


class _WandbRun:
    """A stand-in wandb run that keeps what wandb keeps: a log at a step below its current one is dropped."""

    def __init__(self):
        self.step, self.history, self.hidden = 0, [], []

    def define_metric(self, name, hidden=False):
        if hidden:
            self.hidden.append(name)

    def log(self, data, step=None, commit=None):
        if step is not None and step < self.step:
            return  # wandb: "Steps must be monotonically increasing, so this data will be ignored"
        self.step = self.step if step is None else step
        self.history.append(dict(data))
        self.step += 1

    def finish(self):
        pass


def test_wandb_gets_the_epoch_metrics_with_global_step_and_epoch_keys(monkeypatch):
    """sd-scripts' accelerator_logging logs to wandb without a step, adding global_step and epoch (declared hidden
    by init_trackers): an epoch's metrics after its steps are kept."""
    import sys
    import types

    run = _WandbRun()
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run))
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = TrainLogger(load_train_config(overrides={"log_with": "wandb"}), total=2, quiet=False)
    logger.step(0.5, [1e-3], 1, 1)
    logger.step(0.25, [1e-3], 2, 1)
    logger.validation("epoch", 0.75, 2, 1)
    logger.epoch_end(1)
    logger.close()
    assert run.hidden == ["global_step", "epoch"]
    kept = {key: (logs[key], logs["global_step"], logs["epoch"]) for logs in run.history for key in logs}
    assert kept["loss/epoch_average"] == (pytest.approx(0.375), 2, 1)
    assert kept["loss/validation/epoch_average"] == (0.75, 2, 1)
    assert kept["loss/current"] == (0.25, 2, 1)


def test_samples_go_to_wandb_as_sd_scripts_sends_them(monkeypatch):
    """sd-scripts' sample_image_inference: wandb_tracker.log({f"sample_{i}": wandb.Image(image, caption=prompt)},
    commit=False) for each sample; TensorBoard gets none."""
    import sys
    import types

    run = _WandbRun()
    logged = []
    run.log = lambda data, step=None, commit=None: logged.append((data, commit))
    wandb = types.SimpleNamespace(init=lambda **kw: run, Image=lambda image, caption: ("image", image, caption))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = TrainLogger(load_train_config(overrides={"log_with": "wandb"}), total=1, quiet=False)
    logger.samples([("a cat", "pixels 0"), ("a dog", "pixels 1")])
    logger.samples([])  # nothing drawn: nothing logged
    logger.close()
    logger.samples([("after training", "pixels")])  # the run is finished: on disk only
    assert logged == [({"sample_0": ("image", "pixels 0", "a cat"), "sample_1": ("image", "pixels 1", "a dog")},
                       False)]


def test_a_run_hands_its_samples_to_the_logger(tmp_path, monkeypatch):
    """Each draw's prompts and images reach the trackers (the recorder stands in for wandb)."""
    from pathlib import Path

    from lorakit.train.run import train

    pytest.importorskip("diffusers")
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # the example's paths are relative to the repository
    recorder = _Recorder()
    start = TrainLogger.__init__
    monkeypatch.setattr(TrainLogger, "__init__",
                        lambda self, *a, **k: start(self, *a, **k) or self.writers.append(recorder))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a purple circle --w 64 --h 64 --d 5 --s 1\na square --w 64 --h 64 --s 1\n")
    config = load_train_config(root / "examples" / "quickstart.toml", overrides={
        "output_dir": str(tmp_path), "sample_prompts": str(prompts), "sample_at_first": False,
        "sample_every_n_steps": 1, "sample_sampler": "ddim", "max_train_steps": 1, "train_batch_size": 2,
        "cache_latents": False})
    train(config)
    (drawn,) = recorder.drawn
    assert [prompt for prompt, _ in drawn] == ["a purple circle", "a square"]
    # drawn before the step's metrics are logged, as sd-scripts does: wandb shows them in that step's row
    assert recorder.events[:2] == ["samples", "log"]
    assert all(image.size == (64, 64) for _, image in drawn)
