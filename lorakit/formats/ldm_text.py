"""Text-encoder tensors: transformers ``CLIPTextModel``/``CLIPTextModelWithProjection`` keys <-> the two
layouts found in single-file checkpoints.

- ``hf`` (SD1 ``cond_stage_model.transformer.``, SDXL ``conditioner.embedders.0.transformer.``): the
  transformers layout itself, saved from a ``CLIPTextModel`` that still had the ``text_model.`` level.
- ``openclip`` (SD2 ``cond_stage_model.model.``, SDXL ``conditioner.embedders.1.model.``): OpenCLIP's
  ``transformer.resblocks.N`` with q/k/v fused into ``attn.in_proj_*`` and ``text_projection`` stored as the
  matrix that right-multiplies (the transpose of transformers' ``text_projection.weight``).

Model keys are taken as given, with or without the ``text_model.`` level (transformers 5 dropped it from
``CLIPTextModel`` but not from ``CLIPTextModelWithProjection``); layer counts come from the keys.
"""

from __future__ import annotations

import re
from typing import Iterable

from .checkpoint_links import Link, fused_qkv_link, rename, transposed_link

__all__ = ["text_links", "TEXT_LAYOUTS"]

TEXT_LAYOUTS = ("hf", "openclip")
_TEXT_MODEL = "text_model."
_HF_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")

_OC_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OC_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV = re.compile(r"self_attn\.([qkv])_proj")


def _orphans_error(orphans: list[str], layout: str) -> ValueError:
    more = f" (+{len(orphans) - 10} more)" if len(orphans) > 10 else ""
    return ValueError(f"text-encoder keys with no {layout} checkpoint counterpart: {orphans[:10]}{more}")


def _hf_links(keys: list[str], checkpoint_keys: set[str] | None) -> list[Link]:
    links = []
    for key in keys:
        core = key[len(_TEXT_MODEL):] if key.startswith(_TEXT_MODEL) else key
        if core.startswith(_HF_TEXT_MODEL_PARTS):
            # SD checkpoints keep the text_model. level; accept a file without it when that is what it has.
            target = _TEXT_MODEL + core
            if checkpoint_keys is not None and target not in checkpoint_keys and core in checkpoint_keys:
                target = core
        else:
            target = key  # e.g. text_projection.weight, outside text_model in transformers too
        links.append(rename(key, target))
    return links


def _openclip_links(keys: list[str]) -> list[Link]:
    links, orphans = [], []
    qkv: dict[tuple[str, str, str], dict[str, str]] = {}  # (prefix, layer, weight|bias) -> {q|k|v: key}
    for key in keys:
        prefix = _TEXT_MODEL if key.startswith(_TEXT_MODEL) else ""
        core = key[len(prefix):]
        if key == "text_projection.weight":
            links.append(transposed_link(key, "text_projection"))
        elif core in _OC_TOP:
            links.append(rename(key, _OC_TOP[core]))
        elif m := _LAYER.fullmatch(core):
            layer, module, param = m.groups()
            if q := _QKV.fullmatch(module):
                qkv.setdefault((prefix, layer, param), {})[q.group(1)] = key
            elif module in _OC_LAYER:
                links.append(rename(key, f"transformer.resblocks.{layer}.{_OC_LAYER[module]}.{param}"))
            else:
                orphans.append(key)
        else:
            orphans.append(key)
    for (prefix, layer, param), group in qkv.items():
        if len(group) != 3:
            raise ValueError(f"layer {layer}: q/k/v {param}s must come together to fuse into in_proj_{param}; "
                             f"got only {sorted(group.values())}")
        links.append(fused_qkv_link((group["q"], group["k"], group["v"]),
                                    f"transformer.resblocks.{layer}.attn.in_proj_{param}"))
    if orphans:
        raise _orphans_error(orphans, "OpenCLIP")
    return links


def text_links(layout: str, model_keys: Iterable[str], checkpoint_keys: Iterable[str] | None = None) -> list[Link]:
    """Links for a text encoder stored in ``layout`` ("hf" or "openclip"). ``checkpoint_keys`` (when
    converting from a file) only chooses between spellings the file may use."""
    keys = list(model_keys)
    if layout == "hf":
        return _hf_links(keys, None if checkpoint_keys is None else set(checkpoint_keys))
    if layout == "openclip":
        return _openclip_links(keys)
    raise ValueError(f"unknown text-encoder layout {layout!r}; known: {TEXT_LAYOUTS}")
