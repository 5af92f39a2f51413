"""`lorakit inspect`: the command line of lorakit.tools.inspect."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(commands) -> None:
    p = commands.add_parser(
        "inspect", help="show what an adapter file holds: algorithms, dims, alphas, blocks, zero/NaN tensors, metadata",
        description="Report an adapter file (kohya/LyCORIS or diffusers/PEFT layout): each module's algorithm, "
        "dim, alpha, dtype and parameter count, the file size, the U-Net blocks present, tensors that are all "
        "zero (untrained) or hold NaN/Inf, and the metadata (ss_*, top tags, modelspec.*). A model checkpoint "
        "is reported as such (exit code 1); so is a file with malformed modules (a missing factor, factors of "
        "different ranks), after its report.")
    p.add_argument("file", help="the .safetensors file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--top-tags", type=int, default=10, metavar="N", help="tags shown from ss_tag_frequency (10)")
    p.add_argument("--summary", action="store_true", help="leave out the per-module table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..formats import SafetensorsFileError
    from ..formats.checkpoint_file import CheckpointFileError
    from .inspect import format_report, inspect_file

    try:
        report = inspect_file(args.file, top_tags=args.top_tags)
    except (SafetensorsFileError, CheckpointFileError, FileNotFoundError) as e:  # unreadable
        print(f"lorakit inspect: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # readable, but not an adapter (InspectError, a model checkpoint)
        print(f"lorakit inspect: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report, modules=not args.summary))
    if report["malformed_modules"]:  # loaders refuse the file: a check that passes it would mislead
        print(f"lorakit inspect: {args.file}: {len(report['malformed_modules'])} malformed module(s)", file=sys.stderr)
        return 1
    return 0
