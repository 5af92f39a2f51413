"""Every algorithm x layer x option combination, in float64:
bypass forward == forward with the merged weight == base weight + the change a UI computes from the saved file,
the change is zero at initialisation, gradients reach only the adapter, and the saved form round-trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.algos import adapter_from_state_dict, algorithm, make_adapter

from .conftest import case_params, make_input, make_layer, randomize
from .ui_reference import ui_delta

TOL = dict(rtol=1e-9, atol=1e-10)


def layer_forward(layer, x, weight, bias):
    if isinstance(layer, torch.nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)
    if isinstance(layer, torch.nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, weight, bias, layer.eps)
    if isinstance(layer, torch.nn.Linear):
        return F.linear(x, weight, bias)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    return conv(x, weight, bias, layer.stride, layer.padding, layer.dilation)


def check_against_formula(adapter, layer, x, input_grad=True):
    """adapter(x) against the plain formula op(x, W + m dW) with bias b + m db: the output, every parameter's
    gradient and (with input_grad) the input's, under the loss sum(sin(y)). Returns the adapter's output, whose
    graph names the path taken."""
    xg, xr = x.clone().requires_grad_(input_grad), x.clone().requires_grad_(input_grad)
    out = adapter(xg)
    out.sin().sum().backward()
    got = {n: p.grad.clone() for n, p in adapter.named_parameters()}
    adapter.zero_grad()
    bias = layer.bias
    db = adapter.delta_bias(adapter.multiplier)
    if db is not None:
        bias = db if bias is None else bias + db
    expected = layer_forward(layer, xr, layer.weight + adapter.delta_weight(adapter.multiplier), bias)
    torch.testing.assert_close(out, expected, **TOL)
    expected.sin().sum().backward()
    for n, p in adapter.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-8, atol=1e-9, msg=n)
    if input_grad:
        torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-8, atol=1e-9)
    return out


def ui_forward(layer, sd, x, strength):
    """The layer run with the weight a UI patches in from the saved tensors alone."""
    dw, db = ui_delta(sd, layer.weight, strength)
    bias = layer.bias
    if db is not None:
        bias = db if bias is None else bias + db
    return layer_forward(layer, x, layer.weight + dw, bias)


@pytest.mark.parametrize("algo,options,kind", case_params())
@pytest.mark.parametrize("multiplier", [1.0, 0.7])
def test_three_ways_agree(algo, options, kind, multiplier):
    layer, x = make_layer(kind), make_input(kind)
    adapter = randomize(make_adapter(algo, layer, **options).double())
    adapter.eval()
    adapter.multiplier = multiplier
    bypass = adapter(x)
    assert not torch.allclose(bypass, layer(x), **TOL), "the randomized adapter must change the output"

    sd = adapter.state_dict()
    # ComfyUI clamps a constrained OFT's Q once more by a relative 1e-8 / bound (its epsilon)
    ui_tol = dict(rtol=1e-6, atol=1e-8) if options.get("constraint") else TOL
    torch.testing.assert_close(ui_forward(layer, sd, x, multiplier), bypass, **ui_tol)

    adapter.merge()
    torch.testing.assert_close(layer(x), bypass, **TOL)
    adapter.unmerge()
    torch.testing.assert_close(layer(x), make_layer(kind)(x), rtol=0, atol=0)

    # delta_weight is what the UIs add
    torch.testing.assert_close(adapter.delta_weight(multiplier), ui_delta(sd, layer.weight, multiplier)[0], **ui_tol)


@pytest.mark.parametrize("algo,options,kind", case_params())
def test_saved_form_round_trips(algo, options, kind):
    layer, x = make_layer(kind), make_input(kind)
    adapter = randomize(make_adapter(algo, layer, **options).double()).eval()
    sd = adapter.state_dict()
    expected_keys = set(algorithm(algo).keys)
    assert set(sd) <= expected_keys, f"keys outside the LyCORIS layout: {set(sd) - expected_keys}"

    rebuilt = adapter_from_state_dict(layer, sd).eval()
    torch.testing.assert_close(rebuilt(x), adapter(x), **TOL)
    sd2 = rebuilt.state_dict()
    assert sd2.keys() == sd.keys()
    for key in sd:
        torch.testing.assert_close(sd2[key], sd[key], rtol=0, atol=0, msg=key)

    # loading into an adapter built with the same options reproduces it too
    fresh = make_adapter(algo, layer, **options).double().eval()
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), adapter(x), **TOL)


@pytest.mark.parametrize("algo,options,kind", case_params())
def test_zero_at_init_and_gradients_reach_only_the_adapter(algo, options, kind):
    layer, x = make_layer(kind), make_input(kind)
    adapter = make_adapter(algo, layer, **options).double().train()
    if not options.get("use_scalar"):
        torch.testing.assert_close(adapter(x), layer(x), rtol=0, atol=1e-12)
    else:  # with a scalar the scalar starts at zero instead
        assert float(adapter.scalar.detach()) == 0.0
        torch.testing.assert_close(adapter(x), layer(x), rtol=0, atol=1e-12)
    adapter = randomize(adapter)
    xg = x.clone().requires_grad_(True)
    torch.manual_seed(5)
    adapter(xg).square().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    assert all(p.grad is None for p in layer.parameters())
    trainable = dict(adapter.named_parameters())
    missing = [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing}"
    if algo == "dylora":  # only the block drawn for the step learns: its rank components, no other
        torch.manual_seed(5)
        block = int(torch.randint(adapter.rank // adapter.block_size, ()).item())
        drawn = torch.zeros(adapter.rank, dtype=torch.bool)
        drawn[block * adapter.block_size:(block + 1) * adapter.block_size] = True
        for grad in (adapter.lora_down.grad, adapter.lora_up.grad.transpose(0, 1)):
            moved = grad.flatten(1).abs().amax(1) > 0
            assert torch.equal(moved, drawn), (block, moved)


@pytest.mark.parametrize("algo,options,kind,many", case_params(with_positions=True))
def test_gradients_match_autograd_of_the_merged_weight(algo, options, kind, many):
    """Every compute path (factors, fused, merged weight rebuilt in backward) gives the output and gradients of the
    plain formula y = op(x, W + m dW). Many positions select the merged and fused paths on linear layers; those
    run at a multiplier other than 1 (which the fused products fold in)."""
    layer, x = make_layer(kind), make_input(kind)
    if many:
        x = torch.randn(4, 40, x.shape[-1], dtype=x.dtype)
    adapter = randomize(make_adapter(algo, layer, **options).double()).eval()
    if many:
        adapter.multiplier = 0.7
    check_against_formula(adapter, layer, x)


CONV_CASES = [c for c in case_params() if c.values[2].startswith("conv")]


@pytest.mark.parametrize("algo,options,kind", CONV_CASES)
def test_an_unbatched_conv_input_gives_the_formulas_output_and_gradients(algo, options, kind):
    """torch convs take (channels, *spatial) without a batch axis: every per-channel scale must still land on
    the channel axis."""
    layer, x = make_layer(kind), make_input(kind)[0]
    adapter = randomize(make_adapter(algo, layer, **options).double()).eval()
    adapter.multiplier = 0.7
    check_against_formula(adapter, layer, x)


@pytest.mark.parametrize("algo,options", [("diag-oft", {"dim": 4}), ("boft", {"dim": 2}), ("ia3", {})])
@pytest.mark.parametrize("layer_kind", ["linear-nobias", "conv1x1-nobias", "conv1x1-channels-last"])
def test_output_side_adapters_without_a_bias_or_in_channels_last(algo, options, layer_kind):
    """The adapters that act on the layer's output (rotations as one batched product with the bias term folded
    in, IA3's scale and shift) on layers without a bias and on a channels-last input, against the dense
    formula."""
    torch.manual_seed(0)
    if layer_kind == "linear-nobias":
        layer, x = torch.nn.Linear(12, 8, bias=False), torch.randn(3, 5, 12)
    else:
        layer, x = torch.nn.Conv2d(6, 8, 1, bias=layer_kind.endswith("last")), torch.randn(2, 6, 5, 5)
        if layer_kind.endswith("last"):
            x = x.contiguous(memory_format=torch.channels_last)
    layer = layer.double().requires_grad_(False)
    adapter = randomize(make_adapter(algo, layer, **options).double()).eval()
    adapter.multiplier = 0.7
    check_against_formula(adapter, layer, x.double())


def test_apply_with_a_function_is_torchs_module_apply_and_hooks_route_through_the_call():
    from lorakit.network.network import Entry, Network

    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5)
    adapter = make_adapter("lora", layer, dim=2)
    torch.nn.init.normal_(adapter.lora_up)
    net = Network({"a": adapter}, {"a": Entry("model", "0")}, arch=None)
    net.apply(hooks=True)
    x = torch.randn(3, 6)
    expected = layer(x)
    seen = []
    adapter.register_forward_pre_hook(lambda module, args: seen.append(module))
    torch.testing.assert_close(layer(x), expected)
    assert seen == [adapter]  # hooks=True: the layer calls the adapter module, so its hooks run
    visited = []
    assert net.apply(visited.append) is net and visited == [adapter, net]  # torch's apply: children first
    torch.testing.assert_close(layer(x), expected)  # and the adapters were not routed a second time
    net.restore()
    assert "forward" not in layer.__dict__


@pytest.mark.parametrize("weight, folded", [(0.3, True), (-1.0, False), (-0.97, False)])
def test_ia3_folds_its_scale_into_a_linear_weight_unless_the_scale_nears_zero(monkeypatch, weight, folded):
    """IA3 on a frozen Linear (CPU): y = x (W * s)^T + b in one GEMM, grad_s from the output divided by s; scales
    near 0 take the plain path. Both give the gradients of the merged-weight formula."""
    from lorakit.algos import ia3

    calls = []
    real = ia3.linear_folded
    monkeypatch.setattr(ia3, "linear_folded", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5).double().requires_grad_(False)
    adapter = make_adapter("ia3", layer).double()
    with torch.no_grad():
        adapter.weight.copy_(weight + 0.02 * torch.randn(5, dtype=torch.float64))
    x = torch.randn(2, ia3._MIN_FOLD_POSITIONS // 2, 6, dtype=torch.float64, requires_grad=True)
    adapter(x).sin().sum().backward()
    assert bool(calls) is folded
    got_w, got_x = adapter.weight.grad.clone(), x.grad.clone()
    adapter.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, layer.weight + adapter.delta_weight(1.0), layer.bias).sin().sum().backward()
    torch.testing.assert_close(got_w, adapter.weight.grad, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(got_x, x2.grad, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("short", [True, False])
def test_ia3_on_the_output_takes_native_ops_on_short_calls(monkeypatch, kind, bias, short):
    """IA3 on a plain frozen layer's output: a short call runs the layer without its bias and adds it back in one
    addcmul (native autograd ops), a longer one the custom output pass; both give the merged-weight formula."""
    from lorakit.algos import ia3

    if not short:
        monkeypatch.setattr(ia3, "_MAX_NATIVE_INPUT", 0)
    torch.manual_seed(0)
    layer = (torch.nn.Linear(6, 5, bias=bias) if kind == "linear" else torch.nn.Conv2d(6, 5, 3, bias=bias))
    layer = layer.double().requires_grad_(False)
    adapter = randomize(make_adapter("ia3", layer).double(), scale=0.3).eval()
    adapter.multiplier = 0.7
    x = torch.randn((3, 7, 6) if kind == "linear" else (2, 6, 5, 5), dtype=torch.float64)
    out = check_against_formula(adapter, layer, x)
    names = {True: "AddcmulBackward" if bias else "MulBackward", False: "_ScaledOutputBackward"}
    assert names[short] in type(out.grad_fn).__name__


@pytest.mark.parametrize("axis", ["in", "out"])
def test_dora_follows_a_base_weight_changed_in_place_or_replaced(axis):
    """DoRA keeps |W|^2 of the frozen base between calls; a weight changed in place (merge, an optimizer on the
    base) or a new weight must be seen at the next call."""
    layer, x = make_layer("linear"), make_input("linear")
    adapter = randomize(make_adapter("lora", layer, dora_wd=True, dora_axis=axis).double()).eval()

    def expected():
        return layer_forward(layer, x, layer.weight + adapter.delta_weight(), layer.bias)

    torch.testing.assert_close(adapter(x), expected(), **TOL)
    with torch.no_grad():
        layer.weight.mul_(1.5)
    torch.testing.assert_close(adapter(x), expected(), **TOL)
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 0.5, requires_grad=False)
    torch.testing.assert_close(adapter(x), expected(), **TOL)


@pytest.mark.parametrize("positions,path", [(3, "_LinearPlusLowRankBackward"), (30, "_LinearPlusLowRankBackward"),
                                            (200, "_LinearMergedLowRankBackward")])
@pytest.mark.parametrize("input_grad", [True, False])
def test_dora_fused_linear_scales_the_input_or_folds_the_scale_into_the_weight(positions, path, input_grad):
    """DoRA along columns scales the input channels: on few positions the input is scaled, on more the scale is
    folded into W and the down factor, on many (>= 2 x fan_in) into the merged weight W + m U D; all give the plain
    formula's output and gradients."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(40, 12).double().requires_grad_(False)
    adapter = randomize(make_adapter("lora", layer, dim=4, dora_wd=True, bypass_mode=True).double()).eval()
    adapter.multiplier = 0.7
    out = check_against_formula(adapter, layer, torch.randn(1, positions, 40, dtype=torch.float64), input_grad)
    assert type(out.grad_fn).__name__ == path


@pytest.mark.parametrize("positions", [3, 200])
def test_dora_along_columns_where_an_input_channel_vanishes_at_the_multiplier(positions):
    """The fused DoRA pass feeds the layer k x with k = 1 + m (c - 1) per input channel and divides the down factor
    by k; at m = 2 a column with ratio c = 1/2 gets k = 0, where that pass cannot apply: the plain ops give the
    formula's output and gradients instead of a division by zero."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(40, 12).double().requires_grad_(False)
    adapter = randomize(make_adapter("lora", layer, dim=4, dora_wd=True).double()).eval()
    with torch.no_grad():
        adapter.dora_scale[0, :3] = 0.5 * adapter.dora_norm()[0, :3]
    adapter.multiplier = 2.0
    out = check_against_formula(adapter, layer, torch.randn(1, positions, 40, dtype=torch.float64))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("use_scalar", [False, True])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("positions,path", [(5, "_LinearPlusLowRankBackward"), (60, "_LinearMergedLowRankBackward")])
def test_lora_linear_adds_the_pair_on_few_positions_and_merges_it_on_many(positions, path, input_grad, use_scalar):
    """Few positions: the two thin products added to the layer's output; many (>= 2 x fan_in): one product with
    W + m U D, rebuilt in backward. Both give the plain formula's output and gradients, with and without an input
    that needs a gradient, and with a trained scalar."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 20).double().requires_grad_(False)
    adapter = randomize(make_adapter("lora", layer, dim=4, use_scalar=use_scalar).double()).eval()
    adapter.multiplier = 0.7
    out = check_against_formula(adapter, layer, torch.randn(2, positions // 2, 12, dtype=torch.float64), input_grad)
    assert type(out.grad_fn).__name__ == path if not use_scalar else path in _grad_fn_names(out)


@pytest.mark.parametrize("constraint", [0.0, 1e-3])
@pytest.mark.parametrize("multiplier", [1.0, 0.7])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_diag_oft_rotates_a_linear_output_in_one_function_on_few_positions(constraint, multiplier, bias, input_grad):
    """Few positions on a frozen Linear: the layer, the Cayley transform (through one inverse) and the rotation of
    the output in one autograd function, constrained (Q clamped before it) or not (Q built from the blocks inside).
    The plain formula's output and gradients; the clamp is active in the constrained case."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 20, bias=bias).double().requires_grad_(False)
    adapter = randomize(make_adapter("diag-oft", layer, dim=4, constraint=constraint).double()).eval()
    adapter.multiplier = multiplier
    if constraint:
        b = adapter.oft_blocks.detach()
        assert torch.linalg.vector_norm(b - b.mT) > adapter.bound
    out = check_against_formula(adapter, layer, torch.randn(2, 3, 12, dtype=torch.float64), input_grad)
    assert type(out.grad_fn).__name__ == "_RotatedLinearBackward"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("multiplier", [1.0, 0.7])
def test_glora_runs_a_frozen_linear_and_both_chains_in_one_function(bias, input_grad, multiplier):
    """GLoRA on a frozen Linear (few positions; many take the merged weight): the layer, x + k a1 a2 x and k b1 b2 x in one autograd
    function; the plain formula's output and gradients."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 20, bias=bias).double().requires_grad_(False)
    adapter = randomize(make_adapter("glora", layer, dim=3, alpha=2).double()).eval()
    adapter.multiplier = multiplier
    out = check_against_formula(adapter, layer, torch.randn(2, 5, 12, dtype=torch.float64), input_grad)
    assert type(out.grad_fn).__name__ == "_LinearGLoRABackward"


@pytest.mark.parametrize("bypass,positions,hook,path", [
    (None, 10, False, "_LinearGLoRABackward"), (None, 60, False, "_RebuiltWeightOpBackward"),
    (True, 60, False, "_LinearGLoRABackward"), (False, 10, False, "_RebuiltWeightOpBackward"),
    # a hooked layer takes no merged weight: bypass_mode=False then adds op(x, dW) to the layer's own output
    (False, 10, True, "_RebuiltWeightOpBackward"),
])
def test_glora_bypass_mode_picks_the_chains_or_the_rebuilt_weight(bypass, positions, hook, path):
    """LyCORIS' bypass_mode on GLoRA: True runs the two chains on every call, False rebuilds dW (the merged weight,
    or op(x, dW) beside the layer where it cannot take one), None picks by positions. Each the plain formula."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 20).double().requires_grad_(False)
    if hook:
        layer.register_forward_pre_hook(lambda module, args: None)
    adapter = randomize(make_adapter("glora", layer, dim=3, alpha=2, bypass_mode=bypass).double()).eval()
    adapter.multiplier = 0.7
    out = check_against_formula(adapter, layer, torch.randn(2, positions // 2, 12, dtype=torch.float64), True)
    assert path in _grad_fn_names(out)
    assert ("_LinearGLoRABackward" in _grad_fn_names(out)) == (path == "_LinearGLoRABackward")


@pytest.mark.parametrize("options", [{}, {"dim": 1, "decompose_both": True, "factor": 2}])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_lokr_adds_the_kronecker_factors_to_a_linear_in_one_function_on_few_positions(options, bias, input_grad):
    """Few positions on a frozen Linear: kron(w1, w2) x as w1 (x w2^T) per position, added into the layer's output
    and input gradient in one function (factors full or low-rank); the plain formula's output and gradients."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 20, bias=bias).double().requires_grad_(False)
    adapter = randomize(make_adapter("lokr", layer, **options).double()).eval()
    adapter.multiplier = 0.7
    out = check_against_formula(adapter, layer, torch.randn(2, 5, 12, dtype=torch.float64), input_grad)
    assert "_LinearPlusKronFactorsBackward" in _grad_fn_names(out)


@pytest.mark.parametrize("input_grad", [True, False])
def test_boft_butterfly_stages_backward_matches_finite_differences(input_grad):
    """BOFT's stages as one function (gathers, per-stage block products into reused buffers, inverse gathers in
    backward) against numerical differentiation, every stage's blocks and (or not) the input as variables."""
    from lorakit.algos.butterfly import _Butterfly, butterfly_orders

    torch.manual_seed(0)
    stages, count, b, n = 3, 4, 2, 5
    r = torch.randn(stages, count, b, b, dtype=torch.float64, requires_grad=True)
    v = torch.randn(count * b, n, dtype=torch.float64, requires_grad=input_grad)
    orders, inverses = butterfly_orders(count * b, stages, b, v.device)
    assert torch.autograd.gradcheck(lambda v, r: _Butterfly.apply(v, r, orders, inverses), (v, r))


def _grad_fn_names(t: torch.Tensor) -> set[str]:
    """Names of every node in t's autograd graph."""
    names, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo.extend(f for f, _ in node.next_functions)
    return names


@pytest.mark.parametrize("algo,options", [("lora", {}), ("lora", {"use_scalar": True}), ("lora", {"rs_lora": True})])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("positions,path", [(60, "_LinearMergedLowRankBackward"), (6, "_LinearPlusLowRankBackward")])
def test_dora_along_rows_runs_the_layer_and_pair_in_one_function_at_multiplier_1(algo, options, bias, input_grad,
                                                                                  positions, path):
    """DoRA along output rows at multiplier 1: y = x (diag(r) (W + s U D))^T + b in one function, on many positions
    as one GEMM each way with the pair merged, on few as the layer's GEMM plus the pair's thin products scaled by r;
    r's gradient recovered from the output. The plain formula's output and gradients."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 20, bias=bias).double().requires_grad_(False)
    adapter = randomize(make_adapter(algo, layer, dim=4, dora_wd=True, dora_axis="out", **options).double())
    adapter.eval()
    x = torch.randn(2, positions // 2, 12, dtype=torch.float64)
    out = check_against_formula(adapter, layer, x, input_grad)
    assert path in _grad_fn_names(out)


@pytest.mark.parametrize("kernel,size,fused", [(3, 8, True), (1, 8, True), (3, 1, False)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_dora_along_rows_on_a_conv_runs_one_convolution_each_way_where_merging_pays(kernel, size, fused, bias,
                                                                                   input_grad):
    """DoRA along output rows on a frozen conv at multiplier 1: r conv(x, W + s U D) + b with the ratio folded into
    the merged weight, where merging pays (3x3 and 1x1 kernels on 8x8 maps), the plain ops on a 1x1 map; the
    plain formula's output and gradients either way."""
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(4, 6, kernel, padding=kernel // 2, bias=bias).double().requires_grad_(False)
    adapter = randomize(make_adapter("lora", layer, dim=2, dora_wd=True, dora_axis="out").double()).eval()
    out = check_against_formula(adapter, layer, torch.randn(2, 4, size, size, dtype=torch.float64), input_grad)
    assert ("_ConvMergedLowRankBackward" in _grad_fn_names(out)) is fused


@pytest.mark.parametrize("positions", [60, 6])
def test_dora_along_rows_with_a_ratio_near_zero_takes_the_plain_ops_instead(positions):
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 20).double().requires_grad_(False)
    adapter = randomize(make_adapter("lora", layer, dim=4, dora_wd=True, dora_axis="out").double()).eval()
    with torch.no_grad():
        adapter.dora_scale[3] = 1e-4  # its ratio to the row norm is far below the path's bound
    x = torch.randn(2, positions // 2, 12, dtype=torch.float64)
    out = adapter(x.requires_grad_(True))
    assert not {"_LinearMergedLowRankBackward", "_LinearPlusLowRankBackward"} & _grad_fn_names(out)
    expected = layer_forward(layer, x, layer.weight + adapter.delta_weight(), layer.bias)
    torch.testing.assert_close(out, expected, **TOL)


def test_dora_on_a_layer_built_in_inference_mode():
    """A weight made under torch.inference_mode has no version counter; DoRA's |W|^2 is then computed per call."""
    with torch.inference_mode():
        layer = torch.nn.Linear(12, 8).double()
    adapter = randomize(make_adapter("lora", layer, dora_wd=True).double())
    x = make_input("linear")
    with torch.inference_mode():
        out = adapter(x)
        expected = layer_forward(layer, x, layer.weight + adapter.delta_weight(), layer.bias)
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("algo,options,kind", [("lora", {}, "linear"), ("loha", {"dora_wd": True}, "conv2d"),
                                               ("boft", {"dim": 2}, "linear"), ("norm", {}, "layernorm")])
def test_merge_with_a_multiplier_adds_the_change_at_that_multiplier(algo, options, kind):
    """merge(multiplier=m) merges at m, not at the adapter's own multiplier (tools merge at a ratio this way), and
    unmerge gives the layer back."""
    layer, x = make_layer(kind), make_input(kind)
    adapter = randomize(make_adapter(algo, layer, **options).double()).eval()
    sd = adapter.state_dict()
    dw, db = ui_delta(sd, layer.weight, 0.4)
    bias = layer.bias if db is None else layer.bias + db
    expected = layer_forward(layer, x, layer.weight + dw, bias)
    adapter.merge(multiplier=0.4)
    assert adapter.multiplier == 1.0
    torch.testing.assert_close(layer(x), expected, **TOL)
    adapter.unmerge()
    torch.testing.assert_close(layer(x), make_layer(kind)(x), rtol=0, atol=0)


def test_unmerge_takes_away_a_bias_that_merge_gave_the_layer():
    """Norm training on a LayerNorm without a bias: merge gives the layer the bias change as its bias, unmerge
    takes it away again (the layer had none)."""
    torch.manual_seed(0)
    layer = torch.nn.LayerNorm(8, bias=False).double().requires_grad_(False)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    x = make_input("layernorm")
    before = layer(x)
    adapter = randomize(make_adapter("norm", layer).double()).eval()
    adapter.merge(multiplier=0.7)
    expected = F.layer_norm(x, (8,), layer.weight, 0.7 * adapter.b_norm.detach(), layer.eps)
    torch.testing.assert_close(layer(x), expected, **TOL)
    adapter.unmerge()
    assert layer.bias is None
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)


def test_merge_and_unmerge_out_of_turn_are_errors_that_leave_the_weight_alone():
    """A second merge would add the change twice and an unmerge without a backup has nothing to restore: both are
    refused, naming the adapter, and the layer keeps the weight it had."""
    layer = make_layer("linear")
    adapter = randomize(make_adapter("lora", layer).double())
    original = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="lora adapter is not merged"):
        adapter.unmerge()
    adapter.merge()
    merged = layer.weight.detach().clone()
    torch.testing.assert_close(merged, original + adapter.delta_weight(), **TOL)
    with pytest.raises(RuntimeError, match="lora adapter is already merged"):
        adapter.merge()
    assert torch.equal(layer.weight, merged)
    adapter.unmerge()
    assert torch.equal(layer.weight, original)
    adapter.merge(keep_backup=False)
    with pytest.raises(RuntimeError, match="merged with keep_backup=False and cannot be unmerged"):
        adapter.unmerge()
    assert torch.equal(layer.weight, merged)


@pytest.mark.parametrize("algo,options", [("lora", {"use_scalar": True}), ("loha", {"use_scalar": True}),
                                          ("lora", {"dora_wd": True, "use_scalar": True}), ("ia3", {})])
def test_a_rated_forward_is_the_formula_at_rate_times_multiplier_with_the_rates_gradient(algo, options):
    """The application-rate explorer's forward: the output at multiplier r x m, with a gradient for r. Where the
    output is affine in the multiplier (W + r m dW, DoRA's W + r m (D - W)) that is the plain formula with r's
    gradient from autograd; the trained scalar is part of dW."""
    layer, x = make_layer("linear"), make_input("linear")
    adapter = randomize(make_adapter(algo, layer, **options).double()).eval()
    adapter.multiplier = 0.7
    rate = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    adapter.rate = lambda: rate
    out = adapter(x)
    out.sin().sum().backward()
    reference = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        dw = adapter.delta_weight(0.7)
    expected = F.linear(x, layer.weight + reference * dw, layer.bias)
    torch.testing.assert_close(out, expected, **TOL)
    expected.sin().sum().backward()
    torch.testing.assert_close(rate.grad, reference.grad, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("algo,options", [("lora", {}), ("diag-oft", {}), ("full", {})])
def test_an_applied_adapter_once_merged_adds_nothing_more_in_its_forward(algo, options):
    """Applied and then merged, the layer's weight holds the change: the routed forward must not add it a second
    time. Unmerged again, the forward adds it once more, through the factors."""
    layer, x = make_layer("linear"), make_input("linear")
    adapter = randomize(make_adapter(algo, layer, **options).double()).eval()
    adapter.multiplier = 0.7
    db = adapter.delta_bias(0.7)
    expected = layer_forward(layer, x, layer.weight + adapter.delta_weight(0.7),
                             layer.bias if db is None else layer.bias + db)
    adapter.apply()
    torch.testing.assert_close(layer(x), expected, **TOL)
    adapter.merge()
    torch.testing.assert_close(layer(x), expected, **TOL)
    adapter.unmerge()
    torch.testing.assert_close(layer(x), expected, **TOL)
    adapter.restore()
