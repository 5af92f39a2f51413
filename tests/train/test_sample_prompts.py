"""Sample-prompt files (sd-scripts' .txt flags, .toml, .json) are read and checked when the run starts: a size is
rounded as sd-scripts rounds it, and what would fail at the first sample (a sampler, broken TOML/JSON) is an error
naming the file then."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from lorakit.train.sample_prompts import read_sample_prompts  # noqa: E402


def test_txt_flags_and_sd_scripts_size_rounding(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# a comment\na magenta circle --n blurry --w 60 --h 70 --d 5 --l 6.5 --s 12 --ss ddim\n"
                    "a square --w 130 --h 512\n", encoding="utf-8")
    first, second = read_sample_prompts(path)
    assert (first.prompt, first.negative_prompt, first.seed, first.scale, first.sample_steps, first.sample_sampler) \
        == ("a magenta circle", "blurry", 5, 6.5, 12, "ddim")
    assert (first.width, first.height) == (64, 64)  # max(64, v - v % 8)
    assert (second.width, second.height) == (128, 512)


@pytest.mark.parametrize("name,text,message", [
    ("p.txt", "a circle --ss foo\n", r"p.txt: unknown sampler 'foo'"),
    ("p.txt", "a circle --w abc\n", r"p.txt: bad value"),
    ("p.toml", "[prompt\n", r"p.toml: not valid TOML"),
    ("p.json", "[{", r"p.json: not valid JSON"),
    ("p.json", json.dumps([{"prompt": "x", "sample_sampler": "nope"}]), r"unknown sampler 'nope'"),
])
def test_what_would_fail_mid_run_fails_at_start(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_sample_prompts(path)
