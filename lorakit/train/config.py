"""The trainer's configuration: an sd-scripts `--config_file` TOML plus command-line overrides -> a typed, checked
`TrainConfig`; and back to TOML (`to_toml`), the file saved with the output, which loads back to the same config.

sd-scripts reads its config file by merging every section's keys into one namespace (train_util.read_config_from_file)
and then lets the command line override them; section names mean nothing. lorakit reads it the same way, but every
key is an option of the table in options.py (unknown names are errors suggesting the closest one), every value is
typed, and impossible combinations are refused (checks.py) before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..algos.options import OptionError
from . import checks
from .dataset_config import DatasetGroupConfig, load_dataset_config  # noqa: F401 (TrainConfig's annotation)
from .options import (BY_NAME, COMMAND_LINE_ONLY, GROUPS, GUI_KEYS, OPTIONS, SAME_NETWORK, SECRET_OPTIONS, TYPES,
                      canonical_name, coerce)

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

log = logging.getLogger(__name__)
LIST_KINDS = ("strings", "paths", "floats", "lrs", "module")  # several values after one --option
_BOOL_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off", "y", "n", "t", "f"}


class _Methods:
    """What a TrainConfig can do besides holding the options (its fields are generated from the option table)."""

    def network_kwargs(self) -> dict[str, str]:
        """network_args as a dict, with the algorithm that network_module implies."""
        from .network_args import LORAPLUS_OPTIONS, network_kwargs

        return network_kwargs(self.network_module, self.network_args,
                              {name: getattr(self, name) for name in LORAPLUS_OPTIONS})

    def as_dict(self) -> dict[str, Any]:
        return {o.name: getattr(self, o.name) for o in OPTIONS}

    def to_toml(self) -> str:
        return to_toml(self)


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [(o.name, TYPES[o.kind] + (" | None" if o.default is None else ""), dataclasses.field(default=o.default))
     for o in OPTIONS]
    + [("given", "frozenset", dataclasses.field(default=frozenset(), compare=False, repr=False)),
       ("warnings", "tuple", dataclasses.field(default=(), compare=False, repr=False)),
       ("dataset_group", "DatasetGroupConfig | None", dataclasses.field(default=None, compare=False, repr=False))],
    bases=(_Methods,), frozen=True)
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = ("Every `lorakit train` option (see options.py and docs/training.md), typed. `given`: the "
                       "names set by the file or the command line; `warnings`: what was allowed but looks unintended; "
                       "`dataset_group`: the parsed dataset_config, if any.")


# ----- reading -------------------------------------------------------------------------------------------------------

def _add(values: dict[str, Any], sources: dict[str, str], key: str, value: Any, where: str) -> None:
    if key in GUI_KEYS:
        log.info("%s: '%s' ignored (%s)", where, key, GUI_KEYS[key])
        return
    if key in COMMAND_LINE_ONLY:
        raise OptionError(f"{where}: '{key}' inside a config file: lorakit reads one config file, named on the "
                          "command line")
    name = canonical_name(key)
    if name in values and values[name] != value:
        raise OptionError(f"option '{name}' given twice with different values: {values[name]!r} ({sources[name]}) "
                          f"and {value!r} ({where})")
    values[name], sources[name] = value, where


def read_config_file(path: str | Path, command_line: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An sd-scripts config TOML as {option: raw value}: top-level keys and the keys of every section, merged
    (section names are free, as in sd-scripts). A name without .toml that does not exist gets .toml, as there.
    A kohya_ss GUI LoRA config (.json) is translated as kohya_ss runs it (kohya_ss_json.py); `command_line` (the
    run's options) feeds its step count."""
    path = Path(path)
    if not path.exists() and path.suffix != ".toml":
        path = path.with_name(path.name + ".toml")
    if path.is_dir():
        raise OptionError(f"config file {path}: is a folder, expected a .toml file")
    if not path.is_file():
        raise OptionError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        return _read_json_config(path, text, command_line)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise OptionError(f"config file {path}: not valid TOML ({err})") from None
    if isinstance(data.get("datasets"), list):
        raise OptionError(f"config file {path}: its [[datasets]] make it a dataset config; give it as "
                          f"dataset_config (--dataset_config {path}) and the training options in --config")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(value, dict):
            _add(values, sources, key, value, f"{path}")
            continue
        for inner, item in value.items():
            if isinstance(item, dict):
                raise OptionError(f"config file {path}: [{key}.{inner}] is a table inside a section; sd-scripts "
                                  "merges one level of sections only")
            _add(values, sources, inner, item, f"{path} [{key}]")
    return values


def _read_json_config(path: Path, text: str, command_line: Mapping[str, Any] | None) -> dict[str, Any]:
    """A .json config: kohya_ss' GUI LoRA config (the "LoRA" tab's saved file or preset); any other JSON is refused,
    as sd-scripts reads TOML only."""
    from . import kohya_ss_json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise OptionError(f"config file {path}: not valid JSON ({err}); lorakit reads sd-scripts' TOML configs and "
                          "the kohya_ss GUI's LoRA .json") from None
    if not kohya_ss_json.is_gui_config(data):
        raise OptionError(f"config file {path}: a JSON file that is not a kohya_ss GUI LoRA config (it has none of "
                          "its fields LoRA_type, max_resolution, epoch, optimizer, lr_warmup); lorakit reads "
                          "sd-scripts' TOML configs and the .json of the kohya_ss GUI's LoRA tab")
    values = kohya_ss_json.translate(path, data, command_line)
    return {canonical_name(key): value for key, value in values.items()}


def parse_command_line(args: Sequence[str]) -> dict[str, Any]:
    """["--network_dim", "8", "--flip_aug", "--network_args", "algo=loha", "conv_dim=4"] -> {option: raw value}.
    A flag alone means true (or takes a following true/false); list options take every value up to the next --."""
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = str(args[i])
        if not token.startswith("--") or token == "--":
            raise OptionError(f"expected an option (--name), got {token!r}")
        key, eq, inline = token[2:].partition("=")
        i += 1
        if key in COMMAND_LINE_ONLY:
            name, kind = key, "str"
        else:
            name = canonical_name(key)
            kind = BY_NAME[name].kind
        if eq:
            value: Any = inline
        elif kind == "bool":
            value = True
            if i < len(args) and str(args[i]).strip().lower() in _BOOL_WORDS:
                value, i = args[i], i + 1
        elif kind in LIST_KINDS:
            start = i
            while i < len(args) and not str(args[i]).startswith("--"):
                i += 1
            value = list(args[start:i])
        else:
            if i >= len(args) or str(args[i]).startswith("--"):
                raise OptionError(f"option '{name}' needs a value")
            value, i = args[i], i + 1
        if name in values:
            raise OptionError(f"option '{name}' given twice on the command line")
        values[name] = value
    return values


def load_train_config(config_file: str | Path | None = None,
                      overrides: Mapping[str, Any] | Sequence[str] | None = None,
                      dataset_config: str | Path | None = None) -> TrainConfig:
    """The typed, checked training configuration: the config file's options, then `overrides` (command-line strings
    or a dict) on top, then `dataset_config` if given. Raises OptionError naming the option on any problem."""
    if overrides is None:
        overrides = {}
    elif not isinstance(overrides, Mapping):
        overrides = parse_command_line(overrides)
    overrides = dict(overrides)
    named_file = overrides.pop("config_file", None)
    if named_file is not None and config_file is not None and str(named_file) != str(config_file):
        raise OptionError(f"two config files given: {config_file} and {named_file}")
    config_file = config_file if config_file is not None else named_file
    raw = read_config_file(config_file, overrides) if config_file is not None else {}
    for key, value in overrides.items():  # the command line beats the file
        raw.pop(canonical_name(key), None)
        raw[canonical_name(key)] = value
    if dataset_config is not None:
        raw["dataset_config"] = str(dataset_config)
    values = {o.name: o.default for o in OPTIONS}
    for name, value in raw.items():
        values[name] = coerce(BY_NAME[name], value)
    given = frozenset(raw)
    values, warnings = checks.resolve(values, given)
    group = None
    if values["dataset_config"] is not None:
        group = load_dataset_config(values["dataset_config"], train=values)
        checks.check_datasets(values, group)
    for note in warnings:
        log.warning("lorakit train: %s", note)
    return TrainConfig(**values, given=given, warnings=warnings, dataset_group=group)


# ----- writing -------------------------------------------------------------------------------------------------------

def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(kind: str, value: Any) -> str:
    if kind in ("size", "pair"):  # sd-scripts reads --resolution and --face_crop_aug_range as "a,b" strings
        return _toml_string(",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value("", v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")  # a kind added without a writer


_SD_SCRIPTS_MODULE = {network: module for module, network in SAME_NETWORK.items()}  # "lorakit" -> "lorakit.kohya"


def _for_sd_scripts(name: str, value: Any) -> Any:
    """An option's value as the saved file writes it, so that sd-scripts' train_network.py reads what lorakit ran
    (lorakit reads each form back to the same value); None: left out. sd-scripts takes a key that is present as
    given (`network_weights = []` is "not None": it would load weights from []), so unset lists are left out;
    lorakit's own network is named by the module sd-scripts can import (lorakit.kohya, with sd-scripts'
    create_network); one network_weights file is a string, as sd-scripts' --network_weights takes one path."""
    if value == ():
        return None
    if name == "network_module":
        return _SD_SCRIPTS_MODULE.get(value, value)
    if name == "network_weights" and len(value) == 1:
        return value[0]
    return value


def to_toml(config: TrainConfig, leave_out: tuple[str, ...] = ()) -> str:
    """The resolved configuration as a TOML file that sd-scripts and lorakit both read: one section per group,
    every implemented option that has a value (unset options, and the not-yet-supported ones, which are always at
    their defaults, are left out; so is output_config, which would make the file write itself again), less the
    options named in `leave_out`."""
    lines = ["# lorakit train: the resolved configuration (lorakit loads it back unchanged; sd-scripts reads it as "
             "--config_file, its network_module lorakit.kohya needing lorakit installed there)"]
    skip = {"output_config", *leave_out}
    for group in GROUPS:
        written = ((o, _for_sd_scripts(o.name, getattr(config, o.name))) for o in OPTIONS
                   if o.group == group and o.supported and o.name not in skip)
        rows = [f"{o.name} = {_toml_value(o.kind, value)}" for o, value in written if value is not None]
        if rows:
            lines += ["", f"[{group}]", *rows]
    return "\n".join(lines) + "\n"


def output_config_file(config: TrainConfig, config_file: str | Path) -> Path:
    """sd-scripts' --output_config: the options written to `config_file` (".toml" added when missing), which must
    not exist yet; the wandb API key is left out, as there, and so is the Hugging Face token."""
    path = Path(config_file)
    if path.suffix != ".toml":
        path = path.with_name(path.name + ".toml")
    if path.exists():
        raise OptionError(f"output_config: the config file {path} already exists; name a new file (it is not "
                          "overwritten)")
    path.write_text(to_toml(config, leave_out=SECRET_OPTIONS), encoding="utf-8")
    return path


def print_config(config: TrainConfig, file=None) -> None:
    """The resolved configuration, as the saved {output_name}_config.toml has it: secrets (API keys, tokens) left
    out, since printed configs end up in logs and bug reports."""
    from .options import SECRET_OPTIONS

    print(to_toml(config, leave_out=SECRET_OPTIONS), end="", file=file if file is not None else sys.stdout)


__all__ = ["TrainConfig", "load_train_config", "read_config_file", "parse_command_line", "to_toml", "print_config",
           "output_config_file", "OptionError"]
