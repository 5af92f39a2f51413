"""Two CPU processes (gloo) training data-parallel equal one process training with the same global batch."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file  # noqa: E402
from lorakit.train.distributed import World, _free_port  # noqa: E402  (also the deepspeed tests' port)

from .processes import run_processes  # noqa: E402
from .test_run import _config, base  # noqa: E402,F401  (the shared model/data fixture)


def _worker(rank: int, world: int, port: int, overrides: dict) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from lorakit.train.config import load_train_config
    from lorakit.train.run import train

    try:
        train(load_train_config(overrides=overrides))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_two_processes_equal_one_with_the_global_batch(base, tmp_path):
    # SGD: its update is linear in the gradient. Adam divides by sqrt(v) + eps, which turns the float noise of
    # gradients that are zero in exact arithmetic (self-attention over the 1x1 middle block: softmax of one
    # token) into full-size steps that differ between any two summation orders.
    common = dict(max_train_steps=3, seed=11, learning_rate=0.5, optimizer_type="SGDNesterov",
                  network_args=["conv_dim=2"])
    single = _config(base, tmp_path / "single", train_batch_size=4, **common)
    from lorakit.train.run import train

    torch.set_num_threads(1)
    expected = load_file(train(single))[0]
    # ddp_timeout sets the process group's timeout; the two DDP bucket settings are accepted and change nothing
    cfg = _config(base, tmp_path / "ddp", train_batch_size=2, ddp_timeout=5, ddp_gradient_as_bucket_view=True,
                  ddp_static_graph=True, **common)
    overrides = {k: getattr(cfg, k) for k in cfg.given}
    run_processes(_worker, (2, _free_port(), overrides), nprocs=2)
    files = sorted((tmp_path / "ddp").glob("*.safetensors"))
    assert [f.name for f in files] == ["t.safetensors"]  # only the main process saves
    got = load_file(files[0])[0]
    assert got.keys() == expected.keys()
    changed = 0
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=key)
        changed += bool(key.endswith("lora_up.weight") and value.abs().sum() > 0)
    assert changed > 0


def test_ddp_timeout_reaches_the_process_group(monkeypatch):
    import datetime

    from lorakit.train.distributed import current_world

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    world = current_world(torch.device("cpu"), 90)
    assert (world.rank, world.size) == (1, 2)
    assert seen == {"backend": "gloo", "init_method": "env://", "timeout": datetime.timedelta(minutes=90)}
    seen.clear()
    current_world(torch.device("cpu"))
    assert "timeout" not in seen  # unset: torch's default


@pytest.mark.parametrize("mpi", [
    {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
     "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},  # Open MPI
    {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},  # MPICH / Intel MPI
])
def test_mpirun_on_cpus_is_read_as_accelerate_reads_it(monkeypatch, mpi):
    """accelerate's multi-CPU launch runs the script under mpirun; its PartialState takes the rank and the world size
    from MPI's variables and sets torch's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_PORT 29500) from them."""
    from lorakit.train.distributed import current_world

    env = dict(mpi)
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: env.update(INIT=kw["init_method"]))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: int(env["RANK"]))
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: int(env["WORLD_SIZE"]))
    assert current_world(torch.device("cpu")) == World(rank=1, size=2)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "INIT")} == {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
        "INIT": "env://"}


def test_torchrun_variables_win_over_mpi_and_gpus_ignore_mpi(monkeypatch):
    from lorakit.train.distributed import current_world

    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
    monkeypatch.setattr(os, "environ", env)
    # accelerate reads MPI's variables for CPU processes only (its MULTI_CPU): a GPU process under mpirun alone
    assert current_world(torch.device("cuda")) == World() and "WORLD_SIZE" not in env
    env["WORLD_SIZE"] = "1"  # the launcher's own WORLD_SIZE is taken as it is
    assert current_world(torch.device("cpu")) == World() and "RANK" not in env
