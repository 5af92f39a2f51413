"""The text-encoder output cache files: keyed on the caption as trained on (caption_prefix/suffix included), so an
edited caption or a new prefix is encoded again, unless skip_check (sd-scripts' skip_cache_check: it checks only
that the file exists) reuses any file; SDXL's states are split at the first encoder's width into hidden_state1 and
hidden_state2 (sd-scripts' names) and read back joined in that order."""

from __future__ import annotations

import numpy as np
import torch

from lorakit.data.dataset import TrainDataset
from lorakit.data.spec import DatasetSpec, SubsetSpec
from lorakit.data.text_cache import cache_text_outputs, read_text_outputs

from .conftest import write_image


def encode(captions):
    """A fake encoding that tells captions apart: [len, first letter, last letter, 7] per caption; pooled: -len."""
    hidden = torch.tensor([[[len(c), ord(c[:1] or " "), ord(c[-1:] or " "), 7.0]] for c in captions])
    return hidden, -hidden[:, 0, :1]


def dataset(tmp_path, **options):
    subset = SubsetSpec(image_dir=str(tmp_path / "imgs"), caption_extension=".txt", **options)
    return TrainDataset(DatasetSpec([subset], resolution=64), seed=1)


def stored_caption_code(entry):
    return read_text_outputs(entry.te_cache_file)[0][0].tolist()


def test_an_edited_caption_or_a_new_prefix_is_encoded_again(tmp_path):
    write_image(str(tmp_path / "imgs/a.png"), 64, 64)
    (tmp_path / "imgs/a.txt").write_text("cat", encoding="utf-8")
    assert cache_text_outputs(dataset(tmp_path), encode, "id") == {"encoded": 1, "reused": 0}
    assert cache_text_outputs(dataset(tmp_path), encode, "id") == {"encoded": 0, "reused": 1}

    (tmp_path / "imgs/a.txt").write_text("dog", encoding="utf-8")
    ds = dataset(tmp_path)
    assert cache_text_outputs(ds, encode, "id") == {"encoded": 1, "reused": 0}
    assert stored_caption_code(ds.entries[0]) == encode(["dog"])[0][0, 0].tolist()

    ds = dataset(tmp_path, caption_prefix="photo of")  # sd-scripts: prefix + " " + caption
    assert cache_text_outputs(ds, encode, "id") == {"encoded": 1, "reused": 0}
    assert stored_caption_code(ds.entries[0]) == encode(["photo of dog"])[0][0, 0].tolist()


def test_skip_check_reuses_the_file_of_an_edited_caption(tmp_path):
    write_image(str(tmp_path / "imgs/a.png"), 64, 64)
    (tmp_path / "imgs/a.txt").write_text("cat", encoding="utf-8")
    cache_text_outputs(dataset(tmp_path), encode, "id")
    (tmp_path / "imgs/a.txt").write_text("dog", encoding="utf-8")
    ds = dataset(tmp_path)
    assert cache_text_outputs(ds, encode, "id", skip_check=True) == {"encoded": 0, "reused": 1}
    assert stored_caption_code(ds.entries[0]) == encode(["cat"])[0][0, 0].tolist()


def test_sdxl_states_are_split_at_the_first_encoders_width_and_read_back_joined(tmp_path):
    write_image(str(tmp_path / "imgs/a.png"), 64, 64)
    (tmp_path / "imgs/a.txt").write_text("cat", encoding="utf-8")
    ds = dataset(tmp_path)
    cache_text_outputs(ds, encode, "id", split=1)
    hidden, pooled = encode(["cat"])
    with np.load(ds.entries[0].te_cache_file) as npz:
        assert npz["hidden_state1"].tolist() == hidden[0, :, :1].tolist()
        assert npz["hidden_state2"].tolist() == hidden[0, :, 1:].tolist()
        assert npz["pool2"].tolist() == pooled[0].tolist()
    joined, pool = read_text_outputs(ds.entries[0].te_cache_file)
    assert torch.equal(joined, hidden[0]) and torch.equal(pool, pooled[0])


def _flip_a_byte_inside(path, array_name):
    """One byte of an array's data flipped: the zip index and cache_key still read, the array fails its CRC."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{array_name}.npy")
    data = bytearray(open(path, "rb").read())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size - 1] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_a_file_with_damaged_array_data_is_rebuilt_when_caching_starts(tmp_path):
    """Found when caching starts and encoded again, as a damaged latent cache is, instead of stopping the run at
    the step that first reads it; with skip_check (any readable file) it is reused, as latent files are."""
    write_image(str(tmp_path / "imgs/a.png"), 64, 64)
    (tmp_path / "imgs/a.txt").write_text("cat", encoding="utf-8")
    ds = dataset(tmp_path)
    cache_text_outputs(ds, encode, "id")
    _flip_a_byte_inside(ds.entries[0].te_cache_file, "hidden_state1")
    assert cache_text_outputs(dataset(tmp_path), encode, "id", skip_check=True) == {"encoded": 0, "reused": 1}
    ds = dataset(tmp_path)
    assert cache_text_outputs(ds, encode, "id") == {"encoded": 1, "reused": 0}
    assert stored_caption_code(ds.entries[0]) == encode(["cat"])[0][0, 0].tolist()
