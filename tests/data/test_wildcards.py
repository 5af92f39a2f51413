"""enable_wildcard captions against sd-scripts' BaseDataset.process_caption (train_util.py), draw for draw: a random
line of a multi-line caption, then each ``{a|b}`` replaced by a random option, ``{{``/``}}`` literal braces."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from lorakit.data.captions import process_caption
from lorakit.data.spec import CaptionOptions

WILDCARDS = CaptionOptions(enable_wildcard=True)


def sd_scripts_wildcard(caption: str, rng: random.Random) -> str:
    """sd-scripts' enable_wildcard branch, with its global ``random`` replaced by ``rng``."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    replacer1, replacer2 = "⦅", "⦆"
    while replacer1 in caption or replacer2 in caption:
        replacer1 += "⦅"
        replacer2 += "⦆"
    caption = caption.replace("{{", replacer1).replace("}}", replacer2)
    caption = re.sub(r"\{([^}]+)\}", lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(replacer1, "{").replace(replacer2, "}")


def texts(caption: str, draws: int = 64) -> Counter:
    return Counter(process_caption(caption, WILDCARDS, random.Random(seed), 1) for seed in range(draws))


@pytest.mark.parametrize("caption", [
    "line one\nline two\nline three",
    "a {red|blue|green} cat",
    "{{a|b}} x",
    "{{x}} {a|b}, {c|d}\n{e|f} {{g}}",
    "⦅kept⦆ {{x}} {a|b}",  # the caption holds the brace placeholder itself: a longer one is used
])
def test_matches_sd_scripts_draw_for_draw(caption):
    for seed in range(40):
        expected = sd_scripts_wildcard(caption, random.Random(seed))
        assert process_caption(caption, WILDCARDS, random.Random(seed), 1) == expected, seed


def test_a_multi_line_caption_trains_every_line():
    assert set(texts("line one\nline two")) == {"line one", "line two"}


def test_each_option_of_a_wildcard_is_trained():
    assert set(texts("a {red|blue} cat")) == {"a red cat", "a blue cat"}


def test_double_braces_are_literal_braces_not_a_wildcard():
    assert texts("{{a|b}} x") == Counter({"{a|b} x": 64})
