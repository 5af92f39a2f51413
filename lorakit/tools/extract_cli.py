"""`lorakit extract BASE TUNED OUT`: argument parsing for tools/extract.py."""

from __future__ import annotations

import argparse
import sys

from .cli_common import check_device, refuse_overwrite, report_errors
from .rank_modes import MODES

_DTYPES = ("bf16", "bfloat16", "float", "float16", "float32", "fp16", "fp32")  # names parse_dtype reads


def add_parser(commands) -> None:
    p = commands.add_parser("extract", help="extract a LoRA/LoCon from a fine-tuned checkpoint and its base",
                            description="Factor tuned - base per layer (Linear, 1x1 and kxk convs, text encoders "
                            "included) into a kohya/LyCORIS LoRA/LoCon file.")
    p.add_argument("base", help="the base model: checkpoint file or diffusers folder")
    p.add_argument("tuned", help="the fine-tuned model (same architecture)")
    p.add_argument("out", help="the file to write: .safetensors, or .ckpt/.pt/.pth/.bin for a torch state dict (no metadata)")
    p.add_argument("--mode", choices=MODES, default="fixed",
                   help="rank selection: fixed (ranks --linear_dim/--conv_dim), threshold, ratio, quantile (on "
                   "singular values), quantile_energy (on S^2), sv_ratio, sv_fro, sv_cumulative (default fixed)")
    p.add_argument("--linear_dim", type=int, default=64, help="rank of Linear/1x1 layers (fixed), else the cap "
                   "(0: no cap) (default 64)")
    p.add_argument("--conv_dim", type=int, default=None, help="rank of convs with kernel > 1 (default: linear_dim; "
                   "0 in fixed mode leaves them out)")
    p.add_argument("--linear_param", type=float, default=None, help="the mode's parameter for Linear/1x1 layers")
    p.add_argument("--conv_param", type=float, default=None, help="the mode's parameter for kxk convs "
                   "(default: linear_param)")
    p.add_argument("--use_tucker", action="store_true", help="Tucker form (lora_mid) for convs with kernel > 1")
    p.add_argument("--svd", choices=("auto", "randomized", "exact"), default="auto",
                   help="auto: randomized for fixed ranks, exact for the other modes")
    p.add_argument("--niter", type=int, default=2, help="power iterations of the randomized SVD (default 2)")
    p.add_argument("--min_diff", type=float, default=0.0,
                   help="leave out layers whose largest |tuned - base| is <= this, U-Net layers included (default "
                   "0: only unchanged ones). Not kohya's min_diff, which only decides whether the text encoder is "
                   "extracted; for that use --no_text_encoder")
    p.add_argument("--no_full_fallback", action="store_true",
                   help="never store a layer whole, even where its factors would be larger than the change")
    p.add_argument("--preset", default="full", help="which layers (a network preset, default full)")
    p.add_argument("--no_text_encoder", action="store_true", help="leave the text encoders out")
    p.add_argument("--save_precision", choices=_DTYPES, default="fp16", help="tensor dtype (default fp16)")
    p.add_argument("--device", default="cpu", help="where to compute (cpu, cuda)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD")
    p.add_argument("--verbose", action="store_true", help="print each layer's rank and retained norm")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.mode != "fixed" and args.linear_param is None:
        raise SystemExit(f"lorakit extract: --mode {args.mode} needs --linear_param")
    return report_errors("extract", lambda: _extract(args))


def _extract(args: argparse.Namespace) -> str:
    from ..formats.dtypes import parse_dtype
    from .extract import extract_lora, stored_whole_warning

    refuse_overwrite(args.out, {"base model": args.base, "tuned model": args.tuned})
    check_device(args.device)
    result = extract_lora(
        args.base, args.tuned, args.out, mode=args.mode,
        linear_dim=(args.linear_dim or None) if args.mode != "fixed" else args.linear_dim,
        conv_dim=args.conv_dim, linear_param=args.linear_param, conv_param=args.conv_param,
        use_tucker=args.use_tucker, svd=args.svd, niter=args.niter, min_diff=args.min_diff,
        full_fallback=not args.no_full_fallback, preset=args.preset, text_encoders=not args.no_text_encoder,
        save_dtype=parse_dtype(args.save_precision, "--save_precision"), device=args.device, seed=args.seed)
    if args.verbose:
        for name, r in result.layers.items():
            what = "full diff" if r["full"] else f"rank {r['rank']:4d}"
            print(f"{name:90s} {what}  fro retained {r['fro']:.2%}")
    warning = stored_whole_warning(result)
    if warning:
        print(f"lorakit extract: warning: {warning}", file=sys.stderr)
    full = sum(1 for r in result.layers.values() if r["full"])
    lost = result.not_extracted
    return (f"{args.out}: {len(result.layers)} layers ({full} stored whole), {len(result.skipped)} unchanged left out"
            + (f", bias change dropped in {len(result.bias_dropped)}" if result.bias_dropped else "")
            + (f", {len(lost)} changed tensors outside the preset's layers not extracted (e.g. {', '.join(lost[:3])})"
               if lost else ""))
