"""A ``dataset_class`` instance served like ``TrainDataset``: the same ``batches``/``BatchOrder``/``make_loader``
interface, and each of its batch dicts checked and converted into the ``Batch`` the training step consumes.

Order: each epoch asks for every batch index once, shuffled from (seed, epoch) — sd-scripts shuffles them too
(its DataLoader has shuffle=True) — so the order is the same in every process and after a resume. Each batch is
one training step's whole batch (``train_batch_size`` is not applied); with several processes it is the global
batch, split over them as lorakit splits its own batches, so its size must be divisible by the process count.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence

import torch

from .dataset import Batch, SampleKey
from .errors import DatasetError

__all__ = ["CustomBatches"]

logger = logging.getLogger(__name__)

_CONDITIONING = ("original_sizes_hw", "crop_top_lefts", "target_sizes_hw")  # sd-scripts' SDXL keys
_RANGE_SLACK = 1e-3  # images a hair outside [-1, 1] from rounding are fine


class CustomBatches(torch.utils.data.Dataset):
    """``dataset`` (built by ``custom_dataset.make_dataset``) indexed by ``SampleKey``: ``index`` is the class's
    batch index, ``batch`` its position in the epoch. ``tokenizers``: the model's, in pipeline order;
    ``reso_multiple``: ``dataset.pixel_multiple(model)``, as for TrainDataset; ``vae_scale_factor`` and
    ``latent_channels``: the model's VAE's. ``masked_loss``: every batch must bring ``"alpha_masks"``."""

    def __init__(self, dataset, name: str, *, tokenizers: Sequence, max_token_length: int | None = None,
                 weighted_captions: bool = False, seed: int = 0, reso_multiple: int = 64, vae_scale_factor: int = 8,
                 latent_channels: int = 4, masked_loss: bool = False) -> None:
        self.dataset = dataset
        self.name = name
        self.tokenizers = list(tokenizers)
        self.max_token_length = max_token_length
        self.weighted_captions = weighted_captions
        self.seed = seed
        self.pixel_multiple = reso_multiple
        self.vae_scale_factor = vae_scale_factor
        self.latent_channels = latent_channels
        self.masked_loss = masked_loss
        self.steps_per_epoch = len(dataset)
        # what the adapter's metadata reports (training_metadata reads the same names from TrainDataset)
        self.num_train_images = int(getattr(dataset, "num_train_images", 0) or 0)
        self.num_reg_images = int(getattr(dataset, "num_reg_images", 0) or 0)
        self.bucket_info = _dict_or_empty(getattr(dataset, "bucket_info", None))
        self.tag_frequency = _dict_or_empty(getattr(dataset, "tag_frequency", None))
        self.subsets, self.image_counts = [], []  # no image folders: ss_dataset_dirs is {}
        self.max_train_steps, self.gradient_accumulation_steps = 0, 1
        self._warned_ids = False

    @property
    def summary(self) -> str:
        return (f"dataset_class {self.name}: {self.num_train_images} training images, {self.num_reg_images} "
                "regularisation images (as the class reports them)")

    # --- order (TrainDataset's interface, for BatchOrder and the trainer) ---------------------------------------
    def batches(self, epoch: int) -> list[list[SampleKey]]:
        """The batches of ``epoch`` in order, one key each: every index once, shuffled from (seed, epoch)."""
        indices = list(range(self.steps_per_epoch))
        random.Random(f"custom-order:{self.seed}:{epoch}").shuffle(indices)
        return [[SampleKey(index, epoch, position, 0)] for position, index in enumerate(indices)]

    def set_schedule(self, max_train_steps: int, gradient_accumulation_steps: int = 1) -> None:
        """The run's length; passed on to the class's ``set_max_train_steps``. Call before iterating the loader."""
        self.max_train_steps, self.gradient_accumulation_steps = max_train_steps, gradient_accumulation_steps
        if hasattr(self.dataset, "set_max_train_steps"):
            self.dataset.set_max_train_steps(max_train_steps)

    def optimizer_step(self, key: SampleKey) -> int:
        """The optimizer steps an uninterrupted run has done before ``key``'s batch (sd-scripts' global_step)."""
        updates_per_epoch = math.ceil(self.steps_per_epoch / self.gradient_accumulation_steps)
        return (key.epoch - 1) * updates_per_epoch + key.batch // self.gradient_accumulation_steps

    # --- batches ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.steps_per_epoch

    def __getitem__(self, key: SampleKey) -> Batch:
        dataset = self.dataset
        if hasattr(dataset, "set_current_epoch"):  # sd-scripts' collator sets both before every batch
            dataset.set_current_epoch(key.epoch)
        if hasattr(dataset, "set_current_step"):
            dataset.set_current_step(self.optimizer_step(key))
        try:
            raw = dataset[key.index]
        except Exception as e:
            raise DatasetError(f"dataset_class {self.name!r}: batch {key.index}: __getitem__ failed: "
                               f"{type(e).__name__}: {e}") from e
        return self.to_batch(raw, key)

    @staticmethod
    def collate(batches: list[Batch]) -> Batch:
        return batches[0]  # BatchOrder yields one key per batch: the class already made the whole batch

    def to_batch(self, raw, key: SampleKey) -> Batch:
        """The class's dict for ``key`` -> a ``Batch``, or a DatasetError saying what is wrong with it."""
        where = f"dataset_class {self.name!r}: batch {key.index}"
        if not isinstance(raw, Mapping):
            raise DatasetError(f"{where}: __getitem__ returned a {type(raw).__name__}; expected a dict of one whole "
                               "batch ('images' or 'latents', 'captions' and/or 'input_ids', 'loss_weights')")
        images, latents = self._pixels(raw, where)
        n = (latents if latents is not None else images).shape[0]
        height, width = ((images.shape[2], images.shape[3]) if latents is None else
                         (latents.shape[2] * self.vae_scale_factor, latents.shape[3] * self.vae_scale_factor))
        captions, input_ids, token_weights = self._text(raw, n, where)
        sizes = {name: self._size_conditioning(raw, name, n, where) for name in _CONDITIONING}
        keys = raw.get("image_keys")
        if keys is not None and (isinstance(keys, str) or not isinstance(keys, Sequence) or len(keys) != n):
            raise DatasetError(f"{where}: 'image_keys' must be a list of {n} names (one per sample)")
        return Batch(
            images=images, latents=latents, captions=captions, input_ids=input_ids, token_weights=token_weights,
            loss_weights=self._loss_weights(raw, n, where),
            original_sizes_hw=_or_rows(sizes["original_sizes_hw"], (height, width), n),
            crop_top_lefts=_or_rows(sizes["crop_top_lefts"], (0, 0), n),
            target_sizes_hw=_or_rows(sizes["target_sizes_hw"], (height, width), n),
            flipped=[False] * n,
            paths=[str(k) for k in keys] if keys is not None else [f"{self.name}[{key.index}] #{i}" for i in range(n)],
            keys=[SampleKey(key.index, key.epoch, key.batch, slot) for slot in range(n)],
            masks=self._masks(raw, n, where))

    def _pixels(self, raw: Mapping, where: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        latents, images = raw.get("latents"), raw.get("images")
        if latents is not None:  # sd-scripts uses the latents whenever they are given
            latents = _float_tensor(latents, "latents", where)
            step = self.pixel_multiple // self.vae_scale_factor
            if latents.ndim != 4 or latents.shape[1] != self.latent_channels or latents.shape[2] % step \
                    or latents.shape[3] % step:
                raise DatasetError(f"{where}: 'latents' has shape {tuple(latents.shape)}; expected [B, "
                                   f"{self.latent_channels}, h, w] with h and w multiples of {step} (the VAE's "
                                   "latents of images whose sides are multiples of "
                                   f"{self.pixel_multiple}, before scaling_factor)")
            if latents.shape[0] == 0:
                raise DatasetError(f"{where}: the batch holds no samples")
            return None, latents
        if images is None:
            raise DatasetError(f"{where}: the batch has neither 'images' nor 'latents'")
        images = _float_tensor(images, "images", where)
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % self.pixel_multiple \
                or images.shape[3] % self.pixel_multiple:
            raise DatasetError(f"{where}: 'images' has shape {tuple(images.shape)}; expected [B, 3, H, W] with H and "
                               f"W multiples of {self.pixel_multiple} for this model")
        if images.shape[0] == 0:
            raise DatasetError(f"{where}: the batch holds no samples")
        low, high = float(images.min()), float(images.max())
        if low < -1 - _RANGE_SLACK or high > 1 + _RANGE_SLACK:
            raise DatasetError(f"{where}: 'images' values lie in [{low:g}, {high:g}]; expected [-1, 1] (uint8 / 127.5 "
                               "- 1, as MinimalDataset.image_transforms makes them)")
        return images, None

    def _text(self, raw: Mapping, n: int, where: str):
        """(captions, input_ids per tokenizer, token_weights): the class's ids when they fit, else the captions
        tokenized here."""
        captions = raw.get("captions")
        if captions is not None:
            if isinstance(captions, str) or not isinstance(captions, Sequence) or len(captions) != n \
                    or not all(isinstance(c, str) for c in captions):
                raise DatasetError(f"{where}: 'captions' must be a list of {n} strings (one per sample)")
            captions = list(captions)
        if self.weighted_captions:  # sd-scripts reads the captions' (word:1.2) weights, never the ids
            if captions is None:
                raise DatasetError(f"{where}: weighted_captions needs 'captions' in every batch")
            from .weighted import tokenize_weighted

            pairs = [tokenize_weighted(t, captions, self.max_token_length) for t in self.tokenizers]
            return captions, [p[0] for p in pairs], [p[1] for p in pairs]
        ids, problem = self._given_ids(raw, n)
        if ids is not None:
            return (captions if captions is not None else [""] * n), ids, None
        if captions is None:
            raise DatasetError(f"{where}: {problem}, and the batch has no 'captions' to tokenize instead")
        if problem != "no 'input_ids'" and not self._warned_ids:
            logger.warning("%s: %s; its captions are tokenized instead", where, problem)
            self._warned_ids = True
        from ..models.text import tokenize

        return captions, [tokenize(t, captions, self.max_token_length) for t in self.tokenizers], None

    def _given_ids(self, raw: Mapping, n: int) -> tuple[list[torch.Tensor] | None, str]:
        """The class's ids as [B, chunks, 77] per tokenizer, or (None, what is wrong with them)."""
        from ..models.text import CONTEXT, chunk_count

        if raw.get("input_ids_list") is not None:  # newer sd-scripts: one tensor per tokenizer
            given = raw["input_ids_list"]
            given = list(given) if isinstance(given, (list, tuple)) else [given]
        elif raw.get("input_ids") is not None:
            given = [raw["input_ids"]] + ([raw["input_ids2"]] if raw.get("input_ids2") is not None else [])
        else:
            return None, "no 'input_ids'"
        if len(given) != len(self.tokenizers):
            return None, (f"{len(given)} input_ids tensor(s) for the model's {len(self.tokenizers)} tokenizer(s) "
                          "(SDXL: 'input_ids' and 'input_ids2')")
        chunks = chunk_count(self.max_token_length)
        ids = []
        for tensor in given:
            if not isinstance(tensor, torch.Tensor) or tensor.is_floating_point() or tensor.is_complex() \
                    or tensor.ndim < 2 or tensor.shape[0] != n or tensor.numel() != n * chunks * CONTEXT:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                return None, (f"'input_ids' {shape} are not integer ids of shape [{n}, {chunks}, {CONTEXT}] "
                              f"(max_token_length {self.max_token_length})")
            ids.append(tensor.reshape(n, chunks, CONTEXT).long())
        return ids, ""

    @staticmethod
    def _loss_weights(raw: Mapping, n: int, where: str) -> torch.Tensor:
        weights = raw.get("loss_weights")
        if weights is None:
            return torch.ones(n, dtype=torch.float32)
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape != (n,):
            raise DatasetError(f"{where}: 'loss_weights' has shape {tuple(weights.shape)}; expected [{n}] (one "
                               "weight per sample)")
        return weights

    @staticmethod
    def _size_conditioning(raw: Mapping, name: str, n: int, where: str) -> torch.Tensor | None:
        value = raw.get(name)
        if value is None:
            return None
        value = torch.as_tensor(value)
        if value.shape != (n, 2):
            raise DatasetError(f"{where}: '{name}' has shape {tuple(value.shape)}; expected [{n}, 2] (height, width "
                               "or top, left per sample)")
        return value.long()

    def _masks(self, raw: Mapping, n: int, where: str) -> torch.Tensor | None:
        masks = raw.get("alpha_masks")
        if masks is None:
            if self.masked_loss:
                raise DatasetError(f"{where}: masked_loss needs 'alpha_masks' ([B, H, W] in [0, 1]) in every batch")
            return None
        masks = _float_tensor(masks, "alpha_masks", where)
        if masks.ndim != 3 or masks.shape[0] != n:
            raise DatasetError(f"{where}: 'alpha_masks' has shape {tuple(masks.shape)}; expected [{n}, H, W]")
        return masks


def _float_tensor(value, name: str, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise DatasetError(f"{where}: '{name}' is {kind}; expected a floating-point torch tensor")
    if not torch.isfinite(value).all():
        raise DatasetError(f"{where}: '{name}' holds NaN or infinite values")
    return value.detach().float().contiguous()


def _or_rows(value: torch.Tensor | None, row: tuple[int, int], n: int) -> torch.Tensor:
    return value if value is not None else torch.tensor([list(row)] * n, dtype=torch.long)


def _dict_or_empty(value) -> dict:
    return dict(value) if isinstance(value, Mapping) else {}
