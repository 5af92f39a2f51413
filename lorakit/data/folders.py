"""Where images and captions come from: kohya's ``train_data_dir`` / ``reg_data_dir`` layout of ``N_concept``
folders, image folders with caption files, and kohya metadata JSON files.

``train_data_dir`` holds one folder per concept named ``<repeats>_<class tokens>`` ("10_sks dog": each image
10 times per epoch, "sks dog" the caption of images without a caption file). A folder whose name does not start
with a number (a "backup" or "originals" folder beside the concepts) is left out with a warning that says how many
images it holds, as kohya leaves it out ("ignore directory without repeats"); hidden folders (".name") are skipped;
"0_x" folders are skipped with a warning, as kohya does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .captions import caption_for_image
from .errors import DatasetError
from .images import IMAGE_EXTENSIONS, list_images
from .spec import SubsetSpec

__all__ = ["parse_concept_folder", "subsets_from_folders", "SourceImage", "subset_images"]

logger = logging.getLogger(__name__)


def parse_concept_folder(path: str | os.PathLike) -> tuple[int, str]:
    """"10_sks dog" -> (10, "sks dog"): repeats and class tokens of a concept folder (kohya's split on "_")."""
    name = Path(path).name
    head, _, rest = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        raise DatasetError(f"{path}: a concept folder name must start with its number of repeats and an "
                           f"underscore, like 10_{name} (10 repeats, class tokens {name!r}); rename it or move "
                           "it out of the data folder") from None
    return repeats, rest


def subsets_from_folders(train_data_dir: str | os.PathLike, reg_data_dir: str | os.PathLike | None = None,
                         **options: Any) -> list[SubsetSpec]:
    """One ``SubsetSpec`` per concept folder of ``train_data_dir`` (and of ``reg_data_dir``, as is_reg).
    ``options``: other ``SubsetSpec`` fields shared by all (caption_extension, shuffle_caption, flip_aug...)."""
    subsets = []
    for root, is_reg in ((train_data_dir, False), (reg_data_dir, True)):
        if root is None:
            continue
        option = "reg_data_dir" if is_reg else "train_data_dir"
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: {option} is not a folder" + ("" if root.exists() else " (it does not exist)"))
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        concepts = [(folder, parsed) for folder in folders if (parsed := _concept_or_warn(folder)) is not None]
        if not concepts:
            loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
            hint = (f"; it holds images directly ({len(loose)}): move them into a sub-folder such as "
                    f"{root / '10_concept'}") if loose else ""
            raise DatasetError(f"{root}: {option} has no concept folders (expected sub-folders named "
                               f"<repeats>_<class tokens>, like 10_sks dog){hint}")
        for folder, (repeats, class_tokens) in concepts:
            if repeats < 1:
                logger.warning("%s: %d repeats, folder skipped", folder, repeats)
                continue
            subsets.append(SubsetSpec(image_dir=str(folder), num_repeats=repeats, is_reg=is_reg,
                                      class_tokens=class_tokens, **options))
        if not is_reg and not subsets:
            raise DatasetError(f"{root}: {option}: every concept folder has 0 repeats "
                               f"({', '.join(folder.name for folder, _ in concepts)}), so nothing trains; a folder "
                               "trains when named <repeats>_<class tokens> with repeats >= 1, like 10_sks dog")
    return subsets


def _concept_or_warn(folder: Path) -> tuple[int, str] | None:
    """(repeats, class tokens) of a concept folder; None, with sd-scripts' warning, for a folder without repeats."""
    try:
        return parse_concept_folder(folder)
    except DatasetError:
        images = len(list_images(folder))
        logger.warning("ignore directory without repeats / 繰り返し回数のないディレクトリを無視します: %s (%s; a concept "
                       "folder is named <repeats>_<class tokens>, like 10_%s)", folder,
                       f"its {images} image(s) are not trained" if images else "no images", folder.name)
        return None


@dataclass
class SourceImage:
    """One image file and its caption as written (before per-step processing)."""

    path: str
    caption: str
    size: tuple[int, int] | None = None  # (width, height) when known without opening the image (cache_info)
    tags: str | None = None  # a metadata entry's "tags" beside a caption: what its ss_tag_frequency counts
    # a metadata entry's "train_resolution" (width, height), as sd-scripts' prepare_buckets_latents.py writes it
    train_resolution: tuple[int, int] | None = None


def subset_images(subset: SubsetSpec) -> list[SourceImage]:
    """The images of ``subset`` with their captions. Errors name the folder or file: a missing folder, a folder
    without images, an unreadable caption, a metadata file that is missing, not JSON, or names a missing image."""
    if subset.metadata_file is not None:
        return _metadata_images(subset)
    folder = Path(subset.image_dir)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image_dir is not a folder" + ("" if folder.exists() else " (it does not exist)"))
    paths = list_images(folder)
    _warn_unreadable_entries(folder)
    if not paths:  # sd-scripts: "ignore subset ... no images found"; a dataset left with none is an error later
        logger.warning("%s: no images in this folder (looked for %s); the subset is left out", folder,
                       ", ".join(IMAGE_EXTENSIONS))
        return []
    if subset.cache_info:
        from .info_cache import cached_images

        return cached_images(subset, paths, lambda: _folder_images(subset, paths))
    return _folder_images(subset, paths)


def _warn_unreadable_entries(folder: Path) -> None:
    """Image names that are neither files nor folders (a link whose target was moved or deleted): list_images leaves
    them out, where sd-scripts would fail on them; the user is told which."""
    broken = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                    and not p.name.startswith(".") and not p.is_file() and not p.is_dir())
    if broken:
        logger.warning("%s: %d image(s) are not readable files (a link whose target is missing?) and are left out: "
                       "%s", folder, len(broken), ", ".join(broken[:3]) + (", ..." if len(broken) > 3 else ""))


def _folder_images(subset: SubsetSpec, paths: list[str]) -> list[SourceImage]:
    folder = Path(subset.image_dir)
    out, missing = [], []
    for path in paths:
        caption = caption_for_image(path, subset.caption_extension, all_lines=subset.enable_wildcard)
        stem_parts = os.path.splitext(path)[0].split("_")
        if caption is None and len(stem_parts) >= 5:  # sd-scripts: "name_x_y_w_h.png" (a face box) reads name.txt
            caption = caption_for_image("_".join(stem_parts[:-4]) + ".img", subset.caption_extension,
                                        all_lines=subset.enable_wildcard)
        if caption is None:
            missing.append(path)
            caption = subset.class_tokens or ""
        out.append(SourceImage(path, caption))
    if missing:
        fallback = f"the class tokens {subset.class_tokens!r}" if subset.class_tokens else "an empty caption"
        logger.warning("%s: %d image(s) have no %s caption file and use %s (first: %s)", folder, len(missing),
                       subset.caption_extension, fallback, missing[0])
    return out


def _metadata_images(subset: SubsetSpec) -> list[SourceImage]:
    path = subset.metadata_file
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: metadata_file not found") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: metadata_file is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: metadata_file is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(metadata, dict) or not metadata:
        raise DatasetError(f"{path}: metadata_file must be a non-empty JSON object {{image key: {{\"caption\": "
                           "..., \"tags\": ...}}}}")
    out = []
    for key, entry in metadata.items():
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: entry {key!r} must be an object with \"caption\" and/or \"tags\"")
        image = _find_image(key, subset.image_dir)
        if image is None:
            where = f" or in image_dir {subset.image_dir}" if subset.image_dir else ""
            raise DatasetError(f"{path}: image {key!r} not found (as a path{where}, with any of "
                               f"{', '.join(IMAGE_EXTENSIONS)})")
        caption, tags = entry.get("caption"), entry.get("tags")
        if caption is None:
            caption, tags = tags, None
        sep = subset.caption_separator
        if subset.enable_wildcard:  # sd-scripts: the tags as one line, added to every line of the caption
            if tags is not None:
                tags = tags.replace("\n", sep)
                caption = "\n".join(f"{line}{sep}{tags}" for line in caption.split("\n") if line.strip())
        elif tags:
            caption = caption + sep + tags
        out.append(SourceImage(image, caption or "", tags=tags or None,
                               train_resolution=_train_resolution(path, key, entry.get("train_resolution"))))
    return out


def _train_resolution(path: str, key: str, value) -> tuple[int, int] | None:
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise DatasetError(f"{path}: entry {key!r}: train_resolution must be [width, height] (two positive whole "
                           f"numbers), not {value!r}")
    return int(value[0]), int(value[1])


def _find_image(key: str, image_dir: str | None) -> str | None:
    """kohya's lookup: the key as a path, else ``image_dir/key`` with each image extension."""
    if os.path.isfile(key):
        return key
    if image_dir is None:
        return None
    base = os.path.join(image_dir, key)
    if os.path.isfile(base) and Path(base).suffix.lower() in IMAGE_EXTENSIONS:
        return base
    for ext in IMAGE_EXTENSIONS:
        for candidate in (base + ext, base + ext.upper()):
            if os.path.isfile(candidate):
                return candidate
    return None
