"""The shipped demo weights stay within issue 4's budget: at most 20 MB for all demo models together."""

from __future__ import annotations

from lorakit.formats import read_header
from lorakit.models.demo import DEMO_DIR, DEMO_MODELS, demo_file

LIMIT_BYTES = 20_000_000  # 20 MB, decimal: the stricter reading


def test_demo_weights_fit_in_20_mb():
    shipped = sorted(DEMO_DIR.glob("*.safetensors"))  # what package-data "demo/*.safetensors" ships
    assert {p.stem for p in shipped} == set(DEMO_MODELS)
    for name in DEMO_MODELS:  # real weight files, not LFS pointers that would pass any size limit
        path, _ = demo_file(name)
        assert len([k for k in read_header(path) if k != "__metadata__"]) > 100, path
    total = sum(p.stat().st_size for p in shipped)
    assert total <= LIMIT_BYTES, f"demo weights are {total / 1e6:.1f} MB together, over the 20 MB limit"
