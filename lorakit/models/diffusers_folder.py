"""Reading a diffusers model folder (``model_index.json`` + one sub-folder per component) without
diffusers' or transformers' loaders: the weights go through the same meta-build-and-assign path as
single files, and text encoders saved by transformers 4 (keys with ``text_model.``) load under 5 and back."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch

from ..formats.checkpoint_file import CheckpointReader
from .detect import ModelKindError

__all__ = ["folder_kind", "weight_files", "read_component_tensors", "read_json", "text_encoder_class"]

# The text-encoder classes lorakit builds (from config.json "architectures", else model_index.json).
_TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")

_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


def read_json(file: Path) -> dict:
    """The JSON object in ``file`` (a config.json or model_index.json); ModelKindError naming the file if it is
    not valid JSON or not an object."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelKindError(f"{file}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ModelKindError(f"{file}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None
    if not isinstance(data, dict):
        raise ModelKindError(f"{file}: expected a JSON object ({{...}}), found a {type(data).__name__}")
    return data


def folder_kind(root: Path) -> str:
    """"sd1", "sd2" or "sdxl" from ``model_index.json`` and the text encoder's config."""
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ModelKindError(f"{root}: not a diffusers model folder (no model_index.json); expected a folder with "
                             "model_index.json, unet/, vae/, text_encoder/ ... or a single checkpoint file")
    index = read_json(index_file)
    pipeline = str(index.get("_class_name", ""))
    if "text_encoder_2" in index and index.get("text_encoder") not in (None, [None, None]):
        return "sdxl"
    if "XL" in pipeline:
        raise ModelKindError(f"{root}: {pipeline} without a first text encoder (an SDXL refiner?) is not supported")
    te_config = root / "text_encoder" / "config.json"
    if not te_config.is_file():
        raise ModelKindError(f"{root}: diffusers folder has no text_encoder/config.json")
    # SD2's OpenCLIP encoder uses gelu; SD1's OpenAI CLIP uses quick_gelu (whatever the widths).
    act = read_json(te_config).get("hidden_act", "quick_gelu")
    return "sd2" if act == "gelu" else "sd1"


def text_encoder_class(root: Path, component: str, config: dict) -> str:
    """The transformers class of text encoder ``component``: its config.json's "architectures", else the class
    model_index.json names for it (as diffusers' ``from_pretrained`` builds it: SDXL's text_encoder_2 is
    ``CLIPTextModelWithProjection``), else ``CLIPTextModel``."""
    if config.get("architectures"):
        return config["architectures"][0]
    entry = read_json(root / "model_index.json").get(component)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        return "CLIPTextModel"
    library, name = entry
    if library != "transformers" or name not in _TEXT_ENCODER_CLASSES:
        raise ModelKindError(f"{root / 'model_index.json'}: {component} is {library}.{name}; expected "
                             f"transformers {' or '.join(_TEXT_ENCODER_CLASSES)}")
    return name


def weight_files(folder: Path) -> list[Path]:
    """The weight files of one component: plain safetensors (shards included), else the fp16 variant,
    else pickled .bin (read with weights_only=True)."""
    groups = {"plain": [], "fp16": [], "bin": []}
    for file in sorted(folder.iterdir()):
        stem = _SHARD.sub("", file.name[: -len(file.suffix)] if file.suffix else file.name)
        if file.suffix == ".safetensors" and "." not in stem:
            groups["plain"].append(file)
        elif file.suffix == ".safetensors" and stem.endswith(".fp16"):
            groups["fp16"].append(file)
        elif file.suffix == ".bin" and "." not in stem:
            groups["bin"].append(file)
    for name in ("plain", "fp16", "bin"):
        if groups[name]:
            return groups[name]
    raise ModelKindError(f"{folder}: no weight file (expected *.safetensors or *.bin)")


def read_component_tensors(folder: Path, module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module key, tensor)`` for every state-dict key of ``module``, read lazily from ``folder``."""
    readers = [CheckpointReader(f) for f in weight_files(folder)]
    where = {k: r for r in readers for k in r.keys()}
    try:
        for key in module.state_dict():
            # transformers 5 dropped CLIPTextModel's "text_model." level; files from 4 still have it (and back).
            for name in (key, "text_model." + key, key.removeprefix("text_model.")):
                if name in where:
                    yield key, where[name].get(name)
                    break
            else:
                raise ModelKindError(f"{folder}: weight {key!r} not found in "
                                     f"{', '.join(str(r.path) for r in readers)}")
    finally:  # the open weight files, as soon as the component is read
        for reader in readers:
            reader.close()
