"""Dtype names as users write them (kohya's "fp16"/"bf16"/"float", torch's "float16"...) -> torch dtypes."""

from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "parse_dtype"]

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "full": torch.float32,
    "no": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}


def parse_dtype(value: str | torch.dtype | None, option: str = "dtype") -> torch.dtype | None:
    """A floating torch dtype from a name or dtype; None stays None. Anything else is an error naming ``option``."""
    if value is None or isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in FLOAT_DTYPES:
            return FLOAT_DTYPES[key]
    known = ", ".join(sorted(FLOAT_DTYPES))
    raise ValueError(f"{option}={value!r} is not a floating-point dtype; expected one of {known}")
