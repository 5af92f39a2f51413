"""token_warmup_step at the boundary between a ratio and a step count: sd-scripts' process_caption reads a value
"< 1" as a ratio of max_train_steps (floored), so exactly 1 is one step and the warmup ends after step 0."""

from __future__ import annotations

import math
import random

import pytest

from lorakit.data.captions import process_caption, warmup_steps
from lorakit.data.spec import CaptionOptions

TAGS = ["a", "b", "c", "d"]


def sd_scripts_tag_count(step: int, warmup: float, max_train_steps: int, low: int = 1) -> int:
    """How many of the tags sd-scripts trains at ``step`` (its arithmetic, written out)."""
    if warmup < 1:
        warmup = math.floor(warmup * max_train_steps)
    if warmup and step < warmup:
        return math.floor(step * ((len(TAGS) - low) / warmup)) + low
    return len(TAGS)


@pytest.mark.parametrize("warmup, in_steps", [(1, 1), (1.0, 1), (0.99, 99), (0.5, 50), (2, 2)])
def test_warmup_in_steps(warmup, in_steps):
    assert warmup_steps(CaptionOptions(token_warmup_step=warmup), 100) == in_steps


@pytest.mark.parametrize("warmup", [1, 0.99, 2])
def test_tags_trained_per_step(warmup):
    options = CaptionOptions(token_warmup_min=1, token_warmup_step=warmup)
    for step in (0, 1, 2, 5, 50, 98, 99, 100):
        text = process_caption(", ".join(TAGS), options, random.Random(0), 1, step, 100)
        assert text.split(", ") == TAGS[: sd_scripts_tag_count(step, warmup, 100)], step


def test_a_warmup_of_one_step_trains_every_tag_from_step_one():
    options = CaptionOptions(token_warmup_min=1, token_warmup_step=1)
    assert process_caption("a, b, c, d", options, random.Random(0), 1, 0, 100) == "a"
    assert process_caption("a, b, c, d", options, random.Random(0), 1, 1, 100) == "a, b, c, d"
