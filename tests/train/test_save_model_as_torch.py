"""save_model_as = "ckpt" / "pt": the adapter as a plain state dict (sd-scripts' torch.save of it), the same tensors
as the safetensors file of the same run, and no temporary file left beside it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402

from .tiny_run import make_base, run_options  # noqa: E402


@pytest.mark.parametrize("kind", ["ckpt", "pt"])
def test_a_torch_file_holds_the_safetensors_files_tensors(tmp_path, kind):
    base = make_base(tmp_path / "base", images=2)
    common = {"network_dim": 2, "max_train_steps": 1, "learning_rate": 1e-2}
    reference, _ = load_file(train(load_train_config(overrides=run_options(base, tmp_path / "s", common))))
    path = train(load_train_config(overrides=run_options(base, tmp_path / "t", common, {"save_model_as": kind})))
    assert path.name == f"t.{kind}"
    tensors = torch.load(path, weights_only=True)
    assert tensors.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(tensors[key], value), key
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, "t_config.toml"]
