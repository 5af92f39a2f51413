"""A kill between staging_folder's two renames (the previous folder moved aside, the new one not yet in place)
leaves no folder under the name: the next start puts the newest complete copy back instead of deleting both."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from lorakit.formats.atomic import (remove_folder, remove_stale_temporaries, restore_stale_folder,
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


def test_a_kill_between_the_renames_leaves_both_versions_and_the_new_one_is_put_back(tmp_path):
    target = tmp_path / "t-state"
    target.mkdir()
    (target / "data").write_text("previous")
    (target / "done").write_text("")
    killed_after_moving_aside = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from lorakit.formats.atomic import staging_folder
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            os._exit(9)  # killed right after the first rename
        os.replace = replace
        with staging_folder({str(target)!r}) as tmp:
            (Path(tmp) / "data").write_text("new")
            (Path(tmp) / "done").write_text("")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    assert subprocess.run([sys.executable, "-c", killed_after_moving_aside], env=env).returncode == 9
    assert not target.exists() and sorted(p.name[-3:] for p in stale_copies(target)) == ["old", "tmp"]
    restored = restore_stale_folders(tmp_path, _complete)
    assert [(t, c.name[-3:]) for t, c in restored] == [(target, "tmp")]
    assert (target / "data").read_text() == "new"
    assert len(remove_stale_temporaries(tmp_path)) == 1 and [p.name for p in tmp_path.iterdir()] == ["t-state"]


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
    _copy(target, "tmp", "in progress", pid=os.getpid())
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
    assert restore_stale_folders(tmp_path, _complete) == [] and not pruned.exists()


def test_staging_folder_still_replaces_a_folder_in_one_piece(tmp_path):
    target = tmp_path / "t-state"
    for content in ("first", "second"):
        with staging_folder(target) as tmp:
            (tmp / "data").write_text(content)
    assert (target / "data").read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["t-state"]
