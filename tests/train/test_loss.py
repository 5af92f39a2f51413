"""The training loss against dense float64 formulas written here from the papers and kohya's code.

SNR(t) = a_t / (1 - a_t) with a = alphas_cumprod computed here from kohya's scaled-linear betas."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.algos.options import OptionError
from lorakit.train.loss import (
    DiffusionLoss,
    LossOptions,
    apply_mask,
    elementwise_loss,
    huber_threshold,
    prior_loss_weights,
    snr_table,
)
from lorakit.train.noise import make_noise_scheduler

T = torch.tensor([0, 1, 17, 250, 500, 777, 998, 999])
B = len(T)
SHAPE = (B, 4, 6, 5)


@pytest.fixture(scope="module")
def scheduler():
    return make_noise_scheduler()


@pytest.fixture(scope="module")
def zsnr_scheduler():
    return make_noise_scheduler(prediction_type="v_prediction", zero_terminal_snr=True)


def alphas_cumprod_ref():
    a, b = math.sqrt(0.00085), math.sqrt(0.012)
    out, p = [], 1.0
    for i in range(1000):
        p *= 1.0 - (a + i * (b - a) / 999) ** 2
        out.append(p)
    return out


AC = alphas_cumprod_ref()


def snr_ref(t):
    return AC[t] / (1.0 - AC[t])


def tensors(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(SHAPE, generator=g, dtype=dtype)
    target = torch.randn(SHAPE, generator=g, dtype=dtype) * 1.5
    return pred, target


def mse_per_sample(pred, target):
    return [float(((pred[i] - target[i]) ** 2).mean()) for i in range(B)]


def check(loss: DiffusionLoss, weights, sample_weights=None, seed=0):
    pred, target = tensors(seed)
    got = loss.per_sample(pred, target, T, sample_weights=sample_weights)
    base = mse_per_sample(pred, target)
    sw = [1.0] * B if sample_weights is None else list(sample_weights)
    want = torch.tensor([base[i] * weights[i] * sw[i] for i in range(B)], dtype=torch.float64)
    assert got.dtype == torch.float64
    # rtol: the scheduler stores alphas_cumprod in float32 (1 - a at t = 0 is 0.00085: ~3e-5 relative)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    torch.testing.assert_close(loss(pred, target, T, sample_weights=sample_weights), want.mean(), rtol=1e-4, atol=0)


def test_snr_table_from_alphas_cumprod(scheduler):
    snr = snr_table(scheduler)
    assert snr.dtype == torch.float64
    torch.testing.assert_close(
        snr, torch.tensor([snr_ref(t) for t in range(1000)], dtype=torch.float64), rtol=2e-4, atol=0
    )


def test_targets_epsilon_and_v(scheduler):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    assert DiffusionLoss(scheduler).target(x, eps, T) is eps
    v = DiffusionLoss(scheduler, LossOptions(v_parameterization=True)).target(x, eps, T)
    for i, t in enumerate(T.tolist()):
        want = math.sqrt(AC[t]) * eps[i] - math.sqrt(1 - AC[t]) * x[i]  # v = sqrt(a) eps - sqrt(1 - a) x0
        torch.testing.assert_close(v[i], want, rtol=1e-5, atol=1e-6)


def test_plain_l2_and_prior_loss_weights(scheduler):
    check(DiffusionLoss(scheduler), [1.0] * B)
    is_reg = [i % 3 == 0 for i in range(B)]
    w = prior_loss_weights(is_reg, 0.25)
    assert w.tolist() == [0.25 if r else 1.0 for r in is_reg]
    check(DiffusionLoss(scheduler), [1.0] * B, sample_weights=w)


@pytest.mark.parametrize("v", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 5.0, 2.5])  # 2.5: a fractional gamma is used as given
def test_min_snr_gamma(scheduler, v, gamma):
    # Hang et al. 2023: epsilon weight min(SNR, g) / SNR; v weight min(SNR, g) / (SNR + 1)
    weights = [min(snr_ref(t), gamma) / (snr_ref(t) + (1.0 if v else 0.0)) for t in T.tolist()]
    check(DiffusionLoss(scheduler, LossOptions(v_parameterization=v, min_snr_gamma=gamma)), weights)


@pytest.mark.parametrize("v", [False, True])
def test_debiased_estimation(scheduler, v):
    # 1/sqrt(SNR) (epsilon) or 1/(SNR + 1) (v), SNR capped at 1000 as kohya does
    s = [min(snr_ref(t), 1000.0) for t in T.tolist()]
    weights = [1.0 / (x + 1.0) if v else 1.0 / math.sqrt(x) for x in s]
    check(DiffusionLoss(scheduler, LossOptions(v_parameterization=v, debiased_estimation_loss=True)), weights)


def test_scale_v_pred_loss_like_noise_pred_and_v_pred_like_loss(scheduler):
    s = [min(snr_ref(t), 1000.0) for t in T.tolist()]
    scale = [x / (x + 1.0) for x in s]
    check(DiffusionLoss(scheduler, LossOptions(v_parameterization=True, scale_v_pred_loss_like_noise_pred=True)), scale)
    # loss + loss / scale * k
    check(DiffusionLoss(scheduler, LossOptions(v_pred_like_loss=0.3)), [1.0 + 0.3 / c for c in scale])


def test_weights_combine_as_a_product(scheduler):
    s = [snr_ref(t) for t in T.tolist()]
    capped = [min(x, 1000.0) for x in s]
    weights = [min(x, 5.0) / (x + 1.0) * (c / (c + 1.0)) / (c + 1.0) for x, c in zip(s, capped)]
    opts = LossOptions(
        v_parameterization=True,
        min_snr_gamma=5.0,
        scale_v_pred_loss_like_noise_pred=True,
        debiased_estimation_loss=True,
    )
    sw = [0.5 + 0.1 * i for i in range(B)]
    check(DiffusionLoss(scheduler, opts), weights, sample_weights=torch.tensor(sw))


def test_zero_terminal_snr_weights_use_the_schedule_before_the_rescale(scheduler, zsnr_scheduler):
    """sd-scripts builds its SNR table before rescaling the betas (prepare_scheduler_for_custom_training, then
    fix_noise_scheduler_betas_for_zero_terminal_snr): its SNR weights read the original schedule, whose SNR at
    t = 999 is 0.00468, not 0. So every weight equals the one without zero_terminal_snr, and the epsilon forms that
    divide by the SNR stay finite."""
    assert zsnr_scheduler.alphas_cumprod[-1].item() == 0.0  # the noise itself is rescaled
    assert torch.equal(snr_table(zsnr_scheduler), snr_table(scheduler))
    assert snr_table(zsnr_scheduler)[-1].item() == pytest.approx(0.004682, rel=1e-3)
    pred, target = tensors()
    for opts in (LossOptions(min_snr_gamma=5.0), LossOptions(debiased_estimation_loss=True),
                 LossOptions(v_pred_like_loss=0.1),
                 LossOptions(v_parameterization=True, min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True),
                 LossOptions(v_parameterization=True, debiased_estimation_loss=True)):
        zsnr = DiffusionLoss(zsnr_scheduler, opts).per_sample(pred, target, T)
        plain = DiffusionLoss(scheduler, opts).per_sample(pred, target, T)
        assert torch.isfinite(zsnr).all() and torch.equal(zsnr, plain), opts
    # min_snr_gamma = 0 is off, as sd-scripts' `if args.min_snr_gamma:`
    assert torch.equal(DiffusionLoss(scheduler, LossOptions(min_snr_gamma=0.0)).per_sample(pred, target, T),
                       DiffusionLoss(scheduler, LossOptions()).per_sample(pred, target, T))


# --- huber / smooth_l1 / l1 -------------------------------------------------------------------------------------


def huber_c_ref(t, schedule, c, scale):
    if schedule == "constant":
        return c * scale
    if schedule == "exponential":  # scale * exp(-(-ln c / T) t)
        return scale * math.exp(-(-math.log(c) / 1000) * t)
    sigma = math.sqrt((1 - AC[t]) / AC[t])
    return (1 - c) / (1 + sigma) ** 2 + c


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_threshold_schedules(scheduler, schedule):
    got = huber_threshold(T, schedule, 0.1, 1.5, scheduler.alphas_cumprod)
    want = torch.tensor([huber_c_ref(t, schedule, 0.1, 1.5) for t in T.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_and_smooth_l1_losses(scheduler, loss_type, schedule):
    pred, target = tensors(5)
    opts = LossOptions(loss_type=loss_type, huber_schedule=schedule, huber_c=0.2, huber_scale=0.7)
    got = DiffusionLoss(scheduler, opts).per_sample(pred, target, T)
    want = []
    for i, t in enumerate(T.tolist()):
        c = huber_c_ref(t, schedule, 0.2, 0.7)
        total = 0.0
        for d in (pred[i] - target[i]).flatten().tolist():
            root = math.sqrt(d * d + c * c) - c
            total += 2 * c * root if loss_type == "huber" else 2 * root
        want.append(total / pred[i].numel())
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)


def test_pseudo_huber_limits():
    d = torch.tensor([1e-4, 100.0], dtype=torch.float64)
    c = torch.tensor([0.5], dtype=torch.float64)
    h = elementwise_loss(d, torch.zeros_like(d), "huber", c)
    assert h[0].item() == pytest.approx(1e-8, rel=1e-6)  # ~ d^2 near 0
    assert h[1].item() == pytest.approx(2 * 0.5 * 100 - 2 * 0.5**2, rel=1e-4)  # ~ 2c|d| - 2c^2 far out
    s = elementwise_loss(d, torch.zeros_like(d), "smooth_l1", c)
    assert s[0].item() == pytest.approx(1e-8 / 0.5, rel=1e-6) and s[1].item() == pytest.approx(
        2 * 100 - 2 * 0.5, rel=1e-4
    )


def test_l1(scheduler):
    pred, target = tensors(6)
    got = DiffusionLoss(scheduler, LossOptions(loss_type="l1")).per_sample(pred, target, T)
    want = torch.tensor([float((pred[i] - target[i]).abs().mean()) for i in range(B)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


# --- masks, dtypes -------------------------------------------------------------------------------------------------


def test_mask_at_latent_size_multiplies_each_pixel(scheduler):
    pred, target = tensors(7)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(B, SHAPE[2], SHAPE[3], generator=g, dtype=torch.float64) > 0.4).double()
    got = DiffusionLoss(scheduler).per_sample(pred, target, T, mask=mask)
    want = [float((((pred[i] - target[i]) ** 2) * mask[i]).mean()) for i in range(B)]  # not renormalised (kohya)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_image_size_mask_is_area_averaged_to_the_latents(scheduler):
    pred, target = tensors(8)
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(B, 1, SHAPE[2] * 8, SHAPE[3] * 8, generator=g, dtype=torch.float64)
    got = DiffusionLoss(scheduler).per_sample(pred, target, T, mask=mask)
    want = []
    for i in range(B):
        total = 0.0
        for y in range(SHAPE[2]):
            for x in range(SHAPE[3]):
                m = float(mask[i, 0, 8 * y : 8 * y + 8, 8 * x : 8 * x + 8].mean())
                total += m * float(((pred[i, :, y, x] - target[i, :, y, x]) ** 2).sum())
        want.append(total / pred[i].numel())
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        apply_mask(torch.zeros(SHAPE), torch.ones(B + 1, SHAPE[2], SHAPE[3]))


def test_half_precision_prediction_is_computed_in_float32(scheduler):
    pred, target = tensors(9, torch.float16)
    out = DiffusionLoss(scheduler, LossOptions(min_snr_gamma=5.0))(pred, target, T)
    assert out.dtype == torch.float32
    ref = DiffusionLoss(scheduler, LossOptions(min_snr_gamma=5.0))(pred.double(), target.double(), T)
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)


def test_gradient_flows_to_the_prediction(scheduler):
    pred, target = tensors(10)
    pred.requires_grad_(True)
    DiffusionLoss(scheduler, LossOptions(loss_type="huber", min_snr_gamma=5.0))(pred, target, T).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_option_errors_name_the_option():
    with pytest.raises(OptionError, match="loss_type 'hubber'.*did you mean 'huber'"):
        LossOptions(loss_type="hubber")
    with pytest.raises(OptionError, match="huber_schedule"):
        LossOptions(loss_type="huber", huber_schedule="linear")
    with pytest.raises(OptionError, match="huber_c"):
        LossOptions(loss_type="smooth_l1", huber_c=0)
    with pytest.raises(OptionError, match="min_snr_gamma"):
        LossOptions(min_snr_gamma=-1)
    with pytest.raises(OptionError, match="scale_v_pred_loss_like_noise_pred needs v_parameterization"):
        LossOptions(scale_v_pred_loss_like_noise_pred=True)
    with pytest.raises(OptionError, match="v_pred_like_loss"):
        LossOptions(v_parameterization=True, v_pred_like_loss=0.1)
