"""The C allocator's hold on freed memory, for benchmarks whose steps free and reallocate large tensors.

By default glibc returns large freed blocks to the system (each allocation over its mmap threshold is a fresh
mapping, and free memory at the top of the heap is trimmed), so the next step faults those pages in again. On
this 2-core machine one SD1.5 U-Net step at 32x32 latents took 300-630 thousand minor page faults, a number that
changes from step to step, and the step time with it (2.9-3.9 s for the same frozen U-Net). With
`keep_freed_memory()` the faults drop to ~0 and the same step takes 2.6 s steadily. Nothing here is lorakit's:
it is the process the benchmark runs in. (Not for the trainer: bench/train_step.py with glibc's tunables set this
way measured no gain, SD1.5 at 512 px 11.17 -> 11.50 s/step, and 330 MB more peak RSS.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (no trimming, no per-allocation mappings) from now on.
    Returns False where the C library is not glibc (nothing changed)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the largest int: no trimming ever; 0 mappings: every block comes from the heap and goes back to it
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(_M_MMAP_MAX, 0))


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
