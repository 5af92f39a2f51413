"""Adapters as torch files (.ckpt/.pt/.pth/.bin, sd-scripts' save_model_as ckpt/pt): every tool reads them through
the weights-only reader."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from lorakit import create_network, load_network
from lorakit.cli import main
from lorakit.formats import load_file, read_header
from lorakit.models.demo import random_model
from lorakit.models.save import save_checkpoint
from lorakit.network.load import read_adapter_tensors

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tools/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"model", "tuned", "lora", "lora_pt", "locon"}: a tiny SD1 checkpoint, a changed copy, and LoRA files, the
    first also as torch.save of its state dict (what sd-scripts' save_model_as pt writes)."""
    d = tmp_path_factory.mktemp("torch_files")
    model = random_model("tiny-sd", seed=0)
    out = {"model": str(d / "model.safetensors"), "tuned": str(d / "tuned.safetensors")}
    save_checkpoint(model, out["model"], dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    save_checkpoint(model, out["tuned"], dtype=torch.float32)
    for name, opts in (("lora", dict(preset="attn-mlp")), ("locon", dict(preset="full", conv_dim=2))):
        net = create_network(model.unet, model.text_encoders, algo="lora", dim=4, alpha=2, **opts)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        out[name] = str(d / f"{name}.safetensors")
        net.save(out[name])
    out["lora_pt"] = str(d / "lora.pt")
    torch.save(load_file(out["lora"])[0], out["lora_pt"])
    return out


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def merge(*argv) -> None:
    assert main(["merge", *argv, "--quiet"]) == 0


# ------------------------------------------------------------------------------------------------ reading
def test_merge_reads_a_torch_adapter_as_its_safetensors_twin(files, tmp_path):
    """Into a model and concatenated with another LoRA: the .pt adapter gives what the .safetensors one gives."""
    for adapter in ("lora", "lora_pt"):
        merge("--model", files["model"], "--loras", files[adapter], "--ratios", "0.7", "--save_to",
              str(tmp_path / f"{adapter}_model.safetensors"), "--no_metadata")
        merge("--loras", files[adapter], files["locon"], "--ratios", "0.7", "-0.5", "--save_to",
              str(tmp_path / f"{adapter}_concat.safetensors"), "--v2")  # --v2: the names are checked
    for what in ("model", "concat"):
        a, b = (load_file(tmp_path / f"{adapter}_{what}.safetensors")[0] for adapter in ("lora", "lora_pt"))
        assert same_tensors(a, b), what
    base = load_file(files["model"])[0]
    merged = load_file(tmp_path / "lora_pt_model.safetensors")[0]
    assert any(not torch.equal(base[k], merged[k]) for k in base)  # the adapter did change the model


def test_merge_checks_of_torch_adapters_say_what_they_are(files, tmp_path, capsys):
    """The checks before merging read a torch file's names as the loaders do: a wrong --sdxl and a checkpoint in
    --loras are named for what they are, not as files that are no safetensors."""
    out = str(tmp_path / "o.safetensors")
    assert main(["merge", "--loras", files["lora_pt"], "--sdxl", "--save_to", out, "--quiet"]) == 1
    assert "is an adapter for SD1/SD2 models, but --sdxl was given" in capsys.readouterr().err
    ckpt = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": load_file(files["model"])[0]}, ckpt)
    assert main(["merge", "--loras", files["lora"], ckpt, "--save_to", out, "--quiet"]) == 1
    assert f"{ckpt}: is a model checkpoint (sd1), not an adapter" in capsys.readouterr().err
    merge("--loras", files["lora_pt"], "--lbws", "[" + ",".join(["1"] * 17) + "]", "--save_to", out)  # its note


def test_merge_does_not_unpickle_code(tmp_path, capsys):
    """A .pt whose pickle would run a command is refused by the weights-only reader; nothing runs."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"lora_unet_x.alpha": Evil()}, protocol=2))
    assert main(["merge", "--loras", str(evil), "--save_to", str(tmp_path / "o.safetensors"), "--quiet"]) == 1
    assert "weights_only" in capsys.readouterr().err and not (tmp_path / "ran").exists()


def test_read_header_on_a_torch_name_does_not_contradict_it(files):
    with pytest.raises(ValueError) as err:
        read_header(files["lora_pt"])
    assert "pickle checkpoint" in str(err.value) and "only under a" not in str(err.value)
