"""`lorakit merge`: adapters into a checkpoint, or LoRAs into one LoRA. kohya sd-scripts' merge_lora.py /
sdxl_merge_lora.py option names are accepted as aliases (--sd_model, --models, --lbws ...)."""

from __future__ import annotations

import argparse
import os
import sys

from .cli_common import check_device, refuse_overwrite, report_errors

EXAMPLES = """examples:
  lorakit merge --model base.safetensors --loras a.safetensors b.safetensors --ratios 0.8 0.5 \\
      --save_to merged.safetensors --save_precision fp16
  lorakit merge --model base.safetensors --loras a.safetensors --block_weights "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1" \\
      --save_to merged_folder
  lorakit merge --loras a.safetensors b.safetensors --ratios 1 0.5 --save_to ab.safetensors
  lorakit merge --loras a.safetensors b.safetensors --new_rank 32 --save_to ab32.safetensors
"""


class _BlockWeights(argparse.Action):
    """Stores the vectors and the spelling used: kohya's --lbws users get a note where LoRA Block Weight's rule
    (the one lorakit follows) and kohya's differ."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.block_weights_option = option_string


def add_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        "merge", help="merge adapters into a checkpoint, or several LoRAs into one LoRA",
        description="With --model: add every adapter (any algorithm) at its ratio into the model and save it as "
                    "one checkpoint file (.safetensors/.ckpt) or a diffusers folder (any other name). Without "
                    "--model: merge LoRA/LoCon files into one LoRA by concatenating their ranks (exact), or with "
                    "--new_rank by re-factorising the summed change with SVD.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--sd_model", dest="model", metavar="BASE",
                   help="checkpoint file, diffusers folder or demo:tiny-sd to merge into; omit to merge LoRAs into one")
    p.add_argument("--loras", "--models", dest="loras", nargs="+", required=True, metavar="FILE",
                   help="adapter files (.safetensors, or .ckpt/.pt/.pth/.bin torch files), merged in this order")
    p.add_argument("--ratios", nargs="+", type=float, metavar="R", help="one ratio per file (default: 1 each)")
    p.add_argument("--block_weights", "--lbws", dest="block_weights", nargs="+", metavar="W", action=_BlockWeights,
                   help="per-block weights: one vector for all files or one per file ('none' for a file without), as "
                        "'1,0.5,...', a JSON list, or 'IN04=0.5,MID=0'. SD1/SD2: 25 (kohya IN00-IN11, MID, "
                        "OUT00-OUT11), 26 or 17 (LoRA Block Weight, BASE = text encoders first); SDXL: 23 (kohya), "
                        "20 or 12 (LoRA Block Weight)")
    p.add_argument("--save_to", required=True, metavar="OUT",
                   help="output: a .safetensors or .ckpt file (a merged LoRA also .pt/.pth/.bin: a torch state dict, "
                        "without metadata), or a folder name for diffusers (with --model)")
    p.add_argument("--save_precision", default=None, metavar="DTYPE",
                   help="dtype of the saved tensors: float, fp16, bf16 (default: --precision)")
    p.add_argument("--precision", default="float", metavar="DTYPE",
                   help="dtype the merge computes in (the model is loaded in it): float (default), fp16, bf16")
    p.add_argument("--new_rank", type=int, default=None, metavar="N",
                   help="without --model: re-factorise the summed change to rank N with SVD instead of concatenating")
    p.add_argument("--new_conv_rank", type=int, default=None, metavar="N",
                   help="rank of 3x3-conv modules for --new_rank (default: --new_rank)")
    p.add_argument("--concat", action="store_true",
                   help="concatenate ranks (kohya's flag; lorakit's default without --new_rank)")
    p.add_argument("--shuffle", action="store_true", help="permute the concatenated rank components (kohya's flag)")
    p.add_argument("--v2", action="store_true", help="check that the model/adapters are SD2 (kohya's flag)")
    p.add_argument("--sdxl", action="store_true", help="check that the model/adapters are SDXL")
    p.add_argument("--device", default="cpu", help="device for the merge computation (default cpu)")
    p.add_argument("--no_metadata", action="store_true", help="write no modelspec metadata")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run, block_weights_option=None)
    return p


def run(args: argparse.Namespace) -> int:
    return report_errors("merge", lambda: _merge(args))


def _merge(args: argparse.Namespace) -> str:
    from ..formats.dtypes import parse_dtype
    from .merge import check_adapter_file, check_block_weights, check_ratios

    loras = {f"adapter #{i + 1} of --loras": f for i, f in enumerate(args.loras)}
    refuse_overwrite(args.save_to, {"model": args.model, **loras})
    check_device(args.device)
    ratios = check_ratios(args.loras, args.ratios)
    for file in args.loras:
        check_adapter_file(file, "--loras")
    _check_not_checkpoints(args.loras)  # before loading a model: fail fast
    per_file = check_block_weights(args.block_weights, len(args.loras), None)  # no layout's length: fail early
    if args.block_weights_option == "--lbws":
        _note_unlisted_blocks(args.loras, per_file)
    precision = parse_dtype(args.precision, "--precision")
    save_dtype = parse_dtype(args.save_precision, "--save_precision") or precision
    if args.v2 and args.sdxl:
        raise ValueError("--v2 and --sdxl contradict each other; give at most one")
    if args.model is not None:
        return _into_model(args, ratios, precision, save_dtype)
    if args.concat and args.new_rank is not None:
        raise ValueError("--concat and --new_rank choose different merges; give one")
    _check_adapter_arch(args)
    from .merge import merge_loras

    merge_loras(args.loras, ratios, args.save_to, new_rank=args.new_rank, new_conv_rank=args.new_conv_rank,
                block_weights=args.block_weights, precision=precision, save_precision=save_dtype,
                shuffle=args.shuffle, device=args.device, metadata=not args.no_metadata, progress=not args.quiet)
    how = f"SVD to rank {args.new_rank}" if args.new_rank is not None else "ranks concatenated"
    return f"merged {len(args.loras)} LoRA(s) into {args.save_to} ({how})"


def _into_model(args, ratios, precision, save_dtype) -> str:
    from ..models.load import load_model
    from .merge import checkpoint_metadata, merge_into_model, save_model

    for option in ("new_rank", "new_conv_rank"):
        if getattr(args, option) is not None:
            raise ValueError(f"--{option} re-factorises LoRAs into one LoRA; it does not apply with --model")
    if args.concat or args.shuffle:  # kohya's merge_lora.py takes and ignores them with --sd_model
        print("lorakit merge: note: --concat/--shuffle shape a LoRA-into-LoRA merge; with --model they change "
              "nothing and are ignored, as in kohya's merge_lora.py", file=sys.stderr)
    model = load_model(args.model, v2=True if args.v2 else None, sdxl=True if args.sdxl else None, dtype=precision)
    if args.device != "cpu":
        for _, module in model.components():
            module.to(args.device)
    merge_into_model(model, args.loras, ratios, args.block_weights, progress=not args.quiet)
    metadata = None if args.no_metadata else checkpoint_metadata(model, args.model, args.loras, args.save_to)
    kind = save_model(model, args.save_to, save_dtype, metadata=metadata)
    return f"merged {len(args.loras)} adapter(s) into {model.kind} model {args.model}; saved {kind} {args.save_to}"


def _note_unlisted_blocks(files, per_file) -> None:
    """Notes where a --lbws vector (kohya's spelling) weighs modules of the files otherwise than kohya's
    svd_merge_lora.py/sdxl_merge_lora.py: lorakit follows LoRA Block Weight's rule everywhere, so the merge equals
    the adapters running with the same vector."""
    from .merge import adapter_keys

    names = [{k.partition(".")[0] for k in adapter_keys(file)} for file in files]
    _note_zeroed_blocks(files, names, per_file)
    _note_kohya_embeddings(files, names, per_file)


def _note_zeroed_blocks(files, names, per_file) -> None:
    """One line when a 17/12-value vector gives weight 0 to modules of the files (LoRA Block Weight's to26());
    kohya keeps them at 1."""
    from .concat import unlisted_block_modules

    found, blocks, length = [], set(), 0
    for file, modules, vector in zip(files, names, per_file):
        unlisted = unlisted_block_modules(modules, vector, None)
        if unlisted:
            found.append(f"{len(unlisted)} module(s) of {os.path.basename(file)}")
            blocks.update(unlisted.values())
            length = len(vector)
    if found:
        full = "26" if length == 17 else "20"
        print(f"lorakit merge: note: --lbws with {length} values gives the blocks it leaves out weight 0, as the "
              f"LoRA Block Weight extension does: {', '.join(found)} lie there ({', '.join(sorted(blocks))}); "
              f"kohya's svd_merge_lora.py keeps them at 1 (to keep them, give the {full}-value vector with 1 there)",
              file=sys.stderr)


def _note_kohya_embeddings(files, names, per_file) -> None:
    """One line when a 20-value SDXL vector with IN00 != 1 meets time/label-embedding modules: kohya gives them
    IN00's value, lorakit (with the LoRA Block Weight extension, whose blocks do not hold them) keeps 1."""
    from .concat import kohya_embedding_modules

    found = []
    for file, modules, vector in zip(files, names, per_file):
        embeddings = kohya_embedding_modules(modules, vector, None)
        if embeddings:
            found.append(f"{len(embeddings)} module(s) of {os.path.basename(file)}")
    if found:
        print(f"lorakit merge: note: --lbws with 20 values keeps the SDXL time and label embedding (time_embed, "
              f"label_emb) at 1, as the LoRA Block Weight extension's blocks leave them out: {', '.join(found)}; "
              f"kohya's svd_merge_lora.py/sdxl_merge_lora.py give them IN00's value", file=sys.stderr)


def _check_adapter_arch(args) -> None:
    """--v2/--sdxl without a model: the adapters' names must not say otherwise."""
    if not (args.v2 or args.sdxl):
        return
    from .merge import adapter_arch, adapter_keys

    want = "sdxl" if args.sdxl else "sd"
    for file in args.loras:
        arch = adapter_arch(adapter_keys(file))
        if arch is not None and arch != want:
            raise ValueError(f"{file}: is an adapter for {'SDXL' if arch == 'sdxl' else 'SD1/SD2'} models, but "
                             f"{'--sdxl' if args.sdxl else '--v2'} was given")


def _check_not_checkpoints(files) -> None:
    from ..models.detect import classify_keys
    from ..models.model import KINDS
    from .merge import adapter_keys

    for file in files:
        kind = classify_keys(adapter_keys(file))
        if kind in KINDS:
            raise ValueError(f"{file}: is a model checkpoint ({kind}), not an adapter; give the model with --model "
                             f"and adapter files with --loras")
