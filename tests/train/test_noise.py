"""Noise, timesteps and noisy latents against float64 formulas written here from the papers and kohya's code.

The references replay the documented draw order on a generator with the same seed: noise; offset strength
(if random); offset; per pyramid level a ratio then an image; timesteps; ip strength (if random); ip noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lorakit.algos.options import OptionError
from lorakit.train.noise import (
    NoiseOptions,
    make_noise_scheduler,
    noisy_batch,
    offset_noise,
    pyramid_noise,
    rescale_zero_terminal_snr,
    sample_noise,
    sample_timesteps,
)

SHAPE = (3, 4, 12, 10)


def gen(seed=1234):
    return torch.Generator().manual_seed(seed)


def latents(seed=7):
    return torch.randn(SHAPE, generator=gen(seed)) * 0.8 + 0.3


def scaled_linear_betas(n=1000, start=0.00085, end=0.012):
    a, b = math.sqrt(start), math.sqrt(end)
    return [(a + i * (b - a) / (n - 1)) ** 2 for i in range(n)]


def alphas_cumprod_of(betas):
    out, p = [], 1.0
    for beta in betas:
        p *= 1.0 - beta
        out.append(p)
    return out


def zero_snr_paper(betas):
    """Lin et al. 2023, Algorithm 1, one element at a time."""
    sqrt_ab = [math.sqrt(a) for a in alphas_cumprod_of(betas)]
    s0, sT = sqrt_ab[0], sqrt_ab[-1]
    ab = [((s - sT) * s0 / (s0 - sT)) ** 2 for s in sqrt_ab]
    alphas = [ab[0]] + [ab[i] / ab[i - 1] for i in range(1, len(ab))]
    return [1.0 - a for a in alphas]


# --- the scheduler ---------------------------------------------------------------------------------------------


def test_scheduler_has_kohyas_scaled_linear_betas():
    s = make_noise_scheduler()
    ref = torch.tensor(scaled_linear_betas(), dtype=torch.float64)
    torch.testing.assert_close(s.betas.double(), ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        s.alphas_cumprod.double(),
        torch.tensor(alphas_cumprod_of(ref.tolist()), dtype=torch.float64),
        rtol=1e-5,
        atol=1e-8,
    )
    assert s.config.num_train_timesteps == 1000 and s.config.clip_sample is False


def test_zero_terminal_snr_matches_the_papers_algorithm():
    s = make_noise_scheduler(prediction_type="v_prediction", zero_terminal_snr=True)
    ref_betas = zero_snr_paper(scaled_linear_betas())
    ref_ab = alphas_cumprod_of(ref_betas)
    assert s.alphas_cumprod[-1].item() == 0.0  # pure noise at the last step: SNR 0
    assert s.betas[-1].item() == 1.0
    torch.testing.assert_close(s.betas.double(), torch.tensor(ref_betas, dtype=torch.float64), rtol=2e-5, atol=1e-8)
    torch.testing.assert_close(
        s.alphas_cumprod.double(), torch.tensor(ref_ab, dtype=torch.float64), rtol=2e-5, atol=1e-9
    )
    # the first step is unchanged, and all SNRs before the last stay positive and decreasing
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    snr = s.alphas_cumprod.double() / (1 - s.alphas_cumprod.double())
    assert bool((snr[:-1] > 0).all()) and bool((snr[1:] < snr[:-1]).all())


def test_zero_terminal_snr_equals_diffusers_rescale():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        rescale_betas_zero_snr=True,
    )
    ours = make_noise_scheduler(zero_terminal_snr=True)
    # diffusers rescales in float32 (relative error up to ~3e-4 on the small betas); ours is float64
    torch.testing.assert_close(ours.betas, ref.betas, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=1e-3, atol=1e-6)
    assert ref.alphas_cumprod[-1].item() == ours.alphas_cumprod[-1].item() == 0.0
    # the three tensors are rescaled together (as sd-scripts sets them): alphas = 1 - betas, like diffusers'
    torch.testing.assert_close(ours.alphas, ref.alphas, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(ours.alphas.double(), 1.0 - ours.betas.double(), rtol=0, atol=1e-7)
    b = torch.linspace(1e-4, 0.02, 50, dtype=torch.float64)
    torch.testing.assert_close(
        rescale_zero_terminal_snr(b), torch.tensor(zero_snr_paper(b.tolist()), dtype=torch.float64)
    )


# --- timesteps ---------------------------------------------------------------------------------------------------


def test_timesteps_uniform_in_half_open_range():
    t = sample_timesteps(40000, 1000, gen(), min_timestep=100, max_timestep=300)
    assert t.dtype == torch.int64 and int(t.min()) == 100 and int(t.max()) == 299
    counts = torch.bincount(t - 100, minlength=200).double()
    expected = 40000 / 200
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 300  # 199 degrees of freedom: mean 199, sd 20
    # exactly torch.randint on the same generator state (the documented draw)
    torch.testing.assert_close(sample_timesteps(5, 1000, gen(3)), torch.randint(0, 1000, (5,), generator=gen(3)))


def test_timesteps_edge_cases_and_errors():
    assert sample_timesteps(4, 1000, gen(), 500, 500).tolist() == [500] * 4
    assert int(sample_timesteps(2000, 1000, gen()).max()) == 999
    with pytest.raises(OptionError, match="max_timestep=1001"):
        sample_timesteps(2, 1000, gen(), None, 1001)
    with pytest.raises(OptionError, match="min_timestep = max_timestep = 1000"):
        sample_timesteps(2, 1000, gen(), 1000, 1000)
    with pytest.raises(OptionError, match="greater than max_timestep"):
        NoiseOptions(min_timestep=600, max_timestep=500)


# --- offset noise --------------------------------------------------------------------------------------------------


def test_offset_noise_adds_one_constant_per_sample_and_channel():
    x = latents()
    noise = sample_noise(x, NoiseOptions(noise_offset=0.1), gen())
    g = gen()
    base = torch.randn(SHAPE, generator=g).double()
    per_channel = torch.randn(SHAPE[0], SHAPE[1], 1, 1, generator=g).double()
    torch.testing.assert_close(noise.double(), base + 0.1 * per_channel, rtol=0, atol=1e-6)


def test_offset_noise_random_strength_and_adaptive_scale():
    x = latents()
    opts = NoiseOptions(noise_offset=0.2, noise_offset_random_strength=True, adaptive_noise_scale=-0.5)
    noise = sample_noise(x, opts, gen(5))
    g = gen(5)
    base = torch.randn(SHAPE, generator=g).double()
    strength = 0.2 * torch.rand((), generator=g).double()
    per_channel = torch.randn(SHAPE[0], SHAPE[1], 1, 1, generator=g).double()
    expected = base.clone()
    for b in range(SHAPE[0]):
        for c in range(SHAPE[1]):
            mean = float(x[b, c].double().mean())
            off = max(0.0, float(strength) + (-0.5) * abs(mean))  # kohya clamps the offset at 0
            expected[b, c] += off * per_channel[b, c, 0, 0]
    torch.testing.assert_close(noise.double(), expected, rtol=0, atol=1e-6)


def test_offset_noise_statistics():
    # the offset is a per-(sample, channel) constant of std noise_offset: the spatial means carry it
    x = torch.zeros(4000, 4, 8, 8)
    noise = offset_noise(x, torch.zeros_like(x), 0.3, None, gen())
    assert float((noise - noise.mean(dim=(2, 3), keepdim=True)).abs().max()) < 1e-6
    assert float(noise[:, :, 0, 0].std()) == pytest.approx(0.3, rel=0.03)


# --- pyramid (multi-resolution) noise ------------------------------------------------------------------------------


def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Row i: the weights of the input samples in output sample i (half-pixel centres, edge clamped)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[i, i0] += 1.0 - frac
        m[i, i1] += frac
    return m


def pyramid_reference(noise: np.ndarray, g: torch.Generator, iterations: int, discount: float) -> np.ndarray:
    b, c, h, w = noise.shape
    out = noise.astype(np.float64).copy()
    for i in range(iterations):
        r = 2.0 + 2.0 * float(torch.rand((), generator=g))
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        small = torch.randn(b, c, hn, wn, generator=g).double().numpy()
        wh, ww = bilinear_matrix(h, hn), bilinear_matrix(w, wn)
        for bi in range(b):
            for ci in range(c):
                out[bi, ci] += (wh @ small[bi, ci] @ ww.T) * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std(ddof=1)


@pytest.mark.parametrize("iterations,discount", [(6, 0.3), (3, 0.8), (50, 0.4)])
def test_pyramid_noise_exact_values_against_independent_loop(iterations, discount):
    base = torch.randn(SHAPE, generator=gen(11))
    got = pyramid_noise(base, gen(), iterations, discount)
    ref = pyramid_reference(base.numpy(), gen(), iterations, discount)
    assert got.shape == SHAPE and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("shape", [(2, 3, 40, 4), (2, 3, 4, 40)])
def test_pyramid_noise_of_a_long_latent_stops_when_either_side_reaches_one_pixel(shape):
    # sd-scripts' pyramid_noise_like breaks when wn == 1 *or* hn == 1: a 40x4 latent stops at level 1 (4 / r < 2)
    # although the long side has pixels left; going on would add more levels
    base = torch.randn(shape, generator=gen(5))
    got = pyramid_noise(base, gen(), 6, 0.8)
    ref = pyramid_reference(base.numpy(), gen(), 6, 0.8)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=0, atol=2e-5)


def test_pyramid_noise_statistics():
    base = torch.randn(64, 4, 32, 32, generator=gen(2))
    out = pyramid_noise(base, gen(), 6, 0.8)  # a strong pyramid, so the statistics show it
    assert float(out.std()) == pytest.approx(1.0, abs=1e-5)  # scaled back to unit variance
    assert abs(float(out.mean())) < 0.1
    # low frequencies: the spatial mean of white noise has variance 1/1024; the pyramid's is far larger
    white = float(base.mean(dim=(2, 3)).var())
    pyr = float(out.mean(dim=(2, 3)).var())
    assert white == pytest.approx(1 / 1024, rel=0.2)
    assert pyr > 20 * white

    # neighbouring pixels are correlated (white noise: ~0)
    def neighbour_corr(x):
        return float(torch.corrcoef(torch.stack([x[..., :, :-1].flatten(), x[..., :, 1:].flatten()]))[0, 1])

    assert abs(neighbour_corr(base)) < 0.01 and neighbour_corr(out) > 0.2


def test_sample_noise_with_multires_options_is_the_pyramid_of_the_base_noise():
    x = latents()
    got = sample_noise(x, NoiseOptions(multires_noise_iterations=4, multires_noise_discount=0.5), gen(9))
    g = gen(9)
    base = torch.randn(SHAPE, generator=g)
    ref = pyramid_reference(base.numpy(), g, 4, 0.5)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=0, atol=2e-5)


# --- noisy latents ----------------------------------------------------------------------------------------------


def forward_process(x, eps, t, ac):
    a = ac.double()[t].view(-1, 1, 1, 1)
    return a.sqrt() * x.double() + (1 - a).sqrt() * eps.double()


def test_noisy_latents_are_the_forward_process():
    s = make_noise_scheduler()
    x = latents()
    batch = noisy_batch(x, s, NoiseOptions(min_timestep=10, max_timestep=900), gen(4))
    g = gen(4)
    eps = torch.randn(SHAPE, generator=g)
    t = torch.randint(10, 900, (SHAPE[0],), generator=g)
    assert batch.timesteps.tolist() == t.tolist()
    torch.testing.assert_close(batch.noise, eps)
    ref = forward_process(x, eps, t, torch.tensor(alphas_cumprod_of(scaled_linear_betas())))
    torch.testing.assert_close(batch.noisy_latents.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("random_strength", [False, True])
def test_ip_noise_gamma_perturbs_the_input_not_the_target(random_strength):
    s = make_noise_scheduler()
    x = latents()
    opts = NoiseOptions(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=random_strength)
    batch = noisy_batch(x, s, opts, gen(8))
    g = gen(8)
    eps = torch.randn(SHAPE, generator=g)
    t = torch.randint(0, 1000, (SHAPE[0],), generator=g)
    gamma = 0.1 * float(torch.rand((), generator=g)) if random_strength else 0.1
    extra = torch.randn(SHAPE, generator=g)
    torch.testing.assert_close(batch.noise, eps)  # the target keeps the unperturbed noise
    ref = forward_process(
        x, eps.double() + gamma * extra.double(), t, torch.tensor(alphas_cumprod_of(scaled_linear_betas()))
    )
    torch.testing.assert_close(batch.noisy_latents.double(), ref, rtol=0, atol=1e-5)


def test_a_single_timestep_draws_nothing_from_the_generator():
    # min_timestep == max_timestep: sd-scripts' get_timesteps fills the batch (torch.full) without a draw, so the
    # input-perturbation noise is the generator's next draw after the noise
    s = make_noise_scheduler()
    x = latents()
    batch = noisy_batch(x, s, NoiseOptions(min_timestep=500, max_timestep=500, ip_noise_gamma=0.1), gen(8))
    g = gen(8)
    eps = torch.randn(SHAPE, generator=g)
    extra = torch.randn(SHAPE, generator=g)
    t = torch.full((SHAPE[0],), 500)
    assert batch.timesteps.tolist() == t.tolist()
    ac = torch.tensor(alphas_cumprod_of(scaled_linear_betas()))
    ref = forward_process(x, eps.double() + 0.1 * extra.double(), t, ac)
    torch.testing.assert_close(batch.noisy_latents.double(), ref, rtol=0, atol=1e-5)


def test_half_precision_latents_and_generator_resume():
    s = make_noise_scheduler()
    x = latents().half()
    g = gen(21)
    opts = NoiseOptions(noise_offset=0.05, ip_noise_gamma=0.1)
    first = noisy_batch(x, s, opts, g)
    assert first.noise.dtype == first.noisy_latents.dtype == torch.float16
    state = g.get_state()
    second = noisy_batch(x, s, opts, g)
    g2 = torch.Generator()
    g2.set_state(state)  # what a resumed run does with the saved state
    again = noisy_batch(x, s, opts, g2)
    for a, b in (
        (second.noise, again.noise),
        (second.noisy_latents, again.noisy_latents),
        (second.timesteps, again.timesteps),
    ):
        assert torch.equal(a, b)
    assert not torch.equal(first.noise, second.noise)
    # the same seed gives the same run
    assert torch.equal(noisy_batch(x, s, opts, gen(21)).noisy_latents, first.noisy_latents)


def test_option_errors_name_the_option():
    with pytest.raises(OptionError, match="adaptive_noise_scale needs noise_offset"):
        NoiseOptions(adaptive_noise_scale=0.1)
    # sd-scripts allows what follows (its check of offset + multires is commented out; an offset of 0 is off)
    NoiseOptions(noise_offset=0.1, multires_noise_iterations=6)
    NoiseOptions(noise_offset=0.0, adaptive_noise_scale=0.1)
    with pytest.raises(OptionError, match="ip_noise_gamma"):
        NoiseOptions(ip_noise_gamma=-1.0)
    with pytest.raises(OptionError, match="prediction_type"):
        make_noise_scheduler(prediction_type="sample")
