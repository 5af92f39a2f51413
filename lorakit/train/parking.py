"""Models the training steps no longer run, moved off the accelerator: the VAE once every latent is cached, the text
encoders once every caption's outputs are (sd-scripts moves them to the CPU then: train_network.py after caching
latents, sdxl_train_network.py's cache_text_encoder_outputs_if_needed). Samples borrow them back for their draw.
On the CPU there is nothing to free, and nothing moves."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["Parking"]


class Parking:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.parked: list[torch.nn.Module] = []

    @property
    def frees_memory(self) -> bool:
        return self.device.type != "cpu"

    def park(self, *modules: torch.nn.Module) -> None:
        """Move ``modules`` to the CPU (dtype unchanged, so a borrow gives the same numbers) and free their
        accelerator memory."""
        if not self.frees_memory:
            return
        for module in modules:
            if not any(module is p for p in self.parked):
                self._move(module, torch.device("cpu"))
                self.parked.append(module)
        self._free()

    @contextlib.contextmanager
    def borrowed(self, *modules: torch.nn.Module) -> Iterator[None]:
        """``modules`` on the training device inside the block; those that were parked go back after it."""
        back = [m for m in modules if any(m is p for p in self.parked)]
        for module in back:
            self._move(module, self.device)
        try:
            yield
        finally:
            for module in back:
                self._move(module, torch.device("cpu"))
            if back:
                self._free()

    def _move(self, module: torch.nn.Module, device: torch.device) -> None:
        module.to(device)

    def _free(self) -> None:
        backend = getattr(torch, self.device.type, None)  # torch.cuda, torch.mps, torch.xpu
        empty_cache = getattr(backend, "empty_cache", None)
        if callable(empty_cache):
            empty_cache()
