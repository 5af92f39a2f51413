"""What many trainer tests share: a folder with the random tiny SD checkpoint (and SDXL's when asked) and concept
images, and the options of a small run on it."""

from __future__ import annotations

from pathlib import Path

from lorakit.models.demo import random_model
from lorakit.models.demo_data import write_concept_folder
from lorakit.models.save import save_checkpoint


def make_base(root: Path, images: int = 6, repeats: int = 1, sdxl: bool = False) -> Path:
    """``root`` with sd.safetensors (and sdxl.safetensors), and ``images`` concept images in data/ (none: 0)."""
    save_checkpoint(random_model("tiny-sd", seed=0), root / "sd.safetensors", dtype=None)
    if sdxl:
        save_checkpoint(random_model("tiny-sdxl", seed=0), root / "sdxl.safetensors", dtype=None)
    if images:
        write_concept_folder(root / "data", n=images, repeats=repeats)
    return root


def run_options(base: Path, out: Path, *layers: dict) -> dict:
    """A run on ``base``'s SD checkpoint and images at 64 px, batches of 2, saving to ``out`` as "t"; each of
    ``layers`` adds or replaces options, the later ones winning."""
    values = {"pretrained_model_name_or_path": str(base / "sd.safetensors"), "train_data_dir": str(base / "data"),
              "resolution": "64", "output_dir": str(out), "output_name": "t", "seed": 3,
              "max_data_loader_n_workers": 0, "train_batch_size": 2}
    for layer in layers:
        values.update(layer)
    return values


def train_with_stand_in_loss(root: Path, **options):
    """A run on demo:tiny-sd over 2 concept images at 64 px (batches of 1, seed 3) whose loss is a stand-in, the sum
    of every adapter weight (gradient 1 for each); ``options`` add or replace run options. Returns the saved file
    and, per batch, its noise generator's first draw and the global RNG's (the dropouts')."""
    import pytest
    import torch

    import lorakit.network.create as create
    import lorakit.train.run as run
    from lorakit.train.config import load_train_config

    networks, draws = [], []
    make_network = create.create_network

    def recording(*args, **kwargs):
        networks.append(make_network(*args, **kwargs))
        return networks[-1]

    def stand_in_loss(ctx, batch, generator, train_text):
        draws.append((torch.rand(4, generator=generator), torch.rand(4)))
        return sum(p.sum() for p in networks[0].parameters() if p.requires_grad)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(create, "create_network", recording)
        patch.setattr(run, "batch_loss", stand_in_loss)
        write_concept_folder(root / "data", n=2, repeats=1, size=64)
        final = run.train(load_train_config(overrides=dict(
            pretrained_model_name_or_path="demo:tiny-sd", train_data_dir=str(root / "data"), resolution="64",
            output_dir=str(root / "out"), output_name="t", network_dim=2, train_batch_size=1, seed=3,
            max_data_loader_n_workers=0, lr_scheduler="constant", **options)))
    return final, draws
