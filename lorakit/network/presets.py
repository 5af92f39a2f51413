"""Presets: which layers of a model get adapters, with LyCORIS' preset keys, read from TOML and validated."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..algos import algorithm
from ..algos.base import COMMON_OPTIONS
from ..algos.options import OptionError, parse_options, suggest

BUILTIN_DIR = Path(__file__).with_name("presets")


@dataclass(frozen=True)
class Preset:
    name: str = "custom"
    enable_conv: bool = True
    unet_target_module: tuple[str, ...] = ()
    unet_target_name: tuple[str, ...] = ()
    text_encoder_target_module: tuple[str, ...] = ()
    text_encoder_target_name: tuple[str, ...] = ()
    target_module: tuple[str, ...] = ()  # any other model
    target_name: tuple[str, ...] = ()
    module_algo_map: dict = field(default_factory=dict)  # class name -> {"algo": ..., option: value}
    name_algo_map: dict = field(default_factory=dict)  # module path or pattern -> {...}
    use_fnmatch: bool = False
    exclude_name: tuple[str, ...] = ()
    lora_prefix: str | None = None

    def matches(self, pattern: str, path: str) -> bool:
        """A module path matches a name when equal, when it ends with '.' + name, or by the pattern (fnmatch
        with use_fnmatch, else a regular expression matched at the start, as LyCORIS does)."""
        if path == pattern or path.endswith("." + pattern):
            return True
        if self.use_fnmatch:
            return fnmatch.fnmatchcase(path, pattern)
        try:
            return re.match(pattern, path) is not None
        except re.error:
            return False

    def excluded(self, path: str) -> bool:
        return any(self.matches(p, path) for p in self.exclude_name)

    def override_for_name(self, path: str) -> dict | None:
        for pattern, override in self.name_algo_map.items():
            if self.matches(pattern, path):
                return override
        return None


_LISTS = {f.name for f in fields(Preset) if f.type == "tuple[str, ...]"}
_KEYS = {f.name for f in fields(Preset)} - {"name"}


def _check_override(where: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise OptionError(f"{where}: expected a table such as {{ algo = \"lokr\", dim = 8 }}, got {value!r}")
    override = dict(value)
    options = {k: v for k, v in override.items() if k not in ("algo", "conv_dim", "conv_alpha")}
    try:
        given = parse_options(options)[1]
    except OptionError as err:
        raise OptionError(f"{where}: {err}") from None
    if "multiplier" in given:
        raise OptionError(f"{where}: option 'multiplier' cannot be set per layer in a preset; the network's "
                          "multiplier (or its per-block multipliers) applies to every adapter")
    for key in ("conv_dim", "conv_alpha"):  # checked as dim/alpha are, and named as given
        if key in override:
            try:
                parse_options({key[5:]: override[key]})
            except OptionError as err:
                raise OptionError(f"{where}: {str(err).replace(repr(key[5:]), repr(key), 1)}") from None
    if "algo" in override:
        try:
            cls = algorithm(str(override["algo"]))
        except OptionError as err:
            raise OptionError(f"{where}: {err}") from None
        refused = sorted(given - COMMON_OPTIONS - cls.accepts)
        if refused:
            raise OptionError(f"{where}: algo '{cls.name}' does not accept option '{refused[0]}'; it accepts: "
                              f"{', '.join(sorted(COMMON_OPTIONS | cls.accepts))}")
    return override


def preset_from_dict(data: dict, name: str = "custom", source: str = "preset") -> Preset:
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _KEYS:
            raise OptionError(f"{source}: unknown preset key '{key}'{suggest(key, _KEYS)}")
        if key in _LISTS:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise OptionError(f"{source}: preset key '{key}' must be a list of strings, got {value!r}")
            value = tuple(value)
        elif key in ("enable_conv", "use_fnmatch"):
            if not isinstance(value, bool):
                raise OptionError(f"{source}: preset key '{key}' must be true or false, got {value!r}")
        elif key == "lora_prefix":
            if not isinstance(value, str) or not value:
                raise OptionError(f"{source}: preset key 'lora_prefix' must be a non-empty string, got {value!r}")
        else:  # the two maps
            if not isinstance(value, dict):
                raise OptionError(f"{source}: preset key '{key}' must be a table, got {value!r}")
            value = {k: _check_override(f"{source}: {key}.{k}", v) for k, v in value.items()}
        values[key] = value
    return Preset(name=name, **values)


def builtin_presets() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load_preset(preset: str | Path | dict | Preset) -> Preset:
    """A built-in preset by name, a preset TOML file, a dict of preset keys, or a Preset."""
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, dict):
        return preset_from_dict(preset)
    text = str(preset)
    builtin = BUILTIN_DIR / f"{text}.toml"
    if builtin.is_file():
        return preset_from_dict(tomllib.loads(builtin.read_text()), name=text, source=f"preset '{text}'")
    path = Path(text)
    if path.suffix.lower() != ".toml" and not path.is_file():
        raise OptionError(f"unknown preset '{text}'{suggest(text, builtin_presets())}: use one of "
                          f"{', '.join(builtin_presets())} or a .toml file")
    if not path.is_file():
        raise FileNotFoundError(f"preset file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise OptionError(f"preset file {path}: not valid TOML ({err})") from None
    return preset_from_dict(data, name=path.stem, source=f"preset file {path}")
