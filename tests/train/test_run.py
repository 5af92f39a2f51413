"""The training loop end to end on small random SD1/SDXL models: files and metadata, exact resume, NaN stop,
samples, pruning of old saves."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file, read_metadata  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import TrainingError, train  # noqa: E402

from .tiny_run import make_base, run_options  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("train"), images=6, sdxl=True)


def _config(base, out, **overrides):
    return load_train_config(overrides=run_options(base, out, dict(
        network_dim=4, network_alpha=2, learning_rate=1e-2, max_train_steps=4, cache_latents=True,
        optimizer_type="AdamW", lr_scheduler="cosine"), overrides))


def test_run_writes_adapter_metadata_and_config(base, tmp_path):
    final = train(_config(base, tmp_path, network_args=["algo=lora", "conv_dim=2"]))
    assert final == tmp_path / "t.safetensors"
    tensors, _ = load_file(final)
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(u).all() for u in ups) and any(u.abs().sum() > 0 for u in ups)  # it trained
    meta = read_metadata(final)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_steps"] == "4" and meta["ss_num_train_images"] == "6"
    assert meta["ss_base_model_version"] == "sd_v1" and "sshs_model_hash" in meta
    assert json.loads(meta["ss_network_args"]) == {"algo": "lora", "conv_dim": "2", "dropout": None}  # as given
    assert "ss_network_args" not in read_metadata(train(_config(base, tmp_path / "plain")))  # none given: no key
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_magenta": {"n_repeats": 1, "img_count": 6}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    again = load_train_config(tmp_path / "t_config.toml")
    assert again.network_dim == 4 and again.max_train_steps == 4


def _states_equal(a, b):
    ta, tb = load_file(a)[0], load_file(b)[0]
    assert ta.keys() == tb.keys()
    return all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_mixed_precision_trains_lycoris_algorithms(base, tmp_path, algo):
    """bf16 mixed precision (frozen model in bf16, float32 adapter, forward under autocast): the algorithms whose
    autograd functions once met bf16 activations next to float32 factors in backward train and save finite
    tensors. Each module starts with one factor at zero (LyCORIS' init: hada_w2_a, the second Kronecker factor);
    after the steps every module trained, except the mid block's self-attention query and key, which attend over one
    position there (64 px / 64) and so get no gradient in exact arithmetic. Some CPUs' kernels leave rounding noise
    there (AVX-512 BF16 on an AMD EPYC: |g| ~ 1e-12 in float32 and bf16 alike), which AdamW (eps 1e-8, lr 1e-2) turns
    into steps below 2e-6; a real gradient moves a factor by ~lr per step. So "trained" is a factor past 1e-4."""
    final = train(_config(base, tmp_path, mixed_precision="bf16", max_train_steps=2,
                          network_args=[f"algo={algo}", "preset=full", "conv_dim=2"]))
    tensors, _ = load_file(final)
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors.values())
    untrained = {k.split(".")[0] for k, t in tensors.items()
                 if not k.endswith(".alpha") and not t.float().abs().amax() > 1e-4}
    one_position = {f"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_{x}" for x in "qk"}
    assert untrained == one_position


def test_fp16_mixed_precision_scales_the_loss_and_resumes_exactly(base, tmp_path):
    """mixed_precision fp16 trains with a loss scale (torch's GradScaler, as accelerate gives sd-scripts), kept in
    the state, so that a stopped and resumed run equals the uninterrupted one."""
    # 2 steps, stopped after the first: fp16 runs slowly on a CPU (4 steps, stopped after 2, took 21 s)
    options = dict(mixed_precision="fp16", max_train_steps=2, save_every_n_steps=1, save_state=True)
    full = train(_config(base, tmp_path / "full", **options))
    saved = torch.load(tmp_path / "full" / "t-step00000001-state" / "optimizer.pt", weights_only=True)
    assert saved["scaler"]["scale"] > 1  # scaled, not left at 1
    assert _states_equal(tmp_path / "full" / "t-step00000002.safetensors", full)  # sd-scripts saves the last step too
    train(_config(base, tmp_path / "part", **options), stop_at_step=1)
    resumed = train(_config(base, tmp_path / "part", **options,
                            resume=str(tmp_path / "part" / "t-step00000001-state")))
    assert _states_equal(full, resumed)


def test_fp16_skipped_step_holds_the_lr_schedule(base, tmp_path, monkeypatch):
    """A step whose scaled gradients overflow is skipped: the step counts, but the lr schedule holds, as
    accelerate's scheduler does for sd-scripts when the optimizer step was skipped. The scale starts far too high
    and its backoff brings it into range at once, so exactly the first step is skipped."""
    from lorakit.train import loss_scale, run

    def overflowing_first(device, config):
        return loss_scale.LossScaler(device.type, init_scale=1e30, backoff_factor=1e-26)

    monkeypatch.setattr(run, "make_loss_scaler", overflowing_first)
    train(_config(base, tmp_path, mixed_precision="fp16", max_train_steps=3, save_every_n_steps=3,
                  save_state=True))
    saved = torch.load(tmp_path / "t-step00000003-state" / "optimizer.pt", weights_only=True)
    assert saved["scaler"]["scale"] < 1e30 / 2  # the first step overflowed
    assert saved["scheduler"]["last_epoch"] == 2  # 3 steps counted, 2 of them stepped the schedule


def test_full_fp16_scales_the_loss_and_unscales_fp16_gradients(base, tmp_path):
    """full_fp16 trains an fp16 adapter with the loss scaled too, as sd-scripts does by letting accelerate's scaler
    unscale fp16 gradients; the adapter moves and stays finite."""
    options = dict(mixed_precision="fp16", full_fp16=True, optimizer_args=["eps=1e-4"], max_train_steps=3,
                   save_every_n_steps=2, save_state=True)
    final = train(_config(base, tmp_path, **options))
    saved = torch.load(tmp_path / "t-step00000002-state" / "optimizer.pt", weights_only=True)
    assert saved["scaler"]["scale"] > 1
    tensors, _ = load_file(final)
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.isfinite(t.float()).all() for t in tensors.values())
    assert any(t.abs().max() > 0 for t in ups)  # trained: lora_up starts at zero


def test_dataset_config_metadata_describes_each_dataset(base, tmp_path):
    """With a dataset config, sd-scripts writes ss_datasets (each dataset's batch size, resolution, buckets and
    subsets with their caption options) instead of the flat keys, which describe the command line's defaults."""
    folder = str(base / "data" / "1_magenta")
    cfg = tmp_path / "ds.toml"
    cfg.write_text(f"""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
batch_size = 2
[[datasets.subsets]]
image_dir = '{folder}'
shuffle_caption = true
keep_tokens = 1
[[datasets]]
resolution = [128, 64]
batch_size = 1
[[datasets.subsets]]
image_dir = '{folder}'
num_repeats = 2
keep_tokens = 2
resize_interpolation = "lanczos"
""")
    config = _config(base, tmp_path, train_data_dir=None, dataset_config=str(cfg), max_train_steps=1)
    meta = read_metadata(train(config))
    assert "ss_resolution" not in meta and "ss_keep_tokens" not in meta and "ss_batch_size_per_device" not in meta
    first, second = json.loads(meta["ss_datasets"])
    assert (first["batch_size_per_device"], first["resolution"], first["num_train_images"]) == (2, [64, 64], 6)
    assert (second["batch_size_per_device"], second["resolution"], second["num_train_images"]) == (1, [128, 64], 12)
    sub1, sub2 = first["subsets"][0], second["subsets"][0]
    assert (sub1["shuffle_caption"], sub1["keep_tokens"], sub1["img_count"], sub1["image_dir"]) == (
        True, 1, 6, "1_magenta")
    assert (sub2["shuffle_caption"], sub2["keep_tokens"], sub2["num_repeats"]) == (False, 2, 2)
    assert (sub1["resize_interpolation"], sub2["resize_interpolation"]) == (None, "lanczos")
    assert sum(b["count"] for b in second["bucket_info"]["buckets"].values()) == 12
    assert meta["ss_num_train_images"] == "18"


def test_resume_equals_uninterrupted_run(base, tmp_path):
    full = train(_config(base, tmp_path / "full", max_train_steps=5, gradient_accumulation_steps=1,
                         network_dropout=0.1))
    stopped = _config(base, tmp_path / "part", max_train_steps=5, network_dropout=0.1)
    assert train(stopped, stop_at_step=2) is None  # stopped inside epoch 1 (3 batches per epoch)
    state = tmp_path / "part" / "t-step00000002-state"
    assert state.is_dir()
    again = _config(base, tmp_path / "part", max_train_steps=5, network_dropout=0.1, resume=str(state))
    assert train(again, stop_at_step=4) is None  # a second stop, in epoch 2
    state = tmp_path / "part" / "t-step00000004-state"
    resumed = train(_config(base, tmp_path / "part", max_train_steps=5, network_dropout=0.1, resume=str(state)))
    assert _states_equal(full, resumed)
    assert read_metadata(resumed)["ss_steps"] == "5" and read_metadata(resumed)["ss_epoch"] == "2"


def test_a_run_without_seed_records_the_one_it_drew_and_resumes_with_it(base, tmp_path):
    """seed unset: a random seed, written to the saved config, ss_seed and the state, and taken back by a resume
    of the same config (whose digest includes the seed)."""
    train(_config(base, tmp_path / "a", seed=None, max_train_steps=3), stop_at_step=1)
    saved = load_train_config(tmp_path / "a" / "t_config.toml")
    state = tmp_path / "a" / "t-step00000001-state"
    assert saved.seed is not None and json.loads((state / "train_state.json").read_text())["seed"] == saved.seed
    resumed = train(_config(base, tmp_path / "a", seed=None, max_train_steps=3, resume=str(state)))
    assert read_metadata(resumed)["ss_seed"] == str(saved.seed)
    full = train(_config(base, tmp_path / "b", seed=saved.seed, max_train_steps=3))
    assert _states_equal(full, resumed)  # the resume continued with the seed the first part drew


def test_xformers_without_the_package_keeps_sdpa(base, tmp_path, caplog):
    """The kohya_ss GUI writes xformers = true by default; without the xformers package the run trains with
    PyTorch's attention and says so (it crashed in diffusers, after the model had loaded)."""
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed")
    with caplog.at_level("WARNING", logger="lorakit"):
        assert train(_config(base, tmp_path, xformers=True, max_train_steps=1)).is_file()
    assert any("xformers package is not installed" in r.getMessage() for r in caplog.records)


def test_resume_refuses_changed_settings(base, tmp_path):
    train(_config(base, tmp_path, max_train_steps=3), stop_at_step=1)
    with pytest.raises(ValueError, match=r"different training settings \(learning_rate: 0.01 -> 0.005; "
                                         r"lr_scheduler: 'cosine' -> 'linear'\)"):
        train(_config(base, tmp_path, max_train_steps=4, learning_rate=5e-3, lr_scheduler="linear",
                      resume=str(tmp_path / "t-step00000001-state")))
    # how files are written and how memory is spent may change (resuming with checkpointing after running out of
    # memory is the usual case)
    resumed = train(_config(base, tmp_path, max_train_steps=3, resume=str(tmp_path / "t-step00000001-state"),
                            save_precision="fp16", gradient_checkpointing=True, vae_batch_size=2))
    assert load_file(resumed)[0]["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"].dtype == \
        torch.float16


def test_a_resume_trains_on_for_longer(base, tmp_path, caplog):
    """sd-scripts' usual reason to resume: more steps. A run of 4 steps that ended part-way through its second
    epoch (3 batches each) and saved its state goes on to 6 steps; with a constant lr that equals a run of 6 steps
    from the start (the data position is where the first run stopped)."""
    options = dict(lr_scheduler="constant", gradient_accumulation_steps=1)
    full = train(_config(base, tmp_path / "full", max_train_steps=6, **options))
    train(_config(base, tmp_path / "part", max_train_steps=4, save_state=True, **options))
    state = tmp_path / "part" / "t-state"
    assert json.loads((state / "train_state.json").read_text())["epoch"] == 2  # not 3: epoch 2 is not finished
    with caplog.at_level("WARNING", logger="lorakit"):
        longer = train(_config(base, tmp_path / "part", max_train_steps=6, resume=str(state), **options))
    assert any("trains on to step 6 instead of 4" in r.getMessage() for r in caplog.records)
    assert _states_equal(full, longer)
    assert read_metadata(longer)["ss_steps"] == "6" and read_metadata(longer)["ss_max_train_steps"] == "6"
    with pytest.raises(ValueError, match=r"t-state: the state is at step 4, past this run's 3 training steps"):
        train(_config(base, tmp_path / "part", max_train_steps=3, resume=str(state), **options))


def test_a_longer_resume_follows_the_lr_schedule_of_the_new_length(base, tmp_path):
    """A linear schedule of 4 steps reaches lr 0 at step 4: made 8 steps long, the resumed run's lr follows the
    8-step line (lr x (8 - s) / 8) from the first step after the resume, as sd-scripts' rebuilt scheduler does."""
    train(_config(base, tmp_path, max_train_steps=4, save_state=True, lr_scheduler="linear"))
    train(_config(base, tmp_path, max_train_steps=8, lr_scheduler="linear", resume=str(tmp_path / "t-state")),
          stop_at_step=5)
    saved = torch.load(tmp_path / "t-step00000005-state" / "optimizer.pt", weights_only=True)
    lrs = [g["lr"] for g in saved["optimizer"]["param_groups"]]
    assert saved["scheduler"]["last_epoch"] == 5 and lrs == pytest.approx([1e-2 * 3 / 8] * len(lrs))
    assert json.loads((tmp_path / "t-step00000005-state" / "train_state.json").read_text())["max_steps"] == 8
    # step 5 itself trained (at 4/8 of the lr): the optimizer state had brought back the 4-step run's lr, 0
    before, after = (load_file(tmp_path / s / "network.safetensors")[0] for s in ("t-state", "t-step00000005-state"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_state_of_another_lorakit_version_resumes_when_its_settings_agree(base, tmp_path):
    """A version that adds an option (or lets a resume change one) changes the digest of the settings: the
    settings both sides record are compared one by one instead, so such a state still resumes, exactly."""
    full = train(_config(base, tmp_path / "full", max_train_steps=3))
    train(_config(base, tmp_path / "part", max_train_steps=3), stop_at_step=1)
    state = tmp_path / "part" / "t-step00000001-state"
    info = json.loads((state / "train_state.json").read_text())
    info["settings"].pop("batches per epoch (the dataset)")  # not recorded by that version
    info["settings"]["an_option_since_removed"] = "False"
    assert info["settings"]["network_weights"] == "None"  # as when it was one path: such states resume
    info["config_digest"] = "0" * 16
    (state / "train_state.json").write_text(json.dumps(info))
    resumed = train(_config(base, tmp_path / "part", max_train_steps=3, resume=str(state)))
    assert _states_equal(full, resumed)


def test_resume_refuses_a_dataset_of_other_batches(base, tmp_path):
    """A state records the batches per epoch: a resume after images were removed or added would take other images
    from the saved position, so it is refused, saying the dataset changed."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(base / "data", data)
    options = dict(train_data_dir=str(data), max_train_steps=4)
    train(_config(base, tmp_path / "out", **options), stop_at_step=1)
    for image in sorted(data.rglob("*.png"))[:2]:
        image.unlink()
    with pytest.raises(ValueError, match=r"different training settings \(batches per epoch \(the dataset\): 3 -> 2\)"):
        train(_config(base, tmp_path / "out", **options, resume=str(tmp_path / "out" / "t-step00000001-state")))


def test_broken_or_missing_state_folders_are_named(base, tmp_path):
    train(_config(base, tmp_path, max_train_steps=3), stop_at_step=1)
    state = tmp_path / "t-step00000001-state"
    with pytest.raises(ValueError, match=r"resume=.*nope: no such folder"):
        train(_config(base, tmp_path, max_train_steps=3, resume=str(tmp_path / "nope")))
    data = (state / "optimizer.pt").read_bytes()
    (state / "optimizer.pt").write_bytes(data[:1000])
    with pytest.raises(ValueError, match=r"resume=.*t-step00000001-state: optimizer.pt cannot be read"):
        train(_config(base, tmp_path, max_train_steps=3, resume=str(state)))


def test_nan_loss_stops_and_keeps_last_save(base, tmp_path, monkeypatch):
    import lorakit.train.run as run

    calls = {"n": 0}
    real = run.batch_loss

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(run, "batch_loss", flaky)
    with pytest.raises(TrainingError, match="loss became nan at step 3"):
        train(_config(base, tmp_path, save_every_n_steps=2))
    assert (tmp_path / "t-step00000002.safetensors").is_file()
    assert not (tmp_path / "t.safetensors").exists()


def test_a_step_logs_the_mean_loss_of_its_accumulated_batches(base, tmp_path, monkeypatch):
    """With gradient_accumulation_steps 2 the logged loss of a step is the mean over its two batches (sd-scripts
    records every batch's loss); only the last batch's used to be logged."""
    import lorakit.train.logger as logger
    import lorakit.train.run as run

    values = iter([1.0, 3.0, 5.0, 7.0, 9.0, 11.0])
    real = run.batch_loss

    def known(*args, **kwargs):  # the real loss's gradient, a known value
        loss = real(*args, **kwargs)
        return loss - loss.detach() + next(values)

    logged = []
    real_step = logger.TrainLogger.step

    def record(self, loss, *args, **kwargs):
        logged.append(loss)
        return real_step(self, loss, *args, **kwargs)

    monkeypatch.setattr(run, "batch_loss", known)
    monkeypatch.setattr(logger.TrainLogger, "step", record)
    train(_config(base, tmp_path, max_train_steps=2, train_batch_size=1, gradient_accumulation_steps=2))
    assert logged == pytest.approx([2.0, 6.0])
    # 6 images at batch 2: 3 batches per epoch, so an epoch's second step has one batch (sd-scripts'
    # accelerate steps at the end of the dataloader): its loss is that batch's, not half of it
    values, logged[:] = iter([1.0, 3.0, 5.0, 7.0, 9.0, 11.0]), []
    train(_config(base, tmp_path / "partial", max_train_steps=3, train_batch_size=2, gradient_accumulation_steps=2))
    assert logged == pytest.approx([2.0, 5.0, 8.0])


def test_a_schedule_free_optimizer_trains_in_train_mode_and_saves_and_samples_in_eval_mode(base, tmp_path,
                                                                                            monkeypatch):
    """Schedule-free optimizers hold two sets of weights: the steps take the interpolated ones (train mode), saves,
    samples and validation the averaged ones (eval mode), as sd-scripts' optimizer_train_fn/eval_fn; states the
    trained ones (train mode), from which a resume goes on exactly."""
    pytest.importorskip("schedulefree")
    import lorakit.train.optimizers as optimizers
    import lorakit.train.run as run

    made, modes = [], []
    real_make, real_loss, real_save, real_state = (optimizers.make_optimizer, run.batch_loss, run._save_adapter,
                                                   run.save_state)

    def make(*args, **kwargs):
        made.append(real_make(*args, **kwargs))
        return made[-1]

    def mode(what):
        modes.append((what, made[0].param_groups[0]["train_mode"]))

    monkeypatch.setattr(optimizers, "make_optimizer", make)
    monkeypatch.setattr(run, "batch_loss", lambda *a, **k: (mode("step"), real_loss(*a, **k))[1])
    monkeypatch.setattr(run, "_save_adapter", lambda *a, **k: (mode("save"), real_save(*a, **k))[1])
    monkeypatch.setattr(run, "save_state", lambda *a, **k: (mode("state"), real_state(*a, **k))[1])
    train(_config(base, tmp_path, optimizer_type="AdamWScheduleFree", lr_scheduler="constant", max_train_steps=3,
                  save_every_n_steps=2, save_state=True))
    assert {m for w, m in modes if w == "step"} == {True} and len(modes) == 3 + 2 + 2  # steps, saves at 2 and 3
    assert {m for w, m in modes if w == "save"} == {False} and {m for w, m in modes if w == "state"} == {True}


def test_save_last_n_steps_prunes(base, tmp_path):
    train(_config(base, tmp_path, max_train_steps=6, save_every_n_steps=1, save_last_n_steps=2, save_state=True))
    kept = sorted(p.name for p in tmp_path.glob("t-step*.safetensors"))
    # sd-scripts keeps the saves of the last n steps: at step 6 (the last step is saved too), steps 4..6
    assert kept == ["t-step00000004.safetensors", "t-step00000005.safetensors", "t-step00000006.safetensors"]
    # and, with save_last_n_steps_state unset, the states by the same count (sd-scripts' fallback)
    states = sorted(p.name for p in tmp_path.glob("t-step*-state"))
    assert states == ["t-step00000004-state", "t-step00000005-state", "t-step00000006-state"]


def test_samples_are_drawn(base, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na purple circle --n blue --w 64 --h 64 --d 5 --l 4 --s 3\n")
    train(_config(base, tmp_path, max_train_steps=2, sample_prompts=str(prompts), sample_every_n_steps=2,
                  sample_sampler="ddim"))
    images = sorted((tmp_path / "sample").glob("t_000002_00_*_5.png"))
    assert len(images) == 1, sorted(p.name for p in (tmp_path / "sample").iterdir())  # not again at the end


def test_a_sample_that_fails_half_written_leaves_no_image(base, tmp_path, monkeypatch):
    """A sample is written under a temporary name and renamed: a write that fails (a full disk, a kill) leaves no
    truncated PNG under the sample's name."""
    from pathlib import Path

    from PIL import Image

    def half_written(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG\r\n")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_written)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a purple circle --w 64 --h 64 --d 5 --s 2\n")
    with pytest.raises(OSError, match="No space left"):
        train(_config(base, tmp_path, max_train_steps=1, sample_prompts=str(prompts), sample_at_first=True,
                      sample_sampler="ddim"))
    assert list((tmp_path / "sample").iterdir()) == []


def test_output_paths_of_the_wrong_kind_are_refused_before_training(base, tmp_path, monkeypatch):
    """A folder named like the final adapter (or a file like the final state) failed the run at its end, losing it."""
    import lorakit.train.run as run

    monkeypatch.setattr(run, "batch_loss", lambda *a, **k: pytest.fail("trained before refusing"))
    (tmp_path / "t.safetensors").mkdir()
    with pytest.raises(FileExistsError, match=r"t.safetensors: is a folder, where this run writes its output"):
        train(_config(base, tmp_path, max_train_steps=1))
    (tmp_path / "t.safetensors").rmdir()
    (tmp_path / "t-state").write_text("")
    with pytest.raises(FileExistsError, match=r"t-state: is a file"):
        train(_config(base, tmp_path, max_train_steps=1, save_state_on_train_end=True))


def test_epoch_samples_are_named_by_epoch(base, tmp_path):
    """sd-scripts names a sample drawn at an epoch's end {name}_e{epoch:06d}_..., one drawn at a step by the step."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a purple circle --w 64 --h 64 --d 5 --s 2\n")
    train(_config(base, tmp_path, max_train_epochs=2, sample_prompts=str(prompts), sample_every_n_epochs=1,
                  sample_sampler="ddim", sample_at_first=True))
    names = sorted(p.name.split("_")[1] for p in (tmp_path / "sample").glob("t_*.png"))
    # sample_at_first is epoch 0 (sd-scripts: sample_images(..., 0, global_step, ...)); the end of training repeats
    # epoch 2's step: not drawn again
    assert names == ["e000000", "e000001", "e000002"]


def test_without_output_name_saves_and_samples_take_sd_scripts_default_names(base, tmp_path):
    """sd-scripts' train_util names saves without output_name by kind: epoch-NNNNNN, at-stepNNNNNNNN, last; and its
    sample_image_inference leaves the prefix out. A state of such a run resumes."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a purple circle --w 64 --h 64 --d 5 --s 2\n")
    out = tmp_path / "out"
    train(_config(base, out, output_name=None, save_every_n_epochs=1, save_every_n_steps=2, save_state=True,
                  sample_prompts=str(prompts), sample_at_first=True, sample_every_n_steps=4, sample_sampler="ddim"))
    assert sorted(p.name for p in out.iterdir()) == [
        "at-step00000002-state", "at-step00000002.safetensors", "at-step00000004-state", "at-step00000004.safetensors",
        "epoch-000001-state", "epoch-000001.safetensors", "last-state", "last.safetensors", "last_config.toml",
        "sample"]
    assert sorted(p.name[:9] for p in (out / "sample").iterdir()) == ["000004_00", "e000000_0"]
    # sample_at_first draws on a resume too, as sd-scripts does (its global_step is still 0 there), and the draw
    # leaves the training's random state as it was
    resumed = train(_config(base, tmp_path / "resumed", output_name=None, resume=str(out / "at-step00000002-state"),
                            sample_prompts=str(prompts), sample_at_first=True, sample_sampler="ddim"))
    assert _states_equal(resumed, out / "last.safetensors")
    assert [p.name[:9] for p in (tmp_path / "resumed" / "sample").iterdir()] == ["e000000_0"]


def test_sdxl_size_conditioning_is_embedded_from_exact_sizes_under_bf16(base, tmp_path, monkeypatch):
    """sd-scripts embeds SDXL's original/crop/target sizes from the integers in float32 and casts afterwards; cast to
    bf16 first, an original size of (333, 777) reached the U-Net as (332, 776)."""
    from PIL import Image
    from diffusers.models.embeddings import Timesteps

    folder = tmp_path / "data" / "1_x"
    folder.mkdir(parents=True)
    Image.new("RGB", (777, 333), (200, 30, 90)).save(folder / "a.png")
    seen = []
    real = Timesteps.forward

    def record(self, timesteps):
        seen.append(timesteps.detach().clone())
        return real(self, timesteps)

    monkeypatch.setattr(Timesteps, "forward", record)
    train(_config(base, tmp_path / "out", pretrained_model_name_or_path=str(base / "sdxl.safetensors"),
                  train_data_dir=str(tmp_path / "data"), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                  train_batch_size=1, max_train_steps=1,
                  mixed_precision="bf16", network_train_unet_only=True, cache_latents=False))
    sizes = [t for t in seen if t.numel() == 6]  # add_time_proj's input: the six sizes of the one image
    assert sizes and all(t.dtype == torch.float32 for t in sizes)
    assert sizes[0][:2].tolist() == [333.0, 777.0]


def test_sdxl_trains_unet_only(base, tmp_path):
    final = train(_config(base, tmp_path, pretrained_model_name_or_path=str(base / "sdxl.safetensors"),
                          max_train_steps=2, network_train_unet_only=True))
    keys = load_file(final)[0].keys()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert read_metadata(final)["ss_base_model_version"] == "sdxl_base_v1-0"


@pytest.mark.parametrize("sdxl_given", [False, True])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sdxl_with_clip_skip_says_so_once_and_only_when_a_layer_would_be_skipped(base, tmp_path, caplog, clip_skip,
                                                                                sdxl_given):
    """Every kohya_ss SDXL config carries clip_skip 1 (no skip): nothing to say. clip_skip 2: one note, from the
    config where it says sdxl, else from the run once the model shows SDXL; the text encoding (at the penultimate
    layer anyway) adds no Python warning of its own."""
    import logging
    import warnings

    config = _config(base, tmp_path, pretrained_model_name_or_path=str(base / "sdxl.safetensors"), max_train_steps=1,
                     clip_skip=clip_skip, **({"sdxl": True} if sdxl_given else {}))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="lorakit"):
        warnings.simplefilter("always")
        train(config)
    assert not [str(w.message) for w in caught if "clip_skip" in str(w.message)]
    notes = [r.getMessage() for r in caplog.records if "clip_skip" in r.getMessage()]  # the config's notes too
    assert len(notes) == (clip_skip > 1) and all("clip_skip = 2 does nothing for SDXL" in n for n in notes), notes


def test_latent_cache_key_is_the_same_in_every_process(base):
    """The VAE fingerprint (part of every latent-cache key and of the latent noise seed) must not depend on the
    process: diffusers keeps a set-ordered list in its config, which differs with PYTHONHASHSEED (seeds 1 and 2
    order this VAE's ``_use_default_values`` differently)."""
    import os
    import subprocess
    import sys

    code = ("from lorakit.models.load import load_model; from lorakit.data.fingerprint import module_fingerprint; "
            f"print(module_fingerprint(load_model({str(base / 'sd.safetensors')!r}).vae))")
    runs = [subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONHASHSEED=seed),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in ("1", "2")]
    prints = set()
    for run in runs:  # side by side: each spends its time importing diffusers
        out, err = run.communicate()
        assert run.returncode == 0, err
        prints.add(out.strip().splitlines()[-1])
    assert len(prints) == 1


def test_validation_loss_is_logged_and_repeatable(base, tmp_path, monkeypatch):
    from lorakit.train.logger import TrainLogger
    from lorakit.train.validation import validation_timesteps

    assert validation_timesteps(None, None) == [200, 400, 600, 800]
    assert validation_timesteps(100, 600) == [200, 300, 400, 500]
    seen = []
    monkeypatch.setattr(TrainLogger, "validation", lambda self, kind, loss, step, epoch: seen.append((kind, step, loss)))
    overrides = dict(validation_split=0.34, validate_every_n_steps=1, max_train_steps=2, train_batch_size=2,
                     network_dropout=0.5, learning_rate=1e-12)
    train(_config(base, tmp_path, **overrides))
    # 6 images: 2 held out, 4 train (2 steps of 2 per epoch); after steps 1, 2 and at the end of epoch 1
    assert [(k, s) for k, s, _ in seen] == [("step", 1), ("step", 2), ("epoch", 2)]
    losses = [v for _, _, v in seen]
    # the adapters hardly move (lr 1e-12): fixed noise and timesteps, and no dropout (eval), give the same value
    assert all(math.isfinite(v) and v > 0 for v in losses)
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)


def test_alpha_mask_of_zero_trains_nothing(base, tmp_path):
    from PIL import Image

    data = tmp_path / "data" / "1_masked"
    data.mkdir(parents=True)
    for i, alpha in enumerate((0, 0)):
        rgba = np.full((64, 64, 4), 90 + 40 * i, dtype=np.uint8)
        rgba[..., 3] = alpha
        Image.fromarray(rgba, "RGBA").save(data / f"{i}.png")
    common = dict(train_data_dir=str(tmp_path / "data"), alpha_mask=True, max_train_steps=2,
                  network_train_unet_only=True)
    zero = load_file(train(_config(base, tmp_path / "zero", **common)))[0]
    assert all(torch.count_nonzero(v) == 0 for k, v in zero.items() if k.endswith("lora_up.weight"))
    for path in data.iterdir():  # opaque: the same images now train
        Image.fromarray(np.asarray(Image.open(path))[..., :3]).save(path)
    full = load_file(train(_config(base, tmp_path / "full", **common)))[0]
    assert any(torch.count_nonzero(v) > 0 for k, v in full.items() if k.endswith("lora_up.weight"))


@pytest.mark.parametrize("option,value", [("stop_text_encoder_training", 2), ("stop_text_encoder_training_pct", 50)])
def test_text_encoders_stop_training_after_the_steps_given(base, tmp_path, option, value):
    """sd-scripts' stop_text_encoder_training counts steps (the kohya_ss GUI converts its percentage to them;
    stop_text_encoder_training_pct is that percentage): the text encoders train steps 1-2 of 4, then no more."""
    train(_config(base, tmp_path, max_train_steps=4, save_every_n_steps=1, **{option: value}))
    saves = [load_file(tmp_path / f"t-step{s:08d}.safetensors")[0] for s in range(1, 5)]

    def moved(a, b, prefix):
        return max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith(prefix))

    assert moved(saves[0], saves[1], "lora_te_") > 0  # step 2 trained the text encoder
    assert moved(saves[1], saves[2], "lora_te_") == 0 and moved(saves[2], saves[3], "lora_te_") == 0
    assert moved(saves[2], saves[3], "lora_unet_") > 0


def test_ctrl_c_prints_one_line_naming_the_state_to_resume_from(base, tmp_path, monkeypatch, capsys):
    """Ctrl-C stops the run with one line (exit 130, the shell's code for it) that names the newest state folder to
    resume from, instead of a traceback."""
    from lorakit.cli import main
    from lorakit.train import run

    def interrupted(config, explore=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "train", interrupted)
    args = ["train", "--pretrained_model_name_or_path", str(base / "sd.safetensors"), "--train_data_dir",
            str(base / "data"), "--output_dir", str(tmp_path), "--resolution", "64", "--output_name", "t"]
    assert main(args) == 130
    assert capsys.readouterr().err.strip() == ("lorakit train: interrupted; no state was saved to resume from "
                                               "(save_state = true keeps one at every save)")
    now = time.time()  # (states this run saved: test_resume_edges.py has those of other runs)
    for when, name in enumerate(("t-000002-state", "t-000001-state")):  # the newer save, not the larger name
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_state.json").write_text("{}")
        os.utime(tmp_path / name / "train_state.json", (now + when, now + when))  # t-000001 saved last
    assert main(args) == 130
    assert capsys.readouterr().err.strip().endswith(f'resume = "{tmp_path / "t-000001-state"}"')


def test_no_metadata_keeps_sd_scripts_minimum_keys_and_the_modelspec(base, tmp_path):
    """sd-scripts' no_metadata still writes SS_METADATA_MINIMUM_KEYS and the sai modelspec (UIs tell the base model
    and the network by them), but nothing about the data or the training."""
    meta = read_metadata(train(_config(base, tmp_path, no_metadata=True, max_train_steps=1,
                                       network_args=["conv_dim=2"])))
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["ss_network_dim"]) == ("sd_v1", "False", "4")
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "2" and "modelspec.architecture" in meta
    assert not any(k in meta for k in ("ss_tag_frequency", "ss_dataset_dirs", "ss_steps", "ss_learning_rate"))


@pytest.mark.parametrize("overrides", [dict(network_train_text_encoder_only=True, stop_text_encoder_training=1),
                                       dict(unet_lr=0.0, stop_text_encoder_training_pct=50)])
def test_stopping_the_text_encoders_when_the_unet_trains_nothing_is_refused_before_training(base, tmp_path,
                                                                                            monkeypatch, overrides):
    """Past the stop nothing would train: the run died at that step inside backward (no grad_fn), saving nothing."""
    import lorakit.train.run as run

    monkeypatch.setattr(run, "batch_loss", lambda *a, **k: pytest.fail("trained before refusing"))
    stop = next(k for k in overrides if k.startswith("stop"))
    with pytest.raises(run.TrainingError, match=rf"{stop} = .* the U-Net trains nothing"):
        train(_config(base, tmp_path, **overrides))


def test_a_text_encoder_stop_at_the_runs_end_is_no_stop(base, tmp_path):
    """A stop at or past the last step changes nothing, so a text-encoder-only run with it trains."""
    assert train(_config(base, tmp_path, network_train_text_encoder_only=True, stop_text_encoder_training=4)).exists()
