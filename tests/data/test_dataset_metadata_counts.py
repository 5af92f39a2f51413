"""The counts of ss_datasets (TrainDataset.datasets_metadata), as sd-scripts' DreamBoothDataset sets them and
train_network.py writes them: num_train_images / num_reg_images are num_repeats x images per subset, summed
(num_reg_images before the regularization images are balanced against the training images); a subset's
img_count is its images after validation_split; ss_tag_frequency is keyed by the folder's name."""

from __future__ import annotations

import pytest

from lorakit.data.dataset import TrainDataset
from lorakit.data.spec import DatasetSpec, SubsetSpec


def folder(image_factory, tmp_path, name, count):
    for i in range(count):
        image_factory(f"{name}/{i}.png", 16, 16, seed=i, caption=f"tag{i}, {name}")
    return str(tmp_path / name)


@pytest.mark.parametrize("train, reg", [((5, 3), (4, 2)), ((2, 1), (4, 2)), ((3, 1), (1, 1))])
def test_image_counts_with_repeats(tmp_path, image_factory, train, reg):
    (n_train, train_repeats), (n_reg, reg_repeats) = train, reg
    subsets = [SubsetSpec(image_dir=folder(image_factory, tmp_path, "sks", n_train), num_repeats=train_repeats,
                          class_tokens="sks"),
               SubsetSpec(image_dir=folder(image_factory, tmp_path, "reg", n_reg), num_repeats=reg_repeats,
                          class_tokens="dog", is_reg=True)]
    ds = TrainDataset([DatasetSpec(subsets, resolution=16)], reso_multiple=16)
    meta = ds.datasets_metadata()[0]
    assert meta["num_train_images"] == ds.num_train_images == n_train * train_repeats
    assert meta["num_reg_images"] == ds.num_reg_images == n_reg * reg_repeats
    # what trains is still balanced: the regularization samples of an epoch match the training samples
    assert sum(e.repeats for e in ds.entries if e.is_reg) == n_train * train_repeats


def test_img_count_is_the_images_left_after_validation_split(tmp_path, image_factory):
    image_dir = folder(image_factory, tmp_path, "2_dog", 10)
    spec = DatasetSpec([SubsetSpec(image_dir=image_dir, num_repeats=2, class_tokens="dog")], resolution=16,
                       validation_split=0.2)
    meta = TrainDataset([spec], reso_multiple=16).datasets_metadata()[0]
    assert meta["subsets"][0]["img_count"] == 8
    assert meta["num_train_images"] == 16
    validation = TrainDataset([spec], reso_multiple=16, validation=True).datasets_metadata()[0]
    assert validation["subsets"][0]["img_count"] == 2


@pytest.mark.parametrize("suffix", ["", "/"])
def test_tag_frequency_is_keyed_by_the_folder_name(tmp_path, image_factory, suffix):
    """Also for an image_dir written with a trailing slash: the key is the folder's name, the name the subset's
    image_dir entry shows (sd-scripts' os.path.basename would give an empty name there)."""
    image_dir = folder(image_factory, tmp_path, "2_dog", 3)
    spec = DatasetSpec([SubsetSpec(image_dir=image_dir + suffix, class_tokens="dog", caption_extension=".txt")], resolution=16)
    meta = TrainDataset([spec], reso_multiple=16).datasets_metadata()[0]
    assert list(meta["tag_frequency"]) == ["2_dog"] == [meta["subsets"][0]["image_dir"]]
    assert meta["tag_frequency"]["2_dog"] == {"tag0": 1, "tag1": 1, "tag2": 1, "2_dog": 3}
