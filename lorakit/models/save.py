"""Save a model (adapters merged or not) as a single-file checkpoint in the original LDM/SGM layout, or as a
diffusers folder. Both writes are atomic: a temporary file/folder renamed into place."""

from __future__ import annotations

import json
import os

import torch

from ..formats.atomic import atomic_write, staging_folder
from ..formats.checkpoint_layout import COMPONENT_PREFIXES, to_checkpoint
from ..formats.dtypes import parse_dtype
from ..formats.safetensors_io import prepare_tensors, save_file
from .detect import sd2_weights_say_v
from .model import StableDiffusionModel

__all__ = ["checkpoint_tensors", "save_checkpoint", "save_diffusers"]

_PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def checkpoint_tensors(model: StableDiffusionModel) -> dict[str, torch.Tensor]:
    """The model's tensors under the single-file keys, plus the extras it was loaded with."""
    prefixes = COMPONENT_PREFIXES[model.kind]
    out: dict[str, torch.Tensor] = {}
    for component, module in model.components():
        converted = to_checkpoint(model.kind, component, module.state_dict(), module.config)
        out.update({prefixes[component] + key: value for key, value in converted.items()})
    for key, value in model.extras.items():
        out.setdefault(key, value)
    # ComfyUI and Forge read an empty "v_pred" tensor as "predicts v". SD2 files are judged by their weights
    # (detect.sd2_weights_say_v): the marker only where those would say epsilon, so 768-v files round-trip as
    # they are. A model no longer predicting v (an override) drops a loaded marker.
    if not model.v_parameterization:
        out.pop("v_pred", None)
    elif model.kind != "sd2" or not sd2_weights_say_v(out):
        out.setdefault("v_pred", torch.tensor([]))
    return out


def save_checkpoint(model: StableDiffusionModel, path: str | os.PathLike, dtype: str | torch.dtype | None = torch.float16,
                    metadata: dict[str, str] | None = None) -> None:
    """Write ``model`` to ``path`` (.safetensors, or .ckpt as ``{"state_dict": ...}``), floating tensors in
    ``dtype`` (None keeps each tensor's own)."""
    dtype = parse_dtype(dtype, "save dtype")
    path = os.fspath(path)
    tensors = checkpoint_tensors(model)
    if path.lower().endswith((".ckpt", ".pt")):
        atomic_write(path, lambda tmp: torch.save({"state_dict": prepare_tensors(tensors, dtype)}, tmp))
    elif path.lower().endswith(".safetensors"):
        save_file(tensors, path, metadata=metadata, dtype=dtype)
    else:
        raise ValueError(f"{path}: expected a .safetensors or .ckpt file name for the checkpoint")


def save_diffusers(model: StableDiffusionModel, folder: str | os.PathLike,
                   dtype: str | torch.dtype | None = None) -> None:
    """Write ``model`` as a diffusers folder (model_index.json, unet/, vae/, text_encoder(_2)/, tokenizer(_2)/,
    scheduler/) with weights as safetensors in ``dtype``. Replaces ``folder`` only once the new one is complete."""
    dtype = parse_dtype(dtype, "save dtype")
    with staging_folder(folder) as tmp:
        index = {"_class_name": _PIPELINES[model.kind], "_diffusers_version": _diffusers_version()}
        for component, module in model.components():
            sub = tmp / component
            sub.mkdir()
            if component.startswith("text_encoder"):
                module.config.save_pretrained(sub)
                save_file(module.state_dict(), sub / "model.safetensors", dtype=dtype, metadata={"format": "pt"})
                index[component] = ["transformers", type(module).__name__]
            else:
                module.save_config(sub)
                save_file(module.state_dict(), sub / "diffusion_pytorch_model.safetensors", dtype=dtype)
                index[component] = ["diffusers", type(module).__name__]
        for i, tokenizer in enumerate(model.tokenizers):
            name = "tokenizer" if i == 0 else f"tokenizer_{i + 1}"
            tokenizer.save_pretrained(tmp / name)
            index[name] = ["transformers", "CLIPTokenizer"]
        scheduler = dict(model.scheduler_config)
        scheduler.setdefault("_class_name", "DDPMScheduler")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2), encoding="utf-8")
        index["scheduler"] = ["diffusers", scheduler["_class_name"]]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
