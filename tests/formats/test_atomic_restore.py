"""A kill between staging_folder's two renames (the previous folder moved aside, the new one not yet in place)
leaves no folder under the name: the next start puts the newest complete copy back instead of deleting both.
A temporary is a killed writer's when no process holds its lock, whatever PID its name carries (a container's
trainer has the same PID at every start); a live writer's stays."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lorakit.formats import atomic
from lorakit.formats.atomic import (atomic_write, remove_folder, remove_stale_temporaries, restore_stale_folder,
                                    restore_stale_folders, stale_copies, staging_folder)


def _complete(folder: Path) -> bool:
    return (folder / "done").is_file()


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def _copy(folder: Path, kind: str, content: str, complete: bool = True, pid: int | None = None) -> Path:
    copy = folder.parent / f".{folder.name}.{pid or _dead_pid()}.{os.urandom(4).hex()}.{kind}"
    copy.mkdir()
    (copy / "data").write_text(content)
    if complete:
        (copy / "done").write_text("")
    return copy


def _run_python(code: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True, **kwargs)


def _carry_pid(folder: Path, pid: int) -> None:
    """Rename a killed writer's temporaries as if ``pid`` had written them: a restarted container's trainer gets
    the PID the killed one had, and a PID may belong to another live process by the next start."""
    for path in list(folder.iterdir()):
        match = atomic._TEMPORARY.match(path.name)
        if match:
            path.rename(folder / re.sub(r"\.\d+\.([0-9a-f]{8})\.(tmp|old|del)$", rf".{pid}.\1.\2", path.name))


@pytest.mark.parametrize("pid", ["its own (gone)", "this process's", "another live process's"])
def test_a_kill_between_the_renames_leaves_both_versions_and_the_new_one_is_put_back(tmp_path, pid):
    target = tmp_path / "t-state"
    target.mkdir()
    (target / "data").write_text("previous")
    (target / "done").write_text("")
    killed_after_moving_aside = _run_python(f"""
        import os
        from pathlib import Path
        from lorakit.formats.atomic import atomic_write, staging_folder
        def half_written(tmp):
            Path(tmp).write_text("half")
            os._exit(9)  # killed while writing a file
        if os.fork() == 0:
            atomic_write({str(tmp_path / "t.safetensors")!r}, half_written)
        os.wait()
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            os._exit(9)  # killed right after the first rename
        os.replace = replace
        with staging_folder({str(target)!r}) as tmp:
            (Path(tmp) / "data").write_text("new")
            (Path(tmp) / "done").write_text("")
    """)
    assert killed_after_moving_aside.wait() == 9
    if pid != "its own (gone)":
        _carry_pid(tmp_path, os.getpid() if pid == "this process's" else os.getppid())
    assert not target.exists() and sorted(p.name[-3:] for p in stale_copies(target)) == ["old", "tmp"]
    restored = restore_stale_folders(tmp_path, _complete)
    assert [(t, c.name[-3:]) for t, c in restored] == [(target, "tmp")]
    assert (target / "data").read_text() == "new"
    assert len(remove_stale_temporaries(tmp_path)) == 2 and [p.name for p in tmp_path.iterdir()] == ["t-state"]


@pytest.mark.parametrize("pid", ["a gone one (a writer in another container)", "this process's"])
def test_a_live_writers_temporaries_stay_whatever_their_pid(tmp_path, pid):
    """Another process still writing (a second rank, a parallel run on the same folder): its file and its state
    folder stay through the clean-up and the put-back, and it finishes as if nobody had looked."""
    named = _dead_pid() if pid.startswith("a gone") else os.getpid()
    writer = _run_python(f"""
        import os
        import sys
        from pathlib import Path
        from lorakit.formats.atomic import atomic_write, staging_folder
        os.getpid = lambda: {named}  # the PID its temporaries' names carry
        folder = Path({str(tmp_path)!r})
        def write(tmp):
            Path(tmp).write_text("whole")
            with staging_folder(folder / "t-state") as state:
                (state / "data").write_text("new")
                (state / "done").write_text("")
                print("writing", flush=True)
                sys.stdin.readline()  # until the test has run the clean-up
        atomic_write(folder / "t.safetensors", write)
    """, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert writer.stdout.readline() == "writing\n"
    assert len([p for p in tmp_path.iterdir() if f".{named}." in p.name]) == 2
    assert remove_stale_temporaries(tmp_path) == [] and restore_stale_folders(tmp_path, _complete) == []
    assert stale_copies(tmp_path / "t-state") == []
    writer.stdin.write("\n")
    writer.stdin.close()
    assert writer.wait() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-state", "t.safetensors"]
    assert (tmp_path / "t.safetensors").read_text() == "whole" and (tmp_path / "t-state" / "data").read_text() == "new"


def test_without_locks_the_pid_decides(tmp_path, monkeypatch):
    """Where flock is unavailable (Windows), a temporary whose PID runs is kept, one whose PID is gone removed."""
    monkeypatch.setattr(atomic, "fcntl", None)
    running = _copy(tmp_path / "t-state", "tmp", "running?", pid=os.getpid())
    gone = _copy(tmp_path / "t-state", "tmp", "killed")
    assert remove_stale_temporaries(tmp_path) == [gone] and running.exists()
    atomic_write(tmp_path / "t.safetensors", lambda tmp: Path(tmp).write_text("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "t.safetensors"]


def test_only_the_named_files_temporaries_go(tmp_path):
    mine, other = (tmp_path / f".{name}.{_dead_pid()}.0123abcd.tmp" for name in ("metadata_cache.json", "a.npz"))
    mine.write_text("half")
    other.write_text("half")
    assert remove_stale_temporaries(tmp_path, name="metadata_cache.json") == [mine] and other.exists()


def test_an_incomplete_new_version_gives_way_to_the_complete_previous_one(tmp_path):
    target = tmp_path / "t-state"
    _copy(target, "old", "previous")
    _copy(target, "tmp", "new", complete=False)
    assert restore_stale_folder(target, _complete).name.endswith(".old")
    assert (target / "data").read_text() == "previous"


def test_the_newest_complete_copy_wins_and_a_present_folder_is_left_alone(tmp_path):
    target = tmp_path / "t-state"
    older, newer = _copy(target, "tmp", "older"), _copy(target, "tmp", "newer")
    os.utime(older / "data", (1, 1))
    os.utime(older / "done", (1, 1))
    assert restore_stale_folder(target, _complete) == newer and (target / "data").read_text() == "newer"
    assert restore_stale_folder(target, _complete) is None and older.exists()  # the name is taken now


def test_copies_of_running_writers_and_folders_being_deleted_are_never_put_back(tmp_path, monkeypatch):
    import shutil

    target = tmp_path / "t-state"
    with staging_folder(target) as tmp:  # in progress, complete already
        (tmp / "done").write_text("")
        assert stale_copies(target) == [] and restore_stale_folders(tmp_path, _complete) == []
    pruned = tmp_path / "t-step00000002-state"
    pruned.mkdir()
    (pruned / "done").write_text("")
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)  # killed before anything was deleted
    remove_folder(pruned)
    monkeypatch.undo()
    aside = next(p for p in tmp_path.iterdir() if p.name.startswith(".t-step"))
    assert aside.name.endswith(".del")
    aside.rename(aside.with_name(f".{pruned.name}.{_dead_pid()}.0123abcd.del"))  # as a killed run leaves it
    assert restore_stale_folders(tmp_path, _complete) == [] and not pruned.exists() and target.exists()


def test_staging_folder_still_replaces_a_folder_in_one_piece(tmp_path):
    target = tmp_path / "t-state"
    for content in ("first", "second"):
        with staging_folder(target) as tmp:
            (tmp / "data").write_text(content)
    assert (target / "data").read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["t-state"]
