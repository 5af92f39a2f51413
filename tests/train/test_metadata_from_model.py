"""ss_* / modelspec keys derived from the loaded model and the computed run length rather than copied from the
options, as sd-scripts writes them: the SD2 / v-prediction keys of a checkpoint whose kind lorakit detected (v2 not
given), ss_max_train_steps / ss_num_epochs as computed (sd-scripts rewrites args.max_train_steps from
max_train_epochs and writes num_train_epochs), the model's file name without its folders, the timestep range with
get_sai_model_spec's 0 / 1000 fill-ins, and the (width, height) order of a non-square resolution."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorakit.train.config import load_train_config
from lorakit.train.metadata import training_metadata
from lorakit.train.optimizers import make_optimizer, optimizer_name
from lorakit.train.run import _resolution


def _metadata(kind="sd1", v=False, num_epochs=1, max_train_steps=1, model_path="m.safetensors",
              resolution=(64, 64), **overrides):
    config = load_train_config(overrides=overrides)
    optimizer = make_optimizer(config.optimizer_type, [torch.nn.Parameter(torch.zeros(2))], config.learning_rate,
                               config.optimizer_args)
    dataset = SimpleNamespace(num_train_images=6, num_reg_images=0, steps_per_epoch=3, tag_frequency={},
                              bucket_info={}, subsets=[], image_counts=[])
    return training_metadata(config, kind=kind, v_parameterization=v, dataset=dataset,
                             optimizer_name=optimizer_name(optimizer), num_epochs=num_epochs,
                             max_train_steps=max_train_steps, session_id="s", started_at=0.0,
                             model_path=model_path, resolution=resolution)


@pytest.mark.parametrize("kind,v,v2,architecture,prediction", [
    ("sd2", True, "True", "stable-diffusion-v2-768-v/lora", "v"),
    ("sd2", False, "True", "stable-diffusion-v2-512/lora", "epsilon"),
    ("sd1", True, "False", "stable-diffusion-v1/lora", "v"),
])
def test_a_detected_model_kind_sets_v2_architecture_and_prediction(kind, v, v2, architecture, prediction):
    """sai_model_spec.build_metadata: v2 + v_parameterization -> stable-diffusion-v2-768-v, v2 ->
    stable-diffusion-v2-512; prediction_type v for v_parameterization. ss_v2 follows the model loaded (sd-scripts'
    v2 flag always names the model it loads)."""
    meta = _metadata(kind=kind, v=v)  # v2 / v_parameterization not given: detected from the checkpoint
    assert (meta["ss_v2"], meta["modelspec.architecture"], meta["modelspec.prediction_type"]) == (
        v2, architecture, prediction)


def test_run_length_keys_are_the_computed_ones():
    meta = _metadata(num_epochs=3, max_train_steps=9, max_train_epochs=3)  # the option max_train_steps stays 1600
    assert (meta["ss_max_train_steps"], meta["ss_num_epochs"]) == ("9", "3")
    meta = _metadata(num_epochs=3, max_train_steps=9)  # max_train_epochs unset: 9 steps at 3 per epoch
    assert (meta["ss_max_train_steps"], meta["ss_num_epochs"]) == ("9", "3")


def test_model_and_vae_names_leave_the_folders_out():
    """sd-scripts writes os.path.basename of an existing model / VAE path: a shared LoRA names no local folder."""
    meta = _metadata(model_path="/home/me/models/sd21-768v.safetensors", vae="/home/me/vae/kl-f8.safetensors")
    assert (meta["ss_sd_model_name"], meta["ss_vae_name"]) == ("sd21-768v.safetensors", "kl-f8.safetensors")


@pytest.mark.parametrize("overrides,expected", [
    ({"max_timestep": 900}, "0,900"), ({"min_timestep": 100}, "100,1000"),
    ({"min_timestep": 100, "max_timestep": 900}, "100,900"), ({}, None),
])
def test_timestep_range_fills_the_missing_end(overrides, expected):
    """train_util.get_sai_model_spec: (min_timestep or 0, max_timestep or 1000) when either is given, else none."""
    assert _metadata(**overrides).get("modelspec.timestep_range") == expected


def test_a_width_height_resolution_keeps_its_order():
    """sd-scripts reads --resolution 'width,height' into (width, height); ss_resolution = str(args.resolution),
    modelspec.resolution f"{w}x{h}"."""
    resolution = _resolution(load_train_config(overrides={"resolution": "64,128"}))
    assert resolution == (64, 128)
    meta = _metadata(resolution=resolution)
    assert (meta["ss_resolution"], meta["modelspec.resolution"]) == ("(64, 128)", "64x128")
