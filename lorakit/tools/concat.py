"""Several LoRA/LoCon files into one LoRA by concatenating ranks: exact.

File i's change on a module is f_i * up_i @ down_i with f_i = ratio_i * block weight * alpha_i / rank_i. The
module keeps one shared scale s in its alpha (alpha = s * total rank, read as alpha / rank by every loader), s the
smallest |f_i|; scaling down_i by sqrt(|f_i| / s) and up_i by sign(f_i) sqrt(|f_i| / s) and stacking the ranks
gives s * up @ down = sum_i f_i up_i @ down_i. No factor is scaled down (folding a small alpha / rank into the
factors pushed them into fp16's subnormals): those of the file with the smallest |f_i| keep their size (bit for
bit where alpha is exact in the save dtype). Tucker modules (lora_mid) concatenate with a block-diagonal mid.
What cannot be written as one LoRA is refused: other algorithms (LoHa's Hadamard and LoKr's Kronecker products
are not low-rank sums of their factors), DoRA (not additive), and a conv that is Tucker in one file and plain in
another.
"""

from __future__ import annotations

import math
import os
import re
from typing import Mapping, Sequence

import torch

__all__ = ["concat_loras", "block_of_name", "module_of_name", "module_block_weights", "module_algorithm",
           "wrong_algorithm", "unlisted_block_modules", "kohya_embedding_modules", "one_layer_shape"]

LORA_KEYS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha")
_TE_SHORT = re.compile(r"^(lora_te[12]?_)(?=encoder_|embeddings_|final_layer_norm)")
_SGM_UNET = re.compile(r"^lora_unet_(?:input_blocks|middle_block|output_blocks)_")
_DIFFUSERS_UNET = re.compile(r"^lora_unet_(?:down_blocks|mid_block|up_blocks)_")
# The block part of a U-Net adapter name as a module path; the rest of the name is not needed (and `_` in it is
# ambiguous), so only these unambiguous heads are parsed.
_UNET_HEADS = (
    (re.compile(r"^(down_blocks|up_blocks)_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)(?:_|$)"),
     lambda m: f"{m[1]}.{m[2]}.{m[3]}.{m[4]}"),
    (re.compile(r"^mid_block_(resnets|attentions)_(\d+)(?:_|$)"), lambda m: f"mid_block.{m[1]}.{m[2]}"),
    (re.compile(r"^(input_blocks|output_blocks|middle_block)_(\d+)(?:_|$)"), lambda m: f"{m[1]}.{m[2]}"),
    (re.compile(r"^(time_embedding|add_embedding|conv_norm_out|conv_in|conv_out|time_embed|label_emb|out)(?:_|$)"),
     lambda m: m[1]),
)


def canonical_name(name: str) -> str:
    """Text-encoder names with the transformers-4 `text_model_` (the community form), whichever was written."""
    return _TE_SHORT.sub(r"\1text_model_", name)


def module_of_name(name: str) -> tuple[str, str] | None:
    """(component, the part of the module path that fixes its block) of an adapter name, without a model:
    text encoders ("text_encoder", ""); U-Net names in diffusers or SGM form; None for other names."""
    if name.startswith(("lora_te_", "lora_te1_", "lora_te2_")):
        return "text_encoder", ""
    if not name.startswith("lora_unet_"):
        return None
    rest = name[len("lora_unet_"):]
    for pattern, path in _UNET_HEADS:
        m = pattern.match(rest)
        if m:
            return "unet", path(m)
    return None


def block_of_name(name: str, layout) -> str | None:
    """The block (in `layout`) of an adapter name, without a model: text encoders are BASE; U-Net names in
    diffusers or SGM form; None outside the layout's blocks."""
    where = module_of_name(name)
    return None if where is None else layout.name(where[1], where[0])


def module_block_weights(names, block_weights, arch: str | None) -> dict[str, float]:
    """{adapter name: block weight} of one file's modules under one vector or {block: value} (None: all 1), as
    `Network.set_block_multipliers` weighs them (`BlockLayout.module_weight`); names with no place in the
    U-Net's blocks or the text encoders keep 1."""
    from ..network.blocks import pick_layout

    if block_weights is None:
        return {}
    layout = pick_layout(arch, block_weights)
    per_block = layout.block_values(block_weights)
    out = {}
    for name in names:
        where = module_of_name(name)
        if where is not None:
            out[name] = layout.module_weight(per_block, where[1], where[0])
    return out


def module_algorithm(name: str, sd: Mapping[str, torch.Tensor], where: str) -> str:
    """The algorithm of one module's tensors as the loaders detect it ("lora", "loha", "full", ...); an error
    naming the file and module when no algorithm has them."""
    from ..algos import detect_algorithm

    try:
        return detect_algorithm(sd).name
    except ValueError as e:
        raise ValueError(f"{where}: module '{name}': {e}") from None


def wrong_algorithm(where: str, name: str, sd: Mapping[str, torch.Tensor], algo: str, accepted: str) -> ValueError:
    """The error for a module of an algorithm a merge cannot take: what it is, its tensors, what is taken."""
    return ValueError(f"{where}: module '{name}' is {algo} (tensors {', '.join(sorted(sd))}); only {accepted}")


def unlisted_block_modules(names, block_weights, arch: str | None) -> dict[str, str]:
    """{adapter name: block} of the modules lying in a LoRA Block Weight block that a 17/12-value vector leaves
    out: they get weight 0 (`BlockLayout.unlisted`, the extension's to26()), where kohya's svd_merge_lora.py
    keeps them at 1. {} for every other vector or mapping."""
    from ..network.blocks import locate, pick_layout

    if block_weights is None or isinstance(block_weights, Mapping):
        return {}
    layout = pick_layout(arch, block_weights)
    if layout.unlisted == 1.0:
        return {}
    out = {}
    for name in names:
        where = module_of_name(name)
        if where is not None and layout.name(where[1], where[0]) is None \
                and layout.outside_weight(where[1], where[0]) != 1.0:
            out[name] = locate(where[1], where[0]).label(layout.split_mid)
    return out


_SGM_EMBEDDINGS = ("lora_unet_time_embed_", "lora_unet_label_emb_")  # what get_lbw_block_index(is_sdxl) calls IN00


def kohya_embedding_modules(names, block_weights, arch: str | None) -> dict[str, float]:
    """{adapter name: IN00's value} of the SDXL time/label-embedding modules (SGM names) to which kohya's
    svd_merge_lora.py/sdxl_merge_lora.py give IN00's value of a 20-value vector (get_lbw_block_index returns 1,
    IN00, for them), where lorakit keeps 1: they lie in none of the LoRA Block Weight extension's blocks, and
    lorakit applies its rule at run time too. {} for other vectors, or where IN00 is 1."""
    from ..network.blocks import SDXL20, pick_layout

    if block_weights is None or isinstance(block_weights, Mapping):
        return {}
    layout = pick_layout(arch, block_weights)
    in00 = layout.block_values(block_weights)["IN00"] if layout is SDXL20 else 1.0
    return {} if in00 == 1.0 else {n: in00 for n in names if n.startswith(_SGM_EMBEDDINGS)}


def _not_concatenable(algo: str) -> str:
    """Why a module of `algo` cannot be concatenated, and only the merges that take it: the SVD merge takes full
    modules (merge_svd), a model every algorithm."""
    if algo == "full":
        return ("LoRA/LoCon files can be concatenated into one LoRA (a full module stores its whole change, no "
                "factors). Re-factorise the summed change with SVD (--new_rank), or merge it into a model with --model")
    return (f"LoRA/LoCon files can be concatenated into one LoRA ({algo}'s change is no sum of low-rank products of "
            f"its factors). Merge it into a model with --model; `lorakit extract BASE MERGED OUT` then gives a LoRA of "
            f"its change")


def _read(file: str, dtype: torch.dtype) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """{module name: {tensor suffix: tensor}} of a LoRA file, each module checked to be concatenable."""
    from ..network.load import check_layout, read_adapter_tensors, refuse_non_finite, without_bundled_embeddings
    from ..network.names import split_key

    tensors, metadata, where = read_adapter_tensors(file)
    tensors = without_bundled_embeddings(tensors, where)
    check_layout(tensors, file)
    refuse_non_finite(tensors, file, "the merged LoRA")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, suffix = split_key(key)
        modules.setdefault(canonical_name(name), {})[suffix] = value
    for name, sd in modules.items():
        algo = module_algorithm(name, sd, file)
        if algo != "lora":
            raise wrong_algorithm(file, name, sd, algo, _not_concatenable(algo))
        if "dora_scale" in sd:
            raise ValueError(f"{file}: module '{name}' is DoRA (dora_scale): its change depends on the weight it "
                             f"is added to, so it has no place in a sum of LoRAs; merge it into a model with --model")
        unknown = sorted(set(sd) - set(LORA_KEYS))
        if unknown or "lora_down.weight" not in sd or "lora_up.weight" not in sd:
            raise ValueError(f"{file}: module '{name}': expected LoRA tensors {', '.join(LORA_KEYS[:3])} (+ alpha), "
                             f"got {', '.join(sorted(sd))}")
        for k, v in sd.items():
            if k != "alpha":
                sd[k] = v.to(dtype)
    return modules, metadata


def one_layer_shape(a: tuple, b: tuple) -> tuple | None:
    """The weight shape to write for a layer two files change as `a` and `b`: the shape when they agree; a
    Linear-shaped (out, in) and a 1x1-conv-shaped (out, in, 1, 1) change of one layer (an SD2-style file on SD1's
    conv proj_in, or the reverse on SDXL's Linear one) as (out, in, 1, 1), which every loader reshapes to the
    layer: ComfyUI and A1111 to the weight's shape, kohya's merge_lora.py by squeezing 4-D factors on a Linear.
    None when they are different layers' shapes."""
    if a == b:
        return a
    flat, conv = sorted((a, b), key=len)
    return conv if len(flat) == 2 and conv[:2] == flat and conv[2:] == (1, 1) else None


def _weight_shape(sd: Mapping[str, torch.Tensor]) -> tuple:
    down, up = sd["lora_down.weight"], sd["lora_up.weight"]
    kernel = tuple(sd["lora_mid.weight"].shape[2:]) if "lora_mid.weight" in sd else tuple(down.shape[2:])
    return (up.shape[0], down.shape[1], *kernel)


def _conv1x1_view(sds: Sequence[Mapping[str, torch.Tensor]]) -> bool:
    """Whether one module comes Linear-shaped in some files and 1x1-conv-shaped in others (one_layer_shape)."""
    shapes = {_weight_shape(sd) for sd in sds}
    if len(shapes) != 2:
        return False
    a, b = shapes
    return one_layer_shape(a, b) is not None


def _parts(name: str, sd: Mapping[str, torch.Tensor], file: str, conv1x1: bool = False):
    """(down, up, mid or None) of one file's module, shaped to be stacked; `conv1x1`: Linear-shaped factors
    written as a 1x1 conv's."""
    down, up, mid = sd["lora_down.weight"], sd["lora_up.weight"], sd.get("lora_mid.weight")
    rank = down.shape[0]
    if conv1x1 and down.dim() == 2:
        down = down.reshape(*down.shape, 1, 1)
    if up.dim() == 2 and down.dim() > 2:  # a conv's up saved as (out, rank), as the UIs accept
        up = up.reshape(*up.shape, *([1] * (down.dim() - 2)))
    if up.shape[1] != rank or (mid is not None and tuple(mid.shape[:2]) != (rank, rank)):
        raise ValueError(f"{file}: module '{name}': lora_up {tuple(up.shape)} / lora_mid "
                         f"{None if mid is None else tuple(mid.shape)} do not fit lora_down {tuple(down.shape)}")
    return down, up, mid


def _shared_alpha(factors: Sequence[float], total: int, dtype: torch.dtype) -> float:
    """The alpha of a concatenated module of `total` rank whose parts have `factors` (ratio x block weight x
    alpha/rank): total x the smallest |factor|, so that no part's factors are scaled down, rounded to the dtype the
    alpha is saved in (the parts are scaled by the rounded value, so the sum stays exact) and kept within its
    normal range."""
    info = torch.finfo(dtype)
    alpha = min(max(min(abs(f) for f in factors) * total, info.tiny), info.max)
    return float(torch.tensor(alpha, dtype=torch.float64).to(dtype))


def _scaled(down: torch.Tensor, up: torch.Tensor, factor: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """down and up carrying factor / scale between them, sqrt each, the sign on up."""
    root = math.sqrt(abs(factor) / scale)
    return down * root, up * math.copysign(root, factor)


def _block_diag(mids: Sequence[torch.Tensor]) -> torch.Tensor:
    total = sum(m.shape[0] for m in mids)
    out = mids[0].new_zeros(total, total, *mids[0].shape[2:])
    at = 0
    for m in mids:
        r = m.shape[0]
        out[at:at + r, at:at + r] = m
        at += r
    return out


def common_arch(files_modules: Sequence[tuple[str, Sequence[str]]]) -> str | None:
    """"sd" or "sdxl" from the module names of every file (None: the names do not tell); files of both are an
    error."""
    from .merge import adapter_arch

    archs = {file: adapter_arch(mods) for file, mods in files_modules}
    known = {a for a in archs.values() if a}
    if len(known) > 1:
        shown = ", ".join(f"{f}: {'SDXL' if a == 'sdxl' else 'SD1/SD2'}" for f, a in archs.items() if a)
        raise ValueError(f"the adapters are for different model architectures ({shown}); merge files of one")
    return known.pop() if known else None


def _arch_of(files_modules: Sequence[tuple[str, Mapping]]) -> str | None:
    """"sd" or "sdxl" from the names; files of both, or U-Net names in both SDXL styles, are errors."""
    arch = common_arch(files_modules)
    styles = {}
    for file, mods in files_modules:
        if any(_SGM_UNET.match(n) for n in mods):
            styles.setdefault("SGM (input_blocks)", file)
        if any(_DIFFUSERS_UNET.match(n) for n in mods):
            styles.setdefault("diffusers (down_blocks)", file)
    if len(styles) > 1 and arch == "sdxl":
        shown = ", ".join(f"{s} in {f}" for s, f in styles.items())
        raise ValueError(f"the SDXL adapters name U-Net modules in two styles ({shown}); the same module would be "
                         f"written twice under two names. Convert them to one style first (`lorakit convert`)")
    return arch


def concat_loras(files: Sequence[str | os.PathLike], ratios: Sequence[float], block_weights=None,
                 dtype: torch.dtype = torch.float32, shuffle: bool = False, progress: bool = True,
                 seed: int = 0, save_dtype: torch.dtype | None = None) -> tuple[
                     dict[str, torch.Tensor], dict[str, str], str | None]:
    """(tensors, metadata, kind) of one LoRA whose change on every module is the sum over files of ratio x
    block weight x the file's change. Modules in only some files take only those files' parts. `block_weights`
    as `merge_into_model` takes them (layout by vector length). `shuffle` permutes the rank components (kohya's
    --shuffle; the change is the same). `dtype`: that of the factors; `save_dtype`: that of the alphas (default
    float32), each chosen exact in it (`_shared_alpha`). `kind` is "sd1", "sd2", "sdxl" or None (unknown)."""
    from tqdm.auto import tqdm

    from .merge import check_block_weights, check_ratios

    files = [os.fspath(f) for f in files]
    ratios = check_ratios(files, ratios)
    read = [(f, *_read(f, dtype)) for f in tqdm(files, desc="reading LoRAs", unit="file", disable=not progress)]
    arch = _arch_of([(f, mods) for f, mods, _ in read])
    weights = check_block_weights(block_weights, len(files), arch)
    module_weights = [module_block_weights(mods, bw, arch) for (_, mods, _), bw in zip(read, weights)]

    names = list(dict.fromkeys(n for _, mods, _ in read for n in mods))
    generator = torch.Generator().manual_seed(seed)
    alpha_dtype = save_dtype or torch.float32
    out: dict[str, torch.Tensor] = {}
    ranks: set[int] = set()
    alphas: set[float] = set()
    for name in tqdm(names, desc="concatenating", unit="module", disable=not progress):
        downs, ups, mids, sources, factors = [], [], [], [], []
        conv1x1 = _conv1x1_view([mods[name] for _, mods, _ in read if name in mods])
        for (file, mods, _), ratio, per_module in zip(read, ratios, module_weights):
            sd = mods.get(name)
            if sd is None:
                continue
            rank = sd["lora_down.weight"].shape[0]
            alpha = float(sd["alpha"]) if "alpha" in sd else rank  # no alpha: alpha = rank, as loaders read it
            factor = ratio * per_module.get(name, 1.0) * alpha / rank
            down, up, mid = _parts(name, sd, file, conv1x1)
            if downs and (down.shape[1:] != downs[0].shape[1:] or up.shape[0] != ups[0].shape[0]
                          or up.shape[2:] != ups[0].shape[2:] or (mid is None) != (mids[0] is None)
                          or (mid is not None and mid.shape[2:] != mids[0].shape[2:])):
                _mismatch(name, sources[0], file, downs[0], ups[0], mids[0], down, up, mid)
            if factor == 0:
                continue
            downs.append(down), ups.append(up), mids.append(mid), sources.append(file), factors.append(factor)
        if not downs:
            continue  # every file's part of this module has ratio or block weight 0
        total = sum(d.shape[0] for d in downs)
        alpha = _shared_alpha(factors, total, alpha_dtype)
        parts = [_scaled(d, u, f, alpha / total) for d, u, f in zip(downs, ups, factors)]
        down, up = torch.cat([d for d, _ in parts], 0), torch.cat([u for _, u in parts], 1)
        mid = None if mids[0] is None else _block_diag(mids)
        if shuffle:
            perm = torch.randperm(down.shape[0], generator=generator)
            down, up = down[perm], up[:, perm]
            mid = None if mid is None else mid[perm][:, perm]
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        if mid is not None:
            out[f"{name}.lora_mid.weight"] = mid.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=alpha_dtype)
        ranks.add(total), alphas.add(alpha)
    if not out:
        raise ValueError("the merged LoRA would be empty: every ratio (or block weight) is 0")
    metadata = _metadata([m for _, _, m in read], ranks, alphas)
    return out, metadata, lora_kind(arch, metadata)


def _mismatch(name, file_a, file_b, down_a, up_a, mid_a, down_b, up_b, mid_b):
    if (mid_a is None) != (mid_b is None):
        tucker, plain = (file_a, file_b) if mid_a is not None else (file_b, file_a)
        raise ValueError(f"module '{name}': Tucker (lora_mid) in {tucker} but not in {plain}; these cannot be "
                         f"concatenated into one LoRA module. Use --new_rank (SVD), or merge into a model")

    def shape(down, up):
        return f"lora_down {tuple(down.shape)}, lora_up {tuple(up.shape)}"

    raise ValueError(f"module '{name}': {file_a} has {shape(down_a, up_a)} but {file_b} has {shape(down_b, up_b)}; "
                     f"are they LoRAs of the same model?")


def _is_v2(metadata: Mapping[str, str]) -> bool:
    return metadata.get("ss_v2") == "True" or metadata.get("ss_base_model_version", "").startswith("sd_v2")


def base_model_keys(inputs: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """ss_v2, ss_base_model_version, ss_sd_model_name, each from the first input that has it (UIs tell an SDXL
    LoRA from an SD1 one by them)."""
    meta = {}
    for key in ("ss_v2", "ss_base_model_version", "ss_sd_model_name"):
        value = next((m[key] for m in inputs if key in m), None)
        if value is not None:
            meta[key] = value
    return meta


def lora_kind(arch: str | None, metadata: Mapping[str, str]) -> str | None:
    """"sd1", "sd2" or "sdxl" of a merged LoRA from its names' architecture and its base model keys; None unknown."""
    return "sdxl" if arch == "sdxl" else ("sd2" if _is_v2(metadata) else ("sd1" if arch == "sd" else None))


def _metadata(inputs: Sequence[Mapping[str, str]], ranks: set[int], alphas: set[float]) -> dict[str, str]:
    """kohya's minimum network metadata (a dim or alpha all modules share, else "Dynamic"); the base model keys
    come from the first input that has them."""
    dim = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
    alpha = str(next(iter(alphas))) if len(alphas) == 1 else "Dynamic"
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": alpha}
    meta.update(base_model_keys(inputs))
    return meta
