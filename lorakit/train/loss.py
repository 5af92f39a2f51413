"""The training loss, kohya sd-scripts semantics: target, per-pixel loss, mask, per-sample mean, sample weights,
and the SNR-based timestep weights.

    loss_i = w(t_i) * sample_weight_i * mean_pixels( mask * rho(pred - target) )        loss = mean_i loss_i

rho is l2, l1, huber or smooth_l1 (kohya's pseudo-Huber forms, threshold c(t) from `huber_schedule`), and
w(t) is the product of the enabled SNR weights (SNR(t) = a_t / (1 - a_t), a = alphas_cumprod):

| option | w(t), epsilon-prediction | w(t), v-prediction |
| --- | --- | --- |
| `min_snr_gamma` g (Hang et al. 2023) | min(SNR, g) / SNR | min(SNR, g) / (SNR + 1) |
| `scale_v_pred_loss_like_noise_pred` | - | s = S / (S + 1), S = min(SNR, 1000) |
| `v_pred_like_loss` k | 1 + k / s | - |
| `debiased_estimation_loss` (Yu et al. 2024) | 1 / sqrt(S) | 1 / (S + 1) |

kohya computes these in float32 on the fly; here the SNR table is float64, built once from the scheduler. With
`zero_terminal_snr` the weights use the SNR of the schedule before the rescale, as sd-scripts does (its SNR table is
built first); the noise, the v target and the huber `snr` schedule use the rescaled one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..algos.options import OptionError, suggest

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
SNR_CLAMP = 1000.0  # kohya caps SNR at 1000 where it divides by it (t = 0 has SNR ~1175 on SD's schedule)


@dataclass(frozen=True)
class LossOptions:
    """kohya's loss options (same names, same defaults)."""

    v_parameterization: bool = False  # the model predicts v (SD2-v, v-pred SDXL) instead of the noise
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise OptionError(
                f"loss_type {self.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}"
                f"{suggest(str(self.loss_type), LOSS_TYPES)}"
            )
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise OptionError(
                f"huber_schedule {self.huber_schedule!r}: expected one of {', '.join(HUBER_SCHEDULES)}"
                f"{suggest(str(self.huber_schedule), HUBER_SCHEDULES)}"
            )
        if self.loss_type in ("huber", "smooth_l1"):
            if not self.huber_c > 0:
                raise OptionError(f"huber_c={self.huber_c}: expected a number > 0")
            if not self.huber_scale > 0:
                raise OptionError(f"huber_scale={self.huber_scale}: expected a number > 0")
        if self.min_snr_gamma is not None and self.min_snr_gamma < 0:  # 0: off, as in sd-scripts
            raise OptionError(f"min_snr_gamma={self.min_snr_gamma}: expected a number >= 0 (5 is the paper's)")
        if self.scale_v_pred_loss_like_noise_pred and not self.v_parameterization:
            raise OptionError("scale_v_pred_loss_like_noise_pred needs v_parameterization (it rescales a v loss)")
        if self.v_pred_like_loss and self.v_parameterization:
            raise OptionError(
                "v_pred_like_loss adds a v-like term to an epsilon loss; it cannot be used with v_parameterization"
            )

    @property
    def uses_huber_c(self) -> bool:
        return self.loss_type in ("huber", "smooth_l1")


def snr_table(scheduler) -> torch.Tensor:
    """SNR(t) = a_t / (1 - a_t) for every training timestep, float64, of the schedule before a zero-terminal-SNR
    rescale (make_noise_scheduler's `snr_alphas_cumprod`): sd-scripts weights with that schedule's SNR."""
    a = getattr(scheduler, "snr_alphas_cumprod", scheduler.alphas_cumprod).detach().double().cpu()
    return a / (1.0 - a)


def prediction_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, v_parameterization: bool
):
    """What the U-Net should output: the noise, or v = sqrt(a_t) noise - sqrt(1 - a_t) x_0 (the scheduler's own
    get_velocity)."""
    if v_parameterization:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def huber_threshold(
    timesteps: torch.Tensor,
    schedule: str,
    huber_c: float,
    huber_scale: float,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """kohya's per-sample Huber threshold c(t), float64:
    constant: c * scale; exponential: scale * exp(ln(c) * t / T) (1 at t = 0, c at t = T);
    snr: (1 - c) / (1 + sigma_t)^2 + c with sigma_t = sqrt((1 - a_t) / a_t) (kohya applies no scale here)."""
    t = timesteps.detach().cpu().long()
    if schedule == "constant":
        return torch.full(t.shape, huber_c * huber_scale, dtype=torch.float64)
    if schedule == "exponential":
        num_timesteps = alphas_cumprod.shape[0]
        return torch.exp(math.log(huber_c) * t.double() / num_timesteps) * huber_scale
    if schedule == "snr":
        a = alphas_cumprod.detach().double().cpu()[t]
        sigma = ((1.0 - a) / a).sqrt()
        return (1.0 - huber_c) / (1.0 + sigma) ** 2 + huber_c
    raise OptionError(f"huber_schedule {schedule!r}: expected one of {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: torch.Tensor | None = None):
    """rho(pred - target) per element, no reduction. huber: 2c (sqrt(d^2 + c^2) - c); smooth_l1: 2 (sqrt(d^2 + c^2) - c)
    (kohya's pseudo-Huber forms: ~d^2 near 0; ~2c|d| resp. ~2|d| far out), c per sample."""
    if loss_type == "l2":
        return (pred - target) ** 2
    if loss_type == "l1":
        return (pred - target).abs()
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type '{loss_type}' needs the per-sample threshold huber_c")
        c = huber_c.to(device=pred.device, dtype=pred.dtype).view(-1, *([1] * (pred.ndim - 1)))
        root = torch.sqrt((pred - target) ** 2 + c**2) - c
        return 2 * c * root if loss_type == "huber" else 2 * root
    raise OptionError(f"loss_type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")


def apply_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Multiply the per-pixel loss by a mask in [0, 1]: (B, H, W), (B, 1, H, W) or (B, C, H, W), at latent size or
    any other (then area-resized to the latents, as kohya resizes alpha masks). Not renormalised: masked-out
    pixels lower the mean, as in kohya."""
    if mask.ndim == loss.ndim - 1:
        mask = mask.unsqueeze(1)
    if mask.ndim != loss.ndim or mask.shape[0] != loss.shape[0]:
        raise ValueError(f"loss mask of shape {tuple(mask.shape)} does not fit a loss of shape {tuple(loss.shape)}")
    mask = mask.to(device=loss.device, dtype=loss.dtype)
    if mask.shape[2:] != loss.shape[2:]:
        mask = F.interpolate(mask, size=loss.shape[2:], mode="area")
    return loss * mask


def prior_loss_weights(is_reg, prior_loss_weight: float = 1.0) -> torch.Tensor:
    """Per-sample loss weights as kohya's datasets give them: prior_loss_weight for regularisation images, else 1."""
    is_reg = torch.as_tensor(is_reg, dtype=torch.bool)
    return torch.where(
        is_reg, torch.tensor(float(prior_loss_weight), dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    )


def timestep_weights(timesteps: torch.Tensor, snr: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """The product of the enabled SNR weights for each sample, float64 (see the module table)."""
    s = snr[timesteps.detach().cpu().long()]
    w = torch.ones_like(s)
    v = options.v_parameterization
    if options.min_snr_gamma:
        clipped = torch.clamp(s, max=options.min_snr_gamma)
        if v:
            w = w * clipped / (s + 1.0)
        else:
            # min(S, g) / S -> 1 as S -> 0: the limit, for a scheduler whose own SNR reaches 0
            w = w * torch.where(s > 0, clipped / torch.where(s > 0, s, 1.0), 1.0)
    capped = torch.clamp(s, max=SNR_CLAMP)
    scale = capped / (capped + 1.0)
    if options.scale_v_pred_loss_like_noise_pred:
        w = w * scale
    if options.v_pred_like_loss:
        w = w * (1.0 + options.v_pred_like_loss / scale)
    if options.debiased_estimation_loss:
        w = w * (1.0 / (capped + 1.0) if v else 1.0 / capped.sqrt())
    return w


class DiffusionLoss:
    """The loss of one batch for one noise scheduler and set of options; SNR table and thresholds built once.

    loss = DiffusionLoss(scheduler, LossOptions(min_snr_gamma=5))
    target = loss.target(latents, batch.noise, batch.timesteps)
    value = loss(model_pred, target, batch.timesteps, sample_weights=..., mask=...)   # scalar, backward() it
    """

    def __init__(self, scheduler, options: LossOptions | None = None):
        self.scheduler = scheduler
        self.options = options or LossOptions()
        self.snr = snr_table(scheduler)
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().double().cpu()

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return prediction_target(self.scheduler, latents, noise, timesteps, self.options.v_parameterization)

    def huber_c(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        o = self.options
        if not o.uses_huber_c:
            return None
        return huber_threshold(timesteps, o.huber_schedule, o.huber_c, o.huber_scale, self.alphas_cumprod)

    def per_sample(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        timesteps: torch.Tensor,
        sample_weights: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One weighted loss per sample, in float32 (float64 if the prediction is float64)."""
        dtype = torch.promote_types(pred.dtype, torch.float32)
        pred, target = pred.to(dtype), target.to(dtype)
        loss = elementwise_loss(pred, target, self.options.loss_type, self.huber_c(timesteps))
        if mask is not None:
            loss = apply_mask(loss, mask)
        loss = loss.mean(dim=tuple(range(1, loss.ndim)))
        weights = timestep_weights(timesteps, self.snr, self.options)
        if sample_weights is not None:
            weights = weights * torch.as_tensor(sample_weights, dtype=torch.float64).cpu()
        return loss * weights.to(device=loss.device, dtype=loss.dtype)

    def __call__(self, pred, target, timesteps, sample_weights=None, mask=None) -> torch.Tensor:
        return self.per_sample(pred, target, timesteps, sample_weights, mask).mean()
