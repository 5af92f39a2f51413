"""fp16's loss scale: torch's GradScaler, as accelerate gives sd-scripts, so that small activation gradients do not
underflow in fp16."""

from __future__ import annotations

import torch


class LossScaler(torch.amp.GradScaler):
    """GradScaler that also unscales fp16 gradients in place. With full_fp16 the adapter itself is fp16, so its
    gradients are too; torch's scaler refuses those, and sd-scripts patches accelerate's scaler the same way
    (train_util.patch_accelerator_for_fp16_training)."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


def make_loss_scaler(device: torch.device, config) -> LossScaler:
    """Enabled for mixed_precision fp16 (full_fp16 included), except where something else owns the scale:
    DeepSpeed's engine scales the loss itself, and fused_backward_pass steps each parameter inside backward,
    before an inf could be found and the whole step skipped."""
    return LossScaler(device.type, enabled=config.mixed_precision == "fp16" and not (
        config.deepspeed or config.fused_backward_pass))
