"""`lorakit resize IN OUT --new_rank K`: argument parsing for tools/resize.py."""

from __future__ import annotations

import argparse

from .cli_common import check_device, refuse_overwrite, report_errors

_DTYPES = ("bf16", "float", "fp16", "fp32")  # names parse_dtype reads


def add_parser(commands) -> None:
    p = commands.add_parser("resize", help="reduce the rank of a LoRA/LoCon file by SVD (or cut a DyLoRA file)",
                            description="Per module: the best rank-k approximation of up @ down (no base model "
                            "needed), or a DyLoRA file's first k components.")
    p.add_argument("source", help="the LoRA/LoCon file (.safetensors, or .ckpt/.pt/.pth/.bin)")
    p.add_argument("out", help="the file to write: .safetensors, or .ckpt/.pt/.pth/.bin for a torch state dict (no metadata)")
    p.add_argument("--new_rank", type=int, required=True, help="the new rank; the cap of a dynamic method")
    p.add_argument("--new_conv_rank", type=int, default=None, help="for convs with kernel > 1 (default: new_rank)")
    p.add_argument("--dynamic_method", choices=("sv_ratio", "sv_fro", "sv_cumulative"), default=None,
                   help="kohya's per-module rank choice: sv_ratio (keep S > S_max / param), sv_fro (keep param of the "
                   "Frobenius norm), sv_cumulative (keep param of the sum of singular values)")
    p.add_argument("--dynamic_param", type=float, default=None, help="the dynamic method's parameter")
    cut = p.add_mutually_exclusive_group()
    cut.add_argument("--dylora", dest="dylora", action="store_true", default=None,
                     help="cut to the first k components (a DyLoRA file; the default when its metadata says DyLoRA)")
    cut.add_argument("--svd", dest="dylora", action="store_false", help="always resize by SVD")
    p.add_argument("--save_precision", choices=_DTYPES, default=None, help="dtype of every saved tensor (default: each keeps its "
                   "own, a new factor that of the one it replaces; float8 ones are written as fp16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--verbose", action="store_true", help="print every module's rank and retained norm")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return report_errors("resize", lambda: _resize(args))


def _resize(args: argparse.Namespace) -> str:
    from ..formats.dtypes import parse_dtype
    from .resize import fro_summary, resize_lora

    if args.dynamic_method and args.dynamic_param is None:
        raise ValueError("--dynamic_method needs --dynamic_param")
    if args.dynamic_param is not None and not args.dynamic_method:  # it would be ignored: new_rank alone decides
        raise ValueError(f"--dynamic_param {args.dynamic_param} needs --dynamic_method (sv_ratio, sv_fro or "
                         "sv_cumulative)")
    refuse_overwrite(args.out, {"source file": args.source})
    check_device(args.device)
    dtype = parse_dtype(args.save_precision, "--save_precision")
    result = resize_lora(args.source, args.new_rank, args.out, new_conv_rank=args.new_conv_rank,
                         dynamic_method=args.dynamic_method, dynamic_param=args.dynamic_param, dylora=args.dylora,
                         save_dtype=dtype, device=args.device)
    if args.verbose:
        for name, r in result.layers.items():
            print(f"{name:90s} {r['old_rank']:4d} -> {r['rank']:4d}  {_kept(r)}")
    summary = f"{args.out}: {len(result.layers)} modules resized"
    kept = fro_summary(result.layers)
    if kept:
        summary += f", Frobenius norm retained: mean {kept['mean']:.2%}, min {kept['min']:.2%}"
        if kept["modules"] < kept["of"]:
            summary += f" over the {kept['modules']} modules with a change"
    if result.copied:
        summary += f"; {len(result.copied)} other tensors copied unchanged"
    return summary


def _kept(report: dict) -> str:
    if report.get("cut"):
        return "cut"
    if report["fro"] is None:
        return "no change (untrained)"
    return f"fro retained {report['fro']:.2%}, energy {report['energy']:.2%}"
