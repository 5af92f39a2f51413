"""The training dataset: images (or their cached latents) with captions, loss weights and buckets, served in
batches of one bucket each, in an order that is a pure function of (seed, epoch) so a run resumes exactly.

Build it from ``DatasetSpec``s (one per kohya "dataset"), iterate it through ``make_loader``::

    dataset = TrainDataset([spec], tokenizers=model.tokenizers, max_token_length=None, seed=42,
                           reso_multiple=pixel_multiple(model))
    cache_latents(dataset, model.vae, vae_batch_size=4, to_disk=True)   # optional (latent_cache.py)
    order = BatchOrder(dataset)
    loader = make_loader(dataset, order, max_workers=8, persistent=True)
    for epoch in range(first_epoch, epochs + 1):              # epochs count from 1, as in kohya
        order.set_position(epoch, skip_steps if epoch == first_epoch else 0)
        for batch in loader: ...                              # a ``Batch``

kohya semantics kept: each image appears ``num_repeats`` times per epoch; regularization images are repeated
(one more round at a time, in file order) until they match the training images with repeats, and those beyond
that count are left out; a batch never mixes buckets or datasets; the batches of an epoch are shuffled.
Randomness per sample (flip, crop, colour, caption) comes from a generator seeded by (seed, epoch, batch, slot):
no global state, the same in any worker, the same after a resume.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from .buckets import BucketChoice, BucketSelector, check_bucket, make_bucket_resolutions
from .captions import process_caption
from .errors import DatasetError
from .folders import subset_images
from .images import image_size, load_image
from .spec import DatasetSpec, SubsetSpec
from .transforms import Conditioning, color_aug, crop_to_bucket, flip, to_tensor

__all__ = ["ImageEntry", "SampleKey", "Batch", "TrainDataset", "BatchOrder", "make_loader", "pixel_multiple"]

logger = logging.getLogger(__name__)


def pixel_multiple(model) -> int:
    """The size step every image side must be a multiple of for ``model``: the VAE's factor times the U-Net's
    downsampling (64 for SD1/SD2, 32 for SDXL: kohya's verify_bucket_reso_steps values)."""
    return model.vae_scale_factor * 2 ** (len(model.unet.config.block_out_channels) - 1)


@dataclass
class ImageEntry:
    """One image of the dataset. ``repeats`` may exceed the subset's for balanced regularization images.
    ``latents``/``latents_flipped``/``conditioning``: set by memory caching; ``cache_file``: by disk caching."""

    path: str
    caption: str
    group: int
    subset: int
    is_reg: bool
    repeats: int
    size: tuple[int, int]
    choice: BucketChoice
    latents: torch.Tensor | None = None
    latents_flipped: torch.Tensor | None = None
    conditioning: Conditioning | None = None
    cache_file: str | None = None


class SampleKey(NamedTuple):
    """What one sample of one step is: image ``index``, and where it sits (epoch, batch of the epoch, slot)."""

    index: int
    epoch: int
    batch: int
    slot: int


@dataclass
class Batch:
    """One training step's data (B samples, one bucket).

    ``latents`` [B, C, h, w]: the VAE's samples (not yet times ``vae.config.scaling_factor``) when latents are
    cached, else None and ``images`` [B, 3, H, W] in [-1, 1] is set. ``captions``: the processed texts.
    ``input_ids``: one [B, n, 77] tensor per tokenizer given to the dataset (empty without tokenizers);
    ``token_weights``: the same shapes with ``weighted_captions`` (``weighted.apply_token_weights``), else None.
    ``loss_weights`` [B]: 1, or ``prior_loss_weight`` for regularization images. SDXL conditioning, [B, 2] long:
    ``original_sizes_hw``, ``crop_top_lefts``, ``target_sizes_hw``.
    """

    images: torch.Tensor | None
    latents: torch.Tensor | None
    captions: list[str]
    input_ids: list[torch.Tensor]
    token_weights: list[torch.Tensor] | None
    loss_weights: torch.Tensor
    original_sizes_hw: torch.Tensor
    crop_top_lefts: torch.Tensor
    target_sizes_hw: torch.Tensor
    flipped: list[bool]
    paths: list[str]
    keys: list[SampleKey] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)


class TrainDataset(torch.utils.data.Dataset):
    """All images of one or more ``DatasetSpec``s (see the module doc). Indexed by ``SampleKey``."""

    def __init__(self, specs: DatasetSpec | Sequence[DatasetSpec], *, tokenizers: Sequence = (),
                 max_token_length: int | None = None, weighted_captions: bool = False, seed: int = 0,
                 reso_multiple: int = 64) -> None:
        self.specs = [specs] if isinstance(specs, DatasetSpec) else list(specs)
        if not self.specs:
            raise DatasetError("no datasets given (expected at least one dataset with subsets)")
        self.tokenizers = list(tokenizers)
        self.max_token_length = max_token_length
        self.weighted_captions = weighted_captions
        self.seed = seed
        self.subsets: list[SubsetSpec] = []
        self.image_counts: list[int] = []  # images found per subset (before repeats and reg balancing)
        self.entries: list[ImageEntry] = []
        self.tag_frequency: dict[str, dict[str, int]] = {}
        self.num_train_images = 0  # with repeats, as kohya's ss_num_train_images
        self.num_reg_images = 0
        for group, spec in enumerate(self.specs):
            self._add_group(group, spec, reso_multiple)
        if not self.entries:
            raise DatasetError("the dataset is empty: no training images (regularization images alone are not "
                               "used)")
        self._buckets: dict[tuple[int, tuple[int, int]], list[int]] = {}
        for i, entry in enumerate(self.entries):
            self._buckets.setdefault((entry.group, entry.choice.bucket), []).append(i)
        self._buckets = dict(sorted(self._buckets.items()))

    # --- building ------------------------------------------------------------------------------------------------
    def _add_group(self, group: int, spec: DatasetSpec, reso_multiple: int) -> None:
        if not spec.subsets:
            raise DatasetError(f"dataset {group}: no subsets (expected image_dir or metadata_file subsets)")
        selector, min_side = self._selector(group, spec, reso_multiple)
        seen = set()
        train: list[ImageEntry] = []
        reg: list[ImageEntry] = []
        for subset in spec.subsets:
            source = subset.metadata_file or os.path.abspath(subset.image_dir)
            if source in seen:
                raise DatasetError(f"{source}: listed twice in dataset {group}; merge the two subsets (or raise "
                                   "num_repeats)")
            seen.add(source)
            index = len(self.subsets)
            self.subsets.append(subset)
            images = subset_images(subset)
            self.image_counts.append(len(images))
            self._count_tags(subset, [im.caption for im in images])
            for im in images:
                size = image_size(im.path)
                choice = selector.select(*size)
                check_bucket(im.path, size, choice, min_side)
                entry = ImageEntry(im.path, im.caption, group, index, subset.is_reg, subset.num_repeats, size, choice)
                (reg if subset.is_reg else train).append(entry)
        n_train = sum(e.repeats for e in train)
        n_reg = sum(e.repeats for e in reg)
        self.num_train_images += n_train
        self.num_reg_images += n_reg
        self.entries += train + _balance_reg(reg, n_train)
        if n_reg > n_train:
            logger.warning("dataset %d: %d regularization images (with repeats) for %d training images: some are "
                           "not used", group, n_reg, n_train)

    def _selector(self, group: int, spec: DatasetSpec, multiple: int) -> tuple[BucketSelector, int]:
        w, h = spec.resolution
        if not spec.enable_bucket:
            if w % multiple or h % multiple:
                raise DatasetError(f"dataset {group}: resolution {w}x{h} must be a multiple of {multiple} on each "
                                   "side for this model")
            return BucketSelector([(w, h)]), 1
        if spec.bucket_reso_steps % multiple:
            raise DatasetError(f"dataset {group}: bucket_reso_steps {spec.bucket_reso_steps} must be a multiple of "
                               f"{multiple} for this model")
        if spec.bucket_no_upscale:
            return BucketSelector(None, max_area=w * h, steps=spec.bucket_reso_steps, no_upscale=True), \
                spec.min_bucket_reso
        resos = make_bucket_resolutions((w, h), spec.min_bucket_reso, spec.max_bucket_reso, spec.bucket_reso_steps)
        bad = [r for r in resos if r[0] % multiple or r[1] % multiple]
        if bad:
            raise DatasetError(f"dataset {group}: buckets {bad[:3]} are not multiples of {multiple}; make "
                               f"min_bucket_reso ({spec.min_bucket_reso}) and resolution multiples of "
                               f"bucket_reso_steps ({spec.bucket_reso_steps})")
        return BucketSelector(resos, steps=spec.bucket_reso_steps), 1

    def _count_tags(self, subset: SubsetSpec, captions: list[str]) -> None:
        # kohya's ss_tag_frequency: per folder (or metadata file) name, lower-cased comma-separated tags.
        name = os.path.basename(subset.metadata_file or subset.image_dir.rstrip("/\\"))
        counts = self.tag_frequency.setdefault(name, {})
        for caption in captions:
            for tag in caption.split(","):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1

    # --- order ---------------------------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return sum(math.ceil(sum(self.entries[i].repeats for i in members) / self.specs[g].batch_size)
                   for (g, _), members in self._buckets.items())

    def batches(self, epoch: int) -> list[list[SampleKey]]:
        """The batches of ``epoch``, in order: each bucket's samples (images times repeats) shuffled and cut into
        batches of its dataset's batch size, then all batches shuffled (kohya's order, from our own generator)."""
        rng = random.Random(f"order:{self.seed}:{epoch}")
        chunks: list[list[int]] = []
        for (group, _), members in self._buckets.items():
            pool = [i for i in members for _ in range(self.entries[i].repeats)]
            rng.shuffle(pool)
            size = self.specs[group].batch_size
            chunks += [pool[k: k + size] for k in range(0, len(pool), size)]
        rng.shuffle(chunks)
        return [[SampleKey(i, epoch, b, s) for s, i in enumerate(chunk)] for b, chunk in enumerate(chunks)]

    @property
    def bucket_info(self) -> dict:
        """kohya's ss_bucket_info: {"buckets": {i: {"resolution": (w, h), "count": n}}} with repeats."""
        out = {}
        for i, ((_, reso), members) in enumerate(self._buckets.items()):
            out[i] = {"resolution": reso, "count": sum(self.entries[m].repeats for m in members)}
        return {"buckets": out}

    @property
    def latent_cacheable(self) -> bool:
        """Latents can be cached unless a subset changes pixels per step (color_aug, random_crop)."""
        return not any(s.color_aug or s.random_crop for s in self.subsets)

    # --- samples -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: SampleKey) -> dict:
        entry = self.entries[key.index]
        subset = self.subsets[entry.subset]
        rng = random.Random(f"sample:{self.seed}:{key.epoch}:{key.batch}:{key.slot}")
        flipped = subset.flip_aug and rng.random() < 0.5
        image = latents = None
        if entry.latents is not None or entry.cache_file is not None:
            from .latent_cache import read_cached  # latent_cache imports this module

            latents, latents_flipped, conditioning = read_cached(entry)
            if flipped:
                latents, conditioning = latents_flipped, conditioning.flipped(entry.choice.resized)
        else:
            pixels = load_image(entry.path)
            if (pixels.shape[1], pixels.shape[0]) != entry.size:
                raise DatasetError(f"{entry.path}: the image changed size during training ({entry.size[0]}x"
                                   f"{entry.size[1]} -> {pixels.shape[1]}x{pixels.shape[0]})")
            pixels, conditioning = crop_to_bucket(pixels, entry.choice, rng, subset.random_crop)
            if subset.color_aug:
                pixels = color_aug(pixels, rng)
            if flipped:
                pixels, conditioning = flip(pixels), conditioning.flipped(entry.choice.resized)
            image = to_tensor(pixels)
        caption = process_caption(entry.caption, subset, rng, key.epoch)
        loss_weight = self.specs[entry.group].prior_loss_weight if entry.is_reg else 1.0
        return {"key": key, "image": image, "latents": latents, "caption": caption, "loss_weight": loss_weight,
                "conditioning": conditioning, "flipped": flipped, "path": entry.path}

    def collate(self, samples: list[dict]) -> Batch:
        """Samples of one batch -> a ``Batch`` (tokenizing the captions with the dataset's tokenizers)."""
        captions = [s["caption"] for s in samples]
        have_latents = [s["latents"] is not None for s in samples]
        if any(have_latents) and not all(have_latents):
            raise DatasetError("a batch mixes cached latents and images (cache all images or none)")
        input_ids, token_weights = [], None
        if self.tokenizers:
            if self.weighted_captions:
                from .weighted import tokenize_weighted

                pairs = [tokenize_weighted(t, captions, self.max_token_length) for t in self.tokenizers]
                input_ids, token_weights = [p[0] for p in pairs], [p[1] for p in pairs]
            else:
                from ..models.text import tokenize

                input_ids = [tokenize(t, captions, self.max_token_length) for t in self.tokenizers]
        cond = [s["conditioning"] for s in samples]
        return Batch(
            images=None if all(have_latents) else torch.stack([s["image"] for s in samples]),
            latents=torch.stack([s["latents"] for s in samples]) if all(have_latents) else None,
            captions=captions, input_ids=input_ids, token_weights=token_weights,
            loss_weights=torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32),
            original_sizes_hw=torch.tensor([c.original_size_hw for c in cond], dtype=torch.long),
            crop_top_lefts=torch.tensor([c.crop_top_left for c in cond], dtype=torch.long),
            target_sizes_hw=torch.tensor([c.target_size_hw for c in cond], dtype=torch.long),
            flipped=[s["flipped"] for s in samples], paths=[s["path"] for s in samples],
            keys=[s["key"] for s in samples])


def _balance_reg(reg: list[ImageEntry], n_train: int) -> list[ImageEntry]:
    """kohya's balancing: take reg images in order with their repeats until they reach ``n_train``; if one
    round is not enough, add one repeat per image per further round. Images beyond the count are left out."""
    used: list[ImageEntry] = []
    n = 0
    first_round = True
    while reg and n < n_train:
        for entry in reg:
            if first_round:
                used.append(entry)
                n += entry.repeats
            else:
                entry.repeats += 1
                n += 1
            if n >= n_train:
                break
        first_round = False
    return used


class BatchOrder(torch.utils.data.Sampler):
    """The batch sampler of a ``TrainDataset``: yields the keys of each batch of the current epoch from the
    current step. ``set_position(epoch, step)`` before iterating (a resume sets the step it stopped at)."""

    def __init__(self, dataset: TrainDataset) -> None:
        self.dataset = dataset
        self.epoch, self.step = 1, 0

    def set_position(self, epoch: int, step: int = 0) -> None:
        if epoch < 1:
            raise ValueError(f"epochs count from 1, not {epoch}")
        if not 0 <= step <= self.dataset.steps_per_epoch:
            raise ValueError(f"step {step} is outside epoch {epoch}'s {self.dataset.steps_per_epoch} steps")
        self.epoch, self.step = epoch, step

    def __iter__(self):
        return iter(self.dataset.batches(self.epoch)[self.step:])

    def __len__(self) -> int:
        return self.dataset.steps_per_epoch - self.step


def make_loader(dataset: TrainDataset, order: BatchOrder, *, max_workers: int = 8,
                persistent: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``order``'s batches. ``max_workers``: kohya's max_data_loader_n_workers (capped at
    the CPU count; 0 loads in the main process); ``persistent``: persistent_data_loader_workers (workers kept
    between epochs; the order still follows ``order.set_position``, which runs in the main process). Cache
    latents before making the loader: workers hold a copy of the dataset taken when they start."""
    workers = max(0, min(max_workers, os.cpu_count() or 1))
    return torch.utils.data.DataLoader(dataset, batch_sampler=order, collate_fn=dataset.collate,
                                       num_workers=workers, persistent_workers=persistent and workers > 0)
