"""kohya's ``scale_weight_norms``: scale each adapter down so that its change |dW| stays within a bound, for
every algorithm (the factors that scale dW where the algorithm has them; a bisection on OFT/BOFT's rotation)."""

from __future__ import annotations

import logging

import torch

from ..algos.options import to_float

__all__ = ["limit_change_norms"]

log = logging.getLogger(__name__)

# Parameters that scale an algorithm's change: multiplying each of them by c multiplies dW by c ** power.
# (LoRA as kohya does it: up and down by sqrt(ratio).)
_SCALES_DW = {
    "lora": (("lora_up", "lora_down"), 2), "dylora": (("lora_up", "lora_down"), 2),
    "loha": (("hada_w1_a", "hada_w2_a"), 2), "lokr": (("lokr_w2", "lokr_w2_a"), 1),  # whichever w2 form exists
    "glora": (("a1", "b1"), 1),  # dW = W a1 a2 + b1 b2
    "ia3": (("weight",), 1), "full": (("diff", "diff_b"), 1), "norm": (("w_norm", "b_norm"), 1),
}


def _change_norm(adapter) -> float:
    return float(torch.linalg.vector_norm((adapter._delta_weight() * adapter._scalar()).float()))


def _limit_norm(adapter, max_norm: float) -> tuple[int, float]:
    """(1 if scaled else 0, |dW| after)."""
    norm = _change_norm(adapter)
    if norm <= max_norm:
        return 0, norm
    if adapter.name in _SCALES_DW:
        names, power = _SCALES_DW[adapter.name]
        for name in names:
            p = getattr(adapter, name, None)
            if p is not None:
                p.mul_((max_norm / norm) ** (1 / power))
    elif hasattr(adapter, "oft_blocks"):
        # A rotation's change grows monotonically with the size of Q: bisect on a scale of the blocks.
        blocks = adapter.oft_blocks
        start, lo, hi = blocks.detach().clone(), 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            blocks.copy_(start * mid)
            lo, hi = (mid, hi) if _change_norm(adapter) <= max_norm else (lo, mid)
        blocks.copy_(start * lo)
    else:
        log.warning("lorakit: scale_weight_norms cannot scale a '%s' adapter; left as it is", adapter.name)
        return 0, norm
    return 1, _change_norm(adapter)


@torch.no_grad()
def limit_change_norms(adapters, max_norm_value: float) -> tuple[int, float, float]:
    """Each adapter of ``adapters`` (``(name, adapter)`` pairs) whose |dW| (Frobenius, at multiplier 1, before
    DoRA's rescaling) exceeds ``max_norm_value`` is scaled down to it. Returns (adapters scaled, mean and maximum
    |dW| after scaling)."""
    max_norm = to_float("scale_weight_norms", max_norm_value)
    scaled, norms = 0, []
    for _, adapter in adapters:
        was_training = adapter.training
        adapter.train(False)  # DyLoRA: the full rank, not this step's random one
        try:
            hit, norm = _limit_norm(adapter, max_norm)
        finally:
            adapter.train(was_training)
        scaled += hit
        norms.append(norm)
    if not norms:
        return 0, 0.0, 0.0
    return scaled, sum(norms) / len(norms), max(norms)
