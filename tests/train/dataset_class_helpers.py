"""dataset_class test classes, imported by dotted path ("dataset_class_helpers.FolderBatches") once the tests put
this folder on sys.path. Each class reads a ``write_concept_folder`` folder (``folder``, set by the test)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from lorakit.data.custom_dataset import MinimalDataset

NOT_A_CLASS = 42


class FolderBatches(MinimalDataset):
    """Batch i = images i*B .. i*B+B-1 of ``folder`` in file-name order (B = ``per_batch``), with their .txt
    captions and the ids of those captions. Records the constructor's arguments and every hook call."""

    folder: str | None = None
    per_batch = 2
    calls: list = []

    def __init__(self, tokenizer, max_token_length, resolution, debug_dataset=False):
        super().__init__(tokenizer, max_token_length, resolution, debug_dataset)
        self.calls.append(("init", tokenizer, max_token_length, resolution, debug_dataset))
        self.paths = sorted(Path(self.folder).glob("*.png"))
        self.num_train_images = len(self.paths)

    def __len__(self):
        return len(self.paths) // self.per_batch

    def set_max_train_steps(self, max_train_steps):
        super().set_max_train_steps(max_train_steps)
        self.calls.append(("max_train_steps", max_train_steps))

    def paths_for(self, index):
        return self.paths[index * self.per_batch: (index + 1) * self.per_batch]

    def __getitem__(self, index):
        self.calls.append(("get", self.current_epoch, self.current_step, index))
        paths = self.paths_for(index)
        captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in paths]
        return {"images": torch.stack([self.image_transforms(Image.open(p)) for p in paths]),
                "captions": captions,
                "input_ids": torch.stack([self.get_input_ids(c) for c in captions]),
                "loss_weights": torch.ones(len(paths)),
                "image_keys": [p.name for p in paths]}


class FolderRunOrder(FolderBatches):
    """The batch a folder run trains on at each optimizer step: ``schedule[current_step]`` lists its file names
    (set by the test), whatever index the trainer asks for."""

    schedule: list | None = None

    def paths_for(self, index):
        return [Path(self.folder) / name for name in self.schedule[self.current_step]]


class FolderRunLatents(FolderRunOrder):
    """As FolderRunOrder, with ``latents[name]`` (the VAE's latents, set by the test) instead of the images."""

    latents: dict | None = None

    def __getitem__(self, index):
        batch = super().__getitem__(index)
        batch["latents"] = torch.stack([self.latents[name] for name in batch["image_keys"]])
        batch["images"] = None
        return batch


class FailingInit(MinimalDataset):
    def __init__(self, tokenizer, max_token_length, resolution, debug_dataset=False):
        raise ValueError("no data here")


class NoLength(MinimalDataset):
    """MinimalDataset's own __len__ and __getitem__ (not implemented)."""


class NoBatches(MinimalDataset):
    def __len__(self):
        return 0


class BrokenGetitem(NoBatches):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        raise KeyError("missing file")
