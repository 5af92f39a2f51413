"""Bad options are errors that name the option and the value; string spellings parse as kohya writes them."""

from __future__ import annotations

import re

import pytest
import torch.nn as nn

from lorakit.algos import OptionError, algorithm, make_adapter
from lorakit.algos.options import parse_options


@pytest.fixture
def linear():
    return nn.Linear(12, 8)


@pytest.mark.parametrize("text,value", [("False", False), ("0", False), ("no", False), ("off", False),
                                        ("true", True), ("1", True), ("YES", True), (" on ", True)])
def test_boolean_strings(text, value):
    options, given = parse_options(use_tucker=text)
    assert options.use_tucker is value and given == {"use_tucker"}


def test_numbers_from_strings_and_aliases():
    options, given = parse_options({"dim": "8", "alpha": "4.5", "use_cp": "true", "constrain": "1e-3",
                                    "bypass_mode": "none", "wd_on_out": "True"})
    assert (options.dim, options.alpha, options.use_tucker, options.constraint) == (8, 4.5, True, 1e-3)
    assert options.bypass_mode is None and options.dora_axis == "out"
    assert given == {"dim", "alpha", "use_tucker", "constraint", "bypass_mode", "dora_axis"}


@pytest.mark.parametrize("text", ["auto", "None", "null", "", " AUTO "])
def test_bypass_mode_auto_in_any_spelling_picks_the_path_per_call(text):
    options, given = parse_options(bypass_mode=text)
    assert options.bypass_mode is None and given == {"bypass_mode"}


def test_option_names_ignore_case_and_surrounding_spaces():
    """kohya_ss and hand-written network_args spell names as they like: " Network_Dim ", "ALPHA"."""
    options, given = parse_options({" Network_Dim ": "8", "ALPHA": "2", "Use_CP": "true"})
    assert (options.dim, options.alpha, options.use_tucker) == (8, 2.0, True)
    assert given == {"dim", "alpha", "use_tucker"}


@pytest.mark.parametrize("raw", [{"use_tucker": "true", "use_cp": "false"}, {"use_cp": "true", "use_tucker": "false"},
                                 {"use_cp": True, "use_tucker": True}])
def test_a_boolean_given_under_two_spellings_is_on_if_either_is(raw):
    """LyCORIS ORs use_tucker and its old name use_cp (kohya_ss writes both, one of them false): in either order
    the option is on, not whichever spelling came last."""
    options, given = parse_options(raw)
    assert options.use_tucker is True and given == {"use_tucker"}
    off, _ = parse_options({"use_cp": "false", "use_tucker": "no"})
    assert off.use_tucker is False


@pytest.mark.parametrize("kwargs,words", [
    ({"dimm": 4}, ["dimm", "did you mean 'dim'"]),
    ({"dim": "abc"}, ["'dim'", "'abc'", "integer"]),
    ({"dim": 2.5}, ["'dim'", "2.5"]),
    ({"dim": 0}, ["'dim'", ">= 1", "0"]),
    ({"dim": True}, ["'dim'", "True"]),
    ({"alpha": -1}, ["'alpha'", "-1"]),
    ({"dropout": 1.5}, ["'dropout'", "1.5"]),
    # probabilities in [0, 1): 1 would drop everything (and rank_dropout_scale divide by zero)
    ({"dropout": 1.0}, ["'dropout'", "1.0", "[0, 1)"]),
    ({"rank_dropout": 1}, ["'rank_dropout'", "[0, 1)"]),
    ({"module_dropout": "1"}, ["'module_dropout'", "[0, 1)"]),
    ({"dropout": -0.1}, ["'dropout'", "-0.1"]),
    ({"rank_dropout": "x"}, ["'rank_dropout'", "'x'"]),
    ({"use_tucker": "maybe"}, ["'use_tucker'", "'maybe'", "boolean"]),
    ({"use_tucker": 2}, ["'use_tucker'", "2", "boolean"]),  # numbers other than 0/1 are no booleans
    ({"factor": 0}, ["'factor'", "0"]),
    ({"factor": -2}, ["'factor'", "-2"]),  # -1 is the one negative meaning (smallest factorisation)
    ({"block_size": 0}, ["'block_size'", "0"]),
    ({"dora_axis": "rows"}, ["'dora_axis'", "'rows'"]),
    ({"constraint": -0.1}, ["'constraint'", "-0.1"]),
    ({"dim": 4, "lora_dim": 8}, ["'dim'", "twice"]),
])
def test_bad_values_name_the_option(kwargs, words):
    with pytest.raises(OptionError) as err:
        parse_options(**kwargs)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("algo,option,value", [
    ("ia3", "dim", 8), ("ia3", "dropout", 0.1), ("full", "alpha", 2), ("lora", "factor", 4),
    ("loha", "constraint", 0.1), ("diag-oft", "use_tucker", True), ("glora", "dora_wd", True),
    ("dylora", "use_tucker", True), ("boft", "train_on_input", True), ("lokr", "block_size", 2),
])
def test_options_an_algorithm_does_not_accept_are_refused(linear, algo, option, value):
    with pytest.raises(OptionError) as err:
        make_adapter(algo, linear, **{option: value})
    message = str(err.value)
    assert f"'{algorithm(algo).name}'" in message and f"'{option}'" in message and repr(value) in message


@pytest.mark.parametrize("features,bad", [((12, 8), 8), ((10, 8), 8), ((12, 10), 12)], ids=["both", "out", "in"])
def test_lokr_factor_error_names_the_dimension_it_does_not_divide(features, bad):
    with pytest.raises(OptionError, match=rf"'factor': 5 does not divide the layer dimension {bad} "):
        make_adapter("lokr", nn.Linear(*features), factor=5)


def test_typed_options_are_checked_as_keyword_options_are(linear):
    """An AdapterOptions given whole: the options it sets away from their defaults are the given ones, refused
    where the algorithm does not take them and warned about where their parent option is off."""
    from lorakit.algos import AdapterOptions

    adapter = algorithm("lora")(linear, AdapterOptions(dim=8, alpha=4))
    assert adapter.rank == 8 and adapter.scale == 0.5
    with pytest.raises(OptionError, match="algo 'ia3' does not accept option 'dim' \\(got 8\\)"):
        algorithm("ia3")(linear, AdapterOptions(dim=8))
    with pytest.warns(UserWarning, match="option 'dora_axis' \\('out'\\) changes nothing without dora_wd"):
        algorithm("lora")(linear, AdapterOptions(dora_axis="out"))


def test_lokr_factor_that_divides_both_dimensions_is_accepted(linear):
    make_adapter("lokr", linear, factor=4)  # 4 divides 12 and 8 (5, which divides neither: the test above)


def test_dylora_block_size_must_divide_dim(linear):
    with pytest.raises(OptionError, match=r"'block_size': 3 does not divide dim 8"):
        make_adapter("dylora", linear, dim=8, block_size=3)


def test_boft_block_size_that_cannot_split(linear):
    with pytest.raises(OptionError, match=r"'dim': BOFT cannot split 8 output channels.*; dim 2 splits it"):
        make_adapter("boft", nn.Linear(12, 8), dim=1)
    # 48 channels (the demo model's): blocks of 2 or 4 leave 24 or 12, not a power of two; 6 leaves 8
    with pytest.raises(OptionError, match=r"BOFT cannot split 48 output channels into blocks of an even size <= 4 "
                                          r"with a power-of-two count; dim 6 splits it"):
        make_adapter("boft", nn.Linear(12, 48), dim=4)
    assert make_adapter("boft", nn.Linear(12, 48), dim=6) is not None
    with pytest.raises(OptionError, match=r"BOFT cannot split 7 output channels .*power-of-two count$"):
        make_adapter("boft", nn.Linear(12, 7), dim=4)  # no even block size divides 7: no dim to suggest


def test_unknown_algorithm_suggests(linear):
    with pytest.raises(OptionError, match=r"unknown algo 'lokrr'.*did you mean 'lokr'"):
        make_adapter("lokrr", linear)


def test_algorithm_names_and_aliases():
    assert algorithm("LoCon").name == "lora" and algorithm("OFT").name == "diag-oft"
    assert algorithm("diag_oft").name == "diag-oft" and algorithm("native").name == "full"


@pytest.mark.parametrize("layer,words", [
    (nn.Embedding(4, 4), ["Embedding", "Linear, Conv1d/2d/3d"]),
    (nn.Conv2d(4, 8, 3, groups=2), ["groups=2"]),
    (nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), ["padding_mode='reflect'"]),
])
def test_unsupported_layers(layer, words):
    with pytest.raises((TypeError, ValueError)) as err:
        make_adapter("lora", layer)
    for word in words:
        assert word in str(err.value)


def test_algorithm_on_the_wrong_kind_of_layer(linear):
    with pytest.raises(ValueError, match="algo 'norm' cannot adapt a linear layer"):
        make_adapter("norm", linear)
    with pytest.raises(ValueError, match="algo 'lora' cannot adapt a layernorm layer"):
        make_adapter("lora", nn.LayerNorm(8))
    with pytest.raises(ValueError, match="affine LayerNorm"):
        make_adapter("norm", nn.LayerNorm(8, elementwise_affine=False))


@pytest.mark.parametrize("algo,options,named", [
    ("lora", {"dora_axis": "out"}, "'dora_axis' ('out') changes nothing without dora_wd"),
    ("loha", {"rank_dropout_scale": True}, "'rank_dropout_scale' (True) changes nothing without rank_dropout"),
    ("lokr", {"decompose_both": True, "full_matrix": True}, "'decompose_both' (True) changes nothing with full_matrix"),
])
def test_an_option_whose_parent_is_off_is_warned_about(linear, algo, options, named):
    with pytest.warns(UserWarning, match=re.escape(f"algo '{algo}': option {named}")):
        make_adapter(algo, linear, **options)


@pytest.mark.parametrize("options", [{"dora_axis": "out", "dora_wd": True}, {"dora_axis": "in"},
                                     {"rank_dropout_scale": True, "rank_dropout": 0.1},
                                     {"rank_dropout_scale": False}, {"decompose_both": True}])
def test_dependent_options_in_use_or_at_their_default_are_quiet(linear, options, recwarn):
    make_adapter("lokr" if "decompose_both" in options else "lora", linear, **options)
    assert not [w for w in recwarn if "changes nothing" in str(w.message)]


@pytest.mark.parametrize("algo", ["ia3", "diag-oft", "boft"])
def test_bypass_mode_refusal_says_why(linear, algo):
    """LyCORIS has a bypass mode for these, which also scales or rotates the layer's bias (no UI applies that):
    the refusal says so, in make_adapter and in a network's options alike."""
    from lorakit import create_network

    with pytest.raises(OptionError, match=r"bypass_mode.*bypass mode for it also (scales|rotates) the layer's bias"):
        make_adapter(algo, linear, bypass_mode=True)
    with pytest.raises(OptionError, match=r"given True.*the layer's bias"):
        create_network(nn.Sequential(nn.Linear(16, 16)), algo=algo, bypass_mode=True)
