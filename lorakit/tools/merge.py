"""Merging adapters: into a model's weights (any algorithm, per-block weights), or several LoRAs into one.

Merging into a model goes through `load_network(...).merge()`, the same code that runs the adapters, so the
merged model computes what the model with the adapters applied (stacked, at the same multipliers) computes.
Merging LoRAs into one LoRA concatenates their ranks (exact, see concat.py) or, with `new_rank`, re-factorises
the summed change with SVD (merge_svd.py).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

__all__ = ["merge_into_model", "merge_loras", "save_model", "parse_block_weights", "check_ratios",
           "check_block_weights", "layout_sizes", "adapter_arch", "adapter_keys", "merged_lora_metadata"]

BlockWeights = Sequence[float] | Mapping[str, float]
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt")


# ----- checking what the user gave ---------------------------------------------------------------------------
def check_ratios(files: Sequence, ratios: Sequence[float] | None) -> list[float]:
    """One ratio per file (all 1.0 when none are given)."""
    if not files:
        raise ValueError("no adapter files given: expected one or more with --loras")
    if ratios is None or len(ratios) == 0:
        return [1.0] * len(files)
    if len(ratios) != len(files):
        raise ValueError(f"--ratios: {len(ratios)} ratio(s) given for {len(files)} adapter file(s); give one "
                         f"ratio per file, in the same order")
    return [float(r) for r in ratios]


def parse_block_weights(text: str | BlockWeights, option: str = "--block_weights") -> list[float] | dict[str, float]:
    """A per-block vector from "1,0,0.5,...", a JSON list "[1, 0, 0.5]" (kohya's --lbws), or block names
    "IN04=0.5,MID=0" (also "IN04:0.5"). Lists and dicts pass through, checked."""
    if isinstance(text, Mapping):
        return {str(k): _number(v, option, text) for k, v in text.items()}
    if not isinstance(text, str):
        return [_number(v, option, text) for v in text]
    s = text.strip()
    if s.startswith("["):
        try:
            values = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"{option}={text!r}: not a valid JSON list ({e.msg})") from None
        if not isinstance(values, list):
            raise ValueError(f"{option}={text!r}: expected a list of numbers")
        return [_number(v, option, text) for v in values]
    parts = [p.strip() for p in s.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{option}={text!r}: expected comma-separated numbers, one per block")
    if any(re.search(r"[=:]", p) for p in parts):
        out = {}
        for p in parts:
            name, sep, value = re.split(r"([=:])", p, maxsplit=1) if re.search(r"[=:]", p) else (p, "", "")
            if not sep:
                raise ValueError(f"{option}={text!r}: {p!r} has no value; write BLOCK=value (e.g. IN04=0.5)")
            out[name.strip()] = _number(value, option, text)
        return out
    return [_number(p, option, text) for p in parts]


def _number(value, option: str, text) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{option}={text!r}: {value!r} is not a number") from None


def layout_sizes(arch: str | None) -> str:
    """The per-block vector lengths `arch` ("sd1"/"sd2"/"sdxl"; None: all) accepts, described for messages."""
    from ..network.blocks import LAYOUTS

    want = None if arch is None else ("sdxl" if arch == "sdxl" else "sd")
    rows = sorted((len(l), l.key, l.arch) for l in LAYOUTS.values() if want in (None, l.arch))
    return ", ".join(f"{n} ({key})" for n, key, _ in rows)


def check_block_weights(block_weights, n_files: int, arch: str | None) -> list[BlockWeights | None]:
    """One vector (or {block: value}) per file, or None: a single vector serves every file. Vector lengths
    must be those of a layout of `arch` (None: of any architecture)."""
    from ..network.blocks import LAYOUTS, layout_for

    if block_weights is None:
        return [None] * n_files
    if isinstance(block_weights, (str, Mapping)) or all(isinstance(v, (int, float)) for v in block_weights):
        per_file = [block_weights] * n_files
    else:
        per_file = list(block_weights)
        if len(per_file) == 1:
            per_file = per_file * n_files
        if len(per_file) != n_files:
            raise ValueError(f"--block_weights: {len(per_file)} vectors given for {n_files} adapter file(s); give "
                             f"one vector for all files or one per file")
    out: list[BlockWeights | None] = []
    for values in per_file:
        if values is None or isinstance(values, str) and values.strip().lower() in ("", "none", "-"):
            out.append(None)  # this file without block weights
            continue
        values = parse_block_weights(values)
        if isinstance(values, list):
            if arch is None:
                if len(values) not in {len(l) for l in LAYOUTS.values()}:
                    raise ValueError(f"--block_weights: {len(values)} values match no block layout; the lengths "
                                     f"that exist: {layout_sizes(None)}")
            else:
                try:
                    layout_for(arch, len(values))
                except ValueError:
                    raise ValueError(f"--block_weights: {len(values)} values match no block layout of a {arch} "
                                     f"model; a {arch} model takes {layout_sizes(arch)}") from None
        out.append(values)
    return out


_SDXL_MARKS = re.compile(r"^lora_te[12]_|^lora_unet_(?:label_emb|add_embedding)_")
_SD_MARKS = re.compile(r"^lora_te_|^lora_unet_(?:down_blocks_3|up_blocks_3|(?:input|output)_blocks_(?:9|1[01])_)")


def adapter_arch(keys) -> str | None:
    """"sdxl" or "sd" (SD1/SD2) when the adapter names tell (text-encoder prefixes, blocks only one has)."""
    keys = list(keys)
    if any(_SDXL_MARKS.match(k) for k in keys):
        return "sdxl"
    if any(_SD_MARKS.match(k) for k in keys):
        return "sd"
    return None


def adapter_keys(file: str | os.PathLike) -> list[str]:
    """The tensor names of an adapter (or model) file: a safetensors file's header, or a .ckpt/.pt/.pth/.bin file's
    tensors read as the loaders read them (weights_only: no pickled code runs)."""
    from ..formats.checkpoint_file import CheckpointReader

    with CheckpointReader(file) as reader:
        return reader.keys()


def with_named_base_model(meta: dict[str, str], *key_sets) -> dict[str, str]:
    """``meta`` with SDXL's base model keys where the adapter names (any of ``key_sets``) tell SDXL and ``meta``
    has none (with_base_model_keys); SD1 from SD2 only a file's own keys tell."""
    from ..formats.modelspec import with_base_model_keys

    sdxl = any(adapter_arch(keys) == "sdxl" for keys in key_sets)
    return with_base_model_keys(meta, "sdxl") if sdxl else meta


def _arch_family(kind: str) -> str:
    return "sdxl" if kind == "sdxl" else "sd"


# ----- merging into a model ----------------------------------------------------------------------------------
@torch.no_grad()
def merge_into_model(model, files: Sequence[str | os.PathLike], ratios: Sequence[float] | None = None,
                     block_weights=None, progress: bool = True):
    """Add each adapter file's change, at its ratio (times its per-block weights), into `model` (a
    `StableDiffusionModel`) in place, in the order given; returns the model.

    Any algorithm `load_network` reads. `block_weights`: None, one vector or {block: value} for every file, or
    a list with one (or None) per file; vector lengths pick the layout as `Network.set_block_multipliers` does
    (SD: 25, 26, 17; SDXL: 23, 20, 12). Every file is read and checked before any weight changes."""
    from tqdm.auto import tqdm

    from ..network.load import load_network

    files = [os.fspath(f) for f in files]
    ratios = check_ratios(files, ratios)
    weights = check_block_weights(block_weights, len(files), model.kind)
    # Adapters compute in float32, or float64 for a float64 model (so a float64 merge is exact to rounding).
    wide = any(p.dtype == torch.float64 for p in model.unet.parameters())
    adapter_dtype = torch.float64 if wide else torch.float32
    networks = []
    for file, ratio, bw in tqdm(list(zip(files, ratios, weights)), desc="reading adapters", unit="file",
                                disable=not progress):
        networks.append(_load_for_model(load_network, model, file, ratio, bw, adapter_dtype))
    for net in tqdm(networks, desc="merging", unit="file", disable=not progress):
        net.merge()  # each adapter at its multiplier: the ratio times its block weight
    return model


def _load_for_model(load_network, model, file: str, ratio: float, bw, dtype):
    from ..network.load import refuse_non_finite

    try:
        net = load_network(model.unet, file, text_encoders=model.text_encoders, multiplier=ratio, dtype=dtype)
    except ValueError as err:
        arch = adapter_arch(adapter_keys(file))
        if arch is not None and arch != _arch_family(model.kind):
            names = "SDXL" if arch == "sdxl" else "SD1/SD2"
            raise ValueError(f"{file}: is an adapter for {names} models, but the model is {model.kind} "
                             f"({model.source}); ({err})") from None
        raise
    refuse_non_finite(net.state_dict(), file, "the model's weights")
    if bw is not None:
        net.set_block_multipliers(bw)
    return net


def save_model(model, save_to: str | os.PathLike, dtype=None, metadata: Mapping[str, str] | None = None) -> str:
    """Write the model as one checkpoint file (a .safetensors/.ckpt name) or a diffusers folder (any other
    name); atomic either way. Returns "checkpoint" or "diffusers"."""
    from ..models.save import save_checkpoint, save_diffusers

    path = os.fspath(save_to)
    if path.lower().endswith(CHECKPOINT_SUFFIXES):
        save_checkpoint(model, path, dtype, metadata=metadata)
        return "checkpoint"
    if os.path.isfile(path):
        raise ValueError(f"--save_to {path}: is an existing file without a .safetensors/.ckpt suffix; name a "
                         f"checkpoint file (.safetensors, .ckpt) or a diffusers output folder")
    save_diffusers(model, path, dtype)
    return "diffusers"


def checkpoint_metadata(model, base: str, files: Sequence[str], save_to: str) -> dict[str, str]:
    """ModelSpec keys for a merged checkpoint (title from the output name, merged_from the inputs)."""
    from ..formats import build_modelspec

    kind = "sd2-v" if model.kind == "sd2" and model.v_parameterization else model.kind
    return build_modelspec(kind, title=Path(save_to).stem, is_lora=False,
                           merged_from=[Path(f).name for f in (base, *files)])


# ----- merging LoRAs into one LoRA ---------------------------------------------------------------------------
def check_adapter_file(file: str, given_with: str = "") -> None:
    """An adapter path that is not a file: a folder or nothing there, said as which."""
    if not os.path.isfile(file):
        what = "is a folder, expected an adapter file" if os.path.isdir(file) else "no such adapter file"
        raise FileNotFoundError(f"{file}: {what}{f' (given with {given_with})' if given_with else ''}")


def merge_loras(files: Sequence[str | os.PathLike], ratios: Sequence[float] | None, save_to: str | os.PathLike,
                new_rank: int | None = None, new_conv_rank: int | None = None, block_weights=None,
                precision=torch.float32, save_precision=None, shuffle: bool = False, device: str = "cpu",
                metadata: bool = True, progress: bool = True) -> dict:
    """Several LoRA/LoCon files into one, saved to `save_to`: ranks concatenated (exact), or with `new_rank`
    the summed change re-factorised by SVD (`lorakit.tools.merge_svd`). Returns the saved tensors."""
    from ..formats import add_hashes
    from ..formats.dtypes import parse_dtype
    from ..formats.safetensors_io import is_torch_name, save_tensors

    files = [os.fspath(f) for f in files]
    ratios = check_ratios(files, ratios)
    precision = parse_dtype(precision, "--precision") or torch.float32
    save_dtype = parse_dtype(save_precision, "--save_precision") or precision
    if not os.fspath(save_to).lower().endswith(".safetensors") and not is_torch_name(save_to):
        raise ValueError(f"--save_to {save_to}: a merged LoRA is written as safetensors (.safetensors) or as a torch "
                         f"state dict (.ckpt/.pt/.pth/.bin); expected such a file name")
    for file in files:
        check_adapter_file(file)
    if new_rank is not None:
        if shuffle:
            raise ValueError("--shuffle permutes concatenated rank components; the SVD merge (--new_rank) has "
                             "none to permute")
        from .merge_svd import merge_loras_svd

        return merge_loras_svd(files, ratios, new_rank, new_conv_rank=new_conv_rank, out=os.fspath(save_to),
                               device=device, dtype=save_dtype, progress=progress, modelspec=metadata,
                               block_weights=block_weights)
    if new_conv_rank is not None:
        raise ValueError("--new_conv_rank needs --new_rank (concatenation keeps every rank)")
    from .concat import concat_loras

    tensors, meta, kind = concat_loras(files, ratios, block_weights=block_weights, dtype=precision,
                                       shuffle=shuffle, progress=progress, save_dtype=save_dtype)
    tensors = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    meta = merged_lora_metadata(meta, kind, save_to, files, modelspec=metadata)
    save_tensors(tensors, save_to, metadata=add_hashes(tensors, meta))
    return tensors


def merged_lora_metadata(meta: dict[str, str], kind: str | None, save_to, files: Sequence,
                         modelspec: bool = True) -> dict[str, str]:
    """A merged LoRA's metadata: `meta` plus the sai modelspec (title from the output name, merged_from the
    inputs); without `modelspec` only the ss_* keys, as kohya's merge scripts keep with --no_metadata."""
    from ..formats import build_modelspec
    from ..formats.modelspec import with_base_model_keys

    if kind == "sdxl":  # the names tell SDXL; SD1 from SD2 only the inputs' keys do
        meta = with_base_model_keys(meta, kind)
    if not modelspec:
        return {k: v for k, v in meta.items() if k.startswith("ss_")}
    return {**meta, **build_modelspec(kind or "sd1", title=Path(os.fspath(save_to)).stem, is_lora=True,
                                      merged_from=[Path(os.fspath(f)).name for f in files])}
