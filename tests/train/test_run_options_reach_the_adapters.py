"""Options of a run that reach what it trains and writes, as sd-scripts' train_network.py uses them: network_alpha
and network_dropout go to create_network (network_alpha, neuron_dropout=args.network_dropout), so the saved alpha
tensors are the network_alpha given (networks/lora.py would use 1.0 for none) and the adapters drop out while
training; max_grad_norm clips the step's gradient (accelerator.clip_grad_norm_); network_train_text_encoder_only
saves no U-Net adapter (LoRANetwork.apply_to drops them); and the {output_name}_config.toml written to the output
folder leaves wandb_api_key out, as sd-scripts' read_config_from_file deletes it from the config it writes.

The loss is a stand-in, the sum of every adapter weight, whose gradient is 1 for each of the N weights: its norm
is sqrt(N), so with max_grad_norm 1 one plain SGD step (lr 0.125) moves each weight by -0.125 / (sqrt(N) + 1e-6),
torch's clip_grad_norm_ coefficient; lora_up starts at 0 and ends there."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import lorakit.network.create as create  # noqa: E402
import lorakit.train.run as run  # noqa: E402
from lorakit.formats.safetensors_io import load_file  # noqa: E402
from lorakit.models.demo_data import write_concept_folder  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402

SGD = dict(learning_rate=0.125, optimizer_type="SGDNesterov", optimizer_args=["momentum=0", "nesterov=False"],
           lr_scheduler="constant")


def _one_step(root, **overrides):
    """A one-step run with the stand-in loss: the saved file, the network and the text encoders it was made on."""
    made = []
    make_network = create.create_network

    def recording(unet, text_encoders, **kwargs):
        made.append((make_network(unet, text_encoders, **kwargs), text_encoders))
        return made[-1][0]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(create, "create_network", recording)
        patch.setattr(run, "batch_loss", lambda ctx, batch, generator, train_text: sum(
            p.sum() for p in made[0][0].parameters() if p.requires_grad))
        write_concept_folder(root / "data", n=1, repeats=1, size=64)
        final = run.train(load_train_config(overrides=dict(
            pretrained_model_name_or_path="demo:tiny-sd", train_data_dir=str(root / "data"), resolution="64",
            output_dir=str(root / "out"), output_name="t", network_dim=2, max_train_steps=1, train_batch_size=1,
            seed=3, max_data_loader_n_workers=0, **SGD, **overrides)))
    return final, *made[0]


@pytest.fixture(scope="module")
def step(tmp_path_factory):
    return _one_step(tmp_path_factory.mktemp("options"), network_alpha=2, network_dropout=0.5, max_grad_norm=1.0,
                     wandb_api_key="secret-key-123")


def test_the_saved_alpha_is_network_alpha(step):
    alphas = [v for k, v in load_file(step[0])[0].items() if k.endswith(".alpha")]
    assert alphas and all(a.item() == 2.0 for a in alphas)


def test_the_adapters_drop_out_while_training(step):
    _, net, (encoder,) = step
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
    with torch.no_grad():
        net.train()
        trained = [encoder(ids)[0] for _ in range(2)]
        net.eval()
        evaluated = [encoder(ids)[0] for _ in range(2)]
    assert not torch.equal(*trained) and torch.equal(*evaluated)


def test_max_grad_norm_clips_the_gradient(step):
    final, net, _ = step
    count = sum(p.numel() for p in net.parameters() if p.requires_grad)
    expected = -0.125 / (math.sqrt(count) + 1e-6)
    ups = [v for k, v in load_file(final)[0].items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.allclose(u, torch.full_like(u, expected), rtol=1e-4, atol=0) for u in ups)


def test_the_config_written_to_the_output_folder_has_no_api_key(step):
    text = (step[0].parent / "t_config.toml").read_text()
    assert "network_alpha = 2" in text and "secret-key-123" not in text and "wandb_api_key" not in text


def test_text_encoder_only_saves_no_unet_adapter(tmp_path):
    final, _, _ = _one_step(tmp_path, network_train_text_encoder_only=True)
    keys = load_file(final)[0]
    assert keys and all(k.startswith("lora_te_") for k in keys)
