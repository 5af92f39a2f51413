"""Noise options at their edges, against sd-scripts' custom_train_functions written out here: apply_noise_offset
with |channel mean| (negative means too), noise_offset followed by pyramid_noise_like when both are set
(get_noise_noisy_latents_and_timesteps), and --multires_noise_discount's default 0.3.

The references replay lorakit's documented draw order on a generator with the same seed (noise; offset; per
pyramid level a ratio then an image); sd-scripts draws the pyramid ratio from Python's `random` instead."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.train.noise import NoiseOptions, offset_noise, sample_noise


def _apply_noise_offset(latents, noise, noise_offset, adaptive_noise_scale, generator):
    """sd-scripts' apply_noise_offset."""
    if adaptive_noise_scale is not None:
        latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
        noise_offset = torch.clamp(noise_offset + adaptive_noise_scale * latent_mean, 0.0, None)
    return noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)


def _pyramid_noise_like(noise, generator, iterations, discount):
    """sd-scripts' pyramid_noise_like (its ratio r = random.random() * 2 + 2 drawn from the generator here)."""
    b, c, h, w = noise.shape
    noise = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        level = torch.randn(b, c, hn, wn, generator=generator)
        noise += F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def test_adaptive_noise_scale_uses_the_absolute_channel_mean():
    g = torch.Generator().manual_seed(3)
    signs = torch.tensor([-1.0, 1.0, -1.0, -1.0]).view(1, 4, 1, 1)
    latents = torch.randn(2, 4, 8, 8, generator=g) * 0.1 + 0.5 * signs  # channel means near -0.5 and +0.5
    noise = torch.randn(2, 4, 8, 8, generator=g)
    got = offset_noise(latents, noise, 0.1, 0.2, torch.Generator().manual_seed(7))
    ref = _apply_noise_offset(latents, noise, 0.1, 0.2, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, ref)


def test_noise_offset_and_multires_noise_both_apply_offset_first():
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    options = NoiseOptions(noise_offset=0.1, multires_noise_iterations=4, multires_noise_discount=0.3)
    got = sample_noise(latents, options, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=g)
    noise = _apply_noise_offset(latents, noise, 0.1, None, g)
    ref = _pyramid_noise_like(noise, g, 4, 0.3)
    torch.testing.assert_close(got, ref)


def test_multires_noise_discount_defaults_to_sd_scripts_0_3():
    assert NoiseOptions().multires_noise_discount == 0.3
    latents = torch.zeros(1, 4, 16, 16)
    got = sample_noise(latents, NoiseOptions(multires_noise_iterations=3), torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    ref = _pyramid_noise_like(torch.randn(latents.shape, generator=g), g, 3, 0.3)
    torch.testing.assert_close(got, ref)
