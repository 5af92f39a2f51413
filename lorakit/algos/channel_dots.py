"""Per-channel dot products of two activation-sized tensors, sum(a * b) over every axis but the channel's: the
gradient of a per-channel scale (IA3, DoRA) from the output or the input and its gradient.

On a CPU, torch.linalg.vecdot writes the whole product a * b before reducing it: one more activation-sized tensor
written and read, freshly allocated each call. Here the product is taken in blocks that stay in cache. Linear 320
on (8192, 320), 2 threads: 0.66-0.87 ms against 1.1-1.5 ms for one vecdot over the whole tensors.
"""

from __future__ import annotations

import torch

_BLOCK = 1 << 19  # elements of a (and of b) per block: the two blocks fit a core's L2 cache with the product


def column_dots(a: torch.Tensor, b: torch.Tensor, sum_a: bool = False):
    """sum_n a[n, c] b[n, c] for (N, C) tensors; with sum_a, also sum_n a[n, c] (one read of a for both)."""
    rows = max(1, _BLOCK // max(a.shape[1], 1))
    if a.device.type != "cpu" or a.shape[0] <= rows:
        dots = torch.linalg.vecdot(a, b, dim=0)
        return (dots, a.sum(0)) if sum_a else dots
    dots = torch.zeros(a.shape[1], dtype=torch.result_type(a, b), device=a.device)
    sums = torch.zeros(a.shape[1], dtype=a.dtype, device=a.device) if sum_a else None
    for i in range(0, a.shape[0], rows):
        ab, bb = a[i:i + rows], b[i:i + rows]
        dots += torch.linalg.vecdot(ab, bb, dim=0)
        if sum_a:
            sums += ab.sum(0)
    return (dots, sums) if sum_a else dots


def row_dots(a: torch.Tensor, b: torch.Tensor, sum_a: bool = False):
    """sum_l a[r, l] b[r, l] for (R, L) tensors; with sum_a, also sum_l a[r, l]."""
    rows = max(1, _BLOCK // max(a.shape[1], 1))
    if a.device.type != "cpu" or a.shape[0] <= rows:
        dots = torch.linalg.vecdot(a, b, dim=1)
        return (dots, a.sum(1)) if sum_a else dots
    parts = [(torch.linalg.vecdot(a[i:i + rows], b[i:i + rows], dim=1), a[i:i + rows].sum(1) if sum_a else None)
             for i in range(0, a.shape[0], rows)]
    dots = torch.cat([p[0] for p in parts])
    return (dots, torch.cat([p[1] for p in parts])) if sum_a else dots
