"""Network options (kohya `network_args` and LyCORIS names): split from the per-adapter options, typed, validated."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from ..algos.options import ALIASES as ADAPTER_ALIASES
from ..algos.options import OPTION_NAMES, OptionError, suggest, to_bool, to_float, to_int

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetworkConfig:
    algo: str = "lora"
    preset: Any = "full"
    dim: int = 4
    alpha: float = 1.0
    conv_dim: int | None = None  # None: the linear dim (LyCORIS); 0 disables the convs that take it
    conv_alpha: float | None = None
    # 1x1 convs take dim/alpha, and with dim 0 conv_dim/conv_alpha (LyCORIS); true: always dim (sd-scripts)
    conv_1x1_always_linear: bool = False
    train_norm: bool = False
    multiplier: float = 1.0
    block_dims: Any = None
    block_alphas: Any = None
    conv_block_dims: Any = None
    conv_block_alphas: Any = None
    down_lr_weight: Any = None
    mid_lr_weight: Any = None
    up_lr_weight: Any = None
    block_lr_zero_threshold: float = 0.0
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None

    @property
    def linear_dim(self) -> int:
        return self.dim

    @property
    def conv_dims(self) -> tuple[int, float]:
        dim = self.dim if self.conv_dim is None else self.conv_dim
        alpha = self.alpha if self.conv_alpha is None else self.conv_alpha
        return dim, alpha


NETWORK_KEYS = frozenset(f.name for f in dataclasses.fields(NetworkConfig))
_NETWORK_ALIASES = {"network_dim": "dim", "network_alpha": "alpha", "lora_dim": "dim", "conv_lora_dim": "conv_dim",
                    "network_module": "algo", "neuron_dropout": "dropout"}
_INTS = {"dim", "conv_dim"}
_BOOLS = {"train_norm", "conv_1x1_always_linear"}
_FLOATS = {"alpha", "conv_alpha", "multiplier", "block_lr_zero_threshold", "loraplus_lr_ratio",
           "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"}


def _network_value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _INTS:
        number = to_int(name, value)
        if number < 0:
            raise OptionError(f"option '{name}': expected an integer >= 0, got {value!r}")
        return number
    if name in _FLOATS:
        return to_float(name, value)
    if name in _BOOLS:
        return to_bool(name, value)
    if name == "algo":
        return str(value).strip().lower()
    return value


# LyCORIS' network options for text encoders that SD1/SD2/SDXL do not have (Flux/SD3's T5-XXL, the LLM adapters of
# newer models): off, as LyCORIS defaults them, they change nothing; on, they ask for a model lorakit does not train.
_OTHER_MODELS_PARTS = {"train_t5xxl": "T5-XXL text encoder", "train_llm_adapter": "LLM adapter"}


def _check_other_models_part(name: str, value: Any) -> None:
    what = _OTHER_MODELS_PARTS[name]
    if to_bool(name, value):
        raise OptionError(f"network option '{name}' ({value!r}): lorakit trains SD1, SD2 and SDXL, which have no "
                          f"{what}")
    log.warning("network option '%s' (%r) ignored: SD1, SD2 and SDXL have no %s", name, value, what)


def split_network_kwargs(kwargs: Mapping[str, Any]) -> tuple[NetworkConfig, dict[str, Any]]:
    """(network options, adapter options). Unknown names are errors that suggest the closest known one."""
    network: dict[str, Any] = {}
    adapter: dict[str, Any] = {}
    for key, value in kwargs.items():
        name = str(key).strip()
        if name == "disable_conv_cp":  # LyCORIS' negative spelling of use_tucker
            name, value = "use_tucker", not to_bool("disable_conv_cp", value)
        elif name in ("use_conv_cp", "wd_on_output"):
            name = {"use_conv_cp": "use_tucker", "wd_on_output": "wd_on_out"}[name]
        name = _NETWORK_ALIASES.get(name, name)
        if name in _OTHER_MODELS_PARTS:
            _check_other_models_part(name, value)
            continue
        if name in NETWORK_KEYS:
            network[name] = _network_value(name, value)
        elif name in OPTION_NAMES or name in ADAPTER_ALIASES or name == "wd_on_out":
            if name in ("dim", "alpha"):
                network[name] = _network_value(name, value)
            else:
                adapter[name] = value
        else:
            known = NETWORK_KEYS | OPTION_NAMES | set(ADAPTER_ALIASES) | set(_NETWORK_ALIASES)
            raise OptionError(f"unknown network option '{key}'{suggest(name, known)}")
    config = dataclasses.replace(NetworkConfig(), **{k: v for k, v in network.items() if v is not None or
                                                     k in ("conv_dim", "conv_alpha")})
    if config.dim < 0:
        raise OptionError(f"option 'dim': expected an integer >= 0, got {config.dim}")
    return config, adapter
