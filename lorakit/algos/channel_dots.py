"""Per-channel dot products of two activation-sized tensors, sum(a * b) over every axis but the channel's: the
gradient of a per-channel scale (IA3, DoRA) from the output or the input and its gradient. And the input
gradient's GEMM taken block by block with such reductions of the output gradient, so that each block of it is
read from memory once for both (on CPUs where that pays: _gemm_block).

On a CPU, torch.linalg.vecdot writes the whole product a * b before reducing it: one more activation-sized tensor
written and read, freshly allocated each call. Here the product is taken in blocks that stay in cache. Linear 320
on (8192, 320), 2 threads: 0.66-0.87 ms against 1.1-1.5 ms for one vecdot over the whole tensors.
"""

from __future__ import annotations

import torch

from . import cpu_kind

_BLOCK = 1 << 19  # elements of a (and of b) per block: the two blocks fit a core's L2 cache with the product


def _gemm_block() -> int | None:
    """Elements of the output gradient per block of input_grad_and_reductions (1 MB, a core's L2: 819 rows of
    Linear 320), or None: one GEMM, then the reductions. Blocks paid on an AVX2 CPU (AMD EPYC, 2 threads: IA3's fold
    alone on Linear 320, in-process A/B, min of 40 rounds: blocks of 512 rows 1.03x, 1024 rows 1.00x, 2048 rows
    1.04x the frozen layer, against 1.09x for no blocks). On an AVX-512 Xeon the layer's GEMM runs near the cores'
    peak and loses 6% in blocks of 819 rows (4.96 against 4.66 ms), more than the reductions gain from the cache
    (paired in-process A/B, 30 rounds, no blocks against blocks: IA3 0.92, Diag-OFT 0.80, DoRA 0.82 and 0.81)."""
    return None if cpu_kind.AVX512 else 1 << 18


_GEMM_BLOCK = _gemm_block()


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


def input_grad_and_reductions(g: torch.Tensor, weight: torch.Tensor | None, reduce) -> tuple:
    """(g @ weight, the sum over blocks of rows of reduce(rows, g[rows], (g @ weight)[rows])) for an (N, out) g and
    an (out, in) weight (None: no GEMM, the reductions alone, given None for its block, and None for its product);
    reduce returns a tuple of tensors that do not grow with N, and reads any other (N, ...) tensor at `rows`. On a
    CPU where blocks pay (_gemm_block) the GEMM runs block by block, and each block of g and of its product is
    reduced while it is still in cache: one read of each from memory where the GEMM and the reductions apart take
    two. AMD EPYC, Linear 320 on (2, 4096, 320), in-process A/B, min and median of 40 rounds over the frozen layer:
    IA3 folded 1.09/1.10 -> 1.06/1.05, Diag-OFT folded 1.15/1.14 -> 1.11/1.13; DoRA along rows (1.27) and along
    columns (1.31/1.25 -> 1.29/1.24, 60 rounds) about even: their thin products dominate."""
    n = g.shape[0]
    width = max(g.shape[1], weight.shape[1] if weight is not None else 1)
    rows = n if _GEMM_BLOCK is None else max(1, _GEMM_BLOCK // width)
    if g.device.type != "cpu" or n <= rows:
        grad = g @ weight if weight is not None else None
        return grad, reduce(slice(None), g, grad)
    grad = g.new_empty(n, weight.shape[1], dtype=torch.result_type(g, weight)) if weight is not None else None
    sums = None
    for i in range(0, n, rows):
        block = slice(i, i + rows)
        gb = g[block]
        if weight is not None:
            torch.mm(gb, weight, out=grad[block])
        part = reduce(block, gb, grad[block] if grad is not None else None)
        sums = part if sums is None else tuple(s.add_(p) for s, p in zip(sums, part))
    return grad, sums
