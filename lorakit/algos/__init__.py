"""Adapter algorithms, selected by name as in `algo=...`.

The names below come from registry.py on first use, so that importing a torch-free part of the package (options.py,
which the command line's parsers use) does not import torch and every algorithm."""

from __future__ import annotations

_FROM_OPTIONS = ("AdapterOptions", "OptionError", "parse_options")
_FROM_REGISTRY = ("ALGORITHMS", "Adapter", "algorithm", "make_adapter", "detect_algorithm", "as_loaded",
                  "adapter_from_state_dict", "LoRA", "LoHa", "LoKr", "IA3", "DyLoRA", "GLoRA", "DiagOFT", "BOFT",
                  "Full", "Norm")


def __getattr__(name):
    if name in _FROM_OPTIONS or name in _FROM_REGISTRY:
        import importlib

        module = importlib.import_module(f".{'options' if name in _FROM_OPTIONS else 'registry'}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_FROM_REGISTRY, *_FROM_OPTIONS]
