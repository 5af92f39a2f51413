"""make_optimizer gives torch's Adam/AdamW their fused kernel (on a CPU torch otherwise steps tensor by tensor in
Python), keeps an explicit choice from optimizer_args, and leaves the other optimizers as torch builds them. The
updates are checked against AdamW's formula in float64."""

from __future__ import annotations

import pytest
import torch

from lorakit.train.optimizers import make_optimizer

STEPS = 3


def _adamw_reference(p0, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, adam=False):
    """Loshchilov & Hutter's AdamW (torch's documented algorithm), or Adam with L2 in the gradient, in float64."""
    p, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if adam:
            g = g + weight_decay * p
        else:
            p = p * (1 - lr * weight_decay)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def _run(name, args, dtype, grads, p0):
    params = [torch.nn.Parameter(p0.to(dtype, copy=True))]
    opt = make_optimizer(name, [{"params": params, "lr": 1e-2}], 1e-2, args)
    for g in grads:
        params[0].grad = g.to(dtype)
        opt.step()
    return opt, params[0].detach()


def _cpu_fused_adamw() -> bool:
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("name, adam", [("AdamW", False), ("torch.optim.Adam", True)])
def test_adam_types_take_the_fused_kernel_and_step_by_the_formula(name, adam):
    if not _cpu_fused_adamw():
        pytest.skip("this torch has no fused Adam kernel for CPU tensors (torch < 2.4)")
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(40, 24, generator=gen)
    grads = [torch.randn(40, 24, generator=gen) * 10 ** -k for k in range(STEPS)]
    opt, p = _run(name, ["weight_decay=0.01"], torch.float32, grads, p0)
    assert opt.defaults["fused"] is True
    want = _adamw_reference(p0, grads, 1e-2, adam=adam)
    assert torch.allclose(p.double(), want, rtol=0, atol=1e-6)
    assert not torch.allclose(p.double(), p0.double(), atol=1e-3)  # it moved


def test_fused_adamw_keeps_fp16_weights_finite_where_eps_underflows():
    """Gradients of 1e-5 square to 0 in fp16 and eps (1e-8) is 0 there too: torch's per-tensor path divides by 0.
    The fused kernel computes in fp32, so the first step is AdamW's (the sign of the gradient times lr). Later steps
    are not: its fp16 squared-gradient state underflows, which is why full_fp16 with Adam needs an eps (checks.py)."""
    if not _cpu_fused_adamw():
        pytest.skip("this torch has no fused Adam kernel for CPU tensors (torch < 2.4)")
    p0 = torch.zeros(8, 8)
    g = torch.full((8, 8), 1e-5)
    _, p = _run("AdamW", None, torch.float16, [g], p0)
    assert torch.isfinite(p).all()
    assert torch.allclose(p.double(), _adamw_reference(p0, [g.half().float()], 1e-2), atol=1e-4)


@pytest.mark.parametrize("args, fused, foreach", [(["foreach=False"], None, False), (["foreach=True"], None, True),
                                                  (["fused=False"], False, None)])
def test_a_kernel_chosen_in_optimizer_args_stands(args, fused, foreach):
    opt = make_optimizer("AdamW", [torch.nn.Parameter(torch.zeros(3))], 1e-3, args)
    assert (opt.defaults["fused"], opt.defaults["foreach"]) == (fused, foreach)


def test_options_the_fused_kernel_does_not_take_build_the_optimizer_without_it():
    opt = make_optimizer("AdamW", [torch.nn.Parameter(torch.zeros(3))], 1e-3, ["differentiable=True"])
    assert not opt.defaults["fused"] and opt.defaults["differentiable"] is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sgd_nesterov_is_left_to_torch_and_moves_half_precision_weights(dtype):
    """torch 2.13's fused SGD on a CPU leaves bf16/fp16 weights where they are; SGD is built as torch builds it."""
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(32, 4, generator=gen) * 1e-3 for _ in range(2)]
    opt, p = _run("SGDNesterov", None, dtype, grads, torch.zeros(32, 4))
    assert not opt.defaults["fused"]
    # Nesterov, momentum 0.9: buffers g1, then 0.9 g1 + g2; steps lr (g1 + 0.9 g1), then lr (g2 + 0.9 (0.9 g1 + g2))
    want = -1e-2 * (2.71 * grads[0] + 1.9 * grads[1])
    tol = 1e-7 if dtype == torch.float32 else 2 * 2 ** -8 * want.abs().max().item()
    assert torch.allclose(p.float(), want, atol=tol), (p.float() - want).abs().max()


def test_a_state_saved_by_a_per_tensor_adamw_resumes_on_the_fused_kernel_under_a_loss_scale():
    """torch's load_state_dict takes `fused` from the state; a GradScaler then hands the per-tensor step its inf
    check, which it refuses. load_optimizer_state keeps this run's kernel, and the three steps are AdamW's."""
    if not _cpu_fused_adamw():
        pytest.skip("this torch has no fused Adam kernel for CPU tensors (torch < 2.4)")
    from lorakit.train.optimizers import load_optimizer_state

    gen = torch.Generator().manual_seed(2)
    p0 = torch.randn(16, 8, generator=gen)
    grads = [torch.randn(16, 8, generator=gen) for _ in range(STEPS)]
    old = [torch.nn.Parameter(p0.clone())]
    before = make_optimizer("AdamW", old, 1e-2, ["foreach=False"])
    for g in grads[:2]:
        old[0].grad = g.clone()
        before.step()
    resumed = [torch.nn.Parameter(old[0].detach().clone())]
    opt = make_optimizer("AdamW", resumed, 1e-2)
    load_optimizer_state(opt, before.state_dict())
    assert opt.param_groups[0]["fused"] is True
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale((resumed[0] * grads[2]).sum()).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    want = _adamw_reference(p0, grads, 1e-2)
    assert torch.allclose(resumed[0].detach().double(), want, rtol=0, atol=1e-6)
