"""What draw_samples hands to generate() for each prompt: the prompt file's values (sd-scripts'
sample_image_inference reads prompt, negative_prompt, sample_steps, scale, width, height, seed and sample_sampler
from each prompt), the run's sample_sampler only where a prompt names none."""

from __future__ import annotations

from PIL import Image

from lorakit.models import sample
from lorakit.train.sample_prompts import SamplePrompt, draw_samples


def test_each_prompts_own_values_reach_generate_and_the_run_sampler_fills_in(tmp_path, monkeypatch):
    """A prompt's `--ss` beats the run's sample_sampler; `--d 0` is a seed like any other (sd-scripts: `if seed is
    not None`), only a prompt without one takes the run's seed + its index."""
    calls = []
    monkeypatch.setattr(sample, "generate", lambda model, prompts, **k: calls.append((prompts, k))
                        or [Image.new("RGB", (8, 8))])
    prompts = [SamplePrompt("a dog", negative_prompt="blurry", width=96, height=128, seed=7, scale=4.5,
                            sample_steps=12, sample_sampler="euler"),
               SamplePrompt("a cat"),
               SamplePrompt("a bird", seed=0)]
    draw_samples(None, prompts, tmp_path, "t", 1, default_sampler="ddim", clip_skip=2, base_seed=3, write=False)
    assert calls == [
        (["a dog"], dict(negative_prompt="blurry", steps=12, guidance_scale=4.5, width=96, height=128, seed=7,
                         sampler="euler", clip_skip=2)),
        (["a cat"], dict(negative_prompt="", steps=30, guidance_scale=7.5, width=None, height=None, seed=4,
                         sampler="ddim", clip_skip=2)),
        (["a bird"], dict(negative_prompt="", steps=30, guidance_scale=7.5, width=None, height=None, seed=0,
                          sampler="ddim", clip_skip=2)),
    ]
