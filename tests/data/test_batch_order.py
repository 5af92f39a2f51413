"""The order of an epoch's batches, as sd-scripts makes it (train_util.py): each bucket's samples (images times
repeats) shuffled every epoch (BucketManager.shuffle) and cut into ceil(n / batch_size) batches (make_buckets),
the batches of all buckets shuffled together (shuffle_buckets); and the optimizer steps counted under gradient
accumulation as accelerate counts them (a step at every accumulation_steps-th batch and at the epoch's last)."""

from __future__ import annotations

import math

import pytest

from lorakit.data.dataset import BatchOrder, SampleKey, TrainDataset
from lorakit.data.spec import DatasetSpec, SubsetSpec

# Two datasets (a batch never mixes them): 10 images x 3 repeats in batches of 4, 4 images x 2 repeats in 3s.
LAYOUT = [("a", 10, 3, 4), ("b", 4, 2, 3)]


@pytest.fixture
def dataset(tmp_path, image_factory):
    specs = []
    for name, images, repeats, batch_size in LAYOUT:
        for i in range(images):
            image_factory(f"{name}/{i}.png", 16, 16, seed=i)
        subset = SubsetSpec(image_dir=str(tmp_path / name), num_repeats=repeats, class_tokens=name)
        specs.append(DatasetSpec([subset], batch_size=batch_size, resolution=16))
    return TrainDataset(specs, seed=3, reso_multiple=16)


def sd_scripts_batch_count() -> int:
    return sum(math.ceil(images * repeats / batch_size) for _, images, repeats, batch_size in LAYOUT)


def test_steps_per_epoch_is_the_ceiling_per_bucket(dataset):
    assert sd_scripts_batch_count() == 8 + 3
    assert dataset.steps_per_epoch == sd_scripts_batch_count()
    assert len(BatchOrder(dataset)) == sd_scripts_batch_count()
    for epoch in (1, 2):
        assert len(dataset.batches(epoch)) == sd_scripts_batch_count()


def test_batches_of_different_buckets_are_interleaved(dataset):
    """Not every batch of one bucket before the other's: a shuffle of 8 + 3 batches leaves them grouped with
    probability 2 / 165, so in each of three epochs about once in 3.4 million."""
    groups = [[dataset.entries[batch[0].index].group for batch in dataset.batches(epoch)] for epoch in (1, 2, 3)]
    assert any(seq != sorted(seq) and seq != sorted(seq, reverse=True) for seq in groups)
    assert len({tuple(seq) for seq in groups}) > 1


def test_which_samples_share_a_batch_changes_every_epoch(dataset):
    """Each bucket's samples are shuffled before being cut into batches, so the repeats of one image do not fill
    a batch together and the batches themselves differ between epochs (not only their order)."""
    def batch_contents(epoch):
        return sorted(tuple(sorted(k.index for k in batch)) for batch in dataset.batches(epoch))
    assert batch_contents(1) != batch_contents(2) != batch_contents(3)
    in_file_order = [i for i in range(10) for _ in range(3)]
    first_bucket = [[k.index for k in b] for b in dataset.batches(1) if dataset.entries[b[0].index].group == 0]
    assert sorted(tuple(sorted(b)) for b in first_bucket) != sorted(
        tuple(in_file_order[k: k + 4]) for k in range(0, 30, 4))


def accelerate_optimizer_steps(batches_per_epoch: int, accumulation: int, epochs: int) -> dict:
    """{(epoch, batch): optimizer steps done before it}, from a loop that steps as accelerate syncs gradients."""
    done, before = 0, {}
    for epoch in range(1, epochs + 1):
        for batch in range(batches_per_epoch):
            before[epoch, batch] = done
            if (batch + 1) % accumulation == 0 or batch == batches_per_epoch - 1:
                done += 1
    return before


@pytest.mark.parametrize("accumulation", [1, 3, 4, 11])
def test_optimizer_step_counts_a_step_for_the_last_partial_accumulation(dataset, accumulation):
    dataset.set_schedule(100, gradient_accumulation_steps=accumulation)
    expected = accelerate_optimizer_steps(sd_scripts_batch_count(), accumulation, epochs=3)
    assert {(e, b): dataset.optimizer_step(SampleKey(0, e, b, 0)) for e, b in expected} == expected
