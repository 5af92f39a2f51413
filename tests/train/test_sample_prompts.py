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



@pytest.mark.parametrize("name,text,message", [
    ("p.toml", '[prompt]\nsampler = "ddim"\n[[prompt.subset]]\nprompt = "x"\n',
     r"p.toml: unknown key 'sampler'; known: prompt, negative_prompt, width"),
    ("p.json", json.dumps([{"negative_prompt": "blurry"}]), r"p.json: an entry has no prompt"),
    ("p.json", json.dumps([{"prompt": "  "}]), r"p.json: an entry has no prompt"),
    ("p.txt", "# only a comment\n\n", r"p.txt: holds no prompt"),
])
def test_entries_without_a_prompt_or_with_unknown_keys_are_refused_naming_the_file(tmp_path, name, text, message):
    """A misspelt key (which sd-scripts would silently ignore), an entry without a prompt and a file without any
    are errors naming the file, not a KeyError or TypeError from deep inside."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_sample_prompts(path)

def test_txt_flags_in_any_case_as_sd_scripts(tmp_path):
    # sd-scripts' line_to_prompt_dict matches every flag with re.IGNORECASE
    path = tmp_path / "p.txt"
    path.write_text("a red circle --W 96 --H 104 --D 7 --L 5.5 --S 12 --N blurry --SS ddim\n", encoding="utf-8")
    (p,) = read_sample_prompts(path)
    assert (p.prompt, p.width, p.height, p.seed, p.scale, p.sample_steps, p.negative_prompt, p.sample_sampler) \
        == ("a red circle", 96, 104, 7, 5.5, 12, "blurry", "ddim")


def test_txt_steps_clamped_to_1_1000_as_sd_scripts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a --s 0\nb --s 5000\nc --s 1\nd --s 20steps --w 96px\n", encoding="utf-8")
    prompts = read_sample_prompts(path)
    assert [p.sample_steps for p in prompts] == [1, 1000, 1, 20]
    assert prompts[-1].width == 96  # re.match: the value's leading digits, as sd-scripts reads them


@pytest.mark.parametrize("flag", ["--d -1", "--w -64", "--l -2", "--s -3", "--h px96"])
def test_txt_values_sd_scripts_would_ignore_are_errors(tmp_path, flag):
    path = tmp_path / "p.txt"
    path.write_text(f"a circle {flag}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"p.txt: bad value in 'a circle {flag}'.*sd-scripts would ignore"):
        read_sample_prompts(path)


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_toml_json_steps_out_of_range_fail_at_start(tmp_path, steps):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "x", "sample_steps": steps}]), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"p.json: sample_steps must be 1..1000, got {steps}"):
        read_sample_prompts(path)
    path = tmp_path / "p.toml"
    path.write_text(f'[prompt]\nsample_steps = {steps}\n[[prompt.subset]]\nprompt = "x"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"p.toml: sample_steps must be 1..1000, got {steps}"):
        read_sample_prompts(path)


def test_json_list_of_prompt_lines_as_sd_scripts(tmp_path):
    """sd-scripts' load_prompts reads a .json string entry with line_to_prompt_dict; objects and lines may mix."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["a red circle --w 64 --h 72 --d 1 --s 3", {"prompt": "a blue square", "seed": 2},
                                "a cat --n dog"]), encoding="utf-8")
    first, second, third = read_sample_prompts(path)
    assert (first.prompt, first.width, first.height, first.seed, first.sample_steps) == ("a red circle", 64, 72, 1, 3)
    assert (second.prompt, second.seed) == ("a blue square", 2)
    assert (third.prompt, third.negative_prompt) == ("a cat", "dog")
    path.write_text(json.dumps(["a circle --w abc"]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"p.json: bad value in 'a circle --w abc'"):
        read_sample_prompts(path)
    path.write_text(json.dumps([3]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"p.json: expected a prompt object or a prompt line, got 3"):
        read_sample_prompts(path)


def test_txt_flag_without_value_is_left_out_as_sd_scripts(tmp_path):
    """sd-scripts splits a line at every " --" (line_to_prompt_dict) and its "n (.+)" needs a value: a trailing
    "--n" leaves the prompt and sets nothing; a flag inside a word ("--n-dash") is prompt text here."""
    path = tmp_path / "p.txt"
    path.write_text("a cat --n\na cat --n blurry --n\na dog --x\na --n-dash prompt --w 64\n", encoding="utf-8")
    prompts = read_sample_prompts(path)
    assert [(p.prompt, p.negative_prompt) for p in prompts] == [
        ("a cat", ""), ("a cat", "blurry"), ("a dog", ""), ("a --n-dash prompt", "")]
    path.write_text("a cat --w\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"p.txt: bad value in 'a cat --w'.*got ''"):
        read_sample_prompts(path)
