"""lorakit: parameter-efficient fine-tuning for Stable Diffusion and any PyTorch model."""

__version__ = "0.1.0"

_LAZY = {"create_network": "lorakit.network", "load_network": "lorakit.network", "Network": "lorakit.network",
         "make_adapter": "lorakit.algos", "adapter_from_state_dict": "lorakit.algos"}


def __getattr__(name):  # import torch-heavy parts on first use, so `lorakit --version` stays instant
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
