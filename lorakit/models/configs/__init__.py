"""Offline diffusers/transformers configs for the Stable Diffusion models lorakit knows.

Each model is a folder laid out like a diffusers repository without weights::

    <name>/model_index.json
    <name>/unet/config.json
    <name>/text_encoder/config.json        (and text_encoder_2/ for SDXL)
    <name>/vae/config.json
    <name>/scheduler/scheduler_config.json

so that ``config_dir(name)`` can be passed as ``config=`` to diffusers' ``from_single_file`` and each
component config to ``from_config``. Values are those of the public Hugging Face repositories
runwayml/stable-diffusion-v1-5 (``sd15``), stabilityai/stable-diffusion-2-1 (``sd21``, 768-v) and
stabilityai/stable-diffusion-xl-base-1.0 (``sdxl``). ``tiny-sd`` and ``tiny-sdxl`` are lorakit's demo models (the
SD1 and SDXL block structure at small widths, 64x64 images), whose weights ship in ``lorakit/models/demo/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["MODELS", "ALIASES", "canonical_name", "config_dir", "components", "component_config_file", "load_config"]

_ROOT = Path(__file__).resolve().parent

MODELS: tuple[str, ...] = ("sd15", "sd21", "sdxl", "tiny-sd", "tiny-sdxl")

# Common spellings accepted by config_dir(); the keys are compared lower-cased with "-", "_", "." and
# spaces removed.
ALIASES: dict[str, str] = {
    "sd15": "sd15",
    "sd1": "sd15",
    "sdv15": "sd15",
    "v15": "sd15",
    "stablediffusionv15": "sd15",
    "sd21": "sd21",
    "sd2": "sd21",
    "sdv21": "sd21",
    "v21": "sd21",
    "sd21v": "sd21",
    "sd21768v": "sd21",
    "stablediffusion21": "sd21",
    "sdxl": "sdxl",
    "sdxl10": "sdxl",
    "sdxlbase": "sdxl",
    "sdxlbase10": "sdxl",
    "stablediffusionxlbase10": "sdxl",
    # the demo models (small widths, real block structure) trained by scripts/pretrain_demo.py
    "tinysd": "tiny-sd",
    "tinysd1": "tiny-sd",
    "tinysdxl": "tiny-sdxl",
}


def canonical_name(name: str) -> str:
    """Map a model name or alias ("sd15", "SD1.5", "sdxl-base-1.0", ...) to one of MODELS."""
    key = "".join(ch for ch in str(name).lower() if ch not in "-_. ")
    try:
        return ALIASES[key]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(MODELS)}") from None


def config_dir(name: str) -> Path:
    """The folder holding ``model_index.json`` and one sub-folder per component for model ``name``."""
    path = _ROOT / canonical_name(name)
    if not (path / "model_index.json").is_file():  # pragma: no cover - packaging error
        raise FileNotFoundError(f"model config folder missing or incomplete: {path}")
    return path


def components(name: str) -> list[str]:
    """Component sub-folders present for model ``name`` (e.g. ["scheduler", "text_encoder", "unet", "vae"])."""
    root = config_dir(name)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))


def component_config_file(root: Path, component: str) -> Path:
    """Where a diffusers-style folder keeps ``component``'s config (schedulers use ``scheduler_config.json``)."""
    return root / component / ("scheduler_config.json" if component == "scheduler" else "config.json")


def load_config(name: str, component: str) -> dict[str, Any]:
    """The parsed JSON config of one component ("unet", "text_encoder", "scheduler", ...) or of
    "model_index"."""
    root = config_dir(name)
    if component == "model_index":
        path = root / "model_index.json"
    else:
        path = component_config_file(root, component)
        if not path.is_file():
            raise ValueError(f"model {canonical_name(name)!r} has no component {component!r}; "
                             f"known: {', '.join(components(name))}")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
