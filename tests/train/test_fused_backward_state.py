"""fused_backward_pass steps each parameter inside backward() by narrowing the optimizer to that one parameter;
afterwards the optimizer must be exactly as built (every group with all its parameters, in order), since save_state
writes its state_dict and a resume loads one into it."""

from __future__ import annotations

import pytest
import torch

from lorakit.train.fused_backward import install_fused_step

transformers = pytest.importorskip("transformers")

ADAFACTOR = dict(lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((6, 5), (5,), (3, 5))]


def _optimizer(params):
    return transformers.optimization.Adafactor([{"params": params[:2]}, {"params": params[2:], "lr": 3e-2}],
                                               **ADAFACTOR)


def _loss(params, x):
    w1, b, w2 = params
    return ((torch.tanh(x @ w1 + b) @ w2.T) ** 2).sum()


def test_a_fused_step_leaves_every_group_with_all_its_parameters():
    params = _params()
    optimizer = _optimizer(params)
    install_fused_step(optimizer)
    _loss(params, torch.randn(4, 6, generator=torch.Generator().manual_seed(1))).backward()
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == [[id(p) for p in params[:2]],
                                                                             [id(params[2])]]
    saved = optimizer.state_dict()  # what save_state writes
    assert [g["params"] for g in saved["param_groups"]] == [[0, 1], [2]]
    assert sorted(saved["state"]) == [0, 1, 2]  # every parameter stepped once
    resumed = _optimizer(_params())
    resumed.load_state_dict(saved)  # what a resume does
    for a, b in zip(resumed.state.values(), optimizer.state.values()):
        assert a["step"] == b["step"] == 1
