"""CheckpointReader on files whose name and content disagree: each error names the file and what it is."""

from __future__ import annotations

import pytest
import torch

from lorakit.formats.checkpoint_file import CheckpointFileError, CheckpointReader
from lorakit.formats.safetensors_io import save_file


def test_safetensors_under_a_pickle_name_is_read_as_safetensors(tmp_path):
    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    for name in ("renamed.ckpt", "renamed.pt", "renamed.bin"):
        path = tmp_path / name
        save_file(tensors, path, metadata={"k": "v"})
        with CheckpointReader(path) as reader:
            assert sorted(reader.keys()) == ["a.weight", "b"]
            assert torch.equal(reader.get("a.weight"), tensors["a.weight"])
            assert reader.get("b").dtype == torch.float16
            assert reader.metadata == {"k": "v"}


def test_broken_safetensors_under_a_pickle_name_says_what_it_is(tmp_path):
    path = tmp_path / "renamed.ckpt"
    save_file({"a": torch.zeros(4)}, path)
    data = bytearray(path.read_bytes())
    data[9] = ord("#")  # header JSON broken, the length and the "{" intact
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointFileError, match=r"renamed\.ckpt.*begins as a safetensors file"):
        CheckpointReader(path)


@pytest.mark.parametrize("content,found", [
    (b"hello world this is not a model\n" * 10, r"b'hello world this'"),
    (b"", "an empty file"),
    (bytes(range(235, 256)) * 20, "beginning with"),
])
def test_not_a_pickle_names_the_file(tmp_path, content, found):
    path = tmp_path / "notes.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointFileError, match=rf"notes\.ckpt: not a PyTorch checkpoint.*found .*{found}"):
        CheckpointReader(path)


def test_corrupt_pickle_is_not_called_one_that_needs_code(tmp_path):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(CheckpointFileError, match=r"bad\.ckpt: not a readable PyTorch checkpoint") as info:
        CheckpointReader(path)
    assert "more than plain tensors" not in str(info.value)


def test_real_pickles_still_load(tmp_path):
    sd = {"x": torch.arange(3.0)}
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "zip.ckpt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with CheckpointReader(tmp_path / "zip.ckpt") as reader:
        assert torch.equal(reader.get("x"), sd["x"]) and reader.extra == {"global_step": 7}
    with CheckpointReader(tmp_path / "legacy.pt") as reader:
        assert torch.equal(reader.get("x"), sd["x"])
