"""`network_module` and `network_args` ("key=value" strings, as sd-scripts passes them): parsed, and checked against
lorakit's network and adapter options before any model is loaded (the network code owns the names; this only asks
it early)."""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Mapping

from ..algos.options import OptionError, option_name, suggest

log = logging.getLogger(__name__)

# sd-scripts network modules lorakit trains in their place: the value is the algorithm the module implies
# (None: any, chosen by network_args algo=..., default lora).
NETWORK_MODULES = {"lorakit": None, "lorakit.kohya": None, "lycoris.kohya": None, "networks.lora": "lora",
                   "networks.dylora": "dylora"}
# network_args that repeat a TrainConfig option, and that option
_REPEATS = {"dim": "network_dim", "network_dim": "network_dim", "lora_dim": "network_dim",
            "alpha": "network_alpha", "network_alpha": "network_alpha", "dropout": "network_dropout"}


def parse_network_args(items: Iterable[str]) -> dict[str, str]:
    """["algo=loha", "conv_dim=8"] -> {"algo": "loha", "conv_dim": "8"}; values stay strings (the network parses)."""
    parsed: dict[str, str] = {}
    for item in items:
        key, eq, value = str(item).partition("=")  # the first '=' splits: values may hold '=' (sd-scripts: error)
        key = key.strip()
        if not eq or not key:
            raise OptionError(f"network_args: expected 'key=value', got {item!r}")
        if key in parsed and parsed[key] != value.strip():
            # sd-scripts fills a dict: the last one wins (kohya_ss' LoCon/LoHa args hold use_tucker twice)
            log.warning("network_args: '%s' given twice (%r, then %r); the last is used, as in sd-scripts", key,
                        parsed[key], value.strip())
        parsed[key] = value.strip()
    return parsed


def ss_network_args(network_args: Iterable[str], network_dropout: float | None,
                    dim_from_weights: bool = False) -> str | None:
    """The ss_network_args metadata as sd-scripts' train_network.py writes it: the key=value strings as given (split
    at the first '='; a repeated key keeps its last value) plus "dropout" = network_dropout when they give none (its
    LyCORIS workaround; null when unset; not with dim_from_weights), as JSON; None (no key) without network_args.
    lorakit's own rewrites (algo, preset, conv_alpha, ...) stay out: a reader re-running these args with sd-scripts
    or LyCORIS gets the network they describe."""
    items = [str(item) for item in network_args]
    if not items:
        return None
    kwargs: dict[str, Any] = dict(item.partition("=")[::2] for item in items)
    if not dim_from_weights:
        kwargs.setdefault("dropout", network_dropout)
    return json.dumps(kwargs)


LORAPLUS_OPTIONS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


def network_kwargs(network_module: str, network_args: Iterable[str],
                   loraplus: Mapping[str, float | None] | None = None) -> dict[str, str]:
    """The network options a run asks for: network_args, plus the algorithm its network_module implies."""
    module = network_module.strip()
    if module not in NETWORK_MODULES:
        raise OptionError(f"option 'network_module': {network_module!r} is not a network lorakit trains"
                          f"{suggest(module, NETWORK_MODULES)}; use 'lorakit' with network_args algo=... "
                          f"(accepted: {', '.join(NETWORK_MODULES)})")
    kwargs = parse_network_args(network_args)
    for name, value in (loraplus or {}).items():  # the kohya_ss GUI writes these at the top level
        if not value:  # unset, or 0: the GUI's "off"
            continue
        if name in kwargs and float(kwargs[name]) != value:
            raise OptionError(f"{name} given twice: {value:g} and network_args {name}={kwargs[name]}")
        kwargs.setdefault(name, f"{value:g}")
    implied = NETWORK_MODULES[module]
    if implied is not None:
        algo = kwargs.get("algo", implied)
        if algo.strip().lower() != implied:
            raise OptionError(f"network_args algo={algo} contradicts network_module {module!r} (which is {implied}); "
                              f"use network_module = 'lorakit' to choose the algorithm")
        kwargs["algo"] = implied
        if module == "networks.lora":
            _rescale_rank_dropout_as_sd_scripts(kwargs)
        if module == "networks.dylora" and "dylora_all_ranks" not in kwargs:
            kwargs["dylora_all_ranks"] = "true"  # sd-scripts' DyLoRA training step (algos/dylora.py)
        conv = _sd_scripts_trains_convs(kwargs)
        if "preset" not in kwargs:  # sd-scripts' own target sets: the transformer blocks, and the ResNets with convs
            kwargs["preset"] = "attn-mlp-convblock" if conv else "attn-mlp"
        if conv and "conv_alpha" not in kwargs:
            # sd-scripts' default for conv_dim's alpha and conv_block_alphas (not network_alpha, lorakit's own)
            kwargs["conv_alpha"] = "1.0"
    return kwargs


_LR_WEIGHTS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")


def _sd_scripts_trains_convs(kwargs: Mapping[str, str]) -> bool:
    """sd-scripts' LoRANetwork extends its U-Net targets to the ResNets and samplers when conv_dim is given, or
    conv_block_dims (which create_network reads only with block_dims or a block lr weight: kohya_ss' "Standard" LoRA
    writes conv_block_dims without conv_dim). conv_dim=0 counts as given: the ResNets' Linear and 1x1 layers train at
    network_dim, only the kxk convs are left out."""
    if kwargs.get("conv_dim", "").strip() not in ("", "None"):
        return True
    per_block = any(key in kwargs for key in ("block_dims", *_LR_WEIGHTS))
    return per_block and kwargs.get("conv_block_dims", "").strip() not in ("", "None")


def _rescale_rank_dropout_as_sd_scripts(kwargs: dict[str, str]) -> None:
    """sd-scripts' LoRAModule.forward always divides the kept rank components by (1 - rank_dropout), so a training
    step sees the eval-time change on average; lorakit's lora follows LyCORIS (no rescale) unless
    rank_dropout_scale is set: networks.lora sets it, unless network_args give it."""
    given = {option_name(key) for key in kwargs}
    if "rank_dropout" in given and "rank_dropout_scale" not in given:
        kwargs["rank_dropout_scale"] = "true"


def check_network_args(values: Mapping[str, Any], given: frozenset) -> list[str]:
    """Refuse, before any model loads, network_args the network would refuse: unknown names (with the closest
    suggested), bad values, options the algorithm does not take, a preset that does not exist, and repeats of
    network_dim / network_alpha / network_dropout. Returns notes on what trains otherwise than a user may expect."""
    kwargs = network_kwargs(values["network_module"], values["network_args"],
                            {name: values[name] for name in LORAPLUS_OPTIONS})
    for key, option in _REPEATS.items():
        if key not in kwargs:
            continue
        if option == "network_dropout":
            if values[option] is not None and float(kwargs[key]) != values[option]:
                raise OptionError(f"dropout given twice: network_dropout = {values[option]} and network_args "
                                  f"dropout={kwargs[key]}")
        elif option in given:
            raise OptionError(f"network_args '{key}={kwargs[key]}' repeats option {option} "
                              f"(= {values[option]!r}); give it once")
    # the network and adapter code (and torch) load only now: configs without network_args stay light
    from ..network.create import check_network_kwargs

    try:
        check_network_kwargs(kwargs, warn=False)  # building the network warns, with network_dim/alpha known
    except OptionError as e:
        raise OptionError(f"network_args: {e}") from None
    return _full_with_parameter_scaled_adafactor(values, kwargs)


def _full_with_parameter_scaled_adafactor(values: Mapping[str, Any], kwargs: Mapping[str, str]) -> list[str]:
    """lorakit's `full` trains each weight's change (zero at the start; the file's diff, exact), LyCORIS' full the
    whole weight once applied. Optimizers that step the same whatever the parameter's offset train both alike, but
    Adafactor's scale_parameter multiplies each step by the trained tensor's RMS: the change's starts at Adafactor's
    floor (eps 1e-3), the weight's is ~0.02-0.05 on SD's layers, so steps are 20-50x smaller than in LyCORIS."""
    from ..algos.registry import algorithm
    from .optimizers import parse_kwargs

    if values.get("optimizer_type") != "Adafactor" or algorithm(kwargs.get("algo", "lora")).name != "full":
        return []
    if not parse_kwargs(values.get("optimizer_args")).get("scale_parameter", True):
        return []
    return ["algo=full with Adafactor's scale_parameter (its default): lorakit's full trains each weight's change, "
            "which starts at 0, so Adafactor scales its steps by its floor (eps 1e-3) where LyCORIS' full, which "
            "trains the whole weight, scales them by the weight's RMS (~0.02-0.05 on SD): steps 20-50x smaller. "
            "For steps of the learning rate you choose give optimizer_args scale_parameter=False "
            "relative_step=False warmup_init=False and a learning_rate (kohya's full fine-tuning settings)"]
