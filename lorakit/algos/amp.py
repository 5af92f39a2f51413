"""Mixed precision for lorakit's autograd functions.

torch.autocast casts the inputs of the ops it knows (matmul, conv, ...) to a lower precision inside forward, but a
custom autograd function's backward runs outside autocast and meets float32 factors next to bfloat16/float16
activations. So under autocast every function is called through `apply`: its floating inputs are cast to the autocast
dtype first, as differentiable casts outside the function (their gradients reach each parameter in its own dtype),
and the function itself runs with autocast off, in one dtype forward and backward. Without autocast nothing changes.
"""

from __future__ import annotations

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on this device type, or None when it is off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: per-device functions
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


# one check for every device type at once (torch >= 2.4), so that a call without autocast costs ~0.2 us more
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def apply(function: type[torch.autograd.Function], *args, cast: bool | tuple[int, ...] = True):
    """function.apply(*args), with autocast's dtype applied to its floating tensor inputs. cast=False: computed in
    their own dtypes (small matrices that need float32's range and linear algebra); a tuple: only the inputs at
    those positions (the others are read as they are, e.g. parameters a closure among the inputs reads itself)."""
    if _any_autocast is not None and not _any_autocast():
        return function.apply(*args)
    first = next(a for a in args if isinstance(a, torch.Tensor))
    dtype = autocast_dtype(first.device.type)
    if dtype is None:
        return function.apply(*args)
    if cast is not False:
        args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and
                     (cast is True or i in cast) else a for i, a in enumerate(args))
    with torch.autocast(first.device.type, enabled=False):
        return function.apply(*args)
