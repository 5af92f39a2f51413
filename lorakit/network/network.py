"""A network: the adapters on a whole model (a Stable Diffusion U-Net and text encoders, or any nn.Module).

The network is an nn.Module whose parameters are exactly the adapters' trainable parameters and whose
state_dict keys are the file's keys (`lora_unet_..._to_q.lora_down.weight`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..algos import Adapter, algorithm
from .blocks import KOHYA_SD25, KOHYA_SDXL23, BlockLayout, pick_layout
from .targets import fast_path_owners, tied_parameters

log = logging.getLogger(__name__)


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Entry:
    """Where an adapter sits: its component ("unet", "text_encoder", "text_encoder_2", "model") and path."""

    component: str
    path: str

    @property
    def is_text_encoder(self) -> bool:
        return self.component in TEXT_ENCODERS


def _regular_path(module, args):
    """A forward pre-hook that changes nothing: its presence keeps torch's TransformerEncoderLayer off its inference
    fast path, which would compute the block without calling the adapted layers."""
    return None


class Network(nn.Module):
    def __init__(self, adapters: Mapping[str, Adapter], entries: Mapping[str, Entry], arch: str | None,
                 multiplier: float = 1.0, lr_weights: Mapping[str, float] | None = None,
                 loraplus: Mapping[str, float | None] | None = None, models: Sequence[nn.Module] = ()):
        """`models`: the U-Net (or model) and text encoders the adapters sit in, searched for layers whose
        inference fast path would skip an adapter (targets.fast_path_owners)."""
        super().__init__()
        for name, adapter in adapters.items():
            self.add_module(name, adapter)
        self.entries = dict(entries)
        self.arch = arch  # "sd1", "sd2", "sdxl" or None for any other model
        self.lr_weights = dict(lr_weights or {})  # adapter name -> kohya block lr weight
        self.loraplus = dict(loraplus or {})
        self._block_multipliers: dict[str, float] = {}
        self._multiplier = float(multiplier)
        self.applied = False
        # a plain list: not submodules
        self.fast_path_owners: list[nn.Module] = fast_path_owners(models, [a.host for a in adapters.values()])
        self.tied = tied_parameters(models, {n: a.host for n, a in adapters.items()})
        if self.tied:
            log.warning("lorakit: %s; the adapted model is right, but merge() would change every sharer, so it is "
                        "refused", self._tied_example(" (tied)"))
        self._fast_path_hooks: list = []
        self._nesting: list = []  # (TransformerEncoder, its use_nested_tensor) while applied
        self._sync_multipliers()

    # ----- the adapters -----
    def adapters(self) -> Iterable[tuple[str, Adapter]]:
        return ((n, m) for n, m in self.named_children() if isinstance(m, Adapter))

    def __len__(self) -> int:
        return len(self.entries)

    def names(self, component: str | None = None) -> list[str]:
        return [n for n, e in self.entries.items() if component is None or e.component == component]

    # ----- multipliers -----
    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self._multiplier = float(value)
        self._sync_multipliers()

    def set_block_multipliers(self, values: Sequence[float] | Mapping[str, float] | None,
                              layout: BlockLayout | str | None = None) -> None:
        """Per-block multipliers on top of the global one: a vector in a block layout (by length for SD models:
        SD 25/26/17, SDXL 23/20/12 values; seed 003's 20-value SDXL layout is BASE, IN00-08, MID, OUT00-08),
        or {block name: value}. Blocks a mapping leaves out keep 1; modules outside the layout's blocks get its
        `unlisted` weight (0 in the 17- and 12-value layouts, as LoRA Block Weight sets them) or 1 (EMB, FINAL,
        the other layouts). None clears them."""
        if values is None:
            self._block_multipliers = {}
            self._sync_multipliers()
            return
        if self.arch is None:
            raise ValueError("block multipliers need a Stable Diffusion network (this one adapts a generic model)")
        layout = pick_layout(self.arch, values, layout)
        per_block = layout.block_values(values)
        self._block_multipliers = {name: layout.module_weight(per_block, entry.path, entry.component)
                                   for name, entry in self.entries.items()}
        self._sync_multipliers()

    def _sync_multipliers(self) -> None:
        for name, adapter in self.adapters():
            adapter.multiplier = self._multiplier * self._block_multipliers.get(name, 1.0)

    # ----- applying -----
    def apply(self, fn=None, *, hooks: bool = False) -> "Network":
        """Route every adapted layer through its adapter; a second network applied later stacks on this one.
        ``hooks``: through each adapter's module call, so its forward hooks run (see Adapter.apply).
        ``fn``: torch's Module.apply (fn on every submodule), which this name shadows; libraries call it."""
        if fn is not None:
            return super().apply(fn)
        if self.applied:
            raise RuntimeError("this network is already applied")
        for _, adapter in self.adapters():
            adapter.apply(hooks=hooks)
        self._fast_path_hooks = [m.register_forward_pre_hook(_regular_path) for m in self.fast_path_owners
                                 if isinstance(m, nn.TransformerEncoderLayer)]
        self._nesting = [(m, m.use_nested_tensor) for m in self.fast_path_owners
                         if isinstance(m, nn.TransformerEncoder) and hasattr(m, "use_nested_tensor")]
        for encoder, _ in self._nesting:
            encoder.use_nested_tensor = False
        self.applied = True
        return self

    def restore(self) -> None:
        """Give the layers back their original forward (networks applied after this one must be restored first)."""
        if not self.applied:
            return
        for _, adapter in reversed(list(self.adapters())):
            adapter.restore()
        for handle in self._fast_path_hooks:
            handle.remove()
        for encoder, nesting in self._nesting:
            encoder.use_nested_tensor = nesting
        self._fast_path_hooks, self._nesting = [], []
        self.applied = False

    def _tied_example(self, note: str = "") -> str:
        """How many adapted layers share their weights, and the first one with its sharers."""
        name, shared = next(iter(self.tied.items()))
        return (f"{len(self.tied)} adapted layer(s) share their weights with another module{note}, e.g. {name}: "
                f"{', '.join(shared)}")

    @torch.no_grad()
    def merge(self, multiplier: float | None = None, keep_backup: bool = False) -> None:
        """Add every adapter's change into the model weights (at `multiplier` times its block multiplier)."""
        if self.tied:
            raise ValueError(f"merge: {self._tied_example()}; merging would change them all (the applied network "
                             "changes the adapted layer alone). Untie the weights first, or keep it applied")
        refused = [(name, why) for name, adapter in self.adapters() if (why := adapter.merge_refusal()) is not None]
        if refused:  # before any layer is merged: a half-merged model is neither the applied nor the base one
            raise ValueError(f"merge: {len(refused)} adapted layer(s) cannot be merged; {refused[0][0]}: "
                             f"{refused[0][1]}")
        for name, adapter in self.adapters():
            m = adapter.multiplier if multiplier is None else multiplier * self._block_multipliers.get(name, 1.0)
            adapter.merge(m, keep_backup=keep_backup)

    @torch.no_grad()
    def unmerge(self) -> None:
        for _, adapter in self.adapters():
            adapter.unmerge()

    # ----- training -----
    def optimizer_param_groups(self, unet_lr: float | None = None, text_encoder_lr: float | Sequence[float] | None = None,
                               default_lr: float | None = None, loraplus_lr_ratio: float | None = None,
                               loraplus_unet_lr_ratio: float | None = None,
                               loraplus_text_encoder_lr_ratio: float | None = None) -> list[dict]:
        """Parameter groups in kohya's manner, the text encoders' first: U-Net and text-encoder learning rates (a
        list gives SDXL's two text encoders their own), block lr weights from down/mid/up_lr_weight, and LoRA+ (the
        output-side factors of every algorithm that has them train at ratio x lr). A learning rate of 0 leaves those
        adapters out (frozen)."""
        plus = {"unet": _first_ratio(loraplus_unet_lr_ratio, loraplus_lr_ratio, self.loraplus.get("unet"),
                                     self.loraplus.get("all")),
                "te": _first_ratio(loraplus_text_encoder_lr_ratio, loraplus_lr_ratio, self.loraplus.get("te"),
                                   self.loraplus.get("all"))}
        te_lrs = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
        te_lrs = (te_lrs or [None]) * 2 if len(te_lrs) < 2 else te_lrs  # one value serves both text encoders
        groups: dict[tuple, dict] = {}
        blocks = self._lr_blocks()
        unboosted: set[str] = set()  # algorithms with a LoRA+ ratio and no output-side factor
        for name, adapter in self.adapters():
            entry = self.entries[name]
            if entry.is_text_encoder:
                lr = _first(te_lrs[TEXT_ENCODERS.index(entry.component)], default_lr)
                kind = "te"
            else:
                lr = _first(unet_lr, default_lr)
                kind = "unet"
            weight = self.lr_weights.get(name, 1.0)
            if lr is None and (weight != 1.0 or plus[kind]):
                # a group without "lr" takes the optimizer's own: the weight or ratio would silently not apply
                what = f"block lr weight {weight:g}" if weight != 1.0 else f"LoRA+ ratio {plus[kind]:g}"
                side = "text_encoder_lr" if kind == "te" else "unet_lr"
                raise ValueError(f"optimizer_param_groups: adapter '{name}' has a {what}, which multiplies a "
                                 f"learning rate: pass {side} or default_lr")
            if lr is not None:
                lr = lr * weight
            if lr == 0 or weight == 0:
                adapter.requires_grad_(False)
                continue
            plus_ids = {id(p) for p in adapter.plus_parameters()} if plus[kind] else set()
            if plus[kind] and not plus_ids:
                unboosted.add(adapter.name)
            block = blocks.get(name)
            for p in adapter.parameters():
                if not p.requires_grad:
                    continue
                boosted = id(p) in plus_ids
                key = (_component_rank(entry.component), entry.component, -1 if block is None else block, boosted)
                group = groups.get(key)
                if group is None:
                    group = groups[key] = {"params": [], "name": _group_name(entry.component, block, boosted)}
                    if lr is not None:
                        group["lr"] = lr * (plus[kind] if boosted else 1.0)
                group["params"].append(p)
        if unboosted:
            log.warning("LoRA+ has no effect on %s adapters: they have no output-side (B) factor to train at the "
                        "ratio, so they train at the plain learning rate", ", ".join(sorted(unboosted)))
        # sd-scripts' prepare_optimizer_params order: the text encoders first (DAdaptAdan & co. step every group with
        # the first group's lr, and the progress bar shows it), then the U-Net by block, each plain then LoRA+
        return [groups[key] for key in sorted(groups)]

    def _lr_blocks(self) -> dict[str, int]:
        """With block lr weights, each weighted adapter's kohya block index (sd-scripts' get_block_index: 0-24 SD,
        0-22 SDXL), which gives it a parameter group of its own block, as sd-scripts makes them."""
        if not self.lr_weights:
            return {}
        layout = KOHYA_SDXL23 if self.arch == "sdxl" else KOHYA_SD25
        indices = {name: layout.index(self.entries[name].path, self.entries[name].component)
                   for name in self.lr_weights if name in self.entries}
        return {name: i for name, i in indices.items() if i is not None}

    # ----- files -----
    def apply_max_norm_regularization(self, max_norm_value: float, device=None) -> tuple[int, float, float]:
        """kohya's --scale_weight_norms for every algorithm: each adapter whose change |dW| exceeds
        max_norm_value is scaled down to it (see max_norm.py). Returns (adapters scaled, mean and maximum |dW|
        after scaling). The adapters compute where they live; `device` is unused."""
        from .max_norm import limit_change_norms

        return limit_change_norms(self.adapters(), max_norm_value)

    def save(self, path, dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> None:
        """Write the adapters as safetensors (LyCORIS/kohya layout) atomically, with metadata, kohya's hashes, the
        network's algorithm and, for a Stable Diffusion network, the base model keys UIs sort LoRAs by (unless
        ``metadata`` has them)."""
        from ..formats import add_hashes, prepare_tensors, save_file
        from ..formats.modelspec import with_base_model_keys

        tensors = prepare_tensors(self.state_dict(), dtype)
        meta = with_base_model_keys(self._with_algorithm(dict(metadata or {})), self.arch)
        meta = add_hashes(tensors, meta)
        save_file(tensors, path, metadata=meta)

    def _with_algorithm(self, meta: dict[str, str]) -> dict[str, str]:
        """The algorithm as sd-scripts records a network: ss_network_module ("lorakit") and ss_network_args
        ({"algo": ...}), unless the caller gives either. DyLoRA files are LoRA files: only this tells `lorakit
        resize` to cut one rather than re-factorise it."""
        algo = self._algorithm()
        if algo is None or "ss_network_module" in meta or "ss_network_args" in meta:
            return meta
        return {**meta, "ss_network_module": "lorakit", "ss_network_args": json.dumps({"algo": algo})}

    def _algorithm(self) -> str | None:
        """The algorithm the network was created with; for a loaded one, its adapters' if they share one."""
        config = getattr(self, "config", None)
        if config is not None:
            return algorithm(config.algo).name
        names = {adapter.name for _, adapter in self.adapters() if adapter.name != "norm"}
        return names.pop() if len(names) == 1 else None

    def extra_repr(self) -> str:
        counts: dict[str, int] = {}
        for _, adapter in self.adapters():
            counts[adapter.name] = counts.get(adapter.name, 0) + 1
        return f"arch={self.arch}, adapters={counts}"


def _first(*values):
    return next((v for v in values if v is not None), None)


def _first_ratio(*ratios):
    """The first LoRA+ ratio set and not 0: sd-scripts' `loraplus_unet_lr_ratio or loraplus_lr_ratio` (a side's 0
    falls back to the common ratio; all 0 or unset: no LoRA+)."""
    return next((r for r in ratios if r), None)


def _component_rank(component: str) -> int:
    return TEXT_ENCODERS.index(component) if component in TEXT_ENCODERS else len(TEXT_ENCODERS)


def _group_name(component: str, block: int | None, boosted: bool) -> str:
    """unet, text_encoder_2_plus, unet_block5: the lr logs (train/logger.py lr_description) turn them into sd-scripts'
    lr descriptions (unet, textencoder_2 plus, unet_block5)."""
    return component + ("" if block is None else f"_block{block}") + ("_plus" if boosted else "")
