"""fp8_base / fp8_base_unet with the options sd-scripts' train_network.py runs them with: full_bf16 / full_fp16 (the
adapter in the compute dtype, so the fused adapter paths run on the cast-up weight) and gradient_checkpointing
(each block recomputed in backward). Both used to fail at the first backward: the weight kept for backward had
been cast back to float8 by then."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402

from .tiny_run import make_base, run_options  # noqa: E402

# SGD: the update follows the gradient, so fp8 rounding shows as a small change (Adam's first step is sign-like)
SHORT_RUN = dict(max_train_steps=2, optimizer_type="SGDNesterov", learning_rate=1e-2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"), images=4)


def _adapter(base, out, **options) -> dict[str, torch.Tensor]:
    path = train(load_train_config(overrides=run_options(base, out, SHORT_RUN, options)))
    tensors = {k: v.float() for k, v in load_file(path)[0].items()}
    assert all(torch.isfinite(v).all() for v in tensors.values())
    return tensors


def _relative_change(a: dict, b: dict) -> float:
    """How far the trained up factors of `a` are from `b`'s (the down factors start random, the same in both)."""
    ups = [k for k in b if k.endswith("lora_up.weight")]
    num = sum((a[k] - b[k]).norm() ** 2 for k in ups) ** 0.5
    den = sum(b[k].norm() ** 2 for k in ups) ** 0.5
    assert den > 0
    return (num / den).item()


@pytest.mark.parametrize("precision, fp8", [(dict(mixed_precision="bf16", full_bf16=True), "fp8_base"),
                                            (dict(mixed_precision="fp16", full_fp16=True), "fp8_base_unet")])
def test_fp8_with_full_half_precision_trains_close_to_the_run_without_fp8(base, tmp_path, precision, fp8):
    with_fp8 = _adapter(base, tmp_path / "fp8", **precision, **{fp8: True})
    without = _adapter(base, tmp_path / "half", **precision)
    assert 1e-4 < _relative_change(with_fp8, without) < 0.3  # fp8 rounding shows; the run stays close


def test_fp8_base_with_gradient_checkpointing_gives_the_same_run(base, tmp_path):
    """Recomputing a block casts the same float8 weights up again: the adapter is the one of the run without it."""
    fp8 = dict(mixed_precision="bf16", fp8_base=True)
    checkpointed = _adapter(base, tmp_path / "ckpt", gradient_checkpointing=True, **fp8)
    plain = _adapter(base, tmp_path / "plain", **fp8)
    assert checkpointed.keys() == plain.keys()
    assert all(torch.equal(checkpointed[k], plain[k]) for k in plain)
