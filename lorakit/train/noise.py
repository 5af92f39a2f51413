"""Noise, timesteps and noisy latents for one training batch, with kohya sd-scripts' options.

Everything random is drawn from one explicit `torch.Generator`, in a fixed order, so that a seed gives the same
batches and saving `generator.get_state()` with a checkpoint resumes the same sequence. The order of draws is:
noise; noise-offset strength (if random); offset noise; per pyramid level a ratio then a noise image;
timesteps; input-perturbation strength (if random); input-perturbation noise. (kohya draws the pyramid ratio
from Python's `random` and the rest from torch's global generator; the distributions are the same.)

The noise scheduler is diffusers' `DDPMScheduler` with the settings kohya trains Stable Diffusion with, so that
`scheduler.add_noise` and `scheduler.get_velocity` are the reference forward process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..algos.options import OptionError

# kohya's training scheduler (train_util / train_network): SD1, SD2 and SDXL were all trained with it.
BETA_START = 0.00085
BETA_END = 0.012
NUM_TRAIN_TIMESTEPS = 1000


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last timestep has SNR 0 (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Algorithm 1): shift sqrt(alphas_cumprod) so its last value is 0, scale it so its first value
    is unchanged, and turn it back into betas. Computed in float64; returned in the input's dtype."""
    sqrt_ab = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return (1.0 - alphas).to(betas.dtype)


def make_noise_scheduler(
    prediction_type: str = "epsilon",
    zero_terminal_snr: bool = False,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
):
    """The DDPM scheduler kohya trains with (scaled-linear betas, no sample clipping).

    `zero_terminal_snr` rescales the betas so that alphas_cumprod[-1] == 0 (pure noise at the last timestep);
    the paper pairs it with v-prediction. `snr_alphas_cumprod` keeps the schedule before the rescale."""
    from diffusers import DDPMScheduler  # the `sd` extra; imported here so the rest of train/ needs only torch

    if prediction_type not in ("epsilon", "v_prediction"):
        raise OptionError(f"prediction_type {prediction_type!r}: expected 'epsilon' or 'v_prediction'")
    scheduler = DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=prediction_type,
    )
    # the SNR weights (min_snr_gamma, debiased_estimation_loss, ...) read the schedule before any rescale, as in
    # sd-scripts, which builds its SNR table first (prepare_scheduler_for_custom_training)
    scheduler.snr_alphas_cumprod = scheduler.alphas_cumprod.clone()
    if zero_terminal_snr:
        dtype = scheduler.betas.dtype
        betas64 = rescale_zero_terminal_snr(scheduler.betas.double())
        # alphas_cumprod from the float64 product (its last entry is exactly 0), as kohya sets the three tensors
        scheduler.betas = betas64.to(dtype)
        scheduler.alphas = (1.0 - betas64).to(dtype)
        scheduler.alphas_cumprod = torch.cumprod(1.0 - betas64, dim=0).to(dtype)
    return scheduler


@dataclass(frozen=True)
class NoiseOptions:
    """kohya's noise options (same names, same meaning). `None`/0 disables an option."""

    noise_offset: float | None = None  # std of a per-(sample, channel) constant added to the noise
    noise_offset_random_strength: bool = False  # offset strength uniform in [0, noise_offset) per batch
    adaptive_noise_scale: float | None = None  # offset += scale * |channel mean of the latents|
    multires_noise_iterations: int | None = None  # pyramid noise levels
    multires_noise_discount: float = 0.3  # weight of level i is discount**i (kohya's default)
    ip_noise_gamma: float | None = None  # input perturbation: noisy latents get extra gamma * N(0, 1)
    ip_noise_gamma_random_strength: bool = False  # gamma uniform in [0, ip_noise_gamma) per batch
    min_timestep: int | None = None  # None: 0
    max_timestep: int | None = None  # None: num_train_timesteps (exclusive)

    def __post_init__(self):
        # the rules kohya's verify_training_args enforces, as errors that name the option
        if self.noise_offset is not None and self.noise_offset < 0:
            raise OptionError(f"noise_offset={self.noise_offset}: expected a number >= 0")
        if self.adaptive_noise_scale and self.noise_offset is None:  # an offset of 0 is off, as in sd-scripts
            raise OptionError("adaptive_noise_scale needs noise_offset (it scales the offset by the latent means)")
        if self.multires_noise_iterations is not None and self.multires_noise_iterations < 0:
            raise OptionError(f"multires_noise_iterations={self.multires_noise_iterations}: expected an integer >= 0")
        if self.ip_noise_gamma is not None and self.ip_noise_gamma < 0:
            raise OptionError(f"ip_noise_gamma={self.ip_noise_gamma}: expected a number >= 0")
        if self.min_timestep is not None and self.min_timestep < 0:
            raise OptionError(f"min_timestep={self.min_timestep}: expected an integer >= 0")
        if self.min_timestep is not None and self.max_timestep is not None and self.min_timestep > self.max_timestep:
            raise OptionError(f"min_timestep={self.min_timestep} is greater than max_timestep={self.max_timestep}")


@dataclass
class NoisyBatch:
    noise: torch.Tensor  # the noise the model should predict (epsilon target; also gives v)
    noisy_latents: torch.Tensor  # the U-Net input
    timesteps: torch.Tensor  # int64, one per sample


def _randn(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


def _rand(generator: torch.Generator) -> torch.Tensor:
    return torch.rand((), generator=generator, device=generator.device, dtype=torch.float32)


def offset_noise(
    latents: torch.Tensor,
    noise: torch.Tensor,
    noise_offset: float | torch.Tensor,
    adaptive_noise_scale: float | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """noise + offset * N(0, 1) drawn once per (sample, channel) (crosslabs' offset noise: lets the model learn
    overall brightness). With `adaptive_noise_scale` the offset grows with |mean of each latent channel|,
    clamped at 0 for negative scales."""
    offset = torch.as_tensor(noise_offset, dtype=torch.float32, device=noise.device)
    if adaptive_noise_scale:
        latent_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        offset = (offset + adaptive_noise_scale * latent_mean).clamp(min=0.0)
    per_channel = _randn((latents.shape[0], latents.shape[1], 1, 1), generator).to(noise.device)
    return noise + offset * per_channel


def pyramid_noise(
    noise: torch.Tensor, generator: torch.Generator, iterations: int = 6, discount: float = 0.4
) -> torch.Tensor:
    """Multi-resolution noise (Whitaker's pyramid noise): add noise images of shrinking size, each scaled down
    by a random ratio r in [2, 4) per level and upsampled bilinearly, weighted discount**level; stop at 1 pixel;
    then divide by the std of the whole batch (back to unit variance). Level 0 is full-size noise."""
    b, c, h, w = noise.shape
    out = noise.float().clone()
    for i in range(iterations):
        r = 2.0 + 2.0 * float(_rand(generator))
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = _randn((b, c, hn, wn), generator).to(noise.device)
        out += F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    generator: torch.Generator,
    min_timestep: int | None = None,
    max_timestep: int | None = None,
) -> torch.Tensor:
    """Uniform integers in [min_timestep, max_timestep); min == max gives that one timestep."""
    lo = 0 if min_timestep is None else int(min_timestep)
    hi = num_train_timesteps if max_timestep is None else int(max_timestep)
    if hi > num_train_timesteps:
        raise OptionError(f"max_timestep={hi}: the scheduler has {num_train_timesteps} timesteps (max is exclusive)")
    if lo > hi:
        raise OptionError(f"min_timestep={lo} is greater than max_timestep={hi}")
    if lo == hi:
        if lo >= num_train_timesteps:
            raise OptionError(f"min_timestep = max_timestep = {lo}: the last timestep is {num_train_timesteps - 1}")
        return torch.full((batch_size,), lo, dtype=torch.int64, device=generator.device)
    return torch.randint(lo, hi, (batch_size,), generator=generator, device=generator.device, dtype=torch.int64)


def sample_noise(latents: torch.Tensor, options: NoiseOptions, generator: torch.Generator) -> torch.Tensor:
    """The training noise for `latents` (float32): N(0, 1), plus offset noise or pyramid noise as configured."""
    noise = _randn(latents.shape, generator).to(latents.device)
    if options.noise_offset:
        strength = options.noise_offset
        if options.noise_offset_random_strength:
            strength = float(_rand(generator)) * options.noise_offset
        noise = offset_noise(latents, noise, strength, options.adaptive_noise_scale, generator)
    if options.multires_noise_iterations:
        noise = pyramid_noise(noise, generator, options.multires_noise_iterations, options.multires_noise_discount)
    return noise


def noisy_batch(latents: torch.Tensor, scheduler, options: NoiseOptions, generator: torch.Generator) -> NoisyBatch:
    """kohya's get_noise_noisy_latents_and_timesteps: noise, timesteps, and the scheduler's forward process
    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) (noise + gamma * extra) where the input perturbation `extra` (ip_noise_gamma)
    enters the U-Net input only, not the target."""
    noise = sample_noise(latents, options, generator)
    timesteps = sample_timesteps(
        latents.shape[0],
        scheduler.config.num_train_timesteps,
        generator,
        options.min_timestep,
        options.max_timestep,
    ).to(latents.device)
    perturbed = noise
    if options.ip_noise_gamma:
        gamma = options.ip_noise_gamma
        if options.ip_noise_gamma_random_strength:
            gamma = float(_rand(generator)) * options.ip_noise_gamma
        perturbed = noise + gamma * _randn(latents.shape, generator).to(latents.device)
    noise = noise.to(latents.dtype)
    noisy = scheduler.add_noise(latents, perturbed.to(latents.dtype), timesteps)
    return NoisyBatch(noise=noise, noisy_latents=noisy, timesteps=timesteps)
