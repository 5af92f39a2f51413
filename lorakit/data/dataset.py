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

import numpy as np
import torch

from .buckets import BucketChoice, BucketSelector, check_bucket, make_bucket_resolutions
from .captions import process_caption
from .face_crop import crop_around_face, face_box
from .errors import DatasetError, NoValidationImages
from .folders import subset_images
from .images import image_size, load_image
from .spec import DatasetSpec, SubsetSpec
from .masks import alpha_to_mask, conditioning_mask, mask_images as _mask_images
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
    alpha_mask: torch.Tensor | None = None  # memory caching with alpha_mask: [H, W] of the unflipped crop
    mask_path: str | None = None  # the conditioning (mask) image with conditioning_data_dir
    face: tuple[int, int, int, int] | None = None  # face_crop_aug_range: (cx, cy, w, h) from the file name
    te_cache_file: str | None = None  # cache_text_encoder_outputs_to_disk: this caption's encoder outputs
    te_outputs: tuple[torch.Tensor, torch.Tensor | None] | None = None  # cache_text_encoder_outputs in memory


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
    ``original_sizes_hw``, ``crop_top_lefts``, ``target_sizes_hw``. ``masks`` [B, H, W] in [0, 1]: the loss
    mask at image size (alpha_mask, or conditioning_data_dir's R channel; 1 for samples without one), else None.
    ``text_hidden`` [B, S, D] / ``text_pooled`` [B, P]: the text encoders' outputs cached before training (from
    cache_text_encoder_outputs_to_disk files, or kept in memory by cache_text_encoder_outputs; pooled: SDXL
    only), else None.
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
    masks: torch.Tensor | None = None
    text_hidden: torch.Tensor | None = None
    text_pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.captions)


class TrainDataset(torch.utils.data.Dataset):
    """All images of one or more ``DatasetSpec``s (see the module doc). Indexed by ``SampleKey``."""

    def __init__(self, specs: DatasetSpec | Sequence[DatasetSpec], *, tokenizers: Sequence = (),
                 max_token_length: int | None = None, weighted_captions: bool = False, seed: int = 0,
                 reso_multiple: int = 64, validation: bool = False) -> None:
        """``validation``: the images ``validation_split`` holds out (once each, no regularization images),
        instead of the training images."""
        self.validation = validation
        self.specs = [specs] if isinstance(specs, DatasetSpec) else list(specs)
        if not self.specs:
            raise DatasetError("no datasets given (expected at least one dataset with subsets)")
        self.tokenizers = list(tokenizers)
        self.max_token_length = max_token_length
        self.weighted_captions = weighted_captions
        self.seed = seed
        self.subsets: list[SubsetSpec] = []
        self.image_counts: list[int] = []  # images found per subset (before repeats and reg balancing)
        self.subset_groups: list[int] = []  # the dataset (spec) index of each subset
        self.metadata_bucketed: list[bool] = []  # per dataset: trained at its metadata's train_resolution buckets
        self.entries: list[ImageEntry] = []
        self.tag_frequency: dict[str, dict[str, int]] = {}
        self.num_train_images = 0  # with repeats, as kohya's ss_num_train_images
        self.num_reg_images = 0
        # per dataset: (training, regularization) images with repeats, before the reg balancing (ss_datasets)
        self.group_image_counts: list[tuple[int, int]] = []
        # the optimizer steps of the run, for token_warmup_step (set_schedule; the trainer sets them)
        self.max_train_steps, self.gradient_accumulation_steps = 0, 1
        self._updates_per_epoch: int | None = None
        for group, spec in enumerate(self.specs):
            self._add_group(group, spec, reso_multiple)
        if not self.entries:
            if validation:
                raise NoValidationImages("validation_split holds out no image (too few images for the split)")
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
        seen = set()
        for subset in spec.subsets:
            source = subset.metadata_file or os.path.abspath(subset.image_dir)
            if source in seen:
                raise DatasetError(f"{source}: listed twice in dataset {group}; merge the two subsets (or raise "
                                   "num_repeats)")
            seen.add(source)
        subset_list = [(subset, subset_images(subset)) for subset in self._used_subsets(spec)]
        selector = _metadata_buckets(group, spec, reso_multiple, [im for _, ims in subset_list for im in ims])
        bucketed = spec.enable_bucket or selector is not None  # sd-scripts turns buckets on for metadata buckets
        self.metadata_bucketed.append(selector is not None)
        selector = selector or self._selector(group, spec, reso_multiple)
        train: list[ImageEntry] = []
        reg: list[ImageEntry] = []
        for subset, images in subset_list:
            if not images:  # an empty folder (warned about): left out, as sd-scripts leaves it out
                continue
            index = len(self.subsets)
            self.subsets.append(subset)
            self.subset_groups.append(group)
            sized = [(im, im.size or image_size(im.path)) for im in images]
            if spec.skip_image_resolution is not None:  # sd-scripts compares areas, at or below is skipped
                limit = spec.skip_image_resolution[0] * spec.skip_image_resolution[1]
                kept = [(im, size) for im, size in sized if size[0] * size[1] > limit]
                if len(kept) < len(sized):
                    logger.info("%s: %d images at or below skip_image_resolution %s left out", source,
                                len(sized) - len(kept), spec.skip_image_resolution)
                sized = kept
            if spec.validation_split > 0:
                sized = self._split(sized, spec, subset)
            self.image_counts.append(len(sized))
            # sd-scripts counts a metadata file's "tags" only (not its captions), a folder's whole captions
            self._count_tags(subset, [(im.tags or "") if subset.metadata_file else im.caption for im, _ in sized])
            masks = _mask_images(subset, [im.path for im, _ in sized])
            repeats = 1 if self.validation else subset.num_repeats
            for (im, size), mask_path in zip(sized, masks):
                choice = selector.select(*(im.train_resolution or size))
                if not bucketed and subset.random_crop and min(size[0] - spec.resolution[0],
                                                                         size[1] - spec.resolution[1]) >= 0:
                    # sd-scripts without buckets: random_crop cuts a resolution-sized window of the image at
                    # its own size (an image is not scaled there); scaled to cover, nothing would be left to move
                    choice = BucketChoice(tuple(spec.resolution), size)
                check_bucket(im.path, size, choice, spec.bucket_reso_steps)
                entry = ImageEntry(im.path, im.caption, group, index, subset.is_reg, repeats, size, choice,
                                   mask_path=mask_path)
                if subset.face_crop_aug_range is not None and not bucketed:  # sd-scripts: not with buckets
                    entry.face = face_box(im.path)
                (reg if subset.is_reg else train).append(entry)
        n_train = sum(e.repeats for e in train)
        n_reg = sum(e.repeats for e in reg)
        self.num_train_images += n_train
        self.num_reg_images += n_reg
        self.group_image_counts.append((n_train, n_reg))
        self.entries += train + _balance_reg(reg, n_train)
        if n_reg > n_train:
            logger.warning("dataset %d: %d regularization images (with repeats) for %d training images: some are "
                           "not used", group, n_reg, n_train)

    def _used_subsets(self, spec: DatasetSpec) -> list[SubsetSpec]:
        """sd-scripts' datasets: a subset with num_repeats 0 does not train (nor counts, nor shapes the buckets),
        but the validation dataset (repeats 1 there) still takes its held-out images."""
        if self.validation:
            return list(spec.subsets)
        for subset in spec.subsets:
            if subset.num_repeats < 1:
                key = "metadata_file" if subset.metadata_file else "image_dir"
                logger.warning("ignore subset with %s='%s': num_repeats is less than 1", key,
                               subset.metadata_file or subset.image_dir)
        return [subset for subset in spec.subsets if subset.num_repeats >= 1]

    def _split(self, sized: list, spec: DatasetSpec, subset: SubsetSpec) -> list:
        """sd-scripts' split_train_val: shuffle with validation_seed, hold out the last round(n * split) images.
        Regularization images all train. (sd-scripts keeps ceil(n * (1 - split)) for training, which can also
        train on a held-out image; here the two parts never overlap.)"""
        if subset.is_reg:
            return [] if self.validation else sized
        seed = spec.validation_seed if spec.validation_seed is not None else self.seed
        shuffled = list(sized)
        random.Random(seed).shuffle(shuffled)
        held_out = round(len(shuffled) * spec.validation_split)
        cut = len(shuffled) - held_out
        return shuffled[cut:] if self.validation else shuffled[:cut]

    def _selector(self, group: int, spec: DatasetSpec, multiple: int) -> BucketSelector:
        w, h = spec.resolution
        if not spec.enable_bucket:
            if w % multiple or h % multiple:
                raise DatasetError(f"dataset {group}: resolution {w}x{h} must be a multiple of {multiple} on each "
                                   "side for this model")
            return BucketSelector([(w, h)])
        steps = spec.bucket_reso_steps
        if steps % multiple:
            raise DatasetError(f"dataset {group}: bucket_reso_steps {steps} must be a multiple of {multiple} for "
                               "this model")
        if spec.bucket_no_upscale:  # each image's own size floored to the steps (sd-scripts ignores min/max here)
            logger.info("dataset %d: bucket_no_upscale: min_bucket_reso and max_bucket_reso are not used", group)
            return BucketSelector(None, max_area=w * h, steps=steps, no_upscale=True)
        # sd-scripts' adjust_min_max_bucket_reso_by_steps: min rounded down, max up, to the steps (min at least one
        # step: rounded down to 0 it divides by zero in sd-scripts)
        lo = max(spec.min_bucket_reso - spec.min_bucket_reso % steps, steps)
        hi = -(-spec.max_bucket_reso // steps) * steps
        for name, given, used in (("min_bucket_reso", spec.min_bucket_reso, lo),
                                  ("max_bucket_reso", spec.max_bucket_reso, hi)):
            if given != used:
                logger.warning("dataset %d: %s %d is not a multiple of bucket_reso_steps %d; %d is used", group,
                               name, given, steps, used)
        resos = make_bucket_resolutions((w, h), lo, hi, steps)
        bad = [r for r in resos if r[0] % multiple or r[1] % multiple]
        if bad:
            raise DatasetError(f"dataset {group}: buckets {bad[:3]} are not multiples of {multiple}; make "
                               f"resolution ({w}x{h}) a multiple of bucket_reso_steps ({steps})")
        return BucketSelector(resos, steps=steps)

    def _count_tags(self, subset: SubsetSpec, captions: list[str]) -> None:
        # kohya's ss_tag_frequency: per folder (or metadata file) name, lower-cased comma-separated tags.
        counts = self.tag_frequency.setdefault(self._tag_name(subset), {})
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
        return self._bucket_info(self._buckets.items())

    def _bucket_info(self, buckets) -> dict:
        return {"buckets": {i: {"resolution": reso, "count": sum(self.entries[m].repeats for m in members)}
                            for i, ((_, reso), members) in enumerate(buckets)}}

    def datasets_metadata(self) -> list[dict]:
        """sd-scripts' ss_datasets (written when a dataset config is used): per dataset its batch size, resolution,
        bucket settings, image counts, tag frequency and buckets, and per subset its counts and options."""
        out = []
        for group, spec in enumerate(self.specs):
            subsets = [i for i, g in enumerate(self.subset_groups) if g == group]
            names = [self._tag_name(self.subsets[i]) for i in subsets]
            meta = {
                "is_dreambooth": not any(self.subsets[i].metadata_file for i in subsets),
                "batch_size_per_device": spec.batch_size,
                "num_train_images": self.group_image_counts[group][0],
                "num_reg_images": self.group_image_counts[group][1],
                "resolution": tuple(spec.resolution) if spec.resolution is not None else None,
                "enable_bucket": bool(spec.enable_bucket or self.metadata_bucketed[group]),
                "min_bucket_reso": spec.min_bucket_reso,
                "max_bucket_reso": spec.max_bucket_reso,
                "tag_frequency": {n: self.tag_frequency.get(n, {}) for n in names},
                "bucket_info": self._bucket_info((k, v) for k, v in self._buckets.items() if k[0] == group),
                "subsets": [],
            }
            for i in subsets:
                sub = self.subsets[i]
                info = {"img_count": self.image_counts[i], "num_repeats": sub.num_repeats,
                        "color_aug": bool(sub.color_aug), "flip_aug": bool(sub.flip_aug),
                        "random_crop": bool(sub.random_crop), "shuffle_caption": bool(sub.shuffle_caption),
                        "keep_tokens": sub.keep_tokens, "keep_tokens_separator": sub.keep_tokens_separator,
                        "secondary_separator": sub.secondary_separator, "enable_wildcard": bool(sub.enable_wildcard),
                        "caption_prefix": sub.caption_prefix, "caption_suffix": sub.caption_suffix,
                        "resize_interpolation": sub.resize_interpolation}
                if sub.image_dir:  # sd-scripts' train_network.py: image_dir for both kinds when set
                    info["image_dir"] = os.path.basename(os.path.normpath(sub.image_dir))
                if sub.metadata_file:
                    info["metadata_file"] = os.path.basename(sub.metadata_file)
                else:
                    info.update(class_tokens=sub.class_tokens, is_reg=bool(sub.is_reg))
                meta["subsets"].append(info)
            out.append(meta)
        return out

    @staticmethod
    def _tag_name(subset: SubsetSpec) -> str:
        return os.path.basename(subset.metadata_file or subset.image_dir.rstrip("/\\"))

    @property
    def summary(self) -> str:
        """What debug_dataset says of the data before its batches."""
        return (f"{len(self.entries)} images, {self.num_train_images} training images with repeats, "
                f"{self.num_reg_images} regularisation images")

    @property
    def latent_cacheable(self) -> bool:
        """Latents can be cached unless a subset changes pixels per step (color_aug, random_crop, face crops)."""
        return not any(s.color_aug or s.random_crop for s in self.subsets) and not any(e.face for e in self.entries)

    def set_schedule(self, max_train_steps: int, gradient_accumulation_steps: int = 1) -> None:
        """The run's length, for token_warmup_step. Call before making the loader (workers copy the dataset)."""
        self.max_train_steps, self.gradient_accumulation_steps = max_train_steps, gradient_accumulation_steps

    def optimizer_step(self, key: SampleKey) -> int:
        """The optimizer steps done before ``key``'s batch is trained on (sd-scripts' global_step)."""
        if self._updates_per_epoch is None:
            self._updates_per_epoch = math.ceil(self.steps_per_epoch / self.gradient_accumulation_steps)
        return (key.epoch - 1) * self._updates_per_epoch + key.batch // self.gradient_accumulation_steps

    # --- samples -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: SampleKey) -> dict:
        entry = self.entries[key.index]
        subset = self.subsets[entry.subset]
        rng = random.Random(f"sample:{self.seed}:{key.epoch}:{key.batch}:{key.slot}")
        flipped = subset.flip_aug and rng.random() < 0.5
        image = latents = mask = None
        if entry.latents is not None or entry.cache_file is not None:
            from .latent_cache import read_cached, read_cached_mask  # latent_cache imports this module

            latents, latents_flipped, conditioning = read_cached(entry)
            if subset.alpha_mask:
                mask = read_cached_mask(entry)
                mask = mask.flip(1) if flipped else mask
            if flipped:
                latents, conditioning = latents_flipped, conditioning.flipped(entry.choice.resized)
        else:
            pixels = load_image(entry.path, alpha=subset.alpha_mask)
            if (pixels.shape[1], pixels.shape[0]) != entry.size:
                raise DatasetError(f"{entry.path}: the image changed size during training ({entry.size[0]}x"
                                   f"{entry.size[1]} -> {pixels.shape[1]}x{pixels.shape[0]})")
            resized = entry.choice.resized
            if entry.face is not None:
                pixels, conditioning, resized = crop_around_face(
                    pixels, entry.face, entry.choice.bucket, subset.face_crop_aug_range, rng, subset.random_crop,
                    subset.resize_interpolation)
            else:
                pixels, conditioning = crop_to_bucket(pixels, entry.choice, rng, subset.random_crop,
                                                      subset.resize_interpolation)
            if subset.alpha_mask:
                mask, pixels = alpha_to_mask(pixels), np.ascontiguousarray(pixels[..., :3])
            if subset.color_aug:
                pixels = color_aug(pixels, rng)
            if flipped:
                pixels, conditioning = flip(pixels), conditioning.flipped(resized)
                mask = None if mask is None else mask.flip(1)
            image = to_tensor(pixels)
        if entry.mask_path is not None:
            mask = conditioning_mask(entry.mask_path, entry.size, entry.choice, flipped)
        warmup = subset.token_warmup_step > 0 and not self.validation  # validation uses the full captions
        step = self.optimizer_step(key) if warmup else 1 << 62  # past any warmup
        caption = process_caption(entry.caption, subset, rng, key.epoch, step, self.max_train_steps)
        loss_weight = self.specs[entry.group].prior_loss_weight if entry.is_reg else 1.0
        text = entry.te_outputs
        if entry.te_cache_file is not None:
            from .text_cache import read_text_outputs

            text = read_text_outputs(entry.te_cache_file)
        return {"key": key, "image": image, "latents": latents, "caption": caption, "loss_weight": loss_weight,
                "conditioning": conditioning, "flipped": flipped, "path": entry.path, "mask": mask, "text": text}

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
        texts = [s.get("text") for s in samples]
        if any(t is not None for t in texts) and not all(t is not None for t in texts):
            raise DatasetError("a batch mixes cached text encoder outputs and captions (cache all images or none)")
        text_hidden = torch.stack([t[0] for t in texts]) if texts and texts[0] is not None else None
        text_pooled = (torch.stack([t[1] for t in texts]) if text_hidden is not None and texts[0][1] is not None
                       else None)
        return Batch(
            images=None if all(have_latents) else torch.stack([s["image"] for s in samples]),
            latents=torch.stack([s["latents"] for s in samples]) if all(have_latents) else None,
            captions=captions, input_ids=input_ids, token_weights=token_weights,
            loss_weights=torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32),
            original_sizes_hw=torch.tensor([c.original_size_hw for c in cond], dtype=torch.long),
            crop_top_lefts=torch.tensor([c.crop_top_left for c in cond], dtype=torch.long),
            target_sizes_hw=torch.tensor([c.target_size_hw for c in cond], dtype=torch.long),
            flipped=[s["flipped"] for s in samples], paths=[s["path"] for s in samples],
            keys=[s["key"] for s in samples], masks=_stack_masks(samples), text_hidden=text_hidden,
            text_pooled=text_pooled)


def _metadata_buckets(group: int, spec: DatasetSpec, multiple: int, images: list) -> BucketSelector | None:
    """sd-scripts' FineTuningDataset: when every metadata entry of the dataset has a train_resolution, those sizes
    are the buckets and each image trains at its own (scaled to it), whatever resolution and the bucket options
    say. None when some entry has none; then the dataset needs a resolution."""
    if not images or any(im.train_resolution is None for im in images):
        if spec.resolution is None:
            raise DatasetError(f"dataset {group}: resolution is required, as not every metadata entry has a "
                               "train_resolution (sd-scripts: \"if metadata doesn't have bucket info, resolution is "
                               "required\")")
        return None
    if spec.bucket_no_upscale:
        raise DatasetError(f"dataset {group}: bucket_no_upscale cannot be used when every metadata entry has a "
                           "train_resolution: the buckets are those sizes (as sd-scripts refuses it)")
    resos = sorted({im.train_resolution for im in images})
    bad = [r for r in resos if r[0] % multiple or r[1] % multiple]
    if bad:
        raise DatasetError(f"dataset {group}: train_resolution {bad[0][0]}x{bad[0][1]} in the metadata is not a "
                           f"multiple of {multiple} on each side for this model")
    logger.info("dataset %d: using the buckets of the metadata's train_resolution (%d sizes)", group, len(resos))
    return BucketSelector(resos)


def _stack_masks(samples: list[dict]) -> torch.Tensor | None:
    """[B, H, W] loss masks, or None when no sample has one; samples without one get all ones (no masking)."""
    masks = [s["mask"] for s in samples]
    shape = next((m.shape for m in masks if m is not None), None)
    if shape is None:
        return None
    return torch.stack([m if m is not None else torch.ones(shape) for m in masks])


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
