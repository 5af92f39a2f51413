"""The frozen base model made ready for training, as sd-scripts' train_network.py does it: adapter files merged in
(base_weights), weights kept in fp8 (fp8_base, fp8_base_unet), checkpointed activations held on the CPU
(cpu_offload_checkpointing) and torch.compile (torch_compile, dynamo_backend)."""

from __future__ import annotations

import functools
import logging
import re
from typing import Sequence

import torch

from ..algos.options import OptionError

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn


def base_weight_ratios(files: Sequence[str], multipliers: Sequence[float]) -> list[float]:
    """One multiplier per base_weights file; files past the end of base_weights_multiplier get 1.0 (sd-scripts)."""
    if len(multipliers) > len(files):
        raise OptionError(f"option 'base_weights_multiplier': {len(multipliers)} multiplier(s) for "
                          f"{len(files)} base_weights file(s); give at most one per file, in the same order")
    return [float(m) for m in multipliers] + [1.0] * (len(files) - len(multipliers))


def merge_base_weights(model, files: Sequence[str], multipliers: Sequence[float]) -> None:
    """Add each base_weights adapter into the model's weights at its multiplier, before the network is built."""
    if not files:
        return
    from ..tools.merge import merge_into_model

    ratios = base_weight_ratios(files, multipliers)
    for file, ratio in zip(files, ratios):
        log.info("merging base weights: %s x %g", file, ratio)
    try:  # the random state is kept: the network built next starts as it would on a model merged beforehand
        with torch.random.fork_rng():
            merge_into_model(model, files, ratios, progress=False)
    except ValueError as err:
        raise OptionError(f"option 'base_weights': {err}") from None


def keep_in_fp8(modules: Sequence[torch.nn.Module], compute_dtype: torch.dtype) -> None:
    """Store the Linear/Conv weights of `modules` in float8_e4m3fn and give each call a copy cast up to
    `compute_dtype` (diffusers' layerwise casting hook, made per call: _cast_up_per_call_hook). Norm layers and
    embeddings keep `compute_dtype`, as sd-scripts keeps the text encoders' embeddings; SDXL's text_projection too
    (its weight dtype decides the pooled dtype)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    hook_type = _cast_up_per_call_hook()
    for module in modules:
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Embedding) or re.search(r"(^|\.)text_projection$", name):
                continue
            if isinstance(layer, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
                hook = hook_type(storage_dtype=FP8, compute_dtype=compute_dtype, non_blocking=False)
                HookRegistry.check_if_exists_or_initialize(layer).register_hook(hook, "layerwise_casting")


@functools.cache
def _cast_up_per_call_hook():
    """diffusers' LayerwiseCastingHook (stores the layer in fp8; `unet.dtype` reads its compute dtype), except that
    the call runs on copies of the weight and bias cast up while the parameters stay float8. diffusers' own hook
    casts the parameters in place and back after the call: whatever the call kept for backward by reference (the
    weight, in the fused adapter paths and torch's conv) was float8 again when backward read it, and a checkpointed
    block recomputed with tensors of another dtype than its forward kept."""
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook

    class CastUpPerCall(LayerwiseCastingHook):
        def pre_forward(self, module, *args, **kwargs):
            return args, kwargs

        def post_forward(self, module, output):
            return output

        def new_forward(self, module, *args, **kwargs):
            stored = {k: p for k, p in module._parameters.items() if p is not None}
            try:
                module._parameters.update({k: p.to(self.compute_dtype) for k, p in stored.items()})
                return self.fn_ref.original_forward(*args, **kwargs)
            finally:  # the fp8 parameters come back even when the call fails
                module._parameters.update(stored)

    return CastUpPerCall


def fp8_targets(model, fp8_base: bool, fp8_base_unet: bool) -> list[torch.nn.Module]:
    """sd-scripts: fp8_base puts the U-Net and the text encoders in fp8; fp8_base_unet only the U-Net."""
    if not (fp8_base or fp8_base_unet):
        return []
    return [model.unet] if fp8_base_unet else [model.unet, *model.text_encoders]


def _offloaded_checkpoint(module, *args):
    """diffusers' checkpoint call, with the tensors it keeps for the backward pass (each block's inputs) moved to
    the CPU until the backward pass needs them; what the block computes inside is recomputed, never stored."""
    from torch.utils.checkpoint import checkpoint

    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(module.__call__, *args, use_reentrant=False)


def enable_checkpointing(unet, cpu_offload: bool) -> None:
    """gradient_checkpointing on the U-Net; the text encoders follow when they train (checkpoint_text_encoders)."""
    unet.enable_gradient_checkpointing(_offloaded_checkpoint if cpu_offload else None)
    unet.train()  # diffusers checkpoints only in training mode; the base stays frozen


def checkpoint_text_encoders(encoders: Sequence[torch.nn.Module]) -> None:
    """sd-scripts' gradient_checkpointing of the text encoders it trains: each CLIP layer is recomputed in the
    backward pass, and the encoders go to training mode, which transformers checkpoints in (CLIP's dropouts are 0,
    so no output changes; sd-scripts does the same). Non-reentrant checkpointing: the adapters' gradients flow
    without sd-scripts' workaround for the reentrant one (embeddings.requires_grad_), and cpu_offload_checkpointing
    stays the U-Net's, as in sd-scripts."""
    options = {"use_reentrant": False}
    for encoder in encoders:
        if hasattr(encoder, "activation_checkpointing_enable"):  # the name in recent transformers
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        encoder.train()


def check_dynamo_backend(backend: str) -> None:
    """The backend must exist in this torch (sd-scripts' list names some that need extra packages)."""
    available = torch._dynamo.list_backends(exclude_tags=())
    if backend not in available:
        raise OptionError(f"option 'dynamo_backend': {backend!r} is not available in this PyTorch (available: "
                          f"{', '.join(sorted(available))})")


def compile_models(modules: Sequence[torch.nn.Module], backend: str) -> None:
    """torch.compile in place (the modules keep their names and parameters), as accelerate does for the models
    sd-scripts prepares: the U-Net when it trains, the text encoders when they train."""
    check_dynamo_backend(backend)
    for module in modules:
        module.compile(backend=backend)


def note_ignored(config) -> None:
    if config.tokenizer_cache_dir:
        log.info("tokenizer_cache_dir %s ignored: lorakit ships its tokenizers and downloads nothing",
                 config.tokenizer_cache_dir)


__all__ = ["base_weight_ratios", "merge_base_weights", "keep_in_fp8", "fp8_targets", "enable_checkpointing",
           "checkpoint_text_encoders", "check_dynamo_backend", "compile_models", "note_ignored"]
