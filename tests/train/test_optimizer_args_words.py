"""optimizer_args values yes/no and true/false in any case (lorakit reads them as booleans where kohya's
ast.literal_eval would refuse them): `decouple=no` must turn the option off, never on."""

from __future__ import annotations

from lorakit.train.optimizers import parse_kwargs


def test_yes_and_no_read_as_booleans_in_any_case():
    got = parse_kwargs(["decouple=no", "use_bias_correction=yes", "safeguard_warmup=NO", "d_coef_on=Yes",
                        "amsgrad=false", "foreach=True"])
    assert got == {"decouple": False, "use_bias_correction": True, "safeguard_warmup": False, "d_coef_on": True,
                   "amsgrad": False, "foreach": True}
    assert all(type(v) is bool for v in got.values())


def test_none_and_null_read_as_none_in_any_case():
    # e.g. Adafactor's lr-free settings or clip_threshold=None: None, never 0 or the string "null"
    got = parse_kwargs(["a=none", "b=NULL", "c=Null", "d=None"])
    assert got == {"a": None, "b": None, "c": None, "d": None}
