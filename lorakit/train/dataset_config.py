"""sd-scripts' dataset TOML (`--dataset_config`, docs/config_README-en.md): parsed and validated, nothing loaded.

The file has `[general]`, then `[[datasets]]`, each with `[[datasets.subsets]]`. Keys are sd-scripts' names
(library/config_util.py ConfigSanitizer); an unknown key, or a key at a level that does not take it, is an error that
names where it is and suggests the closest name. A `.json` file with the same structure is read too; other
suffixes (`.yaml`, `.txt`) are refused, as sd-scripts refuses them.

What `parse_dataset_config` / `load_dataset_config` return (plain frozen dataclasses, every value resolved):

    DatasetGroupConfig
      source: str | None                    the file read (None for a dict)
      datasets: tuple[DatasetConfig, ...]
    DatasetConfig                           one [[datasets]]: subsets trained at one resolution / batch size
      kind: "dreambooth" | "finetuning"     finetuning when its subsets have metadata_file (never mixed)
      subsets: tuple[SubsetConfig, ...]
      resolution: (width, height)           from the dataset, [general] or the training option; required
      batch_size, enable_bucket, min_bucket_reso, max_bucket_reso, bucket_reso_steps, bucket_no_upscale,
      prior_loss_weight (from the training config), network_multiplier, validation_seed, validation_split,
      skip_image_resolution
    SubsetConfig                            one [[datasets.subsets]]: one image folder or one metadata file
      kind, image_dir, metadata_file, is_reg, class_tokens, num_repeats, caption_extension, shuffle_caption,
      keep_tokens, caption_dropout_rate, caption_dropout_every_n_epochs, caption_tag_dropout_rate, color_aug,
      flip_aug, random_crop, caption_separator, keep_tokens_separator, secondary_separator, enable_wildcard,
      caption_prefix, caption_suffix, alpha_mask, conditioning_data_dir, resize_interpolation, token_warmup_min,
      token_warmup_step, face_crop_aug_range, cache_info, and custom_attributes (not implemented yet: always at its
      default here).

Each value is the subset's own, else its dataset's, else [general]'s, else the training option of the same name
(train_batch_size for batch_size, dataset_repeats for num_repeats), else sd-scripts' default: the lookup order of
sd-scripts' BlueprintGenerator, so command-line data options act as a last [general]. Like sd-scripts, a subset
whose image_dir (dreambooth) or metadata_file (finetuning) repeats an earlier one in the same dataset is dropped. A
subset with num_repeats 0 is kept: it does not train, but validation_split holds out its images as sd-scripts'
validation dataset does; a dataset whose subsets all have num_repeats 0 is left out.
Paths are kept as written (sd-scripts reads them relative to the working directory).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from ..algos.options import OptionError, suggest
from .options import BY_NAME, Option, coerce, inert

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubsetConfig:
    kind: str
    image_dir: str | None = None
    metadata_file: str | None = None
    is_reg: bool = False
    class_tokens: str | None = None
    num_repeats: int = 1
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    caption_separator: str = ","
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    face_crop_aug_range: tuple[float, float] | None = None
    alpha_mask: bool = False
    cache_info: bool = False
    conditioning_data_dir: str | None = None
    custom_attributes: dict | None = None
    resize_interpolation: str | None = None


@dataclass(frozen=True)
class DatasetConfig:
    kind: str
    subsets: tuple[SubsetConfig, ...]
    resolution: tuple[int, int] | None = None
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    prior_loss_weight: float = 1.0
    network_multiplier: float = 1.0
    validation_seed: int | None = None
    validation_split: float = 0.0
    skip_image_resolution: tuple[int, int] | None = None


@dataclass(frozen=True)
class DatasetGroupConfig:
    datasets: tuple[DatasetConfig, ...]
    source: str | None = None


# keys of the file that are not training options too (the rest share the training option's kind and default)
_OWN = {o.name: o for o in (
    Option("image_dir", "path", None, "dataset", "folder of the subset's images"),
    Option("metadata_file", "path", None, "dataset", "fine-tuning metadata JSON of the subset"),
    Option("is_reg", "bool", False, "dataset", "the subset holds regularisation images"),
    Option("class_tokens", "str", None, "dataset", "caption of images without a caption file"),
    Option("num_repeats", "int", 1, "dataset", "repeats of each image per epoch (0: not trained on, but "
           "validation_split still holds out its images)", low=0),
    Option("batch_size", "int", 1, "dataset", "images per batch", low=1),
    Option("network_multiplier", "float", 1.0, "dataset", "network multiplier for the dataset", supported=False),
    Option("custom_attributes", "table", None, "dataset", "attributes passed to the trainer", supported=False),
)}
# sd-scripts' schema groups (config_util.py ConfigSanitizer)
_SUBSET_ASCENDABLE = {"color_aug", "face_crop_aug_range", "flip_aug", "num_repeats", "random_crop", "shuffle_caption",
                      "keep_tokens", "keep_tokens_separator", "secondary_separator", "caption_separator",
                      "enable_wildcard", "token_warmup_min", "token_warmup_step", "caption_prefix", "caption_suffix",
                      "custom_attributes", "resize_interpolation", "caption_dropout_every_n_epochs",
                      "caption_dropout_rate", "caption_tag_dropout_rate"}
_DREAMBOOTH_ASCENDABLE = {"caption_extension", "class_tokens", "cache_info"}
_SUBSET_ONLY = {"image_dir", "metadata_file", "is_reg", "alpha_mask", "conditioning_data_dir"}
_DREAMBOOTH_ONLY = _DREAMBOOTH_ASCENDABLE | {"is_reg"}
_DATASET_ONLY = {f.name for f in fields(DatasetConfig)} - {"kind", "subsets", "prior_loss_weight"}
_LEVEL_KEYS = {
    "general": _DATASET_ONLY | _SUBSET_ASCENDABLE | _DREAMBOOTH_ASCENDABLE,
    "dataset": _DATASET_ONLY | _SUBSET_ASCENDABLE | _DREAMBOOTH_ASCENDABLE | {"subsets"},
    "subset": _SUBSET_ASCENDABLE | _DREAMBOOTH_ASCENDABLE | _SUBSET_ONLY,
}
_LEVEL_NAMES = {"general": "[general]", "dataset": "[[datasets]]", "subset": "[[datasets.subsets]]"}
_TRAIN_NAME = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}


def _option(name: str) -> Option:
    return _OWN.get(name) or BY_NAME[name]


def _where(dataset: int | None = None, subset: int | None = None) -> str:
    if dataset is None:
        return "[general]"
    return f"[[datasets]] #{dataset + 1}" + ("" if subset is None else f" [[datasets.subsets]] #{subset + 1}")


def _check_table(table: Any, level: str, where: str) -> dict[str, Any]:
    """The table's values, typed; keys checked against what this level takes."""
    if not isinstance(table, Mapping):
        raise OptionError(f"dataset config {where}: expected a table, got {table!r}")
    typed: dict[str, Any] = {}
    allowed = _LEVEL_KEYS[level]
    for key, value in table.items():
        if key not in allowed:
            elsewhere = [lvl for lvl, keys in _LEVEL_KEYS.items() if key in keys]
            if elsewhere:
                raise OptionError(f"dataset config {where}: '{key}' cannot be set here; it belongs in "
                                  f"{' or '.join(_LEVEL_NAMES[lvl] for lvl in elsewhere)}")
            raise OptionError(f"dataset config {where}: unknown key '{key}'{suggest(key, allowed)}")
        if key == "subsets":
            continue
        opt = _option(key)
        try:
            typed[key] = coerce(opt, value)
        except OptionError as err:
            raise OptionError(f"dataset config {where}: {err}") from None
        if not opt.supported and not inert(opt, typed[key], {}):
            raise OptionError(f"dataset config {where}: '{key}' = {value!r} is an sd-scripts option lorakit does "
                              f"not support yet ({opt.help}); remove it")
    return typed



def _fallback_getter(train: Any):
    def get(name: str) -> Any:
        train_name = _TRAIN_NAME.get(name, name)
        if train is None:
            return None
        if isinstance(train, Mapping):
            return train.get(train_name)
        return getattr(train, train_name, None)
    return get


def _resolve(cls, layers: list[Mapping[str, Any]], fallback, fixed: dict[str, Any]):
    values = dict(fixed)
    for f in fields(cls):
        if f.name in values:
            continue
        for layer in layers:
            if layer.get(f.name) is not None:
                values[f.name] = layer[f.name]
                break
        else:
            value = fallback(f.name)
            if value is not None:
                values[f.name] = value
    return cls(**values)


def parse_dataset_config(data: Mapping[str, Any], train: Any = None, source: str | None = None) -> DatasetGroupConfig:
    """A parsed dataset TOML (a dict) -> DatasetGroupConfig. `train`: the TrainConfig (or a mapping) whose data
    options are the last fallback, as sd-scripts' command-line arguments are."""
    where_file = f" ({source})" if source else ""

    def here(dataset: int | None = None, subset: int | None = None) -> str:  # the file, then the table
        return (f"{source} " if source else "") + _where(dataset, subset)

    if not isinstance(data, Mapping):
        raise OptionError(f"dataset config{where_file}: expected a table, got {type(data).__name__}")
    for key in data:
        if key not in ("general", "datasets"):
            raise OptionError(f"dataset config{where_file}: unknown top-level key '{key}'"
                              f"{suggest(key, ['general', 'datasets'])}; expected [general] and [[datasets]]")
    general = _check_table(data.get("general", {}), "general", here())
    raw_datasets = data.get("datasets", [])
    if not isinstance(raw_datasets, list) or not raw_datasets:
        raise OptionError(f"dataset config{where_file}: needs at least one [[datasets]] with [[datasets.subsets]]")
    fallback = _fallback_getter(train)
    datasets = []
    for d, raw in enumerate(raw_datasets):
        dataset = _check_table(raw, "dataset", here(d))
        raw_subsets = raw.get("subsets", [])
        if not isinstance(raw_subsets, list) or not raw_subsets:
            raise OptionError(f"dataset config {here(d)}: needs at least one [[datasets.subsets]]")
        subsets_typed = [_check_table(s, "subset", here(d, i)) for i, s in enumerate(raw_subsets)]
        finetuning = ["metadata_file" in s for s in subsets_typed]
        if any(finetuning) and not all(finetuning):
            raise OptionError(f"dataset config {here(d)}: DreamBooth subsets (image_dir, no metadata_file) and "
                              "fine-tuning subsets (metadata_file) cannot be mixed in one dataset; split them into "
                              "separate [[datasets]]")
        kind = "finetuning" if all(finetuning) else "dreambooth"
        if kind == "finetuning":
            for level, table in [(here(d), dataset)] + [(here(d, i), s) for i, s in enumerate(subsets_typed)]:
                wrong = sorted(set(table) & _DREAMBOOTH_ONLY)
                if wrong:
                    raise OptionError(f"dataset config {level}: '{wrong[0]}' is for DreamBooth subsets (image_dir "
                                      "without metadata_file), not for a fine-tuning dataset")
        resolved_subsets = []
        for i, own in enumerate(subsets_typed):
            if kind == "dreambooth" and own.get("image_dir") is None:
                raise OptionError(f"dataset config {here(d, i)}: image_dir is required")
            resolved_subsets.append(_resolve(SubsetConfig, [own, dataset, general], fallback, {"kind": kind}))
        subsets = _distinct_subsets(resolved_subsets, here, d)
        if all(subset.num_repeats < 1 for subset in subsets):
            log.warning("dataset config %s: every subset has num_repeats 0; the dataset is left out", here(d))
            continue
        resolved = _resolve(DatasetConfig, [dataset, general], fallback,
                            {"kind": kind, "subsets": tuple(subsets)})
        _check_dataset(resolved, here(d))
        datasets.append(resolved)
    if not datasets:
        raise OptionError(f"dataset config{where_file}: every subset has num_repeats 0; no images to train")
    return DatasetGroupConfig(tuple(datasets), source)


def _identity(subset: SubsetConfig) -> str | None:
    return subset.image_dir if subset.kind == "dreambooth" else subset.metadata_file


def _distinct_subsets(subsets: list[SubsetConfig], here, d: int) -> list[SubsetConfig]:
    """The subsets without repeats of an earlier one (sd-scripts keeps the first). Subsets with num_repeats 0 stay:
    they do not train, but validation_split holds out their images (sd-scripts' validation dataset takes them);
    as sd-scripts' training dataset skips them before it looks for duplicates, they never hide a training one."""
    kept, seen = [], set()
    training_first = sorted(range(len(subsets)), key=lambda i: subsets[i].num_repeats < 1)
    for i in training_first:
        if _identity(subsets[i]) in seen:
            log.warning("dataset config %s: %s repeats an earlier subset of the dataset; ignored, as in "
                        "sd-scripts", here(d, i), _identity(subsets[i]))
            continue
        seen.add(_identity(subsets[i]))
        kept.append(i)
    return [subsets[i] for i in sorted(kept)]


def _check_dataset(dataset: DatasetConfig, where: str) -> None:
    if dataset.resolution is None and dataset.kind != "finetuning":
        # a fine-tuning dataset may train at its metadata's train_resolution buckets instead (checked when its
        # metadata is read, as sd-scripts' FineTuningDataset checks it)
        raise OptionError(f"dataset config {where}: resolution is required (in the dataset, [general], or the "
                          "training option resolution)")
    if dataset.enable_bucket:
        if dataset.min_bucket_reso > dataset.max_bucket_reso:
            raise OptionError(f"dataset config {where}: min_bucket_reso {dataset.min_bucket_reso} > max_bucket_reso "
                              f"{dataset.max_bucket_reso}")
        low, high = dataset.min_bucket_reso, dataset.max_bucket_reso
        if dataset.resolution is not None and not (low <= min(dataset.resolution) and max(dataset.resolution) <= high):
            raise OptionError(f"dataset config {where}: resolution {dataset.resolution} must lie within "
                              f"min_bucket_reso {dataset.min_bucket_reso} .. max_bucket_reso {dataset.max_bucket_reso}"
                              " (as sd-scripts requires)")


def resolved_settings(group: DatasetGroupConfig | None,
                      leave_out: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Every resolved value of the group's datasets and subsets (fields named in ``leave_out`` aside), under a name
    that says where it applies (``dataset_config [[datasets]] #1 [[datasets.subsets]] #2 shuffle_caption``), and how
    many datasets (0: no dataset_config) and subsets there are: what a resume compares, so that an edited file is
    noticed as a changed option is, while a reformatted or moved file of the same values is not. Paths are made
    absolute (the file keeps them as written, read from the working folder)."""
    datasets = group.datasets if group is not None else ()
    values: dict[str, Any] = {"dataset_config datasets": len(datasets)}
    for d, dataset in enumerate(datasets):
        values[f"dataset_config {_where(d)} subsets"] = len(dataset.subsets)
        tables = [(_where(d), dataset)] + [(_where(d, i), subset) for i, subset in enumerate(dataset.subsets)]
        for where, table in tables:
            for f in fields(table):
                if f.name != "subsets" and f.name not in leave_out:
                    values[f"dataset_config {where} {f.name}"] = _absolute(f.name, getattr(table, f.name))
    return values


def _absolute(name: str, value: Any) -> Any:
    option = _OWN.get(name) or BY_NAME.get(name)
    if option is not None and option.kind == "path" and isinstance(value, str):
        return os.path.abspath(os.path.expanduser(value))
    return value


# sd-scripts' load_user_config picks the parser by the suffix and refuses any other
_PARSERS = {".toml": ("TOML", tomllib.loads, tomllib.TOMLDecodeError),
            ".json": ("JSON", json.loads, json.JSONDecodeError)}


def read_dataset_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise OptionError(f"dataset config file {path}: is a folder, expected a .toml or .json file")
    if not path.is_file():
        raise OptionError(f"dataset config file not found: {path}")
    if path.suffix.lower() not in _PARSERS:
        raise OptionError(f"dataset config file {path}: not supported config file format (sd-scripts reads "
                          f"{' and '.join(_PARSERS)} files only)")
    kind, parse, error = _PARSERS[path.suffix.lower()]
    try:
        return parse(path.read_text(encoding="utf-8"))
    except error as err:
        raise OptionError(f"dataset config file {path}: not valid {kind} ({err})") from None


def load_dataset_config(path: str | Path, train: Any = None) -> DatasetGroupConfig:
    """Read and validate a dataset TOML (or JSON) file; `train` as in parse_dataset_config."""
    return parse_dataset_config(read_dataset_file(path), train, source=str(path))
