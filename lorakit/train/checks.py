"""The combinations of training options that cannot work, refused before any model loads; and the few rewrites
sd-scripts applies to what it reads (old spellings, 0 meaning off). sd-scripts' own checks are marked with where
they live there (train_util.verify_training_args, train_network.py, sdxl_train_util.verify_sdxl_training_args,
train_util.get_optimizer / get_scheduler_fix, the datasets); the rest are the obvious ones it leaves to a crash or
to silence."""

from __future__ import annotations

import logging
import os
from typing import Any

from ..algos.options import OptionError, suggest_spelling
from .options import NOT_YET_SUPPORTED, BY_NAME, inert

log = logging.getLogger(__name__)

OPTIMIZERS = ("AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit",
              "PagedLion8bit", "SGDNesterov", "SGDNesterov8bit", "DAdaptation", "DAdaptAdamPreprint", "DAdaptAdaGrad",
              "DAdaptAdam", "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD", "Prodigy", "Adafactor",
              "AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree")


# the 'adafactor' schedule reports Adafactor's own step size; without one it would set the lr to 0 (sd-scripts fails on
# it: get_scheduler_fix reads the initial lr from "adafactor:<lr>", which only a relative-step Adafactor writes)
ADAFACTOR_SCHEDULE_WITHOUT_RELATIVE_STEP = (
    "lr_scheduler 'adafactor' needs an Adafactor with relative_step, and optimizer_args sets relative_step=False: "
    "that Adafactor steps with learning_rate, which the 'adafactor' schedule would set to 0; use another "
    "lr_scheduler (sd-scripts suggests 'constant_with_warmup') or remove relative_step=False from optimizer_args")

# D-Adaptation and Prodigy optimizers that raise at their first step when the parameter groups' lrs differ ("only
# supported for values of 0"); DAdaptAdaGrad, DAdaptAdan and DAdaptAdanIP step every group with the first group's lr
REFUSE_UNEQUAL_LRS = ("DAdaptation", "DAdaptAdamPreprint", "DAdaptAdam", "DAdaptLion", "DAdaptSGD", "Prodigy")


def unequal_lrs_message(optimizer_type: str, lrs: str) -> str:
    return (f"optimizer_type {optimizer_type} cannot train parameter groups at different learning rates ({lrs}): it "
            "raises at its first step; give them one learning rate (learning_rate, or unet_lr equal to "
            "text_encoder_lr) without LoRA+ ratios or block lr weights, or use DAdaptAdaGrad or DAdaptAdan, which "
            "step every group with the first group's learning rate")


# sd-scripts' is_text_encoder_output_cacheable: options that change a caption from step to step
_CHANGING_CAPTIONS = ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                      "caption_tag_dropout_rate", "token_warmup_step")


def _refuse(message: str):
    raise OptionError(message)


def _unsupported(values: dict[str, Any]) -> None:
    """Options lorakit does not implement yet: fine while they ask for nothing, then set to their default (so the
    resolved config does not carry values that do nothing)."""
    for name in NOT_YET_SUPPORTED:
        opt = BY_NAME[name]
        if inert(opt, values[name], values):
            values[name] = opt.default
        else:
            _refuse(f"option '{name}' = {values[name]!r}: an sd-scripts option lorakit does not support yet "
                    f"({opt.help}); remove it or set it to {opt.default!r}")


def _optimizer(values: dict[str, Any], given: frozenset) -> None:
    # train_util.get_optimizer: the old flags, and neither with optimizer_type
    old = [flag for flag, name in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")) if values[flag]]
    if len(old) > 1:
        _refuse("use_8bit_adam and use_lion_optimizer are both given: choose one optimizer_type")
    if old:
        if "optimizer_type" in given and values["optimizer_type"].strip():
            _refuse(f"{old[0]} and optimizer_type = {values['optimizer_type']!r} are both given: give optimizer_type")
        values["optimizer_type"] = "AdamW8bit" if old[0] == "use_8bit_adam" else "Lion"
        values["use_8bit_adam"] = values["use_lion_optimizer"] = False
    name = values["optimizer_type"].strip() or "AdamW"  # sd-scripts: "" means AdamW
    by_key = {o.lower(): o for o in OPTIMIZERS}
    if name.lower() in by_key:
        values["optimizer_type"] = by_key[name.lower()]
    elif name.lower() == "prodigyplusschedulefree":  # sd-scripts has no short name for it either
        _refuse(f"option 'optimizer_type': {name!r} is given by its class path: "
                "prodigyplus.ProdigyPlusScheduleFree (pip install prodigy-plus-schedule-free)")
    elif "." in name:
        values["optimizer_type"] = name  # a class path, imported when training starts
    else:
        from .optimizers import torch_optimizer_name  # imports torch: only for a name outside sd-scripts' list

        bare = torch_optimizer_name(name)
        if bare is None:
            _refuse(f"option 'optimizer_type': unknown optimizer {name!r}{suggest_spelling(name, by_key)}; use one "
                    f"of {', '.join(OPTIMIZERS)}, a torch.optim class name such as RAdam, or a class path such as "
                    "module.Class")
        values["optimizer_type"] = bare  # sd-scripts: a name without a dot is a torch.optim class


def _normalise(values: dict[str, Any]) -> None:
    """sd-scripts' own rewrites of what it reads."""
    if values["cache_latents_to_disk"] and not values["cache_latents"]:  # train_util.verify_training_args
        values["cache_latents"] = True
    if values["cache_text_encoder_outputs_to_disk"]:  # sdxl_train_network.py: the disk cache implies the cache
        values["cache_text_encoder_outputs"] = True
    for name in ("sample_every_n_steps", "sample_every_n_epochs", "save_every_n_steps", "save_every_n_epochs",
                 "save_last_n_steps", "save_last_n_epochs", "save_last_n_steps_state", "save_last_n_epochs_state",
                 "multires_noise_iterations", "min_snr_gamma"):
        if values[name] == 0:  # sd-scripts tests these for truth: 0 is "off" (and older GUIs write 0 for it)
            values[name] = None
    if values["vae_batch_size"] == 0:
        values["vae_batch_size"] = 1
    if values["max_token_length"] == 75:  # the GUI writes 75; sd-scripts reads it as the default length
        values["max_token_length"] = None


def _combinations(v: dict[str, Any]) -> None:
    def both(a, b, why):
        if v[a] and v[b]:
            _refuse(f"{a} and {b} cannot both be on: {why}")

    def needs(a, b, why):
        if v[a] and not v[b]:
            _refuse(f"{a} needs {b}: {why}")

    both("network_train_unet_only", "network_train_text_encoder_only", "together they train nothing")
    both("full_fp16", "full_bf16", "choose one training dtype")
    both("stop_text_encoder_training", "stop_text_encoder_training_pct", "give the stop as steps or as a percentage")
    if v["full_fp16"] and v["mixed_precision"] != "fp16":  # train_network.py
        _refuse(f"full_fp16 needs mixed_precision = 'fp16' (got {v['mixed_precision']!r})")
    if v["full_bf16"] and v["mixed_precision"] != "bf16":  # train_network.py
        _refuse(f"full_bf16 needs mixed_precision = 'bf16' (got {v['mixed_precision']!r})")
    torch_adam = v["optimizer_type"] in ("AdamW", "Adam", "torch.optim.AdamW", "torch.optim.Adam")
    if v["full_fp16"] and torch_adam and not any(str(a).split("=")[0].strip() == "eps" for a in v["optimizer_args"]):
        # torch's Adam keeps its state in the parameters' dtype: in fp16 eps = 1e-8 is 0, and a zero gradient (a
        # LoRA down factor's, while up is 0) makes the per-tensor step's first update 0/0 = NaN; the fused kernel
        # adds eps in fp32, but its fp16 squared-gradient state underflows to 0 for gradients below ~1e-2, and
        # m / (0 + 1e-8) steps are huge (100 steps of gradients 1e-6..1e-3: 800x the fp32 run's change)
        _refuse(f"full_fp16 with optimizer_type {v['optimizer_type']!r}: its default eps (1e-8) is 0 in fp16 and its "
                "squared-gradient state underflows there, so the adapter turns NaN or takes steps far too large; "
                "give optimizer_args = [\"eps=1e-4\"], use AdamW8bit (whose "
                "states are not fp16) or full_bf16, or leave full_fp16 off (mixed_precision fp16 trains fp32 adapters)")
    # the timesteps drawn are randint(min_timestep, max_timestep): the range must not be empty
    low = 0 if v["min_timestep"] is None else v["min_timestep"]
    high = 1000 if v["max_timestep"] is None else v["max_timestep"]
    if low >= high:
        _refuse(f"min_timestep ({low}) must be below max_timestep ({high}): timesteps are drawn from "
                "[min_timestep, max_timestep)")
    # the dataset refuses to cache latents of images that change every epoch (train_network.py)
    for aug in ("color_aug", "random_crop"):
        if v["cache_latents"] and v[aug]:
            _refuse(f"cache_latents (or cache_latents_to_disk) and {aug} cannot both be on: cached latents are "
                    f"encoded once, {aug} changes the image every epoch (flip_aug is fine)")
    if v["adaptive_noise_scale"] is not None and v["noise_offset"] is None:  # verify_training_args
        _refuse("adaptive_noise_scale needs noise_offset")
    needs("scale_v_pred_loss_like_noise_pred", "v_parameterization", "it rescales a v-prediction loss")
    both("v_pred_like_loss", "v_parameterization", "v_pred_like_loss adds a v-like term to an epsilon-prediction loss")
    if v["noise_offset_random_strength"] and v["noise_offset"] is None:  # 0 is fine: sd-scripts skips a 0 offset
        _refuse("noise_offset_random_strength needs noise_offset: it draws the strength from [0, noise_offset]")
    needs("ip_noise_gamma_random_strength", "ip_noise_gamma", "it draws the strength from [0, ip_noise_gamma]")
    needs("dim_from_weights", "network_weights", "the dims are read from that file")
    needs("cpu_offload_checkpointing", "gradient_checkpointing", "it moves what checkpointing stores")
    if len(v["base_weights_multiplier"]) > len(v["base_weights"]):
        _refuse(f"option 'base_weights_multiplier': {len(v['base_weights_multiplier'])} multiplier(s) for "
                f"{len(v['base_weights'])} base_weights file(s); give at most one per file, in the same order")
    for fp8 in ("fp8_base", "fp8_base_unet"):  # train_network.py
        if v[fp8] and v["mixed_precision"] == "no":
            _refuse(f"{fp8} needs mixed_precision = 'fp16' or 'bf16': the fp8 weights are cast up to that dtype")
    if v["fused_backward_pass"]:  # sdxl_train.py
        if v["optimizer_type"] != "Adafactor":
            _refuse(f"fused_backward_pass needs optimizer_type = 'Adafactor' (got {v['optimizer_type']!r}), as in "
                    "sd-scripts")
        if v["gradient_accumulation_steps"] > 1:
            _refuse(f"fused_backward_pass does not work with gradient_accumulation_steps > 1 (got "
                    f"{v['gradient_accumulation_steps']}): each gradient is used and freed during the backward pass")
    if v["sdxl"] and v["v2"]:  # sdxl_train_util.verify_sdxl_training_args
        _refuse("sdxl and v2 cannot both be on: a model is SD2 or SDXL")
    if v["network_dropout"] is not None and v["network_dropout"] >= 1:
        _refuse(f"option 'network_dropout': expected a value in [0, 1), got {v['network_dropout']}")
    if v["lr_scheduler"] == "adafactor" and v["optimizer_type"] != "Adafactor":  # train_util.get_scheduler_fix
        _refuse(f"lr_scheduler 'adafactor' needs optimizer_type Adafactor (got {v['optimizer_type']!r})")
    if v["lr_scheduler"] == "adafactor" and v["optimizer_type"] == "Adafactor" and not v["lr_scheduler_type"]:
        from .optimizers import adafactor_relative_step, parse_kwargs

        if not adafactor_relative_step(parse_kwargs(v["optimizer_args"])):
            _refuse(ADAFACTOR_SCHEDULE_WITHOUT_RELATIVE_STEP)
    if v["optimizer_type"] in REFUSE_UNEQUAL_LRS:
        lrs = _planned_lrs(v)
        if len(set(lrs.values())) > 1:
            _refuse(unequal_lrs_message(v["optimizer_type"], ", ".join(f"{k} {lr:g}" for k, lr in lrs.items())))
    if (v["lr_scheduler"] == "cosine_with_min_lr" and not v["lr_scheduler_type"] and v["lr_scheduler_min_lr_ratio"]
            is None and not any(arg.partition("=")[0].strip() == "min_lr" for arg in v["lr_scheduler_args"])):
        _refuse("lr_scheduler 'cosine_with_min_lr' needs lr_scheduler_min_lr_ratio (the lowest lr as a ratio of the "
                "initial one, e.g. 0.1) or lr_scheduler_args min_lr=...")
    if v["loss_type"] in ("huber", "smooth_l1") and v["huber_c"] <= 0:
        _refuse(f"huber_c must be above 0 for loss_type {v['loss_type']!r}")
    if v["persistent_data_loader_workers"] and v["max_data_loader_n_workers"] == 0:
        _refuse("persistent_data_loader_workers needs max_data_loader_n_workers >= 1 (there are no workers to keep; "
                "PyTorch's DataLoader refuses it)")
    if v["cache_text_encoder_outputs"]:  # sdxl_train_network.py and is_text_encoder_output_cacheable
        if not v["network_train_unet_only"]:
            _refuse("cache_text_encoder_outputs needs network_train_unet_only: text encoders whose outputs are "
                    "cached cannot train")
        for name in _CHANGING_CAPTIONS:
            if v[name]:
                _refuse(f"cache_text_encoder_outputs and {name} cannot both be on: cached captions never change")
    if v["cache_text_encoder_outputs_to_disk"] and v["enable_wildcard"]:
        _refuse("cache_text_encoder_outputs_to_disk and enable_wildcard cannot both be on: one file per image holds "
                "one caption's outputs")
    if v["face_crop_aug_range"] is not None:
        if v["face_crop_aug_range"][0] <= 0:
            _refuse(f"option 'face_crop_aug_range': expected two numbers 0 < low <= high, got "
                    f"{v['face_crop_aug_range']}")
        both("face_crop_aug_range", "cache_latents", "cached latents are encoded once, the face crop changes every "
             "step (sd-scripts silently caches the uncropped image)")
        both("face_crop_aug_range", "enable_bucket", "sd-scripts crops around faces only without buckets (it "
             "ignores the faces with them)")
    if v["in_json"] is not None and v["dataset_config"] is None:  # train_network.py: a fine-tuning dataset
        both("in_json", "reg_data_dir", "a fine-tuning dataset has no regularisation images")
        both("in_json", "cache_info", "cache_info caches image folders; the metadata JSON already lists the images")
    if v["enable_bucket"]:
        if v["min_bucket_reso"] > v["max_bucket_reso"]:
            _refuse(f"min_bucket_reso ({v['min_bucket_reso']}) is above max_bucket_reso ({v['max_bucket_reso']})")
        if v["resolution"] is not None and not (v["min_bucket_reso"] <= min(v["resolution"])
                                                and max(v["resolution"]) <= v["max_bucket_reso"]):
            _refuse(f"resolution {v['resolution']} must lie within min_bucket_reso ({v['min_bucket_reso']}) .. "
                    f"max_bucket_reso ({v['max_bucket_reso']}), as sd-scripts requires")
    if v["bucket_reso_steps"] % 32:  # sd-scripts: divisible by 64 (SD1/SD2) or 32 (SDXL); the model decides which
        _refuse(f"bucket_reso_steps ({v['bucket_reso_steps']}) must be divisible by 32 (SDXL) or 64 (SD1/SD2)")
    if v["validation_split"] >= 1:
        _refuse(f"validation_split ({v['validation_split']}) must be below 1: it is the share of images held out")
    if v["conditioning_data_dir"] is not None:
        needs("conditioning_data_dir", "masked_loss", "its images are loss masks (sd-scripts reads it only then)")
        both("conditioning_data_dir", "random_crop", "the mask must be cut where the image is (sd-scripts refuses it)")
    if v["masked_loss"] and v["dataset_config"] is None and v["dataset_class"] is None and not (
            v["conditioning_data_dir"] or v["alpha_mask"]):
        _refuse("masked_loss needs the masks: conditioning_data_dir (mask images) or alpha_mask (the images' alpha)")
    if v["dataset_class"] is not None:
        _dataset_class(v)
    if v["deepspeed"]:
        _deepspeed(v)
    if v["resume_from_huggingface"] and v["resume"]:
        from .hub import parse_hub_resume  # no huggingface_hub import: this only reads the string

        parse_hub_resume(v["resume"])


def _planned_lrs(v: dict[str, Any]) -> dict[str, float]:
    """The learning rates the trained adapters' groups get, as far as the options tell (network.
    optimizer_param_groups' rule for unet_lr, text_encoder_lr and the LoRA+ ratios; block lr weights are checked when
    the optimizer is built): {what: lr}, without the 0s (frozen) and the unset (the optimizer's own). A second
    text_encoder_lr counts where the options say SDXL, whose second text encoder trains at it (on SD1/SD2 it is
    unused; a checkpoint found to be SDXL only once loaded is checked when the optimizer is built)."""
    from .network_args import LORAPLUS_OPTIONS, network_kwargs

    te_lrs = v["text_encoder_lr"] if isinstance(v["text_encoder_lr"], tuple) else (v["text_encoder_lr"],)
    te_trained = not v["network_train_unet_only"]
    sides = {"unet_lr": (v["unet_lr"], "loraplus_unet_lr_ratio", not v["network_train_text_encoder_only"]),
             "text_encoder_lr": (te_lrs[0], "loraplus_text_encoder_lr_ratio", te_trained)}
    if v["sdxl"] and len(te_lrs) > 1:
        sides["second text_encoder_lr"] = (te_lrs[1], "loraplus_text_encoder_lr_ratio", te_trained)
    kwargs = network_kwargs(v["network_module"], v["network_args"], {name: v[name] for name in LORAPLUS_OPTIONS})
    lrs = {}
    for side, (lr, plus_option, trained) in sides.items():
        lr = v["learning_rate"] if lr is None else lr
        if not trained or not lr:
            continue
        lrs[side] = lr
        # sd-scripts' `side ratio or common ratio`: a side's 0 falls back to the common one
        ratio = float(kwargs.get(plus_option) or 0) or float(kwargs.get("loraplus_lr_ratio") or 0)
        if ratio not in (0, 1):
            lrs[f"{side} x LoRA+ ratio"] = lr * ratio
    return lrs


_DEEPSPEED_OPTIONS = ("zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
                      "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                      "fp16_master_weights_and_gradients")


def _deepspeed(v: dict[str, Any]) -> None:
    """What the DeepSpeed engine (train/deepspeed_engine.py) cannot do, refused before any model loads."""
    stage = v["zero_stage"]
    for kind in ("optimizer", "param"):
        device, path = v[f"offload_{kind}_device"], v[f"offload_{kind}_nvme_path"]
        if device == "nvme" and not path:
            _refuse(f"offload_{kind}_device = 'nvme' needs offload_{kind}_nvme_path (a folder on the NVMe drive)")
        if path and device != "nvme":
            _refuse(f"offload_{kind}_nvme_path is given but offload_{kind}_device is {device!r}, not 'nvme'")
    if v["offload_param_device"] and stage != 3:
        _refuse(f"offload_param_device needs zero_stage 3 (got {stage}): only stage 3 partitions the parameters")
    if v["offload_optimizer_device"] == "nvme" and stage != 3:
        _refuse(f"offload_optimizer_device 'nvme' needs zero_stage 3 (got {stage}), as DeepSpeed requires")
    if v["offload_optimizer_device"] and stage == 0:
        _refuse("offload_optimizer_device needs zero_stage 1, 2 or 3: stage 0 keeps the optimizer as it is")
    if v["fp16_master_weights_and_gradients"] and not (v["mixed_precision"] == "fp16" and stage == 2
                                                       and v["offload_optimizer_device"] == "cpu"):
        _refuse("fp16_master_weights_and_gradients needs mixed_precision 'fp16', zero_stage 2 and "
                "offload_optimizer_device 'cpu': DeepSpeed supports it only there")
    if stage >= 1 and v["optimizer_type"].lower() == "adafactor":
        _refuse(f"optimizer_type Adafactor cannot train with DeepSpeed zero_stage {stage}: ZeRO hands the optimizer "
                "flat 1-D slices of the weights, and Adafactor factors its statistics by each weight's 2-D shape; "
                "use zero_stage 0 or another optimizer")
    if schedule_free(v["optimizer_type"]):
        _refuse(f"deepspeed and optimizer_type {v['optimizer_type']} cannot both be on: a schedule-free optimizer "
                "swaps the weights it holds between train and eval mode, and under DeepSpeed those are the engine's "
                "master copies, not the weights lorakit samples with and saves")
    for name, why in (("fused_backward_pass", "the engine steps the optimizer itself"),
                      ("scale_weight_norms", "the rescale would edit the weights behind the optimizer's fp32 master "
                                             "copy, which the next step writes back"),
                      ("torch_compile", "lorakit does not compile the models a DeepSpeed engine holds")):
        if v[name]:
            _refuse(f"deepspeed and {name} cannot both be on: {why}")
    if stage == 3:
        for fp8 in ("fp8_base", "fp8_base_unet"):
            if v[fp8]:
                _refuse(f"{fp8} does not work with zero_stage 3: the engine partitions and casts the U-Net weights")


def _dataset_class(v: dict[str, Any]) -> None:
    """dataset_class replaces the image folders; what needs them cannot be on."""
    name = v["dataset_class"]
    for source in ("train_data_dir", "reg_data_dir", "dataset_config", "in_json"):
        if v[source] is not None:  # sd-scripts ignores them silently; two data sources is a mistake
            _refuse(f"dataset_class ({name!r}) and {source} are both given: the class serves all the batches "
                    f"(sd-scripts ignores {source}); remove one")
    if v["cache_latents"]:  # train_network.py asserts is_latent_cacheable(), which MinimalDataset makes False
        _refuse(f"dataset_class ({name!r}) and cache_latents (or cache_latents_to_disk) cannot both be on: the "
                "class's batches cannot be cached (sd-scripts' MinimalDataset.is_latent_cacheable() is False); "
                "let the class return 'latents' instead")
    if v["cache_text_encoder_outputs_to_disk"]:
        _refuse(f"dataset_class ({name!r}) and cache_text_encoder_outputs_to_disk cannot both be on: the files are "
                "written next to image files, and the class has none (cache_text_encoder_outputs keeps them in "
                "memory and works)")
    if v["validation_split"] > 0:  # sd-scripts: no validation dataset for an arbitrary dataset class
        _refuse(f"dataset_class ({name!r}) and validation_split cannot both be on: the class's batches cannot be "
                "split; sd-scripts has no validation for a dataset_class either")


# options only the image-folder datasets read: a dataset_class makes its own batches without them
_FOLDER_ONLY = ("train_batch_size", "prior_loss_weight", "caption_extension", "shuffle_caption", "keep_tokens",
                "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "color_aug",
                "flip_aug", "random_crop", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                "bucket_no_upscale", "caption_separator", "keep_tokens_separator", "secondary_separator",
                "enable_wildcard", "caption_prefix", "caption_suffix", "token_warmup_min", "token_warmup_step",
                "face_crop_aug_range", "dataset_repeats", "alpha_mask", "conditioning_data_dir", "cache_info",
                "resize_interpolation", "skip_image_resolution", "vae_batch_size")


# train_network.py reads the images from the dataset config alone and warns that these are ignored
_IGNORED_WITH_DATASET_CONFIG = ("train_data_dir", "reg_data_dir", "in_json")


def sdxl_clip_skip_note(clip_skip: int) -> str:
    """The note on a clip_skip above 1 for SDXL: from the config when it says sdxl, else from the run."""
    return f"clip_skip = {clip_skip} does nothing for SDXL (sd-scripts ignores it too)"


def _warnings(v: dict[str, Any]) -> list[str]:
    """Allowed but probably not meant: sd-scripts warns of (or silently ignores) these."""
    notes = []
    ignored = [name for name in _IGNORED_WITH_DATASET_CONFIG if v["dataset_config"] is not None and v[name]]
    if ignored:  # kohya_ss' GUI and LyCORIS' example configs set train_data_dir next to dataset_config
        notes.append(f"ignoring the following options because config file is found: {', '.join(ignored)} (the "
                     f"images come from dataset_config {v['dataset_config']}, as in sd-scripts)")
    if v["v2"] and v["clip_skip"] is not None and v["clip_skip"] > 1:
        notes.append("v2 with clip_skip: SD2 models were not trained with clip_skip")
    if v["sdxl"] and v["clip_skip"] is not None and v["clip_skip"] > 1:  # sd-scripts warns too, and goes on
        notes.append(sdxl_clip_skip_note(v["clip_skip"]))
    if v["zero_terminal_snr"] and not v["v_parameterization"]:
        notes.append("zero_terminal_snr without v_parameterization: training will be unexpected (sd-scripts)")
    scheduler = "lr_scheduler_type" if v["lr_scheduler_type"] else v["lr_scheduler"]
    unused = [f"{name} = {v[name]!r}" for name, off in (("lr_scheduler", "constant"), ("lr_warmup_steps", 0),
                                                      ("lr_scheduler_type", "")) if v[name] not in (off, None)]
    if schedule_free(v["optimizer_type"]) and unused:  # get_scheduler_fix gives it a dummy scheduler
        notes.append(f"optimizer_type {v['optimizer_type']} is schedule-free: {', '.join(unused)} unused, as in "
                     "sd-scripts (the lr stays learning_rate; its own warmup is optimizer_args warmup_steps=...)")
    for option, users in (("lr_decay_steps", ("warmup_stable_decay",)), ("lr_scheduler_timescale", ("inverse_sqrt",)),
                          ("lr_scheduler_min_lr_ratio", ("cosine_with_min_lr", "warmup_stable_decay"))):
        if v[option] not in (None, 0) and scheduler not in users:  # get_scheduler_fix passes them to these only
            notes.append(f"{option} is used by lr_scheduler {' or '.join(users)} only; unused with {scheduler}")
    if scheduler == "piecewise_constant" and v["lr_warmup_steps"]:  # get_scheduler_fix does not pass it
        notes.append(f"lr_warmup_steps ({v['lr_warmup_steps']}) is unused with lr_scheduler piecewise_constant, as in "
                     "sd-scripts: its step_rules give the whole curve")
    for option in ("optimizer_args", "lr_scheduler_args"):
        notes += _repeated_keys(option, v[option])
    if v["optimizer_type"] == "Adafactor":
        from .optimizers import parse_kwargs

        kwargs = parse_kwargs(v["optimizer_args"])
        if kwargs.get("warmup_init") and kwargs.get("relative_step", True) is False:  # train_util.get_optimizer
            notes.append("Adafactor: warmup_init=True needs relative_step; relative_step=True is used, as in "
                         "sd-scripts")
    if v["lr_scheduler_type"] and v["lr_scheduler"] != "constant":
        notes.append(f"lr_scheduler_type {v['lr_scheduler_type']!r} replaces lr_scheduler {v['lr_scheduler']!r}")
    if v["initial_step"] is not None and v["initial_epoch"] is not None:
        notes.append("initial_step and initial_epoch are both given: initial_step is used, as in sd-scripts")
    if v["skip_until_initial_step"] and v["initial_step"] is None and v["initial_epoch"] is None:
        notes.append("skip_until_initial_step without initial_step or initial_epoch skips nothing")
    if (v["sample_every_n_steps"] or v["sample_every_n_epochs"] or v["sample_at_first"]) and not v["sample_prompts"]:
        notes.append("sampling is asked for but sample_prompts is not given: no samples")
    if v["network_train_unet_only"] and v["text_encoder_lr"] is not None:
        notes.append("text_encoder_lr is unused with network_train_unet_only")
    if v["huggingface_repo_id"] and v["save_state_to_huggingface"] and not (v["save_state"]
                                                                           or v["save_state_on_train_end"]):
        notes.append("save_state_to_huggingface without save_state or save_state_on_train_end: no state to upload")
    if v["resume_from_huggingface"] and not v["resume"]:
        notes.append("resume_from_huggingface without resume: nothing is downloaded")
    if not v["deepspeed"]:
        unused = [name for name in _DEEPSPEED_OPTIONS if v[name] != BY_NAME[name].default]
        if unused:  # sd-scripts ignores them
            notes.append(f"{', '.join(unused)} unused without deepspeed")
    unused = [name for name in _FOLDER_ONLY if v["dataset_class"] is not None and v[name] != BY_NAME[name].default]
    if unused:  # sd-scripts ignores them silently
        notes.append(f"with dataset_class the class makes the batches: {', '.join(unused)} not used")
    return notes


def _repeated_keys(option: str, args) -> list[str]:
    """sd-scripts fills a dict from "key=value" arguments: a key given twice takes its last value."""
    seen: dict[str, str] = {}
    notes = []
    for arg in args:
        key, _, value = str(arg).partition("=")
        key, value = key.strip(), value.strip()
        if key in seen and seen[key] != value:
            notes.append(f"{option}: '{key}' given twice ({seen[key]}, then {value}); the last is used, as in "
                         "sd-scripts")
        seen[key] = value
    return notes


def check_datasets(v: dict[str, Any], group) -> None:
    """The same checks against each subset of a dataset_config (its values resolved: subset, dataset, general)."""
    subsets = [s for d in group.datasets for s in d.subsets]
    for d, dataset in enumerate(group.datasets):
        for s, subset in enumerate(dataset.subsets):
            where = f"dataset config [[datasets]] #{d + 1} [[datasets.subsets]] #{s + 1}"
            if subset.face_crop_aug_range is not None and (dataset.enable_bucket or v["cache_latents"]):
                _refuse(f"face_crop_aug_range (in {where}) cannot be used with "
                        f"{'enable_bucket' if dataset.enable_bucket else 'cache_latents'}: the face crop is done "
                        "per step and without buckets (as in sd-scripts)")
            if v["cache_text_encoder_outputs_to_disk"] and subset.enable_wildcard:
                _refuse(f"cache_text_encoder_outputs_to_disk and enable_wildcard (in {where}) cannot both be on: one "
                        "file per image holds one caption's outputs")
    if v["masked_loss"] and not any(s.conditioning_data_dir or s.alpha_mask for s in subsets):
        _refuse("masked_loss needs the masks: conditioning_data_dir (mask images) or alpha_mask in the dataset "
                "config's subsets")
    for d, dataset in enumerate(group.datasets):
        if dataset.bucket_reso_steps % 32:
            _refuse(f"dataset config [[datasets]] #{d + 1}: bucket_reso_steps ({dataset.bucket_reso_steps}) must be "
                    "divisible by 32 (SDXL) or 64 (SD1/SD2)")
        for s, subset in enumerate(dataset.subsets):
            where = f"dataset config [[datasets]] #{d + 1} [[datasets.subsets]] #{s + 1}"
            if subset.conditioning_data_dir is not None and not v["masked_loss"]:
                _refuse(f"conditioning_data_dir (in {where}) needs masked_loss: its images are loss masks")
            for aug in ("color_aug", "random_crop"):
                if v["cache_latents"] and getattr(subset, aug):
                    _refuse(f"cache_latents (or cache_latents_to_disk) and {aug} (in {where}) cannot both be on: "
                            f"cached latents are encoded once, {aug} changes the image every epoch")
            for name in _CHANGING_CAPTIONS:
                if v["cache_text_encoder_outputs"] and getattr(subset, name):
                    _refuse(f"cache_text_encoder_outputs and {name} (in {where}) cannot both be on: cached captions "
                            "never change")


def _refuse_all_zero_learning_rates(config) -> None:
    """Every trained part at lr 0 leaves no parameter to train (sd-scripts fails late, on an empty optimizer)."""
    def rates(value):
        value = config.learning_rate if value is None else value
        return list(value) if isinstance(value, (list, tuple)) else [value]

    used = {}
    if not config.network_train_text_encoder_only:
        used["unet_lr"] = rates(config.unet_lr)
    if not config.network_train_unet_only:
        used["text_encoder_lr"] = rates(config.text_encoder_lr)
    if used and all(r is not None and float(r) == 0 for values in used.values() for r in values):
        _refuse(f"every learning rate is 0 (learning_rate {config.learning_rate}, "
                f"{', '.join(f'{k} {getattr(config, k)}' for k in used)}): nothing would train; set learning_rate "
                "or the part's own rate above 0")


def check_runnable(config) -> None:
    """What training needs beyond a consistent config (--print-config does not): a model, data and a place to save."""
    missing = [name for name in ("pretrained_model_name_or_path", "output_dir") if getattr(config, name) is None]
    if config.dataset_class is None and config.train_data_dir is None and config.dataset_config is None \
            and config.in_json is None:
        missing.append("train_data_dir (or dataset_config, or dataset_class)")
    if config.dataset_config is None and config.dataset_class is None and config.in_json is None \
            and config.resolution is None:  # a fine-tuning JSON may hold each image's train_resolution instead
        missing.append("resolution")
    if missing:
        _refuse(f"training needs {', '.join(missing)}")
    _refuse_all_zero_learning_rates(config)
    prompts = config.sample_prompts
    if prompts is not None and not os.path.isfile(prompts):  # before the model loads and the caches fill
        _refuse(f"sample_prompts={prompts}: " + ("is a folder, expected a prompt file (.txt, .toml or .json)"
                                                  if os.path.isdir(prompts) else "no such file"))
    if not config.lr_scheduler_type and not schedule_free(config.optimizer_type):  # make_scheduler checks it again,
        refuse_warmup(config.lr_scheduler, config.lr_warmup_steps)  # but only after the model has loaded
    from .logger import missing_tracker_packages

    for message in missing_tracker_packages(config):  # before the model loads and the latents are cached
        _refuse(message)
    from .optimizers import check_optimizer_installed

    check_optimizer_installed(config.optimizer_type)  # the same: make_optimizer runs after both


def schedule_free(optimizer_type: str) -> bool:
    """sd-scripts' is_schedulefree_optimizer: the name (or class path) ends with ScheduleFree."""
    return optimizer_type.lower().endswith("schedulefree")


def refuse_warmup(scheduler: str, warmup) -> None:
    """sd-scripts' rule (get_scheduler_fix): the constant and adafactor schedules take no warmup. (piecewise_constant
    ignores it there, with a note in _warnings here.)"""
    if scheduler in ("constant", "adafactor") and warmup:
        hint = " (use 'constant_with_warmup')" if scheduler == "constant" else ""
        _refuse(f"lr_scheduler '{scheduler}' takes no warmup: lr_warmup_steps must be 0, got {warmup}{hint}")


def resolve(values: dict[str, Any], given: frozenset) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Every option's value, rewritten as sd-scripts reads it and checked; (values, warnings). Raises OptionError
    naming the options of an impossible combination."""
    values = dict(values)
    _unsupported(values)
    _optimizer(values, given)
    _normalise(values)
    _combinations(values)
    notes = _warnings(values)
    if values["dim_from_weights"]:  # sd-scripts ignores them silently
        notes += [f"{name} = {values[name]} is not used: dim_from_weights takes each module's dim and alpha from "
                  f"network_weights" for name in ("network_dim", "network_alpha") if name in given]
    if values["network_args"] or values["network_module"] != "lorakit":
        from .network_args import check_network_args  # loads the network code (and torch) only when needed

        notes += check_network_args(values, given)
    return values, tuple(notes)
