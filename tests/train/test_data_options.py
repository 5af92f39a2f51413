"""Data options of `lorakit train`: cache_text_encoder_outputs_to_disk files against the text encoder itself,
debug_dataset (with the token warmup and an in_json dataset, through the real loader), the dataset TOML keys, and
the refused combinations."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.algos.options import OptionError  # noqa: E402
from lorakit.data.from_config import specs_from_config  # noqa: E402
from lorakit.models.demo_data import write_concept_folder  # noqa: E402
from lorakit.models.load import load_model  # noqa: E402
from lorakit.models.text import encode_prompts  # noqa: E402
from lorakit.train import step as step_module  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.dataset_config import parse_dataset_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402

from .tiny_run import make_base, run_options  # noqa: E402

TAGS = ["t0", "t1", "t2", "t3", "t4", "t5"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("data_options"), images=0)


def _config(base, out, **overrides):
    values = run_options(base, out, dict(network_dim=4, network_alpha=2, learning_rate=1e-2, max_train_steps=2,
                                         caption_extension=".txt"))
    del values["train_data_dir"]  # each test gives its own data
    return load_train_config(overrides={**values, **overrides})


def test_text_encoder_outputs_on_disk_equal_the_encoder(base, tmp_path, monkeypatch):
    folder = write_concept_folder(tmp_path / "data", n=3, repeats=1)
    config = _config(base, tmp_path / "out", train_data_dir=str(tmp_path / "data"), network_train_unet_only=True,
                     cache_text_encoder_outputs_to_disk=True, cache_latents=True)
    assert config.cache_text_encoder_outputs  # implied, as in sd-scripts

    def no_encoding(*args, **kwargs):
        raise AssertionError("the step encoded captions although their outputs are cached on disk")

    real_encode = step_module.encode_prompts
    monkeypatch.setattr(step_module, "encode_prompts", no_encoding)
    assert train(config).is_file()
    monkeypatch.setattr(step_module, "encode_prompts", real_encode)

    model = load_model(base / "sd.safetensors")
    images = sorted(folder.glob("*.png"))
    for image in images:
        npz = folder / f"{image.stem}_te_outputs.npz"
        caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
        with torch.no_grad():
            expected = encode_prompts(model, [caption]).hidden[0]
        with np.load(npz) as data:
            assert torch.allclose(torch.from_numpy(data["hidden_state1"]), expected, atol=1e-6)
            assert "hidden_state2" not in data and "pool2" not in data  # SD1: one encoder, no pooled output

    # a second run reuses the files; an edited caption is encoded again
    stamps = {p: os.stat(folder / f"{p.stem}_te_outputs.npz").st_mtime_ns for p in images}
    images[0].with_suffix(".txt").write_text("something else entirely", encoding="utf-8")
    assert train(_config(base, tmp_path / "out2", train_data_dir=str(tmp_path / "data"),
                         network_train_unet_only=True, cache_text_encoder_outputs_to_disk=True)).is_file()
    after = {p: os.stat(folder / f"{p.stem}_te_outputs.npz").st_mtime_ns for p in images}
    assert after[images[1]] == stamps[images[1]] and after[images[2]] == stamps[images[2]]
    with torch.no_grad():
        expected = encode_prompts(model, ["something else entirely"]).hidden[0]
    with np.load(folder / f"{images[0].stem}_te_outputs.npz") as data:
        assert torch.allclose(torch.from_numpy(data["hidden_state1"]), expected, atol=1e-6)


def _tag_folder(root, repeats=4):
    from PIL import Image

    folder = root / f"{repeats}_tags"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "a.png")
    (folder / "a.txt").write_text(", ".join(TAGS), encoding="utf-8")
    return root


def test_debug_dataset_prints_the_warmed_up_captions_and_trains_nothing(base, tmp_path, capsys):
    data = _tag_folder(tmp_path / "data")
    config = _config(base, tmp_path / "out", train_data_dir=str(data), train_batch_size=1, max_train_steps=8,
                     token_warmup_min=1, token_warmup_step=3, debug_dataset=True, flip_aug=True)
    assert train(config) is None
    out = capsys.readouterr().out
    captions = [json.loads(line.split("caption: ")[1].replace("'", '"')) for line in out.splitlines()
                if "caption: " in line]
    # steps 0, 1, 2, 3: floor(step * (6 - 1) / 3) + 1 tags, then all
    assert captions == [", ".join(TAGS[:n]) for n in (1, 2, 4, 6)]
    assert "batch 4/4" in out and "bucket 64x64" in out and "a.png" in out
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_in_json_dataset_trains_on_the_metadata_captions(base, tmp_path, capsys):
    from PIL import Image

    (tmp_path / "ft").mkdir()
    for name in ("one", "two"):
        Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "ft" / f"{name}.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"one": {"caption": "a photo", "tags": "red, blue"}, "two": {"tags": "green"}}),
                    encoding="utf-8")
    config = _config(base, tmp_path / "out", train_data_dir=str(tmp_path / "ft"), in_json=str(meta),
                     dataset_repeats=2, train_batch_size=1, debug_dataset=True)
    assert train(config) is None
    out = capsys.readouterr().out
    assert "4 batches per epoch" in out
    assert out.count("caption: 'a photo,red, blue'") == 2 and out.count("caption: 'green'") == 2


def test_dataset_config_keys_reach_the_dataset(tmp_path):
    group = parse_dataset_config({
        "general": {"token_warmup_min": 2, "token_warmup_step": 0.5},
        "datasets": [{"resolution": 64, "subsets": [{"image_dir": str(tmp_path), "face_crop_aug_range": "2.0,3.5",
                                                      "cache_info": True}]}]})
    subset = specs_from_config(group)[0].subsets[0]
    assert (subset.token_warmup_min, subset.token_warmup_step) == (2, 0.5)
    assert subset.face_crop_aug_range == (2.0, 3.5) and subset.cache_info


@pytest.mark.parametrize("overrides, words", [
    (dict(cache_text_encoder_outputs_to_disk=True, network_train_unet_only=True, shuffle_caption=True),
     "shuffle_caption"),
    (dict(cache_text_encoder_outputs=True, network_train_unet_only=True, token_warmup_step=10), "token_warmup_step"),
    (dict(cache_text_encoder_outputs_to_disk=True), "network_train_unet_only"),
    (dict(cache_text_encoder_outputs_to_disk=True, network_train_unet_only=True, enable_wildcard=True),
     "enable_wildcard"),
    (dict(face_crop_aug_range="2,4", cache_latents=True), "cache_latents"),
    (dict(face_crop_aug_range="2,4", enable_bucket=True), "enable_bucket"),
    (dict(face_crop_aug_range="0,4"), "0 < low <= high"),
    (dict(face_crop_aug_range="4,2"), "low <= high"),
    (dict(in_json="m.json", reg_data_dir="r"), "reg_data_dir"),
    (dict(in_json="m.json", cache_info=True), "cache_info"),
    (dict(token_warmup_step=-1), "token_warmup_step"),
    (dict(dataset_repeats=0), "dataset_repeats"),
])
def test_refused_combinations(overrides, words):
    values = dict(pretrained_model_name_or_path="m.safetensors", train_data_dir="d", resolution="64")
    values.update(overrides)
    with pytest.raises(OptionError, match=words):
        load_train_config(overrides=values)


@pytest.mark.parametrize("ignored", [dict(train_data_dir="img"), dict(reg_data_dir="reg"),
                                     dict(reg_data_dir="reg", in_json="m.json")])
def test_folder_options_beside_a_dataset_config_are_ignored_with_a_warning(tmp_path, ignored):
    """train_network.py: with a dataset config, train_data_dir / reg_data_dir / in_json are ignored with a warning
    (kohya_ss' GUI and LyCORIS' example configs set train_data_dir next to dataset_config)."""
    dataset = tmp_path / "data.toml"
    dataset.write_text('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "img"\n', encoding="utf-8")
    config = load_train_config(overrides=ignored, dataset_config=dataset)
    assert [s.image_dir for d in config.dataset_group.datasets for s in d.subsets] == ["img"]
    assert any(note.startswith("ignoring the following options because config file is found: "
                               + ", ".join(ignored)) for note in config.warnings)
