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
# backward: 1280 channels, 8 stages as 2 groups: 1.14x at 256 columns, 0.85x at 384, 0.41x at 1024; 320 channels,
# 6 stages as 2 groups: 1.24x at 512 columns, 0.90x at 1024, 0.64x at 2048)
_MIN_ELEMENTS = 400_000


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
def group_plan(channels: int, stages: int, block: int, groups: int, device: torch.device):
    """The groups' compositions as one run of `stages // groups` stages over the groups side by side (group g's
    channels offset by g * channels): its gathers, the matrix marking each channel's place in its component, the
    order that reads the components' blocks off the result; and the gathers between the groups."""
    per = stages // groups
    size = block * 2 ** (per - 1)
    components = [_components(channels, range(first, first + per), block) for first in range(0, stages, per)]
    offsets = [g * channels for g in range(groups)]
    side_by_side = [torch.cat([stage_order(channels, first + i, block) + o for first, o in zip(range(0, stages, per),
                                                                                           offsets)])
                    for i in range(per)]
    order = torch.cat([c + o for c, o in zip(components, offsets)])
    place = torch.zeros(groups * channels, size)
    place[order, torch.arange(groups * channels) % size] = 1
    return (per, size, place.to(device), order.to(device), chained_gathers(side_by_side, device),
            chained_gathers(components, device))


def group_count(stages: int, count: int, block: int, columns: int) -> int:
    """How many groups the stages run as: the fewest (largest blocks) that keep blocks <= 128 channels, when the
    rotated tensor is large enough to pay for composing; else every stage on its own."""
    if count * block * columns < _MIN_ELEMENTS:
        return stages
    for groups in range(1, stages + 1):
        if stages % groups == 0 and block * 2 ** (stages // groups - 1) <= 128 and groups < stages:
            return groups
    return stages


def composed_stages(r: torch.Tensor, columns: int):
    """(blocks, orders, inverses) for stages_forward: the stages r (stages, count, b, b) themselves, or composed
    into groups of consecutive stages where the rotated tensor has `columns` columns enough to pay for it."""
    stages, count, b, _ = r.shape
    groups = group_count(stages, count, b, columns)
    if groups == stages:
        return (r, *butterfly_orders(count * b, stages, b, r.device))
    per, size, place, order, (inner, inner_inv), (orders, inverses) = group_plan(count * b, stages, b, groups,
                                                                                   r.device)
    side_by_side = r.unflatten(0, (groups, per)).transpose(0, 1).reshape(per, groups * count, b, b)
    t = amp.apply(_Butterfly, place.to(r.dtype), side_by_side, inner, inner_inv, cast=False)
    return t.index_select(0, order).view(groups, -1, size, size), orders, inverses
