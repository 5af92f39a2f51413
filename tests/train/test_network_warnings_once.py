"""The warnings about network_args an algorithm ignores appear once per run, in their complete form (with
network_dim/network_alpha), not once from the early option check and again when the network is built."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("diffusers")

from lorakit.train.config import load_train_config  # noqa: E402
from lorakit.train.run import train  # noqa: E402

from .tiny_run import make_base, run_options  # noqa: E402


def test_ignored_network_args_are_warned_about_once(tmp_path, caplog):
    base = make_base(tmp_path / "base", images=2)
    # kohya_ss' LyCORIS/iA3: use_tucker and rank_dropout at their defaults, network_dim which (IA)^3 does not use
    options = dict(max_train_steps=1, network_dim=8, network_alpha=1,
                   network_args=["algo=ia3", "use_tucker=False", "rank_dropout=0", "bypass_mode=False"])
    with caplog.at_level(logging.INFO, logger="lorakit"):
        train(load_train_config(overrides=run_options(base, tmp_path / "out", options)))
    ignored = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert ignored == ["algo 'ia3' does not use bypass_mode=False, rank_dropout=0.0, use_tucker=False; given at the "
                       "default, ignored", "algo 'ia3' does not use dim=8; ignored"], ignored
