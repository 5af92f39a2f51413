"""Read-only, one-tensor-at-a-time access to a model checkpoint file (.safetensors or .ckpt).

Loading a 7 GB SDXL file must not need 14 GB: each tensor of a safetensors file is read with a plain positioned
read when asked for (not through a memory map, whose touched pages would count as resident until the whole
file is closed), so the caller can cast it to the target dtype and drop the original before reading the next.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch

from .safetensors_io import MAX_HEADER_BYTES, SafetensorsFileError, looks_like_torch_file, read_header

__all__ = ["CheckpointFileError", "CheckpointReader"]

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# How torch's weights-only unpickler words a refusal of something that is no plain tensor data (a global it does
# not allow, one from a blocked module such as os/posix/subprocess, a call or object it will not build), across
# torch versions; other UnpicklingErrors ("Unsupported operand 235") mean bytes that are no pickle.
_CODE_REFUSALS = ("unsupported global", "unsupported class", "is blocked", "unrecognized function",
                  "can only create new object", "can only build", "must be imported to load")


def _unsafe_globals(path: str) -> list[str]:
    """The functions/classes a torch.save zip archive's pickle refers to beyond what weights_only allows, read
    statically (nothing is run); [] when torch cannot tell (older torch, a legacy or damaged file)."""
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    try:
        return sorted(find(path)) if find else []
    except Exception:  # noqa: BLE001 - a file torch cannot disassemble is judged by the refusal's wording
        return []


def _needs_code(path: str, text: str) -> str | None:
    """What a weights-only refusal says the pickle needs (its unsafe globals, or torch's line about them), or
    None when the refusal is about bytes that are no pickle."""
    found = _unsafe_globals(path)
    if found:
        return f"it refers to {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}"
    return next((line.strip() for line in text.splitlines()
                 if any(words in line.lower() for words in _CODE_REFUSALS)), None)


class CheckpointFileError(ValueError):
    """A model file that cannot be read; the message names the file and what was expected."""


class CheckpointReader:
    """Keys, shapes and tensors of a checkpoint, read lazily. Use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: no such file (expected a .safetensors or .ckpt model file)")
        self.metadata: dict[str, str] = {}
        self.extra: dict[str, Any] = {}  # non-tensor entries of a .ckpt (global_step, ...)
        self._handle = None
        self._tensors: dict[str, torch.Tensor] | None = None
        if self.path.lower().endswith((".ckpt", ".pt", ".pth", ".bin")):
            self._open_pickle()
        else:
            self._open_safetensors()

    # --- opening -------------------------------------------------------------------------------------
    def _open_safetensors(self) -> None:
        try:
            header = read_header(self.path)
        except SafetensorsFileError as e:
            raise CheckpointFileError(str(e)) from None
        self.metadata = dict(header.pop("__metadata__", {}))
        unknown = sorted({v["dtype"] for v in header.values()} - set(_ST_DTYPES))
        if unknown:
            raise CheckpointFileError(f"{self.path}: tensors of unsupported dtype {', '.join(unknown)}")
        self._shapes = {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()}
        with open(self.path, "rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")
        self._offsets = {k: (data_start + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
                         for k, v in header.items()}
        self._handle = open(self.path, "rb")

    def _is_safetensors(self) -> bool:
        """Whether the file begins as a safetensors file does: an 8-byte header length that fits the file,
        then the JSON header's "{". No torch.save zip archive or pickle begins so."""
        with open(self.path, "rb") as f:
            head = f.read(9)
        if len(head) < 9 or head[8:9] != b"{":
            return False
        n = int.from_bytes(head[:8], "little")
        return 2 <= n <= MAX_HEADER_BYTES and 8 + n <= os.path.getsize(self.path)

    def _open_pickle(self) -> None:
        if os.path.isdir(self.path):
            raise CheckpointFileError(f"{self.path}: is a folder, expected a .ckpt/.pt/.pth/.bin model file")
        if self._is_safetensors():
            # A safetensors file under a pickle name (renamed, or a diffusers .bin that is not one): reading its
            # header and tensors runs no code, so it is read as what it is.
            try:
                self._open_safetensors()
            except CheckpointFileError as e:
                raise CheckpointFileError(f"{e} (the file has a .ckpt/.pt/.pth/.bin name but begins as a "
                                          "safetensors file)") from None
            return
        with open(self.path, "rb") as f:
            head = f.read(16)
        looks_like_torch = looks_like_torch_file(head)

        def unreadable(detail: str) -> CheckpointFileError:
            if not looks_like_torch:
                found = "an empty file" if not head else f"a file beginning with {head[:16]!r}"
                return CheckpointFileError(
                    f"{self.path}: not a PyTorch checkpoint: expected a torch.save zip archive or pickle (or a "
                    f"safetensors file), found {found} ({detail})")
            return CheckpointFileError(f"{self.path}: not a readable PyTorch checkpoint (truncated or "
                                       f"corrupt?): {detail}")

        data = None
        for mmap in (True, False):  # mmap needs the zip format of torch>=1.6; old files fall back
            try:
                data = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
                break
            except pickle.UnpicklingError as e:
                text = str(e)
                needs = _needs_code(self.path, text) if looks_like_torch else None
                if needs:
                    raise CheckpointFileError(
                        f"{self.path}: this pickle needs more than plain tensors to load ({needs}); lorakit loads "
                        ".ckpt files with weights_only=True only, because unpickling anything else can run code. "
                        "Convert it to .safetensors with a tool you trust.") from None
                # The weights-only unpickler's verdict on bytes that are no pickle ("Unsupported operand 235").
                detail = next((line.strip() for line in text.splitlines() if "Unsupported" in line),
                              text.splitlines()[0] if text else type(e).__name__)
                raise unreadable(detail) from None
            except RuntimeError as e:
                if mmap and "mmap" in str(e).lower():
                    continue
                raise unreadable(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
            except Exception as e:  # noqa: BLE001 - the unpickler raises KeyError, IndexError, ... on garbage
                raise unreadable(f"{type(e).__name__}: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            self.extra = {k: v for k, v in data.items() if k != "state_dict"}
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise CheckpointFileError(f"{self.path}: expected a state dict (a mapping of names to tensors), "
                                      f"found {type(data).__name__}")
        self._tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        self.extra.update({k: v for k, v in data.items() if not isinstance(v, torch.Tensor)})
        self._shapes = {k: (tuple(v.shape), v.dtype) for k, v in self._tensors.items()}

    # --- access --------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key][0]

    def dtype(self, key: str) -> torch.dtype:
        dtype = self._shapes[key][1]
        return _ST_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype

    def meta_tensor(self, key: str) -> torch.Tensor:
        """A meta-device tensor of the key's shape and dtype: for shape checks without reading data."""
        return torch.empty(self.shape(key), dtype=self.dtype(key), device="meta")

    def get(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        if self._tensors is not None:
            return self._tensors[key]
        start, length = self._offsets[key]
        tensor = torch.empty(self.shape(key), dtype=self.dtype(key))
        if length != tensor.numel() * tensor.element_size():
            raise CheckpointFileError(f"{self.path}: tensor {key!r} has {length} bytes of data, but its shape "
                                      f"{list(tensor.shape)} and dtype need {tensor.numel() * tensor.element_size()}")
        if length:
            self._handle.seek(start)
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            if self._handle.readinto(view) != length:
                raise CheckpointFileError(f"{self.path}: truncated while reading tensor {key!r}")
        return tensor

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = None
        self._tensors = None

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
