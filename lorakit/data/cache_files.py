"""What the disk caches (latents, text-encoder outputs) share: the errors a damaged ``.npz`` raises, the check that
a file can be reused, names that keep two images of one stem (``a.png``, ``a.jpg``) from sharing a file, and the
clean-up of a killed run's temporaries."""

from __future__ import annotations

import os
import zipfile
from collections import Counter
from typing import Iterable

import numpy as np

from ..formats.atomic import remove_stale_temporaries

# np.load of a truncated or bit-flipped npz: a zip error (not an OSError), or a CRC error when an array is read
READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def reusable_cache_file(path: str, key: str | None, needed: Iterable[str]) -> bool:
    """Whether the ``.npz`` at ``path`` can be reused: it holds the arrays ``needed`` and, unless ``key`` is None
    (skip_cache_check: any readable file), the ``cache_key`` ``key``, with every array read once so that damaged
    data (a CRC error) is rebuilt when caching starts, not at the step that reads it."""
    if not os.path.isfile(path):
        return False
    try:
        with np.load(path) as npz:
            if not all(name in npz for name in needed):
                return False
            if key is None:
                return True
            if "cache_key" not in npz or str(npz["cache_key"]) != key:
                return False
            for name in npz.files:
                npz[name]
            return True
    except READ_ERRORS:  # damaged or not an npz: rebuild it
        return False


def cache_base(image_path: str, shared: frozenset[str] | set[str] = frozenset()) -> str:
    """The path a cache file name starts from: the image's path without its extension, or with it where another
    image of the dataset has the same stem (``shared``, from ``shared_stems``)."""
    return image_path if image_path in shared else os.path.splitext(image_path)[0]


def shared_stems(image_paths: Iterable[str]) -> set[str]:
    """The image paths whose stem (path without extension) another image path has too."""
    paths = set(image_paths)
    counts = Counter(os.path.splitext(p)[0] for p in paths)
    return {p for p in paths if counts[os.path.splitext(p)[0]] > 1}


def remove_stale_cache_temporaries(cache_paths: Iterable[str]) -> None:
    """The cache files' temporaries that a killed run left in their folders (cache files are written under a
    temporary name and renamed, so a kill leaves one there, in the user's dataset folder)."""
    for folder in sorted({os.path.dirname(p) or "." for p in cache_paths}):
        remove_stale_temporaries(folder)
