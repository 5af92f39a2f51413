"""dim_from_weights from a Diag-OFT/BOFT file trained without a constraint: the file's alpha sits just above its
blocks' norm (A1111 reads 0 as no rotation), and the file's ss_network_args say there was no constraint, so the
continued run trains unconstrained instead of being capped at the norm the first run reached."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402

from .tiny_run import make_base, run_options  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("oft_dim_from_weights"), images=2)


def _alphas(path):
    tensors, _ = load_file(path)
    return {k: float(v) for k, v in tensors.items() if k.endswith(".alpha")}


@pytest.mark.parametrize("algo, constraint, spelling", [("diag-oft", None, None), ("boft", None, None),
                                                        ("diag-oft", "1e-3", "constraint"),
                                                        ("diag-oft", "1e-3", "constrain")])  # LyCORIS' alias
def test_a_continued_run_keeps_the_first_runs_constraint(base, tmp_path, algo, constraint, spelling):
    args = [f"algo={algo}"] + ([f"{spelling}={constraint}"] if constraint else [])
    common = {"network_module": "lycoris.kohya", "network_dim": 8, "network_args": args, "learning_rate": 3e-2,
              "network_train_unet_only": True, "optimizer_type": "AdamW", "max_train_steps": 2}
    first = train(load_train_config(overrides=run_options(base, tmp_path / "a", common)))
    second = train(load_train_config(overrides=run_options(base, tmp_path / "b", common, {
        "network_weights": str(first), "dim_from_weights": True})))
    before, after = _alphas(first), _alphas(second)
    assert before.keys() == after.keys()
    grown = [k for k in before if after[k] > before[k] * 1.01]
    if constraint:  # a real bound: the saved alpha is the bound both times
        assert all(after[k] == pytest.approx(before[k]) for k in before)
    else:  # the saved alpha follows |Q|, which grows past the first run's when nothing caps it
        assert len(grown) > len(before) // 2, (len(grown), len(before))
