"""create_network: put adapters on the layers a preset selects, with per-block dims and lr weights."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import torch.nn as nn

from ..algos import OptionError, algorithm, make_adapter
from ..algos.base import COMMON_OPTIONS
from ..algos.options import DEFAULTS, option_name, parse_options
from .blocks import KOHYA_SD25, KOHYA_SDXL23, kohya_block_dims_alphas, parse_kohya_block_lr_kwargs
from .config import NetworkConfig, split_network_kwargs
from .names import GENERIC_PREFIX, NameIndex, detect_arch
from .network import Entry, Network
from .presets import Preset, load_preset
from .targets import NORMS, Selected, select

log = logging.getLogger(__name__)
_COMPONENTS = ("text_encoder", "text_encoder_2")
# LyCORIS' defaults (lycoris/kohya.py create_network) where lorakit's differ: given to an algorithm that does not
# use it, such a value changes nothing in LyCORIS either
_LYCORIS_DEFAULTS = {"bypass_mode": False, "block_size": 4, "dora_axis": "out"}  # dora_axis: wd_on_output=True
# algo 'norm' alone adapts nothing: norm layers get adapters only with train_norm, and the other layers need another
# algorithm
_NORM_HINT = ("; LayerNorm/GroupNorm layers are trained with the option train_norm=true (whatever algo is: algo is "
              "the algorithm of the Linear/Conv layers; dim=0 and conv_dim=0 train the norm layers alone)")


def _is_sd_unet(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return hasattr(config, "get") and bool(config.get("down_block_types")) and hasattr(model, "down_blocks")


def index_model(model: nn.Module, text_encoders, prefix: str) -> tuple[list, str | None, NameIndex]:
    """(text encoders as a list, arch or None, the adapter-name index) of a Stable Diffusion model or any model."""
    if isinstance(text_encoders, nn.Module):
        text_encoders = [text_encoders]
    text_encoders = list(text_encoders or [])
    if _is_sd_unet(model) or text_encoders:
        arch = detect_arch(model, text_encoders)
        return text_encoders, arch, NameIndex.for_sd(model, text_encoders, arch)
    return text_encoders, None, NameIndex.for_model(model, prefix=prefix)


def check_network_kwargs(kwargs: Mapping[str, Any], warn: bool = True) -> tuple[NetworkConfig, dict, Preset]:
    """Parse and check network and adapter options without touching a model: unknown or badly typed options,
    options the algorithm does not take, a preset that does not exist. Returns (config, adapter options, preset).
    `warn` False: the warnings about ignored options are left to the call that builds the network."""
    config, options = split_network_kwargs(kwargs)
    cls = algorithm(config.algo)
    parsed, given = parse_options(options)
    refused = sorted(given - (COMMON_OPTIONS | cls.accepts))
    idle = [name for name in refused if _at_a_default(name, getattr(parsed, name))]
    if idle:
        # kohya_ss writes use_tucker=False, rank_dropout=0, ... for every LyCORIS type, as LyCORIS ignores what an
        # algorithm does not use: an option at its default changes nothing, so it is dropped; a real value stays
        # an error
        if warn:
            log.warning("algo '%s' does not use %s; given at the default, ignored", cls.name,
                        ", ".join(f"{n}={getattr(parsed, n)!r}" for n in idle))
        options = {k: v for k, v in options.items() if option_name(k) not in idle}
        refused = [name for name in refused if name not in idle]
    if refused:
        # the user's own spelling of the option (an alias such as 'constrain')
        spelt = next((k for k in options if option_name(k) == refused[0]), refused[0])
        alias = "" if spelt == refused[0] else f"= {refused[0]}, "
        accepted = ", ".join(sorted(COMMON_OPTIONS | cls.accepts))
        raise OptionError(f"algo '{cls.name}' does not accept option '{spelt}' ({alias}given "
                          f"{getattr(parsed, refused[0])!r}); it accepts: {accepted}{cls.refusal_note(refused[0])}")
    if parsed.bypass_mode is False and "bypass_mode" in given and "bypass_mode" in cls.accepts:
        # LyCORIS' default, and kohya_ss writes it for every LoCon, LoHa and LoKr: there it means dW rebuilt on each
        # call, which lorakit's per-call choice also takes where that is cheaper (the outputs are the same). Taken
        # as "always rebuild", it made a rank-16 LoRA 2.6-3.8x the frozen Linear instead of 1.1-1.5x.
        if warn:
            log.info("bypass_mode=False (LyCORIS' default): lorakit picks the cheaper way per call, as without it")
        options = {k: v for k, v in options.items() if option_name(k) != "bypass_mode"}
    if warn:
        _warn_unused_sizes(config, cls)
    return config, options, load_preset(config.preset)


def _warn_unused_sizes(config: NetworkConfig, cls) -> None:
    """dim/alpha (and the conv ones) that the algorithm does not use, at a value other than the default: a warning
    naming them, not an error, as every trainer passes network_dim and network_alpha (dim still selects the layers:
    0 leaves them out)."""
    defaults = NetworkConfig()
    unused = [f"{name}={getattr(config, name)!r}" for name, kind in
              (("dim", "dim"), ("conv_dim", "dim"), ("alpha", "alpha"), ("conv_alpha", "alpha"))
              if kind not in cls.accepts and getattr(config, name) not in (getattr(defaults, name), 0)]
    if unused:
        log.warning("algo '%s' does not use %s; ignored", cls.name, ", ".join(unused))


def _at_a_default(name: str, value: Any) -> bool:
    """The value is lorakit's default for the option, or LyCORIS' (bypass_mode=False: lorakit's None is "auto")."""
    return value == getattr(DEFAULTS, name) or (name in _LYCORIS_DEFAULTS and value == _LYCORIS_DEFAULTS[name])


def create_network(model: nn.Module, text_encoders: Sequence[nn.Module] | nn.Module | None = None,
                   **kwargs: Any) -> Network:
    """Adapters on a Stable Diffusion U-Net (and its text encoders), or on any nn.Module.

    kwargs: the network options (algo, preset, dim, alpha, conv_dim, conv_alpha, train_norm, multiplier, block_dims,
    block_alphas, conv_block_dims, conv_block_alphas, down/mid/up_lr_weight, block_lr_zero_threshold, loraplus_*)
    and any adapter option (dropout, factor, dora_wd, ...), with kohya's and LyCORIS' spellings."""
    config, options, preset = check_network_kwargs(kwargs)
    cls = algorithm(config.algo)
    preset = preset.for_algo(cls.name)
    text_encoders, arch, index = index_model(model, text_encoders, preset.lora_prefix or GENERIC_PREFIX)
    if arch is not None:
        selected = select("unet", model, preset, preset.unet_target_module, preset.unet_target_name)
        for component, te in zip(_COMPONENTS, text_encoders):
            selected += select(component, te, preset, preset.text_encoder_target_module,
                               preset.text_encoder_target_name)
    else:
        # a module_algo_map class is a target class too, as LyCORIS' wrapper.py adds those to its targets
        targets = (*(preset.target_module or ()), *preset.module_algo_map)
        selected = select("model", model, preset, targets, preset.target_name, everything=preset.target_module is None)

    plan = _BlockPlan(config, arch, index, selected)
    adapters, entries = {}, {}
    for item in selected:
        made = _make(item, config, cls.name, options, plan, preset)
        if made is None:
            continue
        name = index.name_of(item.component, item.path)
        adapters[name], entries[name] = made, Entry(item.component, item.path)
    if not adapters:
        hint = _NORM_HINT if cls.name == "norm" and not config.train_norm else ""
        raise ValueError(f"preset '{preset.name}' selected no layer of this model for algo '{cls.name}' "
                         f"(dim={config.dim}, conv_dim={config.conv_dims[0]}){hint}")
    # a 1x1 orthogonal block is the identity: an output count with no factor near dim (a prime) rotates nothing
    fixed = [name for name, a in adapters.items() if getattr(a, "oft_blocks", None) is not None
             and a.oft_blocks.shape[-1] == 1]
    if fixed:
        log.warning("lorakit: %d OFT adapter(s) have blocks of size 1, which cannot rotate anything (their output "
                    "count has no factor near dim, e.g. a prime): %s", len(fixed),
                    ", ".join(fixed[:5]) + (", ..." if len(fixed) > 5 else ""))
    loraplus = {"all": config.loraplus_lr_ratio, "unet": config.loraplus_unet_lr_ratio,
                "te": config.loraplus_text_encoder_lr_ratio}
    network = Network(adapters, entries, arch, config.multiplier, plan.lr_weights, loraplus,
                      models=[model, *text_encoders])
    network.config = config
    return network


class _BlockPlan:
    """kohya's per-block dims/alphas and lr weights, resolved per selected U-Net layer."""

    def __init__(self, config: NetworkConfig, arch: str | None, index: NameIndex, selected: list[Selected]):
        self.dims: dict[str, tuple] = {}
        self.lr_weights: dict[str, float] = {}
        config = _without_lone_block_options(config)
        if config.block_dims is None and not _has_lr_weights(config):
            return
        if arch is None:
            raise OptionError("block_dims, block_alphas, conv_block_* and *_lr_weight need a Stable Diffusion U-Net")
        sdxl = arch == "sdxl"
        layout = KOHYA_SDXL23 if sdxl else KOHYA_SD25
        lr = parse_kohya_block_lr_kwargs(sdxl, {"down_lr_weight": config.down_lr_weight,
                                                "mid_lr_weight": config.mid_lr_weight,
                                                "up_lr_weight": config.up_lr_weight,
                                                "block_lr_zero_threshold": config.block_lr_zero_threshold})
        conv_dim, conv_alpha = config.conv_dims
        dims = kohya_block_dims_alphas(sdxl, config.dim, config.alpha, config.block_dims, config.block_alphas,
                                       conv_dim, conv_alpha, config.conv_block_dims, config.conv_block_alphas, lr)
        for item in selected:
            if item.component != "unet":
                continue
            i = layout.index(item.path, "unet")
            if i is None:
                continue
            name = index.name_of(item.component, item.path)
            if lr is not None:
                self.lr_weights[name] = lr[i]
            self.dims[item.path] = tuple(v[i] if v is not None else None for v in dims)


_FOLLOWER_BLOCK_OPTIONS = ("block_alphas", "conv_block_dims", "conv_block_alphas")


def _has_lr_weights(config: NetworkConfig) -> bool:
    return any(v is not None for v in (config.down_lr_weight, config.mid_lr_weight, config.up_lr_weight))


def _without_lone_block_options(config: NetworkConfig) -> NetworkConfig:
    """sd-scripts' create_network reads block_alphas and conv_block_* only with block_dims or a block lr weight:
    alone, they are dropped, with a warning."""
    lone = [name for name in _FOLLOWER_BLOCK_OPTIONS if getattr(config, name) is not None]
    if not lone or config.block_dims is not None or _has_lr_weights(config):
        return config
    log.warning("lorakit: %s ignored: as in sd-scripts' networks.lora, they apply only with block_dims or a block lr "
                "weight (down/mid/up_lr_weight); give block_dims too (every value the dim) to use them", ", ".join(lone))
    return dataclasses.replace(config, **{name: None for name in lone})


def _make(item: Selected, config: NetworkConfig, algo: str, options: dict, plan: _BlockPlan, preset: Preset):
    module = item.module
    override = dict(item.override or {})
    if isinstance(module, NORMS):
        if not config.train_norm:
            return None
        algo, dim, alpha, override = "norm", None, None, {}  # train_norm's norm adapters take no override
    else:
        conv_k = _takes_conv_dim(module, config)
        block = plan.dims.get(item.path) if item.component == "unet" else None
        if conv_k:
            dim, alpha = config.conv_dims
            if block is not None and block[2] is not None:
                dim, alpha = block[2], block[3]
            if not preset.enable_conv:  # LyCORIS: conv dim 0, which an algo-map entry's dim still overrides
                dim = 0
        else:
            dim, alpha = config.dim, config.alpha
            if block is not None and block[0] is not None:
                dim, alpha = block[0], block[1]
            if not dim:  # LyCORIS' create_single_module: linear dim 0 leaves the layer out, whatever an entry says
                return None
        algo = override.pop("algo", algo)
        conv_override = _canonical({k[5:]: override.pop(k) for k in ("conv_dim", "conv_alpha") if k in override})
        override = _canonical(override)  # kohya/LyCORIS spellings (lora_dim, network_alpha, wd_on_out, ...)
        # an entry's alpha of 0 is the layer's alpha (LyCORIS' create_single_module: alpha or self.alpha)
        dim, alpha = override.pop("dim", dim), override.pop("alpha", 0) or alpha
        if conv_k:
            dim, alpha = conv_override.get("dim", dim), conv_override.get("alpha", 0) or alpha
        if not dim:
            return None  # dim 0 disables this kind of layer (or this block)
    cls = algorithm(algo)
    allowed = COMMON_OPTIONS | cls.accepts  # the override holds only these (Preset.for_algo)
    merged = {k: v for k, v in {**_canonical(options), **override}.items() if k in allowed}
    if "dim" in cls.accepts and dim is not None:
        merged["dim"] = dim
    if "alpha" in cls.accepts and alpha is not None:
        merged["alpha"] = alpha
    merged["multiplier"] = config.multiplier
    try:
        extra = {"strict_factor": False} if cls.name == "lokr" else {}
        return make_adapter(cls.name, module, **merged, **extra)
    except (OptionError, ValueError, TypeError) as err:
        hint = _NORM_HINT if cls.name == "norm" and not isinstance(module, NORMS) else ""
        raise type(err)(f"{item.component} layer '{item.path}' ({type(module).__name__}): {err}{hint}") from None


def _takes_conv_dim(module: nn.Module, config: NetworkConfig) -> bool:
    """Convs with a kernel > 1 take conv_dim/conv_alpha; 1x1 convs too when dim is 0, as LyCORIS'
    create_single_module counts them as Linear layers only while the linear dim is > 0. With
    conv_1x1_always_linear (sd-scripts' networks.lora and networks.dylora) they stay Linear layers: dim 0 leaves
    them out."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return False
    if any(k != 1 for k in module.kernel_size):
        return True
    return config.dim == 0 and not config.conv_1x1_always_linear


def _canonical(options: dict) -> dict:
    """Adapter options under their lorakit names, with their typed values."""
    parsed, given = parse_options(options)
    return {name: getattr(parsed, name) for name in given}
