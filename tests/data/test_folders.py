"""kohya's N_concept folders, regularization balancing and metadata files, with named errors."""

from __future__ import annotations

import json

import pytest

from lorakit.data.dataset import TrainDataset
from lorakit.data.errors import DatasetError
from lorakit.data.folders import parse_concept_folder, subset_images, subsets_from_folders
from lorakit.data.spec import DatasetSpec, SubsetSpec


@pytest.mark.parametrize("name, expected", [
    ("10_sks dog", (10, "sks dog")), ("3_sks_dog", (3, "sks_dog")), ("1_", (1, "")), ("5", (5, "")),
])
def test_parse_concept_folder(name, expected):
    assert parse_concept_folder(name) == expected


def test_folder_without_number(tmp_path):
    with pytest.raises(DatasetError, match=r"dog: a concept folder name must start with its number of repeats.*10_dog"):
        parse_concept_folder(tmp_path / "dog")


def test_subsets_from_folders(tmp_path, image_factory):
    image_factory("train/10_sks dog/a.png", caption="sks dog, grass")
    image_factory("train/2_cat/b.png")
    image_factory("train/.hidden/c.png")
    image_factory("train/0_off/d.png")
    image_factory("reg/1_dog/r.png")
    subsets = subsets_from_folders(tmp_path / "train", tmp_path / "reg", caption_extension="txt", flip_aug=True)
    got = [(s.image_dir.split("/")[-1], s.num_repeats, s.class_tokens, s.is_reg, s.caption_extension, s.flip_aug)
           for s in subsets]
    assert got == [("10_sks dog", 10, "sks dog", False, ".txt", True), ("2_cat", 2, "cat", False, ".txt", True),
                   ("1_dog", 1, "dog", True, ".txt", True)]
    images = subset_images(subsets[0]) + subset_images(subsets[1])
    assert [(i.path.split("/")[-1], i.caption) for i in images] == [("a.png", "sks dog, grass"), ("b.png", "cat")]


def test_folder_errors(tmp_path, image_factory):
    with pytest.raises(DatasetError, match=r"nowhere: train_data_dir is not a folder \(it does not exist\)"):
        subsets_from_folders(tmp_path / "nowhere")
    image_factory("flat/a.png")
    with pytest.raises(DatasetError, match=r"flat: train_data_dir has no concept folders.*holds images directly"):
        subsets_from_folders(tmp_path / "flat")
    (tmp_path / "ignored" / "backup").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"ignored: train_data_dir has no concept folders"):
        subsets_from_folders(tmp_path / "ignored")
    (tmp_path / "empty" / "3_x").mkdir(parents=True)
    (tmp_path / "empty" / "3_x" / "notes.txt").write_text("no images here")
    assert subset_images(subsets_from_folders(tmp_path / "empty")[0]) == []
    with pytest.raises(DatasetError, match="the dataset is empty"):
        TrainDataset(DatasetSpec(subsets_from_folders(tmp_path / "empty"), resolution=64))
    with pytest.raises(DatasetError, match=r"missing: image_dir is not a folder"):
        subset_images(SubsetSpec(image_dir=str(tmp_path / "missing")))


def test_folders_without_repeats_are_ignored_with_a_warning(tmp_path, image_factory, caplog):
    """sd-scripts' config_util (extract_dreambooth_params): "ignore directory without repeats", and the others
    train; the warning says whether the folder held images that are now left out."""
    image_factory("mixed/5_ok/a.png")
    image_factory("mixed/my concept/b.png")
    (tmp_path / "mixed" / "backup").mkdir()
    subsets = subsets_from_folders(tmp_path / "mixed")
    assert [s.image_dir.split("/")[-1] for s in subsets] == ["5_ok"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert "ignore directory without repeats" in warnings[0] and "backup (no images;" in warnings[0]
    assert "my concept (its 1 image(s) are not trained; " in warnings[1] and "like 10_my concept" in warnings[1]


def test_a_dangling_image_link_is_left_out_with_a_warning_naming_it(tmp_path, image_factory, caplog):
    """A link whose target is gone is no image file: it is left out, and the warning names it (sd-scripts lists
    it and fails when it reads its size)."""
    image_factory("data/2_x/a.png")
    broken = tmp_path / "data" / "2_x" / "broken.png"
    broken.symlink_to(tmp_path / "nowhere.png")
    images = subset_images(subsets_from_folders(tmp_path / "data")[0])
    assert [i.path.split("/")[-1] for i in images] == ["a.png"]
    assert any(r.levelname == "WARNING" and "1 image(s) are not readable files" in r.getMessage()
               and str(broken) in r.getMessage() for r in caplog.records)


def test_regularization_balanced_like_kohya(tmp_path, image_factory):
    # 2 training images x 5 repeats = 10. Reg: 3 images x 1 repeat. kohya: first round adds r0, r1, r2 (n = 3),
    # then one more repeat per image in order until n = 10: r0 +3, r1 +2, r2 +2 -> repeats 4, 3, 3.
    for name in ("t0", "t1"):
        image_factory(f"train/5_sks/{name}.png")
    for name in ("r0", "r1", "r2"):
        image_factory(f"reg/1_dog/{name}.png")
    spec = DatasetSpec(subsets_from_folders(tmp_path / "train", tmp_path / "reg"), resolution=64,
                       prior_loss_weight=0.5)
    ds = TrainDataset(spec, reso_multiple=64)
    assert [(e.path.split("/")[-1], e.repeats, e.is_reg) for e in ds.entries] == [
        ("t0.png", 5, False), ("t1.png", 5, False), ("r0.png", 4, True), ("r1.png", 3, True), ("r2.png", 3, True)]
    assert (ds.num_train_images, ds.num_reg_images) == (10, 3)
    # More reg images than training samples: those past the count are left out (kohya: "some are not used").
    image_factory("few/1_a/t.png")
    spec = DatasetSpec(subsets_from_folders(tmp_path / "few", tmp_path / "reg"), resolution=64)
    assert [e.path.split("/")[-1] for e in TrainDataset(spec).entries] == ["t.png", "r0.png"]


def test_only_regularization_is_empty(tmp_path, image_factory):
    image_factory("reg/1_dog/r.png")
    spec = DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "reg/1_dog"), is_reg=True)], resolution=64)
    with pytest.raises(DatasetError, match="the dataset is empty"):
        TrainDataset(spec)


def test_metadata_file(tmp_path, image_factory):
    image_factory("imgs/a.png")
    image_factory("imgs/b.jpg")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "a cat", "tags": "red, small"}, "b": {"tags": "dog"}}))
    images = subset_images(SubsetSpec(image_dir=str(tmp_path / "imgs"), metadata_file=str(meta)))
    assert [(i.path.split("/")[-1], i.caption) for i in images] == [("a.png", "a cat,red, small"), ("b.jpg", "dog")]
    meta.write_text(json.dumps({"c": {"caption": "x"}}))
    with pytest.raises(DatasetError, match=r"meta\.json: image 'c' not found"):
        subset_images(SubsetSpec(image_dir=str(tmp_path / "imgs"), metadata_file=str(meta)))
    meta.write_text("{broken")
    with pytest.raises(DatasetError, match=r"meta\.json: metadata_file is not valid JSON \(line 1"):
        subset_images(SubsetSpec(image_dir=str(tmp_path / "imgs"), metadata_file=str(meta)))


def test_metadata_tags_with_wildcards_go_on_every_caption_line_and_are_what_tag_frequency_counts(tmp_path,
                                                                                                   image_factory):
    """sd-scripts' FineTuningDataset: with enable_wildcard the tags (made one line) follow every non-blank caption
    line, so each drawn line trains with them; ss_tag_frequency of a metadata subset counts its tags only."""
    image_factory("imgs/a.png")
    image_factory("imgs/b.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "a photo of sks\n\nsks standing", "tags": "red hat,\nsmile"},
                                "b": {"caption": "a dog", "tags": "Smile"}}))
    wild = SubsetSpec(image_dir=str(tmp_path / "imgs"), metadata_file=str(meta), enable_wildcard=True)
    assert [i.caption for i in subset_images(wild)] == ["a photo of sks,red hat,,smile\nsks standing,red hat,,smile",
                                                        "a dog,Smile"]
    plain = SubsetSpec(image_dir=str(tmp_path / "imgs"), metadata_file=str(meta))
    assert [i.caption for i in subset_images(plain)][1] == "a dog,Smile"
    ds = TrainDataset(DatasetSpec([plain], resolution=64))
    assert ds.tag_frequency == {"meta.json": {"red hat": 1, "smile": 2}}


def test_bad_caption_stops_the_build(tmp_path, image_factory):
    path, _ = image_factory("train/1_x/a.png")
    (tmp_path / "train/1_x/a.txt").write_bytes(b"\xff\xfeb\x00a\x00d\x00")  # UTF-16
    spec = DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "train/1_x"), caption_extension=".txt")], resolution=64)
    with pytest.raises(DatasetError, match=r"1_x/a\.txt: caption file is not UTF-8"):
        TrainDataset(spec)


def test_duplicate_subset(tmp_path, image_factory):
    image_factory("d/a.png")
    s = SubsetSpec(image_dir=str(tmp_path / "d"))
    with pytest.raises(DatasetError, match="listed twice"):
        TrainDataset(DatasetSpec([s, SubsetSpec(image_dir=str(tmp_path / "d") + "/")], resolution=64))


def test_an_empty_concept_folder_is_left_out_with_a_warning(tmp_path, image_factory, caplog):
    """sd-scripts logs "ignore subset ... no images found" and trains the other folders."""
    image_factory("train/2_cat/a.png")
    (tmp_path / "train" / "3_empty").mkdir()
    ds = TrainDataset(DatasetSpec(subsets_from_folders(tmp_path / "train"), resolution=64))
    assert [s.image_dir.rsplit("/", 1)[1] for s in ds.subsets] == ["2_cat"] and ds.image_counts == [1]
    assert "3_empty: no images in this folder" in caplog.text and "left out" in caplog.text


def test_metadata_of_a_fine_tuning_subset_is_written_as_sd_scripts_writes_it(tmp_path, image_factory):
    """train_network.py: a metadata_file subset has image_dir and metadata_file (no class_tokens, is_reg), and
    its ss_dataset_dirs entry is named by the metadata file."""
    from lorakit.train.metadata import _dataset_dirs

    image_factory("imgs/a.png")
    meta = tmp_path / "piyo_md.json"
    meta.write_text(json.dumps({"a": {"caption": "a cat"}}))
    ds = TrainDataset(DatasetSpec([SubsetSpec(image_dir=str(tmp_path / "imgs"), metadata_file=str(meta))],
                                  resolution=64))
    (subset,) = ds.datasets_metadata()[0]["subsets"]
    assert subset["image_dir"] == "imgs" and subset["metadata_file"] == "piyo_md.json"
    assert "class_tokens" not in subset and "is_reg" not in subset
    assert _dataset_dirs(ds, reg=False) == {"piyo_md.json": {"n_repeats": 1, "img_count": 1}}
