"""The algorithms by name (`algo=...`), and which algorithm a saved module's tensors are."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from .base import Adapter
from .boft import BOFT
from .diag_oft import LEGACY_ROTATION_KEY, DiagOFT, from_legacy_rotation
from .dylora import DyLoRA
from .full import Full
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .norm import Norm
from .options import AdapterOptions, OptionError, parse_options

ALGORITHMS: tuple[type[Adapter], ...] = (LoRA, LoHa, LoKr, IA3, DyLoRA, GLoRA, DiagOFT, BOFT, Full, Norm)
_BY_NAME = {name: cls for cls in ALGORITHMS for name in (cls.name, *cls.aliases)}
# Reading a file: the first class whose detect key is present decides (DyLoRA files are LoRA files).
_DETECT_ORDER = (LoRA, LoHa, LoKr, IA3, GLoRA, DiagOFT, BOFT, Full, Norm)


def algorithm(name: str) -> type[Adapter]:
    key = name.strip().lower().replace("_", "-")
    key = {"oft": "diag-oft", "diagoft": "diag-oft", "native": "full", "ia^3": "ia3", "(ia)^3": "ia3"}.get(key, key)
    if key not in _BY_NAME:
        from .options import suggest

        raise OptionError(f"unknown algo '{name}'{suggest(key, _BY_NAME)}; choose one of: {', '.join(sorted(_BY_NAME))}")
    return _BY_NAME[key]


def make_adapter(algo: str, layer: nn.Module, **options) -> Adapter:
    """An adapter of algorithm `algo` on `layer`, e.g. make_adapter("loha", conv, dim=8, alpha=4)."""
    return algorithm(algo)(layer, **options)


def detect_algorithm(sd: Mapping[str, torch.Tensor]) -> type[Adapter]:
    """The algorithm of one module's tensors (keys without the module name)."""
    for cls in _DETECT_ORDER:
        if any(k in sd for k in cls.detect_keys):
            if cls is DiagOFT and sd["oft_blocks"].dim() == 4:
                return BOFT
            if cls is BOFT and sd["oft_blocks"].dim() == 3:
                return DiagOFT
            return cls
    if LEGACY_ROTATION_KEY in sd:
        raise ValueError(f"the tensors {sorted(sd)} are an old LyCORIS Diag-OFT module ('{LEGACY_ROTATION_KEY}': "
                         "each block's rotation R itself, LyCORIS 2.0): loading it (load_network) reads it as "
                         "Diag-OFT; save the loaded network again for the other tools")
    raise ValueError(f"no adapter algorithm has the tensors {sorted(sd)}")


def as_loaded(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """One module's saved tensors as the loaders read them: an old LyCORIS Diag-OFT module's rotations converted to
    Diag-OFT's blocks, any other module as it is."""
    return from_legacy_rotation(dict(sd)) if LEGACY_ROTATION_KEY in sd else sd


def adapter_from_state_dict(layer: nn.Module, sd: Mapping[str, torch.Tensor], **options) -> Adapter:
    """Build and load the adapter that one module's saved tensors describe (read as_loaded)."""
    sd = as_loaded(sd)
    return detect_algorithm(sd).from_state_dict(layer, sd, **options)


__all__ = [
    "ALGORITHMS", "Adapter", "AdapterOptions", "OptionError", "parse_options", "algorithm", "make_adapter",
    "detect_algorithm", "as_loaded", "adapter_from_state_dict", *[cls.__name__ for cls in ALGORITHMS],
]
