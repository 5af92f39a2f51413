"""kohya_ss GUI LoRA configs (.json): translated into the sd-scripts options that kohya_ss' train_model
(kohya_gui/lora_gui.py, 8a524c7) passes, after update_my_data (common_gui.py) has renamed older keys. The expected
values are derived by hand from that source; each test says which rule it checks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from lorakit.algos.options import OptionError
from lorakit.cli import main
from lorakit.train.config import load_train_config
from lorakit.train.kohya_ss_json import translate

ROOT = Path(__file__).resolve().parents[2]
MAGENTA = ROOT / "examples" / "data" / "magenta"  # 10_magenta: 24 images, 10 repeats


def gui(**changes) -> dict:
    """A LoRA tab config as the GUI saves it: every field present, strings where its textboxes hold them."""
    data = {
        "LoRA_type": "Standard", "LyCORIS_preset": "full", "adaptive_noise_scale": 0, "additional_parameters": "",
        "async_upload": False, "block_alphas": "", "block_dims": "", "block_lr_zero_threshold": "",
        "bucket_no_upscale": True, "bucket_reso_steps": 64, "bypass_mode": False, "cache_latents": True,
        "cache_latents_to_disk": False, "caption_dropout_every_n_epochs": 0, "caption_dropout_rate": 0,
        "caption_extension": ".txt", "clip_skip": 1, "color_aug": False, "constrain": 0, "conv_alpha": 1,
        "conv_block_alphas": "", "conv_block_dims": "", "conv_dim": 1, "dataset_config": "",
        "debiased_estimation_loss": False, "decompose_both": False, "dim_from_weights": False, "dora_wd": False,
        "down_lr_weight": "", "dynamo_backend": "no", "dynamo_mode": "default", "dynamo_use_dynamic": False,
        "dynamo_use_fullgraph": False, "enable_bucket": True, "epoch": 1, "extra_accelerate_launch_args": "",
        "factor": -1, "flip_aug": False, "flux1_checkbox": False, "fp8_base": False, "fp8_base_unet": False,
        "full_bf16": False, "full_fp16": False, "gpu_ids": "", "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False, "highvram": False, "huber_c": 0.1, "huber_schedule": "snr",
        "huggingface_path_in_repo": "", "huggingface_repo_id": "", "huggingface_repo_type": "",
        "huggingface_repo_visibility": "", "huggingface_token": "", "ip_noise_gamma": 0,
        "ip_noise_gamma_random_strength": False, "keep_tokens": 0, "learning_rate": 0.0001, "log_config": False,
        "log_tracker_config": "", "log_tracker_name": "", "log_with": "", "logging_dir": "", "loraplus_lr_ratio": 0,
        "loraplus_text_encoder_lr_ratio": 0, "loraplus_unet_lr_ratio": 0, "loss_type": "l2", "lowvram": False,
        "lr_scheduler": "cosine", "lr_scheduler_args": "", "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1,
        "lr_scheduler_type": "", "lr_warmup": 0, "main_process_port": 0, "masked_loss": False,
        "max_bucket_reso": 2048, "max_data_loader_n_workers": 0, "max_grad_norm": 1, "max_resolution": "512,512",
        "max_timestep": 1000, "max_token_length": 75, "max_train_epochs": 0, "max_train_steps": 1600,
        "mem_eff_attn": False, "metadata_author": "", "metadata_description": "", "metadata_license": "",
        "metadata_tags": "", "metadata_title": "", "mid_lr_weight": "", "min_bucket_reso": 256, "min_snr_gamma": 0,
        "min_timestep": 0, "mixed_precision": "fp16", "model_list": "custom", "module_dropout": 0,
        "multi_gpu": False, "multires_noise_discount": 0.3, "multires_noise_iterations": 0, "network_alpha": 1,
        "network_dim": 8, "network_dropout": 0, "network_weights": "", "noise_offset": 0,
        "noise_offset_random_strength": False, "noise_offset_type": "Original", "num_cpu_threads_per_process": 2,
        "num_machines": 1, "num_processes": 1, "optimizer": "AdamW", "optimizer_args": "", "output_dir": "",
        "output_name": "last", "persistent_data_loader_workers": False,
        "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5", "prior_loss_weight": 1,
        "random_crop": False, "rank_dropout": 0, "rank_dropout_scale": False, "reg_data_dir": "", "rescaled": False,
        "resume": "", "resume_from_huggingface": "", "sample_every_n_epochs": 0, "sample_every_n_steps": 0,
        "sample_prompts": "", "sample_sampler": "euler_a", "save_every_n_epochs": 1, "save_every_n_steps": 0,
        "save_last_n_steps": 0, "save_last_n_steps_state": 0, "save_model_as": "safetensors",
        "save_precision": "fp16", "save_state": False, "save_state_on_train_end": False,
        "save_state_to_huggingface": False, "scale_v_pred_loss_like_noise_pred": False, "scale_weight_norms": 0,
        "sdxl": False, "sdxl_cache_text_encoder_outputs": False, "sdxl_no_half_vae": False, "seed": 0,
        "shuffle_caption": False, "stop_text_encoder_training": 0, "text_encoder_lr": 0.0001,
        "train_batch_size": 1, "train_data_dir": "", "train_norm": False, "train_on_input": True,
        "training_comment": "", "unet_lr": 0.0001, "unit": 1, "up_lr_weight": "", "use_cp": False,
        "use_scalar": False, "use_tucker": False, "v2": False, "v_parameterization": False,
        "v_pred_like_loss": 0, "vae": "", "vae_batch_size": 0, "wandb_api_key": "", "wandb_run_name": "",
        "weighted_captions": False, "xformers": "xformers",
    }
    data.update(changes)
    return data


def write(tmp_path: Path, data: dict, name: str = "gui.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def test_standard_sd15_as_train_model_passes_it(tmp_path):
    """Standard -> networks.lora with no network_args (block fields empty); 0, False and "" left out (the TOML
    filter `value not in ["", False, None]`); learning_rate left out once unet_lr/text_encoder_lr are set;
    max_resolution -> resolution; xformers "xformers" -> xformers; seed 0 -> unset; wandb_run_name "" ->
    output_name; max_data_loader_n_workers passed even at 0; GUI/accelerate keys not passed."""
    out = translate(write(tmp_path, gui()), gui())
    assert out == {
        "bucket_no_upscale": True, "bucket_reso_steps": 64, "cache_latents": True, "caption_extension": ".txt",
        "clip_skip": 1, "dynamo_backend": "no", "enable_bucket": True, "huber_c": 0.1, "huber_schedule": "snr",
        "loss_type": "l2", "lr_scheduler": "cosine", "lr_scheduler_power": 1.0, "max_bucket_reso": 2048,
        "max_grad_norm": 1, "mixed_precision": "fp16", "network_alpha": 1, "network_dim": 8,
        "output_name": "last", "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5",
        "prior_loss_weight": 1, "sample_sampler": "euler_a", "save_model_as": "safetensors",
        "save_precision": "fp16", "train_batch_size": 1, "max_timestep": 1000, "save_every_n_epochs": 1,
        "network_module": "networks.lora", "network_args": [], "max_train_steps": 1600, "text_encoder_lr": 0.0001,
        "unet_lr": 0.0001, "resolution": "512,512", "optimizer_type": "AdamW", "optimizer_args": [],
        "lr_scheduler_args": [], "lr_scheduler_num_cycles": 1, "xformers": True, "min_bucket_reso": 256,
        "max_token_length": 75, "wandb_run_name": "last", "gradient_accumulation_steps": 1,
        "max_data_loader_n_workers": 0}


def test_sdxl_standard_unet_only_with_block_dims_and_multires(tmp_path, caplog):
    """SDXL: sdxl checkbox -> sdxl, sdxl_cache_text_encoder_outputs -> cache_text_encoder_outputs, sdxl_no_half_vae
    -> no_half_vae; text_encoder_lr 0 with unet_lr set -> network_train_unet_only; Standard's block fields pass
    in train_model's parameter order (down/mid/up lr weights, ..., conv_block_alphas, rank_dropout,
    module_dropout), only when set; Multires passes multires_* and no noise_offset; max_grad_norm 0 is left out
    (sd-scripts' 1.0 then applies: warned); sdpa; lr_warmup 10% of 1000 steps = 100."""
    data = gui(sdxl=True, sdxl_cache_text_encoder_outputs=True, sdxl_no_half_vae=True, text_encoder_lr=0,
               unet_lr=0.0002, block_dims="2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2",
               conv_block_dims="1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", mid_lr_weight="0.5",
               rank_dropout=0.1, noise_offset_type="Multires", noise_offset=0.05, multires_noise_iterations=8,
               multires_noise_discount=0.2, max_grad_norm=0, xformers="sdpa", lr_warmup=10, max_train_steps=1000,
               lr_scheduler="constant_with_warmup", max_resolution="1024,1024", min_bucket_reso=256,
               pretrained_model_name_or_path="sd_xl_base_1.0.safetensors")
    with caplog.at_level(logging.WARNING):
        out = translate(write(tmp_path, data), data)
    assert out["network_args"] == ["mid_lr_weight=0.5", "block_dims=2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2",
                                   "conv_block_dims=1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
                                   "rank_dropout=0.1"]
    assert out["sdxl"] is True and out["cache_text_encoder_outputs"] is True and out["no_half_vae"] is True
    assert out["network_train_unet_only"] is True and "network_train_text_encoder_only" not in out
    assert "text_encoder_lr" not in out and "learning_rate" not in out and out["unet_lr"] == 0.0002
    assert out["multires_noise_iterations"] == 8 and out["multires_noise_discount"] == 0.2
    assert "noise_offset" not in out and "max_grad_norm" not in out
    assert out["sdpa"] is True and "xformers" not in out
    assert out["lr_warmup_steps"] == 100
    assert "max_grad_norm = 0 is left out" in caplog.text
    config = load_train_config(write(tmp_path, data))
    assert (config.max_grad_norm, config.sdxl, config.network_module, config.lr_warmup_steps) == \
        (1.0, True, "networks.lora", 100)


@pytest.mark.parametrize("lora_type, fields, module, args", [
    ("Kohya LoCon", dict(conv_dim=4, conv_alpha=2, module_dropout=0.1), "networks.lora",
     ["conv_dim=4", "conv_alpha=2", "module_dropout=0.1"]),
    ("Kohya DyLoRA", dict(conv_dim=4, conv_alpha=2, unit=2), "networks.dylora",
     ["conv_dim=4", "conv_alpha=2", "unit=2"]),
    ("LyCORIS/LoCon", dict(conv_dim=4, conv_alpha=2, use_tucker=True), "lycoris.kohya",
     ["preset=full", "conv_dim=4", "conv_alpha=2", "rank_dropout=0", "bypass_mode=False", "dora_wd=False",
      "module_dropout=0", "use_tucker=True", "use_scalar=False", "rank_dropout_scale=False", "algo=locon",
      "train_norm=False"]),
    ("LoCon", dict(conv_dim=4, conv_alpha=2), "lycoris.kohya",  # update_my_data: LoCon -> LyCORIS/LoCon
     ["preset=full", "conv_dim=4", "conv_alpha=2", "rank_dropout=0", "bypass_mode=False", "dora_wd=False",
      "module_dropout=0", "use_tucker=False", "use_scalar=False", "rank_dropout_scale=False", "algo=locon",
      "train_norm=False"]),
    ("LyCORIS/LoHa", dict(conv_dim=4, conv_alpha=2, dora_wd=True, LyCORIS_preset="attn-mlp"), "lycoris.kohya",
     ["preset=attn-mlp", "conv_dim=4", "conv_alpha=2", "rank_dropout=0", "bypass_mode=False", "dora_wd=True",
      "module_dropout=0", "use_tucker=False", "use_scalar=False", "rank_dropout_scale=False", "algo=loha",
      "train_norm=False"]),
    ("LyCORIS/LoKr", dict(conv_dim=8, conv_alpha=4, factor=8, use_cp=True, use_scalar=True,
                          rank_dropout=0.1, rank_dropout_scale=True), "lycoris.kohya",
     ["preset=full", "conv_dim=8", "conv_alpha=4", "rank_dropout=0.1", "bypass_mode=False", "dora_wd=False",
      "module_dropout=0", "factor=8", "use_cp=True", "use_scalar=True", "decompose_both=False",
      "rank_dropout_scale=True", "algo=lokr", "train_norm=False"]),
    ("LyCORIS/iA3", dict(train_on_input=False), "lycoris.kohya",
     ["preset=full", "conv_dim=1", "conv_alpha=1", "train_on_input=False", "algo=ia3"]),
    ("LyCORIS/Diag-OFT", dict(constrain=0.001, rescaled=True, network_dim=4), "lycoris.kohya",
     ["preset=full", "conv_dim=1", "conv_alpha=1", "module_dropout=0", "use_tucker=False", "use_scalar=False",
      "rank_dropout=0", "rank_dropout_scale=False", "constrain=0.001", "rescaled=True", "algo=diag-oft",
      "train_norm=False"]),
    ("LyCORIS/BOFT", dict(network_dim=4), "lycoris.kohya",
     ["preset=full", "conv_dim=1", "conv_alpha=1", "module_dropout=0", "use_tucker=False", "use_scalar=False",
      "rank_dropout=0", "rank_dropout_scale=False", "constrain=0", "rescaled=False", "algo=boft",
      "train_norm=False"]),
    ("LyCORIS/GLoRA", dict(conv_dim=4, conv_alpha=2), "lycoris.kohya",
     ["preset=full", "conv_dim=4", "conv_alpha=2", "rank_dropout=0", "module_dropout=0",
      "rank_dropout_scale=False", "algo=glora", "train_norm=False"]),
    ("LyCORIS/DyLoRA", dict(conv_dim=4, conv_alpha=2, unit=4), "lycoris.kohya",
     ["preset=full", "conv_dim=4", "conv_alpha=2", "use_tucker=False", "block_size=4", "rank_dropout=0",
      "module_dropout=0", "algo=dylora", "train_norm=False"]),
    ("LyCORIS/Native Fine-Tuning", dict(train_norm=True), "lycoris.kohya",
     ["preset=full", "rank_dropout=0", "module_dropout=0", "use_tucker=False", "use_scalar=False",
      "rank_dropout_scale=False", "algo=full", "train_norm=True"]),
])
def test_lora_types_give_the_network_kohya_ss_passes(tmp_path, lora_type, fields, module, args):
    """Each LoRA_type's network_module and network_args, as train_model's f-strings write them (Python's str of
    each value, quotes stripped, split at whitespace); lorakit then accepts the configuration."""
    data = gui(LoRA_type=lora_type, max_resolution="64", min_bucket_reso=64, **fields)
    out = translate(write(tmp_path, data), data)
    assert (out["network_module"], out["network_args"]) == (module, args)
    config = load_train_config(write(tmp_path, data))
    config.network_kwargs()  # the network options parse
    assert config.network_args == tuple(args)


def test_empty_lycoris_fields_are_unset_and_take_the_gui_default(tmp_path):
    """A field saved as "" (an empty textbox: rank_dropout, module_dropout, conv_dim, factor) is unset, as the docs
    say of these files: its network_arg takes the GUI's default instead of reaching the network as 'rank_dropout='."""
    data = gui(LoRA_type="LyCORIS/LoKr", max_resolution="64", min_bucket_reso=64, rank_dropout="", module_dropout="",
               conv_dim="", factor="", network_dim=4)
    out = translate(write(tmp_path, data), data)
    assert {"rank_dropout=0", "module_dropout=0.0", "conv_dim=1", "factor=-1"} <= set(out["network_args"])
    load_train_config(write(tmp_path, data)).network_kwargs()


def test_lr_warmup_percent_of_steps_counted_from_the_image_folders(tmp_path):
    """max_train_steps 0: train_model counts images (.jpg/.jpeg/.png/.webp, any case) x the folder's leading
    repeat count, folders without one skipped: 10*3 + 5*3 = 45; / batch 2 / accumulation 1 x 3 epochs x 2 (a
    reg_data_dir doubles it) = 135 steps; lr_warmup 5% -> round(6.75) = 7."""
    data_dir = tmp_path / "img"
    for folder, files in (("10_cat", ["a.png", "b.JPG", "c.webp", "a.txt"]), ("5_dog", ["d.jpeg", "e.png", "f.WEBP"]),
                          ("misc", ["g.png"])):
        (data_dir / folder).mkdir(parents=True)
        for name in files:
            (data_dir / folder / name).write_bytes(b"")
    (tmp_path / "reg").mkdir()
    data = gui(train_data_dir=str(data_dir), reg_data_dir=str(tmp_path / "reg"), max_train_steps=0, epoch=3,
               train_batch_size=2, lr_warmup=5)
    out = translate(write(tmp_path, data), data)
    assert (out["max_train_steps"], out["lr_warmup_steps"]) == (135, 7)
    # the command line's max_train_steps is the total the percentage applies to, as the GUI field would be
    config = load_train_config(write(tmp_path, data), ["--max_train_steps", "20"])
    assert (config.max_train_steps, config.lr_warmup_steps) == (20, 1)
    # gradient accumulation 2 and no reg folder: 45 / 2 / 2 * 3 = 33.75 -> 34; 5% -> round(1.7) = 2
    data.update(reg_data_dir="", gradient_accumulation_steps=2)
    out = translate(write(tmp_path, data), data)
    assert (out["max_train_steps"], out["lr_warmup_steps"]) == (34, 2)


def test_magenta_demo_folder_counts_as_in_kohya_ss(tmp_path):
    """examples/data/magenta: 24 images x 10 repeats = 240; batch 8, 2 epochs -> 60 steps; 10% -> 6."""
    data = gui(train_data_dir=str(MAGENTA), max_train_steps=0, epoch=2, train_batch_size=8, lr_warmup=10)
    out = translate(write(tmp_path, data), data)
    assert (out["max_train_steps"], out["lr_warmup_steps"]) == (60, 6)


def test_dataset_config_skips_the_count(tmp_path):
    """With dataset_config and max_train_steps 0, kohya_ss counts nothing: no max_train_steps (sd-scripts' 1600)
    and no warmup; with max_train_steps set, the warmup is its percentage."""
    dataset = tmp_path / "dataset.toml"
    dataset.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n", encoding="utf-8")
    data = gui(dataset_config=str(dataset), max_train_steps=0, lr_warmup=10)
    out = translate(write(tmp_path, data), data)
    assert "max_train_steps" not in out and "lr_warmup_steps" not in out
    data["max_train_steps"] = 55
    assert translate(write(tmp_path, data), data)["lr_warmup_steps"] == 6  # round(5.5) = 6 (to even)


def test_older_file_with_deprecated_keys(tmp_path, caplog):
    """An early LoRA tab file (kohya_ss' presets/lora/lion_optimizer.json shape): no LoRA_type (Standard), numbers
    as strings, use_8bit_adam without optimizer (-> AdamW8bit), lora_network_weights (-> network_weights),
    use_wandb "True" (-> log_with wandb), xformers true (-> "xformers"), lr_scheduler_num_cycles "" (-> 1),
    save_model_as "diffusers" (-> safetensors), conv_dims (no longer read), stop_text_encoder_training_pct (a
    presets' older name, never read)."""
    old = {
        "pretrained_model_name_or_path": "demo:tiny-sd", "v2": False, "v_parameterization": False,
        "logging_dir": "", "train_data_dir": "", "reg_data_dir": "", "output_dir": str(tmp_path / "out"),
        "max_resolution": "64,64", "learning_rate": "0.00003333", "lr_scheduler": "cosine", "lr_warmup": "0",
        "train_batch_size": 8, "epoch": "1", "save_every_n_epochs": "1", "mixed_precision": "no",
        "save_precision": "fp16", "seed": "1234", "num_cpu_threads_per_process": 2, "cache_latents": False,
        "caption_extension": "", "enable_bucket": False, "gradient_checkpointing": False, "full_fp16": False,
        "no_token_padding": False, "stop_text_encoder_training": 0, "use_8bit_adam": True, "xformers": True,
        "save_model_as": "diffusers", "shuffle_caption": False, "save_state": False, "resume": "",
        "prior_loss_weight": 1.0, "text_encoder_lr": "0.000016666", "unet_lr": "0.00003333", "network_dim": 128,
        "lora_network_weights": "old.safetensors", "color_aug": False, "flip_aug": False, "clip_skip": "2",
        "gradient_accumulation_steps": 1.0, "mem_eff_attn": False, "output_name": "mrtmcfl_v2.0",
        "model_list": "runwayml/stable-diffusion-v1-5", "max_token_length": "75", "max_train_epochs": "",
        "max_data_loader_n_workers": "0", "network_alpha": 128, "training_comment": "", "keep_tokens": "0",
        "lr_scheduler_num_cycles": "", "lr_scheduler_power": "", "persistent_data_loader_workers": False,
        "bucket_no_upscale": True, "random_crop": True, "bucket_reso_steps": 64.0,
        "caption_dropout_every_n_epochs": 0.0, "caption_dropout_rate": 0.1, "use_wandb": "True",
        "conv_dims": "", "max_train_steps": "100", "stop_text_encoder_training_pct": 0,
    }
    with caplog.at_level(logging.INFO):
        out = translate(write(tmp_path, old), old)
    assert out["optimizer_type"] == "AdamW8bit" and out["network_weights"] == "old.safetensors"
    assert out["log_with"] == "wandb" and out["xformers"] is True and out["save_model_as"] == "safetensors"
    assert out["lr_scheduler_num_cycles"] == 1 and out["lr_scheduler_power"] == 1.0 and out["seed"] == 1234
    assert out["clip_skip"] == 2 and out["max_train_steps"] == 100 and out["network_module"] == "networks.lora"
    assert out["text_encoder_lr"] == pytest.approx(0.000016666) and "learning_rate" not in out
    assert "max_train_epochs" not in out and out["max_data_loader_n_workers"] == 0
    assert "'conv_dims' ignored" in caplog.text and "'no_token_padding' ignored" in caplog.text
    assert "not a field" not in caplog.text  # every key of the old file is known
    config = load_train_config(write(tmp_path, old))
    assert (config.gradient_accumulation_steps, config.bucket_reso_steps, config.resolution) == (1, 64, (64, 64))


def test_learning_rate_alone_and_text_encoder_alone(tmp_path):
    """Both group lrs 0: learning_rate passes and both parts train; unet_lr 0 alone: text encoder only."""
    data = gui(text_encoder_lr=0, unet_lr=0, learning_rate=0.0003)
    out = translate(write(tmp_path, data), data)
    assert out["learning_rate"] == 0.0003 and "unet_lr" not in out and "network_train_unet_only" not in out
    data = gui(text_encoder_lr=0.0001, unet_lr=0)
    out = translate(write(tmp_path, data), data)
    assert out["network_train_text_encoder_only"] is True and "learning_rate" not in out


def test_noise_options_follow_noise_offset_type(tmp_path):
    """Original passes noise_offset, its random strength and adaptive_noise_scale, not multires_*."""
    data = gui(noise_offset=0.1, adaptive_noise_scale=0.01, noise_offset_random_strength=True,
               multires_noise_iterations=6, ip_noise_gamma=0.1)
    out = translate(write(tmp_path, data), data)
    assert (out["noise_offset"], out["adaptive_noise_scale"], out["noise_offset_random_strength"]) == \
        (0.1, 0.01, True)
    assert "multires_noise_iterations" not in out and "multires_noise_discount" not in out
    assert out["ip_noise_gamma"] == 0.1


def test_strings_to_lists_prompts_metadata_loraplus(tmp_path):
    """optimizer_args / lr_scheduler_args: double quotes removed, split at whitespace; sample_prompts text ->
    {output_dir}/sample/prompt.txt; metadata_* and loraplus_* pass when set; huber loss fields pass."""
    data = gui(optimizer_args='weight_decay=0.1 "betas=0.9,0.99"', lr_scheduler_args="min_lr=1e-6",
               sample_prompts="a cat --w 64 --h 64\na dog", output_dir=str(tmp_path / "out"),
               sample_every_n_steps=50, metadata_title="T", metadata_tags="a,b", loraplus_lr_ratio=16,
               loss_type="huber", huber_schedule="exponential", huber_c=0.2)
    out = translate(write(tmp_path, data), data)
    assert out["optimizer_args"] == ["weight_decay=0.1", "betas=0.9,0.99"]
    assert out["lr_scheduler_args"] == ["min_lr=1e-6"]
    prompt = tmp_path / "out" / "sample" / "prompt.txt"
    assert out["sample_prompts"] == str(prompt) and prompt.read_text() == "a cat --w 64 --h 64\na dog"
    assert (out["metadata_title"], out["metadata_tags"], out["loraplus_lr_ratio"]) == ("T", "a,b", 16)
    assert (out["loss_type"], out["huber_schedule"], out["huber_c"], out["sample_every_n_steps"]) == \
        ("huber", "exponential", 0.2, 50)


def test_additional_parameters_then_command_line(tmp_path):
    """additional_parameters come after the JSON's values (kohya_ss appends them after --config_file); the
    command line comes last."""
    data = gui(additional_parameters='--max_grad_norm=0.5 --network_args "conv_dim=4" "conv_alpha=1" --flip_aug',
               max_resolution="64", min_bucket_reso=64)
    path = write(tmp_path, data)
    out = translate(path, data)
    assert (out["max_grad_norm"], out["network_args"], out["flip_aug"]) == ("0.5", ["conv_dim=4", "conv_alpha=1"], True)
    config = load_train_config(path, ["--max_grad_norm", "0.25", "--network_dim", "4"])
    assert (config.max_grad_norm, config.network_dim, config.flip_aug) == (0.25, 4, True)


def test_ignored_and_unknown_keys_are_reported_without_secrets(tmp_path, caplog):
    """Accelerate/GUI keys at info level; a key no kohya_ss version known here writes: a warning naming it; the
    wandb key's value never appears."""
    data = gui(wandb_api_key="SECRET-KEY-123", log_with="wandb", some_future_field=3)
    with caplog.at_level(logging.DEBUG):
        out = translate(write(tmp_path, data), data)
    assert out["wandb_api_key"] == "SECRET-KEY-123"
    assert "'num_processes' ignored" in caplog.text
    assert any(r.levelno == logging.WARNING and "'some_future_field'" in r.getMessage() for r in caplog.records)
    assert "SECRET-KEY-123" not in caplog.text


def test_print_config_shows_the_translation_and_hides_the_key(tmp_path, capsys):
    data = gui(max_resolution="64", min_bucket_reso=64, LoRA_type="LyCORIS/LoHa", conv_dim=4, conv_alpha=2,
               wandb_api_key="SECRET-KEY-123", max_train_steps=7)
    assert main(["train", "--config", str(write(tmp_path, data)), "--network_dim", "16", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert 'network_module = "lycoris.kohya"' in text and '"algo=loha"' in text and "network_dim = 16" in text
    assert 'resolution = "64,64"' in text and "max_train_steps = 7" in text
    assert "SECRET-KEY-123" not in text


@pytest.mark.parametrize("changes, message", [
    (dict(LoRA_type="Flux1"), r"'LoRA_type' = 'Flux1': lorakit does not train Flux.1 .*accepted: Kohya DyLoRA"),
    (dict(LoRA_type="LoRA-FA"), r"'LoRA_type' = 'LoRA-FA': lorakit does not train sd-scripts' networks.lora_fa"),
    (dict(LoRA_type="LyCORIS/Foo"), r"'LoRA_type' = 'LyCORIS/Foo': not a LoRA type .*LyCORIS/LoKr"),
    (dict(flux1_checkbox=True), r"'flux1_checkbox' = True: lorakit does not train Flux.1"),
    (dict(max_train_steps=0, train_data_dir="/no/such/folder"),
     r"max_train_steps is 0.*train_data_dir, which = '/no/such/folder' is not a folder"),
    (dict(max_train_steps=0), r"max_train_steps is 0.*train_data_dir, which is empty"),
    (dict(additional_parameters="--network_dimm 4"), r"'additional_parameters' = '--network_dimm 4'.*network_dim"),
])
def test_errors_name_the_file_key_and_value(tmp_path, changes, message):
    path = write(tmp_path, gui(**changes))
    with pytest.raises(OptionError, match=message) as err:
        load_train_config(path)
    assert str(path) in str(err.value)


def test_other_json_is_refused(tmp_path):
    (tmp_path / "plain.json").write_text('{"network_dim": 4}')
    with pytest.raises(OptionError, match="plain.json: a JSON file that is not a kohya_ss GUI LoRA config"):
        load_train_config(tmp_path / "plain.json")
    (tmp_path / "broken.json").write_text('{"LoRA_type": ')
    with pytest.raises(OptionError, match="broken.json: not valid JSON"):
        load_train_config(tmp_path / "broken.json")
    dreambooth = {"max_resolution": "512,512", "epoch": 1, "learning_rate_te": 1e-5, "optimizer": "AdamW"}
    with pytest.raises(OptionError, match="not one of its LoRA tab"):
        load_train_config(write(tmp_path, dreambooth, "db.json"))


def test_gui_json_trains_end_to_end(tmp_path, monkeypatch):
    """`lorakit train --config gui.json` on demo:tiny-sd and the magenta images: 2 steps, a LoRA file saved with
    the GUI's network (LyCORIS/LoCon through lycoris.kohya) in its metadata."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data_dir = tmp_path / "data"
    shutil.copytree(MAGENTA, data_dir)
    data = gui(LoRA_type="LyCORIS/LoCon", LyCORIS_preset="attn-mlp", conv_dim=2, conv_alpha=1, network_dim=4,
               network_alpha=4, pretrained_model_name_or_path="demo:tiny-sd", train_data_dir=str(data_dir),
               output_dir=str(tmp_path / "out"), output_name="gui", max_resolution="64,64", min_bucket_reso=64,
               max_bucket_reso=128, mixed_precision="no", save_precision="float", xformers="none",
               optimizer="AdamW", max_train_steps=2, train_batch_size=2, lr_scheduler="constant", seed=1,
               cache_latents=False, sample_prompts="a magenta circle --w 64 --h 64")
    path = write(tmp_path, data)
    assert main(["train", "--config", str(path)]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "gui.safetensors"), "pt") as f:
        meta = f.metadata()
        assert any(key.startswith("lora_unet_") for key in f.keys())
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_max_train_steps"] == "2"
    assert json.loads(meta["ss_network_args"])["algo"] == "locon"


def test_sdxl_only_checkboxes_are_ignored_without_sdxl(tmp_path):
    """train_model passes no_half_vae and cache_text_encoder_outputs only with the sdxl checkbox ("True if sdxl
    and sdxl_no_half_vae else None"): a stale tick in an SD1 config does not reach sd-scripts."""
    data = gui(sdxl=False, sdxl_cache_text_encoder_outputs=True, sdxl_no_half_vae=True)
    out = translate(write(tmp_path, data), data)
    assert "no_half_vae" not in out and "cache_text_encoder_outputs" not in out and "sdxl" not in out


def test_use_wandb_checkbox_true_logs_with_wandb(tmp_path):
    """update_my_data turns use_wandb "True" into log_with = "wandb"; a file holding the checkbox as a JSON true
    means the same (the module's documented reading), and a false one adds nothing."""
    data = gui(use_wandb=True)
    assert translate(write(tmp_path, data), data)["log_with"] == "wandb"
    data = gui(use_wandb=False)
    assert "log_with" not in translate(write(tmp_path, data), data)
