"""fused_backward_pass (sd-scripts' sdxl_train.py): each parameter is updated by the optimizer as soon as its
gradient is complete, in a post-accumulate-grad hook, and its gradient freed at once, so the gradients of the
whole network never exist together. sd-scripts allows it with Adafactor only, whose update of a parameter
depends on that parameter alone, and without gradient accumulation (the gradient is consumed in the backward).

Gradient clipping there clips each parameter's gradient by its own norm (there is no global norm before all
gradients exist); lorakit does the same."""

from __future__ import annotations

from functools import partial

import torch


def _step_one(optimizer: torch.optim.Optimizer, group: dict, max_grad_norm: float, world, param: torch.Tensor):
    if world is not None:
        world.average_gradients([param])
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([param], max_grad_norm)
    # The optimizer's own step over this one parameter: the same update as a full step (the group dict itself
    # is used, so anything the step writes into it stays), without copying Adafactor's arithmetic.
    groups, params = optimizer.param_groups, group["params"]
    optimizer.param_groups, group["params"] = [group], [param]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups, group["params"] = groups, params
    param.grad = None


def install_fused_step(optimizer: torch.optim.Optimizer, max_grad_norm: float = 0.0, world=None) -> list:
    """Hook every trainable parameter of `optimizer` so that backward() also steps; returns the hook handles.
    The training loop then calls neither optimizer.step() nor zero_grad()."""
    handles = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad:
                hook = partial(_step_one, optimizer, group, max_grad_norm, world)
                handles.append(param.register_post_accumulate_grad_hook(hook))
    return handles


__all__ = ["install_fused_step"]
