"""sd-scripts' ``cache_text_encoder_outputs_to_disk``: each image's caption encoded once by the frozen text encoders
and kept next to the image as ``<image stem>_te_outputs.npz`` (``<image name>_te_outputs.npz`` where two images
share a stem), reused across runs.

Arrays use sd-scripts' names: ``hidden_state1`` [S, D1] (the first text encoder's states; SD1/SD2: the only one),
and for SDXL ``hidden_state2`` [S, D2] and ``pool2`` [P]; float32. ``cache_key`` (lorakit's) is a SHA-256 of the
caption as trained on and of ``identity`` (the text encoders' weights, clip_skip, max_token_length): a file whose
key differs is rebuilt, so an edited caption or another model never reuses stale outputs (sd-scripts checks only
that the file exists).
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Callable

import numpy as np
import torch

from .cache_files import (READ_ERRORS, cache_base, remove_stale_cache_temporaries, reusable_cache_file,
                          shared_stems)
from .captions import process_caption
from .errors import DatasetError
from .latent_cache import _write_npz

__all__ = ["SUFFIX", "text_cache_path", "cache_text_outputs", "read_text_outputs"]

SUFFIX = "_te_outputs.npz"  # sd-scripts' TEXT_ENCODER_OUTPUTS_CACHE_SUFFIX
FORMAT = "lorakit-te-outputs-1"


def text_cache_path(image_path: str, shared: frozenset[str] | set[str] = frozenset()) -> str:
    """``shared``: image paths whose stem another image has (cache_files.shared_stems)."""
    return cache_base(image_path, shared) + SUFFIX


def _key(caption: str, identity: str) -> str:
    return hashlib.sha256(f"{FORMAT}\0{identity}\0{caption}".encode()).hexdigest()


def cache_text_outputs(dataset, encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]],
                       identity: str, *, batch_size: int = 1, split: int | None = None,
                       skip_check: bool = False, to_disk: bool = True) -> dict[str, int]:
    """Write (or reuse) every image's ``_te_outputs.npz`` and point its entry at it. ``encode(captions)`` ->
    (hidden [B, S, D], pooled [B, P] or None) from the frozen encoders; ``split``: SDXL's first encoder width
    (hidden_state1 = hidden[..., :split]). Captions must not change per step (the trainer refuses shuffling,
    dropout, warmup and wildcards with this cache). Returns {"encoded": n, "reused": m}.

    ``to_disk`` False (``cache_text_encoder_outputs`` alone): the outputs stay in memory (``entry.te_outputs``, on
    the CPU, float32 as the files hold them), each distinct caption encoded once and shared by its images."""
    if not to_disk:
        return _cache_in_memory(dataset, encode, batch_size)
    pending: list[tuple[object, str, str]] = []
    captions: list[str] = []
    reused = 0
    shared = shared_stems(e.path for e in dataset.entries)
    remove_stale_cache_temporaries(text_cache_path(e.path, shared) for e in dataset.entries)
    for entry in dataset.entries:
        caption = _trained_caption(dataset, entry)
        path, key = text_cache_path(entry.path, shared), _key(caption, identity)
        if reusable_cache_file(path, None if skip_check else key, ("hidden_state1",)):
            entry.te_cache_file, reused = path, reused + 1
            continue
        pending.append((entry, key, path))
        captions.append(caption)
    for (entry, key, path), hidden, pooled in _encoded(pending, captions, encode, batch_size):
        arrays = {"cache_key": np.array(key)}
        if split is None:
            arrays["hidden_state1"] = hidden.numpy()
        else:
            arrays["hidden_state1"] = hidden[:, :split].numpy()
            arrays["hidden_state2"] = hidden[:, split:].numpy()
        if pooled is not None:
            arrays["pool2"] = pooled.numpy()
        _write_npz(path, arrays)
        entry.te_cache_file = path
    return {"encoded": len(pending), "reused": reused}


def _cache_in_memory(dataset, encode, batch_size: int) -> dict[str, int]:
    by_caption: dict[str, list] = {}
    for entry in dataset.entries:
        by_caption.setdefault(_trained_caption(dataset, entry), []).append(entry)
    captions = list(by_caption)
    for caption, hidden, pooled in _encoded(captions, captions, encode, batch_size):
        # clones: a row view would keep the whole encoded batch alive
        outputs = (hidden.clone(), None if pooled is None else pooled.clone())
        for entry in by_caption[caption]:
            entry.te_outputs = outputs
    return {"encoded": len(captions), "reused": 0}


def _trained_caption(dataset, entry) -> str:
    """The caption as every step trains on it (the trainer refuses the options that change it per step)."""
    return process_caption(entry.caption, dataset.subsets[entry.subset], random.Random(0), 1)


def _encoded(items: list, captions: list[str], encode, batch_size: int):
    """(item, hidden [S, D], pooled [P] or None) for each item, its caption encoded in batches of ``batch_size``,
    float32 on the CPU."""
    step = max(1, batch_size)
    for start in range(0, len(items), step):
        with torch.no_grad():
            hidden, pooled = encode(captions[start: start + step])
        hidden = hidden.detach().float().cpu()
        pooled = None if pooled is None else pooled.detach().float().cpu()
        for i, item in enumerate(items[start: start + step]):
            yield item, hidden[i], None if pooled is None else pooled[i]


def read_text_outputs(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden [S, D], pooled [P] or None) from a ``_te_outputs.npz`` file."""
    try:
        with np.load(path) as npz:
            parts = [torch.from_numpy(npz[k]) for k in ("hidden_state1", "hidden_state2") if k in npz]
            pooled = torch.from_numpy(npz["pool2"]) if "pool2" in npz else None
            if not parts:
                raise KeyError("hidden_state1")
    except READ_ERRORS as e:
        raise DatasetError(f"{path}: text encoder output cache file cannot be read ({e}); delete it and cache "
                           "again") from None
    return torch.cat(parts, dim=-1), pooled
