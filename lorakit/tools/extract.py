"""Extract a LoRA/LoCon from a fine-tuned checkpoint and its base: per layer, factor tuned - base at a low rank.

Layers and their names come from `create_network(..., preset=...)` on the base model, so the file holds exactly
the kohya names `load_network` reads back. Linear and 1x1 convs use `linear_*`, convs with a kernel > 1 `conv_*`
(optionally in Tucker form). A layer whose low-rank factors would hold at least as many numbers as the change
itself is stored whole (`diff`, plus `diff_b` when its bias changed). Saved alpha = rank (scale 1), as LyCORIS
and kohya write extracted files.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..formats.modelspec import base_model_version
from . import lowrank

__all__ = ["extract_lora", "ExtractResult", "extract_layer", "progress", "stored_whole_warning"]

def progress(items, desc: str, enabled: bool = True):
    """tqdm over items when tqdm is installed and enabled; the plain iterable otherwise."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are a convenience
        return items
    return tqdm(items, desc=desc, leave=False)


@dataclass
class ExtractResult:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    layers: dict[str, dict] = field(default_factory=dict)  # name -> {"kind", "rank" | "full", "fro", ...}
    skipped: list[str] = field(default_factory=list)  # layers whose change is <= min_diff
    bias_dropped: list[str] = field(default_factory=list)  # low-rank layers whose bias changed (LoRA has no bias)
    not_extracted: list[str] = field(default_factory=list)  # other changed tensors ("component:param"): norms, ...


def _tucker(up: torch.Tensor, down: torch.Tensor, in_dim: int, kernel: tuple[int, ...]):
    """Down (r, in*k) -> lora_down (r, in, 1..) and lora_mid (r, r, *kernel): sequential truncated HOSVD along
    the input mode (LyCORIS' construction). Exact when the change has Tucker ranks <= r."""
    r = down.shape[0]
    kk = math.prod(kernel)
    unfold = down.reshape(r, in_dim, kk).permute(1, 0, 2).reshape(in_dim, r * kk)  # (in, r*kk)
    U, S, Vh = torch.linalg.svd(unfold, full_matrices=False)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    mid = (S[:, None] * Vh).reshape(r, r, kk).permute(1, 0, 2).reshape(r, r, *kernel)  # (a=r, b=r2, k...)
    lora_down = U.mT.reshape(r, in_dim, *(1,) * len(kernel))
    return up, mid, lora_down


def _tucker_retained(delta, up, mid, down) -> dict:
    """fro/energy of what the Tucker factors keep: they are two orthogonal projections of the change (output side,
    input side), so the kept energy is 1 - |delta - kept|^2 / |delta|^2."""
    r, kk = mid.shape[0], mid[0, 0].numel()
    kept = torch.einsum("oa,abk,bi->oik", up.double(), mid.double().reshape(r, r, kk),
                        down.double().reshape(r, -1))
    total = float(delta.double().square().sum())
    lost = float((delta.double().reshape(kept.shape[0], kept.shape[1], kk) - kept).square().sum())
    energy = 1.0 - lost / total if total > 0 else 1.0
    return {"energy": energy, "fro": math.sqrt(max(energy, 0.0)), "sum": None}


def extract_layer(delta: torch.Tensor, mode: str, param: float, max_rank: int | None, *, tucker: bool = False,
                  svd: str = "auto", niter: int = 2, oversample: int | None = None, full_fallback: bool = True,
                  generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """One layer's change (out, in, *kernel) -> (tensors without the name prefix, report)."""
    out_dim, in_dim, kernel = delta.shape[0], delta.shape[1], tuple(delta.shape[2:])
    kk = math.prod(kernel)
    flat = delta.reshape(out_dim, in_dim * kk)
    cap = min(out_dim, in_dim * kk, *(() if max_rank is None else (max_rank,)))
    lr = lowrank.low_rank(flat, mode, param, cap, svd, niter, oversample, generator)
    r = lr.rank
    tucker = tucker and kk > 1 and _tucker_fits(r, out_dim, in_dim)
    params = r * out_dim + (r * r * kk + r * in_dim if tucker else r * in_dim * kk)
    report = dict(lr.report)
    if full_fallback and params >= out_dim * in_dim * kk:
        report.update(full=True, rank=None, needed_rank=r, energy=1.0, fro=1.0)  # stored whole: nothing lost
        return {"diff": delta.clone()}, report
    ones = (1,) * len(kernel)
    up = lr.up.reshape(out_dim, r, *ones)
    if tucker:
        up, mid, down = _tucker(lr.up, lr.down, in_dim, kernel)
        tensors = {"lora_up.weight": up.reshape(out_dim, r, *ones), "lora_mid.weight": mid, "lora_down.weight": down}
        report.update(_tucker_retained(delta, up, mid, down))  # the input-mode cut loses more than the SVD's
    else:
        tensors = {"lora_up.weight": up, "lora_down.weight": lr.down.reshape(r, in_dim, *kernel)}
    tensors["alpha"] = torch.tensor(float(r))
    report.update(full=False, tucker=tucker)
    return tensors, report


def _tucker_fits(rank: int, out_dim: int, in_dim: int) -> bool:
    """Whether the Tucker form is used at `rank`: only below half the smaller channel count, LyCORIS' bound
    (extract_conv stores a layer whole from rank >= out/2). Above it the input-mode cut to `rank` loses much of
    what the plain form keeps (conv_out, 4 outputs: 42% of the norm against all of it; conv_in, 4 inputs, caps
    the Tucker rank at 4), so the plain LoCon form (or the whole layer, by the usual fallback) is stored."""
    return 2 * rank < min(out_dim, in_dim)


def _components(model) -> dict[str, torch.nn.Module]:
    names = ["text_encoder", "text_encoder_2"][: len(model.text_encoders)]
    return {"unet": model.unet, **dict(zip(names, model.text_encoders))}


def _load(source, what: str):
    if hasattr(source, "unet") and hasattr(source, "kind"):
        return source, getattr(source, "source", "") or what
    from ..models.load import load_model

    return load_model(source), os.fspath(source)


def extract_lora(base, tuned, out: str | os.PathLike | None = None, *, mode: str = "fixed",
                 linear_dim: int | None = 64, conv_dim: int | None = None, linear_param: float | None = None,
                 conv_param: float | None = None, use_tucker: bool = False, svd: str = "auto", niter: int = 2,
                 oversample: int | None = None, min_diff: float = 0.0, full_fallback: bool = True,
                 preset: str = "full", text_encoders: bool = True, save_dtype: torch.dtype | None = torch.float16,
                 compute_dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                 show_progress: bool = True) -> ExtractResult:
    """Extract tuned - base as a LoRA/LoCon. `base`/`tuned`: model files, diffusers folders (`load_model`) or
    loaded `StableDiffusionModel`s. Mode `fixed`: ranks `linear_dim` / `conv_dim` (conv_dim None = linear_dim,
    0 = leave convs with kernel > 1 out). Other modes (see lowrank.py): `linear_param` / `conv_param` (None = the
    linear one) select the rank, and `linear_dim` / `conv_dim` cap it (None = no cap). `min_diff`: layers whose
    largest change |tuned - base| is <= it are left out. Writes `out` atomically in `save_dtype` when given."""
    from ..network import create_network

    lowrank.check_mode(mode, linear_dim if mode == "fixed" else linear_param, "mode/linear_dim" if mode == "fixed"
                       else "mode/linear_param")
    conv_dim = linear_dim if conv_dim is None else conv_dim
    if mode != "fixed":
        conv_param = linear_param if conv_param is None else conv_param
        lowrank.check_mode(mode, conv_param, "mode/conv_param")
    elif conv_dim:
        lowrank.check_mode(mode, conv_dim, "mode/conv_dim")
    if min_diff < 0:
        raise ValueError(f"min_diff must be >= 0, got {min_diff!r}")
    base_model, base_name = _load(base, "base")
    tuned_model, tuned_name = _load(tuned, "tuned")
    if base_model.kind != tuned_model.kind:
        raise ValueError(f"base {base_name} is {base_model.kind} but tuned {tuned_name} is {tuned_model.kind}: "
                         "extract needs two models of the same architecture")
    base_parts, tuned_parts = _components(base_model), _components(tuned_model)
    tes = base_model.text_encoders if text_encoders else None
    # the network only enumerates the targets and their file names; its tiny adapters are never applied
    net = create_network(base_model.unet, tes, algo="lora", preset=preset, dim=1, conv_dim=1)
    entries = list(net.entries.items())
    del net

    tensors: dict[str, torch.Tensor] = {}
    result = ExtractResult(tensors, {})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, entry in progress(entries, "extract", show_progress):
            b = base_parts[entry.component].get_submodule(entry.path)
            t = tuned_parts[entry.component].get_submodule(entry.path)
            if b.weight.shape != t.weight.shape:
                raise ValueError(f"layer {entry.component}:{entry.path} ({name}) has shape {tuple(b.weight.shape)} "
                                 f"in base {base_name} but {tuple(t.weight.shape)} in tuned {tuned_name}")
            is_conv = b.weight.dim() > 2 and math.prod(b.weight.shape[2:]) > 1
            if is_conv and mode == "fixed" and not conv_dim:
                continue
            delta = t.weight.to(device, compute_dtype) - b.weight.to(device, compute_dtype)
            if delta.numel() == 0 or float(delta.abs().max()) <= min_diff:
                result.skipped.append(name)
                continue
            param = (conv_dim if is_conv else linear_dim) if mode == "fixed" else (conv_param if is_conv else linear_param)
            cap = None if mode == "fixed" else (conv_dim if is_conv else linear_dim) or None
            sub, report = extract_layer(delta, mode, param, cap, tucker=use_tucker and is_conv, svd=svd, niter=niter,
                                        oversample=oversample, full_fallback=full_fallback, generator=gen)
            bias_changed = b.bias is not None and t.bias is not None and not torch.equal(b.bias, t.bias)
            if report["full"] and bias_changed:
                sub["diff_b"] = t.bias.to(compute_dtype) - b.bias.to(compute_dtype)
            elif bias_changed:
                result.bias_dropped.append(name)
            report["kind"] = "conv" if is_conv else "linear"
            result.layers[name] = report
            tensors.update({f"{name}.{k}": v.to("cpu") for k, v in sub.items()})
        result.not_extracted = _changed_elsewhere(base_parts, tuned_parts, {(e.component, e.path) for _, e in entries},
                                                  min_diff, include_text=text_encoders)
    if not tensors:
        raise ValueError(f"tuned {tuned_name} does not differ from base {base_name} in any selected layer by more "
                         f"than min_diff={min_diff} (preset {preset!r}): nothing to extract")
    settings = {"mode": mode, "linear_dim": linear_dim, "conv_dim": conv_dim, "linear_param": linear_param,
                "conv_param": conv_param, "use_tucker": use_tucker, "svd": svd, "niter": niter, "oversample": oversample,
                "min_diff": min_diff, "full_fallback": full_fallback, "preset": preset, "text_encoders": text_encoders,
                "base": os.path.basename(base_name), "tuned": os.path.basename(tuned_name),
                "layers": len(result.layers), "full_layers": sum(1 for r in result.layers.values() if r["full"]),
                "skipped_layers": len(result.skipped), "bias_dropped_layers": len(result.bias_dropped),
                "not_extracted_tensors": len(result.not_extracted)}
    result.metadata = _metadata(base_model, settings, out, result.layers)
    if out is not None:
        save(result, out, save_dtype)
    return result


def _changed_elsewhere(base_parts, tuned_parts, selected: set, min_diff: float, include_text: bool) -> list[str]:
    """Tensors of the U-Net (and text encoders) outside the selected layers that changed by more than min_diff:
    norms, embeddings, SDXL's add_embedding, ... (a LoRA cannot carry them; the user should know they are lost)."""
    changed = []
    for component, part in base_parts.items():
        if component != "unet" and not include_text:
            continue
        tuned = dict(tuned_parts[component].named_parameters())
        for name, p in part.named_parameters():
            path = name.rpartition(".")[0]
            if (component, path) in selected or name not in tuned or tuned[name].shape != p.shape:
                continue
            if float((tuned[name].float() - p.float()).abs().max()) > min_diff:
                changed.append(f"{component}:{name}")
    return changed


def _rank_label(ranks: set[int]) -> str:
    """kohya's dim value: the one rank written, or `Dynamic` (its word for ranks that differ; here also for no
    module of that kind kept low-rank, where any number would be made up)."""
    return str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"


def _network_labels(settings: dict[str, Any], layers: dict[str, dict]) -> dict[str, str]:
    """ss_network_module/dim/alpha/args as the file is written. A file with a module stored whole (`diff`) is a
    LyCORIS file (`lycoris.kohya`, algo `locon`, or `full` when every module is whole), as sd-scripts labels what
    it trains with LyCORIS: kohya's `networks.lora` would tell sd-scripts users its merge_lora.py and
    --network_weights read the file, and they read only lora_down/lora_up. Dims are the ranks written (alpha =
    rank, scale 1). UIs load by keys; A1111 reads only ss_base_model_version/ss_v2 of these labels."""
    linear = {r["rank"] for r in layers.values() if not r["full"] and r["kind"] == "linear"}
    convs = {r["rank"] for r in layers.values() if not r["full"] and r["kind"] == "conv"}
    whole = sum(1 for r in layers.values() if r["full"])
    dim = _rank_label(linear)
    args: dict[str, Any] = {}
    if whole:
        args["algo"] = "full" if whole == len(layers) else "locon"
    if convs:
        args.update(conv_dim=_rank_label(convs), conv_alpha=_rank_label(convs))
    args["use_tucker"] = settings["use_tucker"]
    return {"ss_network_module": "lycoris.kohya" if whole else "networks.lora", "ss_network_dim": dim,
            "ss_network_alpha": dim, "ss_network_args": json.dumps(args)}


def stored_whole_warning(result: ExtractResult) -> str | None:
    """One line when modules were stored whole: the tools that will not apply them."""
    whole = sum(1 for r in result.layers.values() if r["full"])
    if not whole:
        return None
    return (f"{whole} of {len(result.layers)} modules are stored whole (diff), so the file is labelled LyCORIS "
            "(lycoris.kohya): A1111, ComfyUI and LyCORIS apply them, sd-scripts' networks/merge_lora.py and "
            "--network_weights skip them (--no_full_fallback stores them as larger LoRA factors)")


def _metadata(model, settings: dict[str, Any], out, layers: dict[str, dict]) -> dict[str, str]:
    from ..formats import build_modelspec

    meta = {
        **_network_labels(settings, layers),
        "ss_v2": str(model.kind == "sd2"),
        "ss_base_model_version": base_model_version(model.kind, model.v_parameterization),
        "ss_sd_model_name": settings["base"],
        "ss_training_comment": f"extracted by lorakit extract: {settings['tuned']} - {settings['base']}, mode "
                               f"{settings['mode']}",
        "lorakit_extract": json.dumps(settings, sort_keys=True),
    }
    kind = "sd2-v" if model.kind == "sd2" and model.v_parameterization else model.kind
    title = os.path.splitext(os.path.basename(out))[0] if out is not None else settings["tuned"] or "extracted"
    meta.update(build_modelspec(kind, title=title or "extracted"))
    return meta


def save(result: ExtractResult, out, dtype: torch.dtype | None = torch.float16) -> None:
    """Cast, hash (kohya's sshs_* of the cast tensors) and write atomically."""
    from ..formats import add_hashes, prepare_tensors
    from ..formats.safetensors_io import save_tensors

    tensors = prepare_tensors(result.tensors, dtype)
    result.metadata = add_hashes(tensors, result.metadata)
    save_tensors(tensors, out, metadata=result.metadata)
