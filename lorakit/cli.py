"""`lorakit <command>`: parses and dispatches, nothing else."""

from __future__ import annotations

import argparse
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
