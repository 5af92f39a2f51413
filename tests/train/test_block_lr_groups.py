"""Optimizer parameter groups as sd-scripts' networks.lora builds them, and resumes of states saved with
another group order."""

from __future__ import annotations

import pytest
import torch

from lorakit.network.create import create_network
from lorakit.train.state import Progress, StateError, load_state, save_state

from ..network.tiny import tiny_model


def _network():
    unet, tes = tiny_model("sd1")
    return create_network(unet, tes, preset="attn-mlp", dim=4)


def _optimizer(groups):
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return optimizer, scheduler


def _save_trained_state(folder, net, groups):
    optimizer, scheduler = _optimizer(groups)
    torch.manual_seed(0)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler.step()
    save_state(folder, net.state_dict(), optimizer, scheduler, Progress(config_digest="same"))
    return optimizer


def test_a_state_saved_with_the_unet_groups_first_resumes_onto_the_right_groups(tmp_path):
    """Earlier lorakit put the U-Net's groups first; torch maps a state onto the groups by position."""
    net = _network()
    groups = net.optimizer_param_groups(unet_lr=1e-3, text_encoder_lr=5e-4)
    assert [g["name"] for g in groups] == ["text_encoder", "unet"]
    old = _save_trained_state(tmp_path / "s", net, list(reversed(groups)))
    optimizer, scheduler = _optimizer(net.optimizer_param_groups(unet_lr=1e-3, text_encoder_lr=5e-4))
    load_state(tmp_path / "s", net, optimizer, scheduler, "same")
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("text_encoder", 5e-4), ("unet", 1e-3)]
    assert scheduler.base_lrs == [5e-4, 1e-3]
    for p in net.parameters():
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], old.state[p]["exp_avg"])


def test_a_state_with_other_groups_is_refused(tmp_path):
    net = _network()
    groups = net.optimizer_param_groups(unet_lr=1e-3, text_encoder_lr=5e-4)
    renamed = [{**g, "name": "unet_w0.5"} if g["name"] == "unet" else g for g in groups]
    _save_trained_state(tmp_path / "s", net, renamed)
    optimizer, scheduler = _optimizer(net.optimizer_param_groups(unet_lr=1e-3, text_encoder_lr=5e-4))
    with pytest.raises(StateError, match=r"optimizer parameter groups \(text_encoder, unet_w0.5\) are not this "
                                         r"run's \(text_encoder, unet\)"):
        load_state(tmp_path / "s", net, optimizer, scheduler, "same")


def test_block_lr_weights_make_one_group_per_block_logged_under_sd_scripts_names():
    """sd-scripts' prepare_optimizer_params: with block lr weights, one group per U-Net block (and its LoRA+ group),
    described f"unet_block{idx}" (+ " plus"), which train_network logs as lr/<description>."""
    from lorakit.train.logger import lr_logs

    unet, tes = tiny_model("sd1")
    net = create_network(unet, tes, preset="attn-mlp", dim=4, down_lr_weight="1,0.5,0,0.25", mid_lr_weight="0.5",
                         loraplus_unet_lr_ratio=4)
    groups = net.optimizer_param_groups(unet_lr=1e-3, text_encoder_lr=5e-4)
    blocks = [1, 4, 5, 7, 8, 12, *range(16, 25)]  # IN02's weight is 0: its transformer has no adapter
    names = ["lr/textencoder"] + [f"lr/unet_block{i}{plus}" for i in blocks for plus in ("", " plus")]
    logs = lr_logs([g["lr"] for g in groups], groups)
    assert list(logs) == names
    assert logs["lr/unet_block1"] == pytest.approx(5e-4) and logs["lr/unet_block1 plus"] == pytest.approx(2e-3)
    assert logs["lr/unet_block4"] == pytest.approx(1e-3) and logs["lr/unet_block12"] == pytest.approx(5e-4)
    assert logs["lr/unet_block24"] == pytest.approx(1e-3)


def test_cyclic_lrs_per_group_momenta_follow_their_groups(tmp_path):
    """CyclicLR keeps each group's momentum bounds in its state: they are reordered with the groups too."""
    net = _network()
    groups = net.optimizer_param_groups(unet_lr=1e-3, text_encoder_lr=5e-4)

    def cyclic(groups):
        optimizer = torch.optim.SGD(groups, lr=1e-3, momentum=0.9)
        return optimizer, torch.optim.lr_scheduler.CyclicLR(optimizer, [1e-4, 2e-4], [1e-3, 2e-3],
                                                            base_momentum=[0.7, 0.8], max_momentum=[0.9, 0.95])

    optimizer, scheduler = cyclic(list(reversed(groups)))  # unet first, as an earlier lorakit saved it
    save_state(tmp_path / "s", net.state_dict(), optimizer, scheduler, Progress(config_digest="same"))
    optimizer, scheduler = cyclic(net.optimizer_param_groups(unet_lr=1e-3, text_encoder_lr=5e-4))
    load_state(tmp_path / "s", net, optimizer, scheduler, "same")
    assert scheduler.base_momentums == [0.8, 0.7] and scheduler.max_momentums == [0.95, 0.9]
    assert scheduler.max_lrs == [2e-3, 1e-3]


def test_a_deepspeed_state_with_groups_in_another_order_is_refused(tmp_path):
    """DeepSpeed's engine restores its optimizer by group position (optimizer None here): a state whose groups'
    learning rates come in another order is refused rather than loaded onto the wrong adapters."""
    net = _network()
    groups = net.optimizer_param_groups(unet_lr=1e-3, text_encoder_lr=5e-4)

    def deepspeed_state(folder, groups):  # the engine's own files stand in as an empty folder
        _, scheduler = _optimizer(groups)
        save_state(folder, net.state_dict(), None, scheduler, Progress(config_digest="same"),
                   deepspeed=(2, lambda path: path.mkdir()))

    deepspeed_state(tmp_path / "s", list(reversed(groups)))
    _, scheduler = _optimizer(net.optimizer_param_groups(unet_lr=1e-3, text_encoder_lr=5e-4))
    with pytest.raises(StateError, match=r"its parameter groups come in another order \(learning rates \[0.001, "
                                         r"0.0005\], this run's \[0.0005, 0.001\]\)"):
        load_state(tmp_path / "s", net, None, scheduler, "same")
    deepspeed_state(tmp_path / "same", groups)
    load_state(tmp_path / "same", net, None, scheduler, "same")  # the same order: resumed
