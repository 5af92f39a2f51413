"""sd-scripts' dataset TOML: the examples of its docs parse to the values sd-scripts' lookup order gives (subset, else
dataset, else [general], else the training option, else the default); unknown keys and keys at the wrong level are
errors naming where they are and the closest name."""

from __future__ import annotations

import pytest

from lorakit.algos.options import OptionError
from lorakit.train.config import load_train_config
from lorakit.train.dataset_config import (DatasetConfig, DatasetGroupConfig, SubsetConfig, load_dataset_config,
                                          parse_dataset_config)

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

# kohya-ss/sd-scripts docs/config_README-en.md, the first example (DreamBooth and fine-tuning datasets)
DOCS_EXAMPLE = r"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'C:\hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = 'C:\fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'C:\reg'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = 'C:\piyo'
  metadata_file = 'C:\piyo\piyo_md.json'
  # This subset uses keep_tokens = 1 (the value of [general])
"""

# the same docs: one image folder in two datasets at two resolutions is not a duplicate
DOCS_TWO_RESOLUTIONS = r"""
[[datasets]]
resolution = 512

  [[datasets.subsets]]
  image_dir = 'C:\hoge'

[[datasets]]
resolution = 768

  [[datasets.subsets]]
  image_dir = 'C:\hoge'
"""

# the same docs: secondary_separator, wildcards, keep_tokens_separator, caption_prefix/suffix
DOCS_SEPARATORS = r"""
[general]
flip_aug = true
color_aug = false
resolution = [1024, 1024]

[[datasets]]
batch_size = 6
enable_bucket = true
bucket_no_upscale = true
caption_extension = ".txt"
keep_tokens_separator= "|||"
shuffle_caption = true
caption_tag_dropout_rate = 0.1
secondary_separator = ";;;" # subset 側に書くこともできます / can be written in the subset side
enable_wildcard = true # 同上 / same as above

  [[datasets.subsets]]
  image_dir = "/path/to/image_dir"
  num_repeats = 1
  caption_prefix = "1girl, hatsune miku, vocaloid |||"
  caption_suffix = ", anime screencap ||| masterpiece, rating: general"
"""


def parse(text: str, train=None) -> DatasetGroupConfig:
    return parse_dataset_config(tomllib.loads(text), train)


def error_of(text: str, train=None) -> str:
    with pytest.raises(OptionError) as err:
        parse(text, train)
    return str(err.value)


def test_docs_example_resolves_as_sd_scripts():
    group = parse(DOCS_EXAMPLE)
    dreambooth, finetuning = group.datasets
    assert isinstance(dreambooth, DatasetConfig) and isinstance(dreambooth.subsets[0], SubsetConfig)
    assert (dreambooth.kind, dreambooth.resolution, dreambooth.batch_size) == ("dreambooth", (512, 512), 4)
    assert [s.keep_tokens for s in dreambooth.subsets] == [2, 3, 1]  # subset, else dataset
    assert [s.is_reg for s in dreambooth.subsets] == [False, False, True]
    assert [s.class_tokens for s in dreambooth.subsets] == ["hoge girl", "fuga boy", "human"]
    assert [s.image_dir for s in dreambooth.subsets] == ["C:\\hoge", "C:\\fuga", "C:\\reg"]
    assert all(s.caption_extension == ".txt" and s.shuffle_caption for s in dreambooth.subsets)  # [general]
    assert all(s.num_repeats == 1 and not s.flip_aug for s in dreambooth.subsets)  # sd-scripts' defaults
    assert (finetuning.kind, finetuning.resolution, finetuning.batch_size) == ("finetuning", (768, 768), 2)
    (piyo,) = finetuning.subsets
    assert (piyo.metadata_file, piyo.image_dir, piyo.keep_tokens) == ("C:\\piyo\\piyo_md.json", "C:\\piyo", 1)
    assert (dreambooth.enable_bucket, dreambooth.min_bucket_reso, dreambooth.max_bucket_reso) == (False, 256, 1024)


def test_same_folder_in_two_datasets_is_kept():
    group = parse(DOCS_TWO_RESOLUTIONS)
    assert [d.resolution for d in group.datasets] == [(512, 512), (768, 768)]
    assert [d.subsets[0].image_dir for d in group.datasets] == ["C:\\hoge", "C:\\hoge"]


def test_repeated_folder_in_one_dataset_is_dropped_as_in_sd_scripts():
    group = parse("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeats = 2\n"
                  "[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeats = 5\n[[datasets.subsets]]\nimage_dir = 'b'\n")
    assert [(s.image_dir, s.num_repeats) for s in group.datasets[0].subsets] == [("a", 2), ("b", 1)]


def test_subset_with_no_repeats_is_kept_for_validation_as_in_sd_scripts(caplog):
    """sd-scripts' training dataset skips a num_repeats 0 subset but its validation dataset takes its held-out
    images (num_repeats 1 there), so the config keeps it; a dataset of only such subsets is left out."""
    group = parse("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'a'\n[[datasets.subsets]]\n"
                  "image_dir = 'b'\nnum_repeats = 0\n[[datasets]]\nresolution = 64\nnum_repeats = 0\n"
                  "[[datasets.subsets]]\nmetadata_file = 'm.json'\n")
    assert [[(s.image_dir, s.num_repeats) for s in d.subsets] for d in group.datasets] == [[("a", 1), ("b", 0)]]
    assert "[[datasets]] #2: every subset has num_repeats 0; the dataset is left out" in caplog.text


def test_zero_repeat_subset_never_hides_a_training_subset_of_the_same_folder():
    """sd-scripts' training dataset skips the 0-repeat subset before it looks for duplicates."""
    group = parse("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeats = 0\n"
                  "[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeats = 5\n")
    assert [(s.image_dir, s.num_repeats) for s in group.datasets[0].subsets] == [("a", 5)]


def test_docs_separator_example_parses():
    (dataset,) = parse(DOCS_SEPARATORS).datasets
    (subset,) = dataset.subsets
    assert (dataset.resolution, dataset.batch_size, dataset.enable_bucket, dataset.bucket_no_upscale) == \
        ((1024, 1024), 6, True, True)
    assert (subset.flip_aug, subset.color_aug, subset.shuffle_caption, subset.caption_tag_dropout_rate) == \
        (True, False, True, 0.1)
    assert subset.caption_extension == ".txt"
    assert (subset.keep_tokens_separator, subset.secondary_separator, subset.enable_wildcard) == ("|||", ";;;", True)
    assert subset.caption_prefix == "1girl, hatsune miku, vocaloid |||"
    assert subset.caption_suffix == ", anime screencap ||| masterpiece, rating: general"


def test_caption_options_reach_the_dataset_specs():
    from lorakit.data.from_config import specs_from_config

    (spec,) = specs_from_config(parse(DOCS_SEPARATORS))
    (subset,) = spec.subsets
    assert (subset.keep_tokens_separator, subset.secondary_separator, subset.enable_wildcard) == ("|||", ";;;", True)
    assert subset.caption_prefix.startswith("1girl") and subset.caption_suffix.endswith("rating: general")


def test_mask_selection_and_validation_keys_reach_the_dataset_specs():
    from lorakit.data.from_config import specs_from_config

    group = parse("[general]\nresize_interpolation = 'bicubic'\n[[datasets]]\nresolution = 512\n"
                  "skip_image_resolution = '256,320'\nvalidation_split = 0.2\nvalidation_seed = 9\n"
                  "[[datasets.subsets]]\nimage_dir = 'a'\nalpha_mask = true\n[[datasets.subsets]]\n"
                  "image_dir = 'b'\nconditioning_data_dir = 'b_masks'\nresize_interpolation = 'box'\n")
    (spec,) = specs_from_config(group)
    assert (spec.skip_image_resolution, spec.validation_split, spec.validation_seed) == ((256, 320), 0.2, 9)
    a, b = spec.subsets
    assert (a.alpha_mask, a.resize_interpolation, a.conditioning_data_dir) == (True, "bicubic", None)
    assert (b.alpha_mask, b.resize_interpolation, b.conditioning_data_dir) == (False, "box", "b_masks")


def test_training_options_are_the_last_fallback(tmp_path):
    path = tmp_path / "data.toml"
    path.write_text("[general]\nshuffle_caption = false\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n"
                    "[[datasets.subsets]]\nimage_dir = 'b'\nflip_aug = false\nnum_repeats = 3\n")
    config = load_train_config(overrides={"flip_aug": True, "shuffle_caption": True, "train_batch_size": 3,
                                          "resolution": "640,512", "caption_extension": ".txt",
                                          "prior_loss_weight": 0.5}, dataset_config=path)
    (dataset,) = config.dataset_group.datasets
    assert (dataset.batch_size, dataset.resolution, dataset.prior_loss_weight) == (3, (640, 512), 0.5)
    a, b = dataset.subsets
    assert (a.flip_aug, b.flip_aug) == (True, False)  # the file wins over the command line
    assert (a.shuffle_caption, a.caption_extension, a.num_repeats, b.num_repeats) == (False, ".txt", 1, 3)
    assert load_dataset_config(path, config) == config.dataset_group


def test_cache_latents_is_checked_against_each_subset(tmp_path):
    path = tmp_path / "data.toml"
    path.write_text("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'a'\n"
                    "[[datasets.subsets]]\nimage_dir = 'b'\nrandom_crop = true\n")
    with pytest.raises(OptionError, match=r"cache_latents .* and random_crop \(in dataset config \[\[datasets\]\] #1 "
                                          r"\[\[datasets.subsets\]\] #2\)"):
        load_train_config(overrides={"cache_latents": True}, dataset_config=path)
    path.write_text("[[datasets]]\nresolution = 512\nshuffle_caption = true\n[[datasets.subsets]]\nimage_dir = 'a'\n")
    with pytest.raises(OptionError, match="cache_text_encoder_outputs and shuffle_caption"):
        load_train_config(overrides={"cache_text_encoder_outputs": True, "network_train_unet_only": True},
                          dataset_config=path)


def test_masked_loss_needs_masks_in_some_subset_not_every_one(tmp_path):
    """masked_loss is refused only when no subset can give a mask (conditioning_data_dir or alpha_mask): a dataset
    config may mix masked subsets with plain ones."""
    path = tmp_path / "data.toml"
    path.write_text("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'a'\nalpha_mask = true\n"
                    "[[datasets.subsets]]\nimage_dir = 'b'\n")
    assert load_train_config(overrides={"masked_loss": True}, dataset_config=path).masked_loss
    path.write_text("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'b'\n")
    with pytest.raises(OptionError, match="masked_loss needs the masks: conditioning_data_dir .* or alpha_mask in the "
                                          "dataset config's subsets"):
        load_train_config(overrides={"masked_loss": True}, dataset_config=path)


def test_json_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"general": {"flip_aug": true}, "datasets": [{"resolution": [512, 640], '
                    '"subsets": [{"image_dir": "a", "num_repeats": 10}]}]}')
    group = load_dataset_config(path)
    assert group.source == str(path) and group.datasets[0].resolution == (512, 640)
    assert group.datasets[0].subsets[0].flip_aug and group.datasets[0].subsets[0].num_repeats == 10


SUBSET = "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'a'\n"


@pytest.mark.parametrize("text,message", [
    (SUBSET + "flip_augs = true\n", "[[datasets]] #1 [[datasets.subsets]] #1: unknown key 'flip_augs' "
     "(did you mean 'flip_aug'?)"),
    (SUBSET + "num_repeat = 3\n", "unknown key 'num_repeat' (did you mean 'num_repeats'?)"),
    ("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dirr = 'a'\n", "did you mean 'image_dir'?"),
    ("[general]\nresolutoin = 512\n" + SUBSET, "[general]: unknown key 'resolutoin' (did you mean 'resolution'?)"),
    ("[[dataset]]\nresolution = 512\n", "unknown top-level key 'dataset' (did you mean 'datasets'?)"),
    ("[general]\nimage_dir = 'a'\n" + SUBSET, "[general]: 'image_dir' cannot be set here; it belongs in "
     "[[datasets.subsets]]"),
    (SUBSET + "batch_size = 2\n", "'batch_size' cannot be set here; it belongs in [general] or [[datasets]]"),
    (SUBSET + "num_repeats = 'ten'\n", "option 'num_repeats': expected an integer"),
    (SUBSET + "num_repeats = -1\n", "option 'num_repeats': expected a value >= 0"),
    (SUBSET + "num_repeats = 0\n", "every subset has num_repeats 0; no images to train"),
    (SUBSET + "caption_dropout_rate = 1.5\n", "expected a value in [0, 1]"),
    (SUBSET + "flip_aug = 'sometimes'\n", "expected a boolean"),
    ("[[datasets]]\nresolution = [512, 512, 3]\n[[datasets.subsets]]\nimage_dir = 'a'\n", "expected a size"),
    ("[general]\nflip_aug = true\n", "needs at least one [[datasets]]"),
    ("[[datasets]]\nresolution = 512\n", "[[datasets]] #1: needs at least one [[datasets.subsets]]"),
    ("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nclass_tokens = 'x'\n", "image_dir is required"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n", "resolution is required"),
    (SUBSET + "[[datasets.subsets]]\nmetadata_file = 'm.json'\n", "cannot be mixed in one dataset"),
    ("[[datasets]]\ncaption_extension = '.txt'\n[[datasets.subsets]]\nmetadata_file = 'm.json'\n",
     "'caption_extension' is for DreamBooth subsets"),
    ("[[datasets]]\nresolution = 2048\nenable_bucket = true\n[[datasets.subsets]]\nimage_dir = 'a'\n",
     "must lie within min_bucket_reso 256 .. max_bucket_reso 1024"),
    (SUBSET + "custom_attributes = {a = 1}\n", "'custom_attributes' = {'a': 1} is an sd-scripts option "
     "lorakit does not support yet"),
    ("[[datasets]]\nresolution = 512\nnetwork_multiplier = 0.5\n[[datasets.subsets]]\nimage_dir = 'a'\n",
     "'network_multiplier' = 0.5 is an sd-scripts option lorakit does not support yet"),
    ("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'a'\nresize_interpolation = 'cubical'\n",
     "[[datasets]] #1 [[datasets.subsets]] #1: option 'resize_interpolation': 'cubical' is not one of"),
    ("[[datasets]]\nresolution = 512\nalpha_mask = true\n[[datasets.subsets]]\nimage_dir = 'a'\n",
     "'alpha_mask' cannot be set here"),
])
def test_bad_dataset_configs_name_the_place_and_the_key(text, message):
    assert message in error_of(text)


def test_a_dataset_may_set_min_bucket_reso_equal_to_max_bucket_reso_as_sd_scripts():
    """sd-scripts' dataset asserts min(resolution) >= min_bucket_reso and max(resolution) <= max_bucket_reso (each
    "equal or"): min = max = resolution in a [[datasets]] is one bucket, and valid; only min above max is refused."""
    def bucketed(low: int) -> str:
        return (f"[[datasets]]\nresolution = 512\nenable_bucket = true\nmin_bucket_reso = {low}\n"
                "max_bucket_reso = 512\n[[datasets.subsets]]\nimage_dir = 'a'\n")

    (dataset,) = parse(bucketed(512)).datasets
    assert (dataset.min_bucket_reso, dataset.max_bucket_reso) == (512, 512)
    assert "[[datasets]] #1: min_bucket_reso 576 > max_bucket_reso 512" in error_of(bucketed(576))


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(OptionError, match="dataset config file not found"):
        load_dataset_config(tmp_path / "none.toml")
    (tmp_path / "folder.toml").mkdir()
    with pytest.raises(OptionError, match="folder.toml: is a folder, expected a .toml or .json file"):
        load_dataset_config(tmp_path / "folder.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[[datasets]\n")
    with pytest.raises(OptionError, match="not valid TOML"):
        load_dataset_config(broken)
    with pytest.raises(OptionError, match="dataset config file not found"):
        load_train_config(dataset_config=tmp_path / "none.toml")


@pytest.mark.parametrize("name", ["data.yaml", "data.txt"])
def test_other_file_formats_are_refused_as_in_sd_scripts(tmp_path, name):
    """sd-scripts' load_user_config reads .toml and .json only ("not supported config file format")."""
    path = tmp_path / name
    path.write_text("datasets:\n  - resolution: 64\n    subsets:\n      - image_dir: imgs\n")
    with pytest.raises(OptionError, match=rf"{name}: not supported config file format \(sd-scripts reads \.toml and "
                                          r"\.json files only\)"):
        load_dataset_config(path)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(OptionError, match=r"broken\.json: not valid JSON"):
        load_dataset_config(broken)


def test_upper_case_suffixes_are_read_as_in_sd_scripts(tmp_path):
    """sd-scripts' load_user_config tests file.name.lower() for .json and .toml: data.TOML and data.JSON load."""
    toml_path, json_path = tmp_path / "data.TOML", tmp_path / "data.JSON"
    toml_path.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'a'\n")
    json_path.write_text('{"datasets": [{"resolution": 64, "subsets": [{"image_dir": "a"}]}]}')
    for path in (toml_path, json_path):
        assert load_dataset_config(path).datasets[0].subsets[0].image_dir == "a"


def test_errors_inside_datasets_name_the_file(tmp_path):
    path = tmp_path / "ds.toml"
    path.write_text('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "x"\nnum_repeat = 2\n')
    with pytest.raises(OptionError, match=r"dataset config .*ds\.toml \[\[datasets\]\] #1 \[\[datasets\.subsets\]\] #1: "
                                          r"unknown key 'num_repeat' \(did you mean 'num_repeats'\?\)"):
        load_dataset_config(path)
