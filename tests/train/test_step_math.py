"""One training step's loss (step.batch_loss) with a fake VAE and U-Net, against sd-scripts' train_network.py
written out here: latents = vae.encode(images).latent_dist.sample() * scaling_factor, noisy = sqrt(a_t) x0 +
sqrt(1 - a_t) noise, target = noise or v = sqrt(a_t) noise - sqrt(1 - a_t) x0 of the CLEAN latents, the weighted
captions' token weights on the U-Net's conditioning, loss = mean_i(loss_weights_i * mean(rho(pred - target)))."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

from lorakit.train.loss import DiffusionLoss, LossOptions  # noqa: E402
from lorakit.train.noise import NoiseOptions, make_noise_scheduler  # noqa: E402
from lorakit.train.step import StepContext, _latents, batch_loss  # noqa: E402

SD_SCALE = 0.18215  # SD1/2's vae.config.scaling_factor (SDXL: 0.13025)


@dataclass
class FakeBatch:
    latents: torch.Tensor | None
    images: torch.Tensor | None
    text_hidden: torch.Tensor
    text_pooled: torch.Tensor | None
    token_weights: list | None
    loss_weights: torch.Tensor
    masks: torch.Tensor | None
    input_ids: list
    captions: list

    def __len__(self):
        return self.text_hidden.shape[0]


def _vae(scaling_factor=SD_SCALE, mean=None, std=None):
    """A VAE whose encoder returns a fixed diagonal Gaussian posterior."""
    posterior = SimpleNamespace(mean=mean, std=std)
    return SimpleNamespace(config=SimpleNamespace(scaling_factor=scaling_factor), dtype=torch.float32,
                           encode=lambda images: SimpleNamespace(latent_dist=posterior))


def _context(v=False, vae=None):
    """A StepContext whose U-Net records its inputs and predicts 0.5 x its input."""
    seen = {}

    def unet(x, t, hidden, added_cond_kwargs=None):
        seen.update(x=x.clone(), t=t.clone(), hidden=hidden.clone())
        return SimpleNamespace(sample=0.5 * x)

    scheduler = make_noise_scheduler("v_prediction" if v else "epsilon")
    ctx = StepContext(model=SimpleNamespace(vae=vae or _vae(), unet=unet, is_sdxl=False),
                      noise_scheduler=scheduler, noise=NoiseOptions(),
                      loss=DiffusionLoss(scheduler, LossOptions(v_parameterization=v)), device=torch.device("cpu"),
                      weight_dtype=torch.float32, autocast_dtype=None, clip_skip=None, max_token_length=None)
    return ctx, seen


def _batch(n=3, loss_weights=None, token_weights=None):
    g = torch.Generator().manual_seed(0)
    return FakeBatch(latents=torch.randn(n, 4, 8, 8, generator=g), images=None,
                     text_hidden=torch.randn(n, 77, 16, generator=g), text_pooled=None, token_weights=token_weights,
                     loss_weights=torch.ones(n) if loss_weights is None else loss_weights, masks=None,
                     input_ids=[torch.zeros(n, 77, dtype=torch.long)], captions=["a"] * n)


def _reference_loss(seen, clean, alphas_cumprod, weights, v):
    """sd-scripts' loss from what the U-Net saw: the noise recovered from the DDPM forward process, in float64."""
    a = alphas_cumprod.double()[seen["t"]].view(-1, 1, 1, 1)
    x0, noisy = clean.double(), seen["x"].double()
    noise = (noisy - a.sqrt() * x0) / (1 - a).sqrt()
    target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v else noise
    per_sample = ((0.5 * noisy - target) ** 2).mean(dim=(1, 2, 3))
    return float((per_sample * weights.double()).mean())


def test_cached_latents_enter_the_unet_times_the_vae_scaling_factor():
    ctx, _ = _context(vae=_vae(scaling_factor=0.13025))
    cached = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    got = _latents(ctx, SimpleNamespace(latents=cached, images=None), torch.Generator(), slice(0, 2), 2)
    torch.testing.assert_close(got, cached * 0.13025)


def test_encoded_latents_are_a_posterior_sample_times_the_scaling_factor():
    # sd-scripts: vae.encode(images).latent_dist.sample() * vae_scale_factor, a sample (not the mean)
    mean, std = torch.full((4, 4, 8, 8), 3.0), torch.full((4, 4, 8, 8), 2.0)
    ctx, _ = _context(vae=_vae(mean=mean, std=std))
    images = torch.zeros(4, 3, 64, 64)
    got = _latents(ctx, SimpleNamespace(latents=None, images=images), torch.Generator().manual_seed(0), slice(0, 4), 4)
    drawn = got / SD_SCALE  # 1024 draws of N(3, 2^2)
    assert abs(float(drawn.mean()) - 3.0) < 0.2
    assert abs(float(drawn.std()) - 2.0) < 0.2


def test_epsilon_loss_equals_sd_scripts_with_the_scaled_latents():
    ctx, seen = _context()
    batch = _batch()
    got = batch_loss(ctx, batch, torch.Generator().manual_seed(1), False).item()
    ref = _reference_loss(seen, batch.latents * SD_SCALE, ctx.noise_scheduler.alphas_cumprod, batch.loss_weights, False)
    assert got == pytest.approx(ref, rel=1e-4)


def test_v_prediction_target_is_the_velocity_of_the_clean_latents():
    ctx, seen = _context(v=True)
    batch = _batch()
    got = batch_loss(ctx, batch, torch.Generator().manual_seed(1), False).item()
    ref = _reference_loss(seen, batch.latents * SD_SCALE, ctx.noise_scheduler.alphas_cumprod, batch.loss_weights, True)
    assert got == pytest.approx(ref, rel=1e-4)


def test_loss_weights_scale_each_samples_loss():
    # prior_loss_weight of regularisation images, a dataset class's loss_weights: loss = loss * loss_weights
    weights = torch.tensor([1.0, 0.25, 2.0])
    ctx, seen = _context()
    batch = _batch(loss_weights=weights)
    got = batch_loss(ctx, batch, torch.Generator().manual_seed(1), False).item()
    ref = _reference_loss(seen, batch.latents * SD_SCALE, ctx.noise_scheduler.alphas_cumprod, weights, False)
    unweighted = _reference_loss(seen, batch.latents * SD_SCALE, ctx.noise_scheduler.alphas_cumprod,
                                 torch.ones(3), False)
    assert got == pytest.approx(ref, rel=1e-4)
    assert abs(ref - unweighted) > 1e-3 * ref  # the weights matter for this draw


def test_weighted_captions_multiply_the_unets_conditioning_per_token():
    weights = torch.ones(3, 1, 77)
    weights[:, 0, 5] = 1.5   # "(word:1.5)" at token 5
    weights[1, 0, 9] = 0.5   # "(other:0.5)" in the second caption
    ctx, seen = _context()
    batch = _batch(token_weights=[weights])
    batch_loss(ctx, batch, torch.Generator().manual_seed(1), False)
    # one chunk of 77 positions: position p carries token p's weight
    torch.testing.assert_close(seen["hidden"], batch.text_hidden * weights[:, 0, :, None])
