"""dataset_repeats is the command-line fallback of a dataset config's num_repeats, as train_batch_size is of
batch_size: sd-scripts' ConfigSanitizer.ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME = {"train_batch_size": "batch_size",
"dataset_repeats": "num_repeats"}, and a subset's own value, then [[datasets]], then [general] come first."""

from __future__ import annotations

from lorakit.train.config import load_train_config
from lorakit.train.dataset_config import parse_dataset_config


def test_dataset_repeats_fills_num_repeats_of_a_subset_without_one():
    group = parse_dataset_config({"datasets": [{"resolution": 64, "subsets": [
        {"image_dir": "a"}, {"image_dir": "b", "num_repeats": 5}]}]},
        train={"dataset_repeats": 3, "train_batch_size": 2})
    (dataset,) = group.datasets
    assert dataset.batch_size == 2
    assert [s.num_repeats for s in dataset.subsets] == [3, 5]


def test_general_num_repeats_comes_before_dataset_repeats():
    group = parse_dataset_config({"general": {"num_repeats": 2}, "datasets": [{"resolution": 64, "subsets": [
        {"image_dir": "a"}]}]}, train={"dataset_repeats": 3})
    assert group.datasets[0].subsets[0].num_repeats == 2


def test_dataset_repeats_on_the_command_line_reaches_the_dataset_config(tmp_path):
    path = tmp_path / "data.toml"
    path.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'a'\n")
    config = load_train_config(overrides=["--dataset_repeats", "4"], dataset_config=path)
    assert config.dataset_group.datasets[0].subsets[0].num_repeats == 4
