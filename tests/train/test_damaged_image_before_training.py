"""A damaged image stops a run before its first step, also where latents are not cached up front (sd-scripts'
default): the folder scan reads only headers, and the loop would reach the file after saves and hours of steps."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("diffusers")

from lorakit.data.errors import DatasetError  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402

from .tiny_run import make_base, run_options  # noqa: E402


@pytest.mark.parametrize("cache_latents", [False, True])
def test_a_truncated_image_is_refused_before_the_first_step(tmp_path, monkeypatch, cache_latents):
    base = make_base(tmp_path / "base", images=4)
    folder = base / "data" / "1_magenta"
    intact = sorted(p for p in os.listdir(folder) if p.endswith(".png"))[0]
    data = (folder / intact).read_bytes()
    (folder / "zz.png").write_bytes(data[: len(data) // 2])  # the last image in name order, header intact
    steps = []
    import lorakit.train.run as run

    real_batch_loss = run.batch_loss
    monkeypatch.setattr(run, "batch_loss", lambda *a, **k: steps.append(1) or real_batch_loss(*a, **k))
    out = tmp_path / "out"
    options = dict(max_train_steps=4, save_every_n_steps=1, train_batch_size=1, cache_latents=cache_latents)
    with pytest.raises(DatasetError, match=r"zz\.png: image data is damaged or truncated"):
        train(load_train_config(overrides=run_options(base, out, options)))
    assert steps == []
    assert not out.exists() or not any(name.endswith(".safetensors") for name in os.listdir(out))
