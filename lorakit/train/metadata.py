"""The ``ss_*`` metadata sd-scripts writes into every trained adapter (UIs and the civitai/A1111 info panels
read them), plus ``modelspec.*``. Values are strings, as safetensors metadata must be."""

from __future__ import annotations

import json
import logging
import os
import time

from ..formats.hashes import file_legacy_hash, file_sha256
from ..formats.modelspec import ModelSpecError, base_model_version, build_modelspec, thumbnail_data_url
from .network_args import ss_network_args

__all__ = ["training_metadata", "progress_metadata", "minimum_metadata"]
log = logging.getLogger(__name__)

# TrainConfig option -> ss_ key, copied as str(value) (sd-scripts' names; the rest are computed below).
_COPIED = {
    "learning_rate": "ss_learning_rate", "text_encoder_lr": "ss_text_encoder_lr", "unet_lr": "ss_unet_lr",
    "gradient_checkpointing": "ss_gradient_checkpointing",
    "gradient_accumulation_steps": "ss_gradient_accumulation_steps", "lr_scheduler": "ss_lr_scheduler",
    "network_dim": "ss_network_dim", "network_alpha": "ss_network_alpha", "network_dropout": "ss_network_dropout",
    "mixed_precision": "ss_mixed_precision", "full_fp16": "ss_full_fp16", "v2": "ss_v2", "clip_skip": "ss_clip_skip",
    "max_token_length": "ss_max_token_length", "cache_latents": "ss_cache_latents", "seed": "ss_seed",
    "lowram": "ss_lowram", "noise_offset": "ss_noise_offset", "multires_noise_iterations":
    "ss_multires_noise_iterations", "multires_noise_discount": "ss_multires_noise_discount",
    "adaptive_noise_scale": "ss_adaptive_noise_scale", "zero_terminal_snr": "ss_zero_terminal_snr",
    "training_comment": "ss_training_comment", "max_grad_norm": "ss_max_grad_norm",
    "caption_dropout_rate": "ss_caption_dropout_rate",
    "caption_dropout_every_n_epochs": "ss_caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate": "ss_caption_tag_dropout_rate", "face_crop_aug_range": "ss_face_crop_aug_range",
    "prior_loss_weight": "ss_prior_loss_weight", "min_snr_gamma": "ss_min_snr_gamma",
    "scale_weight_norms": "ss_scale_weight_norms", "ip_noise_gamma": "ss_ip_noise_gamma",
    "debiased_estimation_loss": "ss_debiased_estimation", "noise_offset_random_strength":
    "ss_noise_offset_random_strength", "ip_noise_gamma_random_strength": "ss_ip_noise_gamma_random_strength",
    "loss_type": "ss_loss_type", "huber_schedule": "ss_huber_schedule", "huber_c": "ss_huber_c",
    "max_train_steps": "ss_max_train_steps", "lr_warmup_steps": "ss_lr_warmup_steps",
    "network_module": "ss_network_module", "output_name": "ss_output_name", "huber_scale": "ss_huber_scale",
    "fp8_base": "ss_fp8_base", "fp8_base_unet": "ss_fp8_base_unet", "validation_seed": "ss_validation_seed",
    "validation_split": "ss_validation_split", "max_validation_steps": "ss_max_validation_steps",
    "validate_every_n_epochs": "ss_validate_every_n_epochs", "validate_every_n_steps": "ss_validate_every_n_steps",
    "resize_interpolation": "ss_resize_interpolation",
}


def training_metadata(config, *, kind: str, v_parameterization: bool, dataset, optimizer_name: str,
                      num_epochs: int, max_train_steps: int, session_id: str, started_at: float,
                      model_path: str, resolution: tuple[int, int] | None,
                      num_processes: int | None = None, validation_dataset=None) -> dict[str, str]:
    """Everything known when training starts (sd-scripts computes the same set before the loop).
    ``num_processes``: the processes training together (unset: the initialised process group's size, else 1).
    ``validation_dataset``: the images validation_split holds out, if any."""
    if num_processes is None:
        num_processes = _process_count()
    meta = {key: str(getattr(config, option)) for option, key in _COPIED.items()}
    given = ss_network_args(config.network_args, config.network_dropout, bool(config.dim_from_weights))
    if given is not None:  # sd-scripts: the args as given, no key without any
        meta["ss_network_args"] = given
    meta.update({
        "ss_session_id": session_id,
        "ss_training_started_at": str(started_at),
        "ss_max_train_steps": str(max_train_steps),
        "ss_num_train_images": str(dataset.num_train_images),
        "ss_num_reg_images": str(dataset.num_reg_images),
        "ss_num_validation_images": str(validation_dataset.num_train_images if validation_dataset else 0),
        "ss_num_batches_per_epoch": str(dataset.steps_per_epoch),
        "ss_num_epochs": str(num_epochs),
        "ss_batch_size_per_device": str(config.train_batch_size),
        # sd-scripts: train_batch_size * accelerator.num_processes * gradient_accumulation_steps
        "ss_total_batch_size": str(config.train_batch_size * num_processes * config.gradient_accumulation_steps),
        "ss_base_model_version": base_model_version(kind, v_parameterization),
        "ss_v2": str(kind == "sd2"),
        "ss_sd_model_name": os.path.basename(model_path),
        "ss_resolution": f"({resolution[0]}, {resolution[1]})" if resolution is not None else "None",
        "ss_tag_frequency": json.dumps(dataset.tag_frequency),
        "ss_bucket_info": json.dumps(dataset.bucket_info),
        # sd-scripts writes the dataset's: on for a fine-tuning dataset at its metadata's buckets
        "ss_enable_bucket": str(bool(config.enable_bucket) or any(getattr(dataset, "metadata_bucketed", ()))),
        "ss_min_bucket_reso": str(config.min_bucket_reso),
        "ss_max_bucket_reso": str(config.max_bucket_reso),
        "ss_keep_tokens": str(config.keep_tokens),
        "ss_flip_aug": str(config.flip_aug),
        "ss_color_aug": str(config.color_aug),
        "ss_random_crop": str(config.random_crop),
        "ss_shuffle_caption": str(config.shuffle_caption),
        "ss_bucket_no_upscale": str(config.bucket_no_upscale),
        "ss_dataset_dirs": json.dumps(_dataset_dirs(dataset, reg=False)),
        "ss_reg_dataset_dirs": json.dumps(_dataset_dirs(dataset, reg=True)),
    })
    meta.update(_model_file_keys("sd_model", model_path))
    if config.vae:  # sd-scripts: the VAE's keys only when one is given
        meta["ss_vae_name"] = os.path.basename(config.vae)
        meta.update(_model_file_keys("vae", config.vae))
    meta.update(_optimizer_metadata(config, optimizer_name))
    if config.dataset_config:
        # sd-scripts with a dataset config: each dataset's own settings in ss_datasets, not the command line's
        # (which the datasets override) in the flat keys
        for key in _PER_DATASET:
            meta.pop(key, None)
        meta["ss_datasets"] = json.dumps(dataset.datasets_metadata())
    title = config.metadata_title or config.output_name or "last"
    kind_key = "sd2-v" if kind == "sd2" and v_parameterization else kind
    meta.update(build_modelspec(
        kind_key, title=title, resolution=resolution, author=config.metadata_author or None,
        description=config.metadata_description or None, license=config.metadata_license or None,
        tags=config.metadata_tags or None, prediction_type="v" if v_parameterization else "epsilon",
        clip_skip=config.clip_skip, timestep_range=_timestep_range(config), **_modelspec_options(config)))
    return meta


def _modelspec_options(config) -> dict:
    """sd-scripts' newer metadata_* options (sai_model_spec.add_model_spec_arguments), which it writes as the
    modelspec.* key of the same name."""
    return {"usage_hint": config.metadata_usage_hint, "merged_from": config.metadata_merged_from,
            "trigger_phrase": config.metadata_trigger_phrase, "preprocessor": config.metadata_preprocessor,
            "is_negative_embedding": config.metadata_is_negative_embedding,
            "thumbnail": _thumbnail(config.metadata_thumbnail)}


def _thumbnail(value: str | None) -> str | None:
    """metadata_thumbnail as a data URL; None, with a warning, when it cannot be embedded: sd-scripts leaves a
    missing file out the same way (a thumbnail is not worth stopping a training for)."""
    if value is None:
        return None
    try:
        return thumbnail_data_url(value)
    except ModelSpecError as err:
        log.warning("metadata_thumbnail left out of the metadata: %s", err)
        return None


def _model_file_keys(kind: str, path) -> dict[str, str]:
    """sd-scripts' ss_<kind>_hash (A1111's old 8-hex model_hash) and ss_new_<kind>_hash (the file's sha256) of a
    model file; none for a folder, a demo or a hub name."""
    if not path or not os.path.isfile(path):
        return {}
    return {f"ss_{kind}_hash": file_legacy_hash(path), f"ss_new_{kind}_hash": file_sha256(path)}


def _process_count() -> int:
    import torch

    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _optimizer_metadata(config, optimizer_name: str) -> dict[str, str]:
    """ss_optimizer as sd-scripts writes it, `module.Class(k=v,...)` with the arguments its get_optimizer passed; and
    for a relative-step Adafactor what get_optimizer rewrites: the lrs it drops are None, the scheduler is
    'adafactor:<learning_rate>'."""
    from .optimizers import kohya_kwargs

    kwargs = kohya_kwargs(config.optimizer_type, config.optimizer_args)
    args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    meta = {"ss_optimizer": optimizer_name + (f"({args})" if args else "")}
    if config.optimizer_type.lower() == "adafactor" and kwargs["relative_step"]:
        meta.update({"ss_learning_rate": "None", "ss_unet_lr": "None", "ss_text_encoder_lr": "None",
                     "ss_lr_scheduler": f"adafactor:{config.learning_rate}"})
    return meta


# flat keys that describe the one dataset of a command-line run; a dataset config's datasets are in ss_datasets
_PER_DATASET = ("ss_batch_size_per_device", "ss_resolution", "ss_enable_bucket", "ss_min_bucket_reso",
                "ss_max_bucket_reso", "ss_keep_tokens", "ss_flip_aug", "ss_color_aug", "ss_random_crop",
                "ss_shuffle_caption", "ss_bucket_no_upscale", "ss_bucket_info", "ss_caption_dropout_rate",
                "ss_caption_dropout_every_n_epochs", "ss_caption_tag_dropout_rate", "ss_face_crop_aug_range")


# sd-scripts' train_util.SS_METADATA_MINIMUM_KEYS: what no_metadata still writes (with modelspec.*), so that UIs can
# tell the base model and the network
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")


def minimum_metadata(base: dict[str, str]) -> dict[str, str]:
    """What a save with ``no_metadata`` carries: sd-scripts' minimum keys and the modelspec, nothing about the data
    or the training."""
    return {k: v for k, v in base.items() if k in MINIMUM_KEYS or k.startswith("modelspec.")}


def progress_metadata(base: dict[str, str], *, epoch: int, step: int, title: str | None = None) -> dict[str, str]:
    """The per-save fields: sd-scripts stamps the epoch, the global step and the time of each save."""
    meta = dict(base)
    meta.update({"ss_epoch": str(epoch), "ss_steps": str(step), "ss_training_finished_at": str(time.time())})
    if title:
        meta["modelspec.title"] = title
    return meta


def _timestep_range(config):
    lo, hi = config.min_timestep, config.max_timestep
    return None if lo is None and hi is None else (lo or 0, hi if hi is not None else 1000)


def _dataset_dirs(dataset, reg: bool) -> dict[str, dict[str, int]]:
    """sd-scripts' ss_dataset_dirs / ss_reg_dataset_dirs: each subset's folder name, repeats and image count."""
    return {os.path.basename(os.path.normpath(subset.metadata_file or subset.image_dir)):
            {"n_repeats": subset.num_repeats, "img_count": count}
            for subset, count in zip(dataset.subsets, dataset.image_counts) if bool(subset.is_reg) == reg}
