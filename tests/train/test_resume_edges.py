"""Edges of `resume`: a state at the run's last step, wrong paths, a refusal's order of messages, the state an
interrupted run names, and schedule-free states, on a tiny random SD1 model."""

from __future__ import annotations

import json
import logging

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


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_edges")
    save_checkpoint(random_model("tiny-sd", seed=0), root / "sd.safetensors", dtype=None)
    write_concept_folder(root / "data", n=6, repeats=1)  # 3 batches of 2 per epoch
    return root


def _config(base, out, **overrides):
    values = dict(pretrained_model_name_or_path=str(base / "sd.safetensors"), train_data_dir=str(base / "data"),
                  resolution="64", output_dir=str(out), output_name="t", network_dim=4, network_alpha=2,
                  learning_rate=1e-2, max_train_steps=4, train_batch_size=2, seed=3, cache_latents=True,
                  max_data_loader_n_workers=0, optimizer_type="AdamW", lr_scheduler="constant")
    values.update(overrides)
    return load_train_config(overrides=values)


def _same_tensors(a, b) -> bool:
    ta, tb = load_file(a)[0], load_file(b)[0]
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_resume_from_a_state_at_the_last_step_part_way_through_an_epoch_trains_nothing(base, tmp_path, caplog):
    """max_train_steps 4 ends after the first batch of epoch 2; resumed from its state with the same length, the run
    trains no fifth step (sd-scripts refuses such a resume): the final adapter is the state's, ss_steps stays 4."""
    first = train(_config(base, tmp_path, save_state=True))
    kept = tmp_path / "first.safetensors"
    kept.write_bytes(first.read_bytes())
    with caplog.at_level(logging.INFO, logger="lorakit.train.run"):
        again = train(_config(base, tmp_path, resume=str(tmp_path / "t-state")))
    assert _same_tensors(kept, again)
    assert read_metadata(again)["ss_steps"] == "4" and read_metadata(again)["ss_epoch"] == "2"
    assert json.loads((tmp_path / "t-state" / "train_state.json").read_text())["global_step"] == 4
    assert any("nothing is left to train" in r.getMessage() for r in caplog.records)
