"""gradient_checkpointing reaches the text encoders when they train (sd-scripts' train_network.py enables it on every
text encoder it trains and puts them in training mode): the adapters' gradients stay the same, the activations
kept for the backward pass shrink, and frozen text encoders are left alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.safetensors_io import load_file  # noqa: E402
from lorakit.models.demo_data import write_concept_folder  # noqa: E402
from lorakit.models.load import load_model  # noqa: E402
from lorakit.models.text import tokenize  # noqa: E402
from lorakit.network.create import create_network  # noqa: E402
from lorakit.train import run  # noqa: E402
from lorakit.train.base_model import checkpoint_text_encoders  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.step import StepContext, _conditioning  # noqa: E402

CAPTIONS = ["a red circle on a white background", "a blue square on a green background", "a black triangle"]


def _context(model) -> StepContext:
    return StepContext(model=model, noise_scheduler=None, noise=None, loss=None, device=torch.device("cpu"),
                       weight_dtype=torch.float32, autocast_dtype=None, clip_skip=None, max_token_length=None)


def _batch(model):
    return SimpleNamespace(captions=CAPTIONS, input_ids=[tokenize(t, CAPTIONS) for t in model.tokenizers],
                           text_hidden=None)


def _checkpointed(encoder) -> bool:
    """Whether the encoder's layers recompute in the backward pass (transformers' flag, under either API name)."""
    return any(getattr(module, "gradient_checkpointing", False) for module in encoder.modules())


def _step(model, net, train_text=True):
    """One conditioning forward and backward: (the text-encoder adapters' gradients, bytes autograd kept for the
    backward pass apart from weights)."""
    weights = {p.untyped_storage().data_ptr() for p in [*net.parameters(), *(p for te in model.text_encoders for p in te.parameters())]}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    net.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        emb = _conditioning(_context(model), _batch(model), train_text=train_text)
    loss = emb.hidden.square().mean() + (emb.pooled.square().mean() if emb.pooled is not None else 0)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters()
             if name.startswith("lora_te") and p.grad is not None}  # (SDXL's encoder 1 ends a layer early)
    return grads, sum(kept.values())


@pytest.mark.parametrize("name", ["demo:tiny-sd", "demo:tiny-sdxl"])
def test_trained_text_encoders_are_checkpointed_with_the_same_gradients(name):
    model = load_model(name)
    torch.manual_seed(0)
    net = create_network(model.unet, model.text_encoders, dim=4, alpha=2).apply()
    net.train()
    with torch.no_grad():  # lora_up starts at zero: make every adapter's gradient depend on the others
        for p in net.parameters():
            p.normal_(0, 0.1)
    plain_grads, plain_bytes = _step(model, net)
    assert not any(map(_checkpointed, model.text_encoders))

    checkpoint_text_encoders(model.text_encoders)  # what a run with gradient_checkpointing does when they train
    grads, kept = _step(model, net)
    assert all(_checkpointed(te) and te.training for te in model.text_encoders)
    assert grads and all(grad.abs().sum() > 0 for grad in grads.values())
    assert grads.keys() == plain_grads.keys()
    for key, grad in plain_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-5, atol=1e-7, msg=key)
    assert kept < plain_bytes / 2, (kept, plain_bytes)


def test_lorakit_train_checkpoints_the_text_encoder(tmp_path, monkeypatch):
    write_concept_folder(tmp_path / "data", n=4, repeats=1)
    seen = []
    real = run.batch_loss

    def recording(ctx, batch, generator, train_text):  # set before the first step (so before torch.compile)
        seen.append([(_checkpointed(te), te.training) for te in ctx.model.text_encoders])
        return real(ctx, batch, generator, train_text)

    monkeypatch.setattr(run, "batch_loss", recording)
    outputs = []
    for checkpointing in (False, True):
        seen.clear()
        config = load_train_config(overrides=dict(
            pretrained_model_name_or_path="demo:tiny-sd", train_data_dir=str(tmp_path / "data"), resolution="64",
            output_dir=str(tmp_path / f"out{checkpointing}"), output_name="t", network_dim=2, network_alpha=1,
            learning_rate=1e-2, max_train_steps=2, train_batch_size=2, seed=3, cache_latents=True,
            max_data_loader_n_workers=0, optimizer_type="AdamW", gradient_checkpointing=checkpointing))
        outputs.append(load_file(run.train(config))[0])
        assert seen == [[(checkpointing, checkpointing)]] * 2
    plain, checkpointed = outputs
    assert any(k.startswith("lora_te") for k in plain)
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-6, msg=key)


def test_frozen_text_encoders_are_left_alone(tmp_path, monkeypatch):
    """A U-Net-only run with gradient_checkpointing leaves its text encoders as they are (not checkpointed, in
    eval mode)."""
    write_concept_folder(tmp_path / "data", n=2, repeats=1)
    seen = []
    real = run.batch_loss

    def recording(ctx, batch, generator, train_text):
        seen.append([(_checkpointed(te), te.training) for te in ctx.model.text_encoders])
        return real(ctx, batch, generator, train_text)

    monkeypatch.setattr(run, "batch_loss", recording)
    run.train(load_train_config(overrides=dict(
        pretrained_model_name_or_path="demo:tiny-sd", train_data_dir=str(tmp_path / "data"), resolution="64",
        output_dir=str(tmp_path / "out"), output_name="t", network_dim=2, learning_rate=1e-2, max_train_steps=1,
        train_batch_size=2, seed=3, max_data_loader_n_workers=0, optimizer_type="AdamW",
        gradient_checkpointing=True, network_train_unet_only=True)))
    assert seen == [[(False, False)]]
