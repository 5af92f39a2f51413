"""What a dataset is made of, as plain typed values: one ``DatasetSpec`` (batch size, resolution, buckets) holding
``SubsetSpec``s (a folder or metadata file and how its images and captions are treated).

Field names are kohya sd-scripts' option names, so a parsed dataset TOML (``lorakit.train.dataset_config``) or
the command-line ``train_data_dir`` layout maps onto them one to one (``from_config.py``). Values are checked
here, once; an error names the option.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .errors import DatasetError
from .resize import check_interpolation

__all__ = ["CaptionOptions", "SubsetSpec", "DatasetSpec", "parse_resolution"]


def _check_rate(owner: str, name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise DatasetError(f"{owner}: {name} must be between 0 and 1, not {value!r}")


@dataclass
class CaptionOptions:
    """How a caption is turned into the text of one training step (``captions.process_caption``)."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1  # tags (after keep_tokens) used at step 0 ...
    token_warmup_step: float = 0.0  # ... growing to all at this step (< 1: a ratio of max_train_steps; 0: off)

    def check(self, owner: str) -> None:
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            _check_rate(owner, name, getattr(self, name))
        if isinstance(self.token_warmup_step, bool) or not float(self.token_warmup_step) >= 0:
            raise DatasetError(f"{owner}: token_warmup_step must be a number >= 0 (steps, or a ratio of "
                               f"max_train_steps below 1), not {self.token_warmup_step!r}")
        for name in ("keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DatasetError(f"{owner}: {name} must be a whole number >= 0, not {value!r}")
        if not self.caption_separator:
            raise DatasetError(f"{owner}: caption_separator must not be empty")

    def caption_options(self) -> "CaptionOptions":
        """Just the caption fields (a ``SubsetSpec`` is also a ``CaptionOptions``)."""
        return CaptionOptions(**{f.name: getattr(self, f.name) for f in fields(CaptionOptions)})


@dataclass
class SubsetSpec(CaptionOptions):
    """One folder of images (``image_dir``) or one kohya metadata JSON (``metadata_file``, fine-tuning style).

    ``num_repeats``: how many times each image appears per epoch (0: not trained on, only validated with
    ``validation_split``). ``is_reg``: regularization images (their loss
    is weighted by ``prior_loss_weight`` and their repeats are balanced against the training images).
    ``class_tokens``: the caption of an image that has no caption file. ``caption_extension``: kohya's default
    is ".caption"; ".txt" is the common choice.
    """

    image_dir: str | None = None
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    metadata_file: str | None = None
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    resize_interpolation: str | None = None  # resize.INTERPOLATIONS; None: box shrinking, Lanczos enlarging
    alpha_mask: bool = False  # mask the loss with each image's alpha channel
    conditioning_data_dir: str | None = None  # mask images (same file stems) for masked_loss
    face_crop_aug_range: Any = None  # (low, high): face size / crop side; faces from "name_x_y_w_h" file names
    cache_info: bool = False  # keep image sizes and captions in <image_dir>/metadata_cache.json

    def __post_init__(self) -> None:
        owner = f"subset {self.image_dir or self.metadata_file}"
        if self.face_crop_aug_range is not None:
            self.face_crop_aug_range = _face_range(owner, self.face_crop_aug_range)
        check_interpolation(self.resize_interpolation, f"{owner}: resize_interpolation")
        if self.conditioning_data_dir is not None and self.random_crop:
            # sd-scripts' ControlNetDataset refuses it too: the mask must be cut where the image is
            raise DatasetError(f"{owner}: conditioning_data_dir (mask images) cannot be used with random_crop")
        if self.image_dir is None and self.metadata_file is None:
            raise DatasetError("a subset needs image_dir (a folder of images) or metadata_file (a kohya metadata "
                               "JSON); neither was given")
        # 0: the subset does not train but validation_split still holds out its images (sd-scripts)
        if isinstance(self.num_repeats, bool) or not isinstance(self.num_repeats, int) or self.num_repeats < 0:
            raise DatasetError(f"{owner}: num_repeats must be a whole number >= 0, not {self.num_repeats!r}")
        if self.is_reg and self.metadata_file is not None:
            raise DatasetError(f"{owner}: is_reg applies to image folders, not to metadata_file subsets")
        if self.caption_extension and not self.caption_extension.startswith("."):
            self.caption_extension = "." + self.caption_extension  # kohya accepts "txt" for ".txt"
        self.check(owner)


def _face_range(owner: str, value: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in (value.split(",") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        low = high = -1.0
    if not 0 < low <= high:
        raise DatasetError(f"{owner}: face_crop_aug_range must be two numbers 0 < low <= high (the face's size "
                           f"relative to the crop, e.g. 2.0,4.0), not {value!r}")
    return low, high


def parse_resolution(value: Any, option: str = "resolution") -> tuple[int, int]:
    """512, "512", "512,768", (512, 768) -> (width, height)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise DatasetError(f"{option} must be a size like 512 or 512,768 (width,height), not {value!r}") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        numbers = [value]
    elif isinstance(value, (tuple, list)):
        numbers = list(value)
    else:
        raise DatasetError(f"{option} must be a size like 512 or 512,768 (width,height), not {value!r}")
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in numbers):
        raise DatasetError(f"{option} must be one or two positive whole numbers (width,height), not {value!r}")
    return numbers[0], numbers[1]


@dataclass
class DatasetSpec:
    """One kohya "dataset": subsets sharing a batch size, a resolution and bucket settings.

    ``resolution``: the training size (width, height); with ``enable_bucket`` the bucket area. None only for
    a fine-tuning dataset whose metadata entries all have ``train_resolution``: each image then trains at its own
    (sd-scripts' FineTuningDataset uses those buckets whenever every entry has one, resolution given or not). Buckets:
    ``min_bucket_reso``/``max_bucket_reso`` bound each side, ``bucket_reso_steps`` is the size step (a multiple
    of the model's pixel multiple: 64 for SD1/SD2, 32 for SDXL), ``bucket_no_upscale`` makes buckets from each
    image's own size (never enlarging it). ``prior_loss_weight`` weights the loss of regularization images.
    """

    subsets: list[SubsetSpec] = field(default_factory=list)
    batch_size: int = 1
    resolution: Any = (512, 512)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    prior_loss_weight: float = 1.0
    skip_image_resolution: Any = None  # images of at most this area (width x height) are left out
    validation_split: float = 0.0  # share of each training subset's images held out for the validation loss
    validation_seed: int | None = None  # shuffles before the split (None: the training seed)

    def __post_init__(self) -> None:
        if self.resolution is not None:
            self.resolution = parse_resolution(self.resolution)
        if self.skip_image_resolution is not None:
            self.skip_image_resolution = parse_resolution(self.skip_image_resolution, "skip_image_resolution")
        if isinstance(self.validation_split, bool) or not 0.0 <= float(self.validation_split) < 1.0:
            raise DatasetError(f"validation_split must be in [0, 1), not {self.validation_split!r}")
        for name in ("batch_size", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DatasetError(f"{name} must be a whole number >= 1, not {value!r}")
        if self.prior_loss_weight < 0:
            raise DatasetError(f"prior_loss_weight must be >= 0, not {self.prior_loss_weight!r}")
        if self.enable_bucket and not self.bucket_no_upscale and self.resolution is not None:
            # kohya's checks, as errors naming both options.
            if min(self.resolution) < self.min_bucket_reso:
                raise DatasetError(f"min_bucket_reso {self.min_bucket_reso} is larger than the smaller side of "
                                   f"resolution {self.resolution}; lower min_bucket_reso or raise resolution")
            if max(self.resolution) > self.max_bucket_reso:
                raise DatasetError(f"max_bucket_reso {self.max_bucket_reso} is smaller than the larger side of "
                                   f"resolution {self.resolution}; raise max_bucket_reso or lower resolution")
        if self.min_bucket_reso > self.max_bucket_reso:
            raise DatasetError(f"min_bucket_reso {self.min_bucket_reso} is larger than max_bucket_reso "
                               f"{self.max_bucket_reso}")
