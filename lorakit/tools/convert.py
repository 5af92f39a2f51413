"""convert: an adapter file between the kohya/LyCORIS and diffusers/PEFT layouts (and from OneTrainer's OMI
layout), SDXL U-Net name styles and dtypes. The key mapping is ``lorakit.formats.peft_layout``; this file reads,
checks, casts and writes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

import torch

from ..formats import add_hashes
from ..formats.safetensors_io import is_torch_name, save_tensors
from ..formats.dtypes import parse_dtype
from ..formats.modelspec import with_base_model_keys
from ..formats.peft_layout import (LayoutError, detect_layout, kohya_to_peft, omi_arch, omi_to_kohya, peft_to_kohya,
                                   rename_unet)
from ..network.load import read_adapter_tensors, warn_non_finite, without_bundled_embeddings
from .cli_common import refuse_overwrite
from .merge import with_named_base_model

__all__ = ["ConvertError", "ConvertReport", "convert", "TARGETS"]

# target name -> layout; "peft" is the diffusers layout (unet./text_encoder. prefixes), which PEFT loads too
TARGETS = {"kohya": "kohya", "lycoris": "kohya", "diffusers": "peft", "peft": "peft"}
UNET_STYLES = ("kohya", "sgm", "diffusers")


class ConvertError(ValueError):
    """Input that cannot be converted; the message names the file or option and what was expected."""


@dataclass
class ConvertReport:
    source: str
    output: str
    source_layout: str
    target_layout: str
    tensors: int
    dtype: str | None
    notes: list[str] = field(default_factory=list)


def _progress(items: Iterable, total: int, desc: str, enabled: bool):
    """tqdm over items when asked for and installed (lorakit does not depend on it)."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=desc, unit="tensor")


def _refuse_non_adapter(tensors, where: str) -> None:
    from ..models.detect import classify_keys

    kind = classify_keys(tensors)
    if kind in ("sd1", "sd2", "sdxl"):
        raise ConvertError(f"{where}: is a model checkpoint ({kind}), not an adapter; convert takes a LoRA/LyCORIS "
                           f"file (kohya or diffusers/PEFT layout)")


def convert(source: str | os.PathLike, output: str | os.PathLike, to: str | None = None,
            unet_names: str | None = None, dtype: str | torch.dtype | None = None, arch: str | None = None,
            progress: bool = False) -> ConvertReport:
    """Write ``source`` converted to ``output`` (atomically; nothing is written on error).

    to: "kohya" (= "lycoris") or "diffusers" (= "peft"); None keeps the source's layout (OneTrainer's OMI layout,
    which is read only: kohya).
    unet_names: U-Net name style of kohya output: "kohya" (SGM names for SDXL, diffusers for SD1/SD2; the
    default), "sgm" or "diffusers". dtype: cast floating tensors ("fp16", "bf16", "fp32", ...).
    arch: "sd1", "sd2" or "sdxl" when the file does not tell (only U-Net name styles depend on it).
    """
    where = os.fspath(source)
    if to is not None and str(to).lower() not in TARGETS:
        raise ConvertError(f"--to {to!r}: unknown target format; expected one of {', '.join(TARGETS)}")
    if unet_names is not None and unet_names not in UNET_STYLES:
        raise ConvertError(f"--unet-names {unet_names!r}: expected one of {', '.join(UNET_STYLES)}")
    cast = parse_dtype(dtype, "--dtype")
    refuse_overwrite(output, {"source file": where})
    tensors, metadata, _ = read_adapter_tensors(where)
    tensors = without_bundled_embeddings(tensors, where)  # not converted: the UIs load them as embeddings
    warn_non_finite(tensors, where)  # converted all the same, as the tensors are passed through
    if not tensors:
        raise ConvertError(f"{where}: holds no tensors")
    _refuse_non_adapter(tensors, where)
    layout = detect_layout(tensors)
    if layout == "generic":
        raise ConvertError(f"{where}: names adapters of a generic model (lycoris_...); only Stable Diffusion "
                           f"adapters (lora_unet_/lora_te*_ or unet./text_encoder. keys) can be converted")
    if layout == "sd-scripts-oft":
        raise ConvertError(f"{where}: is an sd-scripts OFT file (oft_unet_ names), which load_network, lorakit merge "
                           f"--model and inspect read as it is; convert handles LoRA, LoHa and LoKr layouts (PEFT "
                           f"parametrises OFT differently)")
    if layout == "unknown":
        example = next(iter(tensors))
        raise ConvertError(f"{where}: not a kohya/LyCORIS, diffusers/PEFT nor OneTrainer OMI adapter layout (e.g. "
                           f"key '{example}'); expected lora_unet_/lora_te_ names, or unet./text_encoder. or "
                           f"unet./clip_l./clip_g. prefixes")
    # OneTrainer's OMI layout is read, not written: to kohya unless told
    target = TARGETS[str(to).lower()] if to is not None else ("kohya" if layout == "omi" else layout)
    if target == "peft" and unet_names is not None:
        raise ConvertError("--unet-names applies to kohya output only (the diffusers layout has diffusers names)")
    notes = []
    names_arch = arch
    try:
        if layout == "omi":  # kohya names first (SGM paths as in the file), then as a kohya file
            names_arch = omi_arch(tensors, arch)
            tensors = omi_to_kohya(tensors, names_arch, unet_names="sgm")
            unet_names = unet_names or ("kohya" if target == "kohya" else None)
        if layout in ("kohya", "omi") and target == "peft":
            out, meta = kohya_to_peft(tensors, metadata, names_arch)
        elif layout == "peft" and target == "kohya":
            out, meta = peft_to_kohya(tensors, metadata, arch, unet_names or "kohya")
        elif layout in ("kohya", "omi"):
            out, meta = (rename_unet(tensors, unet_names, names_arch) if unet_names else dict(tensors)), dict(metadata)
        else:
            out, meta = dict(tensors), dict(metadata)
    except LayoutError as e:
        raise ConvertError(f"{where}: {e}") from None
    meta = with_base_model_keys(meta, arch) if arch else with_named_base_model(meta, tensors, out)
    if cast is not None:
        out = {k: (v.to(cast) if v.is_floating_point() else v)
               for k, v in _progress(out.items(), len(out), "cast", progress)}
    if ("sshs_model_hash" in meta or "sshs_legacy_hash" in meta) and not is_torch_name(output):  # (no metadata there)
        meta = add_hashes(out, meta)  # kohya's hashes cover the tensors' bytes: recompute for the new ones
        notes.append("sshs_model_hash/sshs_legacy_hash recomputed")
    save_tensors(out, output, metadata=meta)
    return ConvertReport(where, os.fspath(output), layout, target, len(out),
                         None if cast is None else str(cast).removeprefix("torch."), notes)
