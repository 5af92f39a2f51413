"""Adapter key layouts of Stable Diffusion: kohya/LyCORIS <-> diffusers/PEFT, and SDXL U-Net name styles.

kohya/LyCORIS: ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (``lora_te_``,
``lora_te1_``, ``lora_te2_`` for text encoders); LoHa ``hada_*``, LoKr ``lokr_*``.
diffusers/PEFT: ``unet.<dotted path>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.``,
``text_encoder_2.``; PEFT's own files use ``base_model.model.``); LoHa/LoKr keep LyCORIS' tensor names and
shapes (PEFT ported them), so only the module naming and the alphas differ.

Alphas: PEFT keeps no per-module alpha tensor; its config holds ``r``/``lora_alpha`` (LoHa/LoKr: ``alpha``) and
per-module ``rank_pattern``/``alpha_pattern``. We write that config as diffusers' ``lora_adapter_metadata``
(JSON, keys prefixed by component, as ``save_lora_weights`` writes it), so diffusers' loader applies exactly
alpha/r per module without touching a weight; reading back gives the same alpha numbers, so the round trip is
bit-exact. (Folding alpha/r into ``lora_B`` instead would round every up weight.) What the config cannot carry
(the alpha a LoKr with two full factors was saved with, which no loader reads; an alpha tensor whose dtype
differs from its module's weights) goes in ``lorakit_kohya`` metadata, used only on the way back.

Read-only layouts of other trainers, with kohya's tensors under other names: OneTrainer's OMI layout
(``unet.<SGM path>.lora_down.weight``, ``clip_l.``/``clip_g.`` + the CLIP path; ``omi_to_kohya``) and sd-scripts'
own OFT (``oft_unet_`` names; its alpha convention is read in ``network.load``).

Names: kohya names are not parsed by guessing where ``_`` was ``.``: every module name of the SD U-Nets (diffusers
and SGM) and CLIP text models is a sequence of the words in ``_WORDS`` and integers, matched longest first;
an unknown word is an error naming the key. The test checks this on every module of full-size SD1.5/SDXL.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Mapping

import torch

from .unet_paths import SD_LAYOUT, SDXL_LAYOUT, UNetLayout, diffusers_to_ldm, is_ldm_path, ldm_to_diffusers

__all__ = ["LayoutError", "KOHYA_PREFIXES", "PEFT_COMPONENTS", "OMI_PREFIXES", "SD_SCRIPTS_OFT_PREFIX",
           "METADATA_KEY", "LORAKIT_KEY", "name_to_path", "path_to_name", "detect_layout", "guess_arch",
           "module_algorithm", "kohya_to_peft", "peft_to_kohya", "rename_unet", "split_peft_key", "omi_arch",
           "omi_to_kohya"]


class LayoutError(ValueError):
    """Tensors that cannot be converted between layouts; the message names the key and the reason."""


KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
PEFT_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# the first module names of a diffusers U-Net: a key starting with one has no component prefix, as diffusers'
# save_lora_adapter and PEFT's get_peft_model_state_dict on the U-Net write it (ComfyUI reads those as the U-Net's)
_BARE_UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
                    "add_embedding", "encoder_hid_proj")
# OneTrainer's OMI layout (modules/util/convert/lora/convert_sd_lora.py, convert_sdxl_lora.py): component prefixes
OMI_PREFIXES = {"unet.": "unet", "clip_l.": "text_encoder", "clip_g.": "text_encoder_2"}
SD_SCRIPTS_OFT_PREFIX = "oft_unet_"  # sd-scripts networks/oft.py (OFTNetwork.OFT_PREFIX_UNET): U-Net only
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
LORAKIT_KEY = "lorakit_kohya"           # what PEFT's config cannot carry, for the way back

# Words of SD U-Net (diffusers and SGM) and CLIP module paths that contain "_".
_WORDS = frozenset({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
    "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "conv_act",
    "time_embedding", "add_embedding", "class_embedding", "linear_1", "linear_2", "add_k_proj", "add_v_proj",
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2",
    "final_layer_norm", "token_embedding", "position_embedding", "text_projection", "patch_embedding",
    "activation_fn", "time_proj", "add_time_proj",
})
_MAX_WORD = max(w.count("_") + 1 for w in _WORDS)
_PLAIN = re.compile(r"[a-z][a-z0-9]*|0|[1-9][0-9]*")  # one-token segments: attn1, ff, net, 0, ...

# Tensors per module, kohya name -> PEFT name (None: no PEFT counterpart, with the reason).
_LORA = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
_LOHA = {k: k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")}
_LOKR = {k: k for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}
ALGO_KEYS = {"lora": _LORA, "loha": _LOHA, "lokr": _LOKR}
PEFT_TYPES = {"lora": "LORA", "loha": "LOHA", "lokr": "LOKR"}
_NOT_IN_PEFT = (  # (marker tensor, what it is) for kohya modules we cannot express in PEFT
    ("lora_mid.weight", "LoRA with a Tucker core (lora_mid): PEFT's LoRA has no Tucker form"),
    ("oft_blocks", "OFT/BOFT: PEFT parametrises OFT differently"),
    ("on_input", "(IA)^3: PEFT's IA3 is not converted by lorakit"),
    ("a1.weight", "GLoRA: PEFT has no GLoRA"),
    ("diff", "full (diff): PEFT has no full-weight delta"),
    ("w_norm", "norm (w_norm): PEFT has no norm adapter"),
)


# --------------------------------------------------------------------------------------------------
# names


def name_to_path(underscored: str, key: str = "") -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in`` by the vocabulary."""
    tokens = underscored.split("_")
    parts, i = [], 0
    while i < len(tokens):
        for n in range(min(_MAX_WORD, len(tokens) - i), 0, -1):
            word = "_".join(tokens[i:i + n])
            if (n > 1 and word in _WORDS) or (n == 1 and _PLAIN.fullmatch(word)):
                parts.append(word)
                i += n
                break
        else:
            raise LayoutError(f"{key or underscored}: cannot tell the module path of '{underscored}' "
                              f"(unknown word at '{'_'.join(tokens[i:])}'); only Stable Diffusion U-Net and CLIP "
                              f"text-encoder module names are known")
    return ".".join(parts)


def path_to_name(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


def _clip_name_path(path: str) -> str:
    """Adapter names keep transformers 4's ``text_model.`` (transformers 5's CLIPTextModel dropped it)."""
    return f"text_model.{path}" if path.split(".", 1)[0] in ("embeddings", "encoder", "final_layer_norm") else path


def _layout(arch: str) -> UNetLayout:
    return SDXL_LAYOUT if arch == "sdxl" else SD_LAYOUT


def _unet_path(path: str, arch: str, style: str, key: str) -> str:
    """``path`` (diffusers or LDM/SGM) in ``style``: "diffusers" or "sgm"."""
    try:
        if style == "sgm":
            return path if is_ldm_path(path) else diffusers_to_ldm(path, _layout(arch))
        return ldm_to_diffusers(path, _layout(arch)) if is_ldm_path(path) else path
    except ValueError as e:
        raise LayoutError(f"{key}: {e}") from None


def guess_arch(unet_paths: list[str], components: set[str]) -> str | None:
    """"sdxl" or "sd1" from U-Net module paths (either style) and the components present; None if nothing tells.
    SD1/SD2 and SDXL differ in which blocks hold attentions and how many there are."""
    if "text_encoder_2" in components:
        return "sdxl"
    for p in unet_paths:
        parts = p.split(".")
        if parts[0] in ("input_blocks", "output_blocks") and len(parts) > 2 and parts[1].isdigit():
            k, s = int(parts[1]), parts[2]
            if k > 8 or (parts[0] == "input_blocks" and k in (1, 2) and s == "1"):
                return "sd1"
            if parts[0] == "output_blocks" and k in (0, 1, 2) and s == "1":
                # SDXL's attentions; SD1's only path there is output_blocks.2.1.conv, its Upsample
                return "sd1" if parts[3:4] == ["conv"] else "sdxl"
        if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 2:
            if (parts[0], parts[1]) in (("down_blocks", "3"), ("up_blocks", "3")):
                return "sd1"
            if parts[2] == "attentions" and (parts[0], parts[1]) in (("down_blocks", "0"), ("up_blocks", "2")):
                return "sd1"
            if parts[2] == "attentions" and (parts[0], parts[1]) == ("up_blocks", "0"):
                return "sdxl"
        if parts[0] in ("add_embedding", "label_emb"):
            return "sdxl"
    return None


# diffusers' own LoRA layout (what its training scripts and save_lora_weights write from a PEFT model through
# convert_state_dict_to_diffusers): the same factors as PEFT's lora_A/lora_B under other names
_DIFFUSERS_NAMES = {"lora.down.weight": "lora_A.weight", "lora.up.weight": "lora_B.weight",
                    "lora_linear_layer.down.weight": "lora_A.weight", "lora_linear_layer.up.weight": "lora_B.weight"}


# PEFT's adapter tensor names (split_peft_key also reads an `alpha` key and diffusers' older names)
_PEFT_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector", *_LOHA, *_LOKR)


def _is_peft_tensor(key: str) -> bool:
    """A key ending in a PEFT adapter tensor's name (a diffusers U-Net's own weights do not)."""
    return any(key.endswith("." + suffix) for suffix in _PEFT_TENSORS)


def split_peft_key(key: str) -> tuple[str, str, str]:
    """``unet.down_blocks.0...to_q.lora_A.weight`` -> (component, module path, tensor name); diffusers' names
    (``to_q.lora.down.weight``, ``q_proj.lora_linear_layer.down.weight``) come back as PEFT's."""
    for suffix in (*_PEFT_TENSORS, "alpha", *_DIFFUSERS_NAMES):  # (no LoHa/LoKr name ends in ".alpha")
        if key.endswith("." + suffix):
            head = key[: -len(suffix) - 1]
            suffix = _DIFFUSERS_NAMES.get(suffix, suffix)
            break
    else:
        if key.endswith(("_lora.down.weight", "_lora.up.weight")):
            raise LayoutError(f"{key}: diffusers' old attention-processor layout (to_q_lora.down); load it with "
                              f"diffusers' load_attn_procs and save it again with save_lora_weights, then convert")
        raise LayoutError(f"{key}: not a PEFT adapter tensor (expected lora_A/lora_B, hada_*, lokr_* keys)")
    if head.startswith("base_model.model."):
        head = head[len("base_model.model."):]
        first = head.split(".", 1)[0]
        if first in PEFT_COMPONENTS and "." in head:
            component, path = head.split(".", 1)
        elif first in ("text_model", "encoder", "embeddings", "final_layer_norm", "text_projection"):
            component, path = "text_encoder", head
        else:
            component, path = "unet", head
    elif head.split(".", 1)[0] in _BARE_UNET_ROOTS:
        component, path = "unet", head
    else:
        component, _, path = head.partition(".")
        if component not in PEFT_COMPONENTS or not path:
            raise LayoutError(f"{key}: expected a key starting with one of {', '.join(c + '.' for c in PEFT_COMPONENTS)}"
                              f" or base_model.model.")
    return component, path, suffix


def detect_layout(keys) -> str:
    """"kohya" (kohya/LyCORIS names), "peft" (diffusers/PEFT names), "generic" (``lycoris_`` names of another
    model), "omi" (OneTrainer's OMI names), "sd-scripts-oft" (sd-scripts' OFT names) or "unknown"."""
    keys = list(keys)
    if keys and all(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        return "kohya"
    if keys and all(k.startswith("lycoris_") for k in keys):
        return "generic"
    if keys and all(k.startswith(SD_SCRIPTS_OFT_PREFIX) for k in keys):
        return "sd-scripts-oft"
    if keys and all(k.startswith(tuple(OMI_PREFIXES)) for k in keys) and any(map(_omi_only, keys)):
        return "omi"
    if keys and all(k.startswith(tuple(c + "." for c in PEFT_COMPONENTS) + ("base_model.model.",))
                    or (k.startswith(tuple(r + "." for r in _BARE_UNET_ROOTS)) and _is_peft_tensor(k)) for k in keys):
        return "peft"
    return "unknown"


def _omi_only(key: str) -> bool:
    """A key only the OMI layout has: a CLIP prefix, or a U-Net module under its SGM path (diffusers/PEFT files,
    which share the ``unet.`` prefix, have diffusers paths)."""
    return key.startswith(("clip_l.", "clip_g.")) or (key.startswith("unet.") and is_ldm_path(key[len("unet."):]))


def module_algorithm(sub: Mapping[str, torch.Tensor], name: str) -> str:
    """"lora", "loha" or "lokr" for one kohya module's tensors; LayoutError naming what PEFT lacks otherwise."""
    for marker, what in _NOT_IN_PEFT:
        if marker in sub:
            raise LayoutError(f"{name}: {what}; it cannot be converted to the PEFT layout (LoRA, LoHa and LoKr "
                              f"can)")
    for algo, table in ALGO_KEYS.items():
        if any(k in sub for k in table):
            _check_dora(sub, name, algo)
            extra = sorted(set(sub) - set(table) - {"alpha", "dora_scale"})
            if extra:
                raise LayoutError(f"{name}: unexpected tensor(s) {extra} for {algo}")
            return algo
    raise LayoutError(f"{name}: no adapter algorithm has the tensors {sorted(sub)}")


def _check_dora(sub: Mapping[str, torch.Tensor], name: str, algo: str) -> None:
    """PEFT's DoRA (LoRA only) keeps one magnitude per output row (DoraLinearLayer.get_weight_norm: the norm of
    W + s BA over dim 1): lorakit's dora_axis "out" (LyCORIS' wd_on_out), dora_scale (out, 1, ..). The input-column
    axis (dora_scale (1, in, ..), lorakit's default) has no PEFT form."""
    scale = sub.get("dora_scale")
    if scale is None:
        return
    if algo != "lora":
        raise LayoutError(f"{name}: DoRA (dora_scale) on {algo}: PEFT has DoRA for LoRA only; it cannot be "
                          f"converted to the PEFT layout")
    out_dim = sub["lora_up.weight"].shape[0]
    if scale.shape[0] != out_dim or any(d != 1 for d in scale.shape[1:]):
        raise LayoutError(f"{name}: DoRA along input columns (dora_scale {tuple(scale.shape)}, dora_axis \"in\"): "
                          f"PEFT's lora_magnitude_vector holds one magnitude per output row (dora_axis \"out\", "
                          f"LyCORIS' wd_on_out); it cannot be converted to the PEFT layout")


def _peft_magnitude(scale: torch.Tensor, conv: bool) -> torch.Tensor:
    """dora_scale (out, 1[, 1, 1]) as PEFT stores the magnitude: (out,) for a Linear, (1, out, 1, 1) for a conv."""
    return scale.reshape(1, -1, *scale.shape[2:]) if conv else scale.reshape(-1)


def _kohya_dora_scale(magnitude: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """PEFT's magnitude as lorakit's row-axis dora_scale: (out, 1) for a Linear, (out, 1, 1, 1) for a conv."""
    return magnitude.reshape(-1, *([1] * (down.dim() - 1)))


# --------------------------------------------------------------------------------------------------
# kohya -> PEFT


def _group(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = value
    return groups


def _kohya_split(name: str) -> tuple[str, str, str]:
    """(prefix, component, path as written) of a kohya adapter name."""
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if name.startswith(prefix):
            return prefix, KOHYA_PREFIXES[prefix], name_to_path(name[len(prefix):], name)
    raise LayoutError(f"{name}: expected an adapter name starting with {', '.join(KOHYA_PREFIXES)}")


def _kohya_arch(groups, arch: str | None) -> str:
    if arch is not None:
        return _check_arch(arch)
    prefixes = {_kohya_split(n)[0] for n in groups}
    comps = {"text_encoder_2"} if prefixes & {"lora_te1_", "lora_te2_"} else set()
    paths = [_kohya_split(n)[2] for n in groups if n.startswith("lora_unet_")]
    found = guess_arch(paths, comps)
    if found is None:  # nothing tells: kohya writes SGM names only for SDXL
        found = "sdxl" if any(is_ldm_path(p) for p in paths) else "sd1"
    return found


def _check_arch(arch: str) -> str:
    a = str(arch).lower().replace(".", "").replace("-", "")
    if a in ("sd1", "sd15", "sd2", "sd21", "sd"):
        return "sd1"  # SD1 and SD2 share the U-Net layout and the name rules
    if a in ("sdxl", "xl"):
        return "sdxl"
    raise LayoutError(f"arch={arch!r}: expected sd1, sd2 or sdxl")


def _rank(algo: str, sub: Mapping[str, torch.Tensor]) -> int | None:
    """The dim loaders divide alpha by (None: a LoKr with two full factors, whose scale is 1)."""
    if algo == "lora":
        return sub["lora_down.weight"].shape[0]
    if algo == "loha":
        return sub["hada_w1_b"].shape[0]
    if "lokr_w2_b" in sub:
        return sub["lokr_w2_b"].shape[0]
    if "lokr_w1_b" in sub:
        return sub["lokr_w1_b"].shape[0]
    return None


def _lokr_factors(sub) -> tuple[int, int, int, int | None]:
    """(a, b, c, d): dW = kron(w1 (a x b), w2 (c x d x kernel)). d is None for a flattened rank product of a
    conv (w2_b is (r, d * kernel) and the kernel is not in the file)."""
    a, b = (sub["lokr_w1_a"].shape[0], sub["lokr_w1_b"].shape[1]) if "lokr_w1" not in sub else tuple(sub["lokr_w1"].shape)
    if "lokr_w2" in sub:
        c, d = sub["lokr_w2"].shape[:2]
    elif "lokr_t2" in sub:
        c, d = sub["lokr_w2_a"].shape[1], sub["lokr_w2_b"].shape[1]
    else:
        c, d = sub["lokr_w2_a"].shape[0], None
    return int(a), int(b), int(c), None if d is None else int(d)


def _peft_lokr_rank(sub, name: str, decompose_both: bool) -> int:
    """The ``r`` under which PEFT builds exactly this module's LoKr factors (full or rank products)."""
    a, b, c, d = _lokr_factors(sub)
    w1_low, w2_low = "lokr_w1" not in sub, "lokr_w2" not in sub
    if w1_low and w2_low and sub["lokr_w1_b"].shape[0] != sub["lokr_w2_b"].shape[0]:
        raise LayoutError(f"{name}: LoKr factors of different ranks ({sub['lokr_w1_b'].shape[0]} and "
                          f"{sub['lokr_w2_b'].shape[0]}); PEFT gives both one rank")
    r = _rank("lokr", sub) if (w1_low or w2_low) else max(a, b, c, d)
    peft_w1_low = decompose_both and r < max(a, b) / 2
    peft_w2_low = r < max(c, d) / 2 if d is not None else w2_low  # d unknown only when w2 is a rank product
    if (peft_w1_low, peft_w2_low) != (w1_low, w2_low):
        raise LayoutError(f"{name}: PEFT's LoKr would build w1 {'low-rank' if peft_w1_low else 'full'} and w2 "
                          f"{'low-rank' if peft_w2_low else 'full'} at rank {r} for factors ({a}x{b}) kron "
                          f"({c}x{d or '?'}); this file has w1 {'low-rank' if w1_low else 'full'} and w2 "
                          f"{'low-rank' if w2_low else 'full'}")
    return r


def _alpha_value(sub, rank: int | None) -> float | None:
    return float(sub["alpha"]) if "alpha" in sub else (None if rank is None else float(rank))


def _config(algo: str, ranks: dict[str, int], alphas: dict[str, float], targets: list[str], extra: dict) -> dict:
    """A PEFT config dict (LoraConfig/LoHaConfig/LoKrConfig fields): the most common rank and alpha, with
    patterns for the modules that differ (keys: module paths, which PEFT matches as path suffixes)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    cfg = {"peft_type": PEFT_TYPES[algo], "r": r, "lora_alpha" if algo == "lora" else "alpha": alpha,
           "rank_pattern": {k: v for k, v in ranks.items() if v != r},
           "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
           "target_modules": sorted(targets)}
    cfg.update(extra)
    return cfg


def _pattern_path(component: str, path: str) -> str:
    """Config patterns of text encoders leave out ``text_model.``: PEFT matches them as suffixes, so they fit
    both transformers 4 (with it) and 5 (without)."""
    if component != "unet" and path.startswith("text_model."):
        return path[len("text_model."):]
    return path


def kohya_to_peft(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                  arch: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya/LyCORIS tensors -> diffusers/PEFT tensors (``unet.<path>...``) and metadata (the input's, plus
    ``lora_adapter_metadata`` holding each component's PEFT config). Tensors are passed through unchanged."""
    groups = _group(tensors)
    a = _kohya_arch(groups, arch)
    out: dict[str, torch.Tensor] = {}
    per_comp: dict[str, dict] = {}
    side: dict[str, dict] = {}
    seen: dict[str, str] = {}
    for name, sub in groups.items():
        prefix, component, path = _kohya_split(name)
        algo = module_algorithm(sub, name)
        if component == "unet":
            path = _unet_path(path, a, "diffusers", name)
        elif prefix == "lora_te_" and a == "sdxl":
            raise LayoutError(f"{name}: an SD1/SD2 text-encoder name (lora_te_) in an SDXL file")
        else:
            path = _clip_name_path(path)
        full = f"{component}.{path}"
        if full in seen:
            raise LayoutError(f"{name}: the same module as {seen[full]}")
        seen[full] = name
        comp = per_comp.setdefault(component, {"algo": algo, "ranks": {}, "alphas": {}, "targets": [], "subs": {}})
        if comp["algo"] != algo:
            raise LayoutError(f"{name}: {algo} next to {comp['algo']} in the {component}; a PEFT config has one "
                              f"algorithm per component")
        comp["subs"][name] = (path, sub)
        if comp.setdefault("dora", "dora_scale" in sub) != ("dora_scale" in sub):
            raise LayoutError(f"{name}: DoRA and plain LoRA modules in the {component}; PEFT's use_dora applies to "
                              f"every module of a component's config")
        for k, v in sub.items():
            if k == "dora_scale":
                out[f"{full}.lora_magnitude_vector"] = _peft_magnitude(v, sub["lora_down.weight"].dim() > 2)
            elif k != "alpha":
                out[f"{full}.{ALGO_KEYS[algo][k]}"] = v
        if "alpha" in sub:
            w_dtype = next(t.dtype for k, t in sub.items() if k not in ("alpha", "dora_scale"))
            if sub["alpha"].dtype != w_dtype or sub["alpha"].dim() != 0:
                side.setdefault("alpha_dtype", {})[name] = [str(sub["alpha"].dtype).removeprefix("torch."),
                                                           list(sub["alpha"].shape)]
        else:
            side.setdefault("no_alpha", []).append(name)
    configs = {}
    for component, comp in per_comp.items():
        algo = comp["algo"]
        decompose_both = algo == "lokr" and any("lokr_w1_a" in s for _, s in comp["subs"].values())
        for name, (path, sub) in comp["subs"].items():
            key = _pattern_path(component, path)
            comp["targets"].append(key)
            rank = _rank(algo, sub)
            if algo == "lokr":
                r = _peft_lokr_rank(sub, name, decompose_both)
                if rank is None:  # two full factors: scale 1; keep the alpha no loader reads for the way back
                    alpha = float(r)
                    if "alpha" in sub:
                        side.setdefault("lokr_full_alpha", {})[name] = float(sub["alpha"])
                else:
                    alpha = _alpha_value(sub, rank)
            else:
                r, alpha = rank, _alpha_value(sub, rank)
            comp["ranks"][key], comp["alphas"][key] = r, alpha
        extra = {}
        if algo in ("loha", "lokr"):
            extra["use_effective_conv2d"] = any(k in s for _, s in comp["subs"].values() for k in ("hada_t1", "lokr_t2"))
        if algo == "lokr":
            extra.update(decompose_both=decompose_both, decompose_factor=_decompose_factor(comp["subs"]))
        if comp["dora"]:
            extra["use_dora"] = True
        configs[component] = _config(algo, comp["ranks"], comp["alphas"], comp["targets"], extra)
    meta = dict(metadata or {})
    meta[METADATA_KEY] = json.dumps({f"{c}.{k}": v for c, cfg in configs.items() for k, v in cfg.items()},
                                    sort_keys=True)
    if side:
        meta[LORAKIT_KEY] = json.dumps(side, sort_keys=True)
    else:
        meta.pop(LORAKIT_KEY, None)
    return out, meta


def _peft_factorization(dimension: int, factor: int) -> tuple[int, int]:
    """PEFT's split of a dimension into (m, n) (peft.tuners.lokr.layer.factorization). Not LyCORIS' split
    (``algos.lokr.factorization``): PEFT stops when a pair's sum exceeds the *first* pair's, LyCORIS the last one's,
    and a factor that divides the dimension gives (factor, dimension / factor) as it is, where LyCORIS puts the
    smaller first: a 16-wide side with factor 16 is (16, 1) in PEFT and (1, 16) in LyCORIS."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


def _decompose_factor(subs) -> int:
    """The one ``decompose_factor`` under which PEFT splits every module as the file does."""
    dims = {}
    for name, (_, sub) in subs.items():
        a, b, c, d = _lokr_factors(sub)
        dims[name] = (a, b, c, d)
    for cand in sorted({v[0] for v in dims.values()} | {v[1] for v in dims.values()}) + [-1]:
        if all(_peft_factorization(a * c, cand) == (a, c) and (d is None or _peft_factorization(b * d, cand) == (b, d))
               for a, b, c, d in dims.values()):
            return cand
    name = next(iter(dims))
    raise LayoutError(f"{name}: no single PEFT decompose_factor splits every LoKr module as this file does "
                      f"(e.g. ({dims[name][0]}x{dims[name][1]}) kron ({dims[name][2]}x{dims[name][3]}))")


# --------------------------------------------------------------------------------------------------
# PEFT -> kohya


def _pattern_value(patterns: Mapping[str, object], path: str, default):
    """PEFT's pattern lookup (peft.utils.other.get_pattern_key): a key matches a path it ends (after a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _read_configs(metadata: Mapping[str, str]) -> dict[str, dict]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LayoutError(f"metadata '{METADATA_KEY}' is not JSON ({e})") from None
    if not isinstance(flat, dict):
        raise LayoutError(f"metadata '{METADATA_KEY}': expected a JSON object of PEFT config fields, got "
                          f"{type(flat).__name__}")
    configs: dict[str, dict] = {}
    for k, v in flat.items():
        component, dot, field = k.partition(".")
        if not dot:  # diffusers' save_lora_adapter writes one component's config without a prefix: every one's
            component, field = "", k
        _check_config_value(k, field, v)
        configs.setdefault(component, {})[field] = v
    shared = configs.pop("", {})
    return {"": shared, **{c: {**shared, **config} for c, config in configs.items()}}


def _check_config_value(key: str, field: str, value) -> None:
    """r and alpha (and their patterns' values) are numbers; anything else is refused naming the key."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    if field in ("r", "lora_alpha", "alpha") and not number(value):
        raise LayoutError(f"metadata '{METADATA_KEY}': '{key}' = {value!r}: expected a positive number")
    if field in ("rank_pattern", "alpha_pattern") and value is not None:
        if not isinstance(value, dict) or not all(number(v) for v in value.values()):
            raise LayoutError(f"metadata '{METADATA_KEY}': '{key}' = {value!r}: expected an object of positive "
                              "numbers by module pattern")


_PEFT_TO_KOHYA = {algo: {v: k for k, v in table.items()} for algo, table in ALGO_KEYS.items()}


def peft_to_kohya(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                  arch: str | None = None, unet_names: str = "kohya") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers/PEFT tensors -> kohya/LyCORIS tensors and metadata. Alphas come from per-module ``.alpha`` keys,
    else diffusers' ``lora_adapter_metadata`` (rank/alpha patterns), else alpha = rank (PEFT's scale 1).
    ``unet_names``: "kohya" (SGM names for SDXL, diffusers names for SD1/SD2, as sd-scripts writes), "sgm" or
    "diffusers"."""
    meta = dict(metadata or {})
    configs = _read_configs(meta)
    side = json.loads(meta.pop(LORAKIT_KEY, "{}") or "{}")
    meta.pop(METADATA_KEY, None)
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        component, path, suffix = split_peft_key(key)
        if suffix == "lora_B.bias":
            raise LayoutError(f"{key}: a LoRA bias (lora_B.bias) has no kohya/LyCORIS counterpart")
        modules.setdefault((component, path), {})[suffix] = value
    comps = {c for c, _ in modules}
    a = _check_arch(arch) if arch is not None else guess_arch([p for c, p in modules if c == "unet"], comps)
    if a is None:
        a = "sd1"
    if unet_names not in ("kohya", "sgm", "diffusers"):
        raise LayoutError(f"unet_names={unet_names!r}: expected kohya, sgm or diffusers")
    style = ("sgm" if a == "sdxl" else "diffusers") if unet_names == "kohya" else unet_names
    te_prefix = {"text_encoder": "lora_te1_" if a == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}
    out: dict[str, torch.Tensor] = {}
    for (component, path), sub in modules.items():
        where = f"{component}.{path}"
        algo = next((al for al, table in _PEFT_TO_KOHYA.items() if any(k in table for k in sub)), None)
        if algo is None:
            raise LayoutError(f"{where}: no lora_A/lora_B, hada_* or lokr_* tensors")
        extra = sorted(set(sub) - set(_PEFT_TO_KOHYA[algo]) - {"alpha"} - ({"lora_magnitude_vector"} if algo == "lora" else set()))
        if extra:
            raise LayoutError(f"{where}: unexpected tensor(s) {extra} next to {algo} tensors")
        if component == "unet":
            name = path_to_name("lora_unet_", _unet_path(path, a, style, where))
        else:
            name = path_to_name(te_prefix[component], _clip_name_path(path))
        for k, v in sub.items():
            if k == "lora_magnitude_vector":  # PEFT's DoRA is along output rows: lorakit's dora_axis "out"
                out[f"{name}.dora_scale"] = _kohya_dora_scale(v, sub["lora_A.weight"])
            elif k != "alpha":
                out[f"{name}.{_PEFT_TO_KOHYA[algo][k]}"] = v
        dtype = next(t.dtype for k, t in sub.items() if k not in ("alpha", "lora_magnitude_vector"))
        if "alpha" in sub:
            out[f"{name}.alpha"] = sub["alpha"]
            continue
        kohya_sub = {_PEFT_TO_KOHYA[algo].get(k, k): v for k, v in sub.items()}
        config, pattern_path = configs.get(component, configs.get("", {})), _pattern_path(component, path)
        alpha = _peft_alpha(algo, kohya_sub, config, pattern_path)
        if algo == "lokr" and _rank(algo, kohya_sub) is None and config:
            # two full factors: PEFT still scales by alpha/r, kohya loaders by nothing, so the scale goes into w1
            r, peft_alpha = _peft_r_alpha(algo, None, config, pattern_path)
            if peft_alpha != r:
                w1 = out[f"{name}.lokr_w1"]
                out[f"{name}.lokr_w1"] = (w1.double() * (float(peft_alpha) / float(r))).to(w1.dtype)
        if name in side.get("no_alpha", []):
            continue
        if name in side.get("lokr_full_alpha", {}):
            alpha = side["lokr_full_alpha"][name]
        shape: list = []
        if name in side.get("alpha_dtype", {}):
            dname, shape = side["alpha_dtype"][name]
            dtype = getattr(torch, dname)
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype).reshape(shape)
    return out, meta


def _peft_alpha(algo: str, sub, config: Mapping, path: str) -> float:
    """The kohya alpha that gives PEFT's scale (alpha_peft / r_peft) for one module: alpha_peft itself when the
    module's kohya dim equals r_peft (LoRA, LoHa, low-rank LoKr), else r_peft's scale times the kohya dim."""
    rank = _rank(algo, sub)
    if not config:
        return float(rank) if rank is not None else 1.0
    r, alpha = _peft_r_alpha(algo, rank, config, path)
    if rank is None:  # LoKr, two full factors: no loader reads alpha; kohya writes dim (PEFT's scale is in w1)
        return float(r)
    if rank == r:
        return float(alpha)
    return float(alpha) / float(r) * rank


def _peft_r_alpha(algo: str, rank: int | None, config: Mapping, path: str) -> tuple:
    """PEFT's (r, alpha) for one module: the config's, or its rank/alpha pattern's (alpha defaults to r). With
    use_rslora PEFT scales a LoRA by alpha / sqrt(r): that alpha is returned as alpha sqrt(r), whose alpha / r
    kohya loaders apply."""
    r = _pattern_value(config.get("rank_pattern") or {}, path, config.get("r", rank))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, path,
                           config.get("lora_alpha" if algo == "lora" else "alpha", r))
    if algo == "lora" and config.get("use_rslora") is True and r:
        alpha = float(alpha) * math.sqrt(float(r))
    return r, alpha


# --------------------------------------------------------------------------------------------------
# kohya -> kohya: U-Net name style


def rename_unet(tensors: Mapping[str, torch.Tensor], style: str, arch: str | None = None) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS tensors with U-Net names in ``style``: "sgm" (``lora_unet_input_blocks_4_1_...``),
    "diffusers" (``lora_unet_down_blocks_1_attentions_0_...``) or "kohya" (SGM for SDXL, diffusers otherwise).
    Text-encoder names and all tensors are kept."""
    if style not in ("kohya", "sgm", "diffusers"):
        raise LayoutError(f"unet_names={style!r}: expected kohya, sgm or diffusers")
    groups = _group(tensors)
    a = _kohya_arch(groups, arch)
    if style == "kohya":
        style = "sgm" if a == "sdxl" else "diffusers"
    out: dict[str, torch.Tensor] = {}
    for name, sub in groups.items():
        new = name
        if name.startswith("lora_unet_"):
            new = path_to_name("lora_unet_", _unet_path(name_to_path(name[len("lora_unet_"):], name), a, style, name))
        for k, v in sub.items():
            key = f"{new}.{k}"
            if key in out:
                raise LayoutError(f"{name}: names the same module as another adapter in this file ({new})")
            out[key] = v
    return out


# --------------------------------------------------------------------------------------------------
# OneTrainer OMI -> kohya


def _module_and_tensor(rest: str) -> tuple[str, str]:
    """``input_blocks.4.1.proj_in.lora_down.weight`` -> (module path, tensor name) by the tensor names of lorakit's
    algorithms (a dot cannot tell: ``lora_down.weight`` has one); an unknown tensor is the last part, for the
    loaders to name."""
    from ..algos import ALGORITHMS

    for tensor in sorted({k for cls in ALGORITHMS for k in cls.keys} | {"dora_scale"}, key=len, reverse=True):
        if rest.endswith("." + tensor):
            return rest[: -len(tensor) - 1], tensor
    path, _, tensor = rest.rpartition(".")
    return path, tensor


def omi_arch(tensors, arch: str | None = None) -> str:
    """"sd1" or "sdxl" of an OMI file: ``arch`` when given, else from ``clip_g.`` and the U-Net paths; "sd1" when
    nothing tells (as for diffusers/PEFT files)."""
    if arch is not None:
        return _check_arch(arch)
    components = {"text_encoder_2"} if any(k.startswith("clip_g.") for k in tensors) else set()
    paths = [_module_and_tensor(k[len("unet."):])[0] for k in tensors if k.startswith("unet.")]
    return guess_arch(paths, components) or "sd1"


def omi_to_kohya(tensors: Mapping[str, torch.Tensor], arch: str | None = None,
                 unet_names: str = "kohya") -> dict[str, torch.Tensor]:
    """OneTrainer's OMI layout (what its LoRASaverMixin writes with the OMI format and in internal backups:
    ``unet.`` + the SGM path, ``clip_l.``/``clip_g.`` + the CLIP path, then kohya's tensor names) -> kohya names:
    ``lora_unet_``, ``clip_l.`` -> ``lora_te_`` (SD1/SD2) or ``lora_te1_`` (SDXL), ``clip_g.`` -> ``lora_te2_``.
    OneTrainer's key sets map prefixes only, so the tensors (alphas included) pass through unchanged. ``unet_names``
    as for ``rename_unet``; "sgm" keeps the file's paths. Keys of no OMI prefix are kept."""
    a = omi_arch(tensors, arch)
    prefixes = {"unet.": "lora_unet_", "clip_l.": "lora_te1_" if a == "sdxl" else "lora_te_", "clip_g.": "lora_te2_"}
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        head = next((p for p in prefixes if key.startswith(p)), None)
        if head is None:
            out[key] = value
            continue
        path, tensor = _module_and_tensor(key[len(head):])
        out[f"{path_to_name(prefixes[head], path)}.{tensor}"] = value
    return out if unet_names == "sgm" else rename_unet(out, unet_names, a)
