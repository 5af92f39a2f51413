"""algo=full trains each weight's change; LyCORIS' full trains the whole weight once applied. Optimizers whose step
does not depend on the parameter's offset train the two alike; Adafactor's scale_parameter does not, and the
config notes it before any model loads."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from lorakit.network.create import create_network
from lorakit.train.config import load_train_config

lycoris = pytest.importorskip("lycoris")
optimization = pytest.importorskip("transformers.optimization")

NOTE = "algo=full with Adafactor's scale_parameter"


def _weight_change(kind: str, make_optimizer, steps: int = 3) -> torch.Tensor:
    """The Linear's weight and bias change after `steps` steps of full fine-tuning by lorakit or LyCORIS."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    model[0].weight.data.normal_(0, 0.03)  # an SD-like weight RMS
    model[0].bias.data.normal_(0, 0.03)
    before = copy.deepcopy(model[0])
    x, target = torch.randn(32, 64), torch.randn(32, 64)
    if kind == "lycoris":
        net = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=1, algo="full")
        net.apply_to()
    else:
        net = create_network(model, algo="full").apply()
    optimizer = make_optimizer(list(net.parameters()))
    for _ in range(steps):
        optimizer.zero_grad()
        ((model(x) - target) ** 2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        probe = torch.cat([torch.eye(64), torch.zeros(1, 64)])  # the weight's columns, then the bias alone
        return model(probe) - before(probe)


def test_offset_free_optimizers_train_full_as_lycoris_does():
    makers = [lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0),
              lambda params: optimization.Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False,
                                                    warmup_init=False),
              lambda params: optimization.Adafactor(params, lr=None, relative_step=True, scale_parameter=False,
                                                    warmup_init=False)]
    # as sd-scripts builds them: lr 1 for the adaptive ones
    for module, name, lr in (("lion_pytorch", "Lion", 1e-4), ("prodigyopt", "Prodigy", 1.0),
                             ("dadaptation", "DAdaptAdam", 1.0)):
        cls = getattr(pytest.importorskip(module), name)
        makers.append(lambda params, cls=cls, lr=lr: cls(params, lr=lr))
    for make in makers:
        ours, theirs = _weight_change("lorakit", make), _weight_change("lycoris", make)
        # Prodigy's and D-Adaptation's first steps are tiny (d0 = 1e-6): the tolerance follows the change's size,
        # plus a few float32 ulps of the weights (< 0.15), in which LyCORIS' W + diff rounds the change
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item() + 3e-8)


def test_parameter_scaled_adafactor_steps_full_by_its_floor_not_by_the_weights_rms():
    """What the note says: sd-scripts' default Adafactor (relative_step, scale_parameter) steps LyCORIS' full by the
    weight's RMS (0.03 here) and lorakit's by Adafactor's floor 1e-3: ~30x smaller."""
    default = lambda params: optimization.Adafactor(params, lr=None, relative_step=True,  # noqa: E731
                                                     scale_parameter=True, warmup_init=False)
    ratio = _weight_change("lycoris", default, steps=1).norm() / _weight_change("lorakit", default, steps=1).norm()
    assert 25 < ratio < 35


@pytest.mark.parametrize("overrides, noted", [
    ({"network_args": ["algo=full"], "optimizer_type": "Adafactor"}, True),
    ({"network_args": ["algo=native"], "optimizer_type": "adafactor", "optimizer_args": ["relative_step=False"],
      "learning_rate": 1e-5}, True),
    ({"network_args": ["algo=full"], "optimizer_type": "Adafactor", "learning_rate": 1e-5,
      "optimizer_args": ["scale_parameter=False", "relative_step=False", "warmup_init=False"]}, False),
    ({"network_args": ["algo=lora"], "optimizer_type": "Adafactor"}, False),  # a LoRA starts at 0 in LyCORIS too
    ({"network_args": ["algo=full"], "optimizer_type": "AdamW"}, False),
])
def test_the_config_notes_full_with_a_parameter_scaled_adafactor(overrides, noted):
    notes = load_train_config(overrides=overrides).warnings
    assert any(n.startswith(NOTE) for n in notes) == noted
