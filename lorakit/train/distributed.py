"""Several processes (``accelerate launch`` or ``torchrun``: RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the
environment; on CPUs also mpirun, accelerate's multi-CPU launch, whose MPI variables are read as accelerate reads
them) training one network, data-parallel.

Every process builds the same batches of ``train_batch_size x world`` samples (the global batch) and trains on
its slice of each; gradients are averaged over the processes before each optimizer step. A batch that does not
divide (a bucket's or the epoch's last) is split as evenly as it goes, each process's loss weighted by its share
of the samples, so the step is the one a single process takes on the whole batch. Random draws (VAE
samples, noise, timesteps) are made for the whole global batch on every process and sliced, so the result equals
a single process training with the global batch (dropout masks are drawn per process: statistically the same,
not the same numbers). Only the main process saves, samples and logs.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, replace

import torch

__all__ = ["World", "current_world"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> slice:
        """This process's part of a global batch of ``n`` samples: consecutive slices, one sample more for each of
        the first ``n % size`` processes (a bucket's or the epoch's last batch is short). A process left without a
        sample gets the last one as a stand-in, weighted 0 by ``loss_weight``: it must still compute gradients for
        every parameter to join their all-reduce."""
        per, extra = divmod(n, self.size)
        start = self.rank * per + min(self.rank, extra)
        count = self._count(n)
        return slice(start, start + count) if count else slice(n - 1, n)

    def loss_weight(self, n: int) -> float:
        """The factor on this process's mean loss that makes the gradients' average over the processes the mean over
        all ``n`` samples of the global batch: its sample count x processes / n (1 when the batch divides)."""
        return self._count(n) * self.size / n

    def _count(self, n: int) -> int:
        per, extra = divmod(n, self.size)
        return per + (self.rank < extra)

    def scale_specs(self, specs):
        """Dataset specs with the global batch size (per-process ``batch_size`` x processes)."""
        return [replace(spec, batch_size=spec.batch_size * self.size) for spec in specs] if self.active else specs

    def average_gradients(self, params) -> None:
        if not self.active:
            return
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                p.grad.div_(self.size)

    def broadcast_parameters(self, params) -> None:
        """The main process's initial adapter weights everywhere (they should already agree; this makes sure)."""
        if self.active:
            for p in params:
                torch.distributed.broadcast(p.data, src=0)

    def share(self, value):
        """The main process's ``value`` on every process (a picklable object)."""
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def current_world(device: torch.device, timeout_minutes: int | None = None, group: bool = False) -> World:
    """The process group the launcher describes, initialised once; a single process when there is none.
    ``timeout_minutes`` (ddp_timeout) bounds how long a collective waits for the other processes. ``group``: a
    process group even for a single process (DeepSpeed needs one), on a free local port when no launcher set one."""
    if device.type == "cpu" and "WORLD_SIZE" not in os.environ:
        _adopt_mpi_environment()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 and not group:
        return World()
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"timeout": datetime.timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
        if size <= 1 and "MASTER_ADDR" not in os.environ:  # kept for the process: DeepSpeed caches its groups
            kwargs.update(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        else:
            kwargs.update(init_method="env://")
        torch.distributed.init_process_group(backend=backend, **kwargs)
    return World(rank=torch.distributed.get_rank(), size=torch.distributed.get_world_size())


# torch's name: (the names mpirun sets: MPICH / Intel MPI, Open MPI, MVAPICH; accelerate's default), in accelerate's
# order (utils/environment.py get_cpu_distributed_information)
_MPI_NAMES = {
    "RANK": (("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"), "0"),
    "WORLD_SIZE": (("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"), "1"),
    "LOCAL_RANK": (("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK"), "0"),
    "LOCAL_WORLD_SIZE": (("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"), "1"),
}


def _adopt_mpi_environment() -> None:
    """Under mpirun (several processes on CPUs, as accelerate's multi-CPU launch runs them), torch's variables from
    MPI's, set as accelerate's PartialState sets them: torch's env:// rendezvous and DeepSpeed read them. MASTER_PORT
    defaults to accelerate's 29500, MASTER_ADDR to this machine when every process runs on it."""
    found = {name: next((os.environ[m] for m in names if m in os.environ), default)
             for name, (names, default) in _MPI_NAMES.items()}
    if int(found["WORLD_SIZE"]) <= 1:
        return
    for name, value in found.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", "29500")
    if found["LOCAL_WORLD_SIZE"] == found["WORLD_SIZE"]:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
