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

    def step_and_update(self, optimizer) -> bool:
        """Step (skipped where a gradient is inf/NaN) and adjust the scale; True when the optimizer stepped. A
        skip lowers the scale, which is how accelerate tells (AcceleratedOptimizer.step_was_skipped) so that its
        scheduler holds the lr schedule for that step, as sd-scripts' runs do."""
        if not self.is_enabled():
            optimizer.step()
            return True
        before = self.get_scale()
        self.step(optimizer)
        self.update()
        return self.get_scale() >= before


def make_loss_scaler(device: torch.device, config) -> LossScaler:
    """Enabled for mixed_precision fp16 (full_fp16 included), except where something else owns the scale:
    DeepSpeed's engine scales the loss itself, and fused_backward_pass steps each parameter inside backward,
    before an inf could be found and the whole step skipped."""
    return LossScaler(device.type, enabled=config.mixed_precision == "fp16" and not (
        config.deepspeed or config.fused_backward_pass))
