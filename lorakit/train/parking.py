"""Where the frozen models are while the run goes on. As in sd-scripts, they load on the CPU and each joins the
accelerator only when it is used: the VAE while latents are cached, the text encoders while their outputs are,
the rest for training (train_util.load_target_model loads on the CPU unless lowram; sdxl_train_network.py's
cache_text_encoder_outputs_if_needed keeps the U-Net and VAE off the device meanwhile). A model whose outputs are
cached stays off the device (parked), and samples borrow it back for their draw. On the CPU nothing moves."""

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

    def wait(self, *modules: torch.nn.Module) -> None:
        """``modules``, loaded on the CPU, stay there until ``borrowed`` or ``bring`` needs them on the device."""
        if self.frees_memory:
            self.parked.extend(m for m in modules if not self._is_parked(m))

    def bring(self, *modules: torch.nn.Module) -> None:
        """``modules`` on the training device for good."""
        for module in modules:
            if self._is_parked(module):
                self._move(module, onto_device=True)
                self.parked = [p for p in self.parked if p is not module]

    def park(self, *modules: torch.nn.Module) -> None:
        """Move ``modules`` to the CPU (dtype unchanged, so a borrow gives the same numbers) and free their
        accelerator memory."""
        if not self.frees_memory:
            return
        for module in modules:
            if not self._is_parked(module):
                self._move(module, onto_device=False)
                self.parked.append(module)
        self._free()

    @contextlib.contextmanager
    def borrowed(self, *modules: torch.nn.Module) -> Iterator[None]:
        """``modules`` on the training device inside the block; those that were parked go back after it."""
        back = [m for m in modules if self._is_parked(m)]
        for module in back:
            self._move(module, onto_device=True)
        try:
            yield
        finally:
            for module in back:
                self._move(module, onto_device=False)
            if back:
                self._free()

    def _is_parked(self, module: torch.nn.Module) -> bool:
        return any(module is p for p in self.parked)

    def _move(self, module: torch.nn.Module, onto_device: bool) -> None:
        module.to(self.device if onto_device else torch.device("cpu"))

    def _free(self) -> None:
        backend = getattr(torch, self.device.type, None)  # torch.cuda, torch.mps, torch.xpu
        empty_cache = getattr(backend, "empty_cache", None)
        if callable(empty_cache):
            empty_cache()
