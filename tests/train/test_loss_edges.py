"""Loss options at their edges: the huber `snr` schedule reads the zero-terminal-SNR schedule (sd-scripts'
get_huber_threshold_if_needed reads noise_scheduler.alphas_cumprod after
fix_noise_scheduler_betas_for_zero_terminal_snr, written out here), min_snr_gamma's weight at SNR 0 is its limit
min(S, g) / S -> 1, huber_scale must be > 0."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorakit.algos.options import OptionError
from lorakit.train.loss import DiffusionLoss, LossOptions

pytest.importorskip("diffusers")

from lorakit.train.noise import make_noise_scheduler  # noqa: E402


def _zero_terminal_snr_alphas_cumprod():
    """sd-scripts' fix_noise_scheduler_betas_for_zero_terminal_snr on kohya's scaled-linear betas, float64."""
    betas = (torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2).double()
    alphas_bar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return torch.cumprod(alphas, 0)


def test_huber_snr_schedule_with_zero_terminal_snr_reads_the_rescaled_schedule():
    scheduler = make_noise_scheduler("v_prediction", zero_terminal_snr=True)
    loss = DiffusionLoss(scheduler, LossOptions(v_parameterization=True, loss_type="huber", huber_schedule="snr",
                                                huber_c=0.1))
    t = torch.tensor([0, 250, 500, 900, 999])
    a = _zero_terminal_snr_alphas_cumprod()[t]
    sigma = ((1 - a) / a).sqrt()
    expected = (1 - 0.1) / (1 + sigma) ** 2 + 0.1
    torch.testing.assert_close(loss.huber_c(t), expected, rtol=1e-5, atol=0)
    assert float(loss.huber_c(torch.tensor([999]))) == 0.1  # pure noise: sigma infinite, c(t) = huber_c


def test_min_snr_gamma_weight_at_snr_zero_is_its_limit_one():
    alphas_cumprod = torch.linspace(0.99, 0.0, 10)  # a user scheduler whose last timestep has SNR exactly 0
    loss = DiffusionLoss(SimpleNamespace(alphas_cumprod=alphas_cumprod), LossOptions(min_snr_gamma=5.0))
    t = torch.tensor([0, 8, 9])
    a = alphas_cumprod.double()[t]
    snr = a / (1 - a)
    expected = torch.tensor([5.0 / float(snr[0]), 1.0, 1.0], dtype=torch.float64)  # min(S, 5) / S, -> 1 at S = 0
    got = loss.per_sample(torch.ones(3, 1, 2, 2), torch.zeros(3, 1, 2, 2), t)  # squared error 1 everywhere
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
@pytest.mark.parametrize("huber_scale", [0.0, -1.0])
def test_huber_scale_must_be_positive(loss_type, huber_scale):
    # a scale of 0 makes the constant / exponential threshold 0: the loss would be 0 whatever the prediction
    with pytest.raises(OptionError, match="huber_scale"):
        LossOptions(loss_type=loss_type, huber_schedule="constant", huber_scale=huber_scale)
