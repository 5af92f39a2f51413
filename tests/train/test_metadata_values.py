"""ss_* values that other tools key on, as sd-scripts writes them."""

from __future__ import annotations

import pytest

from lorakit.tools.concat import _is_v2
from lorakit.formats.modelspec import base_model_version


@pytest.mark.parametrize("kind,v,expected", [
    ("sd1", False, "sd_v1"), ("sd1", True, "sd_v1_v"), ("sd2", False, "sd_v2"), ("sd2", True, "sd_v2_v"),
    ("sdxl", False, "sdxl_base_v1-0"),
])
def test_base_model_version_is_sd_scripts_string(kind, v, expected):
    """model_util.get_model_version_str_for_sd1_sd2: "sd" + "_v2"/"_v1" + "_v" for v-prediction."""
    assert base_model_version(kind, v) == expected
    assert _is_v2({"ss_base_model_version": base_model_version(kind, v)}) == (kind == "sd2")


def _training_metadata(validation_dataset=None, resolution=(64, 64), dataset_values={}, model_path="m.safetensors",
                       **overrides):
    from types import SimpleNamespace

    from lorakit.train.config import load_train_config
    from lorakit.train.metadata import training_metadata
    from lorakit.train.optimizers import make_optimizer, optimizer_name
    import torch

    config = load_train_config(overrides=overrides)
    optimizer = make_optimizer(config.optimizer_type, [torch.nn.Parameter(torch.zeros(2))], config.learning_rate,
                               config.optimizer_args)
    dataset = SimpleNamespace(num_train_images=1, num_reg_images=0, steps_per_epoch=1, tag_frequency={},
                              bucket_info={}, subsets=[], image_counts=[], **dataset_values)
    return training_metadata(config, kind="sd1", v_parameterization=False, dataset=dataset,
                             optimizer_name=optimizer_name(optimizer), num_epochs=1, max_train_steps=1,
                             session_id="s", started_at=0.0, model_path=model_path,
                             resolution=resolution, validation_dataset=validation_dataset)


def test_a_dataset_at_its_metadata_buckets_writes_sd_scripts_resolution_and_bucket_keys():
    """sd-scripts: ss_resolution is args.resolution ("None" when unset), ss_enable_bucket the dataset's (turned on
    for metadata buckets), modelspec.resolution the model's default."""
    meta = _training_metadata(resolution=None, dataset_values={"metadata_bucketed": [True]})
    assert (meta["ss_resolution"], meta["ss_enable_bucket"], meta["modelspec.resolution"]) == ("None", "True",
                                                                                               "512x512")
    meta = _training_metadata(dataset_values={"metadata_bucketed": [False]})
    assert (meta["ss_resolution"], meta["ss_enable_bucket"]) == ("(64, 64)", "False")


@pytest.mark.parametrize("overrides,expected", [
    ({"optimizer_args": ["weight_decay=0.01", "betas=0.9,0.99"]},
     "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))"),
    ({}, "torch.optim.adamw.AdamW"),
    ({"optimizer_type": "SGDNesterov", "learning_rate": 1e-2}, "torch.optim.sgd.SGD(momentum=0.9)"),
    ({"optimizer_type": "Adafactor"}, "transformers.optimization.Adafactor(relative_step=True)"),
    ({"optimizer_type": "Adafactor", "optimizer_args": ["relative_step=False", "warmup_init=True"]},
     "transformers.optimization.Adafactor(relative_step=True,warmup_init=True)"),
])
def test_ss_optimizer_is_written_as_sd_scripts_writes_it(overrides, expected):
    """train_util.get_optimizer: ",".join(f"{k}={v}") of the kwargs it passed, with its own additions (momentum for
    SGDNesterov, relative_step for Adafactor)."""
    assert _training_metadata(**overrides)["ss_optimizer"] == expected


def test_relative_step_adafactor_metadata_as_sd_scripts_rewrites_it():
    """get_optimizer sets learning_rate, unet_lr and text_encoder_lr to None and lr_scheduler to 'adafactor:<lr>'."""
    meta = _training_metadata(optimizer_type="Adafactor", learning_rate=1e-3, unet_lr=1e-3, text_encoder_lr=1e-4)
    assert (meta["ss_learning_rate"], meta["ss_unet_lr"], meta["ss_text_encoder_lr"]) == ("None", "None", "None")
    assert meta["ss_lr_scheduler"] == "adafactor:0.001"
    meta = _training_metadata(optimizer_type="Adafactor", learning_rate=1e-3, optimizer_args=["relative_step=False"],
                              lr_scheduler="constant_with_warmup")
    assert (meta["ss_learning_rate"], meta["ss_lr_scheduler"]) == ("0.001", "constant_with_warmup")


def test_ss_total_batch_size_counts_the_processes(monkeypatch):
    """train_network.py: total_batch_size = train_batch_size * num_processes * gradient_accumulation_steps."""
    meta = _training_metadata(train_batch_size=2, gradient_accumulation_steps=3)
    assert (meta["ss_batch_size_per_device"], meta["ss_total_batch_size"]) == ("2", "6")
    import torch

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # a run under torchrun
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    assert _training_metadata(train_batch_size=2, gradient_accumulation_steps=3)["ss_total_batch_size"] == "12"


@pytest.mark.parametrize("overrides,expected", [
    ({}, ["False", "False", "1.0", "0", "None", "0.0", "None", "None", "None", "None"]),
    ({"mixed_precision": "bf16", "fp8_base": True, "fp8_base_unet": True, "huber_scale": 2.5, "validation_seed": 7,
      "validation_split": 0.25, "max_validation_steps": 4, "validate_every_n_epochs": 2, "validate_every_n_steps": 5,
      "resize_interpolation": "lanczos"}, ["True", "True", "2.5", "3", "7", "0.25", "4", "2", "5", "lanczos"]),
])
def test_fp8_huber_scale_validation_and_resize_interpolation_keys_as_sd_scripts_writes_them(overrides, expected):
    """train_network.py's metadata dict: bool(args.fp8_base), bool(args.fp8_base_unet), and str() of args.huber_scale,
    the validation options, resize_interpolation; ss_num_validation_images counts the held-out images (0 without)."""
    from types import SimpleNamespace

    held_out = SimpleNamespace(num_train_images=3) if overrides else None
    meta = _training_metadata(validation_dataset=held_out, **overrides)
    keys = ["ss_fp8_base", "ss_fp8_base_unet", "ss_huber_scale", "ss_num_validation_images", "ss_validation_seed",
            "ss_validation_split", "ss_max_validation_steps", "ss_validate_every_n_epochs",
            "ss_validate_every_n_steps", "ss_resize_interpolation"]
    assert [meta.get(k) for k in keys] == expected


def test_model_and_vae_file_hashes_and_names_as_sd_scripts_writes_them(tmp_path):
    """train_network.py: for a model file, ss_sd_model_hash (A1111's old model_hash: sha256 of the 64 KiB at 1 MiB,
    8 hex) and ss_new_sd_model_hash (the file's sha256); ss_vae_name and the VAE's two hashes only when a VAE is
    given; nothing for a name that is no file (a hub name, a demo)."""
    import hashlib
    import os

    model, vae = tmp_path / "model.safetensors", tmp_path / "vae.safetensors"
    model.write_bytes(os.urandom(0x100000 + 0x10000 + 100))
    vae.write_bytes(os.urandom(5000))  # under 1 MiB: the old hash of no bytes
    meta = _training_metadata(model_path=str(model))
    data = model.read_bytes()
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert not [k for k in meta if "vae" in k]
    meta = _training_metadata(model_path=str(model), vae=str(vae))
    assert meta["ss_vae_name"] == "vae.safetensors"
    assert (meta["ss_vae_hash"], meta["ss_new_vae_hash"]) == ("e3b0c442", hashlib.sha256(vae.read_bytes()).hexdigest())
    meta = _training_metadata(model_path="stabilityai/stable-diffusion-xl-base-1.0")
    assert not [k for k in meta if k.endswith("_hash")]


def test_flat_dataset_and_option_keys_carry_the_options_sd_scripts_writes_there():
    """train_network.py without a dataset config: ss_min_bucket_reso = args.min_bucket_reso, ss_max_bucket_reso =
    args.max_bucket_reso, ss_keep_tokens, ss_flip_aug, ss_color_aug, ss_shuffle_caption, ss_bucket_no_upscale from
    the same-named options, and str() of each copied option (ss_network_dim, ss_network_alpha, ...). Every value
    below differs from its default and from the others, so a key fed from the wrong option shows."""
    meta = _training_metadata(enable_bucket=True, min_bucket_reso=192, max_bucket_reso=1536, resolution="512",
                              keep_tokens=3, flip_aug=True, shuffle_caption=True, bucket_no_upscale=True,
                              network_dim=16, network_alpha=8, caption_tag_dropout_rate=0.25,
                              multires_noise_iterations=6, multires_noise_discount=0.4, min_snr_gamma=5)
    assert {k: meta[k] for k in ("ss_enable_bucket", "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_keep_tokens",
                                 "ss_flip_aug", "ss_color_aug", "ss_random_crop", "ss_shuffle_caption",
                                 "ss_bucket_no_upscale", "ss_network_dim", "ss_network_alpha",
                                 "ss_caption_tag_dropout_rate", "ss_multires_noise_iterations",
                                 "ss_multires_noise_discount", "ss_min_snr_gamma")} == {
        "ss_enable_bucket": "True", "ss_min_bucket_reso": "192", "ss_max_bucket_reso": "1536",
        "ss_keep_tokens": "3", "ss_flip_aug": "True", "ss_color_aug": "False", "ss_random_crop": "False",
        "ss_shuffle_caption": "True", "ss_bucket_no_upscale": "True", "ss_network_dim": "16",
        "ss_network_alpha": "8.0", "ss_caption_tag_dropout_rate": "0.25", "ss_multires_noise_iterations": "6",
        "ss_multires_noise_discount": "0.4", "ss_min_snr_gamma": "5.0"}


def test_modelspec_title_is_metadata_title_else_output_name_as_sd_scripts():
    """train_util.get_sai_model_spec: title = args.metadata_title if given, else args.output_name."""
    assert _training_metadata(output_name="purple")["modelspec.title"] == "purple"
    assert _training_metadata(output_name="purple", metadata_title="Purple LoRA")["modelspec.title"] == "Purple LoRA"


def test_progress_metadata_stamps_each_save_and_renames_it_when_given_a_title():
    """train_network.py's save: ss_epoch, ss_steps and ss_training_finished_at added to the training's metadata (a
    copy: the base is reused for the next save); a title, when given, replaces modelspec.title."""
    import time

    from lorakit.train.metadata import progress_metadata

    base = {"ss_network_dim": "4", "modelspec.title": "purple"}
    before = time.time()
    meta = progress_metadata(base, epoch=2, step=30)
    assert (meta["ss_epoch"], meta["ss_steps"], meta["modelspec.title"]) == ("2", "30", "purple")
    assert before <= float(meta["ss_training_finished_at"]) <= time.time()
    assert base == {"ss_network_dim": "4", "modelspec.title": "purple"}
    assert progress_metadata(base, epoch=2, step=30, title="purple-000002")["modelspec.title"] == "purple-000002"
