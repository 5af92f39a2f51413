"""stop_text_encoder_training (sd-scripts' steps) and stop_text_encoder_training_pct (the kohya_ss GUI's
percentage) are two spellings of one stop: given both, lorakit refuses the config instead of silently following
one of them (the steps would win, and the percentage the user also wrote would do nothing)."""

from __future__ import annotations

import pytest

from lorakit.train.config import OptionError, load_train_config


def test_the_stop_given_both_as_steps_and_as_a_percentage_is_refused():
    with pytest.raises(OptionError, match="stop_text_encoder_training and stop_text_encoder_training_pct cannot "
                                          "both be on: give the stop as steps or as a percentage"):
        load_train_config(overrides=dict(stop_text_encoder_training=2, stop_text_encoder_training_pct=50))


@pytest.mark.parametrize("option,value", [("stop_text_encoder_training", 2), ("stop_text_encoder_training_pct", 50)])
def test_either_form_alone_is_accepted(option, value):
    assert getattr(load_train_config(overrides={option: value}), option) == value
