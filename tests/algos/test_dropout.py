"""Dropouts act in training only, in every compute path, with the expectations their definitions give."""

from __future__ import annotations

import pytest
import torch

from lorakit.algos import make_adapter

from .conftest import make_input, make_layer, randomize

# (algo, options, layer): one case per way the algorithms apply dropouts
DROPOUT_CASES = [
    ("lora", {}, "linear"), ("lora", {"bypass_mode": False}, "conv2d"), ("lora", {"use_tucker": True}, "conv2d"),
    ("lora", {"dora_wd": True}, "linear"), ("loha", {}, "linear"), ("loha", {"use_tucker": True}, "conv2d"),
    ("loha", {}, "linear_wide"),  # a layer where LoHa's Khatri-Rao pair would run fused in eval
    ("loha", {"dora_wd": True}, "linear"), ("lokr", {"dim": 1, "dora_wd": True, "dora_axis": "out"}, "conv2d"),
    ("lokr", {"dim": 1}, "conv2d"), ("dylora", {"dim": 4, "block_size": 4}, "linear"), ("glora", {}, "linear"),
    ("glora", {}, "conv2d"),  # its chains as plain ops (a frozen Linear in eval takes one fused function)
    ("diag-oft", {}, "linear"), ("boft", {"dim": 2}, "conv2d"),
]
DRAWS = 600


@torch.no_grad()  # the draws' values only: grad mode picks no other path (it only skips recomputation)
def deltas(adapter, layer, x, n):
    base = layer(x)
    return torch.stack([adapter(x) - base for _ in range(n)])


@pytest.mark.parametrize("algo,options,kind", DROPOUT_CASES)
def test_dropout_is_random_in_training_unbiased_and_off_in_eval(algo, options, kind):
    layer, x = make_layer(kind), make_input(kind)
    adapter = randomize(make_adapter(algo, layer, dropout=0.3, **options).double())
    adapter.eval()
    expected = adapter(x) - layer(x)
    assert torch.equal(adapter(x), adapter(x)), "eval must be deterministic"

    adapter.train()
    torch.manual_seed(0)
    drawn = deltas(adapter, layer, x, DRAWS)
    assert not torch.allclose(drawn[0], drawn[1]), "training must drop"
    assert not torch.allclose(drawn[0], expected)
    # inverted dropout keeps the expectation: the mean of many draws approaches the eval output
    err = (drawn.mean(0) - expected).abs().mean() / expected.abs().mean()
    assert err < 0.1, f"mean of {DRAWS} draws is {err:.3f} away from the eval change"


# Calls with many more positions than the layer has inputs take other paths in eval: the merged weight (LoHa, GLoRA,
# BOFT, DoRA along rows) or LoRA's merged fused pair, none of which has a place for a mask
MANY_POSITION_CASES = [("lora", {}), ("loha", {}), ("glora", {}), ("boft", {"dim": 2}),
                       ("lora", {"dora_wd": True, "dora_axis": "out"})]


@pytest.mark.parametrize("algo,options", MANY_POSITION_CASES, ids=[f"{a}-{','.join(o) or 'default'}"
                                                                   for a, o in MANY_POSITION_CASES])
@pytest.mark.parametrize("dropout", ["dropout", "rank_dropout"])
def test_dropouts_act_on_calls_with_many_positions(algo, options, dropout):
    layer = make_layer("linear")
    x = torch.randn(4, 40, 12, dtype=torch.float64)
    adapter = randomize(make_adapter(algo, layer, **{dropout: 0.3}, **options).double())
    adapter.eval()
    expected = adapter(x) - layer(x)
    adapter.train()
    torch.manual_seed(0)
    drawn = deltas(adapter, layer, x, 200)
    assert not torch.allclose(drawn[0], drawn[1]), "training must drop"
    assert not torch.allclose(drawn[0], expected)
    # the draws still average to about the eval change (dropout), or to less (rank_dropout, unrescaled)
    err = (drawn.mean(0) - expected).abs().mean() / expected.abs().mean()
    assert err < (0.15 if dropout == "dropout" else 0.5), f"mean of the draws is {err:.3f} away from the eval change"


# DyLoRA draws its rank at random anyway; DoRA keeps its magnitude rescaling undropped, so the (1 - p) rule
# below holds only for its directional part (its dropout is covered by the test above).
@pytest.mark.parametrize("algo,options,kind",
                         [c for c in DROPOUT_CASES if c[0] != "dylora" and not c[1].get("dora_wd")])
@pytest.mark.parametrize("rescale", [False, True])
def test_rank_dropout(algo, options, kind, rescale):
    layer, x = make_layer(kind), make_input(kind)
    p = 0.25
    adapter = randomize(make_adapter(algo, layer, rank_dropout=p, rank_dropout_scale=rescale, **options).double())
    adapter.eval()
    expected = adapter(x) - layer(x)
    assert torch.equal(adapter(x), adapter(x)), "eval must be deterministic"
    adapter.train()
    torch.manual_seed(0)
    drawn = deltas(adapter, layer, x, DRAWS)
    assert not torch.allclose(drawn[0], drawn[1])
    # LyCORIS' convention: without rank_dropout_scale the kept components are not rescaled, so the expected change
    # shrinks to (1 - p); with it they are divided by the kept fraction, so it stays close to the eval change.
    target = expected if rescale else (1 - p) * expected
    err = (drawn.mean(0) - target).abs().mean() / target.abs().mean()
    assert err < 0.1, f"mean change is {err:.3f} away from {'1' if rescale else '1 - p'} x the eval change"
    adapter.eval()
    torch.testing.assert_close(adapter(x) - layer(x), expected)


@pytest.mark.parametrize("kind,shape,mask_shape", [
    ("conv2d", (2, 8, 5, 5), (2, 8, 1, 1)), ("conv2d", (8, 5, 5), (8, 1, 1)),  # unbatched: one sample
    ("conv1d", (8, 7), (8, 1)), ("linear", (3, 5, 8), (3, 1, 8)), ("linear", (8,), (8,))])
def test_channel_masks_keep_or_drop_whole_channels_per_sample(kind, shape, mask_shape):
    adapter = make_adapter("lora", make_layer(kind), rank_dropout=0.5)
    torch.manual_seed(0)
    mask = adapter.channel_mask(torch.ones(shape), 0.5)
    assert mask.shape == mask_shape
    assert set(mask.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("algo,options", [("lora", {}), ("ia3", {}), ("diag-oft", {}), ("full", {})])
def test_module_dropout_skips_the_whole_adapter(algo, options):
    layer, x = make_layer("linear"), make_input("linear")
    adapter = randomize(make_adapter(algo, layer, module_dropout=0.4, **options).double())
    base = layer(x)
    adapter.train()
    torch.manual_seed(0)
    skipped = sum(torch.equal(adapter(x), base) for _ in range(DRAWS)) / DRAWS
    assert abs(skipped - 0.4) < 0.06
    adapter.eval()
    assert not torch.equal(adapter(x), base)


def test_dylora_trains_a_random_leading_rank_and_evaluates_the_full_rank():
    layer, x = make_layer("linear"), make_input("linear")
    adapter = randomize(make_adapter("dylora", layer, dim=4, alpha=2, block_size=1).double())
    adapter.eval()
    full = adapter(x) - layer(x)
    up, down = adapter.lora_up.detach(), adapter.lora_down.detach()
    # what a file cut to rank r gives: alpha / r * up[:, :r] @ down[:r]
    truncated = [torch.nn.functional.linear(x, (up[:, :r] @ down[:r]) * (2 / r)) for r in range(1, 5)]
    torch.testing.assert_close(full, truncated[-1])
    adapter.train()
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        out = adapter(x) - layer(x)
        matches = [r for r, t in enumerate(truncated, 1) if torch.allclose(out, t)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {1, 2, 3, 4}
    # only the drawn block learns: blocks before it are held fixed in that step
    adapter.zero_grad()
    torch.manual_seed(3)
    adapter(x).sum().backward()
    rows_with_grad = (adapter.lora_down.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    assert len(rows_with_grad) == 1


@pytest.mark.parametrize("kind,shape", [("linear", (6, 5, 8)), ("conv2d", (6, 8, 5, 5))])
def test_rank_dropout_scale_rescales_each_samples_kept_channels_to_mean_one(kind, shape):
    """rank_dropout_scale divides each sample's mask by that sample's kept fraction (not the batch's or a channel's):
    every kept channel of sample n is c / kept_n, so each sample's mask has mean exactly 1."""
    adapter = make_adapter("lora", make_layer(kind), rank_dropout=0.5, rank_dropout_scale=True)
    torch.manual_seed(0)
    mask = adapter.channel_mask(torch.ones(shape, dtype=torch.float64), 0.5)
    per_sample = mask.reshape(shape[0], 8)
    keep = (per_sample > 0).double()
    kept = keep.sum(1)
    # a draw where samples keep different counts (a batch-wide or per-channel rescale would then differ)
    assert bool((kept > 0).all()) and bool((kept < 8).all()) and len(set(kept.tolist())) > 1
    torch.testing.assert_close(per_sample, keep * (8 / kept)[:, None], rtol=0, atol=1e-12)
    torch.testing.assert_close(per_sample.mean(1), torch.ones(shape[0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_dylora_all_ranks_trains_every_rank_at_sd_scripts_scale():
    """dylora_all_ranks (sd-scripts' networks/dylora.py): each training step uses every rank component at scale
    alpha / dim * sqrt(dim / r) for the drawn leading rank r, only block r learning; eval: alpha / dim."""
    layer, x = make_layer("linear"), make_input("linear")
    dim, alpha = 4, 2.0
    adapter = make_adapter("dylora", layer, dim=dim, alpha=alpha, block_size=1, dylora_all_ranks=True)
    adapter = randomize(adapter.double())
    up, down = adapter.lora_up.detach(), adapter.lora_down.detach()
    full = torch.nn.functional.linear(x, up @ down)
    adapter.eval()
    torch.testing.assert_close(adapter(x) - layer(x), full * (alpha / dim))
    expected = {r: full * (alpha / dim * (dim / r) ** 0.5) for r in range(1, dim + 1)}
    adapter.train()
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        out = adapter(x) - layer(x)
        matches = [r for r, t in expected.items() if torch.allclose(out, t, rtol=1e-10, atol=1e-12)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(expected)
    adapter.zero_grad()
    torch.manual_seed(3)
    adapter(x).sum().backward()
    assert (adapter.lora_down.grad.abs().sum(1) > 0).sum() == 1  # the other blocks held fixed
    assert (adapter.lora_up.grad.abs().sum(0) > 0).sum() == 1
