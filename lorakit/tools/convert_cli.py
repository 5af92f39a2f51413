"""`lorakit convert`: the command line of lorakit.tools.convert."""

from __future__ import annotations

import argparse
import sys


def add_parser(commands) -> None:
    p = commands.add_parser(
        "convert", help="convert an adapter between the kohya/LyCORIS and diffusers/PEFT layouts, SDXL U-Net name "
        "styles and dtypes",
        description="Convert a Stable Diffusion adapter file. Layouts: kohya/LyCORIS (lora_unet_..., lora_down/"
        "lora_up/alpha; LoHa hada_*, LoKr lokr_*) and diffusers/PEFT (unet.<path>.lora_A/lora_B, alphas in "
        "diffusers' lora_adapter_metadata). LoRA, LoHa and LoKr convert; kohya -> diffusers -> kohya gives the "
        "same tensors back, under the names sd-scripts writes (a LyCORIS file's text-encoder and SDXL names may "
        "change spelling). Metadata is kept; kohya's sshs hashes are recomputed.")
    p.add_argument("source", help="the adapter file (.safetensors, or .ckpt/.pt/.pth/.bin)")
    p.add_argument("output", help="the file to write (atomically): .safetensors, or .ckpt/.pt/.pth/.bin for a torch "
                   "state dict (no metadata)")
    p.add_argument("--to", choices=("kohya", "lycoris", "diffusers", "peft"), default=None, type=str.lower,
                   help="target layout (default: the source's; diffusers = peft)")
    p.add_argument("--unet-names", choices=("kohya", "sgm", "diffusers"), default=None,
                   help="U-Net name style of kohya output: kohya = SGM names for SDXL and diffusers names for "
                   "SD1/SD2 (the default when converting from diffusers/PEFT); sgm (lora_unet_input_blocks_4_1_...)"
                   " or diffusers (lora_unet_down_blocks_1_attentions_0_...)")
    p.add_argument("--dtype", default=None, help="cast floating tensors: fp32, fp16, bf16 (default: keep)")
    p.add_argument("--arch", choices=("sd1", "sd2", "sdxl"), default=None,
                   help="the base model, when the file does not tell (only the U-Net name style depends on it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..formats import SafetensorsFileError
    from .convert import ConvertError, convert

    try:
        report = convert(args.source, args.output, to=args.to, unet_names=args.unet_names, dtype=args.dtype,
                         arch=args.arch, progress=not args.no_progress and sys.stderr.isatty())
    except (ConvertError, SafetensorsFileError, OSError, ValueError) as e:  # OSError: a folder, a full disk
        print(f"lorakit convert: error: {e}", file=sys.stderr)
        return 1  # as the other tools (cli_common.report_errors); 2 is argparse's, for a malformed command line
    cast = f", {report.dtype}" if report.dtype else ""
    print(f"{report.source} ({report.source_layout}) -> {report.output} ({report.target_layout}{cast}): "
          f"{report.tensors} tensors" + "".join(f"; {n}" for n in report.notes))
    return 0
