"""Resize a LoRA/LoCon file: a lower rank per module by SVD of up @ down, or DyLoRA's cut to its first k components.

No base model and no dim-sized matrix: the SVD of up (out x r) @ down (r x in*k) is taken from the QR of both factors
(lowrank.svd_of_product), so each module costs O((out + in*k) r^2). Ranks follow kohya's `networks/resize_lora.py`:
`new_rank` (and `new_conv_rank` for convs with kernel > 1) is the rank, or the cap of a dynamic method (`sv_ratio`,
`sv_fro`, `sv_cumulative`, see lowrank.py); the new alpha keeps each module's scale (alpha_new = scale * rank_new).
Tucker modules (`lora_mid`) are rebuilt as plain LoCon (their product is factored exactly). Modules of other
algorithms, and `dora_scale`, are copied unchanged.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field

import torch

from . import lowrank
from .merge import with_named_base_model

__all__ = ["lora_modules", "module_factors", "resize_lora", "ResizeResult", "fro_summary"]

DYNAMIC = ("sv_ratio", "sv_fro", "sv_cumulative")


def lora_modules(tensors: dict[str, torch.Tensor], where: str = "the state dict") -> tuple[
        dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """({module name: {suffix: tensor}} of the LoRA/LoCon modules, {key: tensor} of everything else). A module
    with one of lora_down/lora_up but not the other is an error naming it, never copied on as half a module."""
    from ..network.names import group_by_module

    groups = group_by_module(tensors)
    loras, other = {}, {}
    for name, sub in groups.items():
        if "lora_down.weight" in sub and "lora_up.weight" in sub:
            loras[name] = sub
        elif "lora_down.weight" in sub or "lora_up.weight" in sub:
            has, lacks = ("lora_down", "lora_up") if "lora_down.weight" in sub else ("lora_up", "lora_down")
            raise ValueError(f"{where}: module '{name}' has {has}.weight but no {lacks}.weight (a damaged or "
                             "incomplete file)")
        else:
            other.update({f"{name}.{k}": v for k, v in sub.items()})
    return loras, other


def module_factors(sub: dict[str, torch.Tensor], dtype=torch.float32, where: str = "") -> tuple[torch.Tensor, torch.Tensor, tuple, float]:
    """(up (out x r), down (r x in*k), weight shape, scale) of one LoRA module, dW = scale * up @ down. A Tucker
    module's mid and down are contracted into one (a x in*k) down factor."""
    down, up = sub["lora_down.weight"].to(dtype), sub["lora_up.weight"].to(dtype)
    r = down.shape[0]
    if up.shape[1] != r:
        raise ValueError(f"{where}: lora_up.weight {tuple(up.shape)} and lora_down.weight {tuple(down.shape)} have "
                         "different ranks")
    alpha = float(sub["alpha"]) if "alpha" in sub else float(r)  # no alpha: alpha = dim, as kohya and the UIs read it
    scale = alpha / r
    if "lora_mid.weight" in sub:
        mid = sub["lora_mid.weight"].to(dtype)  # (a, b, *kernel), down (b, in, 1..)
        kernel = tuple(mid.shape[2:])
        full_down = torch.einsum("ab...,bi->ai...", mid, down.flatten(1))  # (a, in, *kernel)
        shape = (up.shape[0], down.shape[1], *kernel)
        return up.flatten(1), full_down.reshape(r, -1), shape, scale
    shape = (up.shape[0], *down.shape[1:])
    return up.flatten(1), down.flatten(1), shape, scale


def _kernel_numel(shape) -> int:
    return math.prod(shape[2:]) if len(shape) > 2 else 1


@dataclass
class ResizeResult:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    layers: dict[str, dict] = field(default_factory=dict)  # name -> {"old_rank", "rank", "fro", "energy", ...}
    copied: list[str] = field(default_factory=list)  # keys of modules that are not LoRA, copied as they are


def _is_dylora(metadata: dict[str, str]) -> bool:
    return "dylora" in metadata.get("ss_network_module", "").lower() or \
        "dylora" in metadata.get("ss_network_args", "").lower()


def resize_lora(source, new_rank: int, out=None, *, new_conv_rank: int | None = None, dynamic_method: str | None = None,
                dynamic_param: float | None = None, dylora: bool | None = None, save_dtype: torch.dtype | None = None,
                device: str = "cpu") -> ResizeResult:
    """Resize a LoRA/LoCon file (path) or state dict. `dylora`: cut to the first k components instead of an SVD
    (None: when the file's metadata says DyLoRA). Writes `out` atomically when given, every floating tensor in
    `save_dtype`; None keeps each tensor's dtype, a new factor taking that of the tensor it replaces
    (`default_save_dtypes`)."""
    from ..network.load import check_layout, read_adapter_tensors, without_bundled_embeddings

    tensors, metadata, where = read_adapter_tensors(source)
    tensors = without_bundled_embeddings(tensors, where)
    check_layout(tensors, where)
    if not isinstance(new_rank, int) or new_rank < 1:
        raise ValueError(f"new_rank must be a whole number >= 1, got {new_rank!r}")
    new_conv_rank = new_rank if new_conv_rank is None else new_conv_rank
    if not isinstance(new_conv_rank, int) or new_conv_rank < 1:
        raise ValueError(f"new_conv_rank must be a whole number >= 1, got {new_conv_rank!r}")
    if dynamic_method is not None:
        if dynamic_method not in DYNAMIC:
            raise ValueError(f"dynamic_method must be one of {', '.join(DYNAMIC)}, got {dynamic_method!r}")
        lowrank.check_mode(dynamic_method, dynamic_param, "dynamic_param")
    marked = _is_dylora(metadata)
    if dylora and not marked:  # asked for, on a file that does not say it was trained as one
        warnings.warn(f"{where}: cut as a DyLoRA, but its metadata (ss_network_module/ss_network_args) names no "
                      "DyLoRA: a LoRA trained otherwise keeps its change in all its components, and the SVD resize "
                      "(without --dylora) keeps the most of it", stacklevel=2)
    dylora = marked if dylora is None else dylora
    if dylora and dynamic_method is not None:
        raise ValueError("a DyLoRA cut keeps the first k components; it takes new_rank, not a dynamic_method")
    loras, other = lora_modules(tensors, where)
    if not loras:
        raise ValueError(f"{where}: holds no LoRA/LoCon module (lora_down/lora_up): nothing to resize")
    result = ResizeResult({}, {}, copied=sorted(other))
    old_ranks = []
    with torch.no_grad():
        for name, sub in loras.items():
            down = sub["lora_down.weight"]
            old = down.shape[0]
            old_ranks.append(old)
            is_conv = down.dim() > 2 and (_kernel_numel(down.shape) > 1 or "lora_mid.weight" in sub)
            cap = new_conv_rank if is_conv else new_rank
            if dylora:
                new = _dylora_cut(sub, cap, name, where)
            else:
                new = _svd_resize(sub, cap, dynamic_method, dynamic_param, device, f"{where}: module '{name}'")
            report = new.pop("_report")
            report.update(old_rank=old, conv=is_conv)
            result.layers[name] = report
            if "dora_scale" in sub:
                new["dora_scale"] = sub["dora_scale"]
            result.tensors.update({f"{name}.{k}": v for k, v in new.items()})
    result.tensors.update(other)
    result.metadata = with_named_base_model(
        _metadata(metadata, result, new_rank, new_conv_rank, dynamic_method, dynamic_param, dylora, max(old_ranks)),
        result.tensors)
    if out is not None:
        from ..formats import add_hashes, prepare_tensors
        from ..formats.safetensors_io import save_tensors

        kept = default_save_dtypes(result.tensors, loras)
        cast = prepare_tensors({k: v if save_dtype else v.to(kept[k]) for k, v in result.tensors.items()}, save_dtype)
        result.metadata = add_hashes(cast, result.metadata)
        save_tensors(cast, out, metadata=result.metadata)
    return result


def default_save_dtypes(tensors: dict[str, torch.Tensor], loras: dict[str, dict[str, torch.Tensor]]) -> dict[
        str, torch.dtype]:
    """{key: dtype} of a resized file saved without a save dtype: a resized module's lora_up/lora_down/alpha take
    the dtype of the tensor they replace (a missing alpha that of the factors; a Tucker down the wider of
    lora_down and lora_mid), so a file mixing dtypes keeps each module's; everything else keeps its own. A float8
    source gives float16 (`_no_float8`)."""
    out = {k: v.dtype for k, v in tensors.items()}
    for name, sub in loras.items():
        kept = {k: _no_float8(v.dtype) for k, v in sub.items()}  # torch promotes no float8 dtype
        up, down = kept["lora_up.weight"], kept["lora_down.weight"]
        down = torch.promote_types(down, kept["lora_mid.weight"]) if "lora_mid.weight" in kept else down
        alpha = kept.get("alpha", torch.promote_types(down, up))
        if not alpha.is_floating_point:  # an int alpha (sd-scripts with network_alpha 0): the new one is fractional
            alpha = torch.promote_types(down, up)
        out.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": alpha})
    return out


def _no_float8(dtype: torch.dtype) -> torch.dtype:
    """float16 for a float8 dtype: resized factors are new values, and float8 would round them 100x more (kohya's
    resize_lora.py saves float when no precision is given). float16 holds every float8_e4m3fn/e5m2 value exactly
    (as wide an exponent range, more mantissa bits) at half float32's size."""
    return torch.float16 if dtype.is_floating_point and dtype.itemsize == 1 else dtype


def _dylora_cut(sub, k, name, where) -> dict:
    down, up = sub["lora_down.weight"], sub["lora_up.weight"]
    if "lora_mid.weight" in sub:
        raise ValueError(f"{where}: module '{name}' is in Tucker form (lora_mid); DyLoRA files never are")
    r = down.shape[0]
    k = min(k, r)
    alpha = sub.get("alpha", torch.tensor(float(r)))
    # DyLoRA trains every prefix of its components at scale alpha / k: the cut keeps alpha
    out = {"lora_down.weight": down[:k].clone(), "lora_up.weight": up[:, :k].clone(), "alpha": alpha.clone()}
    return {**out, "_report": {"rank": k, "cut": True}}


def _svd_resize(sub, cap, method, param, device, where) -> dict:
    up, down, shape, scale = module_factors(sub, torch.float32, where)
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise ValueError(f"{where}: holds NaN or Inf values; it cannot be resized")
    up, down = up.to(device), down.to(device)
    U, S, Vh = lowrank.svd_of_product(up, down)
    mode, p = (method, param) if method else ("fixed", cap)
    if float(S[0]) <= 1e-6:  # kohya's MIN_SV: a zero module keeps one component
        k = 1
    else:
        k = lowrank.select_rank(S, mode, p, max_rank=cap)
    report = lowrank.retained(S, k)
    new_up, new_down = lowrank.split_factors(U, S, Vh, k)
    kernel = shape[2:]
    tensors = {"lora_up.weight": new_up.reshape(shape[0], k, *(1,) * len(kernel)).cpu(),
               "lora_down.weight": new_down.reshape(k, *shape[1:]).cpu(),
               "alpha": torch.tensor(scale * k)}
    return {**tensors, "_report": report}


def _metadata(metadata, result, new_rank, new_conv_rank, method, param, dylora, old_dim) -> dict[str, str]:
    meta = dict(metadata)
    comment = meta.get("ss_training_comment", "")
    linear, conv = _dim_alpha(result, conv=False), _dim_alpha(result, conv=True)
    if dylora:
        meta["ss_training_comment"] = f"DyLoRA cut from {old_dim} to {new_rank}; {comment}"
        meta["ss_network_dim"] = linear[0]
    elif method is None:
        conv_note = "" if new_conv_rank == new_rank else f" (conv: {new_conv_rank})"
        meta["ss_training_comment"] = f"dimension is resized from {old_dim} to {new_rank}{conv_note}; {comment}"
        meta["ss_network_dim"], meta["ss_network_alpha"] = linear
    else:
        meta["ss_training_comment"] = f"Dynamic resize with {method}: {param} from {old_dim}; {comment}"
        meta["ss_network_dim"] = "Dynamic"
        meta["ss_network_alpha"] = "Dynamic"
    _update_conv_args(meta, conv, dynamic=method is not None)
    kept = fro_summary(result.layers)
    meta["lorakit_resize"] = json.dumps({"new_rank": new_rank, "new_conv_rank": new_conv_rank, "dynamic_method": method,
                                         "dynamic_param": param, "dylora_cut": bool(dylora), "old_dim": old_dim,
                                         "mean_fro_retained": kept and kept["mean"]}, sort_keys=True)
    for key in ("sshs_model_hash", "sshs_legacy_hash"):
        meta.pop(key, None)  # recomputed for the new tensors when saved
    return meta


def fro_summary(layers: dict[str, dict]) -> dict | None:
    """Mean and minimum retained Frobenius norm over the modules resized by SVD that had a change (`modules` of
    `of` resized): an untrained module (e.g. lora_up all zero) has no fraction to keep and is left out, as in
    kohya's average. None when no module counts."""
    fro = [r["fro"] for r in layers.values() if r.get("fro") is not None]
    if not fro:
        return None
    return {"mean": sum(fro) / len(fro), "min": min(fro), "modules": len(fro), "of": len(layers)}


def _dim_alpha(result, conv: bool) -> tuple[str, str] | None:
    """(largest rank, shared alpha or "Dynamic") of the resized Linear/1x1 modules (`conv` False; all modules
    where there are none) or kxk convs (`conv` True; None where there are none): what ss_network_dim/alpha and
    conv_dim/conv_alpha describe. A rank is never raised, so the largest is at most the requested one."""
    names = [n for n, r in result.layers.items() if r["conv"] == conv]
    if not names:
        if conv:
            return None
        names = list(result.layers)
    alphas = {float(result.tensors[f"{n}.alpha"]) for n in names}
    dim = max(result.layers[n]["rank"] for n in names)
    return str(dim), (str(alphas.pop()) if len(alphas) == 1 else "Dynamic")


def _update_conv_args(meta: dict[str, str], conv: tuple[str, str] | None, dynamic: bool) -> None:
    """conv_dim and conv_alpha of ss_network_args (kohya's JSON form), updated together for the resized convs."""
    if conv is None or not meta.get("ss_network_args", "").strip().startswith("{"):
        return
    try:
        args = json.loads(meta["ss_network_args"])
    except json.JSONDecodeError:
        return
    if "conv_dim" not in args:
        return
    args["conv_dim"], args["conv_alpha"] = ("Dynamic", "Dynamic") if dynamic else conv
    meta["ss_network_args"] = json.dumps(args)
