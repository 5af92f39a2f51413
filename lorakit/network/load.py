"""load_network: a network rebuilt from an adapter file alone (algorithms, dims and options from the tensors)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from ..algos import adapter_from_state_dict, as_loaded, detect_algorithm
from ..formats.peft_layout import SD_SCRIPTS_OFT_PREFIX, detect_layout, omi_to_kohya
from .create import index_model
from .names import GENERIC_PREFIX, group_by_module, split_key
from .network import Entry, Network

_PEFT_MARKERS = (".lora_A.", ".lora_B.", ".lora.up.", ".lora.down.", "lora_linear_layer", ".lora_magnitude_vector",
                 "_lora.up.", "_lora.down.")  # the last two: diffusers' attention-processor layout (to_q_lora.up)
_CHECKPOINT_MARKERS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
# textual-inversion embeddings bundled in a LoRA file (bundle_emb.<name>.<tensor>), which A1111 loads with it
_BUNDLED_EMBEDDING = "bundle_emb."


def read_adapter_tensors(source: str | Path | Mapping[str, torch.Tensor]) -> tuple[dict, dict, str]:
    """(tensors, metadata, a description for messages) of a file path or an in-memory state dict."""
    if isinstance(source, Mapping):
        return dict(source), {}, "the state dict"
    if str(source).lower().endswith((".ckpt", ".pt", ".pth", ".bin")):
        # sd-scripts' save_model_as ckpt/pt: plain tensors, read with weights_only=True (nothing else unpickles)
        from ..formats.checkpoint_file import CheckpointReader

        with CheckpointReader(source) as reader:
            _refuse_checkpoint(reader.keys(), f"{source}")  # before reading a whole model's tensors
            return {k: reader.get(k) for k in reader.keys()}, {}, f"{source}"
    from ..formats import load_file

    tensors, metadata = load_file(source)
    return tensors, metadata, f"{source}"


def check_layout(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse what is not an adapter in the LyCORIS/kohya layout, saying what it is instead."""
    if not tensors:
        raise ValueError(f"{where}: holds no tensors")
    keys = list(tensors)
    _refuse_checkpoint(keys, where)
    peft = [k for k in keys if any(m in k for m in _PEFT_MARKERS)]
    if peft:
        raise ValueError(f"{where}: is a PEFT/diffusers-layout LoRA (keys like '{peft[0]}'); convert it to the "
                         f"kohya/LyCORIS layout with `lorakit convert` first")
    if detect_layout(keys) == "omi":
        raise ValueError(f"{where}: is a OneTrainer OMI-layout file (keys like '{keys[0]}'); convert it to the "
                         f"kohya/LyCORIS layout with `lorakit convert --to kohya` first")
    dotted = [k for k in keys if split_key(k)[1].count(".") > 1]
    if dotted:
        raise ValueError(f"{where}: keys like '{dotted[0]}' give the module as a dotted path, which is not the "
                         f"kohya/LyCORIS layout (lora_unet_<module path with _>.lora_down.weight, "
                         f"lora_te_..., lycoris_...)")
    modules = group_by_module(tensors)
    named_as_adapters = any(name.startswith(("lora_", "lycoris_")) for name in modules)  # else: a typo is named
    if not named_as_adapters and not any(_holds_an_adapter(module) for module in modules.values()):
        raise ValueError(f"{where}: holds no adapter tensors (keys like '{keys[0]}'; an adapter module has "
                         f"lora_down/lora_up, hada_w1_a, lokr_w1, oft_blocks, diff, ... tensors): is it an "
                         f"embedding, a VAE or another kind of file?")


def _holds_an_adapter(module: Mapping[str, torch.Tensor]) -> bool:
    try:
        detect_algorithm(as_loaded(module))
    except ValueError:  # no algorithm's tensors, or an old Diag-OFT rotation that is none
        return False
    return True


def _refuse_checkpoint(keys, where: str) -> None:
    checkpoint = [k for k in keys if any(m in k for m in _CHECKPOINT_MARKERS)]
    if checkpoint:
        raise ValueError(f"{where}: is a model checkpoint (keys like '{checkpoint[0]}'), not an adapter")


def _non_finite_note(tensors: Mapping[str, torch.Tensor], where: str) -> str | None:
    """'<where>: N tensor(s) hold NaN or Inf, e.g. <keys>', or None when every value is finite."""
    from ..formats import find_non_finite

    bad = sorted(find_non_finite(tensors))
    return f"{where}: {len(bad)} tensor(s) hold NaN or Inf, e.g. {', '.join(bad[:3])}" if bad else None


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], where: str, what: str) -> None:
    """The error naming the tensors that hold NaN or Inf, for merges: `what` says where they would end up."""
    note = _non_finite_note(tensors, where)
    if note:
        raise ValueError(f"{note}; merging would write them into {what} (a diverged training run: use an earlier "
                         "save)")


def warn_non_finite(tensors: Mapping[str, torch.Tensor], where: str, stacklevel: int = 2) -> None:
    """A warning naming the tensors that hold NaN or Inf (a diverged training run): the file is still read."""
    note = _non_finite_note(tensors, where)
    if note:
        warnings.warn(note, stacklevel=stacklevel + 1)


def warn_clamped_rotations(groups: Mapping[str, Mapping[str, torch.Tensor]], where: str, stacklevel: int = 2) -> None:
    """A warning when OFT/BOFT modules hold a rotation larger than their saved bound `alpha`. lorakit applies
    `alpha` as the bound, as ComfyUI does, and shrinks such a Q to it; LyCORIS trains with the bound
    constraint * out_dim but saves the constraint as `alpha`, so its constrained files look like this, and
    A1111 (reading alpha * out_dim) applies them unshrunk."""
    over = []
    for name, sub in groups.items():
        blocks, alpha = sub.get("oft_blocks"), sub.get("alpha")
        if blocks is None or alpha is None or float(alpha) <= 0:
            continue
        b = blocks.double()
        norm = float(torch.linalg.vector_norm(b - b.transpose(-1, -2)))
        # within the rounding of the file's dtype: a bound just above |Q| (unconstrained) or |Q| scaled to the
        # bound, both cast to fp16 after, can come out 1e-4 apart the wrong way
        slack = max(1e-5, 2 * torch.finfo(blocks.dtype).eps) if blocks.is_floating_point() else 1e-5
        if norm > float(alpha) * (1 + slack):
            over.append(f"{name} (|Q| {norm:.4g} > alpha {float(alpha):.4g})")
    if over:
        warnings.warn(f"{where}: {len(over)} OFT module(s) hold a rotation above their saved bound, e.g. "
                      f"{over[0]}; lorakit applies alpha as the bound, as ComfyUI does, and shrinks them. LyCORIS "
                      f"saves its `constraint` as alpha but trains with the bound constraint * out_dim, which A1111 "
                      f"applies", stacklevel=stacklevel + 1)


def without_bundled_embeddings(tensors: Mapping[str, torch.Tensor], where: str, stacklevel: int = 2) -> dict:
    """The tensors less the embeddings bundled in the file (bundle_emb.*), with a warning naming them: they are no
    adapter, and loading them is the UI's part."""
    names = sorted({key.split(".")[1] for key in tensors if key.startswith(_BUNDLED_EMBEDDING)})
    if not names:
        return dict(tensors)
    warnings.warn(f"{where}: leaves out the {len(names)} embedding(s) bundled in the file ({', '.join(names)}; "
                  f"bundle_emb.* keys, which A1111 loads as textual inversions): only the adapters are loaded",
                  stacklevel=stacklevel + 1)
    return {k: v for k, v in tensors.items() if not k.startswith(_BUNDLED_EMBEDDING)}


def kohya_tensors(tensors: Mapping[str, torch.Tensor], arch: str | None, where: str,
                  stacklevel: int = 2) -> tuple[dict, str, str]:
    """(tensors, where, layout): a file's adapter tensors as the loaders read them, under kohya names: the bundled
    embeddings left out (with a warning), OneTrainer's OMI names renamed, sd-scripts' OFT read with its
    conventions; `where` then names the layout too. `layout` is detect_layout's."""
    tensors = without_bundled_embeddings(tensors, where, stacklevel=stacklevel)
    layout = detect_layout(tensors)
    tensors, where = _in_kohya_layout(tensors, layout, arch, where)
    return tensors, where, layout


def _in_kohya_layout(tensors: dict, layout: str, arch: str | None, where: str) -> tuple[dict, str]:
    """Files of other trainers that hold kohya's tensors under other names, renamed (OneTrainer's OMI layout) or
    read with their own conventions (sd-scripts' OFT); `where` then names the layout, as messages name the
    modules by their kohya names. `layout` is detect_layout's."""
    if layout == "omi":
        return omi_to_kohya(tensors, arch, unet_names="sgm"), f"{where} (OneTrainer OMI layout)"
    if layout == "sd-scripts-oft":
        where = f"{where} (sd-scripts OFT)"
        return from_sd_scripts_oft(tensors), where
    return tensors, where


def from_sd_scripts_oft(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sd-scripts' OFT (networks/oft.py: oft_unet_ names, alpha = the constraint per output channel) as lorakit's
    Diag-OFT: lora_unet_ names, blocks kept (Diag-OFT keeps a file's split: sd-scripts' `dim` blocks of out_dim / dim
    channels), and as alpha the bound that gives sd-scripts' rotation. sd-scripts (and A1111, which reads these files
    alike) bounds |Q| by alpha * out_dim and scales a larger Q by (bound + 1e-8) / (|Q| + 1e-8); lorakit scales it by
    alpha / |Q| (ComfyUI's reading), so alpha becomes |Q| times sd-scripts' factor, the bound itself for a Q within
    it."""
    out = {}
    for key, value in tensors.items():
        name, suffix = split_key(key)
        kohya_key = "lora_unet_" + key[len(SD_SCRIPTS_OFT_PREFIX):]
        blocks = tensors.get(f"{name}.oft_blocks")
        if suffix == "alpha" and blocks is not None and blocks.dim() == 3:
            value = _sd_scripts_bound(blocks, value)
        out[kohya_key] = value
    return out


def _sd_scripts_bound(blocks: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The absolute bound lorakit applies for an sd-scripts OFT module (see from_sd_scripts_oft), float64."""
    b = blocks.double()
    norm = float(torch.linalg.vector_norm(b - b.transpose(-1, -2)))
    constraint = float(alpha) * b.shape[0] * b.shape[1]  # alpha * out_dim
    if norm <= constraint:
        return torch.tensor(constraint, dtype=torch.float64)
    return torch.tensor(norm * (constraint + 1e-8) / (norm + 1e-8), dtype=torch.float64)


def load_network(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor],
                 text_encoders: Sequence[nn.Module] | nn.Module | None = None, multiplier: float = 1.0,
                 dtype: torch.dtype | None = torch.float32, prefix: str = GENERIC_PREFIX,
                 where: str | None = None) -> Network:
    """The network a file describes, on `model` (a U-Net with its text encoders, or any nn.Module whose file uses
    `prefix`). U-Net names are accepted in diffusers and SGM style. `dtype` is the adapters' dtype (None: the
    file's). `where` names the tensors in messages (default: the file, or "the state dict")."""
    tensors, metadata, described = read_adapter_tensors(source)
    text_encoders, arch, index = index_model(model, text_encoders, prefix)
    tensors, where, layout = kohya_tensors(tensors, arch, where or described, stacklevel=3)
    check_layout(tensors, where)
    found, missing = index.resolve_keys(tensors)
    if missing:
        shown = ", ".join(repr(n) for n in missing[:3])
        hint = "is it for another model, or a text encoder that was not given?"
        heads = {n.split("_", 1)[0] for n in missing}
        head = heads.pop() if len(heads) == 1 else None
        if arch is None and head is not None and not f"{prefix}_".startswith(f"{head}_"):
            # one other prefix: a preset's lora_prefix, which load_network must be told
            hint = f"its names start with '{head}_': saved with lora_prefix '{head}'? pass prefix='{head}'"
        raise ValueError(f"{where}: {len(missing)} adapter name(s) match no module of this model, e.g. {shown} "
                         f"({hint})")
    warn_non_finite(tensors, where, stacklevel=3)

    groups = group_by_module(tensors)
    if layout != "sd-scripts-oft":  # sd-scripts (and A1111) shrink Q to the bound too: no reader differs there
        warn_clamped_rotations(groups, where, stacklevel=3)
    adapters, entries, seen_as = {}, {}, {}
    for name, sub in groups.items():
        target = found[name]
        try:
            adapter = adapter_from_state_dict(target.module, sub, dtype=dtype, multiplier=multiplier)
        except (ValueError, RuntimeError, TypeError, KeyError) as err:
            first = next(target.module.children(), None)
            leaf_first = first is not None and next(first.children(), None) is None
            hint = f" (a container: did you mean '{name}_0', its first layer?)" if isinstance(
                target.module, (nn.ModuleList, nn.Sequential)) and leaf_first else ""
            raise ValueError(f"{where}: module '{name}': {err}{hint}") from None
        primary = index.name_of(target.component, target.path)
        if primary in adapters:
            raise ValueError(f"{where}: '{name}' and '{seen_as[primary]}' name the same module ({target.component} "
                             f"{target.path}); the file holds it twice")
        seen_as[primary] = name
        adapters[primary], entries[primary] = adapter, Entry(target.component, target.path)
    network = Network(adapters, entries, arch, multiplier, models=[model, *text_encoders])
    network.metadata = metadata
    return network
