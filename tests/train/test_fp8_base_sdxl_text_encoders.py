"""fp8_base on SDXL (which sd-scripts' sdxl_train_network.py trains with its text encoders in fp8): the text
encoders' Linear weights are stored in float8 and cast up per call, except text_projection, which stays in the
compute dtype: kohya's pool workaround casts the pooled state to the projection's weight dtype, and an fp8 weight
there made every prompt encoding fail (a float8 by bfloat16 matmul). The embeddings stay close to the bf16 ones."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.models.demo import random_model  # noqa: E402
from lorakit.models.text import encode_prompts  # noqa: E402
from lorakit.train import base_model  # noqa: E402


def test_sdxl_text_encoders_in_fp8_keep_text_projection_and_encode_close_to_bf16():
    model = random_model("tiny-sdxl", seed=0)
    for encoder in model.text_encoders:
        encoder.to(torch.bfloat16)
    with torch.no_grad():
        ref = encode_prompts(model, ["a photo of a cat"])
        base_model.keep_in_fp8(list(model.text_encoders), torch.bfloat16)
        out = encode_prompts(model, ["a photo of a cat"])
    projection = model.text_encoders[1].text_projection
    assert projection.weight.dtype == torch.bfloat16
    fc = next(m for m in model.text_encoders[1].modules() if isinstance(m, torch.nn.Linear) and m is not projection)
    assert fc.weight.dtype == torch.float8_e4m3fn  # the rest is in fp8 at rest
    for a, b in ((out.hidden, ref.hidden), (out.pooled, ref.pooled)):
        assert a.dtype == b.dtype == torch.bfloat16
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < 0.15, err  # fp8 rounding only
