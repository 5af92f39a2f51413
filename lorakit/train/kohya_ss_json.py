"""A kohya_ss GUI LoRA configuration (.json, written by the "LoRA" tab's Save/Save as button, and the presets under
kohya_ss' presets/lora/) -> the sd-scripts options lorakit reads, as kohya_ss itself turns it into sd-scripts'
command line and config TOML: `update_my_data` (kohya_gui/common_gui.py) first renames and retypes what older
versions saved, then `train_model` (kohya_gui/lora_gui.py) maps the GUI's fields. Read from kohya_ss 8a524c7.

What kohya_ss does that looks odd is kept, so that a shared file trains here as it trains there, and said in a
warning where it changes what the file seems to ask for: every 0, 0.0, False and "" is left out of the TOML (so
max_grad_norm = 0 clips at sd-scripts' 1.0), learning_rate is left out once unet_lr or text_encoder_lr is set,
the "stop text encoder training" percentage is ignored.

Keys a file leaves out (the presets hold only some) stay unset, so sd-scripts' defaults apply, except the few the
translation itself needs (LoRA_type, LyCORIS_preset, noise_offset_type and the LyCORIS fields that kohya_ss writes
into network_args), which take the GUI's own defaults.
"""

from __future__ import annotations

import logging
import math
import shlex
from pathlib import Path
from typing import Any, Mapping

from ..algos.options import OptionError
from .options import BY_NAME

log = logging.getLogger(__name__)

# keys only the GUI writes: no other sd-scripts config has them
_GUI_MARKERS = ("LoRA_type", "max_resolution", "epoch", "optimizer", "lr_warmup", "LyCORIS_preset",
                "noise_offset_type", "additional_parameters", "sdxl_no_half_vae", "lora_network_weights")
_NETWORK_MARKERS = ("LoRA_type", "network_dim", "network_alpha", "lora_network_weights", "network_weights")

# accelerate launch settings, GUI state, and keys that train_model reads to compute others or never passes
IGNORED = {
    **dict.fromkeys(("num_cpu_threads_per_process", "num_processes", "num_machines", "multi_gpu", "gpu_ids",
                     "main_process_port", "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic",
                     "extra_accelerate_launch_args"), "an accelerate launch setting (use accelerate launch -m "
                                                      "lorakit train for several processes)"),
    **dict.fromkeys(("model_list", "training_preset", "file_path", "save_as", "headless", "print_only"),
                    "GUI state"),
    "lowvram": "the GUI's lowvram checkbox, which kohya_ss passes as the key sd-scripts never reads",
    "no_token_padding": "a Dreambooth field that older LoRA files hold; train_network.py has no such option",
    "conv_dims": "an older GUI field that kohya_ss no longer reads (conv_block_dims replaced it)",
    "conv_alphas": "an older GUI field that kohya_ss no longer reads (conv_block_alphas replaced it)",
    "use_8bit_adam": "an older field: read only when the file has no 'optimizer'",
    "stop_text_encoder_training_pct": "an older presets' name of stop_text_encoder_training, which the GUI does "
                                      "not read (and kohya_ss ignores the percentage itself)",
}
# Flux.1 fields: passed by kohya_ss only with flux1_checkbox, which lorakit refuses
_FLUX_KEYS = ("flux1_cache_text_encoder_outputs", "flux1_cache_text_encoder_outputs_to_disk", "ae", "clip_l",
              "t5xxl", "discrete_flow_shift", "model_prediction_type", "timestep_sampling", "split_mode",
              "train_blocks", "t5xxl_max_token_length", "guidance_scale", "mem_eff_save", "apply_t5_attn_mask",
              "split_qkv", "fp8_base_unet")

# GUI fields passed to sd-scripts under the same name and unchanged (before the drop of 0/False/"")
_SAME = ("async_upload", "bucket_no_upscale", "bucket_reso_steps", "cache_latents", "cache_latents_to_disk",
         "caption_dropout_rate", "caption_extension", "color_aug", "dataset_config", "debiased_estimation_loss",
         "dynamo_backend", "dim_from_weights", "enable_bucket", "flip_aug", "fp8_base", "full_bf16", "full_fp16",
         "gradient_checkpointing", "highvram", "huber_c", "huber_schedule", "huggingface_repo_id",
         "huggingface_token", "huggingface_repo_type", "huggingface_repo_visibility", "huggingface_path_in_repo",
         "ip_noise_gamma_random_strength", "logging_dir", "log_config", "log_tracker_name", "log_tracker_config",
         "loraplus_lr_ratio", "loraplus_text_encoder_lr_ratio", "loraplus_unet_lr_ratio", "loss_type",
         "lr_scheduler", "lr_scheduler_power", "masked_loss", "max_bucket_reso", "max_grad_norm", "mem_eff_attn",
         "metadata_author", "metadata_description", "metadata_license", "metadata_tags", "metadata_title",
         "mixed_precision", "network_alpha", "network_dim", "network_dropout", "network_weights", "output_dir",
         "output_name", "pretrained_model_name_or_path", "prior_loss_weight", "random_crop", "reg_data_dir",
         "resume", "resume_from_huggingface", "sample_sampler", "save_model_as", "save_precision", "save_state",
         "save_state_on_train_end", "save_state_to_huggingface", "scale_v_pred_loss_like_noise_pred",
         "scale_weight_norms", "shuffle_caption", "train_batch_size", "train_data_dir", "training_comment",
         "log_with", "v2", "v_parameterization", "vae", "wandb_api_key", "weighted_captions")
# passed only when not 0 (kohya_ss' "x if x != 0 else None"; the drop below would leave them out anyway)
_NONZERO = ("ip_noise_gamma", "max_timestep", "min_snr_gamma", "min_timestep", "sample_every_n_epochs",
            "sample_every_n_steps", "save_every_n_epochs", "save_every_n_steps", "save_last_n_steps",
            "save_last_n_steps_state", "v_pred_like_loss", "vae_batch_size")
# update_my_data's retyping of older files' strings: key -> (type, value when it does not parse)
_RETYPE = {**dict.fromkeys(("clip_skip", "epoch", "gradient_accumulation_steps", "keep_tokens", "lr_warmup",
                            "max_data_loader_n_workers", "max_train_epochs", "save_every_n_epochs", "seed",
                            "max_train_steps", "caption_dropout_every_n_epochs"), (int, 0)),
           "lr_scheduler_num_cycles": (int, 1), "max_token_length": (int, 75),
           **dict.fromkeys(("adaptive_noise_scale", "noise_offset", "learning_rate", "text_encoder_lr", "unet_lr"),
                           (float, 0.0)),
           "lr_scheduler_power": (float, 1.0)}

# LoRA_type -> (network_module, the fields kohya_ss writes into network_args, in its order; "algo=..." is literal)
_LYCORIS = "lycoris.kohya"
_LOCON_ARGS = ("preset", "conv_dim", "conv_alpha", "rank_dropout", "bypass_mode", "dora_wd", "module_dropout",
               "use_tucker", "use_scalar", "rank_dropout_scale")
_OFT_ARGS = ("preset", "conv_dim", "conv_alpha", "module_dropout", "use_tucker", "use_scalar", "rank_dropout",
             "rank_dropout_scale", "constrain", "rescaled")
LYCORIS_TYPES = {
    "LyCORIS/BOFT": (*_OFT_ARGS, "algo=boft", "train_norm"),
    "LyCORIS/Diag-OFT": (*_OFT_ARGS, "algo=diag-oft", "train_norm"),
    "LyCORIS/DyLoRA": ("preset", "conv_dim", "conv_alpha", "use_tucker", "block_size", "rank_dropout",
                       "module_dropout", "algo=dylora", "train_norm"),
    "LyCORIS/GLoRA": ("preset", "conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "rank_dropout_scale",
                      "algo=glora", "train_norm"),
    "LyCORIS/iA3": ("preset", "conv_dim", "conv_alpha", "train_on_input", "algo=ia3"),
    "LyCORIS/LoCon": (*_LOCON_ARGS, "algo=locon", "train_norm"),
    "LyCORIS/LoHa": (*_LOCON_ARGS, "algo=loha", "train_norm"),
    "LyCORIS/LoKr": ("preset", "conv_dim", "conv_alpha", "rank_dropout", "bypass_mode", "dora_wd", "module_dropout",
                     "factor", "use_cp", "use_scalar", "decompose_both", "rank_dropout_scale", "algo=lokr",
                     "train_norm"),
    "LyCORIS/Native Fine-Tuning": ("preset", "rank_dropout", "module_dropout", "use_tucker", "use_scalar",
                                   "rank_dropout_scale", "algo=full", "train_norm"),
}
_FIELD_OF_ARG = {"preset": "LyCORIS_preset", "block_size": "unit"}  # network_args name -> GUI field
# sd-scripts' own networks: only the fields that are set (truthy), in train_model's parameter order
_BLOCK_ARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
               "block_alphas", "conv_block_dims", "conv_block_alphas")
KOHYA_TYPES = {
    "Standard": ("networks.lora", (*_BLOCK_ARGS, "rank_dropout", "module_dropout")),
    "Kohya LoCon": ("networks.lora", (*_BLOCK_ARGS, "rank_dropout", "module_dropout")),
    "Kohya DyLoRA": ("networks.dylora", ("conv_dim", "conv_alpha", *_BLOCK_ARGS, "unit", "rank_dropout",
                                         "module_dropout")),
}
_REFUSED_TYPES = {"Flux1": "Flux.1 models (networks.lora_flux)", "LoRA-FA": "sd-scripts' networks.lora_fa"}
# the GUI's field values for keys a file leaves out, where the translation needs one (lora_gui.py's widgets)
_GUI_DEFAULTS = {"LoRA_type": "Standard", "LyCORIS_preset": "full", "noise_offset_type": "Original",
                 "conv_dim": 1, "conv_alpha": 1, "factor": -1, "bypass_mode": False, "dora_wd": False,
                 "use_cp": False, "use_tucker": False, "use_scalar": False, "rank_dropout_scale": False,
                 "constrain": 0.0, "rescaled": False, "train_norm": False, "decompose_both": False,
                 "train_on_input": True, "unit": 1, "rank_dropout": 0, "module_dropout": 0.0}
# GUI fields that train_model reads but that reach sd-scripts only through others, or not at all
_CONSUMED = {"LoRA_type", "LyCORIS_preset", "noise_offset_type", "noise_offset", "noise_offset_random_strength",
             "adaptive_noise_scale", "multires_noise_iterations", "multires_noise_discount", "max_resolution",
             "lr_warmup", "epoch", "optimizer", "optimizer_args", "lr_scheduler_args", "lr_scheduler_num_cycles",
             "lr_scheduler_type", "learning_rate", "text_encoder_lr", "unet_lr", "max_train_steps",
             "max_train_epochs", "stop_text_encoder_training", "sdxl", "sdxl_cache_text_encoder_outputs",
             "sdxl_no_half_vae", "xformers", "seed", "clip_skip", "keep_tokens", "min_bucket_reso",
             "caption_dropout_every_n_epochs", "gradient_accumulation_steps", "max_token_length",
             "persistent_data_loader_workers", "max_data_loader_n_workers", "wandb_run_name", "sample_prompts",
             "additional_parameters", "flux1_checkbox", "use_wandb", *_GUI_DEFAULTS, *_BLOCK_ARGS, *_SAME, *_NONZERO}
# inputs of the step count that the command line may replace, as if the GUI's field held that value
STEP_INPUTS = ("max_train_steps", "train_data_dir", "reg_data_dir", "dataset_config", "train_batch_size",
               "gradient_accumulation_steps", "output_dir")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # what train_model counts (sd-scripts reads more kinds)


def is_gui_config(data: Any) -> bool:
    """A JSON object that kohya_ss' GUI wrote: it has GUI-only fields (LoRA_type, max_resolution, epoch, ...)."""
    return isinstance(data, dict) and any(key in data for key in _GUI_MARKERS)


def check_lora_tab(path: Path, data: Mapping[str, Any]) -> None:
    """The GUI's other tabs (Dreambooth, Fine-tuning, Textual inversion) save the same kind of file, without any
    network field: lorakit trains adapters, so it reads the LoRA tab's files only."""
    if not any(key in data for key in _NETWORK_MARKERS):
        raise OptionError(f"config file {path}: a kohya_ss GUI config without LoRA_type or network_dim, so not one "
                          "of its LoRA tab (Dreambooth, Fine-tuning and Textual inversion configs train other "
                          "things); lorakit reads the LoRA tab's .json")


def update_old_keys(data: dict[str, Any]) -> dict[str, Any]:
    """kohya_ss' update_my_data: renames and retypes what older GUI versions saved (a copy)."""
    data = dict(data)
    data.setdefault("optimizer", "AdamW8bit" if data.get("use_8bit_adam") else "AdamW")
    for key, (kind, fallback) in _RETYPE.items():
        if data.get(key) is not None:
            try:
                data[key] = kind(data[key])
            except (TypeError, ValueError):  # "" (an empty textbox) and "1.0" for an int, as int() refuses them
                data[key] = fallback
    if data.get("LoRA_type", "Standard") == "LoCon":
        data["LoRA_type"] = "LyCORIS/LoCon"
    if data.get("save_model_as", "safetensors") not in ("safetensors", "ckpt"):
        data["save_model_as"] = "safetensors"
    if isinstance(data.get("xformers"), bool):
        data["xformers"] = "xformers" if data["xformers"] else "none"
    use_wandb = data.pop("use_wandb", None)
    if use_wandb in ("True", True):  # kohya_ss tests the string only; a true checkbox meant the same then
        data["log_with"] = "wandb"
    if data.get("lora_network_weights") is not None:
        data["network_weights"] = data.pop("lora_network_weights")
    return data


def _dropped(value: Any) -> bool:
    """kohya_ss keeps a TOML value unless `value in ["", False, None]`, which is also true of 0 and 0.0."""
    return value is None or value in ("", False)  # `in` compares with ==: 0 == False


def _number(path: Path, data: Mapping[str, Any], key: str, missing: int = 0) -> int:
    """An integer field (a command-line string too); `missing` when the file has none (the GUI's default)."""
    value = data.get(key, missing)
    try:
        number = float(value or 0)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        raise OptionError(f"config file {path}: '{key}' = {value!r}: expected a whole number")
    return int(number)


def count_steps(path: Path, data: Mapping[str, Any]) -> int:
    """max_train_steps as train_model computes it when the field is 0: images x repeats over the `N_name` folders
    of train_data_dir (.jpg/.jpeg/.png/.webp; folders without a leading number skipped), / batch size /
    gradient accumulation x epoch x 2 with reg_data_dir, rounded up."""
    folder = data.get("train_data_dir") or ""
    if not folder or not Path(folder).is_dir():
        what = "is empty" if not folder else f"= {folder!r} is not a folder"
        raise OptionError(f"config file {path}: max_train_steps is 0, so kohya_ss counts the steps from the images "
                          f"in train_data_dir, which {what}; give --train_data_dir, --max_train_steps or "
                          "--dataset_config")
    total = 0
    for sub in sorted(Path(folder).iterdir()):
        if not sub.is_dir():
            continue
        try:
            repeats = int(sub.name.split("_")[0])
        except ValueError:
            log.info("%s: folder %s has no leading repeat count; not counted, as kohya_ss", path, sub.name)
            continue
        total += repeats * sum(1 for f in sub.iterdir() if f.name.lower().endswith(_IMAGE_SUFFIXES))
    reg_factor = 2 if data.get("reg_data_dir") else 1
    steps = math.ceil(float(total) / max(1, _number(path, data, "train_batch_size", 1))
                      / max(1, _number(path, data, "gradient_accumulation_steps", 1))
                      * _number(path, data, "epoch", 1) * reg_factor)
    log.info("%s: max_train_steps = %d images x repeats / %s / %s x %s epochs x %d (reg) = %d, as kohya_ss counts",
             path, total, data.get("train_batch_size"), data.get("gradient_accumulation_steps"), data.get("epoch"),
             reg_factor, steps)
    return int(steps)


def _network(path: Path, data: Mapping[str, Any]) -> tuple[str, list[str]]:
    """LoRA_type and its fields -> (network_module, network_args) as train_model writes them."""
    lora_type = data.get("LoRA_type", "Standard")

    def field(key):  # an empty textbox ("") is unset, as everywhere in these files: the GUI's default
        value = data.get(key)
        return _GUI_DEFAULTS.get(key) if value is None or value == "" else value
    if data.get("flux1_checkbox"):
        raise OptionError(f"config file {path}: 'flux1_checkbox' = {data['flux1_checkbox']!r}: lorakit does not "
                          "train Flux.1 models (SD1.x, SD2.x and SDXL: leave it unchecked)")
    if lora_type in LYCORIS_TYPES:
        # each value as Python prints it (True, 0.0, -1), as kohya_ss' f-strings write them
        args = [item if item.startswith("algo=") else f"{item}={field(_FIELD_OF_ARG.get(item, item))}"
                for item in LYCORIS_TYPES[lora_type]]
        module = _LYCORIS
    elif lora_type in KOHYA_TYPES:
        module, fields = KOHYA_TYPES[lora_type]
        args = [f"conv_dim={field('conv_dim')}", f"conv_alpha={field('conv_alpha')}"] \
            if lora_type == "Kohya LoCon" else []
        args += [f"{key}={data[key]}" for key in fields if data.get(key)]
    else:
        accepted = ", ".join(sorted([*KOHYA_TYPES, *LYCORIS_TYPES]))
        what = f"lorakit does not train {_REFUSED_TYPES[lora_type]}" if lora_type in _REFUSED_TYPES \
            else "not a LoRA type of kohya_ss' GUI"
        raise OptionError(f"config file {path}: 'LoRA_type' = {lora_type!r}: {what}; accepted: {accepted}")
    # kohya_ss joins the args into one string, strips its double quotes and splits it at whitespace
    return module, " ".join(args).replace('"', "").split()


def translate(path: Path, gui: Mapping[str, Any], command_line: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The sd-scripts options (name -> raw value) of a kohya_ss GUI LoRA config, additional_parameters applied
    on top as command-line options. `command_line`: the run's command-line options; those in STEP_INPUTS feed the
    step count, lr warmup and the prompt file's place as if the GUI field held them (they still override below)."""
    path = Path(path)
    check_lora_tab(path, gui)
    data = update_old_keys(gui)
    _report_keys(path, data)
    inputs = {**data, **{k: v for k, v in (command_line or {}).items() if k in STEP_INPUTS}}
    module, network_args = _network(path, data)
    out: dict[str, Any] = {name: data[name] for name in _SAME if name in data}
    out.update({name: data[name] for name in _NONZERO if name in data and data[name] != 0})
    out.update(network_module=module, network_args=network_args)
    out.update(_steps(path, data, inputs))
    out.update(_learning_rates(data))
    out.update(_noise(data))
    out.update(_misc(path, data, inputs))
    out = {name: value for name, value in out.items() if not _warn_if_dropped(path, name, value)}
    if "max_data_loader_n_workers" in data:  # added after the drop: kohya_ss passes 0 too
        out["max_data_loader_n_workers"] = data["max_data_loader_n_workers"]
    out.update(_additional(path, data.get("additional_parameters")))
    return out


def _steps(path: Path, data: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
    """max_train_steps (counted when 0, without dataset_config), lr_warmup (a percentage of max_train_steps, as
    the GUI's "LR warmup (% of total steps)") -> lr_warmup_steps, max_train_epochs."""
    steps = _number(path, inputs, "max_train_steps")
    if not steps and not inputs.get("dataset_config"):
        steps = count_steps(path, inputs)
    warmup_pct = _number(path, data, "lr_warmup")
    out = {"max_train_steps": steps if steps else None,  # 0 with dataset_config: sd-scripts' 1600
           "lr_warmup_steps": round(float(warmup_pct * steps / 100)) if warmup_pct else 0,
           "max_train_epochs": data.get("max_train_epochs") or None}
    if data.get("stop_text_encoder_training"):
        log.warning("%s: stop_text_encoder_training = %s%% ignored, as kohya_ss ignores it (\"not yet supported\"); "
                    "--stop_text_encoder_training_pct %s applies it in lorakit", path,
                    data["stop_text_encoder_training"], data["stop_text_encoder_training"])
    return out


def _learning_rates(data: Mapping[str, Any]) -> dict[str, Any]:
    """unet_lr / text_encoder_lr 0 mean "do not train that part": the other part trains alone; learning_rate is
    passed only when both are 0 (kohya_ss' do_not_set_learning_rate)."""
    te, unet = float(data.get("text_encoder_lr") or 0), float(data.get("unet_lr") or 0)
    out = {"text_encoder_lr": data.get("text_encoder_lr"), "unet_lr": data.get("unet_lr"),
           "network_train_text_encoder_only": te != 0 and unet == 0,
           "network_train_unet_only": te == 0 and unet != 0}
    if te == 0 and unet == 0:
        out["learning_rate"] = data.get("learning_rate")
    return out


def _noise(data: Mapping[str, Any]) -> dict[str, Any]:
    """noise_offset_type picks which noise fields pass: Original (offset noise) or Multires (pyramid noise)."""
    kind = data.get("noise_offset_type", "Original")
    if kind == "Multires":
        return {"multires_noise_iterations": data.get("multires_noise_iterations") or None,
                "multires_noise_discount": data.get("multires_noise_discount")}
    if kind == "Original":
        return {"noise_offset": data.get("noise_offset") or None,
                "noise_offset_random_strength": data.get("noise_offset_random_strength"),
                "adaptive_noise_scale": data.get("adaptive_noise_scale") or None}
    return {}  # neither: kohya_ss passes no noise option


def _misc(path: Path, data: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
    sdxl = bool(data.get("sdxl"))
    attention = data.get("xformers", "none")
    seed = data.get("seed")
    out = {
        "resolution": data.get("max_resolution"),
        "optimizer_type": data.get("optimizer"),
        "optimizer_args": _words(data.get("optimizer_args")),
        "lr_scheduler_args": _words(data.get("lr_scheduler_args")),
        "lr_scheduler_num_cycles": data.get("lr_scheduler_num_cycles"),
        "lr_scheduler_type": data.get("lr_scheduler_type") or None,
        # sd-scripts picks SDXL by script (sdxl_train_network.py); unchecked, lorakit detects the model's kind
        "sdxl": True if sdxl else None,
        "cache_text_encoder_outputs": True if sdxl and data.get("sdxl_cache_text_encoder_outputs") else None,
        "no_half_vae": True if sdxl and data.get("sdxl_no_half_vae") else None,
        "sdpa": True if attention == "sdpa" else None,
        "xformers": True if attention == "xformers" else None,
        "seed": seed if seed else None,
        "clip_skip": data.get("clip_skip") or None,
        "max_token_length": data.get("max_token_length"),
        "persistent_data_loader_workers": (int(bool(data["persistent_data_loader_workers"]))
                                           if "persistent_data_loader_workers" in data else None),
        "wandb_run_name": data.get("wandb_run_name") or data.get("output_name"),
        "sample_prompts": _prompt_file(path, data.get("sample_prompts"), inputs.get("output_dir") or ""),
    }
    # train_model's int(): 64.0 -> 64
    out.update({key: _number(path, data, key) for key in ("keep_tokens", "min_bucket_reso",
                                                            "caption_dropout_every_n_epochs",
                                                            "gradient_accumulation_steps")
                if data.get(key) is not None})
    return out


def _words(text: Any) -> list[str] | None:
    """optimizer_args / lr_scheduler_args: one textbox, double quotes removed, split at whitespace (as kohya_ss)."""
    if text is None:
        return None
    return str(text).replace('"', "").split()


def _prompt_file(path: Path, prompts: Any, output_dir: str) -> str | None:
    """The GUI's sample prompts are text; kohya_ss writes them to {output_dir}/sample/prompt.txt and passes that
    file. Empty text: no file (an empty prompt file samples nothing either)."""
    if not prompts or not str(prompts).strip():
        return None
    target = Path(output_dir) / "sample" / "prompt.txt"
    if not target.is_file() or target.read_text(encoding="utf-8") != str(prompts):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(str(prompts), encoding="utf-8")
        log.info("%s: sample_prompts written to %s, as kohya_ss does", path, target)
    return str(target)


def _warn_if_dropped(path: Path, name: str, value: Any) -> bool:
    """Whether kohya_ss leaves the value out of its TOML; a warning when sd-scripts' default then differs from
    what the field says (a 0 that is not the option's "off", such as max_grad_norm = 0: clipping at 1.0)."""
    if not _dropped(value):
        return False
    default = BY_NAME[name].default if name in BY_NAME else None
    if value is not False and value != "" and value is not None and default not in (None, 0, False, "", ()):
        log.warning("%s: %s = %r is left out, as kohya_ss leaves every 0 out of the config it passes to sd-scripts: "
                    "the default %r applies, as in a kohya_ss run (--%s %r on the command line sets it)", path, name,
                    value, default, name, value)
    return True


def _additional(path: Path, text: Any) -> dict[str, Any]:
    """additional_parameters: a command-line string kohya_ss appends after --config_file, so its options replace
    the file's."""
    if not text or not str(text).strip():
        return {}
    from .config import parse_command_line

    try:
        return parse_command_line(shlex.split(str(text)))
    except (OptionError, ValueError) as err:
        raise OptionError(f"config file {path}: 'additional_parameters' = {text!r}: {err}") from None


def _report_keys(path: Path, data: Mapping[str, Any]) -> None:
    """Ignored keys at info level; unknown keys (newer kohya_ss versions add fields) as a warning, never their
    values (a key may hold a secret)."""
    for key in data:
        if key in IGNORED:
            log.info("%s: '%s' ignored (%s)", path, key, IGNORED[key])
        elif key in _FLUX_KEYS:
            log.debug("%s: '%s' ignored (a Flux.1 field; flux1_checkbox is off)", path, key)
        elif key not in _CONSUMED:
            log.warning("%s: '%s' is not a field of the kohya_ss LoRA tab that lorakit knows (a newer kohya_ss?); "
                        "ignored", path, key)


__all__ = ["is_gui_config", "translate", "update_old_keys", "count_steps", "IGNORED", "LYCORIS_TYPES",
           "KOHYA_TYPES", "STEP_INPUTS"]
