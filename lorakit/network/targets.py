"""Which layers of a model a preset selects, and with which algorithm override."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.nn as nn

from ..algos.layer import describe_layer, is_transposed_linear
from .presets import Preset

log = logging.getLogger(__name__)

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Selected:
    component: str  # "unet", "text_encoder", "text_encoder_2" or "model"
    path: str
    module: nn.Module
    override: dict | None  # from module_algo_map / name_algo_map


def _leaf(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a Linear with its weight stored transposed: adapted as a Linear
    return isinstance(module, ADAPTABLE + NORMS) or is_transposed_linear(module)


def _unsupported_kind(module: nn.Module) -> str | None:
    """Layers a user may expect adapted that no algorithm takes, named when a preset names them and they are
    skipped: transposed convs, embeddings and recurrent layers."""
    cls = type(module)
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding, nn.RNNBase)):
        return f"{cls.__name__} is not a layer kind the algorithms take (Linear, Conv1d/2d/3d)"
    return None


def select(component: str, root: nn.Module, preset: Preset, target_modules, target_names,
           everything: bool = False) -> list[Selected]:
    """Layers under the target module classes, and layers whose path matches a target name, in model order.

    The override of a layer is the module_algo_map entry of its nearest enclosing class (its own first); a layer
    not inside a target class (nor, on a generic model, a module_algo_map class) takes the name_algo_map entry
    matching its path first (LyCORIS' precedence). `everything` selects every adaptable layer (a model with no
    targets given)."""
    targeted = bool(target_modules or target_names)
    target_modules = set(target_modules)
    chosen: dict[str, Selected] = {}
    classes: dict[str, str] = {}
    parents: dict[int, nn.Module] = {}
    skipped: list[str] = []
    for path, module in root.named_modules():
        classes[path] = type(module).__name__
        for child in module.children():
            parents.setdefault(id(child), module)
        kind = _unsupported_kind(module)
        if preset.excluded(path) or not (_leaf(module) or kind) or path in chosen:
            continue
        ancestors = _ancestors(path)
        inside = next((a for a in ancestors if classes.get(a) in target_modules), None)
        by_name = any(preset.matches(t, path) for t in target_names)
        named = by_name or type(module).__name__ in target_modules
        if not (everything or named or inside is not None):
            continue
        if any(preset.excluded(a) for a in ancestors if a):
            continue
        if kind is not None and not named:
            continue  # an embedding or the like inside a targeted block: not asked for by name, left out quietly
        why = kind or unsupported(module, parents.get(id(module)))
        if why is not None:
            skipped.append(f"'{path}' ({why})")
            continue
        # as LyCORIS' create_modules: name_algo_map only for layers reached by name, not for those inside a module
        # walked by class: a target class, and on a generic model a module_algo_map class too (wrapper.py adds
        # those to its targets; the SD networks' kohya.py does not)
        walked = inside is not None or (component == "model" and any(
            classes.get(a) in preset.module_algo_map for a in ancestors))
        override = None if walked else preset.override_for_name(path)
        if override is None:
            for a in _class_scope(component, path, ancestors, classes, target_modules):
                override = preset.module_algo_map.get(classes.get(a, ""))
                if override is not None:
                    break
        chosen[path] = Selected(component, path, module, override)
    if skipped:
        log.warning("lorakit: %d layer(s) of the %s left without an adapter: %s", len(skipped), component,
                    "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else ""))
    if targeted and not chosen and not skipped:
        # a class named differently in this model (sd-scripts' CrossAttention for diffusers' Attention) would
        # otherwise train nothing there without a word
        own = sorted({type(m).__name__ for m in root.modules() if not type(m).__module__.startswith("torch.nn")})
        log.warning("lorakit: preset '%s' selects no layer of the %s (its target classes %s and names %s match "
                    "nothing; the module classes there: %s)", preset.name, component, sorted(target_modules),
                    list(target_names), ", ".join(own[:20]) + (", ..." if len(own) > 20 else ""))
    return list(chosen.values())


def unsupported(module: nn.Module, parent: nn.Module | None) -> str | None:
    """Why an adapter cannot act on this layer, or None: a layer kind the algorithms do not take (a grouped or
    padded-by-reflection conv), or the out_proj of torch's MultiheadAttention, which reads out_proj.weight itself
    and never calls out_proj's forward (an adapter there would never train)."""
    if isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj:
        return "nn.MultiheadAttention never calls its out_proj's forward"
    if isinstance(module, NORMS):
        return None  # adapted only with train_norm, where an unsupported norm is an error naming the layer
    try:
        describe_layer(module)
    except (TypeError, ValueError) as err:
        return str(err)
    return None


def _class_scope(component: str, path: str, ancestors: list[str], classes: dict[str, str],
                 target_modules: set[str]) -> list[str]:
    """The layer and the enclosing modules whose module_algo_map entry it may take, nearest first. On a generic
    model every enclosing class (LyCORIS' wrapper.py walks the map classes as targets). In an SD network only the
    classes up to the outermost target class it lies in, or its own class when it was selected by name: LyCORIS'
    kohya.py walks each target class with its entry and nested map classes, and looks nothing up above it."""
    if component == "model":
        return [path, *ancestors]
    outer = next((i for i in range(len(ancestors) - 1, -1, -1) if classes.get(ancestors[i]) in target_modules), None)
    return [path] if outer is None else [path, *ancestors[:outer + 1]]


def _ancestors(path: str) -> list[str]:
    """Enclosing module paths, nearest first, ending with the root ''."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def fast_path_owners(models, layers) -> list[nn.Module]:
    """torch TransformerEncoderLayers and TransformerEncoders that hold any of these layers. In inference (eval, no
    grad) a layer's fast path computes the whole block from the weights and never calls the layers' forward, so an
    applied adapter there would be skipped; torch takes the regular path when a hook is attached. An encoder given
    a padding mask hands its layers a nested tensor, which no adapter takes. Network.apply turns both off."""
    ids = {id(layer) for layer in layers}
    return [m for root in models for m in root.modules()
            if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerEncoder)) and
            any(id(c) in ids for c in m.modules())]


def tied_parameters(models, layers: dict) -> dict[str, list[str]]:
    """{adapter name: the other parameter names} for adapted layers ({name: layer}) whose weight or bias another
    module of ``models`` shares (tied weights, as GPT-2's lm_head and wte): merging such an adapter writes its
    change into the other module too."""
    owners: dict[int, list[tuple[int, str]]] = {}  # parameter -> (its module, its name) for each place it sits
    for index, root in enumerate(models):
        for path, module in root.named_modules(remove_duplicate=False):
            for pname, param in module.named_parameters(recurse=False):
                name = f"{path}.{pname}" if path else pname
                owners.setdefault(id(param), []).append((id(module), name if index == 0 else f"[{index}].{name}"))
    tied = {}
    for name, layer in layers.items():
        # the same module reached by two paths is not tied: its weight changes with it, merged or applied alike
        places = [place for param in layer.parameters(recurse=False) for place in owners.get(id(param), [])]
        if any(module != id(layer) for module, _ in places):
            tied[name] = [pname for _, pname in places]
    return tied
