"""DyLoRA: a LoRA trained so that every leading block of its rank works on its own (seed 002).

Each training step draws a block b and uses the first (b+1)*block_size rank components: the block b learns,
the ones before it are held fixed for that step, and the scale is alpha / ((b+1)*block_size), the scale a file
cut to that rank has. Outside training the full rank is used, so the saved LoRA file (plain LoRA keys) behaves
exactly like the trained adapter, and `resize` can cut it to any multiple of block_size.

``dylora_all_ranks`` (what sd-scripts' networks/dylora.py trains; ``networks.dylora`` sets it): each step uses
every rank component, only the drawn block learning, at scale alpha/dim x sqrt(dim / ((b+1)*block_size)).
"""

from __future__ import annotations

import math

import torch

from .lora import LoRA
from .options import OptionError


class DyLoRA(LoRA):
    name = "dylora"
    aliases = ()
    detect_keys = ()  # its files are LoRA files
    accepts = frozenset({"dim", "alpha", "dropout", "rank_dropout", "rank_dropout_scale", "block_size", "bypass_mode",
                         "dylora_all_ranks"})

    def build(self, options):
        if options.dim % options.block_size:
            raise OptionError(f"option 'block_size': {options.block_size} does not divide dim {options.dim}")
        super().build(options)
        self.block_size = options.block_size
        self.all_ranks = options.dylora_all_ranks

    def factors(self):
        """A random leading rank while training, the full rank otherwise."""
        if not self.training:
            return super().factors()
        bs = self.block_size
        b = int(torch.randint(self.rank // bs, ()).item())
        lo, hi = b * bs, (b + 1) * bs
        if self.all_ranks:  # sd-scripts' DyLoRAModule.forward: the other blocks held fixed, not left out
            down = torch.cat([self.lora_down[:lo].detach(), self.lora_down[lo:hi], self.lora_down[hi:].detach()])
            up = torch.cat([self.lora_up[:, :lo].detach(), self.lora_up[:, lo:hi], self.lora_up[:, hi:].detach()],
                           dim=1)
            return down, up, self.alpha / self.rank * math.sqrt(self.rank / hi)
        down = torch.cat([self.lora_down[:lo].detach(), self.lora_down[lo:hi]])
        up = torch.cat([self.lora_up[:, :lo].detach(), self.lora_up[:, lo:hi]], dim=1)
        return down, up, self.alpha / hi

    def _use_factor_path(self, x):
        return True if self.training else super()._use_factor_path(x)
