"""`lorakit train` from `network_weights` files other tools write: a full LoRA (text-encoder adapters too) for a
U-Net-only run, and an SDXL file with diffusers-style U-Net names, with and without dim_from_weights."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file, save_file  # noqa: E402
from lorakit.models.demo import random_model  # noqa: E402
from lorakit.models.demo_data import write_concept_folder  # noqa: E402
from lorakit.models.save import save_checkpoint  # noqa: E402
from lorakit.network.create import create_network  # noqa: E402
from lorakit.network.names import NameIndex  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("network_weights")
    for kind in ("sd", "sdxl"):
        model = random_model(f"tiny-{kind}", seed=0)
        save_checkpoint(model, root / f"{kind}.safetensors", dtype=None)
        save_file(_full_lora(model), root / f"{kind}_lora.safetensors")
    write_concept_folder(root / "data", n=2, repeats=1)
    return root


def _full_lora(model) -> dict:
    """A trained-looking LoRA of the U-Net and the text encoders (lora_up not zero), in lorakit's (kohya's) names."""
    net = create_network(model.unet, model.text_encoders, dim=4, alpha=2)
    generator = torch.Generator().manual_seed(0)
    return {k: v if k.endswith(".alpha") else torch.randn(v.shape, generator=generator) * 0.1
            for k, v in net.state_dict().items()}


def _config(base, out, kind="sd", **overrides):
    values = dict(pretrained_model_name_or_path=str(base / f"{kind}.safetensors"), train_data_dir=str(base / "data"),
                  resolution="64", output_dir=str(out), output_name="t", network_dim=4, network_alpha=2,
                  learning_rate=1e-9, max_train_steps=1, train_batch_size=1, seed=3, cache_latents=True,
                  max_data_loader_n_workers=0, optimizer_type="AdamW", lr_scheduler="constant")
    values.update(overrides)
    return load_train_config(overrides=values)


def _started_from(final, file: dict, names: dict | None = None) -> bool:
    """The run's adapters are the file's (renamed by ``names``) after one step at a tiny learning rate."""
    trained = load_file(final)[0]
    names = names or {}
    return trained.keys() == {names.get(k, k) for k in file if k.startswith("lora_unet_")} and all(
        torch.allclose(trained[names.get(k, k)], v, atol=1e-6) for k, v in file.items() if k.startswith("lora_unet_"))


@pytest.mark.parametrize("dim_from_weights", [False, True])
def test_a_unet_only_run_starts_from_a_lora_with_text_encoder_adapters(base, tmp_path, caplog, dim_from_weights):
    """sd-scripts builds no text-encoder adapters for network_train_unet_only and load_weights ignores their keys:
    the file's lora_te_* tensors are left out, with one line saying how many."""
    path = base / "sd_lora.safetensors"
    file = load_file(path)[0]
    with caplog.at_level(logging.INFO, logger="lorakit.train.run"):
        final = train(_config(base, tmp_path, network_weights=str(path), network_train_unet_only=True,
                              dim_from_weights=dim_from_weights))
    assert _started_from(final, file)
    te = sum(k.startswith("lora_te") for k in file)
    assert [r for r in caplog.records if f"{te} text-encoder tensor(s) (lora_te*) left out" in r.getMessage()]


@pytest.mark.parametrize("dim_from_weights", [False, True])
def test_an_sdxl_file_with_diffusers_unet_names_starts_a_run(base, tmp_path, dim_from_weights):
    """SDXL U-Net adapters named by diffusers paths (ai-toolkit, OneTrainer legacy) are read as load_network reads
    them; the run saves them under sd-scripts' SGM names."""
    unet = random_model("tiny-sdxl", seed=0).unet
    sgm, diffusers = NameIndex.for_sd(unet, (), "sdxl"), NameIndex.for_sd(unet, (), "sdxl", style="diffusers")
    file = {k: v for k, v in load_file(base / "sdxl_lora.safetensors")[0].items() if k.startswith("lora_unet_")}
    renamed = {}
    for key in file:
        name, _, suffix = key.partition(".")
        target = sgm.find(name)
        renamed[key] = diffusers.name_of(target.component, target.path) + "." + suffix
    assert renamed != {k: k for k in file}  # the names differ
    path = tmp_path / "diffusers_names.safetensors"
    save_file({renamed[k]: v for k, v in file.items()}, path)
    final = train(_config(base, tmp_path / "out", kind="sdxl", network_weights=str(path),
                          network_train_unet_only=True, dim_from_weights=dim_from_weights))
    assert _started_from(final, file)


def test_a_unet_only_run_leaves_out_the_text_encoder_adapters_of_a_onetrainer_omi_file(tmp_path):
    """OneTrainer's OMI names (unet./clip_l./clip_g.) are read as the loaders read them, so its clip_* adapters are
    the text encoders' ones that a network_train_unet_only run leaves out."""
    from lorakit.train.run import _unet_adapters

    omi = {f"{prefix}.{suffix}": torch.ones(2, 2) for prefix in (
        "unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q", "clip_l.text_model.encoder.layers.0.mlp.fc1",
        "clip_g.text_model.encoder.layers.1.mlp.fc1") for suffix in ("lora_down.weight", "lora_up.weight")}
    save_file(omi, tmp_path / "omi.safetensors")
    kept = _unet_adapters(tmp_path / "omi.safetensors", "sdxl")
    assert sorted(kept) == ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight"]


def test_a_file_of_another_rank_is_refused_in_one_line_naming_it(base, tmp_path):
    """The kohya_ss GUI's "Network weights" with another "Network Rank": torch's load_state_dict error (one line
    per tensor, hundreds) became one that names the file, a tensor, and dim_from_weights."""
    from lorakit.train.run import TrainingError

    path = base / "sd_lora.safetensors"  # rank 4
    with pytest.raises(TrainingError) as error:
        train(_config(base, tmp_path, network_weights=str(path), network_dim=8))
    message = str(error.value)
    assert message.startswith(f"network_weights={path}: ") and "\n" not in message
    assert "lora_down.weight: file has shape (4, " in message and "dim_from_weights" in message
