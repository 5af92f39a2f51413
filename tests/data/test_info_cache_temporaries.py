"""cache_info writes metadata_cache.json in the user's image folder under a temporary name; a run killed while
writing it leaves the temporary there, which the next listing of the folder removes, touching nothing else."""

from __future__ import annotations

import os

from lorakit.data.folders import subset_images
from lorakit.data.spec import SubsetSpec


def test_a_killed_runs_cache_info_temporary_is_removed_at_the_next_start(tmp_path, image_factory):
    image_factory("c/a.png", 8, 8, caption="caption a")
    folder = tmp_path / "c"
    left = folder / f".metadata_cache.json.{os.getpid()}.5c8becca.tmp"  # no writer holds it
    left.write_text("{")
    others = [folder / f".a_lorakit.npz.{os.getpid()}.0123abcd.tmp", folder / ".notes"]  # left to their owners
    for path in others:
        path.write_text("the user's")
    subset = SubsetSpec(image_dir=str(folder), caption_extension=".txt", cache_info=True)
    assert [im.caption for im in subset_images(subset)] == ["caption a"]
    assert not left.exists() and all(path.read_text() == "the user's" for path in others)
    assert (folder / "metadata_cache.json").is_file()
