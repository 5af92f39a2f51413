"""Shared fixtures of the tool tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: LAPACK's SVD with 2 OpenMP threads on a busy 2-core machine can take 100x
    longer, and on tiny tensors one thread is faster anyway (no threads waiting on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
