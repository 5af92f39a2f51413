"""The frozen base model made ready for training, as sd-scripts' train_network.py does it: adapter files merged in
(base_weights), weights kept in fp8 (fp8_base, fp8_base_unet), checkpointed activations held on the CPU
(cpu_offload_checkpointing) and torch.compile (torch_compile, dynamo_backend)."""

from __future__ import annotations

import logging
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
    """Store the Linear/Conv weights of `modules` in float8_e4m3fn, cast up to `compute_dtype` for each call and
    back after it (diffusers' layerwise casting). Norm layers and embeddings keep `compute_dtype`, as sd-scripts
    keeps the text encoders' embeddings; SDXL's text_projection too (its weight dtype decides the pooled dtype)."""
    from diffusers.hooks import apply_layerwise_casting

    for module in modules:
        apply_layerwise_casting(module, storage_dtype=FP8, compute_dtype=compute_dtype,
                                skip_modules_pattern=(r"(^|\.)text_projection$",),
                                skip_modules_classes=(torch.nn.Embedding,))


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
