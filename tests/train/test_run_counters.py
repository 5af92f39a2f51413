"""initial_step / initial_epoch / skip_until_initial_step, save_n_epoch_ratio, save_state_on_train_end and the
modelspec metadata options, on short runs of the tiny SD model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.algos.options import OptionError  # noqa: E402
from lorakit.formats.safetensors_io import load_file, read_metadata  # noqa: E402
from lorakit.train.run import train  # noqa: E402

from .test_run import _config, base  # noqa: E402,F401  (the shared model/data fixture)

# plain SGD and a constant lr carry no state between steps, so a run continued from a saved adapter can equal
# the uninterrupted run exactly (6 images, batches of 2: 3 steps per epoch)
STATELESS = dict(optimizer_type="torch.optim.SGD", lr_scheduler="constant", learning_rate=0.5, network_dropout=0.1)


def _tensors(path):
    return load_file(path)[0]


def test_initial_step_with_skip_continues_the_uninterrupted_run(base, tmp_path):
    full = train(_config(base, tmp_path / "full", max_train_steps=5, **STATELESS))
    first = train(_config(base, tmp_path / "first", max_train_steps=2, **STATELESS))
    go_on = dict(max_train_steps=5, network_weights=str(first), initial_step=2, save_every_n_steps=4, **STATELESS)
    skipped = train(_config(base, tmp_path / "skip", skip_until_initial_step=True, **go_on))
    expected, got = _tensors(full), _tensors(skipped)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    meta = read_metadata(skipped)
    assert (meta["ss_steps"], meta["ss_epoch"]) == ("5", "2")  # steps 3..5 of epochs 1 and 2
    assert read_metadata(tmp_path / "skip" / "t-step00000004.safetensors")["ss_steps"] == "4"
    # without skip_until_initial_step the counters go on the same way, but epoch 1 starts at its first batch
    unskipped = train(_config(base, tmp_path / "noskip", **go_on))
    assert read_metadata(unskipped)["ss_steps"] == "5"
    assert any(not torch.equal(v, _tensors(unskipped)[k]) for k, v in expected.items())


def test_initial_epoch_counts_from_that_epoch(base, tmp_path):
    final = train(_config(base, tmp_path, max_train_steps=7, initial_epoch=2, save_every_n_epochs=1,
                          skip_until_initial_step=True, **STATELESS))
    # epoch 2 starts at step 3: epochs 2 and 3 train steps 4..7 (the last one ends the run in epoch 3)
    assert read_metadata(tmp_path / "t-000002.safetensors")["ss_steps"] == "6"
    assert not (tmp_path / "t-000001.safetensors").exists()
    assert (read_metadata(final)["ss_steps"], read_metadata(final)["ss_epoch"]) == ("7", "3")
    with pytest.raises(OptionError, match=r"initial_epoch 4 \(step 9 at 3 steps per epoch\) must be below the 7"):
        train(_config(base, tmp_path / "late", max_train_steps=7, initial_epoch=4))


def test_save_n_epoch_ratio_state_on_train_end_and_modelspec(base, tmp_path):
    final = train(_config(base, tmp_path, max_train_epochs=4, train_batch_size=6, save_n_epoch_ratio=3,
                          save_every_n_epochs=3, save_state_on_train_end=True, metadata_title="Purple",
                          metadata_author="me", metadata_description="a test", metadata_license="CC0",
                          metadata_tags="purple, test", **STATELESS))
    # 4 epochs // 3 = every epoch (at least 3 files), replacing save_every_n_epochs; the last epoch is the final
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if n.startswith("t-0")] == ["t-000001.safetensors", "t-000002.safetensors",
                                                         "t-000003.safetensors"]
    assert "t-state" in names and not any(n.endswith("0-state") for n in names)  # only the state at the end
    meta = read_metadata(final)
    assert (meta["modelspec.title"], meta["modelspec.author"], meta["modelspec.description"]) == (
        "Purple", "me", "a test")
    assert (meta["modelspec.license"], meta["modelspec.tags"]) == ("CC0", "purple, test")
    assert read_metadata(tmp_path / "t-000002.safetensors")["modelspec.title"] == "Purple"
    ratio2 = train(_config(base, tmp_path / "r2", max_train_epochs=4, train_batch_size=6, save_n_epoch_ratio=2,
                           **STATELESS))
    assert sorted(p.name for p in ratio2.parent.glob("t-0*")) == ["t-000002.safetensors"]  # 4 // 2 = every 2nd
    assert read_metadata(ratio2)["modelspec.title"] == "t"  # unset: output_name, as sd-scripts


def test_sample_every_n_epochs_overrides_sample_every_n_steps(base, tmp_path):
    """sd-scripts' sample_images_common ignores sample_every_n_steps when sample_every_n_epochs is given: only the
    epoch samples are drawn, named by epoch."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a purple circle --w 64 --h 64 --d 5 --s 1\n")
    train(_config(base, tmp_path, max_train_epochs=2, train_batch_size=3, sample_prompts=str(prompts),
                  sample_every_n_steps=1, sample_every_n_epochs=1, sample_sampler="ddim", **STATELESS))
    names = sorted(p.name.split("_")[1] for p in (tmp_path / "sample").glob("t_*.png"))
    assert names == ["e000001", "e000002"]


def test_save_last_n_epochs_prunes_on_the_cadence_save_n_epoch_ratio_sets(base, tmp_path):
    """sd-scripts replaces save_every_n_epochs by floor(epochs / save_n_epoch_ratio) before training, and
    get_remove_epoch_no counts save_last_n_epochs in that cadence: 6 epochs at ratio 3 save every 2 (epochs 2 and 4;
    the 6th is the final file), and keeping 1 removes epoch 2's save at epoch 4 (not epoch 4 - 3 = 1's, as the
    save_every_n_epochs given would say)."""
    train(_config(base, tmp_path, max_train_epochs=6, train_batch_size=6, save_n_epoch_ratio=3, save_every_n_epochs=3,
                  save_last_n_epochs=1, save_state=True, **STATELESS))
    assert sorted(p.name for p in tmp_path.glob("t-0*")) == ["t-000004-state", "t-000004.safetensors"]
