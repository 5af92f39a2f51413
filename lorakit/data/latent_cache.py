"""Latent caching: each image encoded by the VAE once, kept in memory or in a ``.npz`` file reused across runs.

A disk cache file (``<image stem>_lorakit.npz`` next to the image (``<image name>_lorakit.npz`` where two images
share a stem), or ``<cache_dir>/<stem>-<path hash>.npz``)
stores the latents (and the flipped image's latents with ``flip_aug``), the SDXL conditioning of the crop, and
``cache_key``: a SHA-256 of the image file's bytes, its bucket and resized size, ``flip_aug``, the VAE's
identity (class, config, dtype and a hash of its weights) and this format's version. A file whose key differs is
rebuilt, so an edited image, a new resolution or bucket setting, or another VAE never reuses stale latents.
(kohya checks only the latent shape, so an edited image of the same size keeps its old latents.)

Latents are ``latent_dist.mean + std * noise`` with the noise seeded from the cache key (its first 15 hex digits;
plus one for the flipped image), so a cached file does
not depend on which images were batched together, and rebuilding it gives the same numbers. Images are grouped by
bucket into batches of at most ``vae_batch_size`` for encoding.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

import numpy as np
import torch

from ..formats.atomic import atomic_write
from ..formats.hashes import file_sha256
from .cache_files import READ_ERRORS, cache_base, remove_stale_cache_temporaries, reusable_cache_file, shared_stems
from .dataset import ImageEntry, TrainDataset
from .errors import DatasetError
from .fingerprint import module_fingerprint
from .images import load_image
from .masks import alpha_to_mask
from .transforms import Conditioning, crop_to_bucket, flip, to_tensor

__all__ = ["FORMAT", "cache_key", "cache_path", "cache_latents", "read_cached", "read_cached_mask",
           "encode_pixels"]

FORMAT = "lorakit-latents-1"


def cache_key(entry: ImageEntry, flip_aug: bool, vae_id: str, alpha_mask: bool = False,
              interpolation: str | None = None) -> str:
    settings = {"format": FORMAT, "image": file_sha256(entry.path), "bucket": list(entry.choice.bucket),
                "resized": list(entry.choice.resized), "flip_aug": bool(flip_aug), "vae": vae_id}
    if alpha_mask:  # added only when set, so that caches written without them stay valid
        settings["alpha_mask"] = True
    if interpolation is not None:
        settings["resize_interpolation"] = interpolation
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def cache_path(image_path: str, cache_dir: str | None = None, shared: frozenset[str] | set[str] = frozenset()) -> str:
    """``shared``: image paths whose stem another image has (cache_files.shared_stems); they keep their extension
    in the name."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    if cache_dir is None:
        return cache_base(image_path, shared) + "_lorakit.npz"
    tag = hashlib.sha256(os.path.abspath(image_path).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{stem}-{tag}.npz")


def _valid(path: str, key: str | None, alpha_mask: bool = False) -> bool:
    """Whether the file at ``path`` holds this key's latents; ``key`` None (skip_cache_check): any readable cache
    file with the arrays needed."""
    return reusable_cache_file(path, key, ("latents", "alpha_mask") if alpha_mask else ("latents",))


def encode_pixels(vae: torch.nn.Module, pixels: torch.Tensor, seeds: Iterable[int] | None = None) -> torch.Tensor:
    """Raw VAE latents (not scaled) of pixels [B, 3, H, W] in [-1, 1]: mean + std * noise, one seeded noise
    per image when ``seeds`` are given (else from torch's default generator)."""
    param = next(vae.parameters())
    with torch.no_grad():
        dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
        mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
    if seeds is None:
        noise = torch.randn(mean.shape)
    else:
        noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    return mean + std * noise


def _write_npz(path: str, arrays: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
            np.savez(f, **arrays)

    atomic_write(path, write)  # an interrupted run never leaves half a cache file


def cache_latents(dataset: TrainDataset, vae: torch.nn.Module, *, vae_batch_size: int = 1, to_disk: bool = False,
                  cache_dir: str | None = None, skip_check: bool = False) -> dict[str, int]:
    """Encode every image of ``dataset`` once (``cache_latents``); with ``to_disk`` (``cache_latents_to_disk``)
    reuse valid files and write the others. ``skip_check`` (sd-scripts' skip_cache_check): reuse any existing
    cache file without checking that it belongs to this image, bucket and VAE (no image hashing; a stale file is
    then trained on). Subsets with ``alpha_mask`` cache the mask too. Returns {"encoded": n, "reused": m}."""
    if not dataset.latent_cacheable:
        bad = [s.image_dir or s.metadata_file for s in dataset.subsets if s.color_aug or s.random_crop]
        raise DatasetError(f"cache_latents cannot be used with color_aug or random_crop (they change the pixels "
                           f"every step); subsets: {', '.join(bad)}")
    if vae_batch_size < 1:
        raise DatasetError(f"vae_batch_size must be >= 1, not {vae_batch_size}")
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    vae_id = module_fingerprint(vae)
    pending: list[tuple[ImageEntry, str, str]] = []
    reused = 0
    shared = shared_stems(e.path for e in dataset.entries)
    if to_disk:
        remove_stale_cache_temporaries(cache_path(e.path, cache_dir, shared) for e in dataset.entries)
    for entry in sorted(dataset.entries, key=lambda e: (e.choice.bucket[0] * e.choice.bucket[1], e.choice.bucket)):
        subset = dataset.subsets[entry.subset]
        path = cache_path(entry.path, cache_dir, shared) if to_disk else None
        if to_disk and skip_check and _valid(path, None, subset.alpha_mask):
            entry.cache_file, reused = path, reused + 1
            continue
        key = cache_key(entry, subset.flip_aug, vae_id, subset.alpha_mask, subset.resize_interpolation)
        if to_disk and _valid(path, key):
            entry.cache_file, reused = path, reused + 1
            continue
        pending.append((entry, key, path))

    batches, batch = [], []
    for item in pending:  # batches of one bucket, at most vae_batch_size images
        if batch and (batch[-1][0].choice.bucket != item[0].choice.bucket or len(batch) >= vae_batch_size):
            batches.append(batch)
            batch = []
        batch.append(item)
    if batch:
        batches.append(batch)

    for batch in batches:
        pixels, conds, masks = [], [], []
        for entry, _, _ in batch:
            subset = dataset.subsets[entry.subset]
            image, cond = crop_to_bucket(load_image(entry.path, alpha=subset.alpha_mask), entry.choice,
                                         interpolation=subset.resize_interpolation)
            masks.append(alpha_to_mask(image) if subset.alpha_mask else None)
            pixels.append(np.ascontiguousarray(image[..., :3]))
            conds.append(cond)
        seeds = [int(key[:15], 16) for _, key, _ in batch]
        latents = encode_pixels(vae, torch.stack([to_tensor(p) for p in pixels]), seeds)
        if torch.isnan(latents).any():
            raise DatasetError(f"NaN in the latents of {', '.join(e.path for e, _, _ in batch)} (a VAE in fp16 "
                               "overflows on some images: use no_half_vae)")
        flipped = [None] * len(batch)
        if any(dataset.subsets[e.subset].flip_aug for e, _, _ in batch):
            flipped = encode_pixels(vae, torch.stack([to_tensor(flip(p)) for p in pixels]), [s + 1 for s in seeds])
        for (entry, key, path), lat, lat_f, cond, mask in zip(batch, latents, flipped, conds, masks):
            if not dataset.subsets[entry.subset].flip_aug:
                lat_f = None
            if to_disk:
                arrays = {"latents": lat.numpy(), "original_size_hw": np.array(cond.original_size_hw),
                          "crop_top_left": np.array(cond.crop_top_left),
                          "target_size_hw": np.array(cond.target_size_hw), "cache_key": np.array(key)}
                if lat_f is not None:
                    arrays["latents_flipped"] = lat_f.numpy()
                if mask is not None:
                    arrays["alpha_mask"] = mask.numpy()
                _write_npz(path, arrays)
                entry.cache_file = path
            else:
                entry.latents, entry.latents_flipped, entry.conditioning = lat.clone(), lat_f, cond
                entry.alpha_mask = mask
    return {"encoded": len(pending), "reused": reused}


def read_cached_mask(entry: ImageEntry) -> torch.Tensor:
    """The cached [H, W] alpha mask (unflipped) of an entry of an alpha_mask subset."""
    if entry.latents is not None:
        return entry.alpha_mask
    try:
        with np.load(entry.cache_file) as npz:
            return torch.from_numpy(npz["alpha_mask"])
    except READ_ERRORS as e:
        raise DatasetError(f"{entry.cache_file}: the alpha mask of {entry.path} cannot be read from its latent cache "
                           f"({e}); delete the file and cache again") from None


def read_cached(entry: ImageEntry) -> tuple[torch.Tensor, torch.Tensor | None, Conditioning]:
    """(latents, flipped latents or None, conditioning) of a cached entry, from memory or its file."""
    if entry.latents is not None:
        return entry.latents, entry.latents_flipped, entry.conditioning
    try:
        with np.load(entry.cache_file) as npz:
            latents = torch.from_numpy(npz["latents"])
            flipped = torch.from_numpy(npz["latents_flipped"]) if "latents_flipped" in npz else None
            cond = Conditioning(tuple(int(v) for v in npz["original_size_hw"]),
                                tuple(int(v) for v in npz["crop_top_left"]),
                                tuple(int(v) for v in npz["target_size_hw"]))
    except READ_ERRORS as e:
        raise DatasetError(f"{entry.cache_file}: latent cache file of {entry.path} cannot be read ({e}); delete it "
                           "and cache again") from None
    return latents, flipped, cond
