"""Model hashes that kohya sd-scripts writes into LoRA files and that the web UIs compute or read.

- `sshs_model_hash` (kohya train_util.precalculate_safetensors_hashes / addnet_hash_safetensors): sha256 of
  the tensor-data section of the file, i.e. everything after the 8-byte length and the JSON header. The data
  section does not depend on metadata, so it equals what A1111 computes from the saved file for a LoRA
  ("hashes-addnet"); A1111 shows its first 12 hex digits as the LoRA's short hash.
- `sshs_legacy_hash` (addnet_hash_legacy): first 8 hex of sha256 of bytes [1 MiB, 1 MiB + 64 KiB) of the
  serialised file. kohya serialises with only the `ss_*` metadata so that user metadata cannot change it; for
  files under 1 MiB this is the hash of no bytes, "e3b0c442".
- A1111 checkpoints: full-file sha256, shown as its first 10 hex ("AutoV2"); the old `model_hash` is the
  legacy hash above taken over the file as it is on disk.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import BinaryIO, Mapping

import safetensors.torch
import torch

from lorakit.formats.safetensors_io import check_metadata, prepare_tensors, read_metadata

_CHUNK = 1024 * 1024
_LEGACY_OFFSET = 0x100000  # 1 MiB
_LEGACY_LENGTH = 0x10000  # 64 KiB


def addnet_hash(stream: BinaryIO) -> str:
    """sha256 (64 hex) of a safetensors stream's tensor data, skipping the length field and JSON header."""
    stream.seek(0)
    n = int.from_bytes(stream.read(8), "little")
    stream.seek(8 + n)
    h = hashlib.sha256()
    for chunk in iter(lambda: stream.read(_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def legacy_hash(stream: BinaryIO) -> str:
    """First 8 hex of sha256 of the stream's bytes [1 MiB, 1 MiB + 64 KiB) (fewer or none if shorter)."""
    stream.seek(_LEGACY_OFFSET)
    return hashlib.sha256(stream.read(_LEGACY_LENGTH)).hexdigest()[:8]


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) for these tensors, as kohya computes them before saving.

    Pass the tensors as they will be saved (after any dtype cast): the hash covers their bytes.
    Only the `ss_*` metadata enters the serialisation, and always as a dict (an empty `__metadata__`
    changes the header, and with it the legacy hash, compared with none).
    """
    meta = check_metadata(metadata) or {}
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    # The exact bytes kohya hashes; a LoRA is small enough to serialise once in memory.
    data = safetensors.torch.save(prepare_tensors(tensors), ss_only)
    stream = io.BytesIO(data)
    return addnet_hash(stream), legacy_hash(stream)


def add_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of metadata with `sshs_model_hash` and `sshs_legacy_hash` set for these tensors."""
    out = dict(check_metadata(metadata) or {})
    out["sshs_model_hash"], out["sshs_legacy_hash"] = sshs_hashes(tensors, out)
    return out


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (64 hex) of the whole file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def autov2(path: str | os.PathLike) -> str:
    """A1111's short checkpoint hash (Civitai "AutoV2"): the first 10 hex of the file's sha256."""
    return file_sha256(path)[:10]


def file_legacy_hash(path: str | os.PathLike) -> str:
    """A1111's old 8-hex `model_hash` of a file as it is on disk."""
    with open(path, "rb") as f:
        return legacy_hash(f)


def file_addnet_hash(path: str | os.PathLike) -> str:
    """sha256 of a safetensors file's tensor data: what A1111 computes for a LoRA without `sshs_model_hash`."""
    with open(path, "rb") as f:
        return addnet_hash(f)


def lora_short_hash(path: str | os.PathLike) -> str:
    """The 12-hex hash A1111 shows for a LoRA: `sshs_model_hash` from the file if present, else computed."""
    full = read_metadata(path).get("sshs_model_hash") or file_addnet_hash(path)
    return full[:12]
