"""Which kind of CPU the fused paths run on, where the fastest way to ask MKL for a product differs between the
two CPUs this project was first measured on: an Intel Xeon with AVX-512 and an AMD EPYC with AVX2. A third, an AMD
EPYC with AVX-512 (Zen 4), takes the Xeon's choices: its bare products favour the AVX2 EPYC's orders, but whole
layers measured mixed with them (bench/RESULTS.md, its summary of 2026-12-07 evening)."""

from __future__ import annotations

import torch


def has_avx512() -> bool:
    """True where torch dispatches its AVX-512 kernels (the Xeon), False on AVX2 (the EPYC) and older CPUs."""
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "")()
    return capability.startswith("AVX512")


AVX512 = has_avx512()
