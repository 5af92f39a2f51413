"""inspect: what an adapter file holds. Per module: algorithm, dim, alpha, dtype, parameters, block; the file's
blocks, zero (untrained) and NaN/Inf tensors, and its metadata (``ss_*``, tag frequencies, ``modelspec.*``).

Reads kohya/LyCORIS files (``lora_unet_``/``lora_te*_``, ``lycoris_``), diffusers/PEFT files (shown under the
kohya names ``lorakit convert`` would give them, with the alphas their config holds), OneTrainer's OMI files
(under kohya names with their SGM paths) and sd-scripts' OFT files (``oft_unet_``, their own names and alphas). A
model checkpoint is reported as one, not as an adapter.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Mapping

import torch

from ..formats import find_non_finite
from ..formats.peft_layout import (KOHYA_PREFIXES, SD_SCRIPTS_OFT_PREFIX, LayoutError, detect_layout, name_to_path,
                                   omi_to_kohya, peft_to_kohya)
from ..network.load import read_adapter_tensors, without_bundled_embeddings
from ..network.names import group_by_module

__all__ = ["InspectError", "inspect_file", "inspect_tensors", "format_report", "module_dim"]

# Factors whose product is the change: one all-zero factor means the module changes nothing (untrained).
_FACTORS = {"lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
            "dylora": ("lora_down.weight", "lora_up.weight"),
            "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
            "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}
_NOT_PARAMS = ("alpha", "on_input")  # scalars/flags in the file, not trained parameters
_SECTION_ORDER = {"BASE": 0, "EMB": 1, "IN": 2, "MID": 3, "OUT": 4, "FINAL": 5}
_PREFIXES = {**KOHYA_PREFIXES, SD_SCRIPTS_OFT_PREFIX: "unet"}  # name prefix -> component
_LAYOUTS = {"kohya": "kohya/LyCORIS", "generic": "LyCORIS (generic model, lycoris_ names)", "peft": "diffusers/PEFT",
            "omi": "OneTrainer OMI (unet./clip_l./clip_g. names)",
            "sd-scripts-oft": "sd-scripts OFT (oft_unet_ names; alpha x out_dim bounds |Q|)"}


class InspectError(ValueError):
    """A file inspect cannot read as an adapter; the message names the file."""


def module_dim(algo: str, sub: Mapping[str, torch.Tensor]) -> int | None:
    """The dim (rank) loaders divide alpha by; for OFT the block size; None where there is none (LoKr with
    two full factors, (IA)^3, full, norm)."""
    if algo in ("lora", "dylora"):
        return int(sub["lora_down.weight"].shape[0])
    if algo == "loha":
        return int(sub["hada_w1_b"].shape[0])
    if algo == "lokr":
        for k in ("lokr_w2_b", "lokr_w1_b"):
            if k in sub:
                return int(sub[k].shape[0])
        return None
    if algo == "glora":
        return int(sub["b1.weight"].shape[1])  # b1 (out, dim); a1 is (in, dim)
    if algo in ("diag-oft", "boft"):
        return int(sub["oft_blocks"].shape[-1])
    return None


def _block(name: str) -> tuple[str, str | None]:
    """(component, block label) of an adapter name: "IN04", "MID", "OUT02", "EMB", "FINAL", "BASE" or None."""
    from ..network.blocks import locate

    for prefix in sorted(_PREFIXES, key=len, reverse=True):
        if name.startswith(prefix):
            component = _PREFIXES[prefix]
            if component != "unet":
                return component, "BASE"
            try:
                loc = locate(name_to_path(name[len(prefix):]), "unet")
            except LayoutError:
                return component, None
            return component, None if loc is None else loc.label()
    return "model", None


def _block_key(label: str) -> tuple:
    section = label.rstrip("0123456789")
    number = label[len(section):]
    return _SECTION_ORDER.get(section, 9), int(number) if number else -1


def _untrained(algo: str, sub: Mapping[str, torch.Tensor], zero: set[str]) -> bool:
    factors = [k for k in _FACTORS.get(algo, ()) if k in sub]
    if factors:
        return any(k in zero for k in factors)
    trained = [k for k in sub if k not in _NOT_PARAMS and sub[k].is_floating_point()]
    return bool(trained) and all(k in zero for k in trained)


# Tensors a module cannot do without, and factor pairs whose ranks must agree (left.shape[1] == right.shape[0]);
# Tucker modules contract through their core and are checked for presence only.
_REQUIRED = {"lora": (("lora_up.weight",), ("lora_down.weight",)),
             "dylora": (("lora_up.weight",), ("lora_down.weight",)),
             "loha": (("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)),
             "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")),
             "glora": (("a1.weight",), ("a2.weight",), ("b1.weight",), ("b2.weight",))}
_PAIRS = {"lora": (("lora_up.weight", "lora_down.weight"),), "dylora": (("lora_up.weight", "lora_down.weight"),),
          "loha": (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")),
          "lokr": (("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b"))}
_CORES = ("lora_mid.weight", "hada_t1", "hada_t2", "lokr_t2")


def _as_loaded(sub: Mapping[str, torch.Tensor]) -> tuple[type | None, Mapping[str, torch.Tensor], str | None]:
    """(algorithm, the module's tensors as load_network reads them, why no algorithm reads them): LyCORIS 2.0's
    Diag-OFT rotations (oft_diag) become Diag-OFT blocks there, so they are reported as such."""
    from ..algos import as_loaded, detect_algorithm

    try:
        loaded = as_loaded(sub)
        return detect_algorithm(loaded), loaded, None
    except ValueError as err:
        return None, sub, str(err)


def _malformed(cls: type | None, algo: str, sub: Mapping[str, torch.Tensor], why: str | None) -> str | None:
    """What makes one module unusable (tensors of no algorithm or not of its own, a missing factor, factors of
    different ranks), or None. load_network, merge and resize refuse such a module; ComfyUI skips or errors on it.
    `cls` is the detected algorithm (None: `why` none reads these tensors)."""
    if cls is None:
        return why
    extra = sorted(set(sub) - set(cls.keys))
    if extra:
        return f"tensor(s) {extra} that {algo} does not have"
    for choices in _REQUIRED.get(algo, ()):
        if not any(k in sub for k in choices):
            return f"no {' or '.join(choices)}"
    for left, right in _PAIRS.get(algo, ()):
        if (left in sub) != (right in sub):
            has, lacks = (left, right) if left in sub else (right, left)
            return f"{has} without {lacks}"
        if left in sub and not any(k in sub for k in _CORES) and sub[left].shape[1] != sub[right].shape[0]:
            return (f"{left} {tuple(sub[left].shape)} and {right} {tuple(sub[right].shape)} have different ranks "
                    f"({sub[left].shape[1]}, {sub[right].shape[0]})")
    return None


def _tag_frequency(raw: str, top: int) -> list[tuple[str, int]] | str:
    try:
        data = json.loads(raw)
        counts: Counter = Counter()
        for tags in data.values():
            for tag, n in tags.items():
                counts[tag.strip()] += int(n)
    except (ValueError, AttributeError, TypeError):
        return "(not the JSON kohya writes)"
    return counts.most_common(top)


def inspect_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                    top_tags: int = 10) -> dict[str, Any]:
    """The report of an adapter's tensors (kohya/LyCORIS or diffusers/PEFT layout) and metadata; see
    ``inspect_file``. Raises InspectError for a model checkpoint or an unknown layout."""
    from ..models.detect import classify_keys

    metadata = dict(metadata or {})
    layout = detect_layout(tensors)
    if layout == "unknown":
        kind = classify_keys(tensors)
        if kind in ("sd1", "sd2", "sdxl"):
            kind = f"a model checkpoint ({kind})"
        elif kind.startswith("an adapter"):
            kind = f"adapter tensors in no layout lorakit knows (e.g. '{next(iter(tensors))}')"
        raise InspectError(f"is not an adapter file: it is {kind}")
    view, names_from = dict(tensors), "file"
    if layout == "peft":
        try:
            view, _ = peft_to_kohya(tensors, metadata)
            names_from = "kohya names of the diffusers/PEFT modules (as lorakit convert gives them)"
        except LayoutError as e:
            raise InspectError(f"diffusers/PEFT layout that cannot be read: {e}") from None
    elif layout == "omi":
        view = omi_to_kohya(tensors, unet_names="sgm")
        names_from = "kohya names of the OneTrainer OMI modules (lora_unet_ + their SGM paths)"
    groups = group_by_module(view)
    zero_keys = [k for k, t in view.items()
                 if t.is_floating_point() and t.numel() and not k.endswith(".alpha") and not bool(t.any())]
    zero = set(zero_keys)
    non_finite = find_non_finite(view)
    modules = []
    for name, sub in groups.items():
        cls, loaded, why = _as_loaded(sub)
        algo = "unknown" if cls is None else cls.name
        component, block = _block(name)
        dim = module_dim(algo, loaded) if algo != "unknown" else None
        alpha = loaded.get("alpha")
        alpha = float(alpha.float().reshape(-1)[0]) if alpha is not None and alpha.numel() else None
        if algo == "lora" and alpha is None:
            alpha = float(dim)  # kohya and the UIs read a missing alpha as alpha = dim
        local_zero = {k.partition(".")[2] for k in zero if k.partition(".")[0] == name}
        modules.append({
            "name": name, "component": component, "block": block, "algo": algo, "dim": dim, "alpha": alpha,
            "scale": None if alpha is None or not dim or algo in ("diag-oft", "boft") else alpha / dim,
            "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                        for k, t in sorted(sub.items())},
            "parameters": sum(t.numel() for k, t in sub.items() if k not in _NOT_PARAMS),
            "dora": "dora_scale" in sub, "tucker": any(k in sub for k in ("lora_mid.weight", "hada_t1", "lokr_t2")),
            "untrained": _untrained(algo, sub, local_zero),
            "malformed": _malformed(cls, algo, loaded, why),
        })
    blocks = sorted({m["block"] for m in modules if m["block"]}, key=_block_key)
    ss = {k: v for k, v in sorted(metadata.items()) if k.startswith("ss_")}
    spec = {k: v for k, v in sorted(metadata.items()) if k.startswith("modelspec.")}
    other = {k: v for k, v in sorted(metadata.items()) if k not in ss and k not in spec}
    return {
        "layout": _LAYOUTS[layout],
        "names": names_from,
        "modules": modules,
        "summary": {
            "modules": len(modules),
            "algorithms": dict(Counter(m["algo"] for m in modules)),
            "components": dict(Counter(m["component"] for m in modules)),
            "dims": dict(sorted(Counter(str(m["dim"]) for m in modules).items())),
            "alphas": dict(sorted(Counter(str(m["alpha"]) for m in modules).items())),
            "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())),
            "parameters": sum(m["parameters"] for m in modules),
            "tensors": len(tensors),
            "blocks": blocks,
            "blocks_per_module": dict(Counter(m["block"] or "-" for m in modules)),
        },
        "zero_tensors": sorted(zero_keys),
        "untrained_modules": [m["name"] for m in modules if m["untrained"]],
        "malformed_modules": {m["name"]: m["malformed"] for m in modules if m["malformed"]},
        "non_finite_tensors": non_finite,
        "metadata": {"ss": ss, "modelspec": spec, "other": other,
                     "tag_frequency_top": _tag_frequency(ss["ss_tag_frequency"], top_tags)
                     if "ss_tag_frequency" in ss else None},
    }


def inspect_file(path: str | os.PathLike, top_tags: int = 10) -> dict[str, Any]:
    """The report of an adapter file: ``layout``, ``modules`` (name, component, block, algo, dim, alpha, scale,
    tensors with shapes and dtypes, parameters, dora, tucker, untrained), ``summary`` (counts per algorithm,
    component, dim, alpha, dtype; total parameters (every tensor but ``alpha``/``on_input``); blocks present),
    ``zero_tensors``, ``untrained_modules`` (a factor of the product is all zero, or every tensor is),
    ``malformed_modules`` ({name: what is wrong}: tensors of no algorithm or not of the module's, a missing factor,
    factors of different ranks),
    ``non_finite_tensors``, ``metadata`` (``ss``, ``modelspec``, ``other``, ``tag_frequency_top``), ``file``
    and ``file_size``. A model checkpoint or another kind of file raises InspectError saying what it is."""
    where = os.fspath(path)
    tensors, metadata, _ = read_adapter_tensors(where)
    tensors = without_bundled_embeddings(tensors, where)  # as the loaders leave them out
    try:
        report = inspect_tensors(tensors, metadata, top_tags)
    except InspectError as e:
        raise InspectError(f"{where}: {e}") from None
    return {"file": where, "file_size": os.path.getsize(where), **report}


def _short(value: str, width: int = 100) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= width else value[: width - 20] + f"... ({len(value)} chars)"


def format_report(report: Mapping[str, Any], modules: bool = True) -> str:
    """The report as text for people."""
    s = report["summary"]
    lines = [f"file:       {report.get('file', '-')} ({report.get('file_size', 0):,} bytes)",
             f"layout:     {report['layout']}",
             f"modules:    {s['modules']}  " + ", ".join(f"{k} {v}" for k, v in s["components"].items()),
             "algorithms: " + ", ".join(f"{k} x{v}" for k, v in s["algorithms"].items()),
             "dims:       " + ", ".join(f"{k} x{v}" for k, v in s["dims"].items()),
             "alphas:     " + ", ".join(f"{k} x{v}" for k, v in s["alphas"].items()),
             "dtypes:     " + ", ".join(f"{k} x{v}" for k, v in s["dtypes"].items()),
             f"parameters: {s['parameters']:,} in {s['tensors']} tensors",
             "blocks:     " + (" ".join(s["blocks"]) if s["blocks"] else "-")]
    if report["names"] != "file":
        lines.append(f"names:      {report['names']}")
    if report["non_finite_tensors"]:
        bad = report["non_finite_tensors"]
        lines.append(f"NaN/Inf:    {len(bad)} tensor(s): " + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
    else:
        lines.append("NaN/Inf:    none")
    untrained = report["untrained_modules"]
    lines.append(f"untrained:  {len(untrained)} module(s) with an all-zero factor" +
                 (": " + ", ".join(untrained[:5]) + (" ..." if len(untrained) > 5 else "") if untrained else ""))
    malformed = report["malformed_modules"]
    lines.append(f"malformed:  {len(malformed)} module(s)" + (": " + "; ".join(
        f"{name}: {why}" for name, why in list(malformed.items())[:5]) + (" ..." if len(malformed) > 5 else "")
        if malformed else ""))
    if modules:
        lines.append("")
        lines.append(f"{'module':<72} {'algo':<8} {'block':<6} {'dim':>5} {'alpha':>8} {'params':>10}  dtype")
        for m in report["modules"]:
            dtype = ",".join(sorted({t["dtype"] for t in m["tensors"].values()}))
            flags = (" dora" if m["dora"] else "") + (" tucker" if m["tucker"] else "") + \
                    (" UNTRAINED" if m["untrained"] else "") + (" MALFORMED" if m["malformed"] else "")
            alpha = "-" if m["alpha"] is None else f"{m['alpha']:g}"
            lines.append(f"{m['name']:<72} {m['algo']:<8} {m['block'] or '-':<6} {m['dim'] if m['dim'] is not None else '-':>5} "
                         f"{alpha:>8} {m['parameters']:>10,}  {dtype}{flags}")
    meta = report["metadata"]
    for title, group in (("ss_* metadata", meta["ss"]), ("modelspec", meta["modelspec"]), ("other metadata", meta["other"])):
        shown = {k: v for k, v in group.items() if k != "ss_tag_frequency"}
        if shown:
            lines.append("")
            lines.append(f"{title}:")
            lines.extend(f"  {k}: {_short(v)}" for k, v in shown.items())
    if meta["tag_frequency_top"] is not None:
        lines.append("")
        top = meta["tag_frequency_top"]
        lines.append("top tags: " + (top if isinstance(top, str) else ", ".join(f"{t} ({n})" for t, n in top)))
    return "\n".join(lines)
