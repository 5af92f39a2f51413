"""Several training processes for one test, started from a fork server that has imported the trainer once: a
spawned process would import torch, diffusers and DeepSpeed anew, ~5 s of each multi-process test's time."""

from __future__ import annotations

import multiprocessing

import torch

# imported once in the fork server; it forks before any of them computes (no thread pools to lose in the fork).
# diffusers' U-Net module is imported lazily when a process builds its model, and with it peft, scipy and
# torch._inductor: ~3.5 s of each process's start when left to the processes.
_PRELOAD = ["lorakit.train.run", "lorakit.models.load", "lorakit.network", "diffusers.models.unets.unet_2d_condition",
            "tests.train.deepspeed_gloo", "tests.train.test_distributed"]


def run_processes(fn, args: tuple, nprocs: int) -> None:
    """fn(rank, *args) in nprocs processes, as torch.multiprocessing.spawn, and raise if one of them fails."""
    multiprocessing.set_forkserver_preload(_PRELOAD)
    torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")
