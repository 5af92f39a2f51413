"""`lorakit <command>`: parses and dispatches, nothing else."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from . import __version__


def _list_algorithms(args: argparse.Namespace) -> int:
    from .algos import ALGORITHMS
    from .algos.base import COMMON_OPTIONS

    for cls in ALGORITHMS:
        names = ", ".join((cls.name, *cls.aliases))
        layers = ", ".join(sorted(cls.layer_kinds))
        options = ", ".join(sorted(COMMON_OPTIONS | cls.accepts))
        print(f"{names}\n  layers:  {layers}\n  options: {options}")
    return 0


# Commands that live in their own module: each has add_parser(commands) registering a sub-parser whose
# defaults set run=<function(args) -> exit code>.
TOOL_MODULES = ("lorakit.tools.extract_cli", "lorakit.tools.merge_cli", "lorakit.tools.resize_cli",
                "lorakit.tools.convert_cli", "lorakit.tools.inspect_cli", "lorakit.train.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="Parameter-efficient fine-tuning (LoRA, LoHa, LoKr, (IA)^3, DyLoRA, GLoRA, Diag-OFT, BOFT, "
        "full, norm) for Stable Diffusion and any PyTorch model.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>")
    algos = commands.add_parser("algos", help="list the adapter algorithms, the layers and the options each accepts")
    algos.set_defaults(run=_list_algorithms)
    for name in TOOL_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a tool whose own import fails is a bug, not an absent tool
                raise
            continue
        module.add_parser(commands)
    return parser


# bitsandbytes >= 0.49 (the optim extra), imported by diffusers on a CPU with AVX512-BF16 beside transformers'
# `kernels` package, looks for a 4-bit matmul kernel on the Hugging Face Hub and logs this when it cannot have it.
# lorakit runs no 4-bit matmul and downloads nothing at run time, so the line only alarms.
_HUB_KERNEL_NOTE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _drop_hub_kernel_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_HUB_KERNEL_NOTE)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the commands' other messages read: what happened, not the source line that noticed it."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_hub_kernel_note)
    warnings.formatwarning = _one_line_warning
    parser = build_parser()  # the commands' modules import torch only for their work, not for their parsers
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except BrokenPipeError:  # `lorakit inspect FILE | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (so the exit's flush does not fail again)
        return 0


if __name__ == "__main__":
    sys.exit(main())
