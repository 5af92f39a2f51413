"""Writing files and folders so that an error or a kill never leaves a half-written output: everything is
written under a temporary name next to its destination and renamed into place (``os.replace`` is atomic within
one file system, hence the same folder)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["atomic_write", "staging_folder", "remove_stale_temporaries", "remove_folder", "stale_copies",
           "restore_stale_folder", "restore_stale_folders"]

# _sibling's names: .{name}.{pid}.{hex}.{kind}; kind tmp: a new version being written, old: the version it replaces
# (moved aside), del: a folder being deleted
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.(?P<kind>tmp|old|del)$")


def _sibling(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{suffix}"


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that writers in ``folder`` left when they were killed (their process
    is gone); those of running processes stay. Returns what was removed."""
    removed = []
    for path, _ in _stale_temporaries(folder):
        _remove_entry(path)
        removed.append(path)
    return removed


def _stale_temporaries(folder: str | os.PathLike) -> list[tuple[Path, re.Match]]:
    """The temporaries in ``folder`` whose writer is gone, with their name's parts."""
    try:
        with os.scandir(folder) as entries:
            matches = [(Path(entry.path), _TEMPORARY.match(entry.name)) for entry in entries]
    except OSError:
        return []
    return [(path, match) for path, match in matches if match is not None and not _alive(int(match["pid"]))]


def stale_copies(target: str | os.PathLike) -> list[Path]:
    """The versions of folder ``target`` that writers killed while replacing it left (staging_folder): the new one
    (.tmp, complete or not) and the previous one, moved aside (.old)."""
    target = Path(target)
    return [path for path, match in _stale_temporaries(target.parent)
            if match["name"] == target.name and match["kind"] in ("tmp", "old") and path.is_dir()
            and not path.is_symlink()]


def restore_stale_folder(target: str | os.PathLike, complete: Callable[[Path], bool]) -> Path | None:
    """A kill between staging_folder's two renames leaves no folder under ``target``'s name, only its previous
    version (.old) and the new one (.tmp): when ``target`` is missing, the newest of them that ``complete`` accepts
    is renamed to it (the others are left to remove_stale_temporaries). Returns the copy put back, or None."""
    target = Path(target)
    if os.path.lexists(target):
        return None
    whole = [copy for copy in stale_copies(target) if complete(copy)]
    if not whole:
        return None
    newest = max(whole, key=lambda copy: (_last_written(copy), copy.name.endswith(".tmp")))
    os.replace(newest, target)
    return newest


def restore_stale_folders(folder: str | os.PathLike, complete: Callable[[Path], bool]) -> list[tuple[Path, Path]]:
    """restore_stale_folder for every folder of ``folder`` that killed writers left only as copies; returns
    (folder put back, the copy it was)."""
    names = {match["name"] for _, match in _stale_temporaries(folder)}
    restored = []
    for name in sorted(names):
        target = Path(folder) / name
        copy = restore_stale_folder(target, complete)
        if copy is not None:
            restored.append((target, copy))
    return restored


def _last_written(folder: Path) -> float:
    """When the newest file of a folder was written (a folder's own time does not follow its files')."""
    with os.scandir(folder) as entries:
        times = [entry.stat().st_mtime for entry in entries]
    return max(times, default=folder.stat().st_mtime)


def remove_folder(path: str | os.PathLike) -> None:
    """Delete a folder so that a kill part-way never leaves it half-deleted under its own name: it is renamed
    aside first (what a kill leaves then is a temporary, removed at the next run's start, never put back)."""
    path = Path(path)
    aside = _sibling(path, "del")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


_FULL_OR_READ_ONLY = (errno.ENOSPC, getattr(errno, "EDQUOT", 122), errno.EROFS, errno.EACCES)  # EDQUOT: not on Windows


_RUST_IO_ERROR = re.compile(r"I/O error: (.+?) \(os error (\d+)\)")  # how safetensors' Rust side reports one


def _write_error(path: Path, err: BaseException) -> OSError:
    """An error while writing, named by the destination (the temporary name means nothing to a user); torch's
    stream errors (a full disk gives "basic_ios::clear: iostream error") and safetensors' SafetensorError ("I/O
    error: ... (os error 28) at path <its temporary>") become OSErrors too."""
    code, reason = getattr(err, "errno", None), getattr(err, "strerror", None)
    rust = _RUST_IO_ERROR.search(str(err)) if code is None else None
    if rust is not None:
        reason, code = rust.group(1), int(rust.group(2))
    likely = code in _FULL_OR_READ_ONLY or (code is None and not isinstance(err, OSError))
    hint = "; is the disk full or the folder read-only?" if likely else ""
    message = f"{path}: could not be written ({reason or err}){hint}"
    return OSError(code, message) if code is not None else OSError(message)


def _is_write_error(err: BaseException) -> bool:
    return isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], fsync: bool = False,
                 writer_temporaries: bool = False) -> None:
    """``write(tmp)`` writes the file at ``tmp``; it is then renamed to ``path`` (parent folders are created).
    ``fsync``: flush the data to disk before the rename makes it visible. ``writer_temporaries``: ``write`` makes
    temporaries of its own next to ``tmp`` (safetensors >= 0.8 does, with private permissions), so ``tmp`` lies in
    a temporary folder of ours, which a kill leaves for the next run's clean-up; the file gets the permissions the
    umask gives new files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = _sibling(path, "tmp")
    tmp = stage / path.name if writer_temporaries else stage
    try:
        if writer_temporaries:
            stage.mkdir()
        write(str(tmp))
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if writer_temporaries:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        _remove_entry(stage)
        if _is_write_error(err):
            raise _write_error(path, err) from err
        raise
    if writer_temporaries:
        _remove_entry(stage)


def _remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staging_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder next to ``target``; when the block ends without error it replaces ``target``
    (an existing one is moved aside first and removed after), else it is deleted. A kill between the two renames
    leaves both versions, as temporaries: restore_stale_folder puts one back."""
    target = Path(target)
    tmp = _sibling(target, "tmp")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if target.exists():
            if not target.is_dir():
                raise NotADirectoryError(f"{target}: exists and is not a folder; expected a folder to write into")
            old = _sibling(target, "old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_error(err) and not isinstance(err, NotADirectoryError):
            raise _write_error(target, err) from err
        raise
