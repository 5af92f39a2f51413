"""Training state for ``save_state`` / ``resume``: the adapters, the optimizer, the lr scheduler and where
the run stands (epoch, step). Randomness needs no saving: every step draws from generators seeded by
(seed, step) and the data order is a function of (seed, epoch), so a resumed run repeats exactly what the
uninterrupted run would have done.

A state is a folder written under a temporary name and renamed into place (a kill leaves the previous state; one
between the rename that moves the previous state aside and the one that puts the new in place leaves both as
temporaries, and the next run's start puts the newest complete one back: restore_states).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from ..formats.atomic import restore_stale_folder, restore_stale_folders, stale_copies, staging_folder
from ..formats.safetensors_io import load_file, save_file
from .optimizers import load_optimizer_state
from .schedulers import load_scheduler_state

__all__ = ["Progress", "save_state", "load_state", "StateError", "check_state_folder", "is_complete_state",
           "restore_states", "no_state_yet"]

_FORMAT = 1
_FILES = ("network.safetensors", "optimizer.pt", "train_state.json")  # save_state writes train_state.json last
log = logging.getLogger(__name__)


class StateError(ValueError):
    """A state folder that cannot be resumed from; the message names it and what is wrong."""


@dataclass
class Progress:
    epoch: int = 1          # the epoch being trained (1-based, as sd-scripts counts)
    step_in_epoch: int = 0  # batches of that epoch already consumed
    global_step: int = 0    # optimizer steps done
    config_digest: str = ""
    seed: int | None = None  # the run's seed (drawn at random when the config gave none)
    settings: dict | None = None  # the options a resume must keep, as text (config_digest is their hash)
    max_steps: int | None = None  # the run's length (a resume may make it longer)


def save_state(folder: str | Path, tensors: dict, optimizer, scheduler, progress: Progress, *,
               deepspeed: tuple[int, Callable[[Path], None]] | None = None, scaler=None) -> None:
    """The adapters' ``tensors``, the optimizer and scheduler states and the progress. ``deepspeed``: (ZeRO stage,
    write) for a DeepSpeed run, whose ``write(folder)`` puts the engine's checkpoint in deepspeed/ in place of the
    optimizer state (``optimizer`` is then None)."""
    with staging_folder(folder) as tmp:
        states, info = {"scheduler": scheduler.state_dict()}, {"format": _FORMAT}
        if deepspeed is not None:
            info["deepspeed"], write = deepspeed
            write(tmp / "deepspeed")
        else:
            states["optimizer"] = optimizer.state_dict()
        if scaler is not None and scaler.is_enabled():  # fp16's loss scale: a resume goes on with the same
            states["scaler"] = scaler.state_dict()
        save_file(tensors, tmp / "network.safetensors")
        torch.save(states, tmp / "optimizer.pt")
        (tmp / "train_state.json").write_text(json.dumps({**info, **asdict(progress)}, indent=2))


def _changed(saved: dict | None, now: dict | None) -> str:
    """'name: saved -> now' for the settings both runs record that differ. A setting only one side records (an
    option another lorakit version added, or lets a resume change) is not compared; values are compared as
    `_compared` reads them."""
    if not saved or not now:
        return ""
    names = sorted(k for k in set(saved) & set(now) if _compared(k, saved[k]) != _compared(k, now[k]))
    shown = [f"{k}: {saved[k]} -> {now[k]}" for k in names[:5]]
    return "; ".join(shown) + (f"; and {len(names) - 5} more" if len(names) > 5 else "")


def _compared(name: str, value: str):
    """A recorded value (a repr) as a resume compares it: a path option as the places it names (a trailing
    slash, "./" or a relative spelling of the same folder is no change), and the network_module an older
    lorakit recorded (lorakit.kohya) as the name it now reads as (lorakit); any other value as written."""
    from .options import BY_NAME, SAME_NETWORK

    option = BY_NAME.get(name)
    if name != "network_module" and (option is None or option.kind not in ("path", "paths")):
        return value
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
    if name == "network_module":
        return SAME_NETWORK.get(parsed, parsed) if isinstance(parsed, str) else parsed
    values = parsed if isinstance(parsed, (tuple, list)) else (parsed,)
    # a name such as demo:tiny-sd is not a path
    return [os.path.abspath(os.path.expanduser(v)) if isinstance(v, str) and ":" not in v else v for v in values]


# the scheduler state's per-group lists (torch's LRScheduler, LambdaLR, CyclicLR with its momenta, ReduceLROnPlateau)
_PER_GROUP_SCHEDULER_KEYS = ("base_lrs", "_last_lr", "lr_lambdas", "max_lrs", "min_lrs", "base_momentums",
                             "max_momentums")


def _match_group_order(folder: Path, saved: dict, optimizer) -> None:
    """Bring the saved optimizer and scheduler groups into this run's group order, by group name: torch maps a
    state onto the groups by position, and an earlier lorakit put the U-Net's groups before the text encoders'
    (the state's lrs and moments would land on the wrong adapters). Groups that differ, not only in order, are
    refused."""
    groups = saved["optimizer"]["param_groups"]
    saved_names = [g.get("name") for g in groups]
    names = [g.get("name") for g in optimizer.param_groups]
    if saved_names == names:
        return
    if None in names or len(set(names)) != len(names) or sorted(map(str, saved_names)) != sorted(map(str, names)):
        raise StateError(f"resume={folder}: its optimizer parameter groups ({', '.join(map(str, saved_names))}) are "
                         f"not this run's ({', '.join(map(str, names))}): it was saved by another lorakit version "
                         "or network. Start a new run from its adapters with network_weights instead")
    order = [saved_names.index(name) for name in names]
    saved["optimizer"]["param_groups"] = [groups[i] for i in order]
    scheduler = saved["scheduler"]
    for key in _PER_GROUP_SCHEDULER_KEYS:
        if isinstance(scheduler.get(key), list) and len(scheduler[key]) == len(order):
            scheduler[key] = [scheduler[key][i] for i in order]


def _refuse_reordered_groups(folder: Path, saved_scheduler: dict, scheduler) -> None:
    """A DeepSpeed state: its engine maps the optimizer groups by position and records no names. Groups whose
    learning rates come in another order (a state of an earlier lorakit, which put the U-Net's groups first) would
    land on the wrong adapters: refused."""
    saved, now = saved_scheduler.get("base_lrs"), getattr(scheduler, "base_lrs", None)
    if isinstance(saved, list) and now is not None and saved != list(now) and sorted(saved) == sorted(now):
        raise StateError(f"resume={folder}: its parameter groups come in another order (learning rates {saved}, "
                         f"this run's {list(now)}): it was saved by an earlier lorakit, and DeepSpeed maps groups by "
                         "position. Start a new run from its adapters with network_weights instead")


def saved_seed(folder: str | Path) -> int | None:
    """The seed a state folder's run used, so that a resume of a run without `seed` continues with the same one;
    None when the folder does not tell (load_state then reports what is wrong with it). A seed that is not a whole
    number is refused naming the file."""
    try:
        info = json.loads((Path(folder) / _FILES[2]).read_text())
        seed = info.get("seed")
    except (OSError, ValueError, AttributeError):
        return None
    _refuse_bad_fields(Path(folder), _FILES[2], info, _OPTIONAL_NUMBERS)
    return seed


def no_state_yet(config) -> str:
    """Why a run stopped by Ctrl-C has no state to resume from, in words that fit its saving options: the option
    to set when it saves none, else when its first state comes."""
    if not (config.save_state or config.save_state_on_train_end):
        return "no state was saved to resume from (save_state = true keeps one at every save)"
    if not config.save_state:
        return ("no state was saved yet: save_state_on_train_end keeps one at the end of training only (save_state = "
                "true keeps one at every save)")
    every = [f"{name} = {getattr(config, name)}" for name in ("save_every_n_steps", "save_every_n_epochs",
                                                              "save_n_epoch_ratio") if getattr(config, name)]
    if not every:
        return ("no state was saved yet: without save_every_n_steps or save_every_n_epochs, save_state keeps one at "
                "the end of training only")
    return f"no state was saved yet: the run stopped before its first save ({', '.join(every)})"


def _missing_files(folder: Path) -> list[str]:
    return [name for name in _FILES if not (folder / name).is_file()]


def is_complete_state(folder: str | Path) -> bool:
    """Every file of a state is there (train_state.json, written last, whole)."""
    folder = Path(folder)
    if _missing_files(folder):
        return False
    try:
        json.loads((folder / "train_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def restore_states(folder: str | Path, resume: str | Path | None = None) -> list[tuple[Path, Path]]:
    """Put back the states of ``folder`` (and the ``resume`` one) that a kill while they were re-saved left only as
    temporaries (atomic.restore_stale_folder); returns (state, the copy it was)."""
    restored = restore_stale_folders(folder, is_complete_state)
    if resume is not None:
        copy = restore_stale_folder(resume, is_complete_state)
        if copy is not None:
            restored.append((Path(resume), copy))
    return restored


def check_state_folder(folder: str | Path) -> None:
    """The resume path is a folder: checked when the run starts, before the model loads."""
    folder = Path(folder)
    if folder.is_dir():
        return
    expected = "expected a -state folder that a run with save_state wrote"
    if folder.exists():
        raise StateError(f"resume={folder}: is a file, not a state folder ({expected})")
    raise StateError(f"resume={folder}: no such folder ({expected}){_left_copies(folder)}")


def _left_copies(folder: Path) -> str:
    """What a kill while saving ``folder`` left of it, for the message that it is missing."""
    copies = stale_copies(folder)
    if not copies:
        return ""
    complete = [copy for copy in copies if is_complete_state(copy)]
    shown = ", ".join(f"{c.name} ({'complete' if c in complete else 'incomplete'})" for c in copies)
    then = "lorakit train puts the newest complete one back when it starts" if complete else "none is complete"
    return f"; a run killed while saving it left only temporary copies ({shown}): {then}"


def load_state(folder: str | Path, network, optimizer, scheduler, config_digest: str,
               settings: dict | None = None, scaler=None, max_steps: int | None = None,
               epoch_size: tuple[int, int] | None = None) -> Progress:
    """Restore the adapters, the optimizer and the scheduler; ``optimizer`` None: a deepspeed run, whose engine
    reads its own part of the folder afterwards (deepspeed_engine.py). ``max_steps``: this run's length, which may
    differ from the saved run's (as in sd-scripts: train on for longer); the progress returned has it.
    ``epoch_size``: (batches per epoch, gradient_accumulation_steps), which the saved position must fit."""
    folder = Path(folder)
    check_state_folder(folder)
    files = [folder / name for name in _FILES]
    missing = _missing_files(folder)
    if missing:
        raise StateError(f"resume={folder}: not a lorakit state folder (missing {', '.join(missing)})")
    try:
        info = json.loads(files[2].read_text())
    except ValueError as e:
        raise StateError(f"resume={folder}: {files[2].name} is not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise StateError(f"resume={folder}: {files[2].name} holds a {type(info).__name__}, not a lorakit state's "
                         "object")
    saved_format = info.pop("format", None)
    if saved_format != _FORMAT:
        raise StateError(f"resume={folder}: state format {saved_format} is not {_FORMAT} (saved by another lorakit "
                         "version?)")
    saved_by_deepspeed = info.pop("deepspeed", None) is not None
    if saved_by_deepspeed != (optimizer is None):
        raise StateError(f"resume={folder}: the state was saved {'with' if saved_by_deepspeed else 'without'} "
                         f"deepspeed; resume it with deepspeed = {str(saved_by_deepspeed).lower()}")
    progress = _progress(folder, files[2].name, info)
    if progress.config_digest and progress.config_digest != config_digest:
        # compared setting by setting where the state records them (the digest alone changes when a lorakit
        # version adds an option or frees one for resumes); only states without settings rely on the digest
        changed = _changed(progress.settings, settings)
        if changed or not (progress.settings and settings):
            raise StateError(f"resume={folder}: the state was saved by a run with different training settings "
                             f"({changed or 'model, data, network or optimisation options changed'}); resume with "
                             "the same config")
        progress.config_digest, progress.settings = config_digest, dict(settings)
    if epoch_size is not None:  # once the settings match: a state of another dataset is named as such
        _check_position(folder, files[2].name, progress, *epoch_size)
    if max_steps is not None and progress.global_step > max_steps:
        raise StateError(f"resume={folder}: the state is at step {progress.global_step}, past this run's "
                         f"{max_steps} training steps (max_train_steps / max_train_epochs); give more steps")
    tensors, _ = _read(folder, files[0], load_file)
    expected = set(network.state_dict())
    if set(tensors) != expected:
        diff = sorted(set(tensors) ^ expected)[:3]
        raise StateError(f"resume={folder}: its adapters differ from this run's network (e.g. {diff})")
    try:
        network.load_state_dict(tensors)
    except RuntimeError as e:  # torch's shape check: the names fit, the tensors do not
        raise StateError(f"resume={folder}: {files[0].name} does not fit this run's network "
                         f"({str(e).splitlines()[-1].strip()})") from None
    saved = _read(folder, files[1], lambda path: torch.load(path, map_location="cpu", weights_only=True))
    needed = ("scheduler",) if optimizer is None else ("optimizer", "scheduler")
    if not isinstance(saved, dict) or any(not isinstance(saved.get(k), dict) for k in needed):
        raise StateError(f"resume={folder}: {files[1].name} is not a lorakit optimizer state (expected "
                         f"{' and '.join(needed)} states)")
    if optimizer is not None:
        _match_group_order(folder, saved, optimizer)
        try:
            load_optimizer_state(optimizer, saved["optimizer"])
        except ValueError as e:  # torch's own check: as many groups, of the same sizes
            raise StateError(f"resume={folder}: its optimizer state does not fit this run's parameter groups "
                             f"({e})") from None
    else:
        _refuse_reordered_groups(folder, saved["scheduler"], scheduler)
    load_scheduler_state(scheduler, saved["scheduler"])
    if scaler is not None and scaler.is_enabled() and "scaler" in saved:
        scaler.load_state_dict(saved["scaler"])
    if max_steps is not None:  # once every check passed: a refused resume trains on to no step
        _note_new_length(folder, progress, max_steps)
        progress.max_steps = max_steps
    return progress


def _read(folder: Path, path: Path, read: Callable):
    """``read(path)`` of a state file; a file it cannot read is refused naming the file and what is wrong."""
    try:
        return read(path)
    except Exception as e:  # a damaged file makes torch.load raise anything its unpickler meets (EOFError, KeyError)
        raise StateError(f"resume={folder}: {path.name} cannot be read ({_unreadable(path, e)})") from None


def _unreadable(path: Path, error: Exception) -> str:
    """What is wrong with a state file that cannot be read: an empty file (a copy to a full disk, a sync that
    stopped) says so; otherwise the error's first line, without the path the message already names."""
    try:
        if path.stat().st_size == 0:
            return "the file is empty: 0 bytes"
    except OSError:
        pass
    lines = str(error).strip().splitlines()
    # errors that describe the file, their first sentence (torch's zip reader goes on with advice); the unpickler's
    # others say a bare KeyError('101') or suggest weights_only=False
    if lines and isinstance(error, (RuntimeError, OSError, ValueError)):
        return lines[0].removeprefix(f"{path}: ").split(". ")[0]
    return "damaged, or not the file a state save writes"


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# train_state.json's numbers: (names, what each must be, the check)
_COUNTERS = (("epoch", "step_in_epoch", "global_step"), "whole numbers >= 0", lambda v: _whole(v) and v >= 0)
_OPTIONAL_NUMBERS = (("seed", "max_steps"), "a whole number, or null", lambda v: v is None or _whole(v))


def _progress(folder: Path, name: str, info: dict) -> Progress:
    """The saved progress, its numbers checked: a missing or mistyped one, or a field this lorakit does not know
    (a newer version's state), is refused naming the file, not read as 0."""
    known = {f.name for f in fields(Progress)}
    unknown = sorted(set(info) - known)
    if unknown:
        raise StateError(f"resume={folder}: {name} has fields this lorakit does not know ({', '.join(unknown)}; "
                         "saved by a newer version?)")
    for numbers in (_COUNTERS, _OPTIONAL_NUMBERS):
        _refuse_bad_fields(folder, name, info, numbers)
    return Progress(**info)


def _refuse_bad_fields(folder: Path, name: str, info: dict, numbers: tuple) -> None:
    keys, expected, fits = numbers
    bad = [k for k in keys if not fits(info.get(k))]
    if bad:
        raise StateError(f"resume={folder}: {name}: {', '.join(f'{k} = {info.get(k)!r}' for k in bad)} (expected "
                         f"{expected})")


def _check_position(folder: Path, name: str, progress: Progress, batches_per_epoch: int, accumulation: int) -> None:
    """The saved position fits this run's epochs and the saved step count: at (epoch e, s batches into it) a run
    has made (e - 1) x U + ceil(s / accumulation) optimizer steps (U per epoch), and up to U - 1 more when
    initial_step started it part-way into an epoch. Otherwise the loop would fail (epoch 0, a batch past the
    epoch) or train nothing, with no word of the state."""
    epoch, batch, step = progress.epoch, progress.step_in_epoch, progress.global_step
    where = f"resume={folder}: {name}"
    if epoch < 1:
        raise StateError(f"{where}: epoch = {epoch} (epochs count from 1)")
    if batch > batches_per_epoch:
        raise StateError(f"{where}: step_in_epoch = {batch} is past the {batches_per_epoch} batches of an epoch")
    per_epoch = math.ceil(batches_per_epoch / accumulation)
    reached = (epoch - 1) * per_epoch + math.ceil(batch / accumulation)
    if not reached <= step < reached + per_epoch:
        raise StateError(f"{where}: epoch = {epoch}, step_in_epoch = {batch} do not fit global_step = {step} (that "
                         f"position is step {reached} at {per_epoch} optimizer steps per epoch)")


def _note_new_length(folder: Path, progress: Progress, max_steps: int) -> None:
    if progress.max_steps not in (None, max_steps):
        log.warning("resume=%s: the run trains on to step %d instead of %d; the lr schedule (and any option given as a "
                    "share of the steps) follows the new length from step %d on, so the result differs from a run of "
                    "%d steps from the start unless the schedule is constant", folder, max_steps, progress.max_steps,
                    progress.global_step, max_steps)
