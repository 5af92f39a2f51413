"""A run killed while writing a sample image leaves its temporary in output_dir/sample/ (samples are written under
a temporary name and renamed); the next run's draw removes it, and leaves the folder's other files alone."""

from __future__ import annotations

import os

from PIL import Image

from lorakit.models import sample
from lorakit.train.sample_prompts import SamplePrompt, draw_samples


def test_a_killed_runs_sample_temporary_is_removed_at_the_next_draw(tmp_path, monkeypatch):
    folder = tmp_path / "sample"
    folder.mkdir()
    left = folder / f".t_000016_00_20261206110656_1.png.{os.getpid()}.fa2bdfcd.tmp"  # no writer holds it
    left.write_bytes(b"a whole PNG")
    kept = [folder / "t_000008_00_20261206110654_1.png", folder / ".notes"]
    for path in kept:
        path.write_bytes(b"the user's")
    monkeypatch.setattr(sample, "generate", lambda *a, **k: [Image.new("RGB", (8, 8))])
    draw_samples(None, [SamplePrompt("a dog", seed=1)], folder, "t", 20, default_sampler="ddim", clip_skip=None,
                 base_seed=0)
    names = sorted(p.name for p in folder.iterdir())
    assert left.name not in names and all(path.read_bytes() == b"the user's" for path in kept)
    assert len(names) == 3 and names[2].startswith("t_000020_00_")


def test_a_run_without_samples_removes_them_when_it_starts(tmp_path):
    import pytest

    pytest.importorskip("diffusers")
    from lorakit.train.config import load_train_config
    from lorakit.train.run import train

    from .tiny_run import make_base, run_options

    base = make_base(tmp_path / "base", images=2)
    folder = tmp_path / "out" / "sample"
    folder.mkdir(parents=True)
    left = folder / f".t_000016_00_20261206110656_1.png.{os.getpid()}.fa2bdfcd.tmp"
    left.write_bytes(b"a whole PNG")
    kept = folder / "t_000008_00_20261206110654_1.png"
    kept.write_bytes(b"the user's")
    train(load_train_config(overrides=run_options(base, tmp_path / "out", {"network_dim": 2, "max_train_steps": 1})))
    assert sorted(p.name for p in folder.iterdir()) == [kept.name]
