"""lorakit.algos names its exports by hand so that it can hand them out without importing torch (registry.py is
imported on first use): the hand list must be exactly what the registry and options.py define."""

from __future__ import annotations

import lorakit.algos as algos
from lorakit.algos import options, registry


def test_the_package_exports_every_registry_name_and_algorithm_and_nothing_else():
    assert sorted(algos.__all__) == sorted(registry.__all__)
    assert {cls.__name__ for cls in registry.ALGORITHMS} <= set(algos.__all__)
    for name in algos.__all__:
        source = options if name in ("AdapterOptions", "OptionError", "parse_options") else registry
        assert getattr(algos, name) is getattr(source, name), name
