"""vae_file.load_vae with a diffusers VAE weight file (``encoder.down_blocks.*`` keys, no prefix): it loads
tensor for tensor, and one lacking a tensor is refused naming the file (as vae=) and the missing key."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from lorakit.formats.safetensors_io import save_file  # noqa: E402
from lorakit.models.configs import load_config  # noqa: E402
from lorakit.models.detect import ModelKindError  # noqa: E402
from lorakit.models.meta import component_on_meta  # noqa: E402
from lorakit.models.vae_file import load_vae  # noqa: E402


@pytest.fixture(scope="module")
def vae_state():
    config = load_config("tiny-sd", "vae")
    vae = component_on_meta("vae", config).to_empty(device="cpu")
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=g) for k, v in vae.state_dict().items()}
    return config, state


def test_a_diffusers_vae_file_loads_exactly(vae_state, tmp_path):
    config, state = vae_state
    path = tmp_path / "vae_d.safetensors"
    save_file(state, path)
    vae = load_vae(path, "sd1", config, torch.float32)
    loaded = vae.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_diffusers_vae_file_missing_a_key_names_the_file_and_the_key(vae_state, tmp_path):
    config, state = vae_state
    missing = "decoder.up_blocks.0.resnets.0.conv1.weight"
    path = tmp_path / "vae_d.safetensors"
    save_file({k: v for k, v in state.items() if k != missing}, path)
    with pytest.raises(ModelKindError, match=rf"^vae=.*vae_d\.safetensors: diffusers VAE file lacks .*{missing}"):
        load_vae(path, "sd1", config, torch.float32)
