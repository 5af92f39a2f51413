"""Step saves as docs/training.md states them, as sd-scripts' train_network.py makes them (`global_step %
save_every_n_steps == 0`): a last step that is not a multiple gets only the final file."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402

from .tiny_run import make_base, run_options  # noqa: E402


def test_a_last_step_that_is_not_a_multiple_gets_no_step_file(tmp_path):
    base = make_base(tmp_path / "base", images=2)
    out = tmp_path / "out"
    train(load_train_config(overrides=run_options(base, out, {"max_train_steps": 3, "save_every_n_steps": 2})))
    assert sorted(p.name for p in out.iterdir()) == ["t-step00000002.safetensors", "t.safetensors", "t_config.toml"]
