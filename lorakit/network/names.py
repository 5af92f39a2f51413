"""Adapter names: module path <-> kohya/LyCORIS adapter name, and U-Net diffusers <-> LDM/SGM paths.

An adapter saved in a file is named ``prefix + module_path.replace(".", "_")``:

* ``lora_unet_``  the U-Net. SD1/SD2 files use diffusers module paths
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``); SDXL files from kohya use the
  original SGM (ldm) paths (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), because
  sd-scripts trains SDXL on its own SGM-named U-Net. Loaders (ComfyUI, A1111, kohya) accept both.
* ``lora_te_``    the SD1/SD2 text encoder; ``lora_te1_`` / ``lora_te2_`` the two SDXL text encoders.
  Names keep the transformers-4 path ``text_model.encoder.layers.N...`` even though transformers 5's
  ``CLIPTextModel`` has no ``.text_model`` (its modules are ``encoder.layers.N...``);
  ``CLIPTextModelWithProjection`` still has ``text_model`` in both versions.
* ``lycoris_``    any other model (LyCORIS' generic wrapper prefix).

The U-Net path map is exact in both directions for every module that has a counterpart in the other
layout; see ``diffusers_to_ldm``. Names are not parsed back into paths (``_`` is ambiguous); instead a
``NameIndex`` lists every name a model's modules can have and looks names up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

__all__ = [
    "UNET_PREFIX", "TE_PREFIX", "TE1_PREFIX", "TE2_PREFIX", "GENERIC_PREFIX",
    "adapter_name", "split_key", "text_encoder_prefixes", "clip_name_path", "clip_model_path",
    "UNetLayout", "SD_LAYOUT", "SDXL_LAYOUT",
    "diffusers_to_ldm", "ldm_to_diffusers", "sdxl_diffusers_to_sgm", "sdxl_sgm_to_diffusers",
    "is_ldm_path", "detect_arch", "unet_name_path",
    "Target", "NameIndex", "find_module",
]

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
TE1_PREFIX = "lora_te1_"
TE2_PREFIX = "lora_te2_"
GENERIC_PREFIX = "lycoris_"


# --------------------------------------------------------------------------------------------------
# names


def _norm_prefix(prefix: str) -> str:
    if not prefix or prefix == "_":
        raise ValueError("adapter name prefix must not be empty")
    return prefix if prefix.endswith("_") else prefix + "_"


def adapter_name(prefix: str, module_path: str) -> str:
    """``prefix`` + ``module_path`` with ``.`` -> ``_``; the prefix may be given with or without its
    trailing ``_`` (``"lora_unet"`` or ``"lora_unet_"``). The root module (``""``) is named by the bare
    prefix, as LyCORIS does."""
    p = _norm_prefix(prefix)
    if not module_path:
        return p[:-1]
    return p + module_path.replace(".", "_")


def split_key(key: str) -> tuple[str, str]:
    """``"lora_unet_x_y.lora_down.weight"`` -> ``("lora_unet_x_y", "lora_down.weight")``. Adapter names
    never contain a dot, so the first dot ends the name."""
    name, _, suffix = key.partition(".")
    return name, suffix


def text_encoder_prefixes(arch: str) -> tuple[str, ...]:
    """Prefixes of the text encoders of ``arch`` ("sd1", "sd2", "sdxl"), in pipeline order."""
    return (TE1_PREFIX, TE2_PREFIX) if _arch(arch) == "sdxl" else (TE_PREFIX,)


_CLIP_ROOT = "text_model"
_CLIP_TOP = ("embeddings", "encoder", "final_layer_norm")


def clip_name_path(module_path: str) -> str:
    """The path a CLIP text-model module has in adapter names: transformers 5's ``CLIPTextModel`` paths
    (``encoder.layers.0.mlp.fc1``) get back the ``text_model.`` they had in transformers 4; paths that
    already have it (transformers 4, ``CLIPTextModelWithProjection``) and ``text_projection`` are kept."""
    head = module_path.split(".", 1)[0]
    if head in _CLIP_TOP:
        return f"{_CLIP_ROOT}.{module_path}"
    return module_path


def clip_model_path(name_path: str, model: torch.nn.Module) -> str:
    """Inverse of ``clip_name_path`` for a given model: drops ``text_model.`` when ``model`` has no
    ``text_model`` attribute (transformers 5 ``CLIPTextModel``)."""
    if name_path == _CLIP_ROOT or name_path.startswith(_CLIP_ROOT + "."):
        if not isinstance(getattr(model, _CLIP_ROOT, None), torch.nn.Module):
            return name_path[len(_CLIP_ROOT) + 1:]
    return name_path


# --------------------------------------------------------------------------------------------------
# U-Net: diffusers <-> LDM/SGM module paths


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


def _arch(arch: str) -> str:
    a = str(arch).lower().replace("-", "").replace("_", "").replace(".", "")
    if a in ("sdxl", "xl", "sdxl10", "sdxlbase"):
        return "sdxl"
    if a in ("sd1", "sd15", "sd1x", "v1", "sd2", "sd21", "sd2x", "v2", "sd"):
        return "sd2" if a in ("sd2", "sd21", "sd2x", "v2") else "sd1"
    raise ValueError(f"unknown Stable Diffusion architecture {arch!r} (sd1, sd2, sdxl)")


def detect_arch(unet: torch.nn.Module | None = None, text_encoders: Sequence[torch.nn.Module] = ()) -> str:
    """"sdxl", "sd2" or "sd1" from a diffusers U-Net's config (or, without one, from the text encoders)."""
    cfg = getattr(unet, "config", None) if unet is not None else None
    if cfg is not None:
        get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
        if get("addition_embed_type", None) == "text_time":
            return "sdxl"
        return "sd2" if get("cross_attention_dim", 768) == 1024 else "sd1"
    if unet is not None and hasattr(unet, "label_emb") and hasattr(unet, "input_blocks"):
        return "sdxl"
    if len(text_encoders) == 2:
        return "sdxl"
    if text_encoders:
        hidden = getattr(getattr(text_encoders[0], "config", None), "hidden_size", 768)
        return "sd2" if hidden == 1024 else "sd1"
    raise ValueError("cannot tell the architecture without a U-Net config or text encoders")


def unet_name_path(path: str, arch: str, style: str = "kohya", layout: UNetLayout | None = None) -> str:
    """The module path a U-Net adapter is named by. ``style="kohya"``: SGM paths for SDXL (what sd-scripts
    writes), diffusers paths for SD1/SD2; ``"diffusers"``: diffusers paths; ``"ldm"``: LDM/SGM paths for
    every arch. ``path`` may be given in either form; modules without a counterpart keep their path."""
    if style not in ("kohya", "diffusers", "ldm"):
        raise ValueError(f"unknown name style {style!r} (kohya, diffusers, ldm)")
    a = _arch(arch)
    layout = layout or (SDXL_LAYOUT if a == "sdxl" else SD_LAYOUT)
    want_ldm = style == "ldm" or (style == "kohya" and a == "sdxl")
    try:
        if want_ldm:
            return path if is_ldm_path(path) else diffusers_to_ldm(path, layout)
        return ldm_to_diffusers(path, layout) if is_ldm_path(path) else path
    except ValueError:
        return path


# --------------------------------------------------------------------------------------------------
# looking names up


@dataclass(frozen=True)
class Target:
    """A module an adapter name resolves to: ``component`` ("unet", "text_encoder", "text_encoder_2" or
    what the index was given), its ``path`` in that component as built, and the module itself."""

    component: str
    path: str
    module: torch.nn.Module


class NameIndex:
    """Every adapter name the modules of some models can have, in each accepted style, -> ``Target``.

    ``NameIndex.for_sd(unet, text_encoders)`` indexes a Stable Diffusion model: U-Net modules under both
    their diffusers and their LDM/SGM names, text-encoder modules under their ``text_model.`` name (and
    the bare transformers-5 path). ``find(name)`` accepts a name or a full file key
    (``name.lora_down.weight``). ``name_of(component, path)`` is the name lorakit writes.
    """

    def __init__(self) -> None:
        self._by_name: dict[str, Target] = {}
        self._primary: dict[tuple[str, str], str] = {}

    # building ---------------------------------------------------------------------------------

    def _register(self, name: str, target: Target) -> None:
        old = self._by_name.get(name)
        if old is not None and (old.component, old.path) != (target.component, target.path):
            raise ValueError(f"adapter name {name!r} is ambiguous: {old.component}:{old.path} and "
                             f"{target.component}:{target.path}")
        self._by_name[name] = target

    def add_modules(self, component: str, model: torch.nn.Module, prefix: str) -> "NameIndex":
        """Index every module of ``model`` as ``prefix`` + its path (the generic LyCORIS naming)."""
        for path, module in model.named_modules():
            name = adapter_name(prefix, path)
            self._register(name, Target(component, path, module))
            self._primary[(component, path)] = name
        return self

    def add_text_encoder(self, component: str, model: torch.nn.Module, prefix: str) -> "NameIndex":
        """Index a CLIP text model: primary names keep ``text_model.``; the bare path is an alias."""
        for path, module in model.named_modules():
            target = Target(component, path, module)
            name = adapter_name(prefix, clip_name_path(path))
            self._register(name, target)
            self._primary[(component, path)] = name
            if path:
                self._register(adapter_name(prefix, path), target)
        return self

    def add_unet(self, unet: torch.nn.Module, arch: str | None = None, *, component: str = "unet",
                 prefix: str = UNET_PREFIX, style: str = "kohya", layout: UNetLayout | None = None) -> "NameIndex":
        """Index a U-Net (diffusers, or an LDM/SGM-named one) under its diffusers and LDM/SGM names.
        ``style`` picks the primary name (see ``unet_name_path``)."""
        a = _arch(arch) if arch is not None else detect_arch(unet)
        if layout is None:
            cfg = getattr(unet, "config", None)
            if isinstance(cfg, Mapping) and cfg.get("down_block_types"):
                layout = UNetLayout.from_config(cfg)
            else:
                layout = SDXL_LAYOUT if a == "sdxl" else SD_LAYOUT
        for path, module in unet.named_modules():
            target = Target(component, path, module)
            names = [adapter_name(prefix, path)]
            if path:
                try:
                    other = ldm_to_diffusers(path, layout) if is_ldm_path(path) else diffusers_to_ldm(path, layout)
                except ValueError:
                    other = None
                if other is not None:
                    names.append(adapter_name(prefix, other))
            for name in names:
                self._register(name, target)
            self._primary[(component, path)] = adapter_name(prefix, unet_name_path(path, a, style, layout))
        return self

    @classmethod
    def for_sd(cls, unet: torch.nn.Module | None = None, text_encoders: Sequence[torch.nn.Module] | torch.nn.Module = (),
               arch: str | None = None, *, style: str = "kohya") -> "NameIndex":
        """Index of a Stable Diffusion model (SD1.x, SD2.x, SDXL): ``lora_unet_`` for the U-Net,
        ``lora_te_`` (``lora_te1_``/``lora_te2_`` for SDXL) for the text encoders."""
        if isinstance(text_encoders, torch.nn.Module):
            text_encoders = [text_encoders]
        text_encoders = list(text_encoders)
        a = _arch(arch) if arch is not None else detect_arch(unet, text_encoders)
        index = cls()
        if unet is not None:
            index.add_unet(unet, a, style=style)
        prefixes = text_encoder_prefixes(a)
        if len(text_encoders) > len(prefixes):
            raise ValueError(f"{a} has {len(prefixes)} text encoder(s), got {len(text_encoders)}")
        components = ("text_encoder", "text_encoder_2")
        for k, (te, prefix) in enumerate(zip(text_encoders, prefixes)):
            index.add_text_encoder(components[k], te, prefix)
        return index

    @classmethod
    def for_model(cls, model: torch.nn.Module, prefix: str = GENERIC_PREFIX, component: str = "model") -> "NameIndex":
        """Index of any model under ``prefix`` + module path (LyCORIS' ``lycoris_`` by default)."""
        return cls().add_modules(component, model, prefix)

    # querying ---------------------------------------------------------------------------------

    def find(self, name_or_key: str) -> Target | None:
        """The module an adapter name (or a full key ``name.suffix``) refers to, or ``None``."""
        return self._by_name.get(split_key(name_or_key)[0])

    def __getitem__(self, name_or_key: str) -> Target:
        target = self.find(name_or_key)
        if target is None:
            raise KeyError(f"no module is named {split_key(name_or_key)[0]!r}")
        return target

    def __contains__(self, name_or_key: object) -> bool:
        return isinstance(name_or_key, str) and self.find(name_or_key) is not None

    def name_of(self, component: str, path: str) -> str:
        """The name lorakit writes for module ``path`` of ``component``."""
        try:
            return self._primary[(component, path)]
        except KeyError:
            raise KeyError(f"{component}:{path!r} is not indexed") from None

    def primary_names(self) -> Iterator[str]:
        """The name lorakit writes for every indexed module."""
        return iter(self._primary.values())

    def all_names(self) -> Iterator[str]:
        """Every accepted name, aliases included."""
        return iter(self._by_name)

    def resolve_keys(self, keys: Iterable[str]) -> tuple[dict[str, Target], list[str]]:
        """Group file keys by adapter name: ``({name: Target}, [names that match no module])``."""
        found: dict[str, Target] = {}
        missing: list[str] = []
        for key in keys:
            name = split_key(key)[0]
            if name in found or name in missing:
                continue
            target = self._by_name.get(name)
            if target is None:
                missing.append(name)
            else:
                found[name] = target
        return found, missing

    def __len__(self) -> int:
        return len(self._primary)


def find_module(name_or_key: str, unet: torch.nn.Module | None = None,
                text_encoders: Sequence[torch.nn.Module] | torch.nn.Module = (), arch: str | None = None) -> Target | None:
    """One-off lookup of an adapter name in either style. Builds a ``NameIndex``; keep the index
    (``NameIndex.for_sd``) when resolving many names."""
    return NameIndex.for_sd(unet, text_encoders, arch).find(name_or_key)
