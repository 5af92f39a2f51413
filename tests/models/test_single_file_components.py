"""Single-file checkpoints whose components are not the plain set: inpainting / instruct-pix2pix U-Nets (more
conv_in channels), a checkpoint without a VAE read with a separate vae= file (the A1111 "pruned, VAE apart"
setup), the file's own VAE left unread when vae= replaces it, and SD2's native sample size per prediction type."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file, save_file  # noqa: E402
from lorakit.models.demo import demo_file  # noqa: E402
from lorakit.models.detect import ModelKindError  # noqa: E402
from lorakit.models.load import load_model  # noqa: E402
from lorakit.models.save import save_checkpoint  # noqa: E402

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE_PREFIX = "first_stage_model."


@pytest.fixture(scope="module")
def tensors():
    return load_file(demo_file("demo:tiny-sd")[0])[0]


def _vae_file(tensors, path, scale=1.0):
    """The checkpoint's VAE alone, LDM keys without the prefix (as VAE releases ship), times ``scale``."""
    save_file({k[len(VAE_PREFIX):]: v * scale for k, v in tensors.items() if k.startswith(VAE_PREFIX)}, path)
    return path


@pytest.mark.parametrize("channels", [9, 8])  # inpainting: latents + mask + masked image; pix2pix: + image
def test_a_unet_with_more_input_channels_loads_and_round_trips(tensors, tmp_path, channels):
    weights = dict(tensors)
    conv_in = tensors[CONV_IN]
    g = torch.Generator().manual_seed(0)
    extra = torch.randn(conv_in.shape[0], channels - 4, *conv_in.shape[2:], generator=g).to(conv_in.dtype)
    weights[CONV_IN] = torch.cat([conv_in, extra], dim=1)
    path = tmp_path / f"in{channels}.safetensors"
    save_file(weights, path)
    model = load_model(path, dtype=None)
    assert model.unet.config.in_channels == channels
    assert torch.equal(model.unet.conv_in.weight, weights[CONV_IN])
    again = tmp_path / "again.safetensors"
    save_checkpoint(model, again, dtype=None)
    assert torch.equal(load_file(again)[0][CONV_IN], weights[CONV_IN])


def test_a_checkpoint_without_vae_loads_with_vae_given(tensors, tmp_path):
    path = tmp_path / "no-vae.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith(VAE_PREFIX)}, path)
    with pytest.raises(ModelKindError, match="without vae tensors.*pass a VAE file as vae="):
        load_model(path)
    vae = _vae_file(tensors, tmp_path / "vae.safetensors")
    model = load_model(path, vae=vae, dtype=None)
    assert torch.equal(model.vae.encoder.conv_in.weight, tensors[VAE_PREFIX + "encoder.conv_in.weight"])
    assert torch.equal(model.unet.conv_in.weight, tensors[CONV_IN])


def test_the_replaced_vae_is_not_kept_as_extras(tensors, tmp_path):
    # extras are checkpoint tensors without a diffusers counterpart; the file's VAE has one, and vae= replaces it
    vae = _vae_file(tensors, tmp_path / "vae.safetensors", scale=2.0)
    model = load_model(demo_file("demo:tiny-sd")[0], vae=vae, dtype=None)
    assert not [k for k in model.extras if k.startswith(VAE_PREFIX)]
    key = VAE_PREFIX + "encoder.conv_in.weight"
    assert torch.equal(model.vae.encoder.conv_in.weight, tensors[key] * 2)
    out = tmp_path / "out.safetensors"
    save_checkpoint(model, out, dtype=None)
    assert torch.equal(load_file(out)[0][key], tensors[key] * 2)


def test_sd2_native_size_follows_the_prediction_type():
    # Stability's releases: stable-diffusion-2-1 (768-v) has unet sample_size 96, 2-1-base (512, epsilon) 64;
    # generate() draws at sample_size x 8 by default. Only the configs: the full-size weights are too big here.
    from lorakit.models.load import _configs

    assert _configs("sd21", "sd2", v_pred=True)["unet"]["sample_size"] == 96
    assert _configs("sd21", "sd2", v_pred=False)["unet"]["sample_size"] == 64
