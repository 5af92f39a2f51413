"""Single-file checkpoint (LDM for SD1/SD2, SGM for SDXL: what A1111/ComfyUI load) <-> diffusers and
transformers state dicts, both directions, for the U-Net, the VAE and the text encoders.

``to_diffusers_recipes`` says how to build each model tensor from checkpoint tensors without reading any
(so the loader can read, cast and drop one tensor at a time); ``to_checkpoint`` converts a whole state dict
back. Both come from the same ``Link`` tables (``ldm_unet``, ``ldm_vae``, ``ldm_text``), so they are exact
inverses: no tensor value is changed, only renamed, reshaped, sliced, concatenated or transposed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from torch import Tensor

from .checkpoint_links import Link
from .ldm_text import text_links
from .ldm_unet import unet_links
from .ldm_vae import vae_links

__all__ = ["Recipe", "COMPONENT_PREFIXES", "KINDS", "to_diffusers_recipes", "to_checkpoint", "unused_keys"]


@dataclass(frozen=True)
class Recipe:
    """How one diffusers/transformers tensor is built: ``build([checkpoint[k] for k in sources])``.
    The result may be a view of a source (no copy); clone it before keeping both."""

    sources: tuple[str, ...]
    build: Callable[[list[Tensor]], Tensor]


COMPONENT_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer."},
    "sd2": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.model."},
    "sdxl": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
             "text_encoder": "conditioner.embedders.0.transformer.",
             "text_encoder_2": "conditioner.embedders.1.model."},
}
KINDS = tuple(COMPONENT_PREFIXES)

# Which stored layout each text encoder uses (see ldm_text).
_TEXT_LAYOUT = {("sd1", "text_encoder"): "hf", ("sd2", "text_encoder"): "openclip",
                ("sdxl", "text_encoder"): "hf", ("sdxl", "text_encoder_2"): "openclip"}


def _links(kind: str, component: str, model_keys: Iterable[str], model_config: Any,
           checkpoint_keys: Iterable[str] | None) -> list[Link]:
    if kind not in COMPONENT_PREFIXES:
        raise ValueError(f"unknown model kind {kind!r}; known: {KINDS}")
    if component not in COMPONENT_PREFIXES[kind]:
        raise ValueError(f"{kind} has no component {component!r}; known: {tuple(COMPONENT_PREFIXES[kind])}")
    if component == "unet":
        return unet_links(model_keys, model_config)
    if component == "vae":
        return vae_links(model_keys, model_config)
    return text_links(_TEXT_LAYOUT[kind, component], model_keys, checkpoint_keys)


def _pick(transform: Callable[[list[Tensor]], list[Tensor]], index: int, tensors: list[Tensor]) -> Tensor:
    return transform(tensors)[index]


def to_diffusers_recipes(kind: str, component: str, model_keys: Iterable[str], model_config: Any,
                         checkpoint_keys: Iterable[str], prefix: str | None = None) -> dict[str, Recipe]:
    """A ``Recipe`` for every key of the target module's state dict (``model_keys``), reading the
    component's checkpoint keys (prefix stripped). Raises ``ValueError`` naming the checkpoint keys that
    are needed but missing, or the model keys that have no counterpart at all. ``prefix``: the prefix the
    keys had in the file, for the message (default the component's ``COMPONENT_PREFIXES`` entry; "" for a
    file without one, such as a VAE file of bare ``encoder.*``/``decoder.*`` keys)."""
    present = set(checkpoint_keys)
    links = _links(kind, component, model_keys, model_config, present)
    missing = [(src, link.model[0]) for link in links for src in link.checkpoint if src not in present]
    if missing:
        shown = ", ".join(f"{src!r} (for {key!r})" for src, key in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        prefix = COMPONENT_PREFIXES[kind][component] if prefix is None else prefix
        under = f" under {prefix!r}" if prefix else ""
        raise ValueError(f"{kind} {component}: the checkpoint lacks {len(missing)} key(s){under}: {shown}{more}")
    recipes = {}
    for link in links:
        for i, key in enumerate(link.model):
            recipes[key] = Recipe(link.checkpoint, functools.partial(_pick, link.to_model, i))
    return recipes


def unused_keys(recipes: Mapping[str, Recipe], checkpoint_keys: Iterable[str]) -> list[str]:
    """The checkpoint keys no recipe reads, in file order (SD2's 24th OpenCLIP layer, ``text_projection``
    and ``logit_scale`` for a projection-less encoder, ``position_ids``, ...)."""
    used = {src for recipe in recipes.values() for src in recipe.sources}
    return [k for k in checkpoint_keys if k not in used]


def to_checkpoint(kind: str, component: str, state_dict: Mapping[str, Tensor], model_config: Any) -> dict[str, Tensor]:
    """The checkpoint tensors (keys without the component prefix; add ``COMPONENT_PREFIXES``) of a
    diffusers/transformers state dict. Raises ``ValueError`` for keys with no counterpart and for groups
    that are only partly present (q without k and v)."""
    out: dict[str, Tensor] = {}
    for link in _links(kind, component, state_dict.keys(), model_config, None):
        tensors = [state_dict[k] for k in link.model]  # links only name keys of state_dict
        out.update(zip(link.checkpoint, link.to_checkpoint(tensors)))
    return out
