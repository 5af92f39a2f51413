"""What save.py writes, read back with other readers: save_checkpoint replaces a file only once the new one is
complete, for .ckpt as for .safetensors (a writer failing half-way leaves the previous checkpoint byte for byte
and no temporary beside it); save_diffusers' text encoder weights carry transformers' {"format": "pt"} header
(what save_pretrained writes and transformers checks before loading a safetensors file)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.models.load import load_model  # noqa: E402
from lorakit.models.save import save_checkpoint, save_diffusers  # noqa: E402

safetensors = pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def model():
    return load_model("demo:tiny-sd")


def test_a_failed_ckpt_write_keeps_the_old_file(model, tmp_path, monkeypatch):
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"previous checkpoint")
    calls = []

    def half_write(obj, f, *args, **kwargs):  # writes some bytes where it was told to, then fails
        calls.append(str(f))
        with open(f, "wb") as out:
            out.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(OSError):
        save_checkpoint(model, path)
    assert calls and calls[0] != str(path)  # written under a temporary name, not over the checkpoint
    assert path.read_bytes() == b"previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["m.ckpt"]


def test_diffusers_text_encoder_weights_say_format_pt(model, tmp_path):
    folder = tmp_path / "pipe"
    save_diffusers(model, folder)
    with safetensors.safe_open(str(folder / "text_encoder" / "model.safetensors"), framework="pt") as f:
        assert (f.metadata() or {}).get("format") == "pt"
        keys = set(f.keys())
    assert keys == set(model.text_encoders[0].state_dict())
