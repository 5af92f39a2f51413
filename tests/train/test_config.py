"""lorakit train's configuration: sd-scripts config files load unchanged, every key is checked (typos get the closest
name), values are typed, impossible combinations are refused with a message naming them, and the saved TOML loads
back to the same config."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from lorakit.algos.options import OptionError
from lorakit.data.errors import DatasetError
from lorakit.cli import main
from lorakit.train.config import TrainConfig, load_train_config, parse_command_line, print_config, to_toml
from lorakit.train.options import BY_NAME, COERCE, NOT_YET_SUPPORTED, OPTIONS, coerce

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]

# The sd-scripts TOML the kohya_ss GUI writes for an SDXL LoRA (its keys, spellings and types as written there:
# "" for unset, 1 for true, [] for empty lists, AdamW8Bit, max_token_length 75, and the GUI-only epoch,
# noise_offset_type and lowvram that sd-scripts ignores).
KOHYA_GUI = """\
async_upload = true
bucket_no_upscale = true
bucket_reso_steps = 64
cache_latents = true
cache_latents_to_disk = true
caption_extension = ".txt"
clip_skip = 1
dynamo_backend = "no"
enable_bucket = true
epoch = 8
gradient_accumulation_steps = 1
gradient_checkpointing = true
huber_c = 0.1
huber_schedule = "snr"
huggingface_path_in_repo = "checkpoint"
huggingface_repo_id = ""
huggingface_repo_type = "model"
huggingface_repo_visibility = "public"
huggingface_token = ""
learning_rate = 0.00004
loss_type = "l2"
lr_scheduler = "constant"
lr_scheduler_args = []
lr_scheduler_num_cycles = 1
lr_scheduler_power = 1
max_bucket_reso = 2048
max_data_loader_n_workers = 2
max_grad_norm = 1
max_timestep = 1000
max_token_length = 75
max_train_steps = 1600
mem_eff_attn = true
min_bucket_reso = 256
min_snr_gamma = 5
mixed_precision = "bf16"
network_alpha = 16
network_args = []
network_dim = 32
network_module = "networks.lora"
no_half_vae = true
noise_offset_type = "Original"
lowvram = true
optimizer_args = []
optimizer_type = "AdamW8Bit"
output_dir = "/app/outputs"
output_name = "last"
persistent_data_loader_workers = 1
pretrained_model_name_or_path = "/models/sd_xl_base_1.0.safetensors"
prior_loss_weight = 1
resolution = "1024,1024"
sample_prompts = ""
sample_every_n_epochs = 0
sample_sampler = "euler_a"
save_every_n_epochs = 2
save_model_as = "safetensors"
save_precision = "bf16"
scale_weight_norms = 5
text_encoder_lr = []
train_batch_size = 2
train_data_dir = "/data/img"
training_comment = ""
unet_lr = 0.00004
xformers = true
"""

# The sectioned layout of the kohya-trainer notebooks (section names are free: sd-scripts merges them).
SECTIONED = """\
[model_arguments]
v2 = false
v_parameterization = false
pretrained_model_name_or_path = "/models/animefull.ckpt"

[additional_network_arguments]
no_metadata = false
unet_lr = 1e-4
text_encoder_lr = 5e-5
network_module = "lycoris.kohya"
network_dim = 16
network_alpha = 8
network_args = ["algo=loha", "conv_dim=8", "conv_alpha=4"]
network_train_unet_only = false

[optimizer_arguments]
optimizer_type = "AdamW8bit"
learning_rate = 1e-4
max_grad_norm = 1.0
optimizer_args = ["weight_decay=0.1", "betas=0.9,0.99"]
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 3
lr_warmup_steps = 0.05

[dataset_arguments]
cache_latents = true
debug_dataset = false
vae_batch_size = 4

[training_arguments]
output_dir = "/out"
output_name = "character"
save_precision = "fp16"
save_every_n_epochs = 1
train_batch_size = 2
max_token_length = 225
mem_eff_attn = false
xformers = true
max_train_epochs = 10
max_data_loader_n_workers = 8
persistent_data_loader_workers = true
seed = 31337
gradient_checkpointing = false
gradient_accumulation_steps = 1
mixed_precision = "fp16"
clip_skip = 2
logging_dir = "/out/logs"
log_prefix = "character"
noise_offset = 0.05
lowram = true
train_data_dir = "/data/train"
reg_data_dir = "/data/reg"
resolution = "512,768"
enable_bucket = true
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1

[sample_prompt_arguments]
sample_every_n_epochs = 1
sample_sampler = "k_euler_a"
sample_prompts = "/out/prompts.txt"

[saving_arguments]
save_model_as = "safetensors"
"""


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(**overrides) -> str:
    with pytest.raises(OptionError) as err:
        load_train_config(overrides=overrides)
    return str(err.value)


# ----- real-world files load unchanged ------------------------------------------------------------------------------

def test_kohya_gui_config_loads_unchanged(tmp_path):
    config = load_train_config(write(tmp_path, KOHYA_GUI))
    assert isinstance(config, TrainConfig)
    assert config.optimizer_type == "AdamW8bit"  # the GUI's "AdamW8Bit", case as sd-scripts compares it
    assert config.resolution == (1024, 1024) and config.network_dim == 32 and config.network_alpha == 16.0
    assert isinstance(config.network_alpha, float) and config.persistent_data_loader_workers is True
    assert config.text_encoder_lr is None and config.network_args == () and config.lr_scheduler_args == ()
    assert config.max_token_length is None  # 75 is the default length
    assert config.sample_every_n_epochs is None and config.sample_prompts is None  # 0 and "" mean off
    assert config.training_comment is None and config.train_data_dir == "/data/img"
    assert (config.min_snr_gamma, config.learning_rate, config.unet_lr) == (5.0, 4e-5, 4e-5)
    # upload settings without a repository ("" is unset) upload nothing; dynamo_backend "no" is accelerate's "do not
    # compile"
    assert config.huggingface_repo_id is None and config.huggingface_token is None and config.dynamo_backend == "no"
    assert (config.async_upload, config.huggingface_repo_type, config.huggingface_repo_visibility) == (
        True, "model", "public")
    # networks.lora is lorakit's LoRA on sd-scripts' own default layers (no conv_dim: the transformer blocks)
    assert config.network_kwargs() == {"algo": "lora", "preset": "attn-mlp"}
    assert not {"epoch", "noise_offset_type", "lowvram"} & set(config.given)


@pytest.mark.parametrize("module,args,expected", [
    ("networks.lora", [], {"algo": "lora", "preset": "attn-mlp"}),
    ("networks.lora", ["conv_dim=4"], {"algo": "lora", "conv_dim": "4", "preset": "attn-mlp-convblock",
                                       "conv_alpha": "1.0"}),
    ("networks.lora", ["conv_dim=4", "conv_alpha=2"], {"algo": "lora", "conv_dim": "4", "conv_alpha": "2",
                                                       "preset": "attn-mlp-convblock"}),
    ("networks.dylora", ["preset=full"], {"algo": "dylora", "preset": "full",  # a preset given is kept
                                          "dylora_all_ranks": "true"}),  # sd-scripts' DyLoRA step
    # sd-scripts' LoRAModule rescales the kept rank components by 1/(1 - rank_dropout)
    ("networks.lora", ["rank_dropout=0.1"], {"algo": "lora", "rank_dropout": "0.1", "rank_dropout_scale": "true",
                                             "preset": "attn-mlp"}),
    ("lorakit", ["conv_dim=4"], {"conv_dim": "4"}),  # lorakit's own defaults (preset full) elsewhere
])
def test_sd_scripts_network_modules_select_sd_scripts_layers(module, args, expected):
    """sd-scripts' networks/lora.py adapts the Transformer2DModel blocks, and with conv_dim the ResNet blocks and
    resamplers too (conv_alpha 1 by default), never conv_in/conv_out/time embedding."""
    config = load_train_config(overrides={"network_module": module, "network_args": args})
    assert config.network_kwargs() == expected


def test_zero_means_off_where_sd_scripts_tests_for_truth():
    zeros = ("save_last_n_steps", "save_last_n_epochs", "save_last_n_steps_state", "save_last_n_epochs_state",
             "multires_noise_iterations")
    config = load_train_config(overrides={**{name: 0 for name in zeros}, "vae_batch_size": 0})
    assert all(getattr(config, name) is None for name in zeros) and config.vae_batch_size == 1


def test_sectioned_config_merges_sections(tmp_path):
    config = load_train_config(write(tmp_path, SECTIONED))
    assert config.network_module == "lycoris.kohya"
    assert config.network_args == ("algo=loha", "conv_dim=8", "conv_alpha=4")
    assert config.network_kwargs() == {"algo": "loha", "conv_dim": "8", "conv_alpha": "4"}
    assert config.optimizer_args == ("weight_decay=0.1", "betas=0.9,0.99")
    assert config.lr_warmup_steps == 0.05 and config.lr_scheduler == "cosine_with_restarts"
    assert config.resolution == (512, 768) and config.max_token_length == 225 and config.clip_skip == 2
    assert config.seed == 31337 and config.max_train_epochs == 10 and config.text_encoder_lr == 5e-5
    assert config.reg_data_dir == "/data/reg" and config.sample_sampler == "k_euler_a"


def test_config_file_name_without_suffix_gets_toml(tmp_path):
    write(tmp_path, "network_dim = 4\n")
    assert load_train_config(tmp_path / "run").network_dim == 4  # as train_util.read_config_from_file


def test_file_problems_are_named(tmp_path):
    with pytest.raises(OptionError, match="config file not found"):
        load_train_config(tmp_path / "missing.toml")
    (tmp_path / "folder.toml").mkdir()  # it exists: "not found" misled
    with pytest.raises(OptionError, match="folder.toml: is a folder, expected a .toml file"):
        load_train_config(tmp_path / "folder.toml")
    with pytest.raises(OptionError, match="not valid TOML"):
        load_train_config(write(tmp_path, "network_dim = = 4\n"))
    gui_json = tmp_path / "gui.json"
    gui_json.write_text('{"network_dim": 4}')  # JSON, but not the kohya_ss GUI's (test_kohya_ss_json.py)
    with pytest.raises(OptionError, match=r"gui.json: a JSON file that is not a kohya_ss GUI LoRA config"):
        load_train_config(gui_json)
    with pytest.raises(OptionError, match="given twice with different values.*\\[a\\].*\\[b\\]"):
        load_train_config(write(tmp_path, "[a]\nnetwork_dim = 4\n[b]\nnetwork_dim = 8\n"))
    assert load_train_config(write(tmp_path, "[a]\nnetwork_dim = 4\n[b]\nnetwork_dim = 4\n")).network_dim == 4
    with pytest.raises(OptionError, match="table inside a section"):
        load_train_config(write(tmp_path, "[a.b]\nnetwork_dim = 4\n"))
    with pytest.raises(OptionError, match="inside a config file"):
        load_train_config(write(tmp_path, 'config_file = "other.toml"\n'))


# ----- typos get the closest name -----------------------------------------------------------------------------------

TYPOS = [("network_dimm", "network_dim"), ("learning_rte", "learning_rate"), ("lr_sheduler", "lr_scheduler"),
         ("pretrained_model_name", "pretrained_model_name_or_path"), ("shuffle_captions", "shuffle_caption"),
         ("optimzer_type", "optimizer_type"), ("flip_augment", "flip_aug"),
         ("save_every_n_epoch", "save_every_n_epochs"),
         ("mixed_precission", "mixed_precision"), ("noise_ofset", "noise_offset")]


@pytest.mark.parametrize("typo,name", TYPOS)
def test_typos_in_file_dict_and_command_line_suggest_the_option(tmp_path, typo, name):
    expected = f"unknown option '{typo}' (did you mean '{name}'?)"
    for attempt in (lambda: load_train_config(write(tmp_path, f"[x]\n{typo} = 1\n")),
                    lambda: load_train_config(overrides={typo: 1}),
                    lambda: load_train_config(overrides=[f"--{typo}", "1"])):
        with pytest.raises(OptionError) as err:
            attempt()
        assert str(err.value) == expected


@pytest.mark.parametrize("overrides,expected", [
    ({"lr_scheduler": "cosine_with_restart"}, "did you mean 'cosine_with_restarts'"),
    ({"optimizer_type": "AdamW8bitt"}, "did you mean 'AdamW8bit'"),
    ({"sample_sampler": "euler_aa"}, "did you mean 'euler_a'"),
    ({"network_module": "lycoris.kohyaa"}, "did you mean 'lycoris.kohya'"),
    ({"network_args": ["conv_dimm=4"]}, "unknown network option 'conv_dimm' (did you mean 'conv_dim'?)"),
    ({"network_args": ["algo=lohaa"]}, "did you mean 'loha'"),
])
def test_misspelt_values_suggest_the_closest(overrides, expected):
    assert expected in error_of(**overrides)


# ----- types ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [("False", False), ("0", False), ("no", False), ("off", False),
                                        ("true", True), ("1", True), ("YES", True), (1, True), (0, False)])
def test_booleans(text, value):
    assert load_train_config(overrides={"flip_aug": text}).flip_aug is value


@pytest.mark.parametrize("name,raw,value", [
    ("network_dim", "8", 8), ("network_dim", 8.0, 8), ("network_alpha", 4, 4.0), ("learning_rate", "1e-4", 1e-4),
    ("resolution", "512", (512, 512)), ("resolution", 768, (768, 768)), ("resolution", [512, 768], (512, 768)),
    ("resolution", "512,768", (512, 768)), ("lr_warmup_steps", 100, 100), ("lr_warmup_steps", "0.1", 0.1),
    ("lr_warmup_steps", "10%", 0.1), ("lr_warmup_steps", 100.0, 100), ("text_encoder_lr", [1e-4, 5e-5], (1e-4, 5e-5)),
    ("text_encoder_lr", [5e-5], 5e-5), ("text_encoder_lr", "5e-5", 5e-5), ("network_args", "algo=loha dim=4",
                                                                             ("algo=loha", "dim=4")),
    ("max_token_length", "150", 150), ("seed", "none", None), ("train_data_dir", "", None),
    ("optimizer_type", "", "AdamW"), ("optimizer_type", "prodigy", "Prodigy"),
    ("optimizer_type", "torch.optim.RAdam", "torch.optim.RAdam"), ("caption_extention", ".txt", ".txt"),
])
def test_values_are_coerced(name, raw, value):
    config = load_train_config(overrides={name: raw})
    got = getattr(config, BY_NAME[name].name if name in BY_NAME else "caption_extension")
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("name,raw,expected", [
    ("network_dim", True, "expected an integer"), ("network_dim", 8.5, "expected an integer"),
    ("network_dim", 0, "expected a value >= 1"), ("learning_rate", "fast", "expected a number"),
    ("flip_aug", "maybe", "expected a boolean"), ("output_name", 5, "expected a string"),
    ("output_dir", ["a"], "expected a string"), ("resolution", "512,768,3", "expected a size"),
    ("lr_warmup_steps", 1.5, "a whole number of steps"), ("lr_warmup_steps", -1, "steps"),
    ("max_token_length", 100, "one of 75, 150, 225"), ("caption_dropout_rate", 1.5, "in [0, 1]"),
    ("text_encoder_lr", [1, 2, 3], "one learning rate, or two"), ("mixed_precision", "fp8", "not one of no, fp16"),
    ("min_timestep", 1000, "in [0, 999]"), ("network_args", [1], "a list of strings"),
])
def test_wrong_types_are_refused_naming_the_option(name, raw, expected):
    message = error_of(**{name: raw})
    assert f"'{name}'" in message and expected in message


def test_every_default_is_its_own_typed_value():
    for opt in OPTIONS:
        assert opt.kind in COERCE, opt.name
        if opt.default is not None:
            assert coerce(opt, opt.default) == opt.default, opt.name


# ----- impossible combinations ---------------------------------------------------------------------------------------

COMBINATIONS = [
    ({"network_train_unet_only": True, "network_train_text_encoder_only": True}, "together they train nothing"),
    ({"full_fp16": True}, "full_fp16 needs mixed_precision = 'fp16' (got 'no')"),
    ({"full_fp16": True, "mixed_precision": "fp16"}, "full_fp16 with optimizer_type 'AdamW': its default eps"),
    ({"full_bf16": True, "mixed_precision": "fp16"}, "full_bf16 needs mixed_precision = 'bf16'"),
    ({"min_timestep": 500, "max_timestep": 500}, "min_timestep (500) must be below max_timestep (500)"),
    ({"min_timestep": 900, "max_timestep": 100}, "min_timestep (900) must be below max_timestep (100)"),
    ({"cache_latents": True, "color_aug": True}, "cache_latents (or cache_latents_to_disk) and color_aug"),
    ({"cache_latents_to_disk": True, "random_crop": True}, "cache_latents (or cache_latents_to_disk) and random_crop"),
    ({"adaptive_noise_scale": 0.1}, "adaptive_noise_scale needs noise_offset"),
    ({"scale_v_pred_loss_like_noise_pred": True}, "scale_v_pred_loss_like_noise_pred needs v_parameterization"),
    ({"noise_offset_random_strength": True}, "noise_offset_random_strength needs noise_offset"),
    ({"ip_noise_gamma_random_strength": True}, "ip_noise_gamma_random_strength needs ip_noise_gamma"),
    ({"dim_from_weights": True}, "dim_from_weights needs network_weights"),
    ({"sdxl": True, "v2": True}, "sdxl and v2 cannot both be on"),
    ({"lr_scheduler": "adafactor"}, "lr_scheduler 'adafactor' needs optimizer_type Adafactor"),
    ({"use_8bit_adam": True, "optimizer_type": "Lion"}, "use_8bit_adam and optimizer_type = 'Lion' are both given"),
    ({"use_8bit_adam": True, "use_lion_optimizer": True}, "use_8bit_adam and use_lion_optimizer are both given"),
    ({"persistent_data_loader_workers": True, "max_data_loader_n_workers": 0}, "needs max_data_loader_n_workers >= 1"),
    ({"cache_text_encoder_outputs": True}, "cache_text_encoder_outputs needs network_train_unet_only"),
    ({"cache_text_encoder_outputs": True, "network_train_unet_only": True, "shuffle_caption": True},
     "cache_text_encoder_outputs and shuffle_caption cannot both be on"),
    ({"enable_bucket": True, "resolution": 2048}, "must lie within min_bucket_reso (256) .. max_bucket_reso (1024)"),
    ({"bucket_reso_steps": 48}, "bucket_reso_steps (48) must be divisible by 32"),
    ({"network_dropout": 1.0}, "'network_dropout': expected a value in [0, 1)"),
    ({"loss_type": "huber", "huber_c": 0}, "huber_c must be above 0"),
    ({"network_dim": 8, "network_args": ["dim=4"]}, "network_args 'dim=4' repeats option network_dim"),
    ({"network_dropout": 0.1, "network_args": ["dropout=0.2"]}, "dropout given twice"),
    ({"network_module": "networks.lora", "network_args": ["algo=loha"]}, "contradicts network_module 'networks.lora'"),
    ({"network_args": ["algo=lora", "factor=4"]}, "algo 'lora' does not accept option 'factor'"),
    ({"network_args": ["preset=attn-mlpp"]}, "unknown preset 'attn-mlpp'"),
    ({"network_args": ["conv_dim"]}, "expected 'key=value'"),
    ({"network_module": "networks.lora_flux"}, "is not a network lorakit trains"),
    ({"v_pred_like_loss": 0.1, "v_parameterization": True},
     "v_pred_like_loss and v_parameterization cannot both be on"),
    ({"v_pred_like_loss": -1}, "option 'v_pred_like_loss': expected a value >= 0"),
    ({"masked_loss": True}, "masked_loss needs the masks: conditioning_data_dir (mask images) or alpha_mask"),
    ({"conditioning_data_dir": "masks"}, "conditioning_data_dir needs masked_loss"),
    ({"masked_loss": True, "conditioning_data_dir": "masks", "random_crop": True},
     "conditioning_data_dir and random_crop cannot both be on"),
    ({"resize_interpolation": "cubical"}, "option 'resize_interpolation': 'cubical' is not one of lanczos, nearest"),
    ({"validation_split": 1.0}, "validation_split (1.0) must be below 1"),
    ({"validate_every_n_steps": 0}, "option 'validate_every_n_steps': expected"),
    ({"skip_image_resolution": "0"}, "option 'skip_image_resolution': expected a size"),
]


@pytest.mark.parametrize("overrides,message", COMBINATIONS)
def test_impossible_combinations_are_refused(overrides, message):
    assert message in error_of(**overrides)


def test_dataset_config_ignores_train_data_dir_with_a_warning(tmp_path):
    """sd-scripts' train_network.py: "ignoring the following options because config file is found"."""
    dataset = write(tmp_path, '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "img"\n', "data.toml")
    config = load_train_config(overrides={"train_data_dir": "img"}, dataset_config=dataset)
    assert any(n.startswith("ignoring the following options because config file is found: train_data_dir")
               for n in config.warnings)
    assert load_train_config(overrides={"train_data_dir": ""}, dataset_config=dataset).dataset_config == str(dataset)


@pytest.mark.parametrize("overrides,message", [
    ({"lr_scheduler": "greedy"}, "'greedy' is an sd-scripts value lorakit does not support"),
])
def test_not_yet_supported_options_are_refused_unless_default(overrides, message):
    assert message in error_of(**overrides)


def test_every_sd_scripts_option_is_supported():
    assert NOT_YET_SUPPORTED == () and all(o.supported for o in OPTIONS)
    config = load_train_config(overrides={"deepspeed": True, "zero_stage": 3, "offload_optimizer_device": "cpu",
                                          "zero3_init_flag": True, "caption_separator": ",", "lr_scheduler_args": []})
    assert (config.zero_stage, config.offload_optimizer_device, config.zero3_init_flag) == (3, "cpu", True)


def test_sd_scripts_rewrites():
    config = load_train_config(overrides={"use_8bit_adam": True, "cache_latents_to_disk": True,
                                          "save_every_n_steps": 0, "max_token_length": 75})
    assert (config.optimizer_type, config.use_8bit_adam) == ("AdamW8bit", False)
    assert config.cache_latents is True and config.save_every_n_steps is None and config.max_token_length is None
    assert load_train_config(overrides={"use_lion_optimizer": "true"}).optimizer_type == "Lion"


def test_min_bucket_reso_may_equal_max_bucket_reso_as_sd_scripts():
    """sd-scripts' dataset asserts min(resolution) >= min_bucket_reso and max(resolution) <= max_bucket_reso (each
    "equal or"): min = max = resolution is one bucket, and valid; only min above max is refused."""
    config = load_train_config(overrides={"enable_bucket": True, "resolution": "512", "min_bucket_reso": 512,
                                          "max_bucket_reso": 512})
    assert (config.min_bucket_reso, config.max_bucket_reso) == (512, 512)
    with pytest.raises(OptionError, match=r"min_bucket_reso \(576\) is above max_bucket_reso \(512\)"):
        load_train_config(overrides={"enable_bucket": True, "min_bucket_reso": 576, "max_bucket_reso": 512})


def test_warnings_are_kept(caplog):
    config = load_train_config(overrides={"zero_terminal_snr": True})
    assert any("zero_terminal_snr" in w for w in config.warnings)


def test_text_encoder_lr_with_network_train_unet_only_is_warned_of():
    """network_train_unet_only creates no text-encoder adapters (sd-scripts' LoRANetwork), so a text_encoder_lr
    next to it sets nothing: the one place it is said is this warning; without text_encoder_lr, or training the text
    encoders, there is nothing to say."""
    note = "text_encoder_lr is unused with network_train_unet_only"
    assert note in load_train_config(overrides={"network_train_unet_only": True, "text_encoder_lr": 1e-5}).warnings
    assert note not in load_train_config(overrides={"network_train_unet_only": True}).warnings
    assert note not in load_train_config(overrides={"text_encoder_lr": 1e-5}).warnings


def test_v2_with_clip_skip_is_warned_of_only_when_a_layer_is_skipped():
    """sd-scripts' verify_training_args warns that SD2 models were not trained with clip_skip; clip_skip = 1 (what
    the kohya_ss GUI writes) is the last layer, no skip, so it gets no note, as with SDXL."""
    note = "v2 with clip_skip: SD2 models were not trained with clip_skip"
    assert note in load_train_config(overrides={"v2": True, "clip_skip": 2}).warnings
    assert note not in load_train_config(overrides={"v2": True, "clip_skip": 1}).warnings
    assert note not in load_train_config(overrides={"clip_skip": 2}).warnings


def test_lr_decay_steps_0_is_sd_scripts_default_and_no_note():
    """lr_decay_steps defaults to 0 in sd-scripts (the kohya_ss GUI writes it): only a value it passes to
    warmup_stable_decay is noted as unused with another schedule; a default config has nothing to say."""
    assert load_train_config().warnings == ()
    assert load_train_config(overrides={"lr_scheduler": "cosine", "lr_decay_steps": 0}).warnings == ()
    assert "lr_decay_steps is used by lr_scheduler warmup_stable_decay only; unused with cosine" in load_train_config(
        overrides={"lr_scheduler": "cosine", "lr_decay_steps": 10}).warnings


def test_a_loraplus_ratio_given_at_the_top_level_and_in_network_args_must_agree():
    """The kohya_ss GUI writes the LoRA+ ratios at the top level; a config that also has them in network_args trains
    when both say the same, and is refused, naming both, when they differ; 0 at the top level is the GUI's "off"."""
    same = load_train_config(overrides={"loraplus_lr_ratio": 4, "network_args": ["loraplus_lr_ratio=4"]})
    assert same.network_args == ("loraplus_lr_ratio=4",)
    assert "loraplus_unet_lr_ratio given twice: 4 and network_args loraplus_unet_lr_ratio=8" in error_of(
        loraplus_unet_lr_ratio=4, network_args=["loraplus_unet_lr_ratio=8"])
    load_train_config(overrides={"loraplus_lr_ratio": 0, "network_args": ["loraplus_lr_ratio=8"]})


# ----- defaults are sd-scripts' --------------------------------------------------------------------------------------

# Read in kohya-ss/sd-scripts: library/train_util.py (add_optimizer_arguments, add_training_arguments,
# add_dataset_arguments), train_network.py setup_parser, library/custom_train_functions.py. sd-scripts' optimizer_type
# default "" means AdamW (train_util.get_optimizer). kohya_ss GUI defaults differ (seed 004: learning rate 1e-4,
# cosine, AdamW8bit, xformers on): an existing config sets those explicitly, so sd-scripts' defaults keep its meaning.
SD_SCRIPTS_DEFAULTS = {
    "learning_rate": 2.0e-6, "max_grad_norm": 1.0, "lr_scheduler": "constant", "lr_warmup_steps": 0,
    "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1.0, "optimizer_type": "AdamW", "train_batch_size": 1,
    "max_train_steps": 1600, "max_train_epochs": None, "max_data_loader_n_workers": 8,
    "gradient_accumulation_steps": 1, "mixed_precision": "no", "save_precision": None, "sample_sampler": "ddim",
    "seed": None, "multires_noise_discount": 0.3, "noise_offset": None, "loss_type": "l2", "huber_schedule": "snr",
    "huber_c": 0.1, "caption_extension": ".caption", "keep_tokens": 0, "min_bucket_reso": 256,
    "max_bucket_reso": 1024, "bucket_reso_steps": 64, "vae_batch_size": 1, "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0, "token_warmup_min": 1, "prior_loss_weight": 1.0, "network_alpha": 1.0,
    "network_dim": None, "save_model_as": "safetensors", "unet_lr": None, "text_encoder_lr": None,
    "min_snr_gamma": None, "clip_skip": None, "resolution": None, "enable_bucket": False, "cache_latents": False,
    "xformers": False, "dynamo_backend": "inductor",
}


def test_defaults_equal_sd_scripts():
    config = load_train_config()
    assert {name: getattr(config, name) for name in SD_SCRIPTS_DEFAULTS} == SD_SCRIPTS_DEFAULTS
    assert config.network_module == "lorakit"  # lorakit's own: sd-scripts has none (the option is required there)


# ----- overrides, round trip, printing -------------------------------------------------------------------------------

def test_command_line_overrides_beat_the_file(tmp_path):
    path = write(tmp_path, KOHYA_GUI)
    config = load_train_config(path, ["--network_dim", "8", "--flip_aug", "--network_module", "lorakit",
                                      "--network_args", "algo=loha", "conv_dim=4", "--learning_rate=3e-4",
                                      "--gradient_checkpointing", "false", "--text_encoder_lr", "1e-5", "2e-5"])
    assert (config.network_dim, config.flip_aug, config.learning_rate) == (8, True, 3e-4)
    assert config.network_args == ("algo=loha", "conv_dim=4") and config.gradient_checkpointing is False
    assert config.text_encoder_lr == (1e-5, 2e-5) and config.network_alpha == 16.0  # untouched file values stay
    assert load_train_config(path, {"network_dim": 8}).network_dim == 8
    assert parse_command_line(["--v2", "--seed", "-1"]) == {"v2": True, "seed": "-1"}
    with pytest.raises(OptionError, match="'network_dim' needs a value"):
        parse_command_line(["--network_dim", "--v2"])


def test_an_option_given_twice_on_the_command_line_is_refused_not_silently_the_last():
    """argparse (sd-scripts) keeps the last of a repeated option without a word; lorakit refuses it, naming the
    option, whichever form each repeat takes."""
    for args in (["--network_dim", "8", "--network_dim", "16"], ["--network_dim=8", "--network_dim", "8"],
                 ["--flip_aug", "--flip_aug", "false"]):
        with pytest.raises(OptionError, match="option '(network_dim|flip_aug)' given twice on the command line"):
            parse_command_line(args)


def test_round_trip(tmp_path):
    dataset = write(tmp_path, '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "img"\n', "data.toml")
    for source, extra in ((KOHYA_GUI, {}), (SECTIONED, {"text_encoder_lr": [1e-4, 3e-5], "lr_warmup_steps": "5%",
                                                         "training_comment": 'say "hi"\\ \u00e9', "sdxl": False,
                                                         "min_timestep": 100, "seed": 0})):
        config = load_train_config(write(tmp_path, source), extra)
        text = to_toml(config)
        again = load_train_config(write(tmp_path, text, "saved.toml"))
        assert again == config and again.as_dict() == config.as_dict() and to_toml(again) == text
    config = load_train_config(overrides={"resolution": 512}, dataset_config=dataset)
    assert load_train_config(write(tmp_path, to_toml(config), "saved.toml")) == config


def test_saved_toml_is_sectioned_and_flat_for_sd_scripts(tmp_path):
    config = load_train_config(write(tmp_path, SECTIONED))
    data = tomllib.loads(to_toml(config))
    flat = {k: v for section in data.values() for k, v in section.items()}
    assert flat["resolution"] == "512,768"  # sd-scripts reads --resolution as a string
    assert flat["network_args"] == ["algo=loha", "conv_dim=8", "conv_alpha=4"] and "seed" in data["training"]
    assert not set(flat) & set(NOT_YET_SUPPORTED) and "network_dim" in data["network"]


def _as_sd_scripts_reads(path: Path) -> dict:
    """sd-scripts' train_util.read_config_from_file: every section's keys merged into the argparse namespace, each
    value as TOML gives it; a key that is absent keeps argparse's default (None for the options checked here)."""
    args = {}
    for key, value in tomllib.loads(path.read_text(encoding="utf-8")).items():
        args.update(value if isinstance(value, dict) else {key: value})
    return args


def test_the_saved_config_is_what_sd_scripts_train_network_runs(tmp_path):
    """What train_network.py does with the saved file: network_module is imported and its create_network(multiplier,
    dim, alpha, vae, text_encoder, unet, neuron_dropout=...) called; `if args.network_weights is not None:
    network.load_weights(args.network_weights)` (one path); list options tested for `is not None`. And the file still
    loads back into lorakit to the same configuration."""
    import importlib

    from lorakit.models.demo import random_model

    model = random_model("tiny-sd", seed=0)
    weights = tmp_path / "w.safetensors"
    for overrides in ({"network_dim": 2}, {"network_dim": 2, "network_weights": str(weights)}):
        config = load_train_config(overrides=overrides)
        saved = write(tmp_path, to_toml(config), "saved.toml")
        assert load_train_config(saved) == config
        args = _as_sd_scripts_reads(saved)
        assert all(args.get(name) is None for name in ("network_args", "base_weights", "base_weights_multiplier",
                                                        "optimizer_args", "lr_scheduler_args"))
        network = importlib.import_module(args["network_module"]).create_network(
            1.0, args["network_dim"], args["network_alpha"], model.vae, model.text_encoders[0], model.unet,
            neuron_dropout=args.get("network_dropout"))
        network.apply_to(model.text_encoders[0], model.unet, True, True)
        if args.get("network_weights") is not None:
            assert args["network_weights"] == str(weights)
            network.load_weights(args["network_weights"])
        else:
            network.save_weights(str(weights), None, {})
    explore = load_train_config(overrides={"network_weights": ["a.safetensors", "b.safetensors"]})
    assert load_train_config(write(tmp_path, to_toml(explore), "saved.toml")) == explore  # lorakit explore's list


def test_print_config(capsys):
    print_config(load_train_config(overrides={"network_dim": 8, "wandb_api_key": "secret-key",
                                              "huggingface_token": "secret-token"}))
    out = capsys.readouterr().out
    assert "[network]\nnetwork_module = \"lorakit.kohya\"\nnetwork_dim = 8\n" in out
    assert "secret" not in out  # as in the saved config: printed configs end up in logs and bug reports


def test_cli_print_config_and_errors(tmp_path, capsys):
    path = write(tmp_path, KOHYA_GUI)
    assert main(["train", "--config", str(path), "--network_dim", "8", "--flip_aug", "--print-config"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["network"]["network_dim"] == 8 and printed["data"]["flip_aug"] is True
    assert main(["train", "--config_file", str(path), "--netwrok_dim", "8", "--print-config"]) == 2
    assert "unknown option 'netwrok_dim' (did you mean 'network_dim'?)" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "--color_aug"]) == 2
    assert "cache_latents (or cache_latents_to_disk) and color_aug" in capsys.readouterr().err
    dataset = tmp_path / "dataset.toml"  # a dataset config given as the config file: say which it is
    dataset.write_text('[general]\nshuffle_caption = true\n[[datasets]]\nresolution = 64\n'
                       '[[datasets.subsets]]\nimage_dir = "img"\n')
    assert main(["train", "--config", str(dataset), "--print-config"]) == 2
    assert (f"config file {dataset}: its [[datasets]] make it a dataset config; give it as dataset_config "
            f"(--dataset_config {dataset}) and the training options in --config") in capsys.readouterr().err


def test_cli_checks_what_training_needs_then_runs_the_loop(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, KOHYA_GUI)
    assert main(["train", "--config", str(path), "--output_dir", "", "--resolution", "none"]) == 2
    assert "training needs output_dir, resolution" in capsys.readouterr().err
    # a fine-tuning JSON may give each image its train_resolution instead (checked when the JSON is read)
    assert main(["train", "--config", str(path), "--output_dir", "", "--resolution", "none", "--in_json",
                 str(tmp_path / "meta.json")]) == 2
    assert "training needs output_dir\n" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "--lr_scheduler", "constant", "--lr_warmup_steps", "1"]) == 2
    assert ("lr_scheduler 'constant' takes no warmup: lr_warmup_steps must be 0, got 1 (use 'constant_with_warmup')"
            in capsys.readouterr().err)  # before any model loads, with no "ignored" note first
    seen = []
    loop = types.ModuleType("lorakit.train.run")
    loop.train = seen.append
    loop.TrainingError = type("TrainingError", (RuntimeError,), {})
    monkeypatch.setitem(sys.modules, "lorakit.train.run", loop)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed: refused before the model loads
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    assert main(["train", "--config", str(path), "--seed", "7"]) == 2  # the GUI's AdamW8bit
    assert "optimizer_type 'AdamW8bit' needs the package 'bitsandbytes'" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "--seed", "7", "--optimizer_type", "AdamW"]) == 0
    assert seen == [load_train_config(path, {"seed": 7, "optimizer_type": "AdamW"})]


def test_errors_after_training_started_are_one_line(tmp_path, capsys):
    """An input error found once the run has started (here the data folder, read after the model loads) is the same
    one line as a config error, not a traceback."""
    pytest.importorskip("diffusers")
    argv = ["train", "--pretrained_model_name_or_path", "demo:tiny-sd", "--resolution", "64", "--output_dir",
            str(tmp_path / "out"), "--train_data_dir", str(tmp_path / "nope")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorakit train: error: ") and "nope" in err and len(err.splitlines()) == 1, err


def test_docs_list_every_option_with_its_default():
    text = (ROOT / "docs" / "training.md").read_text()
    for opt in OPTIONS:
        row = re.search(rf"^\| `{opt.name}` \|.*$", text, re.M)
        assert row, opt.name
        assert ("not yet" in row.group(0)) is (not opt.supported), opt.name


class _Damaged(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        raise DatasetError("/data/1_x/a.jpg: image data is damaged or truncated")


def test_an_error_in_a_data_loader_worker_is_reported_as_its_own_message():
    """torch re-raises a worker's error with its traceback in the message; the train command prints the
    original message alone, as it does for errors in the main process."""
    from lorakit.train.cli import worker_error_message

    loader = torch.utils.data.DataLoader(_Damaged(), num_workers=1)
    with pytest.raises(DatasetError) as caught:
        next(iter(loader))
    assert "Original Traceback" in str(caught.value)
    assert worker_error_message(caught.value) == "/data/1_x/a.jpg: image data is damaged or truncated"
    assert worker_error_message(ValueError("plain")) == "plain"


# network_args exactly as kohya_ss' lora_gui.py writes them for each network type (with the GUI's default values)
_KOHYA_SS_ARGS = {
    "locon": ["preset=full", "conv_dim=8", "conv_alpha=4", "use_tucker=False", "rank_dropout=0", "bypass_mode=False",
              "dora_wd=False", "module_dropout=0", "use_tucker=False", "use_scalar=False", "rank_dropout_scale=False",
              "algo=locon", "train_norm=False"],
    "loha": ["preset=full", "conv_dim=8", "conv_alpha=4", "use_tucker=False", "rank_dropout=0", "bypass_mode=False",
             "dora_wd=False", "module_dropout=0", "use_tucker=False", "use_scalar=False", "rank_dropout_scale=False",
             "algo=loha", "train_norm=False"],
    "lokr": ["preset=full", "conv_dim=8", "conv_alpha=4", "use_tucker=False", "rank_dropout=0", "bypass_mode=False",
             "dora_wd=False", "module_dropout=0", "factor=-1", "use_cp=False", "use_scalar=False",
             "decompose_both=False", "rank_dropout_scale=False", "algo=lokr", "train_norm=False"],
    "dylora": ["preset=full", "conv_dim=8", "conv_alpha=4", "use_tucker=False", "block_size=1", "rank_dropout=0",
               "module_dropout=0", "algo=dylora", "train_norm=False"],
    "boft": ["preset=full", "conv_dim=8", "conv_alpha=4", "module_dropout=0", "use_tucker=False", "rank_dropout=0",
             "rank_dropout_scale=False", "algo=boft", "train_norm=False"],
    "diag-oft": ["preset=full", "conv_dim=8", "conv_alpha=4", "module_dropout=0", "use_tucker=False", "rank_dropout=0",
                 "rank_dropout_scale=False", "constraint=0", "rescaled=False", "algo=diag-oft", "train_norm=False"],
    "glora": ["preset=full", "conv_dim=8", "conv_alpha=4", "use_tucker=False", "rank_dropout=0", "module_dropout=0",
              "rank_dropout_scale=False", "algo=glora", "train_norm=False"],
    "full": ["preset=full", "rank_dropout=0", "module_dropout=0", "rank_dropout_scale=False", "algo=full",
             "train_norm=False"],
    "ia3": ["preset=full", "conv_dim=8", "conv_alpha=4", "train_on_input=False", "algo=ia3"],
}


@pytest.mark.parametrize("kind", sorted(_KOHYA_SS_ARGS))
def test_kohya_ss_lycoris_configs_run_as_written(kind, caplog):
    """kohya_ss writes use_tucker twice (LoCon, LoHa), use_tucker beside use_cp (LoKr), and the off values of
    options an algorithm does not use; sd-scripts and LyCORIS accept all of it, and so does lorakit."""
    from lorakit import create_network

    from ..network.tiny import tiny_model

    config = load_train_config(overrides={"network_module": "lycoris.kohya", "network_dim": 8, "network_alpha": 4,
                                          "network_args": _KOHYA_SS_ARGS[kind], "resume": False,
                                          "loraplus_lr_ratio": 0 if kind != "lokr" else 16})
    kwargs = config.network_kwargs()
    assert config.resume is None and ("loraplus_lr_ratio" in kwargs) == (kind == "lokr")
    unet, tes = tiny_model("sd1")
    net = create_network(unet, tes, dim=8, alpha=4, **kwargs)
    assert {a.name for _, a in net.adapters()} == {"lora" if kind == "locon" else kind}
    if kind == "lokr":
        assert kwargs["loraplus_lr_ratio"] == "16" and net.loraplus["all"] == 16


def test_kohya_ss_spellings_meet_lorakit_options():
    """use_tucker and use_cp OR-ed as LyCORIS does; differing repeats: the last wins (sd-scripts' dict); DyLoRA's
    unit is block_size; an option an algorithm does not use stays an error when it is set."""
    from lorakit.algos.options import parse_options

    assert parse_options({"use_tucker": "False", "use_cp": "True"})[0].use_tucker is True
    with pytest.raises(OptionError, match="'dim' given twice .* different values: 4 and 8"):
        parse_options({"dim": 4, "lora_dim": 8})
    config = load_train_config(overrides={"network_module": "networks.dylora",
                                          "network_args": ["unit=4", "conv_dim=2", "conv_dim=4"]})
    assert config.network_kwargs()["conv_dim"] == "4"
    assert parse_options({"unit": config.network_kwargs()["unit"]})[0].block_size == 4
    with pytest.raises(OptionError, match="algo 'boft' does not accept option 'use_tucker' \\(given True\\)"):
        load_train_config(overrides={"network_args": ["algo=boft", "use_tucker=True"]})
    with pytest.raises(OptionError, match="loraplus_lr_ratio given twice"):
        load_train_config(overrides={"loraplus_lr_ratio": 4, "network_args": ["loraplus_lr_ratio=8"]})


def test_clip_skip_with_sdxl_is_a_warning_as_in_sd_scripts():
    """sd-scripts' verify_sdxl_training_args warns and trains on; the config's sdxl flag or a detected SDXL model
    give the same note."""
    config = load_train_config(overrides={"sdxl": True, "clip_skip": 2})
    assert "clip_skip = 2 does nothing for SDXL (sd-scripts ignores it too)" in config.warnings


def test_network_dim_beside_dim_from_weights_is_noted_as_unused(tmp_path):
    """sd-scripts takes every dim and alpha from the file and ignores network_dim/alpha without a word."""
    (tmp_path / "w.safetensors").write_bytes(b"")  # the file is read when the network is built, not here
    given = load_train_config(overrides={"dim_from_weights": True, "network_weights": str(tmp_path / "w.safetensors"),
                                         "network_dim": 16, "network_alpha": 8})
    assert [n for n in given.warnings if "dim_from_weights" in n] == [
        "network_dim = 16 is not used: dim_from_weights takes each module's dim and alpha from network_weights",
        "network_alpha = 8.0 is not used: dim_from_weights takes each module's dim and alpha from network_weights"]
    alone = load_train_config(overrides={"dim_from_weights": True, "network_weights": str(tmp_path / "w.safetensors")})
    assert not [n for n in alone.warnings if "dim_from_weights" in n]


@pytest.mark.parametrize("name,expected", [("RAdam", "RAdam"), ("SGD", "SGD"), ("Adam", "Adam"),
                                           ("Adagrad", "Adagrad"), ("NAdam", "NAdam"), ("radam", "RAdam")])
def test_a_bare_torch_optim_name_is_an_optimizer_as_in_sd_scripts(name, expected):
    """sd-scripts' get_optimizer looks a name it does not know, without a dot, up in torch.optim."""
    assert load_train_config(overrides={"optimizer_type": name}).optimizer_type == expected
    assert "unknown optimizer 'RAdamm'" in error_of(optimizer_type="RAdamm")


@pytest.mark.parametrize("option, typo, suggested", [("optimizer_type", "AdamWW", "AdamW"),
                                                     ("optimizer_type", "prodigi", "Prodigy"),
                                                     ("console_log_level", "warnin", "WARNING")])
def test_a_misspelt_name_matched_without_case_is_suggested_as_it_is_written(option, typo, suggested):
    """Names are matched without case, but the suggestion is the name as the docs write it ('AdamW', not 'adamw')."""
    error = error_of(**{option: typo})
    assert f"(did you mean '{suggested}'?)" in error, error


@pytest.mark.parametrize("args", [["relative_step=False"], ["relative_step=False", "scale_parameter=False"]])
def test_the_adafactor_schedule_without_a_relative_step_is_refused(args):
    """It would set the lr to 0 and train nothing; sd-scripts fails on it (its 'adafactor:<lr>' comes only from a
    relative-step Adafactor)."""
    message = error_of(optimizer_type="Adafactor", optimizer_args=args, lr_scheduler="adafactor")
    assert "lr_scheduler 'adafactor'" in message and "relative_step=False" in message
    for fine in ([], ["relative_step=True"], ["relative_step=False", "warmup_init=True"]):
        load_train_config(overrides={"optimizer_type": "Adafactor", "optimizer_args": fine,
                                     "lr_scheduler": "adafactor"})


def test_piecewise_constant_with_a_warmup_runs_with_a_note_as_in_sd_scripts():
    from lorakit.train.checks import check_runnable

    config = load_train_config(overrides={"lr_scheduler": "piecewise_constant", "lr_warmup_steps": 5,
                                          "lr_scheduler_args": ["step_rules='1:2,0.1'"], "output_dir": "out",
                                          "pretrained_model_name_or_path": "m", "train_data_dir": "d",
                                          "resolution": 64})
    check_runnable(config)
    assert any("lr_warmup_steps (5) is unused with lr_scheduler piecewise_constant" in n for n in config.warnings)


@pytest.mark.parametrize("overrides,lrs", [
    ({"learning_rate": 1.0, "text_encoder_lr": 0.5}, "unet_lr 1, text_encoder_lr 0.5"),
    ({"learning_rate": 1.0, "unet_lr": 1.0, "text_encoder_lr": [0.5, 1.0]}, "unet_lr 1, text_encoder_lr 0.5"),
    # SDXL's second text encoder trains at the second value
    ({"learning_rate": 1.0, "text_encoder_lr": [1.0, 0.5], "sdxl": True},
     "unet_lr 1, text_encoder_lr 1, second text_encoder_lr 0.5"),
    ({"learning_rate": 1.0, "loraplus_lr_ratio": 4},
     "unet_lr 1, unet_lr x LoRA+ ratio 4, text_encoder_lr 1, text_encoder_lr x LoRA+ ratio 4"),
    ({"learning_rate": 1.0, "network_args": ["loraplus_unet_lr_ratio=2"], "network_train_unet_only": True},
     "unet_lr 1, unet_lr x LoRA+ ratio 2"),
    ({"learning_rate": 1.0, "network_args": ["loraplus_lr_ratio=3", "loraplus_unet_lr_ratio=0"],  # sd-scripts' `or`
      "network_train_unet_only": True}, "unet_lr 1, unet_lr x LoRA+ ratio 3"),
])
def test_unequal_group_lrs_with_d_adaptation_or_prodigy_are_refused_before_the_model_loads(overrides, lrs):
    """DAdaptAdam and Prodigy raise at their first step when the groups' lrs differ (sd-scripts fails the same way)."""
    for name in ("Prodigy", "DAdaptAdam"):
        message = error_of(optimizer_type=name, **overrides)
        assert f"optimizer_type {name} cannot train parameter groups at different learning rates ({lrs})" in message


def test_group_lrs_that_end_equal_are_fine_with_prodigy():
    for overrides in ({"learning_rate": 1.0}, {"learning_rate": 0.5, "unet_lr": 1.0, "text_encoder_lr": 1.0},
                      {"learning_rate": 1.0, "text_encoder_lr": 0.5, "network_train_unet_only": True},
                      {"learning_rate": 1.0, "text_encoder_lr": 0},  # frozen text encoders
                      {"learning_rate": 1.0, "text_encoder_lr": [1.0, 0.5]},  # SD1/SD2: no second text encoder
                      {"learning_rate": 1.0, "text_encoder_lr": 0.5, "optimizer_type": "DAdaptAdaGrad"}):
        load_train_config(overrides={"optimizer_type": "Prodigy", **overrides})


def test_repeated_optimizer_and_scheduler_args_are_noted_once_before_the_model_loads():
    notes = load_train_config(overrides={"optimizer_args": ["weight_decay=0.01", "weight_decay=0.1"],
                                         "lr_scheduler_args": ["gamma=0.5", "gamma=0.5"]}).warnings
    assert "optimizer_args: 'weight_decay' given twice (0.01, then 0.1); the last is used, as in sd-scripts" in notes
    assert not any("gamma" in n for n in notes)  # the same value twice changes nothing
    notes = load_train_config(overrides={"optimizer_type": "Adafactor",
                                         "optimizer_args": ["relative_step=False", "warmup_init=True"]}).warnings
    assert "Adafactor: warmup_init=True needs relative_step; relative_step=True is used, as in sd-scripts" in notes


@pytest.mark.parametrize("name,expected", [("AdamWScheduleFree", "AdamWScheduleFree"),
                                           ("radamschedulefree", "RAdamScheduleFree"),
                                           ("SGDScheduleFree", "SGDScheduleFree"),
                                           ("schedulefree.AdamWScheduleFree", "schedulefree.AdamWScheduleFree")])
def test_schedule_free_optimizers_are_accepted_and_keep_a_constant_lr_as_in_sd_scripts(name, expected):
    """sd-scripts builds them and gives them a dummy scheduler: lr_scheduler and lr_warmup_steps are unused."""
    from lorakit.train.checks import check_runnable

    config = load_train_config(overrides={"optimizer_type": name, "lr_warmup_steps": 10, "output_dir": "out",
                                          "pretrained_model_name_or_path": "m", "train_data_dir": "d",
                                          "resolution": 64})
    assert config.optimizer_type == expected
    check_runnable(config)  # constant with a warmup: refused for other optimizers
    assert any(f"optimizer_type {expected} is schedule-free: lr_warmup_steps = 10 unused" in n for n in config.warnings)
    assert not any("schedule-free" in n for n in load_train_config(overrides={"optimizer_type": name}).warnings)


def test_schedule_free_refusals():
    assert "prodigyplus.ProdigyPlusScheduleFree" in error_of(optimizer_type="ProdigyPlusScheduleFree")
    assert "deepspeed and optimizer_type AdamWScheduleFree cannot both be on" in error_of(
        optimizer_type="AdamWScheduleFree", deepspeed=True)


def test_a_zero_noise_offset_or_min_snr_gamma_is_off_as_in_sd_scripts():
    """sd-scripts skips a 0 offset (`if args.noise_offset:`) without refusing its companions, and tests
    min_snr_gamma for truth."""
    config = load_train_config(overrides={"noise_offset": 0, "noise_offset_random_strength": True,
                                          "adaptive_noise_scale": 0.01, "min_snr_gamma": 0})
    assert config.noise_offset == 0 and config.noise_offset_random_strength and config.min_snr_gamma is None
    assert load_train_config(overrides={"min_snr_gamma": 5}).min_snr_gamma == 5


def test_stop_text_encoder_training_help_says_sd_scripts_train_network_ignores_it():
    """lorakit applies train_db.py's stop_text_encoder_training; sd-scripts' train_network.py never reads the key,
    which the kohya_ss GUI writes for LoRA: the same config trains the text encoders longer there."""
    assert "train_network.py ignores the key" in BY_NAME["stop_text_encoder_training"].help
