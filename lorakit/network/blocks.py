"""Stable Diffusion U-Net blocks (IN/MID/OUT) and kohya's per-block dims, alphas and lr weights.

Every U-Net module lies in one LDM block; diffusers paths and LDM/SGM paths give the same answer:

* ``input_blocks.k``  = IN{k}:  ``conv_in`` is IN00; ``down_blocks.i.{resnets|attentions}.j`` is IN(1+3i+j);
  ``down_blocks.i.downsamplers`` is IN(3+3i)                  (SD1/SD2: IN00-IN11, SDXL: IN00-IN08)
* ``middle_block.m``  = MID (sub-block m: ``mid_block.resnets.0`` 0, ``attentions.0`` 1, ``resnets.1`` 2)
* ``output_blocks.k`` = OUT{k}: ``up_blocks.i.{resnets|attentions}.j`` is OUT(3i+j); ``up_blocks.i.upsamplers``
  is OUT(3i+2)                                                  (SD1/SD2: OUT00-OUT11, SDXL: OUT00-OUT08)
* EMB: ``time_embedding``/``add_embedding`` (SGM ``time_embed``/``label_emb``); FINAL: ``conv_norm_out``,
  ``conv_out`` (SGM ``out.0``/``out.2``); BASE: the text encoders.

Layouts number these for a per-block vector:

* ``KOHYA_SD25``   kohya SD1/SD2 ``block_dims``/``block_alphas``/lr weights: IN00-IN11, MID, OUT00-OUT11.
  kohya's LoRA never adapts IN00 (conv_in). Its ``get_block_index`` returns -1 for every module outside
  down/mid/up blocks (conv_in, time_embedding, conv_norm_out, conv_out), and -1 used as a list index
  picks the last value (OUT11); its own LoRA never adapts those modules.
* ``KOHYA_SDXL23`` kohya SDXL: EMB (time_embed+label_emb), IN00-IN08, MID0, MID1, MID2 (the three
  middle sub-blocks), OUT00-OUT08, FINAL (out). ``down_lr_weight``/``up_lr_weight`` have 9 values and
  ``mid_lr_weight`` 3; EMB and FINAL are fixed at 1.0 for lr weights.
* ``SDXL20``       seed 003 (train_network_appl_weights) and the LoRA Block Weight "20 (XL full)" layout:
  BASE (text encoders), IN00-IN08, MID, OUT00-OUT08.
* ``LBW26``/``LBW17`` (SD1/SD2) and ``LBW12`` (SDXL): LoRA Block Weight's other layouts. As in the
  extension (``to26()``), the blocks the 17 and 12 values leave out get weight 0 (``BlockLayout.unlisted``).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from .names import SD_LAYOUT, SDXL_LAYOUT, UNET_PREFIX, adapter_name, diffusers_to_ldm, is_ldm_path, ldm_to_diffusers

__all__ = [
    "Location", "locate", "BlockLayout",
    "KOHYA_SD25", "KOHYA_SDXL23", "SDXL20", "LBW26", "LBW17", "LBW12", "LAYOUTS", "layout_for", "pick_layout",
    "block_index", "block_name", "expand_block_values",
    "kohya_block_index", "kohya_lr_shape", "kohya_block_lr_weight", "parse_kohya_block_lr_kwargs",
    "kohya_block_dims_alphas", "KOHYA_SD_NUM_BLOCKS", "KOHYA_SDXL_NUM_BLOCKS",
    "TEXT_ENCODER_COMPONENTS",
]
log = logging.getLogger(__name__)

TEXT_ENCODER_COMPONENTS = frozenset({"text_encoder", "text_encoder_2", "te", "te1", "te2", "text_encoders"})

KOHYA_SD_NUM_BLOCKS = 12     # IN/OUT blocks of SD1/SD2 in kohya's vectors
KOHYA_SD_NUM_MID = 1
KOHYA_SDXL_NUM_BLOCKS = 9    # IN/OUT blocks of SDXL
KOHYA_SDXL_NUM_MID = 3


# --------------------------------------------------------------------------------------------------
# where a module is


@dataclass(frozen=True)
class Location:
    """The block a module lies in: ``section`` is "base" (text encoders), "emb", "in", "mid", "out" or
    "final"; ``number`` is the LDM input/output block number, the middle sub-block (0-2, or ``None`` for
    the whole middle block) or ``None``."""

    section: str
    number: int | None = None

    def label(self, split_mid: bool = False) -> str:
        if self.section == "in":
            return f"IN{self.number:02d}"
        if self.section == "out":
            return f"OUT{self.number:02d}"
        if self.section == "mid":
            if split_mid:
                return "MID" if self.number is None else f"MID{self.number}"
            return "MID"
        return {"base": "BASE", "emb": "EMB", "final": "FINAL"}[self.section]


_NUM = re.compile(r"0|[1-9][0-9]*")
_D_EMB = frozenset({"time_embedding", "add_embedding", "class_embedding", "time_proj", "add_time_proj"})
_D_FINAL = frozenset({"conv_norm_out", "conv_act", "conv_out"})
_MID_SUB = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}


def _diffusers_location(parts: list[str], lpb: int) -> Location | None:
    head = parts[0]
    if head == "conv_in":
        return Location("in", 0)
    if head in _D_EMB:
        return Location("emb")
    if head in _D_FINAL:
        return Location("final")
    if head in ("down_blocks", "up_blocks"):
        if len(parts) < 4 or not _NUM.fullmatch(parts[1]) or not _NUM.fullmatch(parts[3]):
            return None
        i, kind, j = int(parts[1]), parts[2], int(parts[3])
        if head == "down_blocks":
            if kind in ("resnets", "attentions"):
                return Location("in", 1 + (lpb + 1) * i + j)
            if kind == "downsamplers":
                return Location("in", (lpb + 1) * (i + 1))
        else:
            if kind in ("resnets", "attentions"):
                return Location("out", (lpb + 1) * i + j)
            if kind == "upsamplers":
                return Location("out", (lpb + 1) * i + lpb)
        return None
    if head == "mid_block":
        if len(parts) >= 3:
            sub = _MID_SUB.get((parts[1], parts[2]))
            return Location("mid", sub)
        return Location("mid")
    return None


def _ldm_location(parts: list[str]) -> Location | None:
    head = parts[0]
    if head in ("input_blocks", "output_blocks"):
        if len(parts) < 2 or not _NUM.fullmatch(parts[1]):
            return None
        return Location("in" if head == "input_blocks" else "out", int(parts[1]))
    if head == "middle_block":
        if len(parts) >= 2 and _NUM.fullmatch(parts[1]):
            return Location("mid", int(parts[1]))
        return Location("mid")
    if head in ("time_embed", "label_emb"):
        return Location("emb")
    if head == "out":
        return Location("final")
    return None


def _is_text_encoder(component: str) -> bool:
    return component in TEXT_ENCODER_COMPONENTS or component.startswith("text_encoder")


def locate(path: str, component: str = "unet", layers_per_block: int = 2) -> Location | None:
    """The block of module ``path`` (diffusers or LDM/SGM form) of ``component``. Text encoders are
    "base"; containers spanning several blocks (``down_blocks.1``, ``input_blocks``) and modules of
    other components are ``None``."""
    if _is_text_encoder(component):
        return Location("base")
    if component != "unet" or not path:
        return None
    parts = path.split(".")
    if is_ldm_path(path):
        return _ldm_location(parts)
    return _diffusers_location(parts, layers_per_block)


# --------------------------------------------------------------------------------------------------
# layouts


_ALIASES = {"M00": "MID", "M0": "MID", "MID00": "MID", "BASE": "BASE", "TE": "BASE"}


_LBW_SECTIONS = frozenset({"base", "in", "mid", "out"})  # the LoRA Block Weight extension's 26 blocks


@dataclass(frozen=True)
class BlockLayout:
    """A numbering of blocks for per-block vectors. ``names[i]`` is the block of value ``i``;
    ``split_mid`` numbers the three middle sub-blocks separately (MID0, MID1, MID2).

    ``unlisted`` is the weight of a module lying in one of the LoRA Block Weight extension's blocks (BASE,
    IN00-IN11, MID, OUT00-OUT11) that this layout has no value for: 0 for its 17- and 12-value layouts (the
    extension's ``to26()`` fills the blocks they leave out with 0), 1 for the others. Modules in no such block
    (EMB, FINAL, where the layout does not list them) always keep 1, as in the extension."""

    key: str
    arch: str                      # "sd" (SD1/SD2) or "sdxl"
    names: tuple[str, ...]
    split_mid: bool = False
    doc: str = ""
    unlisted: float = 1.0
    _pos: Mapping[str, int] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pos", {n: i for i, n in enumerate(self.names)})

    def __len__(self) -> int:
        return len(self.names)

    def position(self, block: str) -> int:
        """Index of a block name ("IN04", "MID", "M00", "OUT11", ...) in this layout."""
        b = block.strip().upper()
        b = _ALIASES.get(b, b)
        m = re.fullmatch(r"(IN|OUT)(\d+)", b)
        if m:
            b = f"{m.group(1)}{int(m.group(2)):02d}"
        try:
            return self._pos[b]
        except KeyError:
            raise ValueError(f"block {block!r} is not in layout {self.key} ({', '.join(self.names)})") from None

    def name_at(self, loc: Location | None) -> str | None:
        """The block name of a location in this layout, or ``None`` if the layout has no value for it."""
        if loc is None:
            return None
        label = loc.label(self.split_mid)
        return label if label in self._pos else None

    def name(self, path: str, component: str = "unet") -> str | None:
        """Block name of module ``path`` (diffusers or SGM/LDM) of ``component``; ``None`` outside."""
        return self.name_at(locate(path, component))

    def index(self, path: str, component: str = "unet") -> int | None:
        """Index in this layout's vectors of module ``path`` of ``component``; ``None`` outside."""
        name = self.name(path, component)
        return None if name is None else self._pos[name]

    def block_values(self, values: Sequence[float] | Mapping[str, float]) -> dict[str, float]:
        """{block name: value} of a vector of ``len(self)`` values, or of {block name or alias: value}."""
        if isinstance(values, Mapping):
            return {self.names[self.position(k)]: float(v) for k, v in values.items()}
        if len(values) != len(self):
            raise ValueError(f"layout {self.key} takes {len(self)} values, got {len(values)}")
        return dict(zip(self.names, (float(v) for v in values)))

    def outside_weight(self, path: str, component: str = "unet") -> float:
        """The weight of a module this layout has no value for: ``unlisted`` in one of the extension's blocks,
        else 1."""
        loc = locate(path, component)
        return self.unlisted if loc is not None and loc.section in _LBW_SECTIONS else 1.0

    def module_weight(self, block_values: Mapping[str, float], path: str, component: str = "unet") -> float:
        """The weight of module ``path`` of ``component`` under ``block_values`` (from ``block_values()``): its
        block's value (1 for a listed block a partial mapping leaves out), else ``outside_weight``."""
        name = self.name(path, component)
        if name is None:
            return self.outside_weight(path, component)
        return block_values.get(name, 1.0)


def _seq(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{k:02d}" for k in range(n))


KOHYA_SD25 = BlockLayout(
    "kohya_sd25", "sd", _seq("IN", 12) + ("MID",) + _seq("OUT", 12),
    doc="kohya SD1/SD2 block_dims, block_alphas, conv_block_* and the lr weights built from "
        "down_lr_weight (12), mid_lr_weight (1), up_lr_weight (12)")
KOHYA_SDXL23 = BlockLayout(
    "kohya_sdxl23", "sdxl", ("EMB",) + _seq("IN", 9) + ("MID0", "MID1", "MID2") + _seq("OUT", 9) + ("FINAL",),
    split_mid=True,
    doc="kohya SDXL block_dims, block_alphas, conv_block_* and lr weights (down 9, mid 3, up 9; EMB/FINAL 1.0)")
SDXL20 = BlockLayout(
    "sdxl20", "sdxl", ("BASE",) + _seq("IN", 9) + ("MID",) + _seq("OUT", 9),
    doc="SDXL application rates of seed 003 / LoRA Block Weight 20 (XL full): BASE = text encoders")
LBW26 = BlockLayout(
    "lbw26", "sd", ("BASE",) + _seq("IN", 12) + ("MID",) + _seq("OUT", 12),
    doc="LoRA Block Weight 26 (SD1/SD2 full)")
LBW17 = BlockLayout(
    "lbw17", "sd", ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID") + tuple(f"OUT{k:02d}" for k in range(3, 12)),
    doc="LoRA Block Weight 17 (SD1/SD2, blocks holding attentions; IN00, IN03, IN06, IN09-IN11, OUT00-OUT02 get 0)",
    unlisted=0.0)
LBW12 = BlockLayout(
    "lbw12", "sdxl", ("BASE", "IN04", "IN05", "IN07", "IN08", "MID") + _seq("OUT", 6),
    doc="LoRA Block Weight 12 (SDXL, blocks holding attentions; IN00-IN03, IN06, OUT06-OUT08 get 0)",
    unlisted=0.0)

LAYOUTS: dict[str, BlockLayout] = {l.key: l for l in (KOHYA_SD25, KOHYA_SDXL23, SDXL20, LBW26, LBW17, LBW12)}


def layout_for(arch: str, num_values: int) -> BlockLayout:
    """The layout a vector of ``num_values`` values means for ``arch`` ("sd1"/"sd2"/"sd" or "sdxl"):
    SD 25 -> KOHYA_SD25, 26 -> LBW26, 17 -> LBW17; SDXL 23 -> KOHYA_SDXL23, 20 -> SDXL20, 12 -> LBW12."""
    a = "sdxl" if "xl" in str(arch).lower() else "sd"
    for layout in LAYOUTS.values():
        if layout.arch == a and len(layout) == num_values:
            return layout
    sizes = sorted(len(l) for l in LAYOUTS.values() if l.arch == a)
    raise ValueError(f"no {a} block layout has {num_values} values (known sizes: {sizes})")


def pick_layout(arch: str | None, values: Sequence[float] | Mapping[str, float],
                layout: BlockLayout | str | None = None) -> BlockLayout:
    """The layout of per-block multipliers: ``layout`` (or its key) when given; else, for {block name: value},
    kohya's 25 blocks (SD1/SD2) or the 20-value SDXL names, and for a vector the layout of its length
    (``arch`` None: of any architecture, the lengths differ)."""
    if isinstance(layout, BlockLayout):
        return layout
    if layout is not None:
        try:
            return LAYOUTS[str(layout).lower()]
        except KeyError:
            raise ValueError(f"unknown block layout {layout!r} (known: {', '.join(LAYOUTS)})") from None
    if isinstance(values, Mapping):
        return SDXL20 if arch is not None and "xl" in str(arch).lower() else KOHYA_SD25
    if arch is not None:
        return layout_for(arch, len(values))
    found = [l for l in LAYOUTS.values() if len(l) == len(values)]
    if not found:
        raise ValueError(f"no block layout has {len(values)} values (known sizes: {sorted(len(l) for l in LAYOUTS.values())})")
    return found[0]


def block_index(path: str, layout: BlockLayout, component: str = "unet") -> int | None:
    """Index of module ``path`` (diffusers or SGM) of ``component`` in ``layout``'s vectors, or ``None``."""
    return layout.index(path, component)


def block_name(path: str, layout: BlockLayout, component: str = "unet") -> str | None:
    """Block name ("IN04", "MID", "OUT02", "BASE", ...) of module ``path`` in ``layout``, or ``None``."""
    return layout.name(path, component)


def expand_block_values(values: Sequence[Any], paths: Iterable[str] | Iterable[tuple[str, str]],
                        layout: BlockLayout, component: str = "unet", outside: Any = None,
                        exact_kohya: bool = False) -> dict[Any, Any]:
    """Spread a per-block vector onto modules: ``{path: value}`` (or ``{(component, path): value}`` when
    ``paths`` holds ``(component, path)`` pairs). Modules the layout has no value for get ``outside``.

    ``exact_kohya=True`` (kohya layouts only) indexes exactly as sd-scripts' ``get_block_index`` does on
    the module's kohya name, including its -1 for modules outside the blocks, which picks the last
    value; the default differs only there (conv_in -> IN00, time_embedding/conv_out -> ``outside``)."""
    if len(values) != len(layout):
        raise ValueError(f"layout {layout.key} takes {len(layout)} values, got {len(values)}")
    if exact_kohya and layout not in (KOHYA_SD25, KOHYA_SDXL23):
        raise ValueError("exact_kohya applies to the kohya layouts only")
    out: dict[Any, Any] = {}
    for item in paths:
        comp, path = item if isinstance(item, tuple) else (component, item)
        if exact_kohya:
            if comp != "unet":
                idx = None
            else:
                sdxl = layout is KOHYA_SDXL23
                if sdxl:
                    name_path = path if is_ldm_path(path) else _try(diffusers_to_ldm, path, SDXL_LAYOUT)
                else:
                    name_path = _try(ldm_to_diffusers, path, SD_LAYOUT) if is_ldm_path(path) else path
                idx = kohya_block_index(adapter_name(UNET_PREFIX, name_path), sdxl) if name_path else -1
        else:
            idx = layout.index(path, comp)
        out[item] = outside if idx is None else values[idx]
    return out


def _try(fn, path, layout):
    try:
        return fn(path, layout)
    except ValueError:
        return path


# --------------------------------------------------------------------------------------------------
# kohya's functions, reproduced


_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def kohya_block_index(lora_name: str, is_sdxl: bool = False) -> int:
    """sd-scripts ``networks/lora.py`` ``get_block_index`` on a kohya adapter name: SD1/SD2 (diffusers
    names) 0-24, SDXL (SGM names) 0-22; -1 when the name lies in no block."""
    if not is_sdxl:
        m = _RE_UPDOWN.search(lora_name)
        if m:
            direction, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            idx = 3 * i + j if kind in ("resnets", "attentions") else 3 * i + 2
            return 1 + idx if direction == "down" else KOHYA_SD_NUM_BLOCKS + 1 + idx
        if "mid_block_" in lora_name:
            return KOHYA_SD_NUM_BLOCKS
        return -1
    if lora_name.startswith(UNET_PREFIX):
        name = lora_name[len(UNET_PREFIX):]
        if name.startswith("time_embed_") or name.startswith("label_emb_"):
            return 0
        if name.startswith("input_blocks_"):
            return 1 + int(name.split("_")[2])
        if name.startswith("middle_block_"):
            return 10 + int(name.split("_")[2])
        if name.startswith("output_blocks_"):
            return 13 + int(name.split("_")[2])
        if name.startswith("out_"):
            return 22
    return -1


_SHAPES = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def kohya_lr_shape(spec: str, n: int) -> list[float]:
    """kohya's named lr-weight shapes for ``n`` blocks, with an optional ``+base`` added to every value:
    ``cosine`` (1 -> 0), ``sine`` (0 -> 1), ``linear`` (0 -> 1), ``reverse_linear`` (1 -> 0), ``zeros``."""
    name, *rest = spec.strip().split("+")
    if len(rest) > 1:
        raise ValueError(f"bad lr weight shape {spec!r}")
    base = float(rest[0]) if rest else 0.0
    if n < 2 and name != "zeros":
        raise ValueError("shapes need at least 2 blocks")
    if name == "cosine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in reversed(range(n))]
    if name == "sine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in range(n)]
    if name == "linear":
        return [i / (n - 1) + base for i in range(n)]
    if name == "reverse_linear":
        return [i / (n - 1) + base for i in reversed(range(n))]
    if name == "zeros":
        return [0.0 + base] * n
    raise ValueError(f"unknown lr weight shape {name!r} (valid: {', '.join(_SHAPES)}, each with an optional +base)")


def _fit(values: list[float] | None, n: int) -> list[float] | None:
    if values is None:
        return None
    values = list(values)[:n]            # too long: extra values are ignored
    return values + [1.0] * (n - len(values))   # too short: filled with 1.0


def _warn_lengths(kind: str, given: dict[str, Sequence[float] | None], n: int) -> None:
    """sd-scripts' get_block_lr_weight warnings (its words) for lists of another length than the model's blocks."""
    lengths = {name: len(v) for name, v in given.items() if v is not None and len(v) != n}
    for too, what in (("long", "are ignored"), ("short", "are filled with 1")):
        names = [f"{name} has {size}" for name, size in lengths.items() if (size > n) == (too == "long")]
        if names:
            log.warning("%s is too %s. Parameters after %d-th %s. (%s values; this model's take %d)", kind, too, n,
                        what, ", ".join(names), n)


def kohya_block_lr_weight(is_sdxl: bool, down_lr_weight: str | Sequence[float] | None = None,
                          mid_lr_weight: Sequence[float] | None = None,
                          up_lr_weight: str | Sequence[float] | None = None,
                          zero_threshold: float = 0.0) -> list[float] | None:
    """sd-scripts ``get_block_lr_weight``: the 25 (SD1/SD2) or 23 (SDXL) per-block lr weights from
    ``down``/``up`` (lists or shape names, 12 or 9 values) and ``mid`` (1 or 3 values); ``None`` if all
    three are ``None``. Missing values are 1.0, weights not above ``zero_threshold`` become 0 (so
    negative weights are 0 even with the default threshold), SDXL gets 1.0 for EMB and FINAL."""
    if down_lr_weight is None and mid_lr_weight is None and up_lr_weight is None:
        return None
    n = KOHYA_SDXL_NUM_BLOCKS if is_sdxl else KOHYA_SD_NUM_BLOCKS
    n_mid = KOHYA_SDXL_NUM_MID if is_sdxl else KOHYA_SD_NUM_MID
    if isinstance(down_lr_weight, str):
        down_lr_weight = kohya_lr_shape(down_lr_weight, n)
    if isinstance(up_lr_weight, str):
        up_lr_weight = kohya_lr_shape(up_lr_weight, n)
    if isinstance(mid_lr_weight, (int, float)):
        mid_lr_weight = [float(mid_lr_weight)]
    _warn_lengths("down_weight or up_weight", {"down_lr_weight": down_lr_weight, "up_lr_weight": up_lr_weight}, n)
    _warn_lengths("mid_weight", {"mid_lr_weight": mid_lr_weight}, n_mid)
    down = _fit(down_lr_weight, n)
    mid = _fit(mid_lr_weight, n_mid)
    up = _fit(up_lr_weight, n)

    def clip(ws: list[float] | None, size: int) -> list[float]:
        if ws is None:
            return [1.0] * size
        return [float(w) if w > zero_threshold else 0 for w in ws]

    weights = clip(down, n) + clip(mid, n_mid) + clip(up, n)
    if is_sdxl:
        weights = [1.0] + weights + [1.0]
    return weights


def _floats_or_zero(text: str) -> list[float]:
    return [(float(s) if s.strip() else 0.0) for s in text.split(",")]


def parse_kohya_block_lr_kwargs(is_sdxl: bool, kwargs: Mapping[str, Any]) -> list[float] | None:
    """sd-scripts ``parse_block_lr_kwargs`` on ``--network_args`` strings: ``down_lr_weight``/
    ``up_lr_weight`` are comma lists (empty items are 0) or a shape name (``sine+.5``); ``mid_lr_weight``
    a comma list; ``block_lr_zero_threshold`` a float. Lists are accepted as they are. A single number
    without a comma is not a shape: kohya fails on it, here it is a ``ValueError`` naming the key."""
    def side(key: str) -> str | list[float] | None:
        v = kwargs.get(key)
        if v is None or not isinstance(v, str):
            return None if v is None else [float(x) for x in v]
        if "," in v:
            return _floats_or_zero(v)
        try:
            kohya_lr_shape(v, 3)
        except ValueError:
            raise ValueError(f"{key}={v!r}: give a comma-separated list of {9 if is_sdxl else 12} values or a "
                             f"shape ({', '.join(_SHAPES)}, each with an optional +base)") from None
        return v

    down = side("down_lr_weight")
    up = side("up_lr_weight")
    mid = kwargs.get("mid_lr_weight")
    if isinstance(mid, str):
        mid = _floats_or_zero(mid)
    elif mid is not None:
        mid = [float(x) for x in (mid if isinstance(mid, (list, tuple)) else [mid])]
    if down is None and mid is None and up is None:
        return None
    threshold = float(kwargs.get("block_lr_zero_threshold", 0.0) or 0.0)
    return kohya_block_lr_weight(is_sdxl, down, mid, up, threshold)


def _numbers(v, kind, key: str) -> list:
    try:
        return [kind(x) for x in (v.split(",") if isinstance(v, str) else v)]
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected comma-separated {'integers' if kind is int else 'numbers'}, "
                         f"got {v!r}") from None


def _ints(v: str | Sequence[int], n: int, key: str) -> list[int]:
    out = _numbers(v, int, key)
    if len(out) != n:
        raise ValueError(f"{key} must have {n} values, got {len(out)}")
    return out


def _floats(v: str | Sequence[float], n: int, key: str) -> list[float]:
    out = _numbers(v, float, key)
    if len(out) != n:
        raise ValueError(f"{key} must have {n} values, got {len(out)}")
    return out


def kohya_block_dims_alphas(
    is_sdxl: bool, network_dim: int, network_alpha: float,
    block_dims: str | Sequence[int] | None = None, block_alphas: str | Sequence[float] | None = None,
    conv_dim: int | None = None, conv_alpha: float | None = None,
    conv_block_dims: str | Sequence[int] | None = None, conv_block_alphas: str | Sequence[float] | None = None,
    block_lr_weight: Sequence[float] | None = None,
) -> tuple[list[int], list[float], list[int] | None, list[float] | None]:
    """sd-scripts ``get_block_dims_and_alphas`` followed by ``remove_block_dims_and_alphas``:
    ``(block_dims, block_alphas, conv_block_dims, conv_block_alphas)``, 25 (SD1/SD2) or 23 (SDXL) values
    each. Unset dims/alphas are ``network_dim``/``network_alpha``; conv ones come from
    ``conv_block_dims`` (alphas default to ``conv_alpha`` or 1.0), else ``conv_dim``/``conv_alpha``, else
    ``None``. A block whose lr weight is 0 gets dim 0 (no adapter), conv included."""
    n = 1 + 2 * KOHYA_SDXL_NUM_BLOCKS + KOHYA_SDXL_NUM_MID + 1 if is_sdxl else 2 * KOHYA_SD_NUM_BLOCKS + KOHYA_SD_NUM_MID
    dims = _ints(block_dims, n, "block_dims") if block_dims is not None else [int(network_dim)] * n
    alphas = _floats(block_alphas, n, "block_alphas") if block_alphas is not None else [float(network_alpha)] * n
    conv_dims: list[int] | None
    conv_alphas: list[float] | None
    if conv_block_dims is not None:
        conv_dims = _ints(conv_block_dims, n, "conv_block_dims")
        if conv_block_alphas is not None:
            conv_alphas = _floats(conv_block_alphas, n, "conv_block_alphas")
        else:
            conv_alphas = [float(1.0 if conv_alpha is None else conv_alpha)] * n
    elif conv_dim is not None:
        conv_dims = [int(conv_dim)] * n
        conv_alphas = [float(1.0 if conv_alpha is None else conv_alpha)] * n
    else:
        conv_dims = conv_alphas = None
    if block_lr_weight is not None:
        if len(block_lr_weight) != n:
            raise ValueError(f"block lr weight must have {n} values, got {len(block_lr_weight)}")
        for i, lr in enumerate(block_lr_weight):
            if lr == 0:
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
    return dims, alphas, conv_dims, conv_alphas
