"""detect.py's rules written out: ComfyUI's SD2 v-prediction probe (population std of one norm bias > 0.09,
model_detection.py), the v_pred marker against the user's flag, and what files without a checkpoint's keys are
called."""

from __future__ import annotations

import pytest
import torch

from lorakit.models.detect import ModelKindError, classify_keys, detect_v_parameterization, sd2_weights_say_v

PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_KEYS = ["cond_stage_model.model.ln_final.weight", PROBE]


def _spread(std: float, n: int = 64) -> torch.Tensor:
    """n values of population standard deviation ``std`` (mean 0)."""
    t = torch.linspace(-1, 1, n, dtype=torch.float64)
    return (t / t.std(unbiased=False) * std).to(torch.float16)


def _v(tensor, kind="sd2", override=None, keys=SD2_KEYS):
    return detect_v_parameterization("m.safetensors", kind, keys, {PROBE: tensor}.__getitem__, override)


@pytest.mark.parametrize("std,is_v", [(0.10, True), (0.0925, True), (0.0875, False), (0.02, False)])
def test_probe_threshold_is_comfyuis_0_09(std, is_v):
    probe = _spread(std)
    assert _v(probe) is is_v
    assert sd2_weights_say_v({PROBE: probe}) is is_v


def test_probe_uses_the_population_std():
    # [-a, -a, a, a]: population std a = 0.085 (epsilon), sample std a * sqrt(4/3) = 0.098
    probe = torch.tensor([-0.085, -0.085, 0.085, 0.085])
    assert abs(float(probe.std(unbiased=True)) - 0.0981) < 1e-3
    assert _v(probe) is False and sd2_weights_say_v({PROBE: probe}) is False


def test_probe_only_for_sd2_and_only_without_a_flag():
    spread = _spread(0.2)
    assert _v(spread, kind="sd1") is False and _v(spread, kind="sdxl") is False
    assert _v(spread, override=False) is False
    assert _v(_spread(0.01), override=True) is True
    assert _v(spread, keys=SD2_KEYS[:1]) is False  # no probe key: epsilon
    assert sd2_weights_say_v({}) is False
    assert sd2_weights_say_v({PROBE: torch.empty(64, device="meta")}) is False


def test_v_pred_marker_wins_unless_contradicted():
    keys = [*SD2_KEYS, "v_pred"]
    assert _v(_spread(0.01), kind="sd1", keys=keys) is True
    assert _v(_spread(0.01), kind="sd1", keys=keys, override=True) is True
    with pytest.raises(ModelKindError, match="m.safetensors: v_parameterization=False.*v_pred"):
        _v(_spread(0.01), kind="sd1", keys=keys, override=False)


@pytest.mark.parametrize("keys,found", [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.diff"], "an adapter"),  # LyCORIS full-diff
    (["lora_unet_x.diff_b"], "an adapter"),
    (["lora_te_x.hada_w1_a"], "an adapter"),
    # a diffusers/PEFT LoRA (lora_A/lora_B) is an adapter too, not "an unknown kind of file"
    (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight"],
     "an adapter"),
    (["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"], "a VAE alone"),
    (["first_stage_model.encoder.conv_in.weight"], "a VAE alone"),
    (["encoder.down_blocks.0.resnets.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"],
     "a diffusers VAE weight file"),
    (["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"], "a diffusers U-Net weight file"),
    (["text_model.encoder.layers.0.mlp.fc1.weight"], "a text encoder alone"),
    ([], "an empty file"),
    (["cond_stage_model.model.ln_final.weight", "model.diffusion_model.out.2.weight"], "sd2"),
    (["cond_stage_model.transformer.text_model.final_layer_norm.weight"], "sd1"),
    (["conditioner.embedders.0.transformer.x", "conditioner.embedders.1.model.x"], "sdxl"),
])
def test_classify_keys(keys, found):
    kind = classify_keys(keys)
    assert kind == found if found in ("sd1", "sd2", "sdxl") else kind.startswith(found), kind
