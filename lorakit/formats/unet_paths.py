"""U-Net module paths: diffusers <-> original LDM/SGM, exact in both directions for every module that has a
counterpart (see ``diffusers_to_ldm``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class UNetLayout:
    """What the path map needs to know of a ``UNet2DConditionModel``: which down/up blocks have
    attentions, resnets per down block, whether the mid block has an attention, and which diffusers
    embedding is the LDM ``label_emb.0`` (``"add_embedding"`` for SDXL's text_time, ``"class_embedding"``)."""

    down_attn: tuple[bool, ...]
    up_attn: tuple[bool, ...]
    layers_per_block: int = 2
    mid_attn: bool = True
    label_emb: str | None = None

    def __post_init__(self) -> None:
        if len(self.down_attn) != len(self.up_attn) or not self.down_attn:
            raise ValueError("down_attn and up_attn must be non-empty and of the same length")
        if self.layers_per_block < 1:
            raise ValueError("layers_per_block must be >= 1")

    @property
    def num_blocks(self) -> int:
        return len(self.down_attn)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "UNetLayout":
        """Layout of a diffusers ``UNet2DConditionModel`` config (a dict or ``unet.config``)."""
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        lpb = get("layers_per_block", 2)
        if isinstance(lpb, (list, tuple)):
            if len(set(lpb)) != 1:
                raise ValueError(f"per-block layers_per_block {lpb} has no LDM layout")
            lpb = lpb[0]
        down = tuple("CrossAttn" in t for t in get("down_block_types"))
        up = tuple("CrossAttn" in t for t in get("up_block_types"))
        mid_type = get("mid_block_type", "UNetMidBlock2DCrossAttn") or ""
        label = None
        if get("addition_embed_type", None) == "text_time":
            label = "add_embedding"
        elif get("class_embed_type", None) in ("timestep", "projection", "identity"):
            label = "class_embedding"
        return cls(down, up, int(lpb), mid_attn="CrossAttn" in mid_type, label_emb=label)


SD_LAYOUT = UNetLayout(down_attn=(True, True, True, False), up_attn=(False, True, True, True))
"""SD1.x and SD2.x (``input_blocks.0..11``, ``output_blocks.0..11``)."""

SDXL_LAYOUT = UNetLayout(down_attn=(False, True, True), up_attn=(True, True, False), label_emb="add_embedding")
"""SDXL base/refiner-style 3-level U-Net (``input_blocks.0..8``, ``output_blocks.0..8``)."""

_TOP_D2L = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_act": "out.1", "conv_out": "out.2"}
_TOP_L2D = {v: k for k, v in _TOP_D2L.items()}
_EMB_D2L = {"linear_1": "0", "act": "1", "linear_2": "2"}
_EMB_L2D = {v: k for k, v in _EMB_D2L.items()}
_RESNET_D2L = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "dropout": "out_layers.2",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_L2D = {v: k for k, v in _RESNET_D2L.items()}
_NUM = re.compile(r"0|[1-9][0-9]*")


def _no_counterpart(path: str, where: str) -> ValueError:
    return ValueError(f"module path {path!r} has no {where} counterpart")


def _index(part: str, path: str) -> int:
    if not _NUM.fullmatch(part):
        raise ValueError(f"bad index {part!r} in module path {path!r}")
    return int(part)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _parts(path: str, n: int) -> list[str]:
    parts = path.split(".")
    if len(parts) < n:
        raise ValueError(f"module path {path!r} is a container without a 1:1 counterpart")
    return parts


def _resnet_d2l(rest: list[str], path: str) -> str:
    if not rest:
        return ""
    if rest[0] not in _RESNET_D2L:
        raise _no_counterpart(path, "LDM")
    return _join(_RESNET_D2L[rest[0]], *rest[1:])


def _resnet_l2d(rest: list[str], path: str) -> str:
    if not rest:
        return ""
    key = rest[0] if rest[0] == "skip_connection" else ".".join(rest[:2])
    if key not in _RESNET_L2D:
        raise _no_counterpart(path, "diffusers")
    return _join(_RESNET_L2D[key], *rest[len(key.split(".")):])


def _sampler(rest: list[str], path: str, src: str, dst: str) -> str:
    if not rest:
        return ""
    if rest[0] != src:
        raise _no_counterpart(path, "other-layout")
    return _join(dst, *rest[1:])


def _emb(rest: list[str], path: str, table: Mapping[str, str]) -> str:
    if not rest:
        return ""
    if rest[0] not in table:
        raise _no_counterpart(path, "other-layout")
    return _join(table[rest[0]], *rest[1:])


def diffusers_to_ldm(path: str, layout: UNetLayout = SD_LAYOUT) -> str:
    """The LDM/SGM path (``input_blocks.4.1.proj_in``) of a diffusers ``UNet2DConditionModel`` module
    path (``down_blocks.1.attentions.0.proj_in``). Defined for every module with a 1:1 counterpart:
    blocks (``resnets.j``, ``attentions.j``, ``downsamplers.0``, ``upsamplers.0``, ``mid_block.*``), all
    their parameter-holding children, ``conv_in``/``conv_norm_out``/``conv_act``/``conv_out``,
    ``time_embedding``/``add_embedding`` and their children. Raises ``ValueError`` for containers that
    span several LDM blocks (``down_blocks.0``, ``...resnets``), ``time_proj``/``add_time_proj`` (no
    module in LDM) and a resnet's shared ``nonlinearity`` (three modules in LDM). Paths inside an attention
    block (``Transformer2DModel`` = SGM ``SpatialTransformer``, same child names) pass through unchecked."""
    if not path:
        raise _no_counterpart(path, "LDM")
    parts = path.split(".")
    head = parts[0]
    L = layout.layers_per_block
    n = layout.num_blocks
    if head in _TOP_D2L:
        return _join(_TOP_D2L[head], *parts[1:])
    if head == "time_embedding":
        return _join("time_embed", _emb(parts[1:], path, _EMB_D2L))
    if layout.label_emb is not None and head == layout.label_emb:
        return _join("label_emb.0", _emb(parts[1:], path, _EMB_D2L))
    if head == "down_blocks":
        parts = _parts(path, 4)
        i, kind, j, rest = _index(parts[1], path), parts[2], _index(parts[3], path), parts[4:]
        if i >= n:
            raise ValueError(f"{path!r}: no down block {i}")
        if kind == "resnets" and j < L:
            return _join(f"input_blocks.{1 + (L + 1) * i + j}.0", _resnet_d2l(rest, path))
        if kind == "attentions" and j < L and layout.down_attn[i]:
            return _join(f"input_blocks.{1 + (L + 1) * i + j}.1", *rest)
        if kind == "downsamplers" and j == 0 and i < n - 1:
            return _join(f"input_blocks.{(L + 1) * (i + 1)}.0", _sampler(rest, path, "conv", "op"))
        raise ValueError(f"module path {path!r} does not exist in this U-Net layout")
    if head == "mid_block":
        parts = _parts(path, 3)
        kind, j, rest = parts[1], _index(parts[2], path), parts[3:]
        order = [("resnets", 0), ("attentions", 0), ("resnets", 1)] if layout.mid_attn else [("resnets", 0), ("resnets", 1)]
        if (kind, j) not in order:
            raise ValueError(f"module path {path!r} does not exist in this U-Net layout")
        m = order.index((kind, j))
        inner = _resnet_d2l(rest, path) if kind == "resnets" else _join(*rest)
        return _join(f"middle_block.{m}", inner)
    if head == "up_blocks":
        parts = _parts(path, 4)
        i, kind, j, rest = _index(parts[1], path), parts[2], _index(parts[3], path), parts[4:]
        if i >= n:
            raise ValueError(f"{path!r}: no up block {i}")
        attn = layout.up_attn[i]
        if kind == "resnets" and j <= L:
            return _join(f"output_blocks.{(L + 1) * i + j}.0", _resnet_d2l(rest, path))
        if kind == "attentions" and j <= L and attn:
            return _join(f"output_blocks.{(L + 1) * i + j}.1", *rest)
        if kind == "upsamplers" and j == 0 and i < n - 1:
            return _join(f"output_blocks.{(L + 1) * i + L}.{2 if attn else 1}", _sampler(rest, path, "conv", "conv"))
        raise ValueError(f"module path {path!r} does not exist in this U-Net layout")
    raise _no_counterpart(path, "LDM")


def ldm_to_diffusers(path: str, layout: UNetLayout = SD_LAYOUT) -> str:
    """Inverse of ``diffusers_to_ldm``: the diffusers path of an LDM/SGM U-Net module path (without the
    ``model.diffusion_model.`` prefix). Raises ``ValueError`` for LDM modules without a diffusers
    counterpart (``input_blocks.4`` = a resnet+attention pair, ``label_emb``, ``out``, the ``SiLU`` inside
    ``in_layers``/``emb_layers``/``out_layers``)."""
    if not path:
        raise _no_counterpart(path, "diffusers")
    parts = path.split(".")
    head = parts[0]
    L = layout.layers_per_block
    n = layout.num_blocks
    if head == "input_blocks":
        parts = _parts(path, 3)
        k, s, rest = _index(parts[1], path), _index(parts[2], path), parts[3:]
        if k == 0:
            if s == 0:
                return _join("conv_in", *rest)
            raise ValueError(f"module path {path!r} does not exist in this U-Net layout")
        i, j = divmod(k - 1, L + 1)
        if i < n:
            if j < L and s == 0:
                return _join(f"down_blocks.{i}.resnets.{j}", _resnet_l2d(rest, path))
            if j < L and s == 1 and layout.down_attn[i]:
                return _join(f"down_blocks.{i}.attentions.{j}", *rest)
            if j == L and s == 0 and i < n - 1:
                return _join(f"down_blocks.{i}.downsamplers.0", _sampler(rest, path, "op", "conv"))
        raise ValueError(f"module path {path!r} does not exist in this U-Net layout")
    if head == "middle_block":
        parts = _parts(path, 2)
        m, rest = _index(parts[1], path), parts[2:]
        order = [("resnets", 0), ("attentions", 0), ("resnets", 1)] if layout.mid_attn else [("resnets", 0), ("resnets", 1)]
        if m >= len(order):
            raise ValueError(f"module path {path!r} does not exist in this U-Net layout")
        kind, j = order[m]
        inner = _resnet_l2d(rest, path) if kind == "resnets" else _join(*rest)
        return _join(f"mid_block.{kind}.{j}", inner)
    if head == "output_blocks":
        parts = _parts(path, 3)
        k, s, rest = _index(parts[1], path), _index(parts[2], path), parts[3:]
        i, j = divmod(k, L + 1)
        if i < n:
            attn = layout.up_attn[i]
            if s == 0:
                return _join(f"up_blocks.{i}.resnets.{j}", _resnet_l2d(rest, path))
            if s == 1 and attn:
                return _join(f"up_blocks.{i}.attentions.{j}", *rest)
            if s == (2 if attn else 1) and j == L and i < n - 1:
                return _join(f"up_blocks.{i}.upsamplers.0", _sampler(rest, path, "conv", "conv"))
        raise ValueError(f"module path {path!r} does not exist in this U-Net layout")
    if head == "time_embed":
        return _join("time_embedding", _emb(parts[1:], path, _EMB_L2D))
    if head == "label_emb" and layout.label_emb is not None:
        parts = _parts(path, 2)
        if parts[1] != "0":
            raise ValueError(f"module path {path!r} does not exist in this U-Net layout")
        return _join(layout.label_emb, _emb(parts[2:], path, _EMB_L2D))
    if head == "out":
        parts = _parts(path, 2)
        key = ".".join(parts[:2])
        if key in _TOP_L2D:
            return _join(_TOP_L2D[key], *parts[2:])
    raise _no_counterpart(path, "diffusers")


def sdxl_diffusers_to_sgm(path: str) -> str:
    """SDXL U-Net: diffusers module path -> SGM path, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``
    -> ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``; ``up_blocks.0.upsamplers.0.conv`` ->
    ``output_blocks.2.2.conv``; ``mid_block.attentions.0.proj_in`` -> ``middle_block.1.proj_in``."""
    return diffusers_to_ldm(path, SDXL_LAYOUT)


def sdxl_sgm_to_diffusers(path: str) -> str:
    """SDXL U-Net: SGM module path -> diffusers path; the exact inverse of ``sdxl_diffusers_to_sgm``."""
    return ldm_to_diffusers(path, SDXL_LAYOUT)


_LDM_HEADS = frozenset({"input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"})


def is_ldm_path(path: str) -> bool:
    """Whether a U-Net module path is in LDM/SGM form (``input_blocks...``) rather than diffusers form."""
    return path.split(".", 1)[0] in _LDM_HEADS


