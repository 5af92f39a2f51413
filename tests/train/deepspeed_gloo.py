"""Imported by the tests that start DeepSpeed: their collectives run through gloo, torch's own.

On CPU, DeepSpeed compiles a C++ op of shared-memory collectives the first time a process group starts (~30 s on
two cores, in every fresh environment) and falls back to gloo where the op cannot build. What the tests check,
lorakit's engine and its results, is the same either way, so they take the fallback."""

from __future__ import annotations

import importlib

try:  # by its module path: the name "torch" inside deepspeed.comm is torch itself
    _backend = importlib.import_module("deepspeed.comm.torch")
except ImportError:  # the tests that need DeepSpeed skip themselves
    _backend = None
else:
    _backend.build_shm_op = lambda: None
