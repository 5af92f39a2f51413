"""Sample prompts' defaults, as sd-scripts' sample_image_inference reads a prompt: sample_steps 30
(prompt_dict.get("sample_steps", 30)), scale 7.5 (prompt_dict.get("scale", 7.5)), no negative prompt; and a .toml
file's [prompt] table holds defaults that each [[prompt.subset]] may override."""

from __future__ import annotations

from lorakit.train.sample_prompts import read_sample_prompts


def test_a_prompt_without_options_takes_sd_scripts_defaults(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    (prompt,) = read_sample_prompts(tmp_path / "p.txt")
    assert (prompt.prompt, prompt.sample_steps, prompt.scale, prompt.negative_prompt) == ("a cat", 30, 7.5, "")


def test_toml_subsets_override_the_prompt_table_defaults(tmp_path):
    (tmp_path / "p.toml").write_text('[prompt]\nwidth = 512\nscale = 5.0\nsample_steps = 20\n'
                                     '[[prompt.subset]]\nprompt = "a dog"\nwidth = 768\n'
                                     '[[prompt.subset]]\nprompt = "a cat"\nscale = 9.0\n')
    dog, cat = read_sample_prompts(tmp_path / "p.toml")
    assert (dog.prompt, dog.width, dog.scale, dog.sample_steps) == ("a dog", 768, 5.0, 20)
    assert (cat.prompt, cat.width, cat.scale, cat.sample_steps) == ("a cat", 512, 9.0, 20)


def test_toml_subsets_without_defaults_take_sd_scripts_defaults(tmp_path):
    (tmp_path / "p.toml").write_text('[prompt]\n[[prompt.subset]]\nprompt = "a dog"\n')
    (dog,) = read_sample_prompts(tmp_path / "p.toml")
    assert (dog.sample_steps, dog.scale) == (30, 7.5)
