"""The identity of a frozen model for cache keys: what decides its outputs besides the input."""

from __future__ import annotations

import hashlib
import json

import torch

__all__ = ["module_fingerprint"]


def module_fingerprint(module: torch.nn.Module) -> str:
    """A SHA-256 of the module's class, config and every weight (values, dtype and shape).

    The config is a diffusers FrozenDict (a mapping) or a transformers config (``to_dict()``). Keys starting with
    "_" describe the file, not the model, and diffusers' ``_use_default_values`` comes from a set: its order changes
    with every process (string hashing is seeded), which would change the key each run."""
    digest = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        values = {k: v for k, v in items.items() if not k.startswith("_")}
        digest.update(json.dumps(values, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
