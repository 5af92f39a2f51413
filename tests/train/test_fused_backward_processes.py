"""fused_backward_pass on two CPU processes (gloo): each process backprops its half of the batch and the fused step
averages each gradient over the processes before stepping it, so both end with the weights of one process stepping
the whole batch (data parallel, as accelerate's DDP gives sd-scripts). Plain SGD: its update is linear in the
gradient, so a sum instead of a mean shows too (Adafactor's update would hide the scale)."""

from __future__ import annotations

import os

import torch

from lorakit.train.distributed import World, _free_port
from lorakit.train.fused_backward import install_fused_step

from .processes import run_processes

X = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))


def _params():
    g = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((5, 3), (3,))]


def _optimizer(params):
    return torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.3}], lr=0.1)


def _loss(params, x):
    return (torch.tanh(x @ params[0] + params[1]) ** 2).mean()


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        params = _params()
        install_fused_step(_optimizer(params), 0.0, World(rank, 2))
        _loss(params, X[2 * rank: 2 * rank + 2]).backward()
        torch.save([p.detach() for p in params], os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_step_the_mean_gradient_of_the_global_batch(tmp_path):
    expected = _params()
    optimizer = _optimizer(expected)
    _loss(expected, X).backward()
    optimizer.step()
    run_processes(_worker, (_free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6, msg=f"rank {rank}")
