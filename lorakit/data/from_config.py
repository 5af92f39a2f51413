"""Dataset specs from the trainer's configuration: a parsed dataset TOML (``lorakit.train.dataset_config``'s
``DatasetGroupConfig``) or the ``train_data_dir`` / ``reg_data_dir`` options. Duck-typed on kohya's option names
(attributes or mapping keys), so this package does not import the trainer.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping

from .errors import DatasetError
from .folders import subsets_from_folders
from .spec import DatasetSpec, SubsetSpec

__all__ = ["specs_from_config", "specs_from_folders"]

_SUBSET_FIELDS = [f.name for f in fields(SubsetSpec)]
_DATASET_FIELDS = [f.name for f in fields(DatasetSpec) if f.name != "subsets"]
# training option names of dataset values, where they differ (sd-scripts' command line)
_TRAIN_NAME = {"batch_size": "train_batch_size"}


def _get(source: Any, name: str) -> Any:
    if isinstance(source, Mapping):
        return source.get(name)
    return getattr(source, name, None)


def _values(source: Any, names: list[str], renames: Mapping[str, str] = {}) -> dict[str, Any]:
    out = {}
    for name in names:
        value = _get(source, renames.get(name, name))
        if value is not None:
            out[name] = value
    return out


def specs_from_config(group: Any) -> list[DatasetSpec]:
    """``DatasetGroupConfig`` (``.datasets`` of ``DatasetConfig`` with ``.subsets``) -> ``DatasetSpec``s."""
    datasets = _get(group, "datasets")
    if not datasets:
        raise DatasetError("the dataset config has no [[datasets]]")
    specs = []
    for dataset in datasets:
        subsets = [SubsetSpec(**_values(s, _SUBSET_FIELDS)) for s in _get(dataset, "subsets")]
        specs.append(DatasetSpec(subsets, **_dataset_values(dataset)))
    return specs


def _dataset_values(source: Any, renames: Mapping[str, str] = {}) -> dict[str, Any]:
    """The dataset options of ``source``; a missing resolution stays None (a fine-tuning dataset then trains at
    its metadata's train_resolution buckets, or is refused), never the spec's default."""
    return {**_values(source, _DATASET_FIELDS, renames), "resolution": _get(source, "resolution")}


def specs_from_folders(options: Any) -> list[DatasetSpec]:
    """One ``DatasetSpec`` from ``train_data_dir`` (``N_concept`` folders) and ``reg_data_dir``, with the
    dataset and subset options of ``options`` (a TrainConfig or a mapping with kohya names). With ``in_json``
    (sd-scripts' fine-tuning dataset): one metadata_file subset of that JSON, its images in ``train_data_dir``
    (or named by full paths in the JSON), repeated ``dataset_repeats`` times."""
    train_dir = _get(options, "train_data_dir")
    in_json = _get(options, "in_json")
    if not train_dir and not in_json:
        raise DatasetError("no training images: set train_data_dir (a folder of N_concept folders) or "
                           "dataset_config")
    if _get(options, "resolution") is None and not in_json:
        raise DatasetError("resolution is required with train_data_dir (e.g. resolution = \"512\" or \"512,768\")")
    shared = _values(options, [n for n in _SUBSET_FIELDS
                               if n not in ("image_dir", "num_repeats", "is_reg", "class_tokens", "metadata_file")])
    if in_json:
        shared.pop("cache_info", None)  # a DreamBooth folder option; the JSON already lists the images
        subsets = [SubsetSpec(image_dir=train_dir or None, metadata_file=in_json,
                              num_repeats=_get(options, "dataset_repeats") or 1, **shared)]
        return [DatasetSpec(subsets, **_dataset_values(options, _TRAIN_NAME))]
    subsets = subsets_from_folders(train_dir, _get(options, "reg_data_dir") or None, **shared)
    return [DatasetSpec(subsets, **_dataset_values(options, _TRAIN_NAME))]
