"""A subset's defaults are sd-scripts' (config_util BaseSubsetParams / DreamBoothSubsetParams and the matching
command-line defaults): captions are read from ``.caption`` files, and a token warmup starts from
``token_warmup_min`` = 1 tag."""

from __future__ import annotations

import random

from lorakit.data.captions import process_caption
from lorakit.data.folders import subset_images
from lorakit.data.spec import SubsetSpec


def test_captions_are_read_from_dot_caption_files_by_default(tmp_path, image_factory):
    image_factory("imgs/a.png", 8, 8, caption="from the .caption file", extension=".caption")
    (tmp_path / "imgs" / "a.txt").write_text("from the .txt file", encoding="utf-8")
    images = subset_images(SubsetSpec(image_dir=str(tmp_path / "imgs"), class_tokens="cls"))
    assert [im.caption for im in images] == ["from the .caption file"]


def test_a_token_warmup_starts_from_one_tag_by_default(tmp_path):
    subset = SubsetSpec(image_dir=str(tmp_path), token_warmup_step=10)
    # sd-scripts: tokens_len = floor(step * (len(tags) - token_warmup_min) / token_warmup_step) + token_warmup_min
    # with 3 tags and min 1: floor(step * 2 / 10) + 1
    for step, expected in [(0, "a"), (4, "a"), (5, "a, b"), (9, "a, b"), (10, "a, b, c")]:
        assert process_caption("a, b, c", subset, random.Random(0), 1, step, 100) == expected
