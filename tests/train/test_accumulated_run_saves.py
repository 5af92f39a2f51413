"""One short run from a kohya-style TOML config file, on the tiny SD model, whose epochs end part-way through an
accumulation group: 6 images at batch 2 = 3 batches per epoch, gradient_accumulation_steps 2, max_train_epochs 2.
sd-scripts sizes it with num_update_steps_per_epoch = ceil(3 / 2) = 2 (accelerate steps at the end of the
dataloader), so 4 steps: epoch 1 = steps 1-2, epoch 2 = steps 3-4. The same run checks what else the saves say:
each step save is stamped with its epoch (sd-scripts' save_model(..., global_step, epoch)), the final one with
num_train_epochs, save_precision fp16 sets the tensors' dtype, an unset network_dim is sd-scripts' 4
(networks/lora.py create_network), stop_text_encoder_training_pct 30 of 4 steps = ceil(1.2) = 2 text-encoder steps
(the kohya_ss GUI's math.ceil), and the file's v_parameterization = true trains an SD1 checkpoint as v-prediction
(sd-scripts merges the file into the command line's namespace)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file, read_metadata  # noqa: E402
from lorakit.models.demo import random_model  # noqa: E402
from lorakit.models.demo_data import write_concept_folder  # noqa: E402
from lorakit.models.save import save_checkpoint  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("accumulated")
    save_checkpoint(random_model("tiny-sd", seed=0), root / "sd.safetensors", dtype=None)
    write_concept_folder(root / "data", n=6, repeats=1)
    out = root / "out"
    (root / "config.toml").write_text(f"""\
pretrained_model_name_or_path = "{root / 'sd.safetensors'}"
train_data_dir = "{root / 'data'}"
resolution = "64"
output_dir = "{out}"
output_name = "t"
learning_rate = 1e-2
max_train_epochs = 2
train_batch_size = 2
gradient_accumulation_steps = 2
seed = 3
cache_latents = true
max_data_loader_n_workers = 0
optimizer_type = "AdamW"
lr_scheduler = "constant"
save_every_n_steps = 1
save_precision = "fp16"
stop_text_encoder_training_pct = 30
v_parameterization = true
""")
    final = train(load_train_config(root / "config.toml"))
    return final, [out / f"t-step{s:08d}.safetensors" for s in range(1, STEPS + 1)]


def test_each_epoch_ends_with_an_optimizer_step(run):
    final, steps = run
    meta = read_metadata(final)
    assert (meta["ss_steps"], meta["ss_max_train_steps"], meta["ss_num_epochs"]) == ("4", "4", "2")
    assert all(path.exists() for path in steps)


def test_saves_are_stamped_with_the_epoch_they_end(run):
    final, steps = run
    assert [read_metadata(path)["ss_epoch"] for path in steps] == ["1", "1", "2", "2"]
    assert read_metadata(final)["ss_epoch"] == "2"  # num_train_epochs, not the epoch after the last


def test_save_precision_sets_the_saved_dtype(run):
    tensors, _ = load_file(run[0])
    assert {t.dtype for t in tensors.values()} == {torch.float16}


def test_an_unset_network_dim_is_4(run):
    tensors, _ = load_file(run[0])
    downs = [t for k, t in tensors.items() if k.endswith("lora_down.weight")]
    assert downs and {t.shape[0] for t in downs} == {4}


def test_text_encoder_stops_after_the_rounded_up_percentage(run):
    saves = [load_file(path)[0] for path in run[1]]

    def text_encoder_moved(a, b):
        return any(not torch.equal(a[k], b[k]) for k in a if k.startswith("lora_te_"))

    assert [text_encoder_moved(a, b) for a, b in zip(saves, saves[1:])] == [True, False, False]  # steps 2, 3, 4


def test_the_files_v_parameterization_trains_v_prediction(run):
    meta = read_metadata(run[0])
    assert (meta["ss_base_model_version"], meta["modelspec.prediction_type"]) == ("sd_v1_v", "v")
