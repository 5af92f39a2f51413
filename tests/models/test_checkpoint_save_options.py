"""save_checkpoint's options, read back with safetensors' and torch's own readers: metadata is written, the
default dtype is fp16 (docs/models.md), a .ckpt is {"state_dict": ...} as sd-scripts' model_util writes it (and
older tools read only that), and a model no longer predicting v drops the v_pred marker it was loaded with."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

from safetensors.torch import load_file as st_load_file  # noqa: E402

from lorakit.formats.safetensors_io import load_file, save_file  # noqa: E402
from lorakit.models.demo import demo_file  # noqa: E402
from lorakit.models.load import load_model  # noqa: E402
from lorakit.models.save import save_checkpoint  # noqa: E402

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def model():
    return load_model("demo:tiny-sd")  # float32


def test_metadata_and_default_dtype(model, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, metadata={"modelspec.title": "tiny", "ss_note": "kept"})
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.title"] == "tiny" and metadata["ss_note"] == "kept"
    saved = st_load_file(str(path))
    assert saved[CONV_IN].dtype == torch.float16
    assert torch.equal(saved[CONV_IN], model.unet.conv_in.weight.half())


def test_ckpt_is_a_state_dict_wrapper(model, tmp_path):
    path = tmp_path / "m.ckpt"
    save_checkpoint(model, path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert list(obj) == ["state_dict"]
    state = obj["state_dict"]
    assert state[CONV_IN].dtype == torch.float16
    assert torch.equal(state[CONV_IN], model.unet.conv_in.weight.half())


def test_a_dropped_v_prediction_drops_the_marker(tmp_path):
    tensors = load_file(demo_file("demo:tiny-sd")[0])[0]
    tensors["v_pred"] = torch.tensor([])  # ComfyUI/Forge's marker of a v-prediction file
    marked = tmp_path / "v.safetensors"
    save_file(tensors, marked)
    model = load_model(marked)
    assert model.v_parameterization
    model.v_parameterization = False
    out = tmp_path / "eps.safetensors"
    save_checkpoint(model, out, dtype=None)
    assert "v_pred" not in st_load_file(str(out))
    assert not load_model(out).v_parameterization
