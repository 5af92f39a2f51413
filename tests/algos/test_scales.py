"""The scale each algorithm trains with and LoKr's factor layout, pinned as values. LyCORIS' modules define them
(scale = alpha / dim, alpha / sqrt(dim) with rs_lora; LoKr factors full from dim >= max/2 on); ComfyUI and A1111
apply alpha / dim from the saved alpha. A scale that is wrong the same way on both sides of a save stays
self-consistent, so the round-trip and UI checks of test_contract cannot see it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from lorakit.algos import make_adapter

from .conftest import make_input, make_layer, randomize
from .ui_reference import ui_delta

DIM, ALPHA = 4, 3.0
# (algo, options): every algorithm with rs_lora, on Linear(64, 64); LoKr's factor 4 keeps w2 (16 x 16) a rank-4
# product (both factors full would make the scale 1)
RS_LORA = [("lora", {}), ("loha", {}), ("lokr", {"factor": 4}), ("glora", {})]


def rs_adapter(algo, options):
    layer = make_layer("linear_wide")
    adapter = make_adapter(algo, layer, dim=DIM, alpha=ALPHA, rs_lora=True, **options).double()
    return layer, randomize(adapter).eval()


@pytest.mark.parametrize("algo,options", RS_LORA, ids=[a for a, _ in RS_LORA])
def test_rs_lora_trains_at_alpha_over_sqrt_dim_and_saves_the_alpha_that_gives_the_uis_that_scale(algo, options):
    layer, adapter = rs_adapter(algo, options)
    x = make_input("linear_wide")
    scale = ALPHA / math.sqrt(DIM)
    assert adapter.scale == pytest.approx(scale)
    sd = adapter.state_dict()
    assert float(sd["alpha"]) == pytest.approx(ALPHA * math.sqrt(DIM))  # LyCORIS' alpha * dim / sqrt(dim)
    unscaled = ui_delta({k: v for k, v in sd.items() if k != "alpha"}, layer.weight, 1.0)[0]  # no alpha: scale 1
    expected = nn.functional.linear(x, layer.weight + scale * unscaled, layer.bias)
    torch.testing.assert_close(adapter(x), expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ui_delta(sd, layer.weight, 1.0)[0], scale * unscaled, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("algo,options", RS_LORA, ids=[a for a, _ in RS_LORA])
def test_rs_lora_adapter_loaded_from_its_file_keeps_alpha_and_scale(algo, options):
    """The file holds alpha * sqrt(dim) (what alpha / dim loaders need); an rs_lora adapter loading it reads back the
    alpha it was made with (alpha = saved / sqrt(dim), the value networks and tools report) and the same scale."""
    _, adapter = rs_adapter(algo, options)
    sd = adapter.state_dict()
    fresh = make_adapter(algo, make_layer("linear_wide"), dim=DIM, alpha=1.0, rs_lora=True, **options).double()
    fresh.load_state_dict(sd)
    assert fresh.alpha == pytest.approx(ALPHA)
    assert fresh.scale == pytest.approx(ALPHA / math.sqrt(DIM))
    assert float(fresh.state_dict()["alpha"]) == pytest.approx(float(sd["alpha"]))


def test_lokr_with_both_factors_full_keeps_scale_1_with_rs_lora():
    """Both factors full: ComfyUI and A1111 apply scale 1 whatever alpha says, so lorakit trains at 1 and saves
    alpha = dim (LyCORIS itself trains this case at sqrt(dim) and saves dim^1.5: its own files then load at 1)."""
    layer, x = make_layer("linear"), make_input("linear")
    adapter = randomize(make_adapter("lokr", layer, dim=DIM, alpha=ALPHA, full_matrix=True, rs_lora=True).double())
    adapter.eval()
    assert adapter.scale == 1.0
    assert float(adapter.state_dict()["alpha"]) == DIM
    dw = torch.kron(adapter.lokr_w1, adapter.lokr_w2)
    expected = nn.functional.linear(x, layer.weight + dw, layer.bias)
    torch.testing.assert_close(adapter(x), expected, rtol=1e-9, atol=1e-10)


# LoKr on Linear(24, 16): w1 (4 x 4) kron w2 (4 x 6). LyCORIS makes w2 a rank-dim product while dim < max(4, 6) / 2
# = 3 and (decompose_both) w1 one while dim < max(4, 4) / 2 = 2; at dim == max / 2 the factor is full.
BOUNDARY = [
    ({"dim": 2}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ({"dim": 3}, {"lokr_w1", "lokr_w2"}),
    ({"dim": 1, "decompose_both": True}, {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    ({"dim": 2, "decompose_both": True}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
]


def lokr_24_16(options):
    return make_adapter("lokr", nn.Linear(24, 16), **options)


@pytest.mark.parametrize("options,factors", BOUNDARY, ids=[str(o) for o, _ in BOUNDARY])
def test_lokr_factors_are_full_from_dim_half_their_size_on(options, factors):
    assert set(lokr_24_16(options).state_dict()) - {"alpha"} == factors


def lycoris_modules(monkeypatch):
    monkeypatch.setenv("LYCORIS_KERNEL_BACKEND", "torch")  # its eager reference ops (test_lycoris_interop)
    monkeypatch.setenv("LYCORIS_KERNEL_TUNE", "off")
    return pytest.importorskip("lycoris.modules")


@pytest.mark.parametrize("algo,options", RS_LORA, ids=[a for a, _ in RS_LORA])
def test_rs_lora_scale_and_saved_alpha_are_lycoris(algo, options, monkeypatch):
    modules = lycoris_modules(monkeypatch)
    module = {"lora": modules.LoConModule, "loha": modules.LohaModule, "lokr": modules.LokrModule,
              "glora": modules.GLoRAModule}[algo]
    theirs = module("x", make_layer("linear_wide"), lora_dim=DIM, alpha=ALPHA, rs_lora=True, **options)
    _, ours = rs_adapter(algo, options)
    assert ours.scale == pytest.approx(theirs.scale)
    if algo != "glora":  # LyCORIS' GLoRA keeps alpha itself, which the UIs then apply as alpha / dim
        assert float(ours.state_dict()["alpha"]) == pytest.approx(float(theirs.alpha))


@pytest.mark.parametrize("options", [o for o, _ in BOUNDARY], ids=[str(o) for o, _ in BOUNDARY])
def test_lokr_layout_at_the_full_matrix_boundary_is_lycoris(options, monkeypatch):
    theirs = lycoris_modules(monkeypatch).LokrModule("x", nn.Linear(24, 16), lora_dim=options["dim"],
                                                     decompose_both=options.get("decompose_both", False))
    assert set(lokr_24_16(options).state_dict()) == {k for k in theirs.state_dict() if k.startswith("lokr") or
                                                     k == "alpha"}


# w1 (a x b) with a != b, where LyCORIS' rule dim < max(a, b) / 2 and the smaller side's dim < min(a, b) / 2 differ:
# Linear(27, 8) splits out 8 = 2 x 4 and in 27 = 3 x 9, so w1 is 2 x 3 (and 3 x 2 the other way round); at dim 1,
# 1 < 3 / 2 makes w1 a rank-1 product, 1 < 2 / 2 would not.
@pytest.mark.parametrize("features", [(27, 8), (8, 27)], ids=["27-8", "8-27"])
def test_lokr_decompose_both_on_unequal_w1_sides_is_lycoris(features, monkeypatch):
    theirs = lycoris_modules(monkeypatch).LokrModule("x", nn.Linear(*features), lora_dim=1, decompose_both=True)
    ours = make_adapter("lokr", nn.Linear(*features), dim=1, decompose_both=True)
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if k.startswith("lokr")}
    assert {"lokr_w1_a", "lokr_w1_b"} <= set(want)  # the case this test is about
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items() if k != "alpha"} == want


def test_lokr_with_both_factors_full_and_a_dim_above_float16_saves_and_loads_in_fp16():
    """kohya_ss' LoKr presets give network_dim 100000 (both factors full). The saved alpha (dim, which loaders
    ignore here) stays finite in an fp16 file, and a file whose alpha is inf (LyCORIS' own fp16 save of that dim)
    loads at scale 1 instead of failing in int(alpha)."""
    from lorakit.algos import adapter_from_state_dict

    layer, x = make_layer("linear"), make_input("linear")
    adapter = randomize(make_adapter("lokr", layer, dim=100000, alpha=1.0).double()).eval()
    assert adapter.scale == 1.0
    sd = {k: v.to(torch.float16) for k, v in adapter.state_dict().items()}
    assert math.isfinite(float(sd["alpha"])) and float(sd["alpha"]) == float(torch.finfo(torch.float16).max)
    for alpha in (sd["alpha"], torch.tensor(float("inf"), dtype=torch.float16)):
        again = adapter_from_state_dict(make_layer("linear"), {**sd, "alpha": alpha}).double().eval()
        assert again.scale == 1.0
        dw = torch.kron(sd["lokr_w1"].double(), sd["lokr_w2"].double())
        expected = nn.functional.linear(x, layer.weight + dw, layer.bias)
        torch.testing.assert_close(again(x), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("algo,options", RS_LORA, ids=[a for a, _ in RS_LORA])
def test_alpha_0_means_alpha_equal_to_dim(algo, options):
    """kohya and LyCORIS read alpha 0 as alpha = dim (scale 1): the option is accepted, the adapter trains at scale 1
    and saves alpha = dim, so that the UIs apply the factors' product as it is."""
    layer, x = make_layer("linear_wide"), make_input("linear_wide")
    adapter = randomize(make_adapter(algo, layer, dim=DIM, alpha=0, **options).double()).eval()
    assert adapter.scale == 1.0
    sd = adapter.state_dict()
    assert float(sd["alpha"]) == DIM
    unscaled = ui_delta({k: v for k, v in sd.items() if k != "alpha"}, layer.weight, 1.0)[0]  # no alpha: scale 1
    expected = nn.functional.linear(x, layer.weight + unscaled, layer.bias)
    torch.testing.assert_close(adapter(x), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_lokr_file_with_both_factors_full_and_an_alpha_below_1_loads_at_scale_1(alpha):
    """Both factors full: loaders ignore alpha (scale 1), whatever a converter wrote there; an alpha below 1 is no
    dim of 0 (which no adapter could be built with)."""
    from lorakit.algos import adapter_from_state_dict

    layer, x = make_layer("linear"), make_input("linear")
    sd = randomize(make_adapter("lokr", layer, full_matrix=True).double()).state_dict()
    assert {"lokr_w1", "lokr_w2"} <= set(sd)  # the case this test is about
    again = adapter_from_state_dict(layer, {**sd, "alpha": torch.tensor(alpha, dtype=torch.float64)}).eval()
    assert again.scale == 1.0
    expected = nn.functional.linear(x, layer.weight + torch.kron(sd["lokr_w1"], sd["lokr_w2"]), layer.bias)
    torch.testing.assert_close(again(x), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("algo,dim", [("lora", 4), ("loha", 4), ("lokr", 1)])
def test_use_tucker_on_a_pointwise_conv_keeps_lycoris_plain_layout(algo, dim, monkeypatch):
    """Tucker applies to kernels larger than 1x1 only: on a 1x1 conv LyCORIS makes the plain factors, and so must
    lorakit (a core tensor there would be keys no loader expects)."""
    modules = lycoris_modules(monkeypatch)
    module = {"lora": modules.LoConModule, "loha": modules.LohaModule, "lokr": modules.LokrModule}[algo]
    theirs = module("x", nn.Conv2d(6, 8, 1), lora_dim=dim, use_tucker=True)
    ours = make_adapter(algo, nn.Conv2d(6, 8, 1), dim=dim, use_tucker=True)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("out_dim", [24, 48])
def test_boft_blocks_are_split_as_lycoris_into_a_power_of_two_count(out_dim, monkeypatch):
    """BOFT's butterfly needs a power-of-two block count: on 24 channels with dim 8, blocks of 6 (4 of them), not
    the larger even size 8 (3 blocks); the file's shape is then LyCORIS' own."""
    theirs = lycoris_modules(monkeypatch).ButterflyOFTModule("x", nn.Linear(12, out_dim), lora_dim=8)
    ours = make_adapter("boft", nn.Linear(12, out_dim), dim=8)
    assert tuple(ours.oft_blocks.shape) == tuple(theirs.state_dict()["oft_blocks"].shape)
