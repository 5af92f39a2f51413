"""What the trackers (TensorBoard, wandb) are started with, as sd-scripts' train_util.init_trackers does:
``wandb_run_name`` names the wandb run; ``log_tracker_config`` is a TOML file of one table per tracker whose keys are
passed to it (``[wandb]`` to wandb.init, ``[tensorboard]`` to SummaryWriter); with ``log_config`` the configuration
goes to the trackers too, without secrets and paths (get_sanitized_config_or_none).

sd-scripts replaces the run name by the file's tables when both are given; here the file's keys win but the name
is kept when the file does not set one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..algos.options import OptionError
from .options import OPTIONS, SECRET_OPTIONS

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

__all__ = ["tracker_init_kwargs", "loggable_config"]

TRACKERS = ("tensorboard", "wandb")
# sd-scripts' sensitive_args and sensitive_path_args, and every other path option: paths can hold user names
_HIDDEN = {*SECRET_OPTIONS, "tokenizer_cache_dir", "conditioning_data_dir"} | {
    o.name for o in OPTIONS if o.kind in ("path", "paths")}


def tracker_init_kwargs(config) -> dict[str, dict[str, Any]]:
    """{tracker: keyword arguments} from wandb_run_name and log_tracker_config."""
    kwargs: dict[str, dict[str, Any]] = {}
    if config.wandb_run_name:
        kwargs["wandb"] = {"name": config.wandb_run_name}
    if config.log_tracker_config:
        path = Path(config.log_tracker_config)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise OptionError(f"log_tracker_config={path}: cannot read it ({err.strerror})") from None
        except tomllib.TOMLDecodeError as err:
            raise OptionError(f"log_tracker_config={path}: not valid TOML ({err})") from None
        for tracker, table in data.items():
            if tracker not in TRACKERS or not isinstance(table, dict):
                raise OptionError(f"log_tracker_config={path}: expected tables [{'], ['.join(TRACKERS)}] of the "
                                  f"trackers' arguments, got {tracker!r} = {table!r}")
            kwargs.setdefault(tracker, {}).update(table)
    return kwargs


def loggable_config(config) -> dict[str, Any] | None:
    """The options for the trackers' run configuration (None without log_config): scalars as they are, lists and
    tables as text (trackers take no lists), secrets and paths left out."""
    if not config.log_config:
        return None
    out: dict[str, Any] = {}
    for name, value in config.as_dict().items():
        if name in _HIDDEN:
            continue
        if isinstance(value, tuple):
            value = list(value)
        out[name] = value if value is None or isinstance(value, (bool, str, int, float)) else f"{value}"
    return out
