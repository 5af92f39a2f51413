"""Adapter options: parsed once, typed and validated, with kohya/LyCORIS names.

Values may come from Python (`dim=8`) or from kohya's `network_args` strings (`"dim=8"`), so every field
accepts its string spelling too: `"False"`, `"0"`, `"no"` and `"off"` all mean false.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from typing import Any, Mapping

_TRUE = {"true", "1", "yes", "on", "y", "t"}
_FALSE = {"false", "0", "no", "off", "n", "f"}
_AUTO = {"none", "auto", "null", ""}

# Older or alternative spellings that users and other tools write.
ALIASES = {
    "use_cp": "use_tucker",  # LyCORIS' old name
    "constrain": "constraint",  # the spelling in the LyCORIS docs
    "lora_dim": "dim",
    "network_dim": "dim",
    "network_alpha": "alpha",
    "weight_decompose": "dora_wd",
    "unit": "block_size",  # sd-scripts' networks/dylora.py (kohya_ss writes it for "Kohya DyLoRA")
}


class OptionError(ValueError):
    """A bad adapter option: the message names the option, the value and what was expected."""


@dataclass(frozen=True)
class AdapterOptions:
    dim: int = 4
    alpha: float = 1.0  # scale = alpha / dim; 0 means alpha = dim (scale 1)
    dropout: float = 0.0
    rank_dropout: float = 0.0
    rank_dropout_scale: bool = False
    module_dropout: float = 0.0
    use_tucker: bool = False
    use_scalar: bool = False
    dora_wd: bool = False
    dora_axis: str = "in"  # the column norm that ComfyUI and A1111 both apply
    bypass_mode: bool | None = None  # None: pick the cheaper path per call
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    unbalanced_factorization: bool = False
    block_size: int = 1
    dylora_all_ranks: bool = False  # sd-scripts' DyLoRA step: every rank, alpha/dim x sqrt(dim/rank)
    rescaled: bool = False
    constraint: float = 0.0
    rs_lora: bool = False
    train_on_input: bool = False
    multiplier: float = 1.0

    @property
    def scale_alpha(self) -> float:
        return float(self.dim) if self.alpha == 0 else float(self.alpha)


DEFAULTS = AdapterOptions()
FIELD_TYPES = {f.name: f.type for f in fields(AdapterOptions)}
OPTION_NAMES = frozenset(FIELD_TYPES)


def to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise OptionError(f"option '{name}': expected a boolean (true/false, 1/0, yes/no), got {value!r}")


def to_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise OptionError(f"option '{name}': expected an integer, got {value!r}")
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise OptionError(f"option '{name}': expected an integer, got {value!r}") from None
    if number != int(number):
        raise OptionError(f"option '{name}': expected an integer, got {value!r}")
    return int(number)


def to_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise OptionError(f"option '{name}': expected a number, got {value!r}")
    try:
        return float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise OptionError(f"option '{name}': expected a number, got {value!r}") from None


def _coerce(name: str, value: Any) -> Any:
    kind = FIELD_TYPES[name]
    if kind == "bool":
        return to_bool(name, value)
    if kind == "int":
        return to_int(name, value)
    if kind == "float":
        return to_float(name, value)
    if kind == "bool | None":
        if value is None or (isinstance(value, str) and value.strip().lower() in _AUTO):
            return None
        return to_bool(name, value)
    if name == "dora_axis":
        if isinstance(value, str) and value.strip().lower() in ("in", "out"):
            return value.strip().lower()
        raise OptionError(f"option 'dora_axis': expected 'in' or 'out', got {value!r}")
    raise AssertionError(f"no coercion for {name}: {kind}")  # a field added without a type rule


def _check_ranges(o: AdapterOptions) -> None:
    def fail(name, expected):
        raise OptionError(f"option '{name}': expected {expected}, got {getattr(o, name)!r}")

    if o.dim < 1:
        fail("dim", "an integer >= 1")
    if o.alpha < 0:
        fail("alpha", "a number >= 0 (0 means alpha = dim)")
    for name in ("dropout", "rank_dropout", "module_dropout"):
        if not 0.0 <= getattr(o, name) < 1.0:
            fail(name, "a probability in [0, 1)")
    if o.factor == 0 or o.factor < -1:
        fail("factor", "-1 (smallest factorisation) or an integer >= 1")
    if o.block_size < 1:
        fail("block_size", "an integer >= 1")
    if o.constraint < 0:
        fail("constraint", "a number >= 0 (0 means unconstrained)")


# options that only change what another option does: (option, the other one, whether that one leaves it idle)
_DEPENDENT = (
    ("dora_axis", "without dora_wd", lambda o: not o.dora_wd),
    ("rank_dropout_scale", "without rank_dropout", lambda o: not o.rank_dropout),
    ("decompose_both", "with full_matrix (both factors are then full matrices)", lambda o: o.full_matrix),
)


def idle_options(options: AdapterOptions, given) -> list[str]:
    """What the caller set that changes nothing here: an option that modifies another one that is off, as text
    naming both (at their defaults they are quiet: kohya_ss writes some of them for every LyCORIS type)."""
    return [f"option '{name}' ({getattr(options, name)!r}) changes nothing {why}" for name, why, idle in _DEPENDENT
            if name in given and getattr(options, name) != getattr(DEFAULTS, name) and idle(options)]


def suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def suggest_spelling(name: str, by_lower: Mapping[str, Any]) -> str:
    """suggest() over names matched without case ({lower case: as written}), naming the closest as it is written
    ('AdamW', not 'adamw')."""
    close = difflib.get_close_matches(name.lower(), sorted(by_lower), n=1)
    return f" (did you mean '{by_lower[close[0]]}'?)" if close else ""


def option_name(key):
    """The lorakit name of an option as written: case and spaces ignored, kohya/LyCORIS aliases resolved."""
    name = key.strip().lower() if isinstance(key, str) else key
    return "dora_axis" if name == "wd_on_out" else ALIASES.get(name, name)


def parse_options(raw: Mapping[str, Any] | None = None, **kwargs: Any) -> tuple[AdapterOptions, frozenset]:
    """Returns the typed options and the set of option names the caller gave explicitly."""
    given: dict[str, Any] = {}
    for key, value in {**(raw or {}), **kwargs}.items():
        name = option_name(key)
        if isinstance(key, str) and key.strip().lower() == "wd_on_out":  # LyCORIS' boolean spelling of the axis
            value = "out" if to_bool("wd_on_out", value) else "in"
        if name not in OPTION_NAMES:
            raise OptionError(f"unknown adapter option '{key}'{suggest(str(name), OPTION_NAMES)}")
        typed = _coerce(name, value)
        if name in given and given[name] != typed:
            if not isinstance(typed, bool):
                raise OptionError(f"option '{name}' given twice (also as an alias) with different values: "
                                  f"{given[name]!r} and {typed!r}")
            typed = typed or given[name]  # LyCORIS ORs the spellings (use_tucker, use_cp: kohya_ss writes both)
        given[name] = typed
    options = dataclasses.replace(DEFAULTS, **given)
    _check_ranges(options)
    return options, frozenset(given)
