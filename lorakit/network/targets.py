"""Which layers of a model a preset selects, and with which algorithm override."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .presets import Preset

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Selected:
    component: str  # "unet", "text_encoder", "text_encoder_2" or "model"
    path: str
    module: nn.Module
    override: dict | None  # from module_algo_map / name_algo_map


def _leaf(module: nn.Module) -> bool:
    return isinstance(module, ADAPTABLE + NORMS)


def select(component: str, root: nn.Module, preset: Preset, target_modules, target_names,
           everything: bool = False) -> list[Selected]:
    """Layers under the target module classes, and layers whose path matches a target name, in model order.

    The override of a layer is the name_algo_map entry matching its path, else the module_algo_map entry of
    its nearest enclosing class (LyCORIS' precedence). `everything` selects every adaptable layer (a model with
    no targets given)."""
    target_modules = set(target_modules)
    chosen: dict[str, Selected] = {}
    classes: dict[str, str] = {}
    for path, module in root.named_modules():
        classes[path] = type(module).__name__
        if preset.excluded(path) or not _leaf(module) or path in chosen:
            continue
        ancestors = _ancestors(path)
        inside = next((a for a in ancestors if classes.get(a) in target_modules), None)
        by_name = any(preset.matches(t, path) for t in target_names)
        if not (everything or by_name or inside is not None or type(module).__name__ in target_modules):
            continue
        if any(preset.excluded(a) for a in ancestors if a):
            continue
        override = preset.override_for_name(path)
        if override is None:
            for a in [path, *ancestors]:
                override = preset.module_algo_map.get(classes.get(a, ""))
                if override is not None:
                    break
        chosen[path] = Selected(component, path, module, override)
    return list(chosen.values())


def _ancestors(path: str) -> list[str]:
    """Enclosing module paths, nearest first, ending with the root ''."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]
