"""validation_split and validation_seed as sd-scripts' split_train_val (train_util.py) applies them: the sorted
image paths shuffled with random.seed(validation_seed) whenever validation_seed is given (0 included), the last
round(n * validation_split) of them held out for validation."""

from __future__ import annotations

import os
import random

import pytest

from lorakit.data.dataset import TrainDataset
from lorakit.data.spec import DatasetSpec, SubsetSpec


def make_folder(image_factory, tmp_path, count):
    for i in range(count):
        image_factory(f"1_x/{i:02d}.png", 16, 16, seed=i)
    return str(tmp_path / "1_x")


def names(dataset):
    return sorted(os.path.basename(e.path) for e in dataset.entries)


def split(folder, fraction, seed, validation_seed=None):
    spec = DatasetSpec([SubsetSpec(image_dir=folder, class_tokens="x")], resolution=16,
                       validation_split=fraction, validation_seed=validation_seed)
    return (names(TrainDataset([spec], seed=seed, reso_multiple=16)),
            names(TrainDataset([spec], seed=seed, reso_multiple=16, validation=True)))


def sd_scripts_held_out(count, fraction, validation_seed):
    paths = [f"{i:02d}.png" for i in range(count)]
    random.Random(validation_seed).shuffle(paths)  # random.seed(validation_seed); random.shuffle(dataset)
    return sorted(paths[len(paths) - round(len(paths) * fraction):])


@pytest.mark.parametrize("count, fraction, held_out", [(10, 0.15, 2), (9, 0.3, 3), (10, 0.25, 2), (7, 0.5, 4)])
def test_held_out_count_is_rounded(tmp_path, image_factory, count, fraction, held_out):
    folder = make_folder(image_factory, tmp_path, count)
    train, validation = split(folder, fraction, seed=1, validation_seed=5)
    assert round(count * fraction) == held_out  # Python's round, as sd-scripts': 2.5 -> 2, 3.5 -> 4
    assert len(validation) == held_out and len(train) == count - held_out
    assert validation == sd_scripts_held_out(count, fraction, 5)
    # the rest trains (sd-scripts trains the first ceil(n * (1 - split)), which can overlap; lorakit's doc: never)
    assert sorted(train + validation) == [f"{i:02d}.png" for i in range(count)]


@pytest.mark.parametrize("validation_seed", [0, 3])
def test_validation_seed_alone_chooses_the_held_out_images(tmp_path, image_factory, validation_seed):
    folder = make_folder(image_factory, tmp_path, 10)
    expected = sd_scripts_held_out(10, 0.4, validation_seed)
    for training_seed in (1, 2, 7):
        assert split(folder, 0.4, training_seed, validation_seed)[1] == expected, training_seed
