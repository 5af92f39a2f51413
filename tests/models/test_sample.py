"""generate(): sampler names, sizes, seeds, SDXL conditioning, on small random demo-shaped models."""

import functools

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.models.demo import random_model  # noqa: E402
from lorakit.models.sample import SAMPLERS, check_sampler, generate, scheduler_for  # noqa: E402


@functools.lru_cache(maxsize=None)
def _model(name):
    return random_model(name, seed=0)


def _arr(im):
    return np.asarray(im, dtype=np.int16)


def test_sampler_names_map_to_sd_scripts_schedulers():
    m = _model("tiny-sd")
    expected = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
                "k_lms": "LMSDiscreteScheduler", "euler": "EulerDiscreteScheduler", "k_euler": "EulerDiscreteScheduler",
                "euler_a": "EulerAncestralDiscreteScheduler", "k_euler_a": "EulerAncestralDiscreteScheduler",
                "heun": "HeunDiscreteScheduler", "dpm_2": "KDPM2DiscreteScheduler", "k_dpm_2": "KDPM2DiscreteScheduler",
                "dpm_2_a": "KDPM2AncestralDiscreteScheduler", "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
                "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
                "dpmsingle": "DPMSolverSinglestepScheduler"}
    for name, cls in expected.items():
        assert SAMPLERS[name][0] == cls, name
        s = scheduler_for(m, name)
        assert type(s).__name__ == cls, name
        # the model's own schedule, not the class default
        assert (s.config.beta_start, s.config.beta_end, s.config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
        assert s.config.num_train_timesteps == 1000 and s.config.prediction_type == "epsilon"
    assert scheduler_for(m, "dpmsolver").config.algorithm_type == "dpmsolver"
    assert scheduler_for(m, "dpmsolver++").config.algorithm_type == "dpmsolver++"
    assert scheduler_for(m, "EULER_A").config.num_train_timesteps == 1000
    with pytest.raises(ValueError, match="unknown sampler 'k_foo'.*euler_a.*dpmsingle"):
        scheduler_for(m, "k_foo")
    assert set(expected) <= set(SAMPLERS)


def test_v_prediction_follows_the_model():
    import copy

    m = copy.copy(_model("tiny-sd"))
    m.v_parameterization = True
    assert scheduler_for(m, "euler").config.prediction_type == "v_prediction"


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_sizes_and_seed_reproducibility(name):
    m = _model(name)
    a = generate(m, ["a red circle on a blue background", "a green square"], steps=3, seed=5)
    assert [im.size for im in a] == [(64, 64), (64, 64)] and a[0].mode == "RGB"
    b = generate(m, ["a red circle on a blue background", "a green square"], steps=3, seed=5)
    assert all(np.array_equal(_arr(x), _arr(y)) for x, y in zip(a, b))
    # image i is drawn with seed + i, whatever batch it is in (equal up to float rounding across batch sizes)
    single = generate(m, "a green square", steps=3, seed=6)
    assert np.abs(_arr(single[0]) - _arr(a[1])).max() <= 2
    other = generate(m, "a green square", steps=3, seed=7)
    assert np.abs(_arr(other[0]) - _arr(a[1])).mean() > 1
    wide = generate(m, "a red circle", steps=2, width=96, height=64, sampler="ddim", guidance_scale=1.0)
    assert wide[0].size == (96, 64)


@pytest.mark.parametrize("sampler", ["ddim", "pndm", "lms", "euler", "heun", "dpm_2", "dpm_2_a", "dpmsolver++",
                                     "dpmsingle"])
def test_every_sampler_runs(sampler):
    im = generate(_model("tiny-sd"), "a red circle", steps=4, sampler=sampler)[0]
    assert im.size == (64, 64)
    assert np.isfinite(_arr(im)).all()


def test_a_sampler_whose_package_is_missing_is_refused_before_use(monkeypatch):
    """diffusers' LMS scheduler needs scipy and, without it, fails only when built: check_sampler (which the
    trainer runs before training) says so first."""
    import diffusers

    class WithoutScipy:  # what diffusers puts in the scheduler's place when scipy is not installed
        def __init__(self, *args, **kwargs):
            raise ImportError("LMSDiscreteScheduler requires the scipy library but it was not found in your "
                              "environment.")

    monkeypatch.setattr(diffusers, "LMSDiscreteScheduler", WithoutScipy)
    with pytest.raises(ValueError, match="sampler 'k_lms' cannot run here: .*scipy"):
        check_sampler("k_lms")
    check_sampler("euler_a")


def test_bad_arguments():
    m = _model("tiny-sd")
    with pytest.raises(ValueError, match="unknown sampler"):
        generate(m, "x", sampler="nope")
    with pytest.raises(ValueError, match="multiples of 8"):
        generate(m, "x", width=60)
    with pytest.raises(ValueError, match="negative prompt"):
        generate(m, ["a", "b"], negative_prompt=["x"])


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_below_one_are_refused(steps):
    m = _model("tiny-sd")
    calls = []
    forward = m.unet.forward
    m.unet.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
    try:
        with pytest.raises(ValueError, match=rf"steps must be a whole number >= 1, got {steps}"):
            generate(m, "x", steps=steps)
    finally:
        del m.unet.forward
    assert calls == []


def test_an_inpainting_unet_is_refused_with_a_clear_message():
    import copy

    from diffusers import UNet2DConditionModel

    m = copy.copy(_model("tiny-sd"))
    m.unet = UNet2DConditionModel.from_config({**m.unet.config, "in_channels": 9})
    with pytest.raises(ValueError, match=r"generate\(\) draws text-to-image only; this U-Net takes 9 input channels "
                                         r"\(an inpainting model\?\)"):
        generate(m, "x", steps=1)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_prompts_are_read_as_sd_scripts_samples_them(name):
    """sd-scripts samples through its long-prompt-weighting pipeline: as many 75-token chunks as the longest
    prompt needs (up to 3), and A1111 weights scaling each token's states, brought back to the prompt's mean."""
    import copy

    import torch

    from lorakit.models.sample import prompt_conditioning
    from lorakit.models.text import encode_prompts

    m = copy.deepcopy(_model(name))
    for encoder in m.text_encoders:  # trained CLIP norms have biases; a zero-mean output would make the mean 0
        for module in encoder.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.data.add_(0.3)
    long = "a red circle " + "on a blue background " * 40 + "with a green border"
    n_tokens = len(m.tokenizers[0](long).input_ids) - 2
    assert 150 < n_tokens <= 225
    got = prompt_conditioning(m, [long, "x"])
    ref = encode_prompts(m, [long, "x"], max_token_length=225)
    assert got.hidden.shape[1] == 227 and torch.allclose(got.hidden, ref.hidden, atol=1e-6)
    assert prompt_conditioning(m, ["x", "y"]).hidden.shape[1] == 77
    assert prompt_conditioning(m, [long * 2]).hidden.shape[1] == 227  # cut at 225 tokens
    assert prompt_conditioning(m, [long], max_token_length=75).hidden.shape[1] == 77

    weighted = prompt_conditioning(m, ["(red:1.5) circle", "red circle"])
    plain = encode_prompts(m, ["red circle"]).hidden[0].double()
    w = torch.ones(plain.shape[0], 1, dtype=torch.float64)
    w[1] = 1.5  # <BOS>, red, circle, ...
    expected = plain * w
    expected = expected * plain.mean() / expected.mean()
    assert torch.allclose(weighted.hidden[0].double(), expected, atol=1e-5)
    assert torch.allclose(weighted.hidden[1].double(), plain, atol=1e-6)  # unweighted prompts are unchanged
    if m.is_sdxl:
        assert torch.allclose(weighted.pooled[0], weighted.pooled[1], atol=1e-6)  # the pooled embeds are not weighted


def test_words_past_75_tokens_change_the_image():
    m = _model("tiny-sd")
    head = "a circle " + "on a background " * 30
    a, b = (generate(m, head + tail, steps=2, sampler="ddim", seed=3)[0] for tail in ("red red red", "blue blue blue"))
    assert len(m.tokenizers[0](head).input_ids) - 2 > 75
    assert np.abs(_arr(a) - _arr(b)).max() > 0


def test_decoded_pixels_are_rounded_to_the_nearest_grey_level(monkeypatch):
    """The VAE's output in [-1, 1] becomes 8-bit pixels as diffusers' image processor (which sd-scripts' pipeline
    uses) makes them: clamp, (x + 1) * 127.5, rounded to the nearest level, not cut towards zero."""
    import types

    import torch

    m = _model("tiny-sd")
    levels = torch.tensor([-1.5, -1.0, 100.7 / 127.5 - 1, 200.2 / 127.5 - 1, 1.0, 3.0])
    decoded = levels.view(1, 1, 1, 6).expand(1, 3, 64, 6).contiguous()
    monkeypatch.setattr(m.vae, "decode", lambda latents: types.SimpleNamespace(sample=decoded))
    (image,) = generate(m, "x", steps=1, sampler="ddim", guidance_scale=1.0)
    assert _arr(image)[0, :, 0].tolist() == [0, 0, 101, 200, 255, 255]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_ddim_and_ddpm_samples_are_not_clipped(sampler):
    """sd-scripts' get_my_scheduler sets clip_sample on, but the pipeline it samples with resets it to off when
    built (diffusers' StableDiffusionPipeline does the same; sd-scripts' gen_img notes the setting was moot): latents
    are not in [-1, 1], so clipping the predicted x0 to it would wash the samples out."""
    assert scheduler_for(_model("tiny-sd"), sampler).config.clip_sample is False


def test_euler_image_matches_diffusers_pipeline_from_the_same_noise():
    """diffusers' StableDiffusionPipeline (what sd-scripts samples with) scales the start noise by the scheduler's
    init_noise_sigma (~14.6 for Euler at 1000 steps): given the same noise, conditioning and scheduler it must draw
    the same image as generate()."""
    import torch
    from diffusers import StableDiffusionPipeline

    from lorakit.models.sample import prompt_conditioning

    m = _model("tiny-sd")
    prompt, negative, seed = "a red circle on a blue background", "a green square", 3
    ours = generate(m, prompt, negative_prompt=negative, steps=4, guidance_scale=5.0, seed=seed, sampler="euler")
    with torch.no_grad():
        uncond, cond = prompt_conditioning(m, [negative, prompt]).hidden.chunk(2)
    shape = (1, m.unet.config.in_channels, 64 // m.vae_scale_factor, 64 // m.vae_scale_factor)
    noise = torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed))[None]
    pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0],
                                   unet=m.unet, scheduler=scheduler_for(m, "euler"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, num_inference_steps=4,
                  guidance_scale=5.0, height=64, width=64, output_type="np").images[0]
    theirs = np.round(theirs * 255).astype(np.int16)
    assert np.abs(_arr(ours[0]) - theirs).max() <= 1
