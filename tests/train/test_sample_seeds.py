"""The seeds of sample prompts, as docs/training.md states them: a prompt's `--d`, else the run's seed + the
prompt's index at every draw (sd-scripts draws an unseeded prompt from a fresh random seed and names it without a
seed suffix; lorakit keeps draws comparable), and `_{seed}` ending every file name."""

from __future__ import annotations

import re

from PIL import Image

from lorakit.models import sample
from lorakit.train.sample_prompts import SamplePrompt, draw_samples


def test_unseeded_prompts_take_seed_plus_index_at_every_draw(tmp_path, monkeypatch):
    seeds = []
    monkeypatch.setattr(sample, "generate", lambda *a, seed, **k: seeds.append(seed) or [Image.new("RGB", (8, 8))])
    prompts = [SamplePrompt("a dog", seed=42), SamplePrompt("a cat")]
    for step in (2, 3):
        draw_samples(None, prompts, tmp_path, "t", step, default_sampler="ddim", clip_skip=None, base_seed=3)
    assert seeds == [42, 4, 42, 4]
    names = sorted(re.sub(r"_\d{14}_", "_{time}_", p.name) for p in tmp_path.iterdir())
    assert names == ["t_000002_00_{time}_42.png", "t_000002_01_{time}_4.png", "t_000003_00_{time}_42.png",
                     "t_000003_01_{time}_4.png"]
