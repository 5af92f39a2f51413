"""cache_text_encoder_outputs in memory: each caption is encoded once, whatever batches it comes in (as sd-scripts
caches per image before training), the cache holds one entry per distinct caption, and a batch served from it is
what encoding the batch gives (SD1 and SDXL's two encoders with the pooled output, long captions in chunks,
weighted captions)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.data.weighted import tokenize_weighted  # noqa: E402
from lorakit.models.load import load_model  # noqa: E402
from lorakit.models.text import encode_prompts, tokenize  # noqa: E402
from lorakit.train.step import StepContext, _conditioning  # noqa: E402

CAPTIONS = [f"a {colour} {shape} on a white background" for colour in ("red", "green", "blue")
            for shape in ("circle", "square")]


@pytest.fixture(scope="module", params=["demo:tiny-sd", "demo:tiny-sdxl"])
def model(request):
    return load_model(request.param)


def _context(model, max_token_length=None) -> StepContext:
    return StepContext(model=model, noise_scheduler=None, noise=None, loss=None, device=torch.device("cpu"),
                       weight_dtype=torch.float32, autocast_dtype=None, clip_skip=None,
                       max_token_length=max_token_length, text_cache={})


def _batch(model, captions, max_token_length=None, weighted=False):
    if weighted:
        ids = [tokenize_weighted(t, captions, max_token_length)[0] for t in model.tokenizers]
    else:
        ids = [tokenize(t, captions, max_token_length) for t in model.tokenizers]
    return SimpleNamespace(captions=list(captions), input_ids=ids, text_hidden=None)


@pytest.fixture
def encoded_rows(model):
    """A counter of the 77-id rows the (first) text encoder encodes."""
    rows = [0]

    def count(module, args, kwargs, out):
        rows[0] += (args[0] if args else kwargs["input_ids"]).shape[0]

    handle = model.text_encoders[0].register_forward_hook(count, with_kwargs=True)
    yield rows
    handle.remove()


def _assert_same_as_encoding_the_batch(model, ctx, batch, got):
    """Up to float rounding: SDXL's pooled projection of 1 and of 3 rows can round differently."""
    with torch.no_grad():
        want = encode_prompts(model, batch.captions, None, ctx.max_token_length, input_ids=batch.input_ids)
    torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-6, atol=1e-6)
    if model.is_sdxl:
        torch.testing.assert_close(got.pooled, want.pooled, rtol=1e-6, atol=1e-6)
    else:
        assert got.pooled is None and want.pooled is None


def test_each_caption_is_encoded_once_across_shuffled_batches(model, encoded_rows):
    ctx = _context(model)
    by_cache = 0
    order = random.Random(0)
    for _epoch in range(4):  # batches of 4 reshuffled every epoch; a caption may repeat inside a batch
        captions = order.sample(CAPTIONS, len(CAPTIONS)) + order.sample(CAPTIONS, 2)
        for start in range(0, len(captions), 4):
            batch = _batch(model, captions[start:start + 4])
            before = encoded_rows[0]
            emb = _conditioning(ctx, batch, train_text=False)
            by_cache += encoded_rows[0] - before
            _assert_same_as_encoding_the_batch(model, ctx, batch, emb)
            assert not emb.hidden.requires_grad
    assert by_cache == len(CAPTIONS)
    assert len(ctx.text_cache) == len(CAPTIONS)  # memory bounded by the distinct captions


@pytest.mark.parametrize("weighted", [False, True])
def test_long_and_weighted_captions_are_cached_per_caption(model, weighted):
    ctx = _context(model, max_token_length=150)
    long = ", ".join(["a (red:1.3) circle on a white background"] * 12)  # more than one chunk of 75 tokens
    captions = [long, CAPTIONS[0], long]
    for batch_captions in (captions, captions[::-1], [CAPTIONS[0], CAPTIONS[1]]):
        batch = _batch(model, batch_captions, max_token_length=150, weighted=weighted)
        assert batch.input_ids[0].shape[1] == 2
        _assert_same_as_encoding_the_batch(model, ctx, batch, _conditioning(ctx, batch, train_text=False))
    assert len(ctx.text_cache) == 3


def test_a_trained_text_encoder_bypasses_the_cache(model):
    ctx = _context(model)
    _conditioning(ctx, _batch(model, CAPTIONS[:2]), train_text=True)
    assert ctx.text_cache == {}
