"""ss_* values that other tools key on, as sd-scripts writes them."""

from __future__ import annotations

import pytest

from lorakit.tools.concat import _is_v2
from lorakit.train.metadata import base_model_version


@pytest.mark.parametrize("kind,v,expected", [
    ("sd1", False, "sd_v1"), ("sd1", True, "sd_v1_v"), ("sd2", False, "sd_v2"), ("sd2", True, "sd_v2_v"),
    ("sdxl", False, "sdxl_base_v1-0"),
])
def test_base_model_version_is_sd_scripts_string(kind, v, expected):
    """model_util.get_model_version_str_for_sd1_sd2: "sd" + "_v2"/"_v1" + "_v" for v-prediction."""
    assert base_model_version(kind, v) == expected
    assert _is_v2({"ss_base_model_version": base_model_version(kind, v)}) == (kind == "sd2")
