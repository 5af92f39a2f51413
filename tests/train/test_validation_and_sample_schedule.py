"""When a run validates and samples, as sd-scripts' train_network.py decides it: validate_every_n_epochs 2
validates at the end of epochs 2, 4, ... (sd-scripts: (epoch + 1) % validate_every_n_epochs == 0, its epoch
counted from 0), and a step's samples are drawn once, even when the end of training comes at a step that
sample_every_n_steps already sampled. The losses and the sampler are stand-ins: only the schedule is checked."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import lorakit.network.create as create  # noqa: E402
import lorakit.train.run as run  # noqa: E402
import lorakit.train.sample_prompts as sample_prompts  # noqa: E402
import lorakit.train.validation as validation  # noqa: E402
from lorakit.models.demo_data import write_concept_folder  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.logger import TrainLogger  # noqa: E402


def _schedule(root, **options):
    """A run of 1 step per epoch (4 images, 2 held out, batches of 2) with ``options``: the validations (kind, step,
    epoch) and the sample draws (step, epoch)."""
    networks, validations, draws = [], [], []
    make_network = create.create_network

    def recording(*args, **kwargs):
        networks.append(make_network(*args, **kwargs))
        return networks[-1]

    def drawing(model, prompts, folder, name, step, **kwargs):
        draws.append((step, kwargs.get("epoch")))
        return []

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(create, "create_network", recording)
        patch.setattr(run, "batch_loss", lambda ctx, batch, generator, train_text: sum(
            p.sum() for p in networks[0].parameters() if p.requires_grad))
        patch.setattr(validation, "batch_loss", lambda *args, **kwargs: torch.tensor(1.0))
        patch.setattr(sample_prompts, "draw_samples", drawing)
        patch.setattr(TrainLogger, "validation",
                      lambda self, kind, loss, step, epoch: validations.append((kind, step, epoch)))
        write_concept_folder(root / "data", n=4, repeats=1, size=64)
        (root / "prompts.txt").write_text("a purple circle --w 64 --h 64 --d 5 --s 1\n")
        run.train(load_train_config(overrides=dict(
            pretrained_model_name_or_path="demo:tiny-sd", train_data_dir=str(root / "data"), resolution="64",
            output_dir=str(root / "out"), output_name="t", network_dim=2, learning_rate=1e-3, train_batch_size=2,
            seed=3, max_data_loader_n_workers=0, validation_split=0.5, sample_prompts=str(root / "prompts.txt"),
            sample_sampler="ddim", **options)))
    return validations, draws


@pytest.fixture(scope="module")
def schedule(tmp_path_factory):
    """3 epochs of 1 step each: the validations (kind, epoch) and the sample draws (step, epoch)."""
    validations, draws = _schedule(tmp_path_factory.mktemp("schedule"), max_train_epochs=3, validate_every_n_epochs=2,
                                   sample_every_n_steps=3)
    return [(kind, epoch) for kind, _, epoch in validations], draws


def test_validate_every_n_epochs_validates_at_its_multiples(schedule):
    assert schedule[0] == [("epoch", 2)]


def test_the_last_step_is_sampled_once(schedule):
    assert schedule[1] == [(3, None)]  # at step 3, the last: the end of training does not draw it again


def test_step_validations_and_epoch_samples_come_at_their_multiples(tmp_path):
    """sd-scripts validates at the steps where global_step % validate_every_n_steps == 0 (and at each epoch whose
    number, counted from 1, validate_every_n_epochs divides), and samples at the end of the epochs
    sample_every_n_epochs divides: 4 epochs of 1 step, every 2 steps, every 4 epochs, samples every 2 epochs. The
    last epoch's samples are the end of training's draw, named by that epoch."""
    validations, draws = _schedule(tmp_path, max_train_epochs=4, validate_every_n_steps=2, validate_every_n_epochs=4,
                                   sample_every_n_epochs=2)
    assert validations == [("step", 2, 2), ("step", 4, 4), ("epoch", 4, 4)]
    assert draws == [(2, 2), (4, 4)]
