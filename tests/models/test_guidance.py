"""What generate() feeds the U-Net and the scheduler: classifier-free guidance as diffusers'
StableDiffusionPipeline (and sd-scripts' sampling pipeline) computes it, uncond + g (cond - uncond) with the
negative prompt as the unconditional half, and SDXL's time ids as (height, width) pairs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import lorakit.models.sample as sample  # noqa: E402
from lorakit.models.load import load_model  # noqa: E402

PROMPT, NEGATIVE = "a red circle", "a green square on a blue background"


def _spy(model, monkeypatch):
    """Record each U-Net call (its conditioning, time ids and prediction) and each prediction the scheduler steps
    with."""
    calls, stepped = [], []
    forward = model.unet.forward

    def unet_forward(*args, encoder_hidden_states=None, added_cond_kwargs=None, **kwargs):
        out = forward(*args, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                      **kwargs)
        calls.append({"hidden": encoder_hidden_states.clone(), "pred": out.sample.clone(),
                      "time_ids": None if added_cond_kwargs is None else added_cond_kwargs["time_ids"].clone()})
        return out

    monkeypatch.setattr(model.unet, "forward", unet_forward)
    make_scheduler = sample.scheduler_for

    def scheduler_for(*args, **kwargs):
        scheduler = make_scheduler(*args, **kwargs)
        step = scheduler.step

        def recording_step(pred, *a, **k):
            stepped.append(pred.clone())
            return step(pred, *a, **k)

        scheduler.step = recording_step
        return scheduler

    monkeypatch.setattr(sample, "scheduler_for", scheduler_for)
    return calls, stepped


def _conditioning_alone(model, monkeypatch, prompt):
    """The U-Net conditioning of ``prompt`` drawn on its own (guidance 1: the conditional branch only)."""
    calls, _ = _spy(model, monkeypatch)
    sample.generate(model, prompt, steps=1, guidance_scale=1.0, sampler="ddim")
    monkeypatch.undo()
    assert calls[0]["hidden"].shape[0] == 1
    return calls[0]["hidden"][0]


@pytest.mark.parametrize("demo", ["demo:tiny-sd", "demo:tiny-sdxl"])
def test_guided_prediction_is_uncond_plus_scale_times_the_difference(demo, monkeypatch):
    model = load_model(demo)
    negative = _conditioning_alone(model, monkeypatch, NEGATIVE)
    positive = _conditioning_alone(model, monkeypatch, PROMPT)
    assert not torch.allclose(negative, positive, atol=1e-3)

    calls, stepped = _spy(model, monkeypatch)
    g = 3.5
    sample.generate(model, PROMPT, negative_prompt=NEGATIVE, steps=2, guidance_scale=g, sampler="ddim")
    assert len(calls) == len(stepped) == 2
    for call, pred in zip(calls, stepped):
        # the batch is [negative prompt, prompt], as the pipeline concatenates [uncond, text]
        assert call["hidden"].shape[0] == 2
        torch.testing.assert_close(call["hidden"][0], negative, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(call["hidden"][1], positive, atol=1e-5, rtol=1e-4)
        uncond, cond = call["pred"][0], call["pred"][1]
        assert not torch.allclose(uncond, cond, atol=1e-4)
        torch.testing.assert_close(pred[0], uncond + g * (cond - uncond))


def test_guidance_is_continuous_at_one():
    # uncond + g (cond - uncond) -> cond as g -> 1: the image of g = 1.0001 is the conditional-only one of g = 1
    import numpy as np

    model = load_model("demo:tiny-sd")
    kw = dict(prompts=PROMPT, negative_prompt=NEGATIVE, steps=4, seed=1, sampler="ddim")
    plain = np.asarray(sample.generate(model, guidance_scale=1.0, **kw)[0], dtype=np.int16)
    barely = np.asarray(sample.generate(model, guidance_scale=1.0001, **kw)[0], dtype=np.int16)
    assert np.abs(plain - barely).max() <= 2


@pytest.mark.parametrize("width,height", [(64, 32), (32, 64)])
def test_sdxl_time_ids_are_height_width_pairs(width, height, monkeypatch):
    # diffusers' StableDiffusionXLPipeline._get_add_time_ids: original_size + crops_coords_top_left + target_size,
    # sizes as (height, width); kohya's sampling passes the same
    model = load_model("demo:tiny-sdxl")
    calls, _ = _spy(model, monkeypatch)
    sample.generate(model, PROMPT, steps=1, width=width, height=height, guidance_scale=2.0, sampler="ddim")
    expected = torch.tensor([[height, width, 0, 0, height, width]] * 2, dtype=torch.float32)
    assert torch.equal(calls[0]["time_ids"].float().cpu(), expected)
