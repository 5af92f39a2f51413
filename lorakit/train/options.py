"""Every `lorakit train` option in one table: name, kind, default, choices, group, help, aliases and whether lorakit
implements it yet. Names, kinds and defaults are sd-scripts' (library/train_util.py add_sd_models_arguments,
add_dataset_arguments, add_training_arguments, add_optimizer_arguments, add_masked_loss_arguments;
library/custom_train_functions.py; library/sdxl_train_util.py; library/deepspeed_utils.py; library/utils.py
add_logging_arguments; train_network.py setup_parser), so that an sd-scripts `--config_file` TOML loads unchanged.

`supported=False` marks an sd-scripts option lorakit does not implement yet: it is accepted while its value is the
default (or empty, or while the option it refines is off: `inert_unless`), and any other value is an error that says
so. The list is explicit: `NOT_YET_SUPPORTED` below is computed from the table, and docs/training.md prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ..algos.options import OptionError, suggest, suggest_spelling, to_bool, to_float, to_int

_NONE_WORDS = {"none", "null"}


@dataclass(frozen=True)
class Option:
    name: str
    kind: str  # a key of COERCE
    default: Any
    group: str
    help: str
    choices: tuple = ()
    aliases: tuple = ()
    supported: bool = True
    inert_unless: str | None = None  # an unsupported option that only matters when this option is on
    low: float | None = None  # inclusive bounds, checked after coercion
    high: float | None = None
    bad_values: dict = field(default_factory=dict)  # sd-scripts values lorakit refuses, value -> reason

    @property
    def nullable(self) -> bool:
        return self.default is None


# ----- coercion: one function per kind; each takes the raw value (TOML value or command-line string) -----------

def _fail(name: str, expected: str, value: Any):
    raise OptionError(f"option '{name}': expected {expected}, got {value!r}")


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)


def _str(opt: Option, value: Any) -> Any:
    if not isinstance(value, str):
        _fail(opt.name, "a string", value)
    return value


# lorakit's own network under the name sd-scripts imports it by (the saved config writes it so): one network, one
# name, so that the saved config loads back to the same configuration and a resume sees no change
SAME_NETWORK = {"lorakit.kohya": "lorakit"}


def _module(opt: Option, value: Any) -> str:
    """network_module: one name, or (sd-scripts' appl_weights takes one per network_weights file) several of the
    same name; lorakit reads each file's own algorithm, so one value says all."""
    names = (value,) if isinstance(value, str) else _strings(opt, value)
    distinct = list(dict.fromkeys(SAME_NETWORK.get(n.strip(), n.strip()) for n in names))
    if len(distinct) != 1:
        _fail(opt.name, "one network module (or the same one repeated, one per network_weights file)", value)
    return distinct[0]


def _path(opt: Option, value: Any) -> Any:
    # kohya_ss GUI writes unset paths as "" (train_data_dir = ""): empty means not given. false too: LyCORIS'
    # example configs write resume = false, which sd-scripts reads as "no resume" (it tests the value's truth)
    if value is False:
        return None
    value = _str(opt, value)
    return None if value.strip() == "" else value


def _choice(opt: Option, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        _fail(opt.name, f"one of {', '.join(map(str, opt.choices))}", value)
    by_key = {str(c).lower(): c for c in opt.choices}
    key = str(value).strip().lower()
    if key in by_key:
        return by_key[key]
    if key in {str(v).lower() for v in opt.bad_values}:
        reason = {str(k).lower(): r for k, r in opt.bad_values.items()}[key]
        raise OptionError(f"option '{opt.name}': {value!r} is an sd-scripts value lorakit does not support yet "
                          f"({reason})")
    raise OptionError(f"option '{opt.name}': {value!r} is not one of {', '.join(map(str, opt.choices))}"
                      f"{suggest_spelling(key, by_key)}")


def _steps(opt: Option, value: Any) -> int | float:
    """sd-scripts' int_or_float: an integer >= 1 counts steps, a number below 1 (or "10%") is a ratio of all steps."""
    if isinstance(value, str) and value.strip().endswith("%"):
        number = to_float(opt.name, value.strip()[:-1]) / 100.0
    else:
        number = to_float(opt.name, value)
    if number < 0:
        _fail(opt.name, "steps (an integer >= 0) or a ratio in [0, 1)", value)
    if number >= 1:
        if number != int(number):
            _fail(opt.name, "a whole number of steps, or a ratio below 1", value)
        return int(number)
    return 0 if number == 0 else float(number)


def _strings(opt: Option, value: Any) -> tuple[str, ...]:
    # a TOML list of strings, or one string of space-separated items as on sd-scripts' command line
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(v.strip() for v in value if v.strip())
    _fail(opt.name, "a list of strings", value)


def _paths(opt: Option, value: Any) -> tuple[str, ...]:
    # a TOML list of paths, or one path (never split: paths may hold spaces)
    if isinstance(value, str):
        return (value.strip(),) if value.strip() else ()
    return _strings(opt, value)


def _floats(opt: Option, value: Any) -> tuple[float, ...]:
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        items = [items]
    return tuple(to_float(opt.name, v) for v in items)


def _lrs(opt: Option, value: Any) -> float | tuple[float, float] | None:
    """text_encoder_lr: one rate, or one per text encoder (SDXL); [] means unset, as the kohya_ss GUI writes it."""
    numbers = _floats(opt, value)
    if len(numbers) > 2:
        _fail(opt.name, "one learning rate, or two (one per SDXL text encoder)", value)
    if not numbers:
        return None
    return numbers[0] if len(numbers) == 1 or numbers[0] == numbers[1] else numbers


def _size(opt: Option, value: Any) -> tuple[int, int]:
    """'512', '512,768', 512 or [512, 768] -> (width, height), as sd-scripts reads --resolution."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    numbers = tuple(to_int(opt.name, v) for v in items)
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or min(numbers) < 1:
        _fail(opt.name, "a size: one integer >= 1, or 'width,height'", value)
    return numbers


def _pair(opt: Option, value: Any) -> tuple[float, float]:
    numbers = _floats(opt, value)
    if len(numbers) != 2 or numbers[0] > numbers[1]:
        _fail(opt.name, "two numbers 'low,high' with low <= high", value)
    return numbers


def _table(opt: Option, value: Any) -> dict:
    if not isinstance(value, dict):
        _fail(opt.name, "a table", value)
    return dict(value)


def _choice_int(opt: Option, value: Any) -> int:
    number = to_int(opt.name, value)
    if number not in opt.choices:
        _fail(opt.name, f"one of {', '.join(map(str, opt.choices))}", value)
    return number


COERCE = {
    "bool": lambda opt, v: to_bool(opt.name, v),
    "int": lambda opt, v: to_int(opt.name, v),
    "float": lambda opt, v: to_float(opt.name, v),
    "str": _str, "module": _module, "path": _path, "choice": _choice, "choice_int": _choice_int, "steps": _steps,
    "strings": _strings, "paths": _paths, "floats": _floats, "lrs": _lrs, "size": _size, "pair": _pair, "table": _table,
}
# the Python type of each kind, for TrainConfig's annotations and the docs
TYPES = {"bool": "bool", "int": "int", "float": "float", "str": "str", "module": "str", "path": "str", "choice": "str",
         "choice_int": "int", "steps": "int | float", "strings": "tuple[str, ...]", "paths": "tuple[str, ...]", "floats": "tuple[float, ...]",
         "lrs": "float | tuple[float, float]", "size": "tuple[int, int]", "pair": "tuple[float, float]",
         "table": "dict"}


def coerce(opt: Option, value: Any) -> Any:
    """The typed value of one option from its TOML or command-line form; None (or "none") means the default."""
    if value is None or (opt.nullable and (_is_none(value) or value == "")):
        return opt.default  # "" too: the kohya_ss GUI writes unset options as empty strings
    result = COERCE[opt.kind](opt, value)
    numbers = result if isinstance(result, tuple) else (result,)
    for number in numbers:
        if isinstance(number, (int, float)) and not isinstance(number, bool) and (
                (opt.low is not None and number < opt.low) or (opt.high is not None and number > opt.high)):
            bounds = f">= {opt.low:g}" if opt.high is None else f"<= {opt.high:g}" if opt.low is None else \
                f"in [{opt.low:g}, {opt.high:g}]"
            raise OptionError(f"option '{opt.name}': expected a value {bounds}, got {value!r}")
    return result


# ----- the table ----------------------------------------------------------------------------------------------------

def _opt(kind: str, name: str, default: Any, group: str, help: str, **kw) -> Option:
    return Option(name, kind, default, group, help, **kw)


def _later(kind: str, name: str, default: Any, group: str, help: str, **kw) -> Option:
    return Option(name, kind, default, group, help, supported=False, **kw)


_SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
             "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial",
               "adafactor", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant")
# transformers SchedulerType names that sd-scripts' get_scheduler_fix accepts but cannot build (it passes them
# arguments they do not take)
_NEWER_SCHEDULERS = {s: "sd-scripts' get_scheduler_fix cannot build it either" for s in
                     ("cosine_warmup_with_min_lr", "reduce_lr_on_plateau", "greedy")}
# sd-scripts' --dynamo_backend choices (accelerate's names, its typo "tensort" included), and accelerate's "no"
# (do not compile), which the kohya_ss GUI writes
_DYNAMO_BACKENDS = ("no", "eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                    "fx2trt", "onnxrt", "tensort", "ipex", "tvm")

OPTIONS: tuple[Option, ...] = (
    # ----- model -----
    _opt("path", "pretrained_model_name_or_path", None, "model",
         "the model to train on: a .safetensors/.ckpt checkpoint or a diffusers folder"),
    _opt("bool", "v2", False, "model", "the model is Stable Diffusion 2.x"),
    _opt("bool", "v_parameterization", False, "model", "train with v-prediction (SD2 768-v models, v-pred SDXL)"),
    _opt("bool", "sdxl", None, "model", "the model is SDXL; unset: detected from the checkpoint "
         "(sd-scripts chooses by script: sdxl_train_network.py)"),
    _opt("path", "vae", None, "model", "a VAE (file or folder) to use instead of the model's own"),
    _opt("path", "tokenizer_cache_dir", None, "model", "accepted and ignored: lorakit ships its tokenizers and "
         "downloads nothing"),
    _opt("bool", "disable_mmap_load_safetensors", False, "model",
         "accepted for compatibility: lorakit never memory-maps checkpoints"),
    _opt("bool", "fp8_base", False, "model", "store the frozen U-Net and text encoders' Linear/Conv weights in "
         "float8_e4m3fn, cast up for each call (needs mixed_precision fp16 or bf16)"),
    _opt("bool", "fp8_base_unet", False, "model", "fp8_base for the U-Net only (the text encoders keep the "
         "mixed_precision dtype)"),
    # ----- network -----
    _opt("module", "network_module", "lorakit", "network",
         "the network: 'lorakit' (any algorithm via network_args algo=...); sd-scripts' 'networks.lora', "
         "'networks.dylora' and LyCORIS' 'lycoris.kohya' are read as lorakit with that algorithm (lorakit explore: "
         "also one per network_weights file, as sd-scripts takes them)"),
    _opt("int", "network_dim", None, "network", "rank (dim) of each adapter; unset: 4, or read from "
         "network_weights with dim_from_weights", low=1),
    _opt("float", "network_alpha", 1.0, "network", "alpha: adapters scale their change by alpha/dim; "
         "0 means alpha = dim", low=0),
    _opt("float", "network_dropout", None, "network", "dropout on each adapter's hidden units, in [0, 1) "
         "(0 or unset: none)", low=0),
    *[_opt("float", name, None, "network", f"{what} as a top-level key, as the kohya_ss GUI writes it (the same "
           f"as network_args {name}=...)", low=0)
      for name, what in (("loraplus_lr_ratio", "LoRA+ lr ratio of the up factors"),
                         ("loraplus_unet_lr_ratio", "LoRA+ ratio for the U-Net"),
                         ("loraplus_text_encoder_lr_ratio", "LoRA+ ratio for the text encoders"))],
    _opt("strings", "network_args", (), "network", "more network and adapter options as 'key=value' "
         "(algo=loha conv_dim=8 preset=attn-mlp ...); see docs/networks.md"),
    _opt("paths", "network_weights", (), "network", "adapter file to start training from (lorakit explore: the "
         "files whose application rates it searches, one or several)"),
    _opt("bool", "dim_from_weights", False, "network", "take dims (ranks) from network_weights"),
    _opt("bool", "network_train_unet_only", False, "network", "train only the U-Net's adapters"),
    _opt("bool", "network_train_text_encoder_only", False, "network", "train only the text encoders' adapters"),
    _opt("float", "scale_weight_norms", None, "network", "scale down adapters whose |dW| exceeds this "
         "(max-norm regularisation; 1 is a good start)", low=0),
    _opt("strings", "base_weights", (), "network", "adapter files merged into the model before training (any "
         "algorithm lorakit reads)"),
    _opt("floats", "base_weights_multiplier", (), "network", "the multiplier of each base_weights file, in order "
         "(files without one: 1.0)"),
    # ----- explore (lorakit explore: application rates of trained networks, sd-scripts' appl_weights) -----
    _opt("float", "application_loss_weight", 0.0001, "explore", "lorakit explore: weight of the rates' total in "
         "the loss (negative rates count 10x); 0: search freely for the closest reproduction", low=0),
    _opt("str", "application_layout", None, "explore", "lorakit explore: the block layout of the rates; unset: "
         "SDXL sdxl20 (BASE, IN00-08, MID, OUT00-08), SD1/SD2 lbw26 (BASE, IN00-11, MID, OUT00-11); or lbw17, "
         "lbw12, kohya_sd25, kohya_sdxl23"),
    # ----- optimizer -----
    _opt("str", "optimizer_type", "AdamW", "optimizer",
         "AdamW, AdamW8bit, PagedAdamW(8bit/32bit), Lion, Lion8bit, PagedLion8bit, SGDNesterov, SGDNesterov8bit, "
         "DAdaptation (DAdaptAdamPreprint), "
         "DAdaptAdaGrad, DAdaptAdam, DAdaptAdan, DAdaptAdanIP, DAdaptLion, DAdaptSGD, Prodigy, Adafactor, "
         "AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree, a torch.optim class name (RAdam) or a class path "
         "(module.Class); sd-scripts' default '' means AdamW"),
    _opt("strings", "optimizer_args", (), "optimizer", "optimizer keyword arguments as 'key=value' "
         "(weight_decay=0.01 betas=0.9,0.999)"),
    _opt("float", "learning_rate", 2e-6, "optimizer", "learning rate of every group without its own", low=0),
    _opt("float", "unet_lr", None, "optimizer", "learning rate of the U-Net's adapters (0: not trained)", low=0),
    _opt("lrs", "text_encoder_lr", None, "optimizer", "learning rate of the text encoders' adapters; "
         "two values for SDXL's two encoders (0: not trained)", low=0),
    _opt("choice", "lr_scheduler", "constant", "optimizer", "how the learning rate changes over training",
         choices=_SCHEDULERS, bad_values=_NEWER_SCHEDULERS),
    _opt("steps", "lr_warmup_steps", 0, "optimizer", "warmup: a number of steps, or a ratio (< 1) of all steps"),
    _opt("int", "lr_scheduler_num_cycles", 1, "optimizer", "restarts of cosine_with_restarts", low=1),
    _opt("float", "lr_scheduler_power", 1.0, "optimizer", "power of the polynomial scheduler"),
    _opt("steps", "lr_decay_steps", 0, "optimizer", "decay steps of warmup_stable_decay: a number of steps, or a "
         "ratio (< 1) of all steps"),
    _opt("int", "lr_scheduler_timescale", None, "optimizer", "timescale of inverse_sqrt (unset: lr_warmup_steps, "
         "or 10000 without warmup)", low=1),
    _opt("float", "lr_scheduler_min_lr_ratio", None, "optimizer", "lowest lr as a ratio of the initial one, for "
         "cosine_with_min_lr (needed) and warmup_stable_decay (unset: 0)", low=0, high=1),
    _opt("str", "lr_scheduler_type", "", "optimizer", "a custom scheduler class 'module.Class' (or a "
         "torch.optim.lr_scheduler class name, or a function that builds a scheduler), built with "
         "lr_scheduler_args; replaces lr_scheduler"),
    _opt("strings", "lr_scheduler_args", (), "optimizer", "scheduler keyword arguments as 'key=value': for "
         "lr_scheduler_type, or polynomial's lr_end, piecewise_constant's step_rules, cosine_with_min_lr's min_lr, "
         "warmup_stable_decay's warmup_type/decay_type"),
    _opt("float", "max_grad_norm", 1.0, "optimizer", "clip gradients to this norm (0: no clipping)", low=0),
    _opt("int", "gradient_accumulation_steps", 1, "optimizer", "batches summed per optimizer step", low=1),
    _opt("bool", "use_8bit_adam", False, "optimizer", "old spelling of optimizer_type = AdamW8bit"),
    _opt("bool", "use_lion_optimizer", False, "optimizer", "old spelling of optimizer_type = Lion"),
    _opt("bool", "fused_backward_pass", False, "optimizer", "step each parameter as soon as its gradient is "
         "ready, in the backward pass (saves the gradients' memory; Adafactor only, no gradient accumulation; "
         "max_grad_norm clips each parameter's gradient on its own)"),
    # ----- training -----
    _opt("int", "train_batch_size", 1, "training", "images per batch", low=1),
    _opt("int", "max_train_steps", 1600, "training", "optimizer steps to train", low=1),
    _opt("int", "max_train_epochs", None, "training", "epochs to train (overrides max_train_steps)", low=1),
    _opt("int", "stop_text_encoder_training", None, "training", "stop training the text encoders after this "
         "many steps (as sd-scripts' train_db.py; its train_network.py ignores the key; 0: never)", low=0),
    _opt("int", "stop_text_encoder_training_pct", None, "training", "stop training the text encoders after this "
         "percentage of the steps (the kohya_ss GUI's field; 0: never)", low=0, high=100),
    _opt("int", "seed", None, "training", "random seed (unset: a random one, recorded in the saved config)"),
    _opt("bool", "gradient_checkpointing", False, "training", "recompute activations in the backward pass to "
         "save memory"),
    _opt("bool", "skip_until_initial_step", False, "training", "skip the batches of the steps before initial_step, "
         "so the run goes on with the data an uninterrupted run would have seen"),
    _opt("int", "initial_epoch", None, "training", "start counting epochs (and steps) from this epoch (1: the "
         "first); the lr schedule still starts at 0 without resume", low=1),
    _opt("int", "initial_step", None, "training", "start counting steps from this step (0: the first); "
         "overrides initial_epoch", low=0),
    _opt("bool", "cpu_offload_checkpointing", False, "training", "keep the activations gradient_checkpointing "
         "stores in CPU memory until the backward pass (needs gradient_checkpointing)"),
    _opt("bool", "torch_compile", False, "training", "torch.compile the models that train (U-Net, text encoders)"),
    _opt("choice", "dynamo_backend", "inductor", "training", "torch.compile backend (must exist in the installed "
         "PyTorch; inductor needs a C compiler on CPU); 'no': do not compile", choices=_DYNAMO_BACKENDS),
    # ----- data -----
    _opt("path", "train_data_dir", None, "data", "folder of 'N_name' concept folders (N repeats)"),
    _opt("path", "reg_data_dir", None, "data", "folder of regularisation (class) images"),
    _opt("float", "prior_loss_weight", 1.0, "data", "loss weight of regularisation images", low=0),
    _opt("path", "dataset_config", None, "data", "dataset TOML (general/datasets/subsets); replaces "
         "train_data_dir and reg_data_dir"),
    _opt("str", "caption_extension", ".caption", "data", "extension of caption files",
         aliases=("caption_extention",)),
    _opt("bool", "shuffle_caption", False, "data", "shuffle the comma-separated tags of captions"),
    _opt("int", "keep_tokens", 0, "data", "keep the first N tags in place when shuffling", low=0),
    _opt("float", "caption_dropout_rate", 0.0, "data", "share of images trained with an empty caption",
         low=0, high=1),
    _opt("int", "caption_dropout_every_n_epochs", 0, "data", "train without captions every N epochs (0: never)",
         low=0),
    _opt("float", "caption_tag_dropout_rate", 0.0, "data", "share of tags dropped from each caption",
         low=0, high=1),
    _opt("bool", "weighted_captions", False, "data", "read (tag:1.2) weights in captions"),
    _opt("choice_int", "max_token_length", None, "data", "caption tokens: 75 (unset), 150 or 225",
         choices=(75, 150, 225)),
    _opt("int", "clip_skip", None, "data", "use the text encoder's n-th layer from the end (1: the last)", low=1),
    _opt("bool", "color_aug", False, "data", "random hue changes (not with cached latents)"),
    _opt("bool", "flip_aug", False, "data", "random horizontal flips"),
    _opt("bool", "random_crop", False, "data", "crop at a random place instead of the centre (not with cached "
         "latents)"),
    _opt("size", "resolution", None, "data", "training size: 'size' or 'width,height'"),
    _opt("bool", "enable_bucket", False, "data", "aspect-ratio buckets"),
    _opt("int", "min_bucket_reso", 256, "data", "smallest bucket side", low=1),
    _opt("int", "max_bucket_reso", 1024, "data", "largest bucket side", low=1),
    _opt("int", "bucket_reso_steps", 64, "data", "bucket sides are multiples of this", low=1),
    _opt("bool", "bucket_no_upscale", False, "data", "never enlarge images to fill a bucket"),
    _opt("bool", "cache_latents", False, "data", "encode images once and keep the latents in memory; the VAE then "
         "leaves the accelerator"),
    _opt("bool", "cache_latents_to_disk", False, "data", "keep cached latents on disk next to the images "
         "(implies cache_latents)"),
    _opt("int", "vae_batch_size", 1, "data", "images per VAE batch when caching latents (0: 1)", low=0),
    _opt("bool", "cache_text_encoder_outputs", False, "data", "encode each caption once before "
         "training, outputs kept in memory; the text encoders then leave the accelerator (needs "
         "network_train_unet_only and fixed captions)"),
    _opt("bool", "cache_text_encoder_outputs_to_disk", False, "data", "keep cached text-encoder outputs in "
         "<image stem>_te_outputs.npz files (implies cache_text_encoder_outputs)"),
    _opt("bool", "persistent_data_loader_workers", False, "data", "keep data-loader workers between epochs"),
    _opt("int", "max_data_loader_n_workers", 8, "data", "data-loader worker processes (0: load in the main "
         "process)", low=0),
    _opt("str", "caption_separator", ",", "data", "separator of caption tags"),
    _opt("str", "keep_tokens_separator", "", "data", "tags before this separator are never shuffled"),
    _opt("str", "secondary_separator", None, "data", "joins tags that shuffle and drop together"),
    _opt("bool", "enable_wildcard", False, "data", "{a|b} wildcards and multi-line captions"),
    _opt("str", "caption_prefix", None, "data", "text put before every caption"),
    _opt("str", "caption_suffix", None, "data", "text put after every caption"),
    _opt("int", "token_warmup_min", 1, "data", "caption tag warmup: train on the first N tags at step 0", low=0),
    _opt("float", "token_warmup_step", 0.0, "data", "caption tag warmup: step (below 1: ratio of max_train_steps) "
         "from which all tags are used; 0: off", low=0),
    _opt("pair", "face_crop_aug_range", None, "data", "crop around the face box in 'name_x_y_w_h' file names, the "
         "face 1/high..1/low of the crop (e.g. 2.0,4.0; without enable_bucket)"),
    _opt("path", "in_json", None, "data", "fine-tuning metadata JSON {image: {caption, tags, train_resolution}} for "
         "train_data_dir"),
    _opt("int", "dataset_repeats", 1, "data", "repeats of the in_json dataset (and num_repeats' fallback in "
         "dataset_config)", low=1),
    _opt("bool", "masked_loss", False, "data", "mask the loss with the conditioning_data_dir images (red channel / "
         "255) or the alpha_mask"),
    _opt("bool", "alpha_mask", False, "data", "mask the loss with the images' alpha channel"),
    _opt("path", "conditioning_data_dir", None, "data", "mask images for masked_loss, named as the training images"),
    _opt("bool", "cache_info", False, "data", "keep image sizes and captions in each folder's "
         "metadata_cache.json"),
    _opt("bool", "debug_dataset", False, "data", "print the first epoch's batches (images, captions, buckets, "
         "flips, crops) and exit without training"),
    _opt("str", "dataset_class", None, "data", "a class 'module.Class' that serves whole batches instead of "
         "image folders (sd-scripts' MinimalDataset contract; see lorakit.data.custom_dataset); replaces "
         "train_data_dir and dataset_config"),
    _opt("choice", "resize_interpolation", None, "data", "filter that resizes images (unset: area shrinking, "
         "lanczos enlarging)", choices=("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")),
    _opt("size", "skip_image_resolution", None, "data", "leave out images whose area is at or below this size's"),
    _opt("bool", "skip_cache_check", False, "data", "reuse existing latent cache files without checking them"),
    # ----- precision and memory -----
    _opt("choice", "mixed_precision", "no", "precision", "compute in fp16 or bf16 with fp32 adapters (fp16: "
         "with a loss scale, as accelerate applies)",
         choices=("no", "fp16", "bf16")),
    _opt("bool", "full_fp16", False, "precision", "train in fp16 including gradients (needs mixed_precision fp16)"),
    _opt("bool", "full_bf16", False, "precision", "train in bf16 including gradients (needs mixed_precision bf16)"),
    _opt("choice", "save_precision", None, "precision", "dtype of the saved adapter (unset: as trained)",
         choices=("float", "fp16", "bf16")),
    _opt("bool", "no_half_vae", False, "precision", "keep the VAE in fp32 under mixed precision"),
    _opt("bool", "sdpa", False, "precision", "PyTorch scaled-dot-product attention"),
    _opt("bool", "xformers", False, "precision", "memory-efficient attention through the xformers package when it "
         "is installed (without it: a warning, and PyTorch's sdpa)"),
    _opt("bool", "mem_eff_attn", False, "precision", "memory-efficient attention; lorakit uses PyTorch's (sdpa)"),
    _opt("bool", "lowram", False, "precision",
         "load models straight to the accelerator and keep them there while the caches fill (little main memory)"),
    _opt("bool", "highvram", False, "precision", "accepted: a hint that memory is plentiful (no cache clearing)"),
    # ----- noise and loss -----
    _opt("float", "noise_offset", None, "noise", "add offset noise of this strength (about 0.1)", low=0),
    _opt("bool", "noise_offset_random_strength", False, "noise", "draw the offset strength from [0, noise_offset]"),
    _opt("float", "adaptive_noise_scale", None, "noise", "add |mean latent| * this to noise_offset"),
    _opt("int", "multires_noise_iterations", None, "noise", "pyramid (multi-resolution) noise levels (6-10; 0 or "
         "unset: none)", low=0),
    _opt("float", "multires_noise_discount", 0.3, "noise", "strength ratio between pyramid levels", low=0, high=1),
    _opt("float", "ip_noise_gamma", None, "noise", "input-perturbation noise strength (about 0.1)", low=0),
    _opt("bool", "ip_noise_gamma_random_strength", False, "noise", "draw the perturbation strength from "
         "[0, ip_noise_gamma]"),
    _opt("float", "min_snr_gamma", None, "noise", "min-SNR loss weighting gamma (5 is the paper's; 0: off)", low=0),
    _opt("bool", "scale_v_pred_loss_like_noise_pred", False, "noise", "scale v-prediction loss like noise "
         "prediction (needs v_parameterization)"),
    _opt("float", "v_pred_like_loss", None, "noise", "add a v-prediction-like loss term: loss * (1 + k / scale), "
         "scale = SNR / (SNR + 1) (epsilon models only)", low=0),
    _opt("bool", "debiased_estimation_loss", False, "noise", "weight the loss by 1/sqrt(SNR) (v_parameterization: 1/(SNR+1))"),
    _opt("bool", "zero_terminal_snr", False, "noise", "rescale the noise schedule to zero terminal SNR (the SNR loss "
         "weights keep the schedule before the rescale, as in sd-scripts)"),
    _opt("int", "min_timestep", None, "noise", "lowest timestep trained (unset: 0)", low=0, high=999),
    _opt("int", "max_timestep", None, "noise", "timesteps trained are below this (unset: 1000)", low=1, high=1000),
    _opt("choice", "loss_type", "l2", "noise", "loss: l1, l2, huber or smooth_l1",
         choices=("l1", "l2", "huber", "smooth_l1")),
    _opt("choice", "huber_schedule", "snr", "noise", "how huber_c changes with the timestep",
         choices=("constant", "exponential", "snr")),
    _opt("float", "huber_c", 0.1, "noise", "the Huber loss parameter", low=0),
    _opt("float", "huber_scale", 1.0, "noise", "scales the Huber threshold of the constant and exponential "
         "huber_schedule", low=0),
    # ----- saving -----
    _opt("path", "output_dir", None, "saving", "folder for the trained adapter, its config and states"),
    _opt("str", "output_name", None, "saving", "file name of the adapter, without extension"),
    _opt("choice", "save_model_as", "safetensors", "saving", "file format", choices=("safetensors", "ckpt", "pt")),
    _opt("int", "save_every_n_epochs", None, "saving", "save every N epochs (0 or unset: only at the end)", low=0),
    _opt("int", "save_every_n_steps", None, "saving", "save every N steps (0 or unset: never)", low=0),
    _opt("int", "save_last_n_epochs", None, "saving", "keep only the last N epoch saves (0 or unset: all)", low=0),
    _opt("int", "save_last_n_epochs_state", None, "saving", "keep only the last N epoch states (0 or unset: "
         "save_last_n_epochs' count, as in sd-scripts)", low=0),
    _opt("int", "save_last_n_steps", None, "saving", "keep step saves of the last N steps (0 or unset: all)", low=0),
    _opt("int", "save_last_n_steps_state", None, "saving", "keep step states of the last N steps (0 or unset: "
         "save_last_n_steps' count, as in sd-scripts)", low=0),
    _opt("bool", "save_state", False, "saving", "save the training state (optimizer ...) with each save"),
    _opt("path", "resume", None, "saving", "a saved state folder to resume from (with resume_from_huggingface: a "
         "state on the Hub)"),
    _opt("str", "training_comment", None, "saving", "a comment stored in the file's metadata"),
    _opt("bool", "no_metadata", False, "saving", "save no training metadata in the file"),
    _opt("int", "save_n_epoch_ratio", None, "saving", "save every max(1, epochs // N) epochs: at least N files "
         "over training (overrides save_every_n_epochs)", low=0),
    _opt("bool", "save_state_on_train_end", False, "saving", "save the training state once, at the end"),
    _opt("str", "metadata_title", None, "saving", "modelspec.title (unset: output_name)"),
    _opt("str", "metadata_author", None, "saving", "modelspec.author"),
    _opt("str", "metadata_description", None, "saving", "modelspec.description"),
    _opt("str", "metadata_license", None, "saving", "modelspec.license"),
    _opt("str", "metadata_tags", None, "saving", "modelspec.tags, comma-separated"),
    _opt("str", "metadata_usage_hint", None, "saving", "modelspec.usage_hint: a short hint on how to use the model"),
    _opt("str", "metadata_thumbnail", None, "saving", "modelspec.thumbnail: an image file (embedded as a data URL) "
         "or a data URL; a file that is missing or not an image is left out with a warning"),
    _opt("str", "metadata_merged_from", None, "saving", "modelspec.merged_from: the models this one was merged from"),
    _opt("str", "metadata_trigger_phrase", None, "saving", "modelspec.trigger_phrase: the words that call up what "
         "was trained"),
    _opt("str", "metadata_preprocessor", None, "saving", "modelspec.preprocessor: the preprocessing the model "
         "expects"),
    _opt("str", "metadata_is_negative_embedding", None, "saving", "modelspec.is_negative_embedding, as given "
         "(e.g. 'true')"),
    # ----- sample images -----
    _opt("path", "sample_prompts", None, "sampling", "file of prompts (.txt/.toml/.json) for sample images"),
    _opt("int", "sample_every_n_steps", None, "sampling", "sample every N steps (0 or unset: never)", low=0),
    _opt("int", "sample_every_n_epochs", None, "sampling", "sample every N epochs (overrides steps)", low=0),
    _opt("bool", "sample_at_first", False, "sampling", "sample before training (a resumed run too, as sd-scripts)"),
    _opt("choice", "sample_sampler", "ddim", "sampling", "sampler for sample images", choices=_SAMPLERS),
    # ----- logging -----
    _opt("path", "logging_dir", None, "logging", "log to this folder (TensorBoard)"),
    _opt("choice", "log_with", None, "logging", "tensorboard, wandb or all", choices=("tensorboard", "wandb", "all")),
    _opt("str", "log_prefix", None, "logging", "prefix of the log folder name"),
    _opt("str", "log_tracker_name", None, "logging", "tracker (project) name"),
    _opt("str", "wandb_api_key", None, "logging", "WandB API key to log in with"),
    _opt("str", "wandb_run_name", None, "logging", "WandB run name"),
    _opt("path", "log_tracker_config", None, "logging", "TOML file of tracker settings: a [wandb] table of "
         "wandb.init arguments, a [tensorboard] table of SummaryWriter arguments"),
    _opt("bool", "log_config", False, "logging", "send the configuration to the trackers (without keys, tokens and "
         "paths)"),
    _opt("choice", "console_log_level", None, "logging", "level of the console log (unset: INFO; for a program "
         "calling `train()`, Python's default, warnings and errors, unless console_log_file or console_log_simple is "
         "set)",
         choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
    _opt("path", "console_log_file", None, "logging", "write the log to this file instead of the console"),
    _opt("bool", "console_log_simple", False, "logging", "log messages only, without time, level and source"),
    # ----- validation (sd-scripts' newer held-out loss) -----
    _opt("float", "validation_split", 0.0, "validation", "share of each subset's images held out for the "
         "validation loss", low=0, high=1),
    _opt("int", "validation_seed", None, "validation", "seed of the split and of the validation noise (unset: seed)"),
    _opt("int", "validate_every_n_steps", None, "validation", "also validate every N steps", low=1),
    _opt("int", "validate_every_n_epochs", None, "validation", "validate every N epochs (unset: every epoch)",
         low=1),
    _opt("int", "max_validation_steps", None, "validation", "validation batches per validation (unset: all)",
         low=1),
    # ----- Hugging Face upload (train/hub.py; the kohya_ss GUI writes these even when not uploading: without
    # huggingface_repo_id they do nothing) -----
    _opt("str", "huggingface_repo_id", None, "hub", "upload each saved adapter to this Hub repo (owner/name; "
         "created when missing)"),
    _opt("choice", "huggingface_repo_type", None, "hub", "type of the repo (unset: model)",
         choices=("model", "dataset", "space")),
    _opt("str", "huggingface_path_in_repo", None, "hub", "folder in the repo for the uploads (unset: its root)"),
    _opt("str", "huggingface_token", None, "hub", "Hub token (unset: the logged-in one or HF_TOKEN); never "
         "written to the output folder"),
    _opt("choice", "huggingface_repo_visibility", None, "hub", "visibility of a repo that is created (unset: "
         "private)", choices=("public", "private")),
    _opt("bool", "save_state_to_huggingface", False, "hub", "upload the state folders too (with save_state / "
         "save_state_on_train_end)"),
    _opt("bool", "async_upload", False, "hub", "upload in a background thread while training goes on (train "
         "ends once every upload has)"),
    _opt("bool", "resume_from_huggingface", False, "hub", "resume names a state on the Hub: "
         "'owner/repo/path/of/state[:revision[:repo_type]]', downloaded then resumed from"),
    # ----- multi-GPU -----
    _opt("int", "ddp_timeout", None, "distributed", "timeout of the process group's collectives, in minutes "
         "(unset: torch's default)", low=1),
    _opt("bool", "ddp_gradient_as_bucket_view", False, "distributed", "accepted, no effect: a setting of torch's "
         "DistributedDataParallel buckets; lorakit averages gradients with its own all_reduce, without DDP"),
    _opt("bool", "ddp_static_graph", False, "distributed", "accepted, no effect: a setting of torch's "
         "DistributedDataParallel; lorakit averages gradients with its own all_reduce, without DDP"),
    _opt("bool", "deepspeed", False, "distributed", "train through a DeepSpeed engine (ZeRO, offloading, its "
         "mixed precision); needs the deepspeed package"),
    _opt("choice_int", "zero_stage", 2, "distributed", "ZeRO stage: 0 none, 1 partitions the optimizer states, 2 "
         "also the gradients, 3 also the parameters (the U-Net and trained text encoders too)",
         choices=(0, 1, 2, 3)),
    _opt("choice", "offload_optimizer_device", None, "distributed", "keep the optimizer states and fp32 master "
         "weights in CPU memory or on NVMe (stage 1-3; NVMe: stage 3)", choices=("cpu", "nvme")),
    _opt("path", "offload_optimizer_nvme_path", None, "distributed", "folder for offload_optimizer_device = nvme"),
    _opt("choice", "offload_param_device", None, "distributed", "keep the partitioned parameters in CPU memory or on "
         "NVMe (stage 3)", choices=("cpu", "nvme")),
    _opt("path", "offload_param_nvme_path", None, "distributed", "folder for offload_param_device = nvme"),
    _opt("bool", "zero3_init_flag", False, "distributed", "accepted, no effect: in accelerate it builds transformers "
         "models already partitioned; lorakit loads the model on each process and the engine partitions it"),
    _opt("bool", "zero3_save_16bit_model", False, "distributed", "accepted, no effect: lorakit always gathers the "
         "adapters in full for the files it writes"),
    _opt("bool", "fp16_master_weights_and_gradients", False, "distributed", "DeepSpeed's fp16 master weights and "
         "gradients (mixed_precision fp16, zero_stage 2, offload_optimizer_device cpu); full_fp16 asks for the same"),
    # ----- config files -----
    _opt("bool", "output_config", False, "config", "write the resolved options to config_file (which must not "
         "exist yet) and exit, as sd-scripts does; --print-config prints them"),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
ALIASES: dict[str, str] = {alias: o.name for o in OPTIONS for alias in o.aliases}
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(o.group for o in OPTIONS))
# Options whose values are secrets: left out of every config file lorakit writes and of tracker configs.
SECRET_OPTIONS: tuple[str, ...] = ("wandb_api_key", "huggingface_token")

NOT_YET_SUPPORTED: tuple[str, ...] = tuple(o.name for o in OPTIONS if not o.supported)

# Keys the kohya_ss GUI writes into the sd-scripts TOML that sd-scripts itself never reads: accepted and ignored,
# as sd-scripts ignores them, so that GUI configs load unchanged.
GUI_KEYS = {
    "epoch": "the GUI's epoch field; sd-scripts reads max_train_epochs / max_train_steps",
    "noise_offset_type": "the GUI's Original/Multires switch; sd-scripts reads noise_offset / "
                         "multires_noise_iterations",
    "lowvram": "the GUI's lowvram checkbox; sd-scripts has lowram and highvram, and no lowvram",
}
# Command-line-only names: the config file itself.
COMMAND_LINE_ONLY = ("config_file",)


def canonical_name(key: str) -> str:
    """The option's name for a key as written (alias resolved); unknown keys are errors suggesting the closest."""
    name = str(key).strip()
    name = ALIASES.get(name, name)
    if name not in BY_NAME:
        known = set(BY_NAME) | set(ALIASES) | set(GUI_KEYS) | set(COMMAND_LINE_ONLY)
        raise OptionError(f"unknown option '{key}'{suggest(name, known)}")
    return name


def inert(opt: Option, value: Any, values: dict[str, Any]) -> bool:
    """Whether an option's value asks for nothing: its default, empty, or its feature's master option is off."""
    if value == opt.default or value in ("", (), None):
        return True
    return opt.inert_unless is not None and not values.get(opt.inert_unless, BY_NAME[opt.inert_unless].default)


def options_in(group: str) -> Iterable[Option]:
    return (o for o in OPTIONS if o.group == group)


def explore_only(names: Iterable[str]) -> list[str]:
    """Which of these option names only `lorakit explore` uses, in order."""
    return sorted({o.name for o in options_in("explore")} & set(names))


def explore_only_note(name: str) -> str:
    return f"{name} is an option of lorakit explore; lorakit train does not use it"
