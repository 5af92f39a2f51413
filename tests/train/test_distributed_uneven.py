"""A global batch that does not divide by the number of processes (a bucket's or the epoch's last batch): split as
evenly as it goes, each process's loss weighted by its share, so two processes still equal one."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file  # noqa: E402
from lorakit.models.demo_data import write_concept_folder  # noqa: E402
from lorakit.train.distributed import World, _free_port  # noqa: E402

from .processes import run_processes  # noqa: E402
from .test_distributed import _worker  # noqa: E402
from .test_run import _config, base  # noqa: E402,F401  (the shared model/data fixture)


@pytest.mark.parametrize("n, size, parts, weights", [
    (4, 2, [(0, 2), (2, 4)], [1, 1]),
    (3, 2, [(0, 2), (2, 3)], [4 / 3, 2 / 3]),
    (7, 3, [(0, 3), (3, 5), (5, 7)], [9 / 7, 6 / 7, 6 / 7]),
    (1, 2, [(0, 1), (0, 1)], [2, 0]),  # the process without a sample trains a stand-in at weight 0
    (2, 3, [(0, 1), (1, 2), (1, 2)], [1.5, 1.5, 0]),
])
def test_uneven_batches_split_as_evenly_as_they_go(n, size, parts, weights):
    worlds = [World(rank, size) for rank in range(size)]
    assert [(w.shard(n).start, w.shard(n).stop) for w in worlds] == parts
    assert [w.loss_weight(n) for w in worlds] == pytest.approx(weights)


@pytest.mark.parametrize("weight", [4 / 3, 2 / 3, 0])
def test_the_weight_scales_the_gradient_and_the_value_stays_the_parts_mean_loss(weight):
    """A process's loss is weighted for the gradient average only: its value, which the process logs and checks for
    NaN, stays the mean loss of its own samples (what each accelerate process's loss is in sd-scripts)."""
    from lorakit.train.step import _weight_gradient

    x = torch.tensor(3.0, requires_grad=True)
    loss = _weight_gradient(x * 2, weight)
    loss.backward()
    assert loss.item() == pytest.approx(6.0) and x.grad.item() == pytest.approx(2 * weight)


@pytest.mark.parametrize("processes, images, per_process", [
    (2, 7, 2),  # global batches of 4 and 3: the 3 split 2/1
    (3, 5, 1),  # global batches of 3 and 2: the 2 split 1/1, the third process trains a stand-in at weight 0
])
def test_several_processes_train_through_batches_that_do_not_divide(base, tmp_path, processes, images, per_process):
    write_concept_folder(tmp_path / "data", n=images, repeats=1)
    common = dict(train_data_dir=str(tmp_path / "data"), max_train_steps=2, seed=11, learning_rate=0.5,
                  optimizer_type="SGDNesterov", network_args=["conv_dim=2"])
    from lorakit.train.run import train

    torch.set_num_threads(1)
    single = _config(base, tmp_path / "single", train_batch_size=per_process * processes, **common)
    expected = load_file(train(single))[0]
    cfg = _config(base, tmp_path / "ddp", train_batch_size=per_process, **common)
    overrides = {k: getattr(cfg, k) for k in cfg.given}
    run_processes(_worker, (processes, _free_port(), overrides), nprocs=processes)
    got = load_file(tmp_path / "ddp" / "t.safetensors")[0]
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in expected.items())
