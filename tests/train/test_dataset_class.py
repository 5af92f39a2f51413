"""dataset_class: a user's class serving whole batches (sd-scripts' MinimalDataset contract).

The reference is the folder dataset: a class that hands the trainer the very batches a train_data_dir run trains on
(same images, captions, order and seed) must give bit-identical adapter weights, through images (SD1 and SDXL) and
through latents (against a run with cached latents). Then the counters the class sees, its shuffled batch order,
exact resume, debug_dataset, metadata, and an error naming the option for each kind of bad class or batch."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.algos.options import OptionError  # noqa: E402
from lorakit.data import SampleKey, TrainDataset, cache_latents  # noqa: E402
from lorakit.data.custom_batches import CustomBatches  # noqa: E402
from lorakit.data.custom_dataset import load_dataset_class, make_dataset  # noqa: E402
from lorakit.data.errors import DatasetError  # noqa: E402
from lorakit.data.from_config import specs_from_folders  # noqa: E402
from lorakit.formats.safetensors_io import load_file, read_metadata  # noqa: E402
from lorakit.models.load import load_model  # noqa: E402
from lorakit.models.text import tokenize  # noqa: E402
from lorakit.models.tokenizer import tokenizers_for  # noqa: E402
from lorakit.train.checks import check_runnable  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.options import NOT_YET_SUPPORTED  # noqa: E402
from lorakit.train.run import train  # noqa: E402

from .test_run import base  # noqa: E402,F401  (the shared model/data fixture)

HERE = Path(__file__).parent
STEPS = 5  # 6 images, 2 per batch: 3 batches per epoch, so the run crosses into epoch 2


@pytest.fixture
def helpers(base, monkeypatch):
    """The helper module, importable as 'dataset_class_helpers', its classes reading the test folder."""
    monkeypatch.syspath_prepend(str(HERE))
    module = importlib.import_module("dataset_class_helpers")
    monkeypatch.setattr(module.FolderBatches, "folder", str(base / "data" / "1_magenta"))
    monkeypatch.setattr(module.FolderBatches, "calls", [])
    return module


def _common(base, out, model="sd", **overrides):
    values = dict(pretrained_model_name_or_path=str(base / f"{model}.safetensors"), output_dir=str(out),
                  output_name="t", network_dim=4, network_alpha=2, learning_rate=1e-2, max_train_steps=STEPS, seed=3,
                  max_data_loader_n_workers=0, optimizer_type="AdamW", lr_scheduler="cosine", network_dropout=0.1)
    if model == "sdxl":
        values.update(network_train_unet_only=True, max_train_steps=2)
    values.update(overrides)
    return values


def _folder(base, out, model="sd", **overrides):
    return load_train_config(overrides=_common(base, out, model, train_data_dir=str(base / "data"), resolution="64",
                                               train_batch_size=2, caption_extension=".txt", **overrides))


def _custom(base, out, name, model="sd", **overrides):
    return load_train_config(overrides=_common(base, out, model, dataset_class=f"dataset_class_helpers.{name}",
                                               **overrides))


def _folder_schedule(config, steps):
    """The file names of each batch the folder run trains on, step by step (its own order: TrainDataset's)."""
    ds = TrainDataset(specs_from_folders(config), seed=config.seed)
    names, epoch = [], 1
    while len(names) < steps:
        names += [[Path(ds.entries[k.index].path).name for k in batch] for batch in ds.batches(epoch)]
        epoch += 1
    return names[:steps]


def _tensors(path):
    return load_file(path)[0]


def _assert_same(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@pytest.mark.parametrize("model,workers", [("sd", 0), ("sdxl", 0), ("sd", 2)])
def test_same_batches_give_the_same_adapter_as_the_folder_run(base, helpers, tmp_path, monkeypatch, model, workers):
    """With workers, the class's copies in the worker processes must see the right counters (persistent: kept
    from epoch 1 into epoch 2)."""
    folder_config = _folder(base, tmp_path / "folder", model)
    schedule = _folder_schedule(folder_config, folder_config.max_train_steps)
    monkeypatch.setattr(helpers.FolderRunOrder, "schedule", schedule)
    reference = train(folder_config)
    loader = dict(max_data_loader_n_workers=workers, persistent_data_loader_workers=workers > 0)
    custom = train(_custom(base, tmp_path / "custom", "FolderRunOrder", model, **loader))
    ups = [v for k, v in _tensors(custom).items() if k.endswith("lora_up.weight")]
    assert any(u.abs().sum() > 0 for u in ups)  # it trained, so equality below says something
    _assert_same(reference, custom)
    if workers:
        return  # the calls below were recorded in the worker processes
    # the class served exactly the folder run's batches: one per step, at the step the trainer said
    gets = [c for c in helpers.FolderBatches.calls if c[0] == "get"]
    assert [c[2] for c in gets] == list(range(folder_config.max_train_steps))
    init = helpers.FolderBatches.calls[0]
    if model == "sd":  # sd-scripts' arguments: one tokenizer for SD1/SD2, the list of both for SDXL
        assert type(init[1]).__name__.startswith("CLIPTokenizer")
    else:
        assert isinstance(init[1], list) and len(init[1]) == 2
    assert init[2:] == (None, None, False)


def test_latents_enter_unscaled_like_cached_latents(base, helpers, tmp_path, monkeypatch):
    """'latents' are the VAE's output before scaling_factor (sd-scripts multiplies them): a class returning the
    folder run's cached latents trains exactly as that run."""
    folder_config = _folder(base, tmp_path / "folder", cache_latents=True)
    vae_model = load_model(base / "sd.safetensors")
    dataset = TrainDataset(specs_from_folders(folder_config), seed=folder_config.seed)
    cache_latents(dataset, vae_model.vae)
    monkeypatch.setattr(helpers.FolderRunOrder, "schedule", _folder_schedule(folder_config, STEPS))
    monkeypatch.setattr(helpers.FolderRunLatents, "latents",
                        {Path(e.path).name: e.latents for e in dataset.entries})
    reference = train(folder_config)
    custom = train(_custom(base, tmp_path / "custom", "FolderRunLatents"))
    _assert_same(reference, custom)


def test_counters_order_resume_and_metadata(base, helpers, tmp_path):
    full = train(_custom(base, tmp_path / "full", "FolderBatches"))
    calls = list(helpers.FolderBatches.calls)
    assert ("max_train_steps", STEPS) in calls
    gets = [c[1:] for c in calls if c[0] == "get"]  # (epoch, step, index)
    assert [(e, s) for e, s, _ in gets] == [(1, 0), (1, 1), (1, 2), (2, 3), (2, 4)]
    assert sorted(i for e, _, i in gets if e == 1) == [0, 1, 2]  # each batch once per epoch
    meta = read_metadata(full)
    assert (meta["ss_num_train_images"], meta["ss_num_batches_per_epoch"]) == ("6", "3")
    assert (meta["ss_steps"], meta["ss_epoch"]) == ("5", "2")
    assert json.loads(meta["ss_dataset_dirs"]) == {} and json.loads(meta["ss_tag_frequency"]) == {}

    helpers.FolderBatches.calls.clear()
    assert train(_custom(base, tmp_path / "part", "FolderBatches"), stop_at_step=2) is None
    resumed = train(_custom(base, tmp_path / "part", "FolderBatches",
                            resume=str(tmp_path / "part" / "t-step00000002-state")))
    again = [c[1:] for c in helpers.FolderBatches.calls if c[0] == "get"]
    assert again == gets  # the resumed run asks for the batches (and tells the counters) of the uninterrupted one
    _assert_same(full, resumed)


def test_batch_order_is_shuffled_per_epoch_and_covers_every_batch():
    class Eight:
        def __len__(self):
            return 8

    batches = CustomBatches(Eight(), "x.Eight", tokenizers=[], seed=5)
    orders = [[b[0].index for b in batches.batches(epoch)] for epoch in range(1, 7)]
    assert all(sorted(o) == list(range(8)) for o in orders)
    assert len({tuple(o) for o in orders}) > 1 and any(o != list(range(8)) for o in orders)
    assert [b[0].batch for b in batches.batches(3)] == list(range(8))
    assert CustomBatches(Eight(), "x.Eight", tokenizers=[], seed=5).batches(2) == batches.batches(2)  # repeatable
    batches.set_schedule(20, gradient_accumulation_steps=3)  # 8 batches -> 3 optimizer steps per epoch
    assert batches.optimizer_step(SampleKey(0, 2, 7, 0)) == 3 + 2


def test_debug_dataset_prints_the_class_batches(base, helpers, tmp_path, capsys):
    assert train(_custom(base, tmp_path, "FolderBatches", debug_dataset=True, resolution="64")) is None
    out = capsys.readouterr().out
    assert "debug_dataset: dataset_class dataset_class_helpers.FolderBatches: 6 training images" in out
    assert "3 batches per epoch" in out
    caption = (base / "data" / "1_magenta" / "0000.txt").read_text().strip()
    assert "0000.png: size 64x64" in out and repr(caption) in out
    assert helpers.FolderBatches.calls[0][3:] == ((64, 64), True)
    assert not list(tmp_path.glob("*.safetensors"))


# --- bad classes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,message", [
    ("NoDot", "expected 'module.ClassName'"),
    ("no_such_module_for_lorakit.Batches", "cannot import module 'no_such_module_for_lorakit'"),
    ("dataset_class_helpers.Missing", "module 'dataset_class_helpers' has no 'Missing'"),
    ("dataset_class_helpers.NOT_A_CLASS", "'NOT_A_CLASS' in module 'dataset_class_helpers' is a int, not a class"),
])
def test_bad_class_paths_name_the_option(helpers, name, message):
    with pytest.raises(DatasetError) as err:
        load_dataset_class(name)
    assert f"dataset_class {name!r}" in str(err.value) and message in str(err.value)


def test_a_module_failing_to_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_batches_module.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DatasetError, match="importing module 'broken_batches_module' failed: RuntimeError: boom"):
        load_dataset_class("broken_batches_module.Batches")


@pytest.mark.parametrize("name,message", [
    ("FailingInit", "FailingInit(tokenizer, max_token_length, resolution, debug_dataset) failed: ValueError: no data"),
    ("NoLength", "len() of NoLength failed (NotImplementedError"),
    ("NoBatches", "NoBatches has 0 batches"),
])
def test_bad_classes_name_the_option(helpers, name, message):
    cls = load_dataset_class(f"dataset_class_helpers.{name}")
    with pytest.raises(DatasetError) as err:
        make_dataset(cls, f"dataset_class_helpers.{name}", None, None, None, False)
    assert f"dataset_class 'dataset_class_helpers.{name}'" in str(err.value) and message in str(err.value)


def test_a_wrong_class_path_stops_training_before_the_model_loads(base, tmp_path, monkeypatch):
    import lorakit.train.run as run

    monkeypatch.setattr(run._Run, "_load_model", lambda self: pytest.fail("the model was loaded"))
    with pytest.raises(DatasetError, match="dataset_class 'nowhere_module.Batches': cannot import"):
        train(load_train_config(overrides=_common(base, tmp_path, dataset_class="nowhere_module.Batches")))


def test_a_failing_getitem_is_named(helpers):
    cls = load_dataset_class("dataset_class_helpers.BrokenGetitem")
    dataset = make_dataset(cls, "h.BrokenGetitem", None, None, None, False)
    with pytest.raises(DatasetError, match=r"dataset_class 'h.BrokenGetitem': batch 0: __getitem__ failed: KeyError"):
        CustomBatches(dataset, "h.BrokenGetitem", tokenizers=[])[SampleKey(0, 1, 0, 0)]


# --- bad batches ------------------------------------------------------------------------------------------------

class _One:
    def __len__(self):
        return 1


def _batches(kind="sd1", **options):
    return CustomBatches(_One(), "m.Batches", tokenizers=tokenizers_for(kind), **options)


def _image(n=1, size=64):
    return torch.rand(n, 3, size, size) * 2 - 1


KEY = SampleKey(0, 1, 0, 0)


@pytest.mark.parametrize("raw,message", [
    ([_image()], "__getitem__ returned a list; expected a dict of one whole batch"),
    ({"captions": ["a"]}, "the batch has neither 'images' nor 'latents'"),
    ({"images": torch.rand(3, 64, 64), "captions": ["a"]}, "'images' has shape (3, 64, 64); expected [B, 3, H, W]"),
    ({"images": torch.rand(1, 1, 64, 64), "captions": ["a"]}, "'images' has shape (1, 1, 64, 64)"),
    ({"images": torch.rand(1, 3, 64, 48), "captions": ["a"]}, "W multiples of 64 for this model"),
    ({"images": torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "captions": ["a"]}, "'images' is a torch.uint8 tensor"),
    ({"images": _image().numpy(), "captions": ["a"]}, "'images' is a ndarray; expected a floating-point torch tensor"),
    ({"images": _image() * 255, "captions": ["a"]}, "expected [-1, 1]"),
    ({"images": torch.full((1, 3, 64, 64), float("nan")), "captions": ["a"]}, "'images' holds NaN"),
    ({"images": _image(0), "captions": []}, "the batch holds no samples"),
    ({"latents": torch.rand(1, 3, 8, 8), "captions": ["a"]}, "'latents' has shape (1, 3, 8, 8); expected [B, 4, h, w]"),
    ({"latents": torch.rand(1, 4, 8, 6), "captions": ["a"]}, "h and w multiples of 8"),
    ({"images": _image()}, "no 'input_ids', and the batch has no 'captions' to tokenize instead"),
    ({"images": _image(), "input_ids": torch.zeros(1, 1, 75, dtype=torch.long)},
     "'input_ids' (1, 1, 75) are not integer ids of shape [1, 1, 77] (max_token_length None), and the batch has no "
     "'captions'"),
    ({"images": _image(), "input_ids": torch.zeros(1, 1, 77)}, "are not integer ids of shape [1, 1, 77]"),
    ({"images": _image(2), "captions": ["a"]}, "'captions' must be a list of 2 strings"),
    ({"images": _image(), "captions": "a"}, "'captions' must be a list of 1 strings"),
    ({"images": _image(), "captions": [3]}, "'captions' must be a list of 1 strings"),
    ({"images": _image(), "captions": ["a"], "loss_weights": torch.ones(2)}, "'loss_weights' has shape (2,)"),
    ({"images": _image(), "captions": ["a"], "image_keys": "a.png"}, "'image_keys' must be a list of 1 names"),
    ({"images": _image(), "captions": ["a"], "crop_top_lefts": torch.zeros(1, 3)}, "'crop_top_lefts' has shape (1, 3)"),
    ({"images": _image(), "captions": ["a"], "alpha_masks": torch.ones(64, 64)}, "'alpha_masks' has shape (64, 64)"),
])
def test_bad_batches_name_the_class_the_batch_and_the_key(raw, message):
    with pytest.raises(DatasetError) as err:
        _batches().to_batch(raw, KEY)
    assert str(err.value).startswith("dataset_class 'm.Batches': batch 0: ") and message in str(err.value)


def test_options_that_need_batch_keys():
    with pytest.raises(DatasetError, match="masked_loss needs 'alpha_masks'"):
        _batches(masked_loss=True).to_batch({"images": _image(), "captions": ["a"]}, KEY)
    with pytest.raises(DatasetError, match="weighted_captions needs 'captions'"):
        _batches(weighted_captions=True).to_batch(
            {"images": _image(), "input_ids": torch.zeros(1, 1, 77, dtype=torch.long)}, KEY)


# --- conversion -------------------------------------------------------------------------------------------------

def test_ids_in_the_trained_layout_are_used_as_given():
    ids = torch.randint(0, 1000, (2, 2, 77))  # not what any caption tokenizes to
    batch = _batches(max_token_length=150).to_batch({"images": _image(2), "input_ids": ids}, KEY)
    assert len(batch.input_ids) == 1 and torch.equal(batch.input_ids[0], ids)
    assert batch.captions == ["", ""] and batch.token_weights is None
    flat = torch.randint(0, 1000, (2, 77))  # sd-scripts also reads [B, 77] for 75 tokens
    batch = _batches().to_batch({"images": _image(2), "input_ids": flat, "captions": ["a", "b"]}, KEY)
    assert torch.equal(batch.input_ids[0], flat[:, None])


def test_captions_are_tokenized_when_the_ids_do_not_fit(caplog):
    captions = ["a magenta circle", "a magenta square on a blue background"]
    tokenizers = tokenizers_for("sdxl")
    wrong = torch.zeros(2, 1, 77, dtype=torch.long)  # one tensor for SDXL's two tokenizers
    with caplog.at_level(logging.WARNING):
        batch = _batches("sdxl").to_batch({"images": _image(2), "input_ids": wrong, "captions": captions}, KEY)
    assert "1 input_ids tensor(s) for the model's 2 tokenizer(s)" in caplog.text
    for ids, tokenizer in zip(batch.input_ids, tokenizers):
        reference = tokenizer(captions, padding="max_length", truncation=True, max_length=77,
                              return_tensors="pt").input_ids
        assert torch.equal(ids[:, 0], reference)
    both = [tokenize(t, captions) for t in tokenizers]
    given = _batches("sdxl").to_batch({"images": _image(2), "input_ids": both[0], "input_ids2": both[1] + 1}, KEY)
    assert torch.equal(given.input_ids[1], both[1] + 1)  # SDXL's second tokenizer's ids, as given


def test_weighted_captions_read_the_captions():
    batch = _batches(weighted_captions=True).to_batch({"images": _image(), "captions": ["a (magenta:1.5) circle"]},
                                                      KEY)
    assert batch.token_weights is not None and float(batch.token_weights[0].max()) == pytest.approx(1.5)


def test_defaults_and_given_values():
    latents = torch.randn(2, 4, 8, 16)
    batch = _batches().to_batch({"latents": latents, "images": None, "captions": ["a", "b"],
                                 "loss_weights": [1.0, 0.5], "image_keys": ["x.png", "y.png"]}, SampleKey(3, 2, 1, 0))
    assert batch.images is None and torch.equal(batch.latents, latents)
    assert batch.loss_weights.tolist() == [1.0, 0.5] and batch.paths == ["x.png", "y.png"]
    assert batch.original_sizes_hw.tolist() == [[64, 128]] * 2 == batch.target_sizes_hw.tolist()
    assert batch.crop_top_lefts.tolist() == [[0, 0]] * 2 and batch.flipped == [False, False]
    assert batch.keys == [SampleKey(3, 2, 1, 0), SampleKey(3, 2, 1, 1)] and batch.masks is None
    sizes = torch.tensor([[100, 90]])
    batch = _batches().to_batch({"images": _image(), "captions": ["a"], "original_sizes_hw": sizes,
                                 "alpha_masks": torch.ones(1, 64, 64)}, KEY)
    assert batch.loss_weights.tolist() == [1.0] and torch.equal(batch.original_sizes_hw, sizes)
    assert batch.paths == ["m.Batches[0] #0"] and batch.masks.shape == (1, 64, 64)


# --- configuration ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    ({"train_data_dir": "img"}, "dataset_class ('m.B') and train_data_dir are both given"),
    ({"reg_data_dir": "reg"}, "dataset_class ('m.B') and reg_data_dir are both given"),
    ({"dataset_config": "data.toml"}, "dataset_class ('m.B') and dataset_config are both given"),
    ({"in_json": "meta.json"}, "dataset_class ('m.B') and in_json are both given"),
    ({"cache_latents": True}, "and cache_latents (or cache_latents_to_disk) cannot both be on"),
    ({"cache_latents_to_disk": True}, "and cache_latents (or cache_latents_to_disk) cannot both be on"),
    ({"cache_text_encoder_outputs_to_disk": True, "network_train_unet_only": True},
     "and cache_text_encoder_outputs_to_disk cannot both be on"),
    ({"validation_split": 0.25}, "and validation_split cannot both be on"),
])
def test_combinations_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_train_config(overrides={"dataset_class": "m.B", **overrides})


def test_config_accepts_dataset_class_alone(tmp_path):
    assert "dataset_class" not in NOT_YET_SUPPORTED
    config = load_train_config(overrides={"dataset_class": "m.B", "pretrained_model_name_or_path": "sd.safetensors",
                                          "output_dir": str(tmp_path), "masked_loss": True, "flip_aug": True,
                                          "train_batch_size": 4, "cache_text_encoder_outputs": True,
                                          "network_train_unet_only": True})
    check_runnable(config)  # no train_data_dir, no resolution: the class makes the batches
    note = next(w for w in config.warnings if "not used" in w)
    assert "train_batch_size" in note and "flip_aug" in note and "masked_loss" not in note
    assert not any("not used" in w for w in load_train_config(overrides={"dataset_class": "m.B"}).warnings)
