"""Building adapters from tensors alone: shapes other tools write, and clear errors for tensors that do not fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lorakit.algos import adapter_from_state_dict, detect_algorithm, make_adapter

from .conftest import make_input, make_layer
from .test_contract import ui_forward


def test_lokr_factors_of_different_ranks():
    layer, x = make_layer("linear"), make_input("linear")  # 8 x 12 = kron((2 x 3), (4 x 4))
    torch.manual_seed(0)
    sd = {"lokr_w1_a": torch.randn(2, 1), "lokr_w1_b": torch.randn(1, 3), "lokr_w2_a": torch.randn(4, 3),
          "lokr_w2_b": torch.randn(3, 4), "alpha": torch.tensor(1.5)}
    sd = {k: v.double() for k, v in sd.items()}
    adapter = adapter_from_state_dict(layer, sd).eval()
    torch.testing.assert_close(adapter(x), ui_forward(layer, sd, x, 1.0))
    assert adapter.state_dict().keys() == sd.keys()


def test_detects_each_algorithm_from_its_keys():
    linear = nn.Linear(12, 8)
    for algo in ("lora", "loha", "lokr", "ia3", "glora", "diag-oft", "boft", "full"):
        options = {"dim": 2} if algo == "boft" else {}
        sd = make_adapter(algo, linear, **options).state_dict()
        assert detect_algorithm(sd).name == algo
    assert detect_algorithm(make_adapter("norm", nn.LayerNorm(8)).state_dict()).name == "norm"
    assert detect_algorithm(make_adapter("dylora", linear).state_dict()).name == "lora"  # DyLoRA files are LoRA files


def test_unknown_tensors():
    with pytest.raises(ValueError, match=r"no adapter algorithm has the tensors \['foo', 'bar'\]|\['bar', 'foo'\]"):
        detect_algorithm({"foo": torch.zeros(1), "bar": torch.zeros(1)})


def test_missing_and_unexpected_tensors_are_named():
    linear = nn.Linear(12, 8)
    sd = make_adapter("lora", linear, dim=4).state_dict()
    adapter = make_adapter("lora", linear, dim=4)
    broken = dict(sd)
    del broken["lora_up.weight"]
    broken["lora_upp.weight"] = torch.zeros(8, 4)
    with pytest.raises(RuntimeError) as err:
        adapter.load_state_dict(broken)
    assert "lora_up.weight" in str(err.value) and "lora_upp.weight" in str(err.value)


def test_a_full_file_without_diff_b_changes_only_the_weight():
    """extract writes diff_b only where the bias changed, and the UIs read a missing diff_b as no bias change; a
    full adapter that had trained diff_b is reset by such a file, not left with its old bias change."""
    torch.manual_seed(0)
    linear = nn.Linear(12, 8).double().requires_grad_(False)
    diff = torch.randn(8, 12, dtype=torch.float64)
    adapter = adapter_from_state_dict(linear, {"diff": diff})
    x = make_input("linear")
    torch.testing.assert_close(adapter(x), nn.functional.linear(x, linear.weight + diff, linear.bias))
    trained = make_adapter("full", linear).double()
    with torch.no_grad():
        trained.diff_b.fill_(1.0)
    trained.load_state_dict({"diff": diff})
    assert not trained.diff_b.any()
    with pytest.raises(RuntimeError, match="diff"):
        trained.load_state_dict({"diff_b": torch.zeros(8)})  # diff itself stays required


def test_shape_mismatch_names_the_tensor_and_both_shapes():
    conv = nn.Conv2d(6, 8, 3)
    sd = make_adapter("lora", conv, dim=4).state_dict()
    adapter = make_adapter("lora", conv, dim=2)
    with pytest.raises(RuntimeError, match=r"lora_down.weight: file has shape \(4, 6, 3, 3\), this adapter expects "
                                           r"\(2, 6, 3, 3\)"):
        adapter.load_state_dict(sd)


def test_lokr_tensors_for_another_layer():
    sd = make_adapter("lokr", nn.Linear(12, 8)).state_dict()
    with pytest.raises(ValueError, match=r"do not make the layer's 8x16 weight"):
        adapter_from_state_dict(nn.Linear(16, 8), sd)


def test_dora_axis_is_read_from_the_shape():
    linear = nn.Linear(12, 8)
    for axis in ("in", "out"):
        sd = make_adapter("lora", linear, dora_wd=True, dora_axis=axis).state_dict()
        assert adapter_from_state_dict(linear, sd).options.dora_axis == axis


@pytest.mark.parametrize("layer", [nn.Linear(40, 1), nn.Conv1d(40, 1, 3), nn.Linear(1, 8)], ids=repr)
@pytest.mark.parametrize("axis", ["in", "out"])
def test_dora_of_a_layer_with_one_channel_loads_back_on_its_axis(layer, axis):
    """A (1, 1, ..) dora_scale is the rows of a layer with one output channel (its columns would be (1, in, ..)) and
    the columns of a layer with one input channel (its rows would be (out, 1, ..))."""
    torch.manual_seed(0)
    layer = layer.double()
    adapter = make_adapter("lora", layer, dim=4, dora_wd=True, dora_axis=axis).double()
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    loaded = adapter_from_state_dict(layer, adapter.state_dict())
    assert loaded.options.dora_axis == axis
    x = torch.randn(3, layer.in_features) if isinstance(layer, nn.Linear) else torch.randn(3, 40, 7)
    torch.testing.assert_close(loaded(x.double()), adapter(x.double()))


@pytest.mark.parametrize("algo", ["lora", "loha", "glora"])
def test_a_file_without_alpha_loads_at_scale_1(algo):
    """Old files hold no alpha: kohya and the UIs read alpha = dim there (scale 1). Such a file is no missing
    tensor, built from or loaded strictly into an adapter."""
    layer, x = make_layer("linear"), make_input("linear")
    adapter = make_adapter(algo, layer, dim=4, alpha=1).double()
    torch.manual_seed(0)
    sd = {k: torch.randn_like(v) for k, v in adapter.state_dict().items() if k != "alpha"}
    adapter.load_state_dict(sd, strict=True)  # no error for the missing alpha; the adapter keeps its own
    assert adapter.scale == 0.25
    rebuilt = adapter_from_state_dict(layer, sd).eval()
    assert rebuilt.scale == 1.0
    torch.testing.assert_close(rebuilt(x), ui_forward(layer, sd, x, 1.0), rtol=1e-9, atol=1e-10)


def test_options_given_with_the_tensors_apply_to_the_adapter_built_from_them():
    """adapter_from_state_dict(layer, sd, **options): what the caller gives (a load's multiplier, dropouts to go on
    training) applies on top of what the shapes say."""
    layer, x = make_layer("linear"), make_input("linear")
    torch.manual_seed(0)
    sd = {"lora_down.weight": torch.randn(4, 12), "lora_up.weight": torch.randn(8, 4), "alpha": torch.tensor(2.0)}
    sd = {k: v.double() for k, v in sd.items()}
    adapter = adapter_from_state_dict(layer, sd, multiplier=0.5, rank_dropout=0.1).eval()
    assert adapter.multiplier == 0.5 and adapter.options.rank_dropout == 0.1 and adapter.rank == 4
    torch.testing.assert_close(adapter(x), ui_forward(layer, sd, x, 0.5), rtol=1e-9, atol=1e-10)


def test_an_old_layout_glora_file_is_refused_by_name():
    """LyCORIS' old GLoRA layout (a1 (dim, in), a2 (in, dim)) gives another change from the same keys: refused with
    what is wrong, not read as the current layout or failing on a shape."""
    torch.manual_seed(0)
    sd = {"a1.weight": torch.randn(4, 12), "a2.weight": torch.randn(12, 4), "b1.weight": torch.randn(8, 4),
          "b2.weight": torch.randn(4, 12), "alpha": torch.tensor(4.0)}
    with pytest.raises(ValueError, match=r"GLoRA tensors a1 \(4, 12\), a2 \(12, 4\) are not in LyCORIS' current"):
        adapter_from_state_dict(make_layer("linear"), sd)


@pytest.mark.parametrize("on_input", [True, False])
def test_ia3_weights_of_the_other_side_are_refused_on_a_square_layer(on_input):
    """(IA)^3 of the input and of the output have the same shape on a square layer: a file of the one loaded into
    an adapter of the other would scale the wrong channels. The load is refused, naming on_input."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    saved = make_adapter("ia3", layer, train_on_input=on_input)
    with torch.no_grad():
        saved.weight.normal_()
    other = make_adapter("ia3", layer, train_on_input=not on_input)
    with pytest.raises(RuntimeError, match="on_input: the file's \\(IA\\)\\^3 scales the layer's"):
        other.load_state_dict(saved.state_dict())
    assert torch.equal(other.weight, torch.zeros_like(other.weight))  # nothing of the file was taken
    same = make_adapter("ia3", layer, train_on_input=on_input)
    same.load_state_dict(saved.state_dict())  # the same side loads as before
    assert torch.equal(same.weight, saved.weight)
