"""Under pytest-xdist (pyproject's addopts run one worker per core) each worker computes on one thread.

The tests' models are tiny: a step is hundreds of small ops, bound by Python and dispatch rather than by torch's
threads (120 steps of the quickstart's training: 32 s on one thread, 31 s on two). Two workers with two threads
each would oversubscribe the cores; two with one thread each keep both cores busy."""

from __future__ import annotations

import gc
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

gc.set_threshold(50_000, 20, 100)  # from collection on: see pytest_collection_finish


def pytest_collection_finish(session):
    """The collected tests and the modules imported for them (~600k objects) live as long as the session: moved
    out of the collector's sight, each full collection skips them (0.4 s each, ~40 a worker in tests/train).

    The tests then build and drop hundreds of models, each of thousands of objects that outlive the youngest
    generation: at Python's thresholds (700, 10, 10) the collector ran 8060 times in tests/train/test_run.py
    (16 s of its 153 s). Collected far less often (50000, 20, 100) it ran 49 times there (4 s), and the whole
    suite took 11:35 instead of 12:46, each worker peaking at ~1.4 GB."""
    gc.collect()
    gc.freeze()
