"""Writing files and folders so that an error or a kill never leaves a half-written output: everything is
written under a temporary name next to its destination and renamed into place (``os.replace`` is atomic within
one file system, hence the same folder).

A temporary's writer holds an advisory lock on it (``flock``) for as long as it uses it; the kernel releases the
lock when the writer dies, so an unlocked temporary is a killed writer's. Its PID (in the name) cannot tell: a
container's trainer has the same small PID at every start, and a PID may belong to another process by then. Where
locks are unavailable (Windows, a file system without them) the PID decides, as it must."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

__all__ = ["atomic_write", "staging_folder", "remove_stale_temporaries", "remove_folder", "stale_copies",
           "restore_stale_folder", "restore_stale_folders"]

# _sibling's names: .{name}.{pid}.{hex}.{kind}; kind tmp: a new version being written, old: the version it replaces
# (moved aside), del: a folder being deleted
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.(?P<kind>tmp|old|del)$")


def _sibling(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{suffix}"


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary files and folders that writers in ``folder`` left when they were killed; those of
    running writers stay. ``name``: only the temporaries of that file. Returns what was removed."""
    with _stale_temporaries(folder) as stale:
        left = [path for path, match in stale if name is None or match["name"] == name]
        for path in left:
            _remove_entry(path)
    return left


@contextlib.contextmanager
def _stale_temporaries(folder: str | os.PathLike) -> Iterator[list[tuple[Path, re.Match]]]:
    """The temporaries in ``folder`` whose writer is gone, with their name's parts; their locks are held for the
    block, so that a writer that made one an instant ago and is about to lock it takes a new name instead."""
    try:
        with os.scandir(folder) as entries:
            matches = [(Path(entry.path), _TEMPORARY.match(entry.name)) for entry in entries]
    except OSError:
        matches = []
    held, stale = [], []
    try:
        for path, match in matches:
            if match is None:
                continue
            lock = _try_lock(path)
            if lock == _BUSY or (lock is None and _alive(int(match["pid"]))):
                continue
            if lock is not None:
                held.append(lock)
            stale.append((path, match))
        yield stale
    finally:
        for fd in held:
            os.close(fd)


def _copies_of(target: Path, stale: list[tuple[Path, re.Match]]) -> list[Path]:
    return [path for path, match in stale
            if match["name"] == target.name and match["kind"] in ("tmp", "old") and path.is_dir()
            and not path.is_symlink()]


def stale_copies(target: str | os.PathLike) -> list[Path]:
    """The versions of folder ``target`` that writers killed while replacing it left (staging_folder): the new one
    (.tmp, complete or not) and the previous one, moved aside (.old)."""
    target = Path(target)
    with _stale_temporaries(target.parent) as stale:
        return _copies_of(target, stale)


def restore_stale_folder(target: str | os.PathLike, complete: Callable[[Path], bool]) -> Path | None:
    """A kill between staging_folder's two renames leaves no folder under ``target``'s name, only its previous
    version (.old) and the new one (.tmp): when ``target`` is missing, the newest of them that ``complete`` accepts
    is renamed to it (the others are left to remove_stale_temporaries). Returns the copy put back, or None."""
    target = Path(target)
    if os.path.lexists(target):
        return None
    with _stale_temporaries(target.parent) as stale:
        whole = [copy for copy in _copies_of(target, stale) if complete(copy)]
        if not whole:
            return None
        newest = max(whole, key=lambda copy: (_last_written(copy), copy.name.endswith(".tmp")))
        os.replace(newest, target)
    return newest


def restore_stale_folders(folder: str | os.PathLike, complete: Callable[[Path], bool]) -> list[tuple[Path, Path]]:
    """restore_stale_folder for every folder of ``folder`` that killed writers left only as copies; returns
    (folder put back, the copy it was)."""
    with _stale_temporaries(folder) as stale:  # its locks let go before restore_stale_folder takes them again
        names = {match["name"] for _, match in stale}
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
    with _locked_while_moved(path):
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)


_BUSY = -1  # _try_lock's answer for a lock that another open file holds (never a descriptor)


def _try_lock(path: Path) -> int | None:
    """Take ``path``'s lock without waiting: the descriptor that holds it, _BUSY when a live writer holds it, None
    where locks cannot tell (no flock, an entry this user cannot open, a file system without locks)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))  # never waits on a FIFO
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        return _BUSY if isinstance(err, BlockingIOError) else None
    return fd


def _new_temporary(path: Path, kind: str, make: Callable[[Path], None]) -> tuple[Path, int | None]:
    """A fresh temporary for ``path``, made by ``make`` and locked: (its path, the descriptor to close when done
    with it, None without locks). A clean-up that found it unlocked in the instant before the lock may have removed
    it: then a new one."""
    while True:
        temp = _sibling(path, kind)
        make(temp)
        if fcntl is None:
            return temp, None
        try:
            fd = os.open(temp, os.O_RDONLY)
        except FileNotFoundError:
            continue
        except OSError:  # not readable (a umask without the owner's read bit): its clean-up goes by the PID
            return temp, None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits while a clean-up holds it
        except OSError:  # a file system without locks: its clean-up goes by the PID too
            os.close(fd)
            return temp, None
        if _is_open_as(temp, fd):
            return temp, fd
        os.close(fd)


def _is_open_as(path: Path, fd: int) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def _locked_while_moved(path: Path) -> Iterator[None]:
    """``path`` locked for the block, in which it is renamed to a temporary name (.old, .del): the lock follows it,
    so a clean-up never takes it for a killed writer's."""
    fd = _try_lock(path)
    try:
        yield
    finally:
        if fd is not None and fd != _BUSY:
            os.close(fd)


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
    umask gives new files. Without ``writer_temporaries``, ``write`` writes into the file at ``tmp`` (which holds
    the writer's lock), never replaces it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        stage, lock = _new_temporary(path, "tmp", Path.mkdir if writer_temporaries else _create_file)
    except OSError as err:  # a read-only folder: named by the destination, as a failed write is
        raise _write_error(path, err) from err
    tmp = stage / path.name if writer_temporaries else stage
    try:
        write(str(tmp))
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if writer_temporaries:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        if writer_temporaries:
            _remove_entry(stage)
    except BaseException as err:
        _remove_entry(stage)
        if _is_write_error(err):
            raise _write_error(path, err) from err
        raise
    finally:
        _release(lock)


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


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
    tmp, lock = _new_temporary(target, "tmp", lambda folder: folder.mkdir(parents=True))
    try:
        yield tmp
        if target.exists():
            if not target.is_dir():
                raise NotADirectoryError(f"{target}: exists and is not a folder; expected a folder to write into")
            old = _sibling(target, "old")
            with _locked_while_moved(target):
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
    finally:
        _release(lock)
