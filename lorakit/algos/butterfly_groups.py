"""Consecutive butterfly stages composed into dense blocks, for calls with many columns.

Each stage turns blocks of b channels, so a pass over the activation costs a gather and a batched product of
b x b blocks, whose cost is the pass itself. k consecutive stages only mix channels within groups of b 2^(k-1)
(their connected components), so their product is block-diagonal too, in its own channel order: the stages can run
as fewer passes with larger blocks (Linear 1280 on 512 positions, 8 stages of 10: two passes with blocks of 80).
The composed blocks come from the stages applied to a (channels x S) matrix holding each channel's place in its
component, a pass over channels x S per stage: cheap next to the activation when it has many columns. All groups
compose in one run, side by side (one gather and one batched product per stage for all of them).
"""

from __future__ import annotations

import functools

import torch

from . import amp
from .butterfly import _Butterfly, butterfly_orders, chained_gathers, stage_order

# composing pays once the rotated tensor has this many elements (measured, stages then groups of them, forward and
# backward: 1280 channels, 8 stages as 4 + 4: 1.05x at 320 columns, 0.85x at 384, 0.41-0.48x at 1024; 640 channels,
# 7 stages as 4 + 3: 1.13x at 640 columns, 0.86x at 1024, 0.45x at 2048; 320 channels, 6 stages as 3 + 3: 1.24x at
# 512 columns, 0.64x at 2048)
_MIN_ELEMENTS = 450_000


def _components(channels: int, stages: range, block: int) -> torch.Tensor:
    """The channels grouped by the component that `stages` connect: each component's channels in ascending
    order, one component after another (ordered by their first channel)."""
    label = torch.arange(channels)
    blocks = [stage_order(channels, i, block).view(-1, block) for i in stages]
    changed = True
    while changed:  # spread each component's smallest channel over it
        changed = False
        for o in blocks:
            low = label[o].min(1, keepdim=True).values.expand_as(o)
            if not torch.equal(low, label[o]):
                label[o] = low
                changed = True
    return torch.sort(label * channels + torch.arange(channels)).indices


@functools.lru_cache(maxsize=64)
def group_plan(channels: int, block: int, sizes: tuple[int, ...], device: torch.device):
    """How composed_stages composes groups of `sizes` consecutive stages: the groups of one size as one run of
    their stages side by side (group j's channels offset by j * channels), each run with its groups, their first
    stages, its gathers, the matrix marking each channel's place in its component and the order that reads the
    components' blocks off the result; the blocks' size (a group of fewer stages has smaller components, set along
    the diagonal of blocks of that size); and the gathers between the groups."""
    firsts = [sum(sizes[:g]) for g in range(len(sizes))]
    components = [_components(channels, range(first, first + per), block) for first, per in zip(firsts, sizes)]
    runs = []
    for per in sorted(set(sizes), reverse=True):
        members = [g for g, p in enumerate(sizes) if p == per]
        size = block * 2 ** (per - 1)
        offsets = [j * channels for j in range(len(members))]
        side_by_side = [torch.cat([stage_order(channels, firsts[g] + i, block) + o for g, o in zip(members, offsets)])
                        for i in range(per)]
        order = torch.cat([components[g] + o for g, o in zip(members, offsets)])
        place = torch.zeros(len(members) * channels, size)
        place[order, torch.arange(len(members) * channels) % size] = 1
        runs.append((members, tuple(firsts[g] for g in members), per, size, place.to(device), order.to(device),
                     chained_gathers(side_by_side, device)))
    return tuple(runs), block * 2 ** (max(sizes) - 1), chained_gathers(components, device)


def group_sizes(stages: int, count: int, block: int, columns: int) -> tuple[int, ...]:
    """How many consecutive stages each group composes: the fewest groups (largest blocks) that keep blocks <= 128
    channels, as even as they split (7 stages: 4 and 3), when the rotated tensor is large enough to pay for
    composing; else every stage on its own."""
    if count * block * columns < _MIN_ELEMENTS:
        return (1,) * stages
    for groups in range(1, stages):
        per = -(-stages // groups)
        if block * 2 ** (per - 1) <= 128:
            return tuple(stages // groups + (g < stages % groups) for g in range(groups))
    return (1,) * stages


def _on_diagonal(blocks: torch.Tensor, size: int) -> torch.Tensor:
    """Blocks (n, s, s) set f = size / s at a time along the diagonal of (n / f, size, size) blocks."""
    n, s, _ = blocks.shape
    f = size // s
    if f == 1:
        return blocks
    out = blocks.new_zeros(n // f, f, s, f, s)
    for i in range(f):
        out[:, i, :, i, :] = blocks.view(n // f, f, s, s)[:, i]
    return out.view(n // f, size, size)


def composed_stages(r: torch.Tensor, columns: int):
    """(blocks, orders, inverses) for stages_forward: the stages r (stages, count, b, b) themselves, or composed
    into groups of consecutive stages where the rotated tensor (`columns` columns) is large enough to pay for it."""
    stages, count, b, _ = r.shape
    sizes = group_sizes(stages, count, b, columns)
    if len(sizes) == stages:
        return (r, *butterfly_orders(count * b, stages, b, r.device))
    runs, size, (orders, inverses) = group_plan(count * b, b, sizes, r.device)
    blocks = [None] * len(sizes)
    for members, firsts, per, run_size, place, order, (inner, inner_inv) in runs:
        side_by_side = torch.stack([r[first:first + per] for first in firsts], 1).flatten(1, 2)
        t = amp.apply(_Butterfly, place.to(r.dtype), side_by_side, inner, inner_inv, cast=False)
        t = t.index_select(0, order).view(len(members), -1, run_size, run_size)
        for j, g in enumerate(members):
            blocks[g] = _on_diagonal(t[j], size)
    return torch.stack(blocks), orders, inverses
