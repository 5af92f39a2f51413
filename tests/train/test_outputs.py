"""save_last_n_* clean-up: which saves go, and that a kill part-way leaves nothing that looks like a state."""

from __future__ import annotations

import shutil

import pytest

from lorakit.formats import atomic
from lorakit.train.outputs import OutputNames


def _state(names: OutputNames, step: int):
    folder = names.step_state(step)
    folder.mkdir(parents=True)
    for name in ("network.safetensors", "optimizer.pt", "train_state.json"):
        (folder / name).write_bytes(b"x")
    return folder


def test_save_last_n_steps_keeps_the_newest_states(tmp_path):
    names = OutputNames(tmp_path, "t")
    for step in (2, 4, 6, 8):
        _state(names, step)
    names.prune_steps(8, every=2, keep=4, state=True)  # sd-scripts: saves older than step - keep go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-step00000004-state", "t-step00000006-state",
                                                          "t-step00000008-state"]


@pytest.mark.parametrize("state", [True, False])
def test_save_last_n_epochs_removes_every_older_save_a_kill_or_a_smaller_n_left(tmp_path, state):
    """sd-scripts' get_remove_epoch_no removes the one epoch that falls out of the window; a kill between a save
    and that removal, or a resume with a smaller save_last_n_epochs(_state), left the older saves for good."""
    names = OutputNames(tmp_path, "t")
    save = names.epoch_state if state else names.epoch

    def saved(*epochs):
        for epoch in epochs:
            if state:
                save(epoch).mkdir()
            else:
                save(epoch).write_bytes(b"x")

    saved(2, 6, 8)  # every 2 epochs, keep 1; epoch 4's save already gone
    names.prune_epochs(8, every=2, keep=1, state=state)
    assert sorted(p.name for p in tmp_path.iterdir()) == [save(8).name]
    saved(1, 2, 3)  # the kill's leftover (1), then a resume that lowers keep from 2 to 1 at epoch 3
    names.prune_epochs(3, every=1, keep=1, state=state)
    assert sorted(p.name for p in tmp_path.iterdir()) == [save(3).name, save(8).name]


def test_a_kill_while_pruning_never_leaves_a_half_deleted_state_under_its_name(tmp_path, monkeypatch):
    """A resume refuses a state folder with files missing; the old folder is renamed aside before it is deleted,
    so what a kill leaves is a temporary, which the next run's start removes."""
    names = OutputNames(tmp_path, "t")
    old, new = _state(names, 2), _state(names, 4)

    def killed_part_way(path, ignore_errors=False):
        sorted(path.iterdir())[0].unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_part_way)
    with pytest.raises(KeyboardInterrupt):
        names.prune_steps(4, every=2, keep=1, state=True)
    left = sorted(p.name for p in tmp_path.iterdir() if p != new)
    assert not old.exists() and len(left) == 1 and atomic._TEMPORARY.match(left[0])


@pytest.mark.parametrize("output_dir", ["afile", "afile/sub"])
def test_an_output_dir_that_is_a_file_is_refused_naming_it(tmp_path, output_dir):
    (tmp_path / "afile").write_text("")
    with pytest.raises(FileExistsError, match=r"afile: is a file, where output_dir .*needs a folder"):
        OutputNames(tmp_path / output_dir, "t").check_kinds(states=False, samples=False)


def test_only_the_kinds_a_run_writes_are_checked(tmp_path):
    """A file named like the final state or the sample folder is in the way only of a run that writes states or
    samples: a run without them trains (sd-scripts never looks at them)."""
    names = OutputNames(tmp_path, "t")
    names.final_state().write_text("notes")
    names.sample_dir().write_text("notes")
    names.check_kinds(states=False, samples=False)
    with pytest.raises(FileExistsError, match="t-state: is a file, where this run writes its output"):
        names.check_kinds(states=True, samples=False)
    with pytest.raises(FileExistsError, match="sample: is a file, where this run writes its samples"):
        names.check_kinds(states=False, samples=True)
