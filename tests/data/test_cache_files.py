"""Cache file names: two images of one stem (a.png, a.jpg) never share a text-encoder output cache file."""

from __future__ import annotations

import os

import numpy as np
import torch

from lorakit.data.cache_files import shared_stems
from lorakit.data.dataset import TrainDataset
from lorakit.data.spec import DatasetSpec, SubsetSpec
from lorakit.data.text_cache import cache_text_outputs, read_text_outputs

from .conftest import write_image


def test_shared_stems():
    assert shared_stems(["d/a.png", "d/a.jpg", "d/b.png", "e/a.png", "d/a.png"]) == {"d/a.png", "d/a.jpg"}


def test_text_outputs_of_images_sharing_a_stem_are_kept_apart(tmp_path):
    folder = tmp_path / "imgs"
    for name, seed in (("a.png", 0), ("a.jpg", 1), ("b.png", 2)):
        write_image(str(folder / name), 64, 64, seed=seed)
    (folder / "a.caption").write_text("shared caption")
    (folder / "b.caption").write_text("b")

    def encode(captions):  # the caption's length and its first letter's code: a fake encoding
        hidden = torch.tensor([[[len(c), ord(c[:1] or " ")]] for c in captions], dtype=torch.float32)
        return hidden, None

    ds = TrainDataset(DatasetSpec([SubsetSpec(image_dir=str(folder))], resolution=64), seed=1)
    assert cache_text_outputs(ds, encode, "id") == {"encoded": 3, "reused": 0}
    names = {os.path.basename(e.path): os.path.basename(e.te_cache_file) for e in ds.entries}
    assert names == {"a.png": "a.png_te_outputs.npz", "a.jpg": "a.jpg_te_outputs.npz", "b.png": "b_te_outputs.npz"}
    for entry in ds.entries:
        hidden, _ = read_text_outputs(entry.te_cache_file)
        assert np.array_equal(hidden.numpy(), encode([entry.caption])[0][0].numpy())
    assert cache_text_outputs(ds, encode, "id") == {"encoded": 0, "reused": 3}


def test_a_killed_runs_cache_temporaries_are_removed_from_the_dataset_folder(tmp_path):
    """Cache files are written under a temporary name and renamed; those a killed run left in the image folder
    (its process is gone) are removed when the caches are built again. Other hidden files stay."""
    import subprocess
    import sys

    from lorakit.data.latent_cache import cache_latents

    from .test_latent_cache import FakeVAE

    folder = tmp_path / "imgs"
    write_image(str(folder / "a.png"), 64, 64, seed=0)
    (folder / "a.caption").write_text("a")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (folder / ".hidden_note").write_text("kept")
    ds = TrainDataset(DatasetSpec([SubsetSpec(image_dir=str(folder))], resolution=64), seed=1)
    for name, build in ((".a_lorakit.npz", lambda: cache_latents(ds, FakeVAE(), to_disk=True)),
                        (".a_te_outputs.npz", lambda: cache_text_outputs(
                            ds, lambda captions: (torch.zeros(len(captions), 1, 2), None), "id"))):
        stale = folder / f"{name}.{gone}.0123abcd.tmp"
        stale.write_bytes(b"half")
        build()
        assert not stale.exists(), name
    assert sorted(p.name for p in folder.iterdir()) == [".hidden_note", "a.caption", "a.png", "a_lorakit.npz",
                                                        "a_te_outputs.npz"]


def test_text_outputs_in_memory_one_encoding_per_caption(tmp_path):
    """cache_text_encoder_outputs without _to_disk: every caption encoded before training, once however many images
    share it, kept on the entries (float32, CPU) and served in the batches; no file is written."""
    folder = tmp_path / "imgs"
    for name, seed in (("a.png", 0), ("b.png", 1), ("c.png", 2)):
        write_image(str(folder / name), 64, 64, seed=seed)
    (folder / "a.caption").write_text("same")
    (folder / "b.caption").write_text("same")
    (folder / "c.caption").write_text("other")
    encoded = []

    def encode(captions):
        encoded.extend(captions)
        hidden = torch.tensor([[[len(c), ord(c[0])]] for c in captions], dtype=torch.float16)
        return hidden, hidden[:, 0] * 2

    ds = TrainDataset(DatasetSpec([SubsetSpec(image_dir=str(folder), caption_extension=".caption")], resolution=64),
                      seed=1)
    assert cache_text_outputs(ds, encode, "id", batch_size=4, to_disk=False) == {"encoded": 2, "reused": 0}
    assert sorted(encoded) == ["other", "same"]
    assert sorted(os.listdir(folder)) == ["a.caption", "a.png", "b.caption", "b.png", "c.caption", "c.png"]
    for entry in ds.entries:
        hidden, pooled = entry.te_outputs
        assert hidden.dtype == torch.float32 and hidden.device.type == "cpu" and entry.te_cache_file is None
        assert hidden.tolist() == [[len(entry.caption), ord(entry.caption[0])]]
        assert pooled.tolist() == [2 * len(entry.caption), 2 * ord(entry.caption[0])]
    batch = ds.collate([ds[key] for keys in ds.batches(1) for key in keys])
    want = torch.tensor([[[len(c), ord(c[0])]] for c in batch.captions], dtype=torch.float32)
    assert torch.equal(batch.text_hidden, want) and torch.equal(batch.text_pooled, 2 * want[:, 0])
