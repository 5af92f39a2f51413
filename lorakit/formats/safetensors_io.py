"""Reading and writing .safetensors files: atomic saves, clear errors, memory-mapped loads; and save_tensors, the
writer of adapter files, which writes a torch state dict under a .ckpt/.pt/.pth/.bin name.

Layout of a safetensors file: 8 bytes little-endian header length N, N bytes of JSON header
({name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}), then the tensor data.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping

import safetensors
import safetensors.torch
import torch

from .atomic import atomic_write

# safetensors refuses headers above 100 MB; a bigger length field means garbage.
MAX_HEADER_BYTES = 100_000_000
# File names read and written as torch.save files (sd-scripts' save_model_as ckpt/pt, diffusers' .bin).
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# First bytes of a torch.save zip archive and of a pickle of protocol 2..5 (torch.save's legacy format).
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGICS = tuple(bytes([0x80, p]) for p in range(2, 6))


def looks_like_torch_file(head: bytes) -> bool:
    """Whether a file's first bytes (9 or more) are those of a torch.save archive or pickle. A safetensors header is
    a JSON object, so its byte 8 is "{"; a header length such as 640 begins with pickle's magic bytes too."""
    return head[8:9] != b"{" and (head.startswith(ZIP_MAGIC) or head[:2] in PICKLE_MAGICS)


logger = logging.getLogger(__name__)


def is_torch_name(path: str | os.PathLike) -> bool:
    """Whether a file name says torch.save format (.ckpt/.pt/.pth/.bin, any case)."""
    return os.fspath(path).lower().endswith(TORCH_SUFFIXES)


class SafetensorsFileError(ValueError):
    """A file that cannot be read as safetensors; the message names the file and the problem."""


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    """Return metadata as a plain dict after checking it is str -> str (safetensors stores only strings)."""
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str -> str, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata key {key!r} must be a str, got {type(key).__name__}")
        if not isinstance(value, str):
            raise TypeError(
                f"metadata[{key!r}] must be a str, got {type(value).__name__} {value!r}; "
                "convert it (json.dumps for lists and dicts) before saving"
            )
    return dict(metadata)


def prepare_tensors(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors ready for safetensors; floating ones cast to dtype.

    Integer and bool tensors keep their dtype; shapes (0-d `alpha` included) are kept.
    A tensor sharing storage with an earlier one is cloned, since safetensors refuses shared tensors.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}")
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, t in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"tensor name {key!r} must be a str, got {type(key).__name__}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{key!r}] must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type == "meta":
            raise ValueError(f"tensors[{key!r}] is on the meta device and holds no data to save")
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storages:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen_storages.add(ptr)
        out[key] = t
    return out


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write tensors (floating ones cast to dtype) and str metadata to path, atomically.

    The file is written next to its destination under a temporary name and renamed into place,
    so an error or Ctrl-C never leaves a half-written file at path. Parent folders are created.
    """
    path = os.fspath(path)
    prepared = prepare_tensors(tensors, dtype)
    meta = check_metadata(metadata)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder; expected a file path to save the tensors to")
    atomic_write(path, lambda tmp: safetensors.torch.save_file(prepared, tmp, metadata=meta), fsync=True,
                 writer_temporaries=True)


def save_tensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write an adapter's tensors in the format its name says, atomically: a plain state dict by torch.save under a
    .ckpt/.pt/.pth/.bin name (what kohya's resize_lora.py, extract_lora_from_models.py and merge scripts write for
    a name that is not .safetensors), safetensors (save_file) under any other. A torch file has no place for
    metadata: it is left out, with a warning when there is any."""
    if not is_torch_name(path):
        save_file(tensors, path, metadata=metadata, dtype=dtype)
        return
    path = os.fspath(path)
    prepared = {key: owned(t) for key, t in prepare_tensors(tensors, dtype).items()}
    check_metadata(metadata)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder; expected a file path to save the tensors to")
    if metadata:
        logger.warning("%s: a torch file (.ckpt/.pt/.pth/.bin) holds tensors only: its %d metadata entries (ss_*, "
                       "modelspec.*, hashes) are not written; save as .safetensors to keep them", path, len(metadata))
    atomic_write(path, lambda tmp: torch.save(prepared, tmp), fsync=True)


def owned(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` in ``dtype`` (floating tensors only), contiguous and owning exactly its own memory. torch.save
    writes a view's whole storage (a rank cut of a larger factor would carry the rest along), and a model's
    parameter must not keep a memory map or a larger tensor (OpenCLIP's fused q/k/v) alive."""
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() or tensor.storage_offset():
        tensor = tensor.clone()
    return tensor


def read_header(path: str | os.PathLike) -> dict:
    """Parse and check the JSON header of a safetensors file without reading tensor data.

    Raises FileNotFoundError or SafetensorsFileError naming the file and what was expected.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (expected a .safetensors file)")
    if os.path.isdir(path):
        raise SafetensorsFileError(f"{path}: is a folder, expected a .safetensors file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
        if looks_like_torch_file(head):
            raise SafetensorsFileError(f"{path}: is a PyTorch pickle checkpoint, not a safetensors file; {_torch_hint(path)}")
        head = head[:8]
        f.seek(8)
        if len(head) < 8:
            raise SafetensorsFileError(
                f"{path}: is {size} bytes, too short for a safetensors file "
                "(expected an 8-byte header length followed by a JSON header)"
            )
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsFileError(
                f"{path}: not a safetensors file, or truncated: its first 8 bytes give a header length "
                f"of {n} bytes but the file has {size - 8} bytes after them"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsFileError(
            f"{path}: not a safetensors file, or its header is corrupt: the {n}-byte header is not JSON ({e})"
        ) from None
    if not isinstance(header, dict):
        raise SafetensorsFileError(f"{path}: corrupt header: expected a JSON object, got {type(header).__name__}")
    _check_entries(path, header, data_size=size - 8 - n)
    return header


def _torch_hint(path: str) -> str:
    """What to do with a torch file given where safetensors was read: a torch name means the caller should have
    read it as one (CheckpointReader); another name hides what it is."""
    if is_torch_name(path):
        return "this reads safetensors files only (lorakit's adapter and model readers take torch files)"
    return ("lorakit reads such files only under a .ckpt/.pt/.pth/.bin name, and then only their tensors "
            "(weights_only=True: unpickling anything else can run code)")


def _check_entries(path: str, header: dict, data_size: int) -> None:
    """Check each header entry's form and that the data section is exactly as long as promised."""
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise SafetensorsFileError(f"{path}: corrupt header: '__metadata__' must map str to str")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and isinstance(info.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(isinstance(o, int) for o in info["data_offsets"])
            and 0 <= info["data_offsets"][0] <= info["data_offsets"][1]
        )
        if not ok:
            raise SafetensorsFileError(
                f"{path}: corrupt header entry for tensor {name!r}: expected "
                f"{{'dtype': str, 'shape': [int, ...], 'data_offsets': [start, end]}}, got {info!r}"
            )
        end = max(end, info["data_offsets"][1])
    if end > data_size:
        raise SafetensorsFileError(
            f"{path}: truncated: the header describes {end} bytes of tensor data but the file holds {data_size}"
        )
    if end < data_size:
        raise SafetensorsFileError(
            f"{path}: corrupt: the header describes {end} bytes of tensor data but the file holds {data_size}"
        )


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (empty if none), reading only the header."""
    return dict(read_header(path).get("__metadata__", {}))


def load_file(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a safetensors file through a memory map.

    Returns (tensors, metadata). Errors name the file: missing, a pickle checkpoint, truncated or corrupt.
    """
    path = os.fspath(path)
    header = read_header(path)  # clear errors before safetensors' terse ones
    try:
        with safetensors.safe_open(path, framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own checks (unknown dtype, overlapping offsets, ...)
        raise SafetensorsFileError(f"{path}: cannot be read as safetensors: {e}") from e
    return tensors, dict(header.get("__metadata__", {}))


# Dtypes torch.isfinite takes as they are; other floats (float8_e4m3fn, float8_e5m2, ...) are upcast to float32.
_ISFINITE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Elements upcast at once: a float8 tensor is scanned in float32 slices, never copied whole.
_UPCAST_CHUNK = 1 << 22


def find_non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors that hold a NaN or an infinity, in the mapping's order."""
    return [name for name, t in tensors.items() if (t.is_floating_point() or t.is_complex()) and not _all_finite(t)]


def _all_finite(t: torch.Tensor) -> bool:
    """Whether a floating or complex tensor holds no NaN and no infinity. torch.isfinite has no float8 kernel:
    those are read through float32, which holds every float8 value, NaN and Inf included."""
    if t.is_complex() or t.dtype in _ISFINITE_DTYPES:
        return bool(torch.isfinite(t).all())
    return all(bool(torch.isfinite(part.float()).all()) for part in t.reshape(-1).split(_UPCAST_CHUNK))
