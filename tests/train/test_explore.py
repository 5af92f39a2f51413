"""`lorakit explore`: the application rates of trained networks learnt on images (sd-scripts' appl_weights), on
small random SD1/SDXL models. The rated forward and its gradient are checked against block multipliers in
tests/network/test_rates.py; here, the run: what trains, the penalty, the file, resume and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit import create_network  # noqa: E402
from lorakit.cli import main  # noqa: E402
from lorakit.formats.safetensors_io import load_file, read_metadata  # noqa: E402
from lorakit.models.demo import random_model  # noqa: E402
from lorakit.models.demo_data import write_concept_folder  # noqa: E402
from lorakit.models.save import save_checkpoint  # noqa: E402
from lorakit.network.blocks import LBW26  # noqa: E402
from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import TrainingError, train  # noqa: E402


def _network_file(model, path, seed, **options):
    net = create_network(model.unet, model.text_encoders, dim=4, alpha=2, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    net.save(path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("explore")
    for kind in ("tiny-sd", "tiny-sdxl"):
        model = random_model(kind, seed=0)
        save_checkpoint(model, root / f"{kind}.safetensors", dtype=None)
        _network_file(model, root / f"{kind}-lora.safetensors", seed=1, preset="attn-mlp")
    _network_file(random_model("tiny-sd", seed=0), root / "tiny-sd-loha.safetensors", seed=2, algo="loha")
    write_concept_folder(root / "data", n=4, repeats=1)
    return root


def _config(base, out, kind="tiny-sd", **overrides):
    values = dict(pretrained_model_name_or_path=str(base / f"{kind}.safetensors"), train_data_dir=str(base / "data"),
                  resolution="64", output_dir=str(out), output_name="rates", train_batch_size=2, seed=3,
                  network_weights=[str(base / f"{kind}-lora.safetensors")], max_train_steps=3,
                  learning_rate=0.1, optimizer_type="torch.optim.SGD", lr_scheduler="constant",
                  cache_latents=True, max_data_loader_n_workers=0)
    values.update(overrides)
    return load_train_config(overrides=values)


def test_the_rates_train_and_the_penalty_pulls_each_block_down(base, tmp_path):
    """Plain SGD at lr 0.1 with application_loss_weight 0.5, 3 steps: a block that holds no adapter of the
    attn-mlp preset (IN00: conv_in; IN03/IN06/IN09..11, OUT00..02: no attention) gets only the penalty's gradient,
    1 per step for a positive rate, so it ends at exactly 0.5 - 3 x 0.1 x 0.5 = 0.35 (max_grad_norm, 1 by default,
    does not clip the rates, as in sd-scripts); the others also follow the loss."""
    out = train(_config(base, tmp_path, application_loss_weight=0.5), explore=True)
    assert out == tmp_path / "rates.safetensors"
    tensors, _ = load_file(out)
    assert set(tensors) == {"weights"} and tensors["weights"].shape == (26,)  # sd-scripts' key, lbw26 for SD1
    rates = dict(zip(LBW26.names, tensors["weights"].tolist()))
    for empty in ("IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02"):
        assert rates[empty] == pytest.approx(0.35, abs=1e-7), empty
    held = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID") + tuple(f"OUT{k:02d}" for k in range(3, 12))
    assert all(abs(rates[b] - 0.35) > 1e-6 for b in held)  # the loss moved these too
    meta = read_metadata(out)
    assert meta["lorakit_application_layout"] == "lbw26"
    assert set(meta) == {"lorakit_application_layout", "lorakit_application_rates"}  # not a network: no ss_*
    (entry,) = json.loads(meta["lorakit_application_rates"])
    assert entry["network"].endswith("tiny-sd-lora.safetensors") and entry["rates"]["MID"] == pytest.approx(
        rates["MID"])


def test_several_networks_sdxl_and_resume(base, tmp_path):
    """Two SD1 networks get 2 x 26 rates; an SDXL network gets seed 003's 20; a stopped run resumed equals the
    uninterrupted one."""
    two = [str(base / "tiny-sd-lora.safetensors"), str(base / "tiny-sd-loha.safetensors")]
    full = train(_config(base, tmp_path / "full", network_weights=two, optimizer_type="AdamW"), explore=True)
    assert load_file(full)[0]["weights"].shape == (52,)
    stopped = _config(base, tmp_path / "part", network_weights=two, optimizer_type="AdamW")
    assert train(stopped, stop_at_step=1, explore=True) is None
    resumed = train(_config(base, tmp_path / "part", network_weights=two, optimizer_type="AdamW",
                            resume=str(tmp_path / "part" / "rates-step00000001-state")), explore=True)
    assert torch.equal(load_file(full)[0]["weights"], load_file(resumed)[0]["weights"])

    xl = train(_config(base, tmp_path / "xl", kind="tiny-sdxl", max_train_steps=1), explore=True)
    assert load_file(xl)[0]["weights"].shape == (20,) and read_metadata(xl)["lorakit_application_layout"] == "sdxl20"


def test_refusals_name_the_option(base, tmp_path, capsys):
    with pytest.raises(ValueError, match="network_weights names no adapter file"):
        train(_config(base, tmp_path, network_weights=[]), explore=True)
    lora = base / "tiny-sd-lora.safetensors"
    with pytest.raises(ValueError, match=r"network_weights .*tiny-sd-lora.safetensors: is a file this run would "
                                         r"write its rates to"):  # the explored adapter, overwritten
        train(_config(base, tmp_path, output_dir=str(base), output_name="tiny-sd-lora"), explore=True)
    assert lora.is_file() and "weights" not in load_file(lora)[0]
    with pytest.raises(ValueError, match="application_layout='lbw12': not a sd block layout"):
        train(_config(base, tmp_path, application_layout="lbw12"), explore=True)
    with pytest.raises(TrainingError, match="lorakit train starts from one adapter file, got 2"):
        train(_config(base, tmp_path, network_weights=[str(base / "tiny-sd-lora.safetensors")] * 2))
    assert main(["explore", "--pretrained_model_name_or_path", str(base / "tiny-sd.safetensors"),
                 "--train_data_dir", str(base / "data"), "--output_dir", str(tmp_path), "--resolution", "64",
                 "--scale_weight_norms", "1"]) == 1
    assert "lorakit explore: error: network_weights names no adapter file" in capsys.readouterr().err


def test_help_lists_the_explore_options_only_for_explore(capsys):
    with pytest.raises(SystemExit):
        main(["explore", "--help"])
    assert "--application_loss_weight" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--application_loss_weight" not in capsys.readouterr().out


def test_options_of_a_networks_training_are_named_as_unused(base, tmp_path, caplog):
    """Explore reads the networks whole and trains only the rates, at learning_rate: unet_lr, network_dim and the
    like do nothing there, and a user who sets them is told so."""
    train(_config(base, tmp_path, unet_lr=0.5, network_dim=8, max_train_steps=1), explore=True)
    assert "unet_lr, network_dim: options of a network's training, not used by lorakit explore" in caplog.text




def test_unet_only_leaves_the_text_encoder_adapters_out_so_cached_outputs_are_the_plain_encoders(base, tmp_path):
    """sd-scripts' apply_to(apply_text_encoder=False): with network_train_unet_only (which the text-encoder cache
    needs) the text encoders run without the files' adapters, so BASE only feels the penalty (0.5 - 3 x 0.1 x 0.5)
    and the disk cache explore writes holds the plain encoders' outputs, as a later plain run writes them."""
    import numpy as np

    explored, plain = tmp_path / "explored", tmp_path / "plain"
    for data in (explored, plain):
        write_concept_folder(data, n=4, repeats=1)
    out = train(_config(base, tmp_path / "out", application_loss_weight=0.5, network_train_unet_only=True,
                        cache_text_encoder_outputs_to_disk=True, train_data_dir=str(explored)), explore=True)
    rates = dict(zip(LBW26.names, load_file(out)[0]["weights"].tolist()))
    assert rates["BASE"] == pytest.approx(0.35, abs=1e-7)
    train(_config(base, tmp_path / "out2", network_train_unet_only=True, cache_text_encoder_outputs_to_disk=True,
                  train_data_dir=str(plain), max_train_steps=1, network_weights=[]))
    files = sorted(explored.rglob("*_te_outputs.npz"))
    assert files
    for mine in files:
        with np.load(mine) as a, np.load(plain / mine.relative_to(explored)) as b:
            assert np.array_equal(a["hidden_state1"], b["hidden_state1"]), mine.name


def test_one_network_module_per_file_as_seed_003_gives_them(base, tmp_path):
    """sd-scripts' appl_weights takes a network_module per network_weights file (`--network_module networks.lora
    networks.lora`); lorakit reads each file's own algorithm, so the same module repeated is one value, and
    different ones are refused by name."""
    files = [str(base / "tiny-sd-lora.safetensors"), str(base / "tiny-sd-loha.safetensors")]
    assert main(["explore", "--pretrained_model_name_or_path", str(base / "tiny-sd.safetensors"),
                 "--train_data_dir", str(base / "data"), "--output_dir", str(tmp_path), "--output_name", "rates",
                 "--resolution", "64", "--max_train_steps", "1", "--network_module", "networks.lora",
                 "networks.lora", "--network_weights", *files]) == 0
    assert load_file(tmp_path / "rates.safetensors")[0]["weights"].shape == (52,)
    with pytest.raises(ValueError, match="option 'network_module': expected one network module"):
        _config(base, tmp_path, network_module=["networks.lora", "lycoris.kohya"])
