"""Stability AI "ModelSpec" metadata (`modelspec.*` keys) as kohya sd-scripts writes it into LoRA files.

Values follow sd-scripts' library/sai_model_spec.py (spec 1.0.1): architecture `<base>/lora` (sd-scripts
writes `/lora` for every network module, LyCORIS included; SwarmUI matches on these IDs), implementation
`diffusers` for SD1/SD2 LoRA and the Stability generative-models URL for SDXL LoRA and for checkpoints,
resolution `WxH`, date ISO-8601 in local time without microseconds, prediction type `epsilon` or `v`,
timestep range `min,max`, encoder layer = clip skip, implementation version `lorakit/<version>` (sd-scripts
writes `sd-scripts/<commit>`). Optional keys are written only when given.
"""

from __future__ import annotations

import base64
import datetime as _dt
import mimetypes
import os
from typing import Iterable, Literal, Sequence

SPEC_VERSION = "1.0.1"

IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"

# kind -> (architecture ID, default resolution, default prediction type)
KINDS = {
    "sd1": ("stable-diffusion-v1", 512, "epsilon"),
    "sd2": ("stable-diffusion-v2-512", 512, "epsilon"),
    "sd2-v": ("stable-diffusion-v2-768-v", 768, "v"),
    "sdxl": ("stable-diffusion-xl-v1-base", 1024, "epsilon"),
}
PREDICTION_TYPES = ("epsilon", "v")
MAX_TIMESTEP = 1000  # sd-scripts' default upper bound of --max_timestep

Kind = Literal["sd1", "sd2", "sd2-v", "sdxl", "other"]


class ModelSpecError(ValueError):
    """A user-given modelspec value that is malformed; the message names the key and what was expected."""


def build_modelspec(
    kind: Kind,
    *,
    title: str,
    is_lora: bool = True,
    resolution: int | Sequence[int] | str | None = None,
    date: _dt.datetime | _dt.date | str | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | Iterable[str] | None = None,
    merged_from: str | Iterable[str] | None = None,
    prediction_type: str | None = None,
    timestep_range: int | Sequence[int] | str | None = None,
    clip_skip: int | None = None,
    usage_hint: str | None = None,
    trigger_phrase: str | None = None,
    thumbnail: str | os.PathLike | None = None,
    preprocessor: str | None = None,
    is_negative_embedding: str | None = None,
    architecture: str | None = None,
    implementation: str | None = None,
    implementation_version: str | None = None,
) -> dict[str, str]:
    """The `modelspec.*` metadata for a model file, in sd-scripts' key order.

    kind "other" needs `architecture`, `implementation` and `resolution`; for the SD kinds they
    default as sd-scripts sets them. `date` defaults to now. `tags` and `merged_from` accept a list
    (joined with ", "). `thumbnail` is a data URL, or an image file that is embedded as one.
    `preprocessor` and `is_negative_embedding` are written as given (sd-scripts' --metadata_* strings).
    `implementation_version` defaults to this lorakit's, as sd-scripts writes its own commit.
    """
    arch, reso, pred, impl = _base_values(kind, is_lora, architecture, implementation)
    if implementation_version is None:
        from .. import __version__

        implementation_version = f"lorakit/{__version__}"
    spec = {
        "modelspec.architecture": arch,
        "modelspec.implementation": impl,
        "modelspec.title": _text("title", title),
        "modelspec.resolution": format_resolution(resolution if resolution is not None else reso),
        "modelspec.description": _text("description", description),
        "modelspec.author": _text("author", author),
        "modelspec.date": format_date(date),
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.license": _text("license", license),
        "modelspec.tags": _joined("tags", tags),
        "modelspec.merged_from": _joined("merged_from", merged_from),
        "modelspec.prediction_type": _prediction_type(prediction_type if prediction_type is not None else pred),
        "modelspec.timestep_range": None if timestep_range is None else format_timestep_range(timestep_range),
        "modelspec.encoder_layer": None if clip_skip is None else _clip_skip(clip_skip),
        "modelspec.usage_hint": _text("usage_hint", usage_hint),
        "modelspec.trigger_phrase": _text("trigger_phrase", trigger_phrase),
        "modelspec.thumbnail": None if thumbnail is None else thumbnail_data_url(thumbnail),
        "modelspec.preprocessor": _text("preprocessor", preprocessor),
        "modelspec.is_negative_embedding": _text("is_negative_embedding", is_negative_embedding),
        "modelspec.implementation_version": _text("implementation_version", implementation_version),
    }
    return {k: v for k, v in spec.items() if v is not None}


def _base_values(kind, is_lora, architecture, implementation) -> tuple[str, int | None, str | None, str]:
    """Architecture, default resolution, default prediction type and implementation for a kind."""
    if kind == "other":
        if not architecture or not implementation:
            raise ModelSpecError(
                "kind 'other' needs architecture= and implementation= (e.g. 'my-model/lora', 'diffusers')"
            )
        return _text("architecture", architecture), None, None, _text("implementation", implementation)
    if kind not in KINDS:
        raise ModelSpecError(f"kind must be one of {sorted(KINDS) + ['other']}, got {kind!r}")
    arch, reso, pred = KINDS[kind]
    if is_lora:
        arch += "/lora"
    if architecture is not None:
        arch = _text("architecture", architecture)
    if implementation is None:
        # sd-scripts: SDXL LoRA and full checkpoints name the SGM code base; SD1/SD2 LoRA name diffusers.
        implementation = IMPL_STABILITY_AI if (kind == "sdxl" or not is_lora) else IMPL_DIFFUSERS
    return arch, reso, pred, _text("implementation", implementation)


def _text(key: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ModelSpecError(f"modelspec.{key} must be a non-empty str, got {value!r}")
    return value


def _joined(key: str, value: str | Iterable[str] | None) -> str | None:
    if value is None or isinstance(value, str):
        return _text(key, value)
    items = list(value)
    if not items or not all(isinstance(v, str) and v.strip() and "," not in v for v in items):
        raise ModelSpecError(f"modelspec.{key} must be a str or a non-empty list of str without commas, got {items!r}")
    return ", ".join(v.strip() for v in items)


def _ints(key: str, value: int | Sequence[int] | str, expected: str) -> tuple[int, int]:
    """One int or two (also as a comma-separated string) -> a pair; one value is used twice."""
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.replace("x", ",").split(",")]
        elif isinstance(value, int) and not isinstance(value, bool):
            parts = [value]
        else:
            parts = list(value)
        if not 1 <= len(parts) <= 2 or not all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise ModelSpecError(f"modelspec.{key} must be {expected}, got {value!r}") from None
    return (parts[0], parts[-1])


def format_resolution(value: int | Sequence[int] | str) -> str:
    """512 -> "512x512"; (768, 512), "768,512" or "768x512" -> "768x512" (width x height)."""
    w, h = _ints("resolution", value, "an int or (width, height) of positive ints")
    if w <= 0 or h <= 0:
        raise ModelSpecError(f"modelspec.resolution must be positive, got {value!r}")
    return f"{w}x{h}"


def format_timestep_range(value: int | Sequence[int] | str) -> str:
    """(min, max) -> "min,max" with 0 <= min <= max <= 1000; one int t -> "t,t"."""
    lo, hi = _ints("timestep_range", value, "(min, max) ints")
    if not 0 <= lo <= hi <= MAX_TIMESTEP:
        raise ModelSpecError(f"modelspec.timestep_range must satisfy 0 <= min <= max <= {MAX_TIMESTEP}, got {value!r}")
    return f"{lo},{hi}"


def format_date(value: _dt.datetime | _dt.date | str | None = None) -> str:
    """ISO-8601 without microseconds; None means now in local time (what sd-scripts writes)."""
    if value is None:
        value = _dt.datetime.now()
    if isinstance(value, str):
        try:
            _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ModelSpecError(
                f"modelspec.date must be ISO-8601 such as '2024-05-01T12:00:00', got {value!r}"
            ) from None
        return value
    if isinstance(value, _dt.datetime):
        return value.replace(microsecond=0).isoformat()
    if isinstance(value, _dt.date):
        return value.isoformat()
    raise ModelSpecError(f"modelspec.date must be a datetime, date or ISO-8601 str, got {type(value).__name__}")


def _prediction_type(value: str | None) -> str | None:
    if value is not None and value not in PREDICTION_TYPES:
        raise ModelSpecError(f"modelspec.prediction_type must be one of {PREDICTION_TYPES}, got {value!r}")
    return value


def _clip_skip(value: int) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelSpecError(f"modelspec.encoder_layer (clip_skip) must be an int >= 1, got {value!r}")
    return str(value)


def thumbnail_data_url(value: str | os.PathLike) -> str:
    """modelspec.thumbnail: a data URL as given, or an image file read into one (sd-scripts'
    sai_model_spec.file_to_data_url). Raises ModelSpecError for a missing file, a file that is not an image, or a
    data URL that is not a base64 image."""
    if isinstance(value, str) and value.startswith("data:"):
        if not value.startswith("data:image/") or ";base64," not in value:
            raise ModelSpecError(f"modelspec.thumbnail must be a base64 image data URL, got {value[:40]!r}...")
        return value
    path = os.fspath(value)
    if not os.path.isfile(path):
        raise ModelSpecError(f"modelspec.thumbnail: {path}: no such image file (expected a file or a data URL)")
    mime, _ = mimetypes.guess_type(path)
    if mime is None or not mime.startswith("image/"):
        raise ModelSpecError(f"modelspec.thumbnail: {path}: not an image file type (got {mime})")
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


def base_model_version(kind: str, v_parameterization: bool = False) -> str:
    """ss_base_model_version as sd-scripts writes it (model_util.get_model_version_str_for_sd1_sd2, and SDXL's
    constant): "sd_v1"/"sd_v2", "_v" added for v-prediction; "sdxl_base_v1-0"."""
    if kind == "sdxl":
        return "sdxl_base_v1-0"
    return ("sd_v2" if kind == "sd2" else "sd_v1") + ("_v" if v_parameterization else "")


def with_base_model_keys(metadata: dict[str, str], kind: str | None) -> dict[str, str]:
    """``metadata`` with sd-scripts' ss_v2 and ss_base_model_version for a LoRA of ``kind`` ("sd1", "sd2",
    "sdxl"), where it has neither. A1111 tells an SDXL LoRA by ss_base_model_version and takes any other file
    with metadata for SD1, hiding it from its Lora tab while an SDXL model is loaded."""
    if kind not in ("sd1", "sd2", "sdxl") or "ss_base_model_version" in metadata or "ss_v2" in metadata:
        return metadata
    return {**metadata, "ss_v2": str(kind == "sd2"), "ss_base_model_version": base_model_version(kind)}
