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
