"""The kohya network-module API against sd-scripts' networks/lora.py, with the LoRA change written out here
(dW = multiplier * up @ down * alpha / dim): save_weights writes train_network.py's ss_* metadata,
create_network_from_weights' multiplier scales what merge_to merges (--base_weights_multiplier, gen_img
--network_mul), merge_to merges the weights it is given, network_alpha=None means alpha 1, and
scale_weight_norms bounds the change a layer gets, LyCORIS' use_scalar included."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

from lorakit import kohya

from .tiny import randomize, tiny_model

safetensors = pytest.importorskip("safetensors")

# one U-Net and one text-encoder Linear, by kohya name and by module path
Q_UNET = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
Q_TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def _q_weights(unet, te):
    return {Q_UNET: unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight,
            Q_TE: getattr(te, "text_model", te).encoder.layers[0].self_attn.q_proj.weight}  # transformers 4 / 5


def _lora_change(up, down, alpha, multiplier=1.0, scalar=1.0):
    """sd-scripts' LoRAModule: multiplier * up @ down * (alpha / dim) (times LyCORIS' scalar), in float64."""
    up, down = up.double().flatten(1), down.double().flatten(1)
    return multiplier * (up @ down) * float(alpha) / down.shape[0] * scalar


def _file_change(tensors, name, multiplier=1.0):
    return _lora_change(tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"],
                        tensors[f"{name}.alpha"], multiplier)


def _saved_lora(path, seed, dim=4, alpha=2.0):
    unet, tes = copy.deepcopy(tiny_model("sd1"))
    net = randomize(kohya.create_network(1.0, dim, alpha, None, tes[0], unet), scale=0.2, seed=seed)
    net.save_weights(str(path), None, {})
    return safetensors.torch.load_file(str(path))


def _merged_changes(multiplier, path, weights_sd):
    """(network, change of each Q weight) after create_network_from_weights(multiplier, path) + merge_to."""
    base_unet, base_tes = tiny_model("sd1")
    unet, tes = copy.deepcopy((base_unet, base_tes))
    net, _ = kohya.create_network_from_weights(multiplier, str(path), None, tes[0], unet, for_inference=True)
    net.merge_to(tes[0], unet, weights_sd, torch.float32, "cpu")
    before = _q_weights(base_unet, base_tes[0])
    return {name: (w - before[name]).double() for name, w in _q_weights(unet, tes[0]).items()}


def test_save_weights_writes_the_training_metadata(tmp_path):
    # train_network.py: network.save_weights(file, save_dtype, metadata) with its ss_* dict
    unet, tes = tiny_model("sd1")
    net = kohya.create_network(1.0, 4, 1.0, None, tes[0], unet)
    path = tmp_path / "mylora.safetensors"
    net.save_weights(str(path), torch.float16, {"ss_network_dim": "4", "ss_output_name": "mylora"})
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_output_name"] == "mylora"


@pytest.mark.parametrize("multiplier", [0.5, 1.0, 1.5])
def test_from_weights_multiplier_scales_the_merge(tmp_path, multiplier):
    path = tmp_path / "a.safetensors"
    tensors = _saved_lora(path, seed=1)
    changes = _merged_changes(multiplier, path, tensors)
    for name, change in changes.items():
        expected = _file_change(tensors, name, multiplier)
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(change, expected, rtol=1e-4, atol=1e-6)


def test_merge_to_merges_the_weights_it_is_given(tmp_path):
    # a network built from file A, merge_to(file B's tensors): B is merged (networks/lora.py merge_to reads
    # weights_sd, not the network's own state)
    file_a, file_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _saved_lora(file_a, seed=1)
    tensors_b = _saved_lora(file_b, seed=2)
    for name, change in _merged_changes(1.0, file_a, tensors_b).items():
        torch.testing.assert_close(change, _file_change(tensors_b, name), rtol=1e-4, atol=1e-6)


def test_network_alpha_none_means_alpha_one(tmp_path):
    # networks/lora.py create_network: `if network_alpha is None: network_alpha = 1.0`, so dW = up @ down / dim
    unet, tes = copy.deepcopy(tiny_model("sd1"))
    net = randomize(kohya.create_network(1.0, 8, None, None, tes[0], unet), scale=0.2, seed=3)
    path = tmp_path / "net.safetensors"
    net.save_weights(str(path), None, {})
    tensors = safetensors.torch.load_file(str(path))
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {1.0}
    changes = _merged_changes(1.0, path, tensors)
    for name, change in changes.items():
        up, down = tensors[f"{name}.lora_up.weight"].double(), tensors[f"{name}.lora_down.weight"].double()
        torch.testing.assert_close(change, up @ down / 8, rtol=1e-4, atol=1e-6)


def test_max_norm_bounds_the_change_with_use_scalar():
    # the change a layer gets is up @ down * alpha / dim * scalar (LyCORIS' use_scalar): that is what is bounded
    unet, tes = tiny_model("sd1")  # never applied: the shared model stays untouched
    torch.manual_seed(0)  # the initial factors, whatever ran before
    net = randomize(kohya.create_network(1.0, 4, 1.0, None, tes[0], unet, use_scalar="True"), scale=0.3, seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("scalar"):
                p.fill_(float(torch.empty(()).uniform_(0.2, 0.8, generator=g)))

    def norms():  # from the raw factors (the saved lora_up has the scalar folded in, as LyCORIS saves it)
        params = {k: v.detach() for k, v in net.named_parameters()}
        alphas = {k: v for k, v in net.state_dict().items() if k.endswith(".alpha")}
        names = [k[: -len(".scalar")] for k in params if k.endswith(".scalar")]
        return {n: float(_lora_change(params[f"{n}.lora_up"], params[f"{n}.lora_down"], alphas[f"{n}.alpha"],
                                      scalar=float(params[f"{n}.scalar"])).norm()) for n in names}

    before = norms()
    ordered = sorted(before.values())
    bound = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # half above it, none on it
    keys_scaled, mean_norm, max_norm = net.apply_max_norm_regularization(bound, "cpu")
    after = norms()
    assert keys_scaled == sum(v > bound for v in before.values()) > 0
    assert max_norm == pytest.approx(max(after.values()), rel=1e-4)
    assert mean_norm == pytest.approx(statistics.mean(after.values()), rel=1e-4)
    for name, norm in before.items():
        assert after[name] == pytest.approx(min(norm, bound), rel=1e-4), name
