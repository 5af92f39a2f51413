"""Options that prepare the frozen base model (base_weights, fp8_base, cpu_offload_checkpointing, torch_compile,
tokenizer_cache_dir) and fused_backward_pass, in short training runs on a tiny SD1 model."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.algos.options import OptionError  # noqa: E402
from lorakit.formats.safetensors_io import load_file  # noqa: E402
from lorakit.models.demo import random_model  # noqa: E402
from lorakit.models.demo_data import write_concept_folder  # noqa: E402
from lorakit.models.load import load_model  # noqa: E402
from lorakit.models.save import save_checkpoint  # noqa: E402
from lorakit.network.create import create_network  # noqa: E402
from lorakit.tools.merge import merge_into_model  # noqa: E402
from lorakit.train import base_model  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    model = random_model("tiny-sd", seed=0)
    save_checkpoint(model, root / "sd.safetensors", dtype=None)
    write_concept_folder(root / "data", n=4, repeats=1)
    for i, seed in enumerate((1, 2)):  # two adapters with non-zero changes, to merge as base weights
        net = create_network(model.unet, model.text_encoders, dim=2, alpha=1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        net.save(root / f"extra{i}.safetensors")
    return root


def _config(base, out, **overrides):
    values = dict(pretrained_model_name_or_path=str(base / "sd.safetensors"), train_data_dir=str(base / "data"),
                  resolution="64", output_dir=str(out), output_name="t", network_dim=2, network_alpha=1,
                  learning_rate=1e-2, max_train_steps=2, train_batch_size=2, seed=3, cache_latents=True,
                  max_data_loader_n_workers=0, optimizer_type="AdamW")
    values.update(overrides)
    return load_train_config(overrides=values)


def _tensors(path):
    return load_file(path)[0]


def _assert_same(a, b, atol=0.0):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=atol, msg=k)


# ----- base_weights ---------------------------------------------------------------------------------------------
def test_base_weights_train_like_a_model_merged_beforehand(base, tmp_path):
    files = [str(base / "extra0.safetensors"), str(base / "extra1.safetensors")]
    merged = load_model(base / "sd.safetensors")
    merge_into_model(merged, files, [0.7, 1.0], progress=False)  # the merge tool; the second file's default: 1.0
    save_checkpoint(merged, tmp_path / "merged.safetensors", dtype=None)
    with_base = train(_config(base, tmp_path / "a", base_weights=files, base_weights_multiplier=[0.7]))
    premerged = train(_config(base, tmp_path / "b", pretrained_model_name_or_path=str(tmp_path / "merged.safetensors")))
    plain = train(_config(base, tmp_path / "c"))
    _assert_same(with_base, premerged, atol=1e-6)
    ta, tc = _tensors(with_base), _tensors(plain)
    assert any((ta[k] - tc[k]).abs().max() > 1e-4 for k in ta)  # the merged adapters changed the training


def test_base_weights_multiplier_counts_are_checked():
    assert base_model.base_weight_ratios(["a", "b", "c"], [0.5]) == [0.5, 1.0, 1.0]
    # the function checks too (merge_base_weights is public, called without a config): a multiplier past the
    # files would otherwise be dropped by zip without a word
    with pytest.raises(OptionError, match="2 multiplier.*1 base_weights file"):
        base_model.base_weight_ratios(["a"], [1, 2])
    with pytest.raises(OptionError, match="base_weights_multiplier.*2 multiplier.*1 base_weights file"):
        load_train_config(overrides=dict(base_weights=["a.safetensors"], base_weights_multiplier=[1, 2]))


# ----- fp8_base ---------------------------------------------------------------------------------------------------
def test_fp8_storage_is_cast_up_per_call():
    model = random_model("tiny-sd", seed=0)
    unet = model.unet.to(torch.bfloat16)
    sample, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    cond = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = unet(sample.bfloat16(), t, cond.bfloat16()).sample.float()
        targets = base_model.fp8_targets(model, fp8_base=False, fp8_base_unet=True)
        assert targets == [unet]
        base_model.keep_in_fp8(targets, torch.bfloat16)
        out = unet(sample.bfloat16(), t, cond.bfloat16()).sample.float()
    layers = [m for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert layers and all(m.weight.dtype == torch.float8_e4m3fn for m in layers)  # at rest, after the call too
    assert all(m.weight.dtype == torch.bfloat16 for m in unet.modules() if isinstance(m, torch.nn.GroupNorm))
    assert unet.dtype == torch.bfloat16  # what samplers read
    err = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < 0.15, err  # fp8 rounding shows, but the output stays close
    assert model.text_encoders[0].dtype == torch.float32  # fp8_base_unet leaves the text encoders alone


def test_fp8_base_trains_close_to_the_bf16_run(base, tmp_path):
    # SGD: the first update is proportional to the gradient (Adam's sign-like first step would magnify noise)
    common = dict(mixed_precision="bf16", network_train_unet_only=True, max_train_steps=1, optimizer_type="SGDNesterov")
    fp8 = train(_config(base, tmp_path / "fp8", fp8_base=True, **common))
    bf16 = train(_config(base, tmp_path / "bf16", **common))
    ta, tb = _tensors(fp8), _tensors(bf16)
    ups = [k for k in ta if k.endswith("lora_up.weight")]
    num = sum((ta[k] - tb[k]).norm() ** 2 for k in ups) ** 0.5
    den = sum(tb[k].norm() ** 2 for k in ups) ** 0.5
    assert den > 0 and num / den < 0.3, (num / den).item()
    with pytest.raises(OptionError, match="fp8_base needs mixed_precision"):
        _config(base, tmp_path, fp8_base=True)


# ----- cpu_offload_checkpointing ------------------------------------------------------------------------------
def test_cpu_offload_checkpointing_gives_the_same_run(base, tmp_path, monkeypatch):
    packed = []
    real = torch.autograd.graph.save_on_cpu

    class Counting(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook

            def counting_pack(tensor):
                packed.append(tensor.shape)
                return pack(tensor)

            self.pack_hook = counting_pack

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    offloaded = train(_config(base, tmp_path / "a", gradient_checkpointing=True, cpu_offload_checkpointing=True))
    assert packed  # the checkpointed blocks' inputs went through the CPU
    plain = train(_config(base, tmp_path / "b", gradient_checkpointing=True))
    _assert_same(offloaded, plain)
    with pytest.raises(OptionError, match="cpu_offload_checkpointing needs gradient_checkpointing"):
        _config(base, tmp_path, cpu_offload_checkpointing=True)


# ----- torch_compile -----------------------------------------------------------------------------------------
def test_compile_models_compiles_in_place():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GELU())
    x = torch.randn(2, 4)
    eager = layer(x)
    base_model.compile_models([layer], "eager")
    assert layer._compiled_call_impl is not None and set(layer.state_dict()) == {"0.weight", "0.bias"}
    torch.testing.assert_close(layer(x), eager)


def test_torch_compile_compiles_the_models_that_train(base, tmp_path, monkeypatch):
    chosen = []
    monkeypatch.setattr("lorakit.train.run.compile_models", lambda modules, backend: chosen.append((modules, backend)))
    train(_config(base, tmp_path, torch_compile=True, dynamo_backend="aot_eager", max_train_steps=1))
    (modules, backend), = chosen
    assert backend == "aot_eager" and [type(m).__name__ for m in modules] == ["UNet2DConditionModel",
                                                                              "CLIPTextModel"]


@pytest.mark.slow
def test_torch_compile_run_matches_eager(base, tmp_path):  # ~22 s: dynamo traces the whole U-Net
    """The compiled adapters take their unfused paths (the fused ones are custom autograd functions, costly to
    trace), so the gradients agree to float noise only: SGD, whose step is linear in them, keeps that noise small
    where Adam would turn it into full-size steps of near-zero gradients (measured 7e-9 apart). Two adapters in each
    of the 16 transformers, a Linear (attn2.to_k) and a 1x1 conv (proj_in): each adapter adds to the trace (the
    default set took 44 s here, the attention projections 26, these 22)."""
    preset = tmp_path / "few.toml"
    preset.write_text('unet_target_module = []\ntext_encoder_target_module = []\nuse_fnmatch = true\n'
                      'unet_target_name = ["*.attn2.to_k", "*.proj_in"]\n')
    common = dict(network_train_unet_only=True, max_train_steps=1, optimizer_type="SGDNesterov", learning_rate=0.5,
                  network_args=[f"preset={preset}"])
    out = train(_config(base, tmp_path / "a", torch_compile=True, dynamo_backend="eager", **common))
    expected = train(_config(base, tmp_path / "b", **common))
    _assert_same(out, expected, atol=1e-7)
    assert any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in _tensors(expected).items())


def test_dynamo_backend_is_checked():
    with pytest.raises(OptionError, match="dynamo_backend.*not one of"):
        load_train_config(overrides=dict(torch_compile=True, dynamo_backend="turbo"))
    with pytest.raises(OptionError, match="dynamo_backend': 'tensort' is not available"):
        base_model.check_dynamo_backend("tensort")


# ----- fused_backward_pass in a run, tokenizer_cache_dir -----------------------------------------------------
def test_fused_backward_run_equals_the_usual_run(base, tmp_path, caplog):
    adafactor = dict(optimizer_type="Adafactor", lr_scheduler="constant", max_grad_norm=0,
                     optimizer_args=["relative_step=False", "scale_parameter=False", "warmup_init=False"])
    with caplog.at_level(logging.INFO, logger="lorakit.train.base_model"):
        fused = train(_config(base, tmp_path / "a", fused_backward_pass=True, tokenizer_cache_dir=str(tmp_path),
                              **adafactor))
    assert "tokenizer_cache_dir" in caplog.text and "ignored" in caplog.text
    usual = train(_config(base, tmp_path / "b", **adafactor))
    _assert_same(fused, usual, atol=1e-7)
