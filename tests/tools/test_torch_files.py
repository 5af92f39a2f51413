"""Adapters as torch files (.ckpt/.pt/.pth/.bin, sd-scripts' save_model_as ckpt/pt): every tool reads them through
the weights-only reader, and writes one under such a name with torch.save, as kohya's resize_lora.py,
extract_lora_from_models.py and merge scripts do (tensors only: the metadata is left out, with a warning)."""

from __future__ import annotations

import logging
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


# ------------------------------------------------------------------------------------------------ writing
def written_by_every_tool(files, folder, suffix) -> dict[str, str]:
    """{tool: output file} of resize, extract, convert and both merges, each written to a `suffix` name."""
    out = {tool: str(folder / f"{tool}{suffix}") for tool in ("resize", "extract", "convert", "concat", "svd")}
    assert main(["resize", files["locon"], out["resize"], "--new_rank", "2"]) == 0
    assert main(["extract", files["model"], files["tuned"], out["extract"], "--linear_dim", "2", "--conv_dim", "0",
                 "--preset", "attn-only", "--no_text_encoder"]) == 0
    assert main(["convert", files["lora"], out["convert"], "--dtype", "fp16", "--no-progress"]) == 0
    merge("--loras", files["lora"], files["locon"], "--save_to", out["concat"])
    merge("--loras", files["lora"], files["locon"], "--new_rank", "3", "--save_to", out["svd"])
    return out


@pytest.fixture(scope="module")
def written_as_safetensors(files, tmp_path_factory) -> dict[str, str]:
    """What each tool writes under a .safetensors name: the tensors its torch files must hold."""
    return written_by_every_tool(files, tmp_path_factory.mktemp("st"), ".safetensors")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_tools_write_a_torch_file_under_a_torch_name(files, written_as_safetensors, tmp_path, suffix, caplog):
    """The tensors of the .safetensors output, as a plain state dict torch.load(weights_only=True) and lorakit's
    loader read; the metadata is left out with a warning naming the file."""
    model = random_model("tiny-sd", seed=0)
    want = written_as_safetensors
    with caplog.at_level(logging.WARNING):
        got = written_by_every_tool(files, tmp_path / "torch", suffix)
    for tool, path in got.items():
        with open(path, "rb") as f:
            assert f.read(2) == b"PK", tool  # a torch.save zip archive, not safetensors bytes
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert same_tensors(state, load_file(want[tool])[0]), tool
        assert same_tensors(read_adapter_tensors(path)[0], state), tool
        load_network(model.unet, path, model.text_encoders)
        assert any(path in r.getMessage() and "metadata" in r.getMessage() for r in caplog.records), tool


def test_other_names_keep_safetensors_and_a_merged_lora_needs_a_file_name(files, tmp_path, capsys):
    out = tmp_path / "small.lora"
    assert main(["resize", files["lora"], str(out), "--new_rank", "2"]) == 0
    assert load_file(out)[1]["ss_network_dim"] == "2"  # safetensors with its metadata, as before
    assert main(["merge", "--loras", files["lora"], "--save_to", str(tmp_path / "folder"), "--quiet"]) == 1
    assert "expected such a file name" in capsys.readouterr().err


def test_a_torch_file_holds_each_tensor_without_the_rest_of_its_storage(tmp_path):
    from lorakit.formats.safetensors_io import save_tensors

    big = torch.arange(1000.0)
    save_tensors({"a.lora_down.weight": big[:4].reshape(2, 2)}, tmp_path / "x.pt")
    assert os.path.getsize(tmp_path / "x.pt") < 2000  # not the 4000 bytes of `big`
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["a.lora_down.weight"], big[:4].reshape(2, 2))


def test_convert_to_a_torch_file_does_not_claim_hashes_it_does_not_write(tmp_path, capsys):
    """A torch file holds no metadata: convert says it leaves the metadata out, and does not also report the sshs
    hashes as recomputed; to safetensors with a cast, it recomputes them and says so."""
    from lorakit.formats import add_hashes
    from lorakit.formats.safetensors_io import save_file

    tensors = {"lora_unet_a.lora_down.weight": torch.ones(4, 8), "lora_unet_a.lora_up.weight": torch.ones(8, 4)}
    save_file(tensors, tmp_path / "h.safetensors", metadata=add_hashes(tensors, {"ss_network_dim": "4"}))
    assert main(["convert", str(tmp_path / "h.safetensors"), str(tmp_path / "h.ckpt"), "--no-progress"]) == 0
    assert "recomputed" not in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "h.safetensors"), str(tmp_path / "h16.safetensors"), "--dtype", "fp16",
                 "--no-progress"]) == 0
    assert "sshs_model_hash/sshs_legacy_hash recomputed" in capsys.readouterr().out
