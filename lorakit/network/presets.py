"""Presets: which layers of a model get adapters, with LyCORIS' preset keys, read from TOML and validated."""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..algos import algorithm
from ..algos.base import COMMON_OPTIONS
from ..algos.options import OptionError, option_name, parse_options, suggest

log = logging.getLogger(__name__)
BUILTIN_DIR = Path(__file__).with_name("presets")
_ALGO_MAPS = ("module_algo_map", "name_algo_map")


@dataclass(frozen=True)
class Preset:
    name: str = "custom"
    enable_conv: bool = True
    unet_target_module: tuple[str, ...] = ()
    unet_target_name: tuple[str, ...] = ()
    text_encoder_target_module: tuple[str, ...] = ()
    text_encoder_target_name: tuple[str, ...] = ()
    target_module: tuple[str, ...] | None = ()  # any other model; None: every layer kind (LyCORIS' default)
    target_name: tuple[str, ...] = ()
    module_algo_map: dict = field(default_factory=dict)  # class name -> {"algo": ..., option: value}
    name_algo_map: dict = field(default_factory=dict)  # module path or pattern -> {...}
    use_fnmatch: bool = False
    exclude_name: tuple[str, ...] = ()
    lora_prefix: str | None = None
    source: str = field(default="preset", compare=False)  # where it was read from, for messages

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
        """The name_algo_map entry for a module path: the path itself as a key first, else the first entry (in
        the table's order) that matches, as LyCORIS' find_conf_for_name reads it."""
        if path in self.name_algo_map:
            return self.name_algo_map[path]
        for pattern, override in self.name_algo_map.items():
            if self.matches(pattern, path):
                return override
        return None

    def for_algo(self, algo: str) -> Preset:
        """The preset less the algo-map options that an entry's algorithm (its own `algo`, else the network's
        `algo`) does not take, each named in a warning. LyCORIS' modules ignore such options (its own example
        preset gives `factor` to a `lora` entry), so a LyCORIS preset builds here too."""
        maps = {key: {entry: _drop_unused_options(f"{self.source}: {key}.{entry}", override, algo)
                      for entry, override in getattr(self, key).items()} for key in _ALGO_MAPS}
        return replace(self, **maps)


_LISTS = {f.name for f in fields(Preset) if f.type.startswith("tuple[str, ...]")}
_KEYS = {f.name for f in fields(Preset)} - {"name", "source"}
_SD_LISTS = ("unet_target_module", "unet_target_name", "text_encoder_target_module", "text_encoder_target_name")


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
            algorithm(str(override["algo"]))
        except OptionError as err:
            raise OptionError(f"{where}: {err}") from None
    return override


def _drop_unused_options(where: str, override: dict, default_algo: str) -> dict:
    """The entry less the adapter options its algorithm does not take, with a warning naming them."""
    cls = algorithm(str(override.get("algo", default_algo)))
    taken = COMMON_OPTIONS | cls.accepts | {"dim", "alpha"}  # dim/alpha: ignored by algorithms without a rank
    unused = [k for k in override if k not in ("algo", "conv_dim", "conv_alpha") and option_name(k) not in taken]
    if not unused:
        return override
    log.warning("lorakit: %s: algo '%s' does not take %s; ignored, as LyCORIS does (it takes: %s)", where, cls.name,
                ", ".join(f"{k} = {override[k]!r}" for k in unused), ", ".join(sorted(COMMON_OPTIONS | cls.accepts)))
    return {k: v for k, v in override.items() if k not in unused}


class MissingPresetFile(OptionError, FileNotFoundError):
    """A preset .toml that is not there: an option error (one line under `lorakit train`), and a missing file."""


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
    if not (values.get("target_module") or values.get("target_name") or values.get("module_algo_map")):
        values["target_module"] = None  # a dict that names no generic target: every layer of a generic model
    return Preset(name=name, source=source, **values)


def preset_from_file_data(data: dict, name: str = "custom", source: str = "preset") -> Preset:
    """A preset file's keys as LyCORIS' apply_preset reads them: it sets only the keys the file has, and the others
    keep its class defaults. On Stable Diffusion those are the `full` preset's lists (LycorisNetworkKohya's, less
    its TimestepEmbedding class, which duplicates time_embedding.linear_1/2); on other models every layer kind
    (LycorisNetwork's Linear, Conv1d/2d/3d, GroupNorm, LayerNorm)."""
    defaults = {key: value for key, value in _full_preset_lists().items() if key not in data}
    preset = preset_from_dict({**defaults, **data}, name=name, source=source)
    # a file's key as given ([] selects nothing by it), LyCORIS' default (every layer kind) when left out
    return replace(preset, target_module=(preset.target_module or ()) if "target_module" in data else None)


@functools.lru_cache(maxsize=1)
def _full_preset_lists() -> dict:
    data = tomllib.loads((BUILTIN_DIR / "full.toml").read_text())
    return {key: data[key] for key in _SD_LISTS}


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
        return preset_from_file_data(tomllib.loads(builtin.read_text()), name=text, source=f"preset '{text}'")
    path = Path(text)
    if path.suffix.lower() != ".toml" and not path.is_file():
        raise OptionError(f"unknown preset '{text}'{suggest(text, builtin_presets())}: use one of "
                          f"{', '.join(builtin_presets())} or a .toml file")
    if not path.is_file():
        what = "is a folder, expected a preset .toml file" if path.is_dir() else "does not exist"
        raise MissingPresetFile(f"preset file {path} {what}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise OptionError(f"preset file {path}: not valid TOML ({err})") from None
    return preset_from_file_data(data, name=path.stem, source=f"preset file {path}")
