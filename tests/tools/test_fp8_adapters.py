"""Adapter files holding float8 (float8_e4m3fn) factors, as torch and ComfyUI read them: every tool reads them as
it reads the same values in float32; the NaN/Inf scan finds a NaN in a float8 tensor; convert keeps their dtype.

Reference: the same file with its float8 tensors upcast to float32 (exact: float32 holds every float8 value)."""

from __future__ import annotations

import pytest
import torch

from lorakit import create_network, load_network
from lorakit.cli import main
from lorakit.formats import load_file, save_file
from lorakit.tools.convert import convert
from lorakit.tools.inspect import inspect_file

demo = pytest.importorskip("lorakit.models.demo")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tools/conftest.py
FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"model", "ckpt", "fp8", "fp32", "nan"}: a tiny SD1 model and its checkpoint; a LoRA with float8 factors
    (alpha float32), the same values in float32, and the float8 file with one NaN."""
    from lorakit.models.save import save_checkpoint

    folder = tmp_path_factory.mktemp("fp8")
    model = demo.random_model("tiny-sd", seed=0)
    ckpt = folder / "model.safetensors"
    save_checkpoint(model, ckpt, dtype=torch.float32)
    net = create_network(model.unet, model.text_encoders, algo="lora", dim=4, alpha=2, preset="attn-mlp")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    net.save(folder / "src.safetensors")
    tensors, meta = load_file(folder / "src.safetensors")
    fp8 = {k: v.to(FP8) if k.endswith(".weight") else v for k, v in tensors.items()}
    paths = {"model": model, "ckpt": str(ckpt)}
    for name, sd in (("fp8", fp8), ("fp32", {k: v.float() for k, v in fp8.items()})):
        save_file(sd, folder / f"{name}.safetensors", meta)
        paths[name] = str(folder / f"{name}.safetensors")
    nan = dict(fp8)
    key = next(k for k in nan if k.endswith("lora_up.weight"))
    nan[key] = nan[key].clone()
    nan[key][0, 0] = float("nan")
    save_file(nan, folder / "nan.safetensors", meta)
    paths["nan"], paths["nan_key"] = str(folder / "nan.safetensors"), key
    return paths


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_inspect_reports_float8_and_finds_its_nan(files, capsys):
    report = inspect_file(files["fp8"])
    assert set(report["summary"]["dtypes"]) == {"float8_e4m3fn", "float32"}
    assert report["non_finite_tensors"] == []
    assert inspect_file(files["nan"])["non_finite_tensors"] == [files["nan_key"]]
    assert main(["inspect", files["fp8"], "--summary"]) == 0
    assert "float8_e4m3fn" in capsys.readouterr().out


def test_load_network_reads_float8_as_float32(files):
    model = files["model"]
    got = load_network(model.unet, files["fp8"], model.text_encoders).state_dict()
    want = load_network(model.unet, files["fp32"], model.text_encoders).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.warns(UserWarning, match="NaN or Inf"):
        load_network(model.unet, files["nan"], model.text_encoders)


def test_convert_keeps_float8_and_casts_exactly(files, tmp_path):
    source, _ = load_file(files["fp8"])
    convert(files["fp8"], tmp_path / "peft.safetensors", to="diffusers")
    convert(tmp_path / "peft.safetensors", tmp_path / "back.safetensors", to="kohya")
    back, _ = load_file(tmp_path / "back.safetensors")
    assert back.keys() == source.keys() and all(same_bits(back[k], source[k]) for k in source)
    assert main(["convert", files["fp8"], str(tmp_path / "fp16.safetensors"), "--dtype", "fp16"]) == 0
    half, _ = load_file(tmp_path / "fp16.safetensors")
    assert all(half[k].dtype == torch.float16 and torch.equal(half[k].float(), source[k].float()) for k in source)


def test_merge_into_model_and_concat_read_float8_as_float32(files, tmp_path):
    for name in ("fp8", "fp32"):
        assert main(["merge", "--model", files["ckpt"], "--loras", files[name], "--save_to",
                     str(tmp_path / f"model_{name}.safetensors"), "--quiet"]) == 0
        assert main(["merge", "--loras", files[name], "--ratios", "0.7", "--save_to",
                     str(tmp_path / f"lora_{name}.safetensors"), "--quiet"]) == 0
    for kind in ("model", "lora"):
        got, _ = load_file(tmp_path / f"{kind}_fp8.safetensors")
        want, _ = load_file(tmp_path / f"{kind}_fp32.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
