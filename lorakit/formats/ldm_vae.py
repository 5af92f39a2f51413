"""VAE tensors: diffusers ``AutoencoderKL`` keys <-> LDM ``first_stage_model`` checkpoint keys.

The LDM decoder numbers its up blocks from the lowest resolution (``up.0`` is the last to run), diffusers
in running order, so ``up_blocks.i`` = ``up.{n-1-i}``. The mid-block attention's q/k/v/out are 1x1 convs
in the file and linears in diffusers.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from .checkpoint_links import Link, config_get, conv1x1_link, rename

__all__ = ["vae_links"]

_TOP = {"conv_norm_out": "norm_out"}
_RESNET = {"conv_shortcut": "nin_shortcut"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_ATTN_LINEAR = {"to_q", "to_k", "to_v", "to_out.0"}
_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets\.(\d+)|attentions\.0)\.(.+)")


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def _vae_link(key: str, num_up: int) -> Link | None:
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return rename(key, key)
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return None
    head, _, tail = rest.partition(".")
    if head in ("conv_in", "conv_out", "conv_norm_out"):
        return rename(key, f"{side}.{_TOP.get(head, head)}.{tail}")
    m = _BLOCK.fullmatch(rest)
    if m:
        direction, i, what, j, inner = m.groups()
        if direction == "up":
            i = str(num_up - 1 - int(i))
        block = f"{side}.{direction}.{i}"
        if j is not None:
            return rename(key, f"{block}.block.{j}.{_resnet_rest(inner)}")
        sampler = "downsample" if direction == "down" else "upsample"
        return rename(key, f"{block}.{sampler}.{inner}")
    m = _MID.fullmatch(rest)
    if m:
        what, j, inner = m.groups()
        if j is not None:
            return rename(key, f"{side}.mid.block_{int(j) + 1}.{_resnet_rest(inner)}")
        module, _, param = inner.rpartition(".")
        if module not in _ATTN:
            return None
        target = f"{side}.mid.attn_1.{_ATTN[module]}.{param}"
        if module in _ATTN_LINEAR and param == "weight":
            return conv1x1_link(key, target)
        return rename(key, target)
    return None


def vae_links(model_keys: Iterable[str], config: Any) -> list[Link]:
    """One link per model key. Raises ``ValueError`` listing the model keys that have no counterpart."""
    keys = list(model_keys)
    up_types = config_get(config, "up_block_types")
    if up_types is not None:
        num_up = len(up_types)
    else:  # no config: count the decoder's up blocks in the keys
        num_up = 1 + max((int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))),
                         default=-1)
    links, orphans = [], []
    for key in keys:
        link = _vae_link(key, num_up)
        (links.append(link) if link is not None else orphans.append(key))
    if orphans:
        raise ValueError(f"VAE keys with no LDM checkpoint counterpart: {orphans[:10]}"
                         + (f" (+{len(orphans) - 10} more)" if len(orphans) > 10 else ""))
    return links
