"""Matrix-product FLOPs of one forward+backward, as torch's FlopCounterMode counts them (matmuls, convolutions,
attention; not elementwise passes or reductions). Over the frozen step's count this is the ratio a method would
reach if its products ran at the speed of the frozen layer's own: a floor for its time ratio wherever passes over
memory and per-call costs are small."""

from __future__ import annotations

from typing import Callable

from torch.utils.flop_counter import FlopCounterMode


def product_flops(run: Callable[[], object]) -> int:
    """FLOPs of the products `run()` dispatches, the custom autograd functions' forward and backward included."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()
