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

from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from .unet_paths import (SD_LAYOUT, SDXL_LAYOUT, UNetLayout, diffusers_to_ldm, is_ldm_path, ldm_to_diffusers,
                         sdxl_diffusers_to_sgm, sdxl_sgm_to_diffusers)

__all__ = [
    "UNET_PREFIX", "TE_PREFIX", "TE1_PREFIX", "TE2_PREFIX", "GENERIC_PREFIX",
    "adapter_name", "split_key", "group_by_module", "text_encoder_prefixes", "clip_name_path", "clip_model_path",
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
    trailing ``_`` (``"lora_unet"`` or ``"lora_unet_"``). The root module (``""``) is named by the prefix and
    its ``_`` (``lycoris_``), as LyCORIS' wrapper.py names it (f"{prefix}_{name}")."""
    return _norm_prefix(prefix) + module_path.replace(".", "_")


def split_key(key: str) -> tuple[str, str]:
    """``"lora_unet_x_y.lora_down.weight"`` -> ``("lora_unet_x_y", "lora_down.weight")``. Adapter names
    never contain a dot, so the first dot ends the name."""
    name, _, suffix = key.partition(".")
    return name, suffix


def group_by_module(tensors) -> dict[str, dict]:
    """A file's tensors per adapter: ``{name: {suffix: tensor}}`` (see split_key)."""
    groups: dict[str, dict] = {}
    for key, value in tensors.items():
        name, suffix = split_key(key)
        groups.setdefault(name, {})[suffix] = value
    return groups


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
            if not path:  # an earlier lorakit named the root by the bare prefix
                self._register(name[:-1], Target(component, path, module))
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
