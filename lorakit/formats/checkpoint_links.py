"""A ``Link``: one group of tensors that correspond between a diffusers/transformers state dict and a
single-file checkpoint, with the exact tensor transforms in each direction.

Most links are plain renames (one key each side, identity). The others: a VAE attention linear <-> its 1x1
conv, OpenCLIP's fused ``in_proj_weight`` <-> q/k/v, ``text_projection`` <-> its transpose. Keeping both
directions in one object is what makes the two converters each other's exact inverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = ["Link", "rename", "conv1x1_link", "fused_qkv_link", "transposed_link", "config_get"]

Transform = Callable[[Sequence[Tensor]], list[Tensor]]


def _same(ts: Sequence[Tensor]) -> list[Tensor]:
    return list(ts)


def _conv_to_linear(ts: Sequence[Tensor]) -> list[Tensor]:
    # reshape, not [:, :, 0, 0]: also accepts files that already store the linear (2-d) or a 1-d conv (3-d).
    return [t.reshape(t.shape[0], t.shape[1]) for t in ts]


def _linear_to_conv(ts: Sequence[Tensor]) -> list[Tensor]:
    return [t.reshape(*t.shape, 1, 1) for t in ts]


def _split3(ts: Sequence[Tensor]) -> list[Tensor]:
    (t,) = ts
    if t.shape[0] % 3:
        raise ValueError(f"fused q/k/v tensor of shape {tuple(t.shape)}: first dim not divisible by 3")
    # views, no copy: the loader copies them into the parameters anyway.
    return list(t.chunk(3, dim=0))


def _cat(ts: Sequence[Tensor]) -> list[Tensor]:
    return [torch.cat(list(ts), dim=0)]


def _transpose(ts: Sequence[Tensor]) -> list[Tensor]:
    return [t.T.contiguous() for t in ts]


@dataclass(frozen=True)
class Link:
    """``model`` keys <-> ``checkpoint`` keys (component prefix stripped); ``to_model`` maps the checkpoint
    tensors (in key order) to the model tensors, ``to_checkpoint`` the other way."""

    model: tuple[str, ...]
    checkpoint: tuple[str, ...]
    to_model: Transform = _same
    to_checkpoint: Transform = _same


def rename(model_key: str, checkpoint_key: str) -> Link:
    return Link((model_key,), (checkpoint_key,))


def conv1x1_link(model_key: str, checkpoint_key: str) -> Link:
    """A model linear weight stored in the file as a 1x1 conv (LDM VAE attention)."""
    return Link((model_key,), (checkpoint_key,), _conv_to_linear, _linear_to_conv)


def fused_qkv_link(model_keys: tuple[str, str, str], checkpoint_key: str) -> Link:
    """q, k, v (weights or biases) stored concatenated along dim 0 (OpenCLIP ``in_proj_*``)."""
    return Link(tuple(model_keys), (checkpoint_key,), _split3, _cat)


def transposed_link(model_key: str, checkpoint_key: str) -> Link:
    """A ``Linear`` weight stored as the matrix it right-multiplies (OpenCLIP ``text_projection``)."""
    return Link((model_key,), (checkpoint_key,), _transpose, _transpose)


def config_get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for a dict or a diffusers/transformers config object."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)
