"""Stable Diffusion components built on ``torch.device("meta")`` from configs.

No weights are allocated and nothing is fetched: building SDXL takes a second or two. Used to test module
names, adapter target counts and shapes against the real architectures, and by the loader, which builds on
meta and then assigns the tensors it reads from a file (so a model never exists twice in memory).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Iterator, Mapping

import torch

from .configs import canonical_name, load_config

__all__ = ["build_unet_on_meta", "build_text_encoders_on_meta", "build_vae_on_meta", "build_on_meta",
           "text_encoder_components", "component_on_meta"]

# transformers config keys that describe the saved file, not the architecture; torch_dtype would make
# transformers 5 build the model in that dtype.
_TRANSFORMERS_FILE_KEYS = ("architectures", "_name_or_path", "transformers_version", "model_type", "torch_dtype",
                           "dtype")


_INIT_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _meta_init_skipped() -> Iterator[None]:
    """Build on meta without running ``torch.nn.init`` on meta tensors: there it changes nothing, yet each call
    goes through the device mode's dispatch, about half of a build (min of 7, AMD EPYC with AVX-512: SDXL's U-Net
    and text encoders 167-207 -> 95-100 ms, SD1.5's 67-99 -> 40-43 ms; loading demo:tiny-sd 165-171 -> 131-135 ms).
    Tensors elsewhere (another thread building a real model meanwhile) are initialised as usual; the lock keeps two
    meta builds from saving each other's wrappers as the originals."""
    init = torch.nn.init

    def skipping(fn):
        @functools.wraps(fn)
        def wrapper(tensor, *args, **kwargs):
            return tensor if isinstance(tensor, torch.Tensor) and tensor.is_meta else fn(tensor, *args, **kwargs)
        return wrapper

    with _INIT_PATCH_LOCK:
        originals = {n: f for n, f in vars(init).items() if n.endswith("_") and not n.startswith("_") and callable(f)}
        for name, fn in originals.items():
            setattr(init, name, skipping(fn))
        try:
            with torch.device("meta"):
                yield
        finally:
            for name, fn in originals.items():
                setattr(init, name, fn)


def text_encoder_components(name: str) -> list[str]:
    """The text-encoder component names of a model, in pipeline order."""
    name = canonical_name(name)
    return ["text_encoder", "text_encoder_2"] if name in ("sdxl", "tiny-sdxl") else ["text_encoder"]


def component_on_meta(component: str, config: Mapping[str, Any]) -> torch.nn.Module:
    """One component ("unet", "vae", "text_encoder", "text_encoder_2") built from its config dict on meta."""
    if component.startswith("text_encoder"):
        import transformers

        cfg = dict(config)
        arch = (cfg.get("architectures") or ["CLIPTextModel"])[0]
        cls = getattr(transformers, arch)
        for key in _TRANSFORMERS_FILE_KEYS:
            cfg.pop(key, None)
        tconfig = transformers.CLIPTextConfig(**cfg)
        tconfig.architectures = [arch]
        with _meta_init_skipped():
            return cls(tconfig).eval()
    import diffusers

    default = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}[component]
    cls = getattr(diffusers, config.get("_class_name", default))
    with _meta_init_skipped():
        return cls.from_config(dict(config)).eval()


def build_unet_on_meta(name: str) -> torch.nn.Module:
    """The diffusers ``UNet2DConditionModel`` of model ``name`` with parameters on the meta device."""
    return component_on_meta("unet", load_config(name, "unet"))


def build_vae_on_meta(name: str) -> torch.nn.Module:
    """The diffusers ``AutoencoderKL`` of model ``name`` with parameters on the meta device."""
    return component_on_meta("vae", load_config(name, "vae"))


def build_text_encoders_on_meta(name: str) -> list[torch.nn.Module]:
    """The transformers text encoders of model ``name`` (``CLIPTextModel``; plus
    ``CLIPTextModelWithProjection`` for SDXL) with float32 parameters on the meta device."""
    return [component_on_meta(c, load_config(name, c)) for c in text_encoder_components(name)]


def build_on_meta(name: str) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """``(unet, [text encoders])`` of model ``name`` ("sd15", "sd21", "sdxl" or an alias) on the meta
    device, built from the bundled configs with diffusers/transformers classes. No weights, no network."""
    return build_unet_on_meta(name), build_text_encoders_on_meta(name)
