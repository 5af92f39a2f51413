"""Merge several LoRA/LoCon files into one of a new rank: per module, sum ratio_i * block weight_i * scale_i *
up_i @ down_i and re-factor the sum by SVD. The sum stays factored (the factors side by side, rank = the sum of the
ranks), so the SVD is of a small core (lowrank.svd_of_product); only modules stored whole (`diff`) make the sum
dense. Modules in only some files are included. Saved alpha = the new rank (scale 1), as kohya's svd_merge_lora
writes it."""

from __future__ import annotations

import json
import logging
import os

import torch

from . import lowrank
from .concat import canonical_name
from .extract import progress as show_progress
from .resize import lora_modules, module_factors

__all__ = ["merge_loras_svd"]

logger = logging.getLogger(__name__)


def _read(source):
    """(tensors, metadata, where) with text-encoder names in one spelling (LyCORIS and transformers-5 trainers leave
    out `text_model_`), so that the same layer in two files sums into one module."""
    from ..network.load import check_layout, read_adapter_tensors, warn_non_finite, without_bundled_embeddings
    from ..network.names import split_key

    tensors, metadata, where = read_adapter_tensors(source)
    tensors = without_bundled_embeddings(tensors, where)
    check_layout(tensors, where)
    warn_non_finite(tensors, where)
    canonical: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name, suffix = split_key(key)
        new = f"{canonical_name(name)}.{suffix}"
        if new in canonical:
            raise ValueError(f"{where}: '{key}' and another key name the same tensor ({new})")
        canonical[new] = value
    return canonical, metadata, where


def merge_loras_svd(files: list, ratios: list[float], new_rank: int, new_conv_rank: int | None = None, out=None,
                    device="cpu", dtype=None, progress: bool = True, modelspec: bool = True,
                    block_weights=None) -> dict[str, torch.Tensor]:
    """The merged state dict (float32 unless `dtype`); written to `out` atomically, with metadata, when given
    (`modelspec` False: the ss_* keys only). `block_weights` as `merge_loras` takes them: each module's part is
    multiplied by its block weight before the SVD, as kohya's svd_merge_lora.py applies --lbws."""
    from .concat import common_arch, module_block_weights
    from .merge import check_block_weights

    if len(files) != len(ratios):
        raise ValueError(f"merge_loras_svd: {len(files)} file(s) but {len(ratios)} ratio(s); give one ratio per file")
    if not files:
        raise ValueError("merge_loras_svd: no files given")
    for option, value in (("new_rank", new_rank), ("new_conv_rank", new_conv_rank)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"merge_loras_svd: {option} must be a whole number >= 1, got {value!r}")
    new_conv_rank = new_rank if new_conv_rank is None else new_conv_rank
    read = [_read(source) for source in files]
    names = [os.path.basename(where) if not isinstance(source, dict) else "state dict"
             for source, (_, _, where) in zip(files, read)]
    modules = [(where, [k.partition(".")[0] for k in tensors]) for tensors, _, where in read]
    arch = common_arch(modules)
    per_file = check_block_weights(block_weights, len(files), arch)
    weights = [module_block_weights(set(mods), bw, arch) for (_, mods), bw in zip(modules, per_file)]
    summed = _Sum(device)
    for (tensors, _, where), ratio, module_weights in zip(read, ratios, weights):
        summed.add(tensors, where, float(ratio), module_weights)
    if not summed.names():
        raise ValueError("the merged LoRA would be empty: every ratio (or block weight) is 0")
    if summed.bias_left_out:
        logger.warning("%d module(s) stored whole change their bias too (diff_b, e.g. %s); a LoRA has no bias, so the "
                       "merged file leaves those changes out: merge the files into a model with --model to keep them",
                       len(summed.bias_left_out), sorted(summed.bias_left_out)[0])
    merged: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, bool]] = {}  # name -> (rank written, kxk conv)
    with torch.no_grad():
        for name in show_progress(summed.names(), "merge (svd)", progress):
            shape = summed.shapes[name]
            is_conv = len(shape) > 2 and shape[2:] != (1,) * (len(shape) - 2)
            up, down, k = summed.factor(name, new_conv_rank if is_conv else new_rank)
            kernel = shape[2:]
            merged[f"{name}.lora_down.weight"] = down.reshape(k, *shape[1:]).cpu()
            merged[f"{name}.lora_up.weight"] = up.reshape(shape[0], k, *(1,) * len(kernel)).cpu()
            merged[f"{name}.alpha"] = torch.tensor(float(k))
            ranks[name] = (k, is_conv)
    if dtype is not None:
        merged = {k: v.to(dtype) for k, v in merged.items()}
    if out is not None:
        from ..formats import add_hashes, prepare_tensors
        from ..formats.safetensors_io import save_tensors
        from .merge import merged_lora_metadata

        settings = {"files": names, "ratios": [float(r) for r in ratios], "new_rank": new_rank,
                    "new_conv_rank": new_conv_rank, "block_weights": per_file}
        meta, kind = _metadata([m for _, m, _ in read], ranks, settings)
        meta = merged_lora_metadata(meta, kind, out, names, modelspec=modelspec)
        cast = prepare_tensors(merged, dtype)
        meta = add_hashes(cast, meta)
        save_tensors(cast, out, metadata=meta)
    return merged


class _Sum:
    """Per module name, the weighted sum of the files' changes: (up, down) pairs side by side (scale, ratio and
    block weight folded into up) and, for modules stored whole (`diff`), a dense part."""

    def __init__(self, device):
        self.device = device
        self.pairs: dict[str, list] = {}
        self.dense: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple] = {}  # the weight shape of every module seen, checked across files
        self.bias_left_out: set[str] = set()  # modules stored whole whose bias change a LoRA cannot carry

    def names(self) -> list[str]:
        return [n for n in self.shapes if n in self.pairs or n in self.dense]

    def add(self, tensors: dict[str, torch.Tensor], where: str, ratio: float, weights: dict[str, float]) -> None:
        """One file's modules at `ratio` times their block weight (a part weighted 0 is left out)."""
        loras, other = lora_modules(tensors, where)
        for name, sub in loras.items():
            extra = set(sub) - {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"}
            if extra:
                raise ValueError(f"{where}: module '{name}' has {sorted(extra)}: merge_loras_svd cannot merge it "
                                 "(DoRA magnitudes do not add)")
            up, down, shape, scale = module_factors(sub, torch.float32, f"{where}: module '{name}'")
            if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
                raise ValueError(f"{where}: module '{name}' holds NaN or Inf values; an SVD merge cannot use it")
            _check_shape(self.shapes, name, shape, where)
            factor = ratio * weights.get(name, 1.0) * scale
            if factor != 0:
                self.pairs.setdefault(name, []).append((up.to(self.device) * factor, down.to(self.device)))
        for name, sd in _full_modules(other, where).items():
            diff = sd["diff"]
            shape = tuple(diff.shape)
            _check_shape(self.shapes, name, shape, where)
            factor = ratio * weights.get(name, 1.0)
            if factor != 0:
                d = diff.to(self.device, torch.float32).reshape(shape[0], -1) * factor
                self.dense[name] = d if name not in self.dense else self.dense[name] + d
                if "diff_b" in sd and bool(sd["diff_b"].ne(0).any()):
                    self.bias_left_out.add(name)

    def factor(self, name: str, cap: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(up, down, k) of the sum's best rank-k approximation, k = min(cap, the sum's rank bound)."""
        ups = [u for u, _ in self.pairs.get(name, [])]
        downs = [d for _, d in self.pairs.get(name, [])]
        if name in self.dense:
            A = self.dense[name] + (torch.cat(ups, 1) @ torch.cat(downs, 0) if ups else 0)
            lr = lowrank.low_rank(A, "fixed", min(cap, *A.shape), svd="exact")
            return lr.up, lr.down, lr.rank
        U, S, Vh = lowrank.svd_of_product(torch.cat(ups, 1), torch.cat(downs, 0))
        k = min(cap, S.numel())
        up, down = lowrank.split_factors(U, S, Vh, k)
        return up, down, k


def _full_modules(other: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """{name: {"diff", maybe "diff_b"}} of the modules stored whole; a module of any other algorithm (LoHa, LoKr,
    ...) is refused, named as concat names it."""
    from .concat import module_algorithm, wrong_algorithm

    from ..network.names import group_by_module

    groups = group_by_module(other)
    full = {}
    for name, sd in groups.items():
        algo = module_algorithm(name, sd, where)
        if algo != "full":
            raise wrong_algorithm(
                where, name, sd, algo, "LoRA/LoCon and full modules (diff) can be merged by SVD (--new_rank); "
                "merge it into a model with --model, and `lorakit extract BASE MERGED OUT` gives a LoRA of its change")
        full[name] = sd
    return full


def _metadata(inputs: list[dict[str, str]], ranks: dict[str, tuple[int, bool]], settings: dict):
    """(kohya's network metadata of the ranks written, the base model keys of the inputs; the LoRA's kind).
    `ss_network_dim` is the largest rank written (a module whose summed change has a lower rank keeps it: the SVD
    never pads), alpha = rank in every module; conv_dim/conv_alpha likewise for the kxk convs."""
    from .concat import base_model_keys, lora_kind
    from .merge import adapter_arch

    linear = [k for k, conv in ranks.values() if not conv]
    convs = [k for k, conv in ranks.values() if conv]
    dim = max(linear or convs)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(float(dim))}
    if convs:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(max(convs)), "conv_alpha": str(float(max(convs)))})
    meta.update(base_model_keys(inputs))
    meta["ss_training_comment"] = "merged by lorakit merge_loras_svd: " + ", ".join(
        f"{n} x {r}" for n, r in zip(settings["files"], settings["ratios"]))
    meta["lorakit_merge_svd"] = json.dumps(settings)
    return meta, lora_kind(adapter_arch(ranks), meta)


def _check_shape(shapes: dict, name: str, shape: tuple, where: str) -> None:
    """Record the weight shape a module changes; a Linear-shaped and a 1x1-conv-shaped change of one layer sum
    into one, written 1x1-conv-shaped (concat.one_layer_shape)."""
    from .concat import one_layer_shape

    old = shapes.setdefault(name, shape)
    written = one_layer_shape(old, shape)
    if written is not None:
        shapes[name] = written
    else:
        raise ValueError(f"{where}: module '{name}' changes a weight of shape {shape}, but an earlier file's module "
                         f"of that name changes one of shape {old}")
