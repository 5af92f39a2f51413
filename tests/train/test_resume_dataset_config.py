"""A resume compares the values of the dataset_config file, resolved as the run trains on them, as it compares
options: an edited file is refused naming each changed value, while the same values written otherwise (another
order, comments, a relative image_dir, another file) resume, and so does a change of cache_info, which computes
nothing. sd-scripts checks nothing on resume; lorakit refuses a state of other training settings, and these are
its data settings."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402
from lorakit.train.state import StateError  # noqa: E402

from .tiny_run import make_base, run_options  # noqa: E402

_FILE = """[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = "{image_dir}"
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A state saved after step 1 of a run on a dataset_config file, and the folder of its images."""
    root = tmp_path_factory.mktemp("resume_dataset_config")
    base = make_base(root, images=4)
    image_dir = next(p for p in (base / "data").iterdir() if p.is_dir())
    (root / "data.toml").write_text(_FILE.format(image_dir=image_dir))
    train(_config(base, root / "out", root / "data.toml"), stop_at_step=1)
    return base, root / "out" / "t-step00000001-state", image_dir


def _config(base, out, dataset_config, **overrides):
    return load_train_config(overrides=run_options(base, out, dict(
        dataset_config=str(dataset_config), network_dim=2, learning_rate=1e-3, max_train_steps=2,
        optimizer_type="AdamW", lr_scheduler="constant"), overrides))


def test_an_edited_dataset_config_is_refused_naming_the_values(saved, tmp_path):
    base, state, image_dir = saved
    edited = tmp_path / "data.toml"
    edited.write_text(_FILE.format(image_dir=image_dir).replace('".txt"', '".txt"\nshuffle_caption = true\n'
                                                                          "flip_aug = true"))
    where = r"dataset_config \[\[datasets\]\] #1 \[\[datasets.subsets\]\] #1"
    with pytest.raises(StateError, match=rf"different training settings \({where} flip_aug: False -> True; {where} "
                                         r"shuffle_caption: False -> True\)"):
        train(_config(base, tmp_path / "out", edited, resume=str(state)))


def test_the_same_values_written_otherwise_resume(saved, tmp_path, monkeypatch):
    base, state, image_dir = saved
    monkeypatch.chdir(image_dir.parent)
    rewritten = tmp_path / "moved" / "data.toml"
    rewritten.parent.mkdir()
    rewritten.write_text(f"""# the same dataset, reformatted
[[datasets]]
batch_size = 2
resolution = [64, 64]
[[datasets.subsets]]
image_dir = "./{image_dir.name}/"
caption_extension = ".txt"
cache_info = true
""")
    assert train(_config(base, tmp_path / "out", rewritten, resume=str(state))).exists()


def test_a_subset_added_to_the_file_is_refused(saved, tmp_path):
    base, state, image_dir = saved
    other = tmp_path / "other"
    os.symlink(image_dir, other)  # the same images again: as many batches per epoch, other data
    added = tmp_path / "data.toml"
    added.write_text(_FILE.format(image_dir=image_dir).replace("batch_size = 2", "batch_size = 4") +
                     f'  [[datasets.subsets]]\n  image_dir = "{other}"\n')
    with pytest.raises(StateError, match=r"dataset_config \[\[datasets\]\] #1 subsets: 1 -> 2"):
        train(_config(base, tmp_path / "out", added, resume=str(state)))
