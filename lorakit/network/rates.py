"""Layer-wise application rates of trained networks, learnt by gradient descent (sd-scripts'
train_network_appl_weights.py, seed 003): one rate per block of a layout for each network, which multiplies every
adapter of that block as a block multiplier would, with a gradient. The networks stay frozen; only the rates train.

The rates start at 0.5, as in sd-scripts. The penalty on their total is sum(|r|) + 10 sum(|r| for r < 0): negative
rates count ten times, which keeps the search from cancelling layers against each other.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .blocks import LBW26, SDXL20, LAYOUTS, BlockLayout
from .network import Network

__all__ = ["ApplicationRates", "default_rate_layout", "rate_layout"]

NEGATIVE_WEIGHT = 10.0  # sd-scripts: "we add more weight for negative values"
START = 0.5  # sd-scripts' initial rate


def default_rate_layout(arch: str) -> BlockLayout:
    """SDXL: seed 003's 20 values (BASE = the text encoders, IN00-08, MID, OUT00-08); SD1/SD2: the same idea over
    their 25 blocks, LoRA Block Weight's 26 values (BASE, IN00-11, MID, OUT00-11)."""
    return SDXL20 if arch == "sdxl" else LBW26


def rate_layout(arch: str, key: str | None) -> BlockLayout:
    """The layout named ``key`` (a key of blocks.LAYOUTS, or its number of values), checked against ``arch``."""
    if not key:
        return default_rate_layout(arch)
    want = "sdxl" if arch == "sdxl" else "sd"
    text = str(key).strip().lower()
    found = [l for l in LAYOUTS.values() if l.arch == want and (l.key == text or str(len(l)) == text)]
    if not found:
        known = ", ".join(f"{l.key} ({len(l)})" for l in LAYOUTS.values() if l.arch == want)
        raise ValueError(f"application_layout={key!r}: not a {want} block layout (known: {known})")
    return found[0]


class ApplicationRates(nn.Module):
    """The trainable rates of ``networks`` (applied, frozen), one vector of ``len(layout)`` values per network,
    concatenated in network order as sd-scripts saves them (state dict key ``weights``). An adapter the layout
    has no value for runs at the fixed weight a block-weight vector of that layout gives it (``outside_weight``:
    0 in a block that LoRA Block Weight's 17/12 values leave out, else 1), without a gradient."""

    def __init__(self, networks: Sequence[Network], layout: BlockLayout):
        super().__init__()
        if not networks:
            raise ValueError("application rates need at least one network")
        self.networks = list(networks)  # a plain list: the networks are not trained, their tensors are not ours
        self.layout = layout
        self.weights = nn.Parameter(torch.full((len(layout) * len(networks),), START))
        self.text_encoder_rates = False  # whether a rate reaches a text-encoder adapter (BASE)
        self.outside: dict[str, float] = {}  # adapters the layout has no value for -> their fixed weight
        for n, net in enumerate(self.networks):
            for name, adapter in net.adapters():
                entry = net.entries[name]
                block = layout.name(entry.path, entry.component)
                if block is None:
                    weight = layout.outside_weight(entry.path, entry.component)
                    self.outside[name] = weight
                    if weight != 1.0:
                        adapter.rate = self._fixed_rate(weight)
                    continue
                adapter.rate = self._rate_reader(n * len(layout) + layout.position(block))
                self.text_encoder_rates |= entry.is_text_encoder

    def _rate_reader(self, index: int):
        # read at every call: each forward builds its own graph from the parameter
        return lambda: self.weights[index]

    @staticmethod
    def _fixed_rate(weight: float):
        value = torch.tensor(weight)
        return lambda: value

    def release(self) -> None:
        """The adapters back to their plain multipliers."""
        for net in self.networks:
            for _, adapter in net.adapters():
                adapter.rate = None

    def penalty(self) -> torch.Tensor:
        w = self.weights
        return w.abs().sum() + NEGATIVE_WEIGHT * w.clamp(max=0).abs().sum()

    def optimizer_param_groups(self, unet_lr=None, text_encoder_lr=None, default_lr: float = 1e-4, **_) -> list:
        """One group with every rate at the run's learning rate (as sd-scripts' get_optimizer(args, params))."""
        return [{"params": [self.weights], "lr": default_lr, "name": "application_rates"}]

    def values(self) -> list[dict[str, float]]:
        """Each network's rates by block name."""
        w = self.weights.detach().float().cpu().tolist()
        size = len(self.layout)
        return [dict(zip(self.layout.names, w[n * size:(n + 1) * size])) for n in range(len(self.networks))]

    def describe(self, sources: Sequence[str] = ()) -> str:
        """One line per network as sd-scripts prints them (comma-separated, 3 decimals), after its file."""
        lines = []
        for n, rates in enumerate(self.values()):
            where = f" ({sources[n]})" if n < len(sources) else ""
            lines.append(f"Network {n}{where} weights: " + ",".join(f"{v:.3f}" for v in rates.values()))
        return "\n".join(lines)
