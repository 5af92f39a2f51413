"""DeepSpeed's CPU Adam op, its update written in torch: what the offloaded-optimizer test steps with.

DeepSpeedCPUAdam (deepspeed/ops/adam/cpu_adam.py) is the optimizer ZeRO-Offload requires. Its Python class keeps
the state and calls a C++ op that a fresh environment compiles on first use (~3 minutes of a 2-core test run).
What the test checks is lorakit's: that the offloaded run gets DeepSpeedCPUAdam with AdamW's settings and trains
as AdamW does. So the class runs as it is and only the op's update is this one, which follows the op's
float32 arithmetic (csrc/adam/cpu_adam_impl.cpp, Step_1; csrc/includes/cpu_adam.h, update_state).
LORAKIT_TEST_DEEPSPEED_OPS=1 makes the test build and use the real op instead."""

from __future__ import annotations

import math
import os

import pytest
import torch

REAL_OPS = os.environ.get("LORAKIT_TEST_DEEPSPEED_OPS") == "1"


class TorchCPUAdamOp:
    """The functions DeepSpeedCPUAdam calls on the loaded op, for the steps it takes."""

    def __init__(self):
        self.adamw_mode: dict[int, bool] = {}
        self.created_adamw = False  # an optimizer in AdamW mode was created
        self.updates = 0

    def create_adam(self, opt_id, lr, beta1, beta2, eps, weight_decay, adamw_mode, should_log):
        self.adamw_mode[opt_id] = bool(adamw_mode)
        self.created_adamw |= bool(adamw_mode)

    def destroy_adam(self, opt_id):
        self.adamw_mode.pop(opt_id, None)

    @torch.no_grad()
    def adam_update(self, opt_id, step, lr, beta1, beta2, eps, weight_decay, bias_correction, params, grads,
                    exp_avg, exp_avg_sq):
        self.updates += 1
        correction1, correction2 = 1.0, 1.0
        if bias_correction:
            correction1 = 1 - beta1 ** step
            correction2 = 1 / math.sqrt(1 - beta2 ** step)
        grad = grads.float()
        if weight_decay > 0 and not self.adamw_mode[opt_id]:
            grad = grad + params.float() * weight_decay
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        update = exp_avg / (exp_avg_sq.sqrt() * correction2 + eps)
        if weight_decay > 0 and self.adamw_mode[opt_id]:
            params.add_(params, alpha=-lr * weight_decay)
        params.add_(update, alpha=-lr / correction1)
        return 0


@pytest.fixture
def cpu_adam_op(monkeypatch):
    """DeepSpeedCPUAdam steps through TorchCPUAdamOp (or the real op with LORAKIT_TEST_DEEPSPEED_OPS=1)."""
    if REAL_OPS:
        return None
    from deepspeed.ops.adam import cpu_adam

    op = TorchCPUAdamOp()
    monkeypatch.setattr(cpu_adam.CPUAdamBuilder, "load", lambda self, verbose=True: op)
    return op
