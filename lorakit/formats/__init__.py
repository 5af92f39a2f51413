"""File formats: safetensors I/O with metadata, the hashes and ModelSpec keys UIs read."""

from lorakit.formats.hashes import (
    add_hashes,
    autov2,
    file_addnet_hash,
    file_legacy_hash,
    file_sha256,
    lora_short_hash,
    sshs_hashes,
)
from lorakit.formats.modelspec import ModelSpecError, build_modelspec
from lorakit.formats.safetensors_io import (
    SafetensorsFileError,
    find_non_finite,
    load_file,
    prepare_tensors,
    read_header,
    read_metadata,
    save_file,
)

__all__ = [
    "ModelSpecError",
    "SafetensorsFileError",
    "add_hashes",
    "autov2",
    "build_modelspec",
    "file_addnet_hash",
    "file_legacy_hash",
    "file_sha256",
    "find_non_finite",
    "load_file",
    "lora_short_hash",
    "prepare_tensors",
    "read_header",
    "read_metadata",
    "save_file",
    "sshs_hashes",
]
