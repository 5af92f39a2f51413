"""deepspeed = true: the DeepSpeed engine (ZeRO 0-3, offloading, bf16) trains the same adapters as lorakit's own
loop, on one process and on two CPU processes (gloo), and resumes exactly."""

from __future__ import annotations

import gc
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from lorakit.formats.safetensors_io import load_file  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.options import OptionError  # noqa: E402
from lorakit.train.run import train  # noqa: E402
from lorakit.train.state import StateError  # noqa: E402

from . import deepspeed_gloo  # noqa: E402,F401  (collectives through gloo: no C++ op to compile)
from .deepspeed_cpu_adam_op import cpu_adam_op  # noqa: E402,F401  (CPU Adam without its build)
from .processes import run_processes  # noqa: E402
from .test_distributed import _free_port, _worker  # noqa: E402
from .test_run import _config, base  # noqa: E402,F401  (the shared model/data fixture)

# SGD: its update is linear in the gradient, so runs that sum the same gradients in another order agree to float
# noise (Adam turns the noise of gradients that are zero in exact arithmetic into full-size steps).
SGD = dict(optimizer_type="SGDNesterov", learning_rate=0.5, network_args=["conv_dim=2"])


def _weights(path):
    return load_file(path)[0]


def _assert_same(got: dict, expected: dict, rtol=1e-5, atol=1e-7, trained="lora_up.weight"):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key].float(), value.float(), rtol=rtol, atol=atol, msg=key)
    assert any(k.endswith(trained) and v.abs().sum() > 0 for k, v in expected.items())  # it trained


@pytest.fixture(scope="module")
def plain(base, tmp_path_factory):
    """The runs without deepspeed each engine run is held to: SGD over 4 steps (two epochs of 3 batches) and over
    2 (what the stage 3 runs take: each step of theirs gathers every module's weights), and AdamW."""
    out = tmp_path_factory.mktemp("plain")
    return {"sgd": _weights(train(_config(base, out / "sgd", **SGD))),
            "sgd2": _weights(train(_config(base, out / "sgd2", max_train_steps=2, **SGD))),
            "adamw": _weights(train(_config(base, out / "adamw", network_args=["conv_dim=2"])))}


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_stages_0_to_2_equal_the_run_without_deepspeed(base, plain, tmp_path, stage):
    # one process: the engine steps AdamW on flat fp32 copies of the same numbers, element by element
    got = _weights(train(_config(base, tmp_path, deepspeed=True, zero_stage=stage, network_args=["conv_dim=2"])))
    _assert_same(got, plain["adamw"], rtol=0, atol=0)


def test_stage_3_partitions_the_unet_and_text_encoder_and_trains_the_same(base, plain, tmp_path):
    printed = torch.zeros(2000)
    before = repr(printed)
    got = _weights(train(_config(base, tmp_path, deepspeed=True, zero_stage=3, max_train_steps=2, **SGD)))
    _assert_same(got, plain["sgd2"])
    assert repr(printed) == before  # the print options shortened while the engine is built are put back


def test_stage_3_trains_full_as_the_run_without_deepspeed(base, tmp_path):
    """`full` rebuilds W + diff in backward from the layer's weight and its own change, both partitioned by stage 3
    between the passes: DeepSpeed must have gathered them again by then."""
    full = dict(optimizer_type="SGDNesterov", learning_rate=0.05, max_train_steps=2,
                network_args=["algo=full", "preset=attn-only"])
    expected = _weights(train(_config(base, tmp_path / "plain", **full)))
    got = _weights(train(_config(base, tmp_path / "ds", deepspeed=True, zero_stage=3, **full)))
    _assert_same(got, expected, trained=".diff")
    assert any(v.abs().amax() > 1e-4 for v in expected.values())  # it trained, past rounding


def test_a_stage_3_run_leaves_the_process_as_it_was(base, tmp_path):
    """Stage 3 replaces F.linear for the whole process and keeps the engine's module (the models with it) in a
    global list. After the run both are undone: a next run in the same process (a web UI's, a notebook's) trains
    with torch's own linear, and the models of the first run are freed."""
    from diffusers import UNet2DConditionModel

    def unets():
        gc.collect()
        return sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects())

    linear, before = torch.nn.functional.linear, unets()
    train(_config(base, tmp_path, deepspeed=True, zero_stage=3, max_train_steps=1, **SGD))
    assert torch.nn.functional.linear is linear
    assert unets() == before


def test_stage_3_sdxl_with_both_text_encoders(base, tmp_path):
    sdxl = dict(pretrained_model_name_or_path=str(base / "sdxl.safetensors"), max_train_steps=2, **SGD)
    expected = _weights(train(_config(base, tmp_path / "plain", **sdxl)))
    got = _weights(train(_config(base, tmp_path / "ds", deepspeed=True, zero_stage=3, **sdxl)))
    assert any(k.startswith("lora_te2_") for k in got)
    _assert_same(got, expected)


def test_gradient_accumulation_steps_at_the_same_boundaries(base, tmp_path):
    # 3 batches an epoch with 2 accumulation steps: the last batch of each epoch steps alone
    acc = dict(gradient_accumulation_steps=2, max_train_steps=5, **SGD)
    expected = _weights(train(_config(base, tmp_path / "plain", **acc)))
    got = _weights(train(_config(base, tmp_path / "ds", deepspeed=True, zero_stage=2, **acc)))
    _assert_same(got, expected, rtol=0, atol=0)


def test_offloaded_optimizer_and_parameters(base, plain, tmp_path):
    got = _weights(train(_config(base, tmp_path, deepspeed=True, zero_stage=3, offload_optimizer_device="cpu",
                                 offload_param_device="cpu", max_train_steps=2, **SGD)))
    _assert_same(got, plain["sgd2"])


def test_offloaded_adamw_steps_with_deepspeeds_cpu_adam(base, plain, tmp_path, cpu_adam_op):
    from lorakit.train.deepspeed_engine import offload_optimizer

    config = _config(base, tmp_path, deepspeed=True, zero_stage=2, offload_optimizer_device="cpu",
                     network_args=["conv_dim=2"])
    swapped = offload_optimizer(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1), config)
    assert type(swapped).__name__ == "DeepSpeedCPUAdam" and swapped.adam_w_mode
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert offload_optimizer(sgd, config) is sgd  # the others step as they are on the CPU copies
    # CPU Adam's own arithmetic differs from torch's in the last bits, which Adam's normalisation enlarges
    _assert_same(_weights(train(config)), plain["adamw"], rtol=0, atol=1e-4)
    if cpu_adam_op is not None:  # the run stepped through the op's update
        assert cpu_adam_op.updates > 0 and cpu_adam_op.created_adamw


def test_bf16_trains_within_bf16_precision(base, tmp_path):
    bf16 = dict(mixed_precision="bf16", **SGD)
    expected = _weights(train(_config(base, tmp_path / "plain", **bf16)))  # fp32 adapters under bf16 autocast
    got = _weights(train(_config(base, tmp_path / "ds", deepspeed=True, zero_stage=2, **bf16)))
    assert got.keys() == expected.keys() and all(v.dtype == torch.bfloat16 for v in got.values())
    # the engine holds the adapters in bf16 (fp32 master copies in the optimizer): measured 0.08% apart
    diff = sum(((got[k].float() - v.float()) ** 2).sum() for k, v in expected.items()).sqrt()
    size = sum((v.float() ** 2).sum() for v in expected.values()).sqrt()
    assert diff <= 0.01 * size


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_continues_exactly(base, tmp_path, stage):
    common = dict(deepspeed=True, zero_stage=stage, max_train_steps=2, save_state=True, network_args=["conv_dim=2"])
    expected = _weights(train(_config(base, tmp_path / "full", **common)))
    assert train(_config(base, tmp_path / "cut", **common), stop_at_step=1) is None
    state = tmp_path / "cut" / "t-step00000001-state"
    assert (state / "deepspeed" / "state").is_dir()
    assert json.loads((state / "train_state.json").read_text())["deepspeed"] == stage
    assert "optimizer" not in torch.load(state / "optimizer.pt", weights_only=True)  # the engine holds it
    got = _weights(train(_config(base, tmp_path / "cut", resume=str(state), **common)))
    _assert_same(got, expected, rtol=0, atol=0)  # AdamW: its moments came back too

    with pytest.raises(StateError, match="saved with deepspeed; resume it with deepspeed = true"):
        train(_config(base, tmp_path / "x", resume=str(state), max_train_steps=2, save_state=True,
                      network_args=["conv_dim=2"]))


def test_a_state_saved_without_deepspeed_is_refused_with_it(base, tmp_path):
    assert train(_config(base, tmp_path, max_train_steps=4, save_state=True), stop_at_step=1) is None
    with pytest.raises(StateError, match="saved without deepspeed; resume it with deepspeed = false"):
        train(_config(base, tmp_path, resume=str(tmp_path / "t-step00000001-state"), max_train_steps=4,
                      save_state=True, deepspeed=True))


# stage 2 over two epochs (each process's share of the batches drawn anew); stage 3 over 2 steps of the first: each
# of its steps gathers every module's weights from both processes (in the suite, 4 steps took 50 s and 2 take ~43)
@pytest.mark.parametrize("stage, steps, expected", [(2, 4, "sgd"), (3, 2, "sgd2")])
def test_two_processes_equal_one_with_the_global_batch(base, plain, tmp_path, stage, steps, expected):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("magenta --w 64 --h 64 --s 2\n")
    cfg = _config(base, tmp_path / "ds", deepspeed=True, zero_stage=stage, train_batch_size=1, seed=3,
                  max_train_steps=steps, sample_prompts=str(prompts), sample_every_n_steps=steps, save_state=True,
                  **SGD)
    overrides = {k: getattr(cfg, k) for k in cfg.given}
    run_processes(_worker, (2, _free_port(), overrides), nprocs=2)
    files = sorted((tmp_path / "ds").glob("*.safetensors"))
    assert [f.name for f in files] == ["t.safetensors"]  # only the main process saves
    # two processes x batch 1 = the global batch of 2 the plain run trained on; stage 3 samples on both
    # processes (each holds half of the weights) and the main one saves the image
    assert len(list((tmp_path / "ds" / "sample").glob("*.png"))) == 1
    _assert_same(_weights(files[0]), plain[expected], rtol=1e-4, atol=1e-6)
    # the state: each process wrote its optimizer slice into the main process's staging folder
    slices = sorted(p.name for p in (tmp_path / "ds" / "t-state" / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(slices) == 2 and any("rank_0" in n for n in slices) and any("rank_1" in n for n in slices)
    _assert_same(_weights(tmp_path / "ds" / "t-state" / "network.safetensors"), plain[expected], rtol=1e-4,
                 atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"zero_stage": 2, "optimizer_type": "Adafactor"}, "Adafactor cannot train with DeepSpeed zero_stage 2"),
    ({"zero_stage": 1, "optimizer_type": "Adafactor"}, "Adafactor cannot train with DeepSpeed zero_stage 1"),
    ({"zero_stage": 2, "offload_param_device": "cpu"}, "offload_param_device needs zero_stage 3"),
    ({"zero_stage": 0, "offload_optimizer_device": "cpu"}, "offload_optimizer_device needs zero_stage 1, 2 or 3"),
    ({"zero_stage": 3, "offload_param_device": "nvme"}, "offload_param_device = 'nvme' needs offload_param_nvme_path"),
    ({"zero_stage": 2, "offload_optimizer_device": "nvme", "offload_optimizer_nvme_path": "/x"},
     "offload_optimizer_device 'nvme' needs zero_stage 3"),
    ({"offload_optimizer_nvme_path": "/x"}, "offload_optimizer_nvme_path is given but offload_optimizer_device"),
    ({"fp16_master_weights_and_gradients": True}, "fp16_master_weights_and_gradients needs mixed_precision 'fp16'"),
    ({"fused_backward_pass": True, "optimizer_type": "Adafactor", "zero_stage": 0},
     "deepspeed and fused_backward_pass cannot both be on"),
    ({"scale_weight_norms": 1.0}, "deepspeed and scale_weight_norms cannot both be on"),
    ({"zero_stage": 3, "fp8_base": True, "mixed_precision": "bf16"}, "fp8_base does not work with zero_stage 3"),
    ({"zero_stage": 4}, "zero_stage"),
])
def test_impossible_combinations_are_refused_before_loading(overrides, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        load_train_config(overrides={"deepspeed": True, **overrides})


def test_deepspeed_options_without_deepspeed_are_reported_unused():
    config = load_train_config(overrides={"zero_stage": 3, "offload_optimizer_device": "cpu"})
    assert "zero_stage, offload_optimizer_device unused without deepspeed" in config.warnings


def test_several_processes_refuse_optimizers_with_global_statistics(monkeypatch, tmp_path):
    from lorakit.train.deepspeed_engine import DeepSpeedEngine
    from lorakit.train.distributed import World

    class Prodigy(torch.optim.SGD):
        pass

    config = load_train_config(overrides={"deepspeed": True, "zero_stage": 2})
    optimizer = Prodigy([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(RuntimeError, match="optimizer Prodigy cannot train with DeepSpeed zero_stage 2 on 2 processes"):
        DeepSpeedEngine(config, World(rank=0, size=2), None, None, optimizer, train_unet=True, train_text=False)


def test_missing_package_is_named(monkeypatch):
    import builtins

    from lorakit.train.deepspeed_engine import require_deepspeed

    real = builtins.__import__

    def no_deepspeed(name, *args, **kwargs):
        if name == "deepspeed":
            raise ImportError("No module named 'deepspeed'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_deepspeed)
    with pytest.raises(RuntimeError, match=r"deepspeed = true needs the deepspeed package .*pip install deepspeed"):
        require_deepspeed(load_train_config(overrides={"deepspeed": True}))


def test_step_applied_is_false_between_boundaries_and_after_an_overflow():
    # DeepSpeed's fp16 optimizer sets `overflow` when it skips a step (the CPU accelerator has no fp16, so a plain
    # optimizer carries the flag here); the trainer holds the lr schedule for such a step
    from lorakit.train.deepspeed_engine import DeepSpeedEngine
    from lorakit.train.distributed import current_world

    config = load_train_config(overrides={"deepspeed": True, "zero_stage": 0, "train_batch_size": 1})
    network = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    engine = DeepSpeedEngine(config, current_world(torch.device("cpu"), group=True), network, None, optimizer,
                             train_unet=True, train_text=False)

    def step(boundary: bool) -> bool:
        engine.backward(engine.engine(torch.ones(1, 2)).sum(), boundary)
        return engine.step_applied

    assert step(boundary=False) is False
    assert step(boundary=True) is True
    engine.engine.optimizer.overflow = True
    assert step(boundary=True) is False
