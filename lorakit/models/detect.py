"""What a model file is, from its key names: an SD1/SD2/SDXL checkpoint, or something else that users
commonly pass by mistake (an adapter, a VAE alone, a diffusers component, another architecture)."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch

__all__ = ["ModelKindError", "classify_keys", "detect_kind", "check_overrides", "detect_v_parameterization"]

_ADAPTER_MARKS = ("lora_down", "lora_up", "hada_w1_a", "lokr_w1", "lokr_w2", "oft_blocks", "lora_A.", "lora_B.")
_ADAPTER_SUFFIXES = (".diff", ".diff_b", ".w_norm", ".b_norm")
# ComfyUI's rule for SD2 files without a marker: the 768-v model's last attention norm has spread-out biases.
_SD2_V_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
_SD2_V_STD = 0.09


class ModelKindError(ValueError):
    """A file that is not a Stable Diffusion checkpoint lorakit can load, or an override that contradicts it."""


def classify_keys(keys: Iterable[str]) -> str:
    """One of "sd1", "sd2", "sdxl" for checkpoints; otherwise a short description of what the keys are."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."):
        return "sdxl"
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
        return "an SDXL refiner checkpoint (not supported: its U-Net has no LoRA layout here)"
    if has("model.diffusion_model.joint_blocks.") or has("joint_blocks."):
        return "an SD3 checkpoint (not supported)"
    if has("double_blocks.") or has("model.diffusion_model.double_blocks."):
        return "a Flux checkpoint (not supported)"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    if any(k.endswith(_ADAPTER_SUFFIXES) or any(mark in k for mark in _ADAPTER_MARKS) for k in keys):
        return "an adapter (LoRA/LyCORIS) file, not a model; load it as network weights"
    if has("model.diffusion_model."):
        return "a U-Net alone (no text encoder keys 'cond_stage_model.' or 'conditioner.embedders.')"
    if (has("encoder.down.") and has("decoder.up.")) or (has("first_stage_model.") and len(
            {k.split(".")[0] for k in keys}) == 1):
        return "a VAE alone; pass it as vae="
    if has("encoder.down_blocks.") and has("decoder.up_blocks."):
        return "a diffusers VAE weight file; pass it (or its folder) as vae="
    if has("down_blocks.") and has("conv_in."):
        return "a diffusers U-Net weight file; pass the whole diffusers model folder instead"
    if has("text_model.") or has("embeddings.token_embedding."):
        return "a text encoder alone"
    if not keys:
        return "an empty file (no tensors)"
    return f"an unknown kind of file (first keys: {', '.join(sorted(keys)[:3])})"


def detect_kind(path: str, keys: Iterable[str]) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"``; otherwise ModelKindError naming the file and what it holds."""
    kind = classify_keys(keys)
    if kind not in ("sd1", "sd2", "sdxl"):
        raise ModelKindError(f"{path}: expected a Stable Diffusion 1.x/2.x/XL checkpoint, found {kind}")
    return kind


def check_overrides(path: str, kind: str, v2: bool | None, sdxl: bool | None) -> None:
    """The user's ``v2``/``sdxl`` flags must agree with the file: a wrong flag is an error, not a quiet mismatch."""
    names = {"sd1": "an SD1.x", "sd2": "an SD2.x", "sdxl": "an SDXL"}
    if sdxl is not None and bool(sdxl) != (kind == "sdxl"):
        raise ModelKindError(f"{path}: sdxl={bool(sdxl)} was given but the file is {names[kind]} checkpoint")
    if v2 is not None and bool(v2) != (kind == "sd2"):
        raise ModelKindError(f"{path}: v2={bool(v2)} was given but the file is {names[kind]} checkpoint")


def detect_v_parameterization(path: str, kind: str, keys: Iterable[str], get: Callable[[str], torch.Tensor],
                              override: bool | None) -> bool:
    """Whether the U-Net predicts v. A ``v_pred`` key marks it (an error if the user says otherwise); SD2
    files without one are judged as ComfyUI does; SD1/SDXL default to epsilon. The user's flag wins otherwise."""
    keys = set(keys)
    if "v_pred" in keys:
        if override is False:
            raise ModelKindError(f"{path}: v_parameterization=False was given but the file has a 'v_pred' key "
                                 "(it was trained to predict v)")
        return True
    if override is not None:
        return bool(override)
    if kind == "sd2" and _SD2_V_PROBE in keys:
        return _probe_says_v(get(_SD2_V_PROBE))
    return False


def _probe_says_v(probe: torch.Tensor) -> bool:
    return float(probe.float().std(unbiased=False)) > _SD2_V_STD


def sd2_weights_say_v(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether ComfyUI would judge SD2 checkpoint tensors (single-file keys) v-prediction without a marker: the
    spread of one norm bias, large in the 768-v models. False when the tensor is absent or has no data."""
    probe = tensors.get(_SD2_V_PROBE)
    return probe is not None and not probe.is_meta and _probe_says_v(probe)
