"""What the tool commands share: one error line instead of a traceback, no output written over an input, and a
device checked before anything is loaded."""

from __future__ import annotations

import os
import sys
from typing import Callable, Mapping


def report_errors(command: str, work: Callable[[], str | None]) -> int:
    """Run a tool; a bad input (ValueError, OSError: every lorakit input error is one) becomes one
    `lorakit <command>: error: ...` line on stderr and exit status 1."""
    try:
        message = work()
    except (ValueError, OSError) as e:
        print(f"lorakit {command}: error: {e}", file=sys.stderr)
        return 1
    if message:
        print(message)
    return 0


def refuse_overwrite(output, inputs: Mapping[str, object]) -> None:
    """An output path that is one of the inputs ({what: path}), or a folder holding one, would replace it: refused,
    naming both. An output folder is written whole (a diffusers model), replacing what is there: an existing folder
    that is not a diffusers model and holds files is refused too."""
    out = os.path.abspath(os.fspath(output))
    for what, path in inputs.items():
        if path is None:
            continue
        given = os.path.abspath(os.fspath(path))
        same = given == out or (os.path.exists(given) and os.path.exists(out) and os.path.samefile(given, out))
        if same:
            raise ValueError(f"{output}: is also the {what}; write the output elsewhere")
        if os.path.commonpath([given, out]) == out:
            raise ValueError(f"{output}: holds the {what} ({path}), and writing the output replaces the folder; "
                             "write the output elsewhere")
    if os.path.isdir(out) and not os.path.isfile(os.path.join(out, "model_index.json")) and any(os.scandir(out)):
        raise ValueError(f"{output}: is a folder with files that is not a diffusers model; writing the output would "
                         "replace it whole: give a new path")


def check_device(device: str) -> None:
    """A device torch can use here ("cpu", "cuda", "cuda:1", ...), checked before any model is loaded."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: this torch has no CUDA device (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
