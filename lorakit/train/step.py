"""One training step's loss: latents (cached or encoded), conditioning, noise, the U-Net's prediction, the loss."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields, replace

import torch

from ..data.weighted import apply_token_weights
from ..models.text import PromptEmbeds, encode_prompts
from .distributed import World
from .loss import DiffusionLoss
from .noise import NoiseOptions, noisy_batch

__all__ = ["StepContext", "batch_loss"]


@dataclass
class StepContext:
    model: object                   # StableDiffusionModel (adapters applied)
    noise_scheduler: object
    noise: NoiseOptions
    loss: DiffusionLoss
    device: torch.device
    weight_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    clip_skip: int | None
    max_token_length: int | None
    # cache_text_encoder_outputs with dataset_class batches (folder datasets cache before training): one sample's
    # ids -> its embeddings (frozen encoders)
    text_cache: dict | None = None
    timings: dict = field(default_factory=lambda: defaultdict(float))  # seconds per phase, summed over steps
    world: World = field(default_factory=World)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def _shard(batch, part: slice):
    """This process's samples of a global batch (every tensor and list field sliced)."""
    values = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            values[f.name] = [v[part] for v in value]
        elif isinstance(value, (torch.Tensor, list)):
            values[f.name] = value[part]
    return replace(batch, **values)


def _global_randn(shape, part: slice, n: int, generator: torch.Generator, device) -> torch.Tensor:
    """Normal draws for the global batch of ``n`` samples, sliced to this process's part."""
    return torch.randn((n, *shape[1:]), generator=generator, device=device)[part]


def _latents(ctx: StepContext, batch, generator: torch.Generator, part: slice, n: int) -> torch.Tensor:
    vae = ctx.model.vae
    if batch.latents is not None:
        latents = batch.latents.to(ctx.device, torch.float32)
    else:
        with torch.no_grad():
            images = batch.images.to(ctx.device, vae.dtype)
            dist = vae.encode(images).latent_dist
            eps = _global_randn(dist.mean.shape, part, n, generator, ctx.device)
            latents = (dist.mean + dist.std * eps.to(dist.mean.dtype)).float()
    return latents * vae.config.scaling_factor


def _conditioning(ctx: StepContext, batch, train_text: bool) -> PromptEmbeds:
    if getattr(batch, "text_hidden", None) is not None and not train_text:  # cached before training
        pooled = None if batch.text_pooled is None else batch.text_pooled.to(ctx.device)
        return PromptEmbeds(batch.text_hidden.to(ctx.device), pooled)
    if ctx.text_cache is not None and not train_text:
        return _cached_conditioning(ctx, batch)
    ids = [t.to(ctx.device) for t in batch.input_ids]
    with torch.set_grad_enabled(train_text), ctx.autocast():
        return encode_prompts(ctx.model, batch.captions, ctx.clip_skip, ctx.max_token_length, input_ids=ids)


def _sample_keys(input_ids: list[torch.Tensor]) -> list[tuple[bytes, ...]]:
    """One key per sample: its token ids for every text encoder, all that the frozen encoders' output depends on."""
    rows = [t.reshape(t.shape[0], -1).cpu() for t in input_ids]
    return [tuple(r[i].numpy().tobytes() for r in rows) for i in range(rows[0].shape[0])]


def _cached_conditioning(ctx: StepContext, batch) -> PromptEmbeds:
    """cache_text_encoder_outputs in memory: one entry per distinct caption (as sd-scripts caches per image), so
    memory is bounded by the captions; the samples not cached yet are encoded together, the batch is stacked from
    the entries."""
    cache, keys = ctx.text_cache, _sample_keys(batch.input_ids)
    new: dict = {}  # key -> the first sample of the batch that has it
    for i, key in enumerate(keys):
        if key not in cache:
            new.setdefault(key, i)
    if new:
        rows = list(new.values())
        ids = [t[rows].to(ctx.device) for t in batch.input_ids]
        captions = [batch.captions[i] for i in rows]
        with torch.no_grad(), ctx.autocast():
            out = encode_prompts(ctx.model, captions, ctx.clip_skip, ctx.max_token_length, input_ids=ids)
        for j, key in enumerate(new):  # clones: a view would keep the whole encoded batch alive
            cache[key] = PromptEmbeds(out.hidden[j].clone(), None if out.pooled is None else out.pooled[j].clone())
    entries = [cache[key] for key in keys]
    pooled = None if entries[0].pooled is None else torch.stack([e.pooled for e in entries])
    return PromptEmbeds(torch.stack([e.hidden for e in entries]), pooled)


def batch_loss(ctx: StepContext, batch, generator: torch.Generator, train_text: bool) -> torch.Tensor:
    """The mean loss of this process's part of ``batch`` (the global batch), its gradient weighted by the part's
    share of the samples; every random draw (VAE sample, noise, timesteps) comes from ``generator``, drawn for the
    whole global batch."""
    n = len(batch)
    part = ctx.world.shard(n)
    if ctx.world.active:
        batch = _shard(batch, part)
    latents = _latents(ctx, batch, generator, part, n)
    emb = _conditioning(ctx, batch, train_text)
    hidden = emb.hidden
    if batch.token_weights is not None:
        hidden = apply_token_weights(hidden, batch.token_weights[0].to(hidden.device))
    if ctx.world.active:  # draw for the global batch (this process's latents in its slot), keep this part
        placed = latents.new_zeros((n, *latents.shape[1:]))
        placed[part] = latents
        full = noisy_batch(placed, ctx.noise_scheduler, ctx.noise, generator)
        noisy = type(full)(noise=full.noise[part], noisy_latents=full.noisy_latents[part],
                           timesteps=full.timesteps[part])
    else:
        noisy = noisy_batch(latents, ctx.noise_scheduler, ctx.noise, generator)
    added = None
    if ctx.model.is_sdxl:
        time_ids = torch.cat([batch.original_sizes_hw, batch.crop_top_lefts, batch.target_sizes_hw], dim=1)
        # the sizes stay float32 (the U-Net embeds them in float32): bf16 would round 333 to 332, and sd-scripts
        # embeds the exact integers before casting
        added = {"text_embeds": emb.pooled.to(ctx.weight_dtype), "time_ids": time_ids.to(ctx.device, torch.float32)}
    start = time.perf_counter()
    with ctx.autocast():
        pred = ctx.model.unet(noisy.noisy_latents.to(ctx.weight_dtype), noisy.timesteps,
                              hidden.to(ctx.weight_dtype), added_cond_kwargs=added).sample
    ctx.timings["unet_forward"] += time.perf_counter() - start
    target = ctx.loss.target(latents, noisy.noise, noisy.timesteps)
    weights = batch.loss_weights.to(ctx.device, torch.float32)
    # sd-scripts masks whenever the batch has masks (alpha_mask), or with masked_loss (conditioning images)
    loss = ctx.loss(pred.float(), target.float(), noisy.timesteps, sample_weights=weights, mask=batch.masks)
    return _weight_gradient(loss, ctx.world.loss_weight(n))


def _weight_gradient(loss: torch.Tensor, weight: float) -> torch.Tensor:
    """``loss`` with its gradient scaled by ``weight``; its value stays this process's mean loss (what is logged)."""
    if weight == 1:
        return loss
    return loss * weight + (loss * (1 - weight)).detach()
