"""validation_seed and max_validation_steps reach the validation loss, as in sd-scripts' train_network.py: the
validation noise and timesteps are drawn from a generator seeded with validation_seed (else the training seed) at
each validation, over at most max_validation_steps batches of the held-out images."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.models.demo import random_model  # noqa: E402
from lorakit.models.demo_data import write_concept_folder  # noqa: E402
from lorakit.models.save import save_checkpoint  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.logger import TrainLogger  # noqa: E402
from lorakit.train.run import train  # noqa: E402
from lorakit.train.validation import Validator  # noqa: E402


def test_validation_draws_from_validation_seed_over_max_validation_steps(tmp_path, monkeypatch):
    save_checkpoint(random_model("tiny-sd", seed=0), tmp_path / "sd.safetensors", dtype=None)
    write_concept_folder(tmp_path / "data", n=6, repeats=1)
    validators, logged = [], []
    make = Validator.__init__

    def recording(self, *args, **kwargs):
        make(self, *args, **kwargs)
        validators.append(self)

    monkeypatch.setattr(Validator, "__init__", recording)
    monkeypatch.setattr(TrainLogger, "validation", lambda self, kind, value, *rest: logged.append(value))
    train(load_train_config(overrides=dict(
        pretrained_model_name_or_path=str(tmp_path / "sd.safetensors"), train_data_dir=str(tmp_path / "data"),
        resolution="64", output_dir=str(tmp_path / "out"), output_name="t", network_dim=4, learning_rate=1e-2,
        max_train_steps=1, train_batch_size=2, seed=3, max_data_loader_n_workers=0, validation_split=0.5,
        validation_seed=7, max_validation_steps=1)))
    (validator,) = validators
    # 6 images, validation_split 0.5: 3 held out = 2 batches of 2, of which max_validation_steps keeps 1
    assert (validator.seed, len(validator.batches)) == (7, 1)  # validation_seed, not the training seed 3
    (epoch_loss,) = logged
    # each validation draws anew from validation_seed: the same loss again, another one from another seed
    assert validator() == epoch_loss
    validator.seed = 8
    assert validator() != epoch_loss
