"""sd-scripts' ``dataset_class``: a user's class that serves whole batches, instead of image folders.

The option names a class by its dotted path, ``"package.module.ClassName"``; the module must be importable (on
``sys.path``: installed, or its folder on ``PYTHONPATH``). As sd-scripts' ``load_arbitrary_dataset`` does, the part
after the last dot is the class, and it is built as::

    ClassName(tokenizer, max_token_length, resolution, debug_dataset)

``tokenizer``: the model's CLIP tokenizer for SD1/SD2, the list of its two tokenizers for SDXL (lorakit's own,
``transformers.CLIPTokenizer``s); ``max_token_length``: None, 150 or 225; ``resolution``: (width, height) or None;
``debug_dataset``: bool. Subclass ``MinimalDataset`` below; a class written for sd-scripts runs if it relies only on
what ``MinimalDataset`` documents (lorakit calls nothing else). ``len(dataset)`` is the number of batches of an epoch and ``dataset[i]`` returns
batch ``i`` as a dict; ``custom_batches.py`` checks and converts it (see ``MinimalDataset.__getitem__``).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch

from .errors import DatasetError

__all__ = ["MinimalDataset", "load_dataset_class", "make_dataset"]


class MinimalDataset(torch.utils.data.Dataset):
    """The base of a ``dataset_class``, with sd-scripts' constructor and hooks. A subclass implements ``__len__``
    and ``__getitem__``, and may set the attributes that end up in the adapter's metadata:

    - ``num_train_images`` / ``num_reg_images``: ss_num_train_images / ss_num_reg_images (default 0);
    - ``bucket_info``: ss_bucket_info, a JSON-serialisable dict (default {});
    - ``tag_frequency``: ss_tag_frequency, {folder name: {tag: count}} (default {}).

    The trainer calls ``set_max_train_steps(n)`` once before training, and before each batch is fetched
    ``set_current_epoch(epoch)`` (counting from 1) and ``set_current_step(step)`` (the optimizer steps an
    uninterrupted run has done before that batch). With data-loader workers these calls reach the worker's copy
    of the dataset, just before it fetches the batch, so the values never lag behind.
    """

    def __init__(self, tokenizer, max_token_length: int | None, resolution, debug_dataset: bool = False) -> None:
        self.tokenizer = tokenizer
        self.tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
        self.max_token_length = max_token_length
        self.width, self.height = (None, None) if resolution is None else tuple(resolution)
        self.debug_dataset = debug_dataset
        self.num_train_images = 0  # update in the subclass: the metadata reports it
        self.num_reg_images = 0
        self.bucket_info: dict = {}
        self.tag_frequency: dict = {}
        self.current_epoch = 0
        self.current_step = 0
        self.max_train_steps = 0

    def is_latent_cacheable(self) -> bool:
        """False, as in sd-scripts: the batches are the class's own, so cache_latents cannot be used with it."""
        return False

    def __len__(self) -> int:
        """The number of batches of one epoch."""
        raise NotImplementedError("a dataset_class must implement __len__: the number of batches of an epoch")

    def __getitem__(self, index: int) -> dict:
        """Batch ``index`` (0 <= index < len(self); each index is asked for once per epoch, in an order shuffled
        per epoch from the training seed) as a dict of B samples:

        - ``"images"``: float tensor [B, 3, H, W] in [-1, 1] (``self.image_transforms`` makes one image), H and W
          multiples of 64 (SD1/SD2) or 32 (SDXL); or
        - ``"latents"``: float tensor [B, 4, H/8, W/8], the VAE's latents *before* ``vae.config.scaling_factor``
          (the trainer multiplies, as sd-scripts does); used instead of ``"images"`` when both are given.
        - ``"captions"``: list of B strings; and/or ``"input_ids"``: ids from ``self.get_input_ids`` stacked to
          [B, n, 77] (n = 1, 2, 3 for max_token_length None, 150, 225; SDXL: also ``"input_ids2"`` from the second
          tokenizer, or ``"input_ids_list"`` [ids1, ids2]). The ids are used when they have that form; otherwise the
          captions are tokenized by lorakit. ``weighted_captions`` always reads the captions.
        - ``"loss_weights"``: tensor [B] (default: ones);
        - optional: ``"image_keys"`` (B names, shown by debug_dataset); ``"alpha_masks"`` [B, H, W] in [0, 1]
          (the loss mask, as sd-scripts applies it); SDXL size conditioning ``"original_sizes_hw"``,
          ``"crop_top_lefts"``, ``"target_sizes_hw"`` ([B, 2] each; default: the image size, no crop).
        """
        raise NotImplementedError("a dataset_class must implement __getitem__: one whole batch as a dict")

    def set_current_epoch(self, epoch: int) -> None:
        self.current_epoch = epoch

    def set_current_step(self, step: int) -> None:
        self.current_step = step

    def set_max_train_steps(self, max_train_steps: int) -> None:
        self.max_train_steps = max_train_steps

    def get_input_ids(self, caption: str, tokenizer=None) -> torch.Tensor:
        """[n, 77] ids of ``caption`` (n as in ``__getitem__``), laid out as lorakit and sd-scripts train with
        them; ``tokenizer``: the first one by default."""
        from ..models.text import tokenize

        return tokenize(tokenizer if tokenizer is not None else self.tokenizers[0], [caption],
                        self.max_token_length)[0]

    def image_transforms(self, image) -> torch.Tensor:
        """A PIL image or an [H, W, 3] uint8 array -> [3, H, W] float32 in [-1, 1], exactly as lorakit's image
        folders are read (sd-scripts' IMAGE_TRANSFORMS: ToTensor and Normalize(0.5, 0.5))."""
        from .transforms import to_tensor

        return to_tensor(np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8))


def load_dataset_class(name: str) -> type:
    """The class ``name`` ("package.module.ClassName") names, imported. Raises DatasetError naming the option."""
    option = f"dataset_class {name!r}"
    module_name, _, attr = name.strip().rpartition(".")
    if not module_name or not attr:
        raise DatasetError(f"{option}: expected 'module.ClassName', the dotted path of a class (as sd-scripts' "
                           "--dataset_class)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise DatasetError(f"{option}: cannot import module '{module_name}' ({e}); is it installed, or its folder "
                           "on PYTHONPATH (e.g. PYTHONPATH=. for a module in the current folder)?") from e
    except Exception as e:  # the module itself fails while importing (SyntaxError, a missing dependency ...)
        raise DatasetError(f"{option}: importing module '{module_name}' failed: {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        raise DatasetError(f"{option}: module '{module_name}' has no '{attr}'")
    cls = getattr(module, attr)
    if not isinstance(cls, type):
        raise DatasetError(f"{option}: '{attr}' in module '{module_name}' is a {type(cls).__name__}, not a class")
    return cls


def make_dataset(cls: type, name: str, tokenizer: Any, max_token_length: int | None, resolution,
                 debug_dataset: bool):
    """``cls(tokenizer, max_token_length, resolution, debug_dataset)``, checked to have at least one batch."""
    option = f"dataset_class {name!r}"
    try:
        dataset = cls(tokenizer, max_token_length, resolution, debug_dataset)
    except Exception as e:
        raise DatasetError(f"{option}: {cls.__name__}(tokenizer, max_token_length, resolution, debug_dataset) "
                           f"failed: {type(e).__name__}: {e}") from e
    if not callable(getattr(dataset, "__getitem__", None)):
        raise DatasetError(f"{option}: {cls.__name__} has no __getitem__ (it must return one batch as a dict)")
    try:
        count = len(dataset)
    except Exception as e:  # NotImplementedError from MinimalDataset, TypeError without __len__
        raise DatasetError(f"{option}: len() of {cls.__name__} failed ({type(e).__name__}: {e}); __len__ must "
                           "return the number of batches of an epoch") from e
    if count < 1:
        raise DatasetError(f"{option}: {cls.__name__} has {count} batches; it must serve at least one")
    return dataset
