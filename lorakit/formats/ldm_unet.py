"""U-Net tensors: diffusers ``UNet2DConditionModel`` keys <-> LDM (SD1/SD2) / SGM (SDXL) checkpoint keys.

Every U-Net tensor is a plain rename (SD2's linear ``proj_in``/``proj_out`` are linear in its checkpoints
too), so this is the module-path map of ``unet_paths`` applied to whole parameter keys.
"""

from __future__ import annotations

from typing import Any, Iterable

from .checkpoint_links import Link, rename
from .unet_paths import UNetLayout, diffusers_to_ldm

__all__ = ["unet_links"]


def unet_links(model_keys: Iterable[str], config: Any) -> list[Link]:
    """One rename per model key; the layout (levels, layers per block, attention blocks, label embedding)
    comes from ``config``. Raises ``ValueError`` listing the model keys that have no checkpoint counterpart."""
    layout = UNetLayout.from_config(config)
    links, orphans = [], []
    for key in model_keys:
        try:
            links.append(rename(key, diffusers_to_ldm(key, layout)))
        except ValueError:
            orphans.append(key)
    if orphans:
        raise ValueError(f"U-Net keys with no LDM/SGM checkpoint counterpart: {orphans[:10]}"
                         + (f" (+{len(orphans) - 10} more)" if len(orphans) > 10 else ""))
    return links
