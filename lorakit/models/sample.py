"""Text-to-image sampling: a classifier-free-guidance loop over a diffusers scheduler.

Sampler names are kohya sd-scripts' (``--sample_sampler``), mapped to the diffusers scheduler classes that
sd-scripts' ``get_my_scheduler`` uses; each scheduler is built from the model's own training schedule
(``model.scheduler_config``), so betas, timestep spacing and the prediction type (epsilon or v) follow the model.
Each image has its own generator (seed + index): image i is the same, up to float rounding (batched matmuls may
differ by a grey level in a few pixels), whichever batch it is drawn in.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["SAMPLERS", "check_sampler", "scheduler_for", "prompt_conditioning", "generate"]

# sd-scripts name -> (diffusers class, extra config). "k_" names are the same schedulers (k-diffusion spelling).
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers refuses the first-order "dpmsolver" with its default final sigma of zero
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
for _name in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a"):
    SAMPLERS["k_" + _name] = SAMPLERS[_name]


def check_sampler(sampler: str) -> None:
    """ValueError for an unknown name, or for a scheduler that cannot run here: diffusers' LMS needs scipy, and
    without it fails only when the scheduler is built, mid-run for a trainer's samples."""
    key = sampler.lower()
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    import diffusers

    try:
        getattr(diffusers, SAMPLERS[key][0])()
    except ImportError as err:
        raise ValueError(f"sampler {sampler!r} cannot run here: {err}") from None


def scheduler_for(model, sampler: str = "euler_a"):
    """A fresh diffusers scheduler for ``sampler`` with ``model``'s schedule. Unknown names -> ValueError."""
    check_sampler(sampler)
    import diffusers

    class_name, extra = SAMPLERS[sampler.lower()]
    prediction = "v_prediction" if model.v_parameterization else model.scheduler_config.get("prediction_type", "epsilon")
    # clip_sample off: SD latents are not in [-1, 1]. sd-scripts' get_my_scheduler sets it on, but its sampling
    # pipeline (as diffusers' StableDiffusionPipeline) turns it off again on construction.
    return getattr(diffusers, class_name).from_config(dict(model.scheduler_config), prediction_type=prediction,
                                                      clip_sample=False, **extra)


def prompt_conditioning(model, texts: Sequence[str], clip_skip: int | None = None,
                        max_token_length: int | None = None):
    """The conditioning (``text.PromptEmbeds``) of ``texts`` as sd-scripts samples with it (its
    StableDiffusionLongPromptWeightingPipeline): A1111 weights ("(red:1.3)", "[x]") scale each token's states,
    which are then brought back to the mean they had before weighting, per text; and as many 75-token chunks
    as the longest text needs, up to 3 (225 tokens), unless ``max_token_length`` (75, 150, 225) says."""
    from ..data.weighted import CHUNK, apply_token_weights, parse_prompt_attention, tokenize_weighted
    from .text import PromptEmbeds, encode_prompts

    texts = list(texts)
    if max_token_length is None:
        first = model.tokenizers[0]
        longest = max(sum(len(first(piece).input_ids) - 2 for piece, _ in parse_prompt_attention(t)) for t in texts)
        max_token_length = CHUNK * min(3, max(1, -(-longest // CHUNK)))
    tokenized = [tokenize_weighted(tokenizer, texts, max_token_length) for tokenizer in model.tokenizers]
    embeds = encode_prompts(model, texts, clip_skip=clip_skip, max_token_length=max_token_length,
                            input_ids=[ids for ids, _ in tokenized])
    weights = tokenized[0][1]
    if bool((weights == 1).all()):
        return embeds
    hidden = embeds.hidden
    before = hidden.float().mean(dim=(-2, -1))
    hidden = apply_token_weights(hidden, weights.to(hidden.device))
    after = hidden.float().mean(dim=(-2, -1))
    return PromptEmbeds(hidden * (before / after).to(hidden.dtype)[:, None, None], embeds.pooled)


def _as_list(value: str | Sequence[str], n: int, what: str) -> list[str]:
    values = [value] * n if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"{len(values)} {what}s for {n} prompts")
    return values


@torch.no_grad()
def generate(model, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] = "", steps: int = 20,
             guidance_scale: float = 7.5, width: int | None = None, height: int | None = None, seed: int = 0,
             sampler: str = "euler_a", clip_skip: int | None = None,
             max_token_length: int | None = None) -> list[Image.Image]:
    """One image per prompt from ``model`` (a ``StableDiffusionModel``), image i drawn with seed ``seed + i`` (the
    same image, up to float rounding, whatever the batch).

    Prompts are read as sd-scripts' sampling reads them (``prompt_conditioning``): A1111 weights, and up to 225
    tokens (``max_token_length`` fixes the length instead). ``steps`` >= 1. ``width``/``height`` default to the
    U-Net's native size (``sample_size`` x the VAE's scale factor). ``guidance_scale`` <= 1 runs the conditional
    branch only. SDXL gets its pooled text embeds and time ids
    (original size = target size = (height, width), crop (0, 0)), as kohya samples. Text-to-image only: a U-Net
    that takes more input channels than the VAE's latents (inpainting, instruct-pix2pix) is refused.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
    latent_channels = model.vae.config.latent_channels
    if model.unet.config.in_channels != latent_channels:
        raise ValueError(f"generate() draws text-to-image only; this U-Net takes {model.unet.config.in_channels} "
                         f"input channels (an inpainting model?), the VAE's latents have {latent_channels}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    negatives = _as_list(negative_prompt, n, "negative prompt")
    scheduler = scheduler_for(model, sampler)  # before any work: a bad name fails fast
    unet, vae = model.unet, model.vae
    param = next(unet.parameters())
    device, dtype = param.device, unet.dtype  # diffusers' compute dtype (fp8-stored weights are cast up per call)
    factor = model.vae_scale_factor
    native = unet.config.sample_size * factor
    width, height = width or native, height or native
    if width % factor or height % factor:
        raise ValueError(f"width and height must be multiples of {factor}, got {width}x{height}")

    cfg = guidance_scale > 1.0
    # negatives first: the batch is [uncond, cond]; one length for both, as the pipeline pads them together
    embeds = prompt_conditioning(model, (negatives if cfg else []) + prompts, clip_skip, max_token_length)
    hidden, pooled = embeds.hidden, embeds.pooled
    hidden = hidden.to(device, dtype)
    added = None
    if model.is_sdxl:
        time_ids = torch.tensor([height, width, 0, 0, height, width], device=device, dtype=torch.float32)  # exact
        added = {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.expand(hidden.shape[0], 6)}

    generators = [torch.Generator(device).manual_seed(seed + i) for i in range(n)]
    shape = (unet.config.in_channels, height // factor, width // factor)
    latents = torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generators])
    scheduler.set_timesteps(steps, device=device)
    latents = latents * scheduler.init_noise_sigma
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        x = torch.cat([latents] * 2) if cfg else latents
        x = scheduler.scale_model_input(x, t)
        pred = unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        if cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample

    vae_dtype = next(vae.parameters()).dtype
    latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    pixels = vae.decode(latents.to(vae_dtype)).sample
    pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(p.permute(1, 2, 0).cpu().numpy())) for p in pixels]
