"""Build a model component on the meta device and fill it with tensors read one at a time.

Peak memory is the finished model plus one tensor: each tensor is read (memory-mapped), converted to the
target dtype, and assigned in place of the meta parameter; nothing is allocated twice.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch

from ..formats.safetensors_io import owned
from .meta import component_on_meta

__all__ = ["fill_component", "owned", "materialize_buffers"]


def materialize_buffers(module: torch.nn.Module, where: str) -> None:
    """Non-persistent buffers are not in any file; after a meta build they must be recreated. CLIP's
    ``position_ids`` is the only one these models have; anything else is an error, not a silent meta tensor."""
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if attr == "position_ids":
            owner.register_buffer(attr, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)
        else:
            raise RuntimeError(f"{where}: buffer {name!r} was not loaded (it is not in the file)")


def fill_component(component: str, config: Mapping[str, Any],
                   tensors: Callable[[torch.nn.Module], Iterable[tuple[str, torch.Tensor]]],
                   dtype: torch.dtype | None, where: str, module: torch.nn.Module | None = None) -> torch.nn.Module:
    """Build ``component`` from ``config`` on meta (or take ``module``, already built so from it) and assign the
    ``(state-dict key, tensor)`` pairs that ``tensors(module)`` yields. Yield them lazily (a generator): each is
    converted before the next is read."""
    module = component_on_meta(component, config) if module is None else module
    state = {key: owned(value, dtype) for key, value in tensors(module)}
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{where}: {component} tensors missing: {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    wrong = [f"{k}: {tuple(v.shape)} in the file, {tuple(expected[k])} expected"
             for k, v in state.items() if k in expected and v.shape != expected[k]]
    if wrong:
        raise ValueError(f"{where}: {component} tensor shapes differ from its config: " + "; ".join(wrong[:3]))
    module.load_state_dict(state, strict=True, assign=True)
    materialize_buffers(module, where)
    return module.eval()
