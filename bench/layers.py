"""Forward+backward cost of each lorakit algorithm on single layers, against lycoris-lora and peft.

For each layer shape, every implementation is timed in the same run, interleaved round by round (so that load
from other processes hits all of them alike), and reported as a ratio over the frozen base layer alone:

    ratio = median time of (forward + backward) with the adapter / the same for the frozen layer

The input requires grad in every case (as inside a network), so the base time includes the input gradient. The
script also records what autograd keeps for backward (torch.autograd.graph.saved_tensors_hooks): bytes of the
distinct storages saved, leaving out the input and the frozen weight and bias (which every method shares) and the
method's own trainable tensors (in memory anyway), and flags FULL-W when a saved tensor that does not grow with the
batch is as large as the layer weight.

Run `python bench/layers.py --help`; bench/README.md has examples.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

os.environ.setdefault("LYCORIS_KERNEL_TUNE", "off")  # no first-call autotune timing or cache files

import torch
import torch.nn as nn

from flops import product_flops

# ----------------------------------------------------------------------------------------------------------------
# What is measured

SHAPES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    "linear320": (lambda: nn.Linear(320, 320), (2, 4096, 320), "Linear 320 on (2,4096,320)"),
    "linear1280": (lambda: nn.Linear(1280, 1280), (2, 256, 1280), "Linear 1280 on (2,256,1280)"),
    "linear768x320": (lambda: nn.Linear(768, 320), (2, 77, 768), "Linear 768->320 on (2,77,768)"),
    "conv320k3": (lambda: nn.Conv2d(320, 320, 3, padding=1), (2, 320, 64, 64),
                  "Conv2d 320->320 k3 p1 on (2,320,64,64)"),
    # not in the list: SD1.x's proj_in/proj_out, in kohya's default LoRA targets
    "conv320k1": (lambda: nn.Conv2d(320, 320, 1), (2, 320, 64, 64), "Conv2d 320->320 k1 on (2,320,64,64)"),
}

STAT = statistics.median  # or min (--stat)

# Targets from the issue (ratio over the base layer); None: no target of its own (still compared to the peers).
TARGETS = {"lora": 1.15, "loha": 1.6, "lokr": 1.3, "diag-oft": 1.3, "boft": 2.0, "ia3": 1.05, "dora": 1.5,
           "dora-out": 1.5}

ALGOS = ("lora", "dora", "dora-out", "loha", "lokr", "ia3", "dylora", "glora", "diag-oft", "boft", "full")
PEERS = ("lycoris", "lycoris-bypass", "peft")
IMPLS = ("lorakit", *PEERS)

RANK, ALPHA = 16, 8  # LoRA, DoRA, DyLoRA, GLoRA, LoKr
LOHA_RANK, LOHA_ALPHA = 8, 4
DYLORA_BLOCK = 4
OFT_BLOCK = 16  # Diag-OFT block size: divides 320, 1280 and (for peft, input side) 768 and 320*9
BOFT_BLOCK = 10  # BOFT: 320/10 = 32 and 1280/10 = 128 blocks, powers of two as lycoris and lorakit need

LORAKIT_OPTIONS: dict[str, tuple[str, dict]] = {
    "lora": ("lora", dict(dim=RANK, alpha=ALPHA)),
    "dora": ("lora", dict(dim=RANK, alpha=ALPHA, dora_wd=True)),  # lorakit's default axis: column norm ("in")
    "dora-out": ("lora", dict(dim=RANK, alpha=ALPHA, dora_wd=True, dora_axis="out")),  # peft's row norm
    "loha": ("loha", dict(dim=LOHA_RANK, alpha=LOHA_ALPHA)),
    "lokr": ("lokr", dict(dim=RANK, alpha=ALPHA, factor=-1)),
    "ia3": ("ia3", dict()),
    "dylora": ("dylora", dict(dim=RANK, alpha=ALPHA, block_size=DYLORA_BLOCK)),
    "glora": ("glora", dict(dim=RANK, alpha=ALPHA)),
    "diag-oft": ("diag-oft", dict(dim=OFT_BLOCK)),
    "boft": ("boft", dict(dim=BOFT_BLOCK)),
    "full": ("full", dict()),
}

SETTINGS = {
    "lora": f"dim {RANK}, alpha {ALPHA}",
    "dora": f"dim {RANK}, alpha {ALPHA}, norm per input column (lycoris wd_on_out=False; peft: per output row)",
    "dora-out": f"dim {RANK}, alpha {ALPHA}, norm per output row (lycoris wd_on_out=True; peft use_dora)",
    "loha": f"dim {LOHA_RANK}, alpha {LOHA_ALPHA}",
    "lokr": f"dim {RANK}, alpha {ALPHA}, factor -1",
    "ia3": "output channels",
    "dylora": f"dim {RANK}, alpha {ALPHA}, block {DYLORA_BLOCK}",
    "glora": f"dim {RANK}, alpha {ALPHA}",
    "diag-oft": f"block {OFT_BLOCK}, no constraint",
    "boft": f"block {BOFT_BLOCK}, no constraint",
    "full": "",
}

# Peer columns that do not compute the same thing: shown, but left out of "best peer".
NOT_COMPARABLE = {
    ("dora", "lycoris-bypass"): "lycoris ignores DoRA in bypass mode (this is plain LoRA)",
    ("dora-out", "lycoris-bypass"): "lycoris ignores DoRA in bypass mode (this is plain LoRA)",
    ("dora", "peft"): "peft DoRA normalises output rows (compare with the dora-out row)",
    ("glora", "peft"): "peft GLoRA is another method (W0 + W0*A + B, A and B rank 16), not LyCORIS' GLoRA",
}


# ----------------------------------------------------------------------------------------------------------------
# Building the implementations

@dataclass
class Variant:
    algo: str
    impl: str
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    params: list[torch.Tensor] = field(default_factory=list)
    exclude: set[int] = field(default_factory=set)  # storages of the frozen weight and bias
    setting: str = ""
    error: str | None = None
    note: str | None = None
    times: list[float] = field(default_factory=list)
    saved: dict[str, Any] | None = None
    flops: int | None = None  # matrix-product FLOPs of one forward+backward (bench/flops.py)
    comparable: bool = True  # False: computes less than the method asked (shown with *, not a "best peer")


class Wrap(nn.Module):
    """A one-layer model for peft's get_peft_model."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def frozen_copy(base: nn.Module) -> nn.Module:
    layer = copy.deepcopy(base)
    layer.requires_grad_(False)
    return layer


def storages(layer: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (getattr(layer, "weight", None), getattr(layer, "bias", None))
            if isinstance(t, torch.Tensor)}


def perturb(params, seed: int) -> None:
    """Small random values, so that no adapter sits at an exact zero/identity start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-3)


def shape_str(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "()"


def param_summary(named) -> str:
    return ", ".join(f"{n} {shape_str(p)}" for n, p in named if p.requires_grad)


def build_lorakit(algo: str, base: nn.Module) -> Variant:
    from lorakit.algos import make_adapter

    name, opts = LORAKIT_OPTIONS[algo]
    layer = frozen_copy(base)
    v = Variant(algo, "lorakit", exclude=storages(layer))
    a = make_adapter(name, layer, **opts)
    a.apply()
    a.train()
    v.params = [p for p in a.parameters() if p.requires_grad]
    v.fn = layer
    v.setting = param_summary(a.named_parameters())
    if algo == "lokr":
        v.setting += f" (scale {a.scale:g})"
    v._keep = a  # noqa: the adapter must outlive the variant
    return v


def lycoris_spec(algo: str):
    from lycoris.modules import (ButterflyOFTModule, DiagOFTModule, DyLoraModule, FullModule, GLoRAModule,
                                 IA3Module, LoConModule, LohaModule, LokrModule)

    return {
        "lora": (LoConModule, dict(lora_dim=RANK, alpha=ALPHA)),
        "dora": (LoConModule, dict(lora_dim=RANK, alpha=ALPHA, weight_decompose=True, wd_on_out=False)),
        "dora-out": (LoConModule, dict(lora_dim=RANK, alpha=ALPHA, weight_decompose=True, wd_on_out=True)),
        "loha": (LohaModule, dict(lora_dim=LOHA_RANK, alpha=LOHA_ALPHA)),
        "lokr": (LokrModule, dict(lora_dim=RANK, alpha=ALPHA, factor=-1)),
        "ia3": (IA3Module, dict()),
        "dylora": (DyLoraModule, dict(lora_dim=RANK, alpha=ALPHA, block_size=DYLORA_BLOCK)),
        "glora": (GLoRAModule, dict(lora_dim=RANK, alpha=ALPHA)),
        "diag-oft": (DiagOFTModule, dict(lora_dim=OFT_BLOCK, constraint=0)),
        "boft": (ButterflyOFTModule, dict(lora_dim=BOFT_BLOCK, constraint=0)),
        "full": (FullModule, dict()),
    }[algo]


def build_lycoris(algo: str, base: nn.Module, bypass: bool) -> Variant:
    impl = "lycoris-bypass" if bypass else "lycoris"
    if bypass and algo == "full":
        return Variant(algo, impl, error="no bypass form (lycoris raises by design)")
    if bypass and algo == "dylora":
        return Variant(algo, impl, error="lycoris DyLoRA bypass is broken (UnboundLocalError / shape error)")
    cls, kw = lycoris_spec(algo)
    layer = frozen_copy(base)
    v = Variant(algo, impl, exclude=storages(layer))
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = cls("lyco", layer, multiplier=1.0, bypass_mode=bypass, **kw)
    mod.apply_to()
    mod.train()
    v.params = [p for p in mod.parameters() if p.requires_grad]
    v.fn = layer
    v.setting = param_summary(mod.named_parameters())
    if algo == "lokr":
        v.setting += f" (scale {mod.scale:g})"
    v._keep = mod  # noqa
    return v


def peft_config(algo: str, spec_in: int, lycoris_stages: int | None):
    from peft import BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig

    t = ["layer"]
    if algo == "lora":
        return LoraConfig(target_modules=t, r=RANK, lora_alpha=ALPHA), f"r {RANK}, lora_alpha {ALPHA}"
    if algo in ("dora", "dora-out"):
        return (LoraConfig(target_modules=t, r=RANK, lora_alpha=ALPHA, use_dora=True),
                f"r {RANK}, lora_alpha {ALPHA}, use_dora (row norm)")
    if algo == "loha":
        return LoHaConfig(target_modules=t, r=LOHA_RANK, alpha=LOHA_ALPHA), f"r {LOHA_RANK}, alpha {LOHA_ALPHA}"
    if algo == "lokr":
        return (LoKrConfig(target_modules=t, r=RANK, alpha=ALPHA, decompose_factor=-1),
                f"r {RANK}, alpha {ALPHA}, decompose_factor -1")
    if algo == "ia3":
        return IA3Config(target_modules=t, feedforward_modules=[]), "output scaling"
    if algo == "diag-oft":
        return (OFTConfig(target_modules=t, r=0, oft_block_size=OFT_BLOCK, use_cayley_neumann=False),
                f"oft_block_size {OFT_BLOCK}, exact Cayley (input side)")
    if algo == "boft":
        block = BOFT_BLOCK if spec_in % BOFT_BLOCK == 0 else 8
        factor = lycoris_stages or 1
        while factor > 1 and (spec_in // block) % (2 ** (factor - 1)):
            factor -= 1
        return (BOFTConfig(target_modules=t, boft_block_size=block, boft_n_butterfly_factor=factor),
                f"boft_block_size {block}, asked n_butterfly_factor {factor}")
    if algo == "glora":
        from peft import GloraConfig

        return (GloraConfig(target_modules=t, r=RANK, config_A_B="lora", config_C="none", config_D_E="none"),
                f"r {RANK}, A/B lora, no C/D/E")
    return None, ""


def build_peft(algo: str, base: nn.Module) -> Variant:
    from peft import get_peft_model

    spec_in = base.in_features if isinstance(base, nn.Linear) else base.in_channels * math.prod(base.kernel_size)
    stages = None
    if algo == "boft":
        try:
            from lorakit.algos.boft import power2_factorization

            out = base.out_features if isinstance(base, nn.Linear) else base.out_channels
            split = power2_factorization(out, BOFT_BLOCK)
            stages = bin(split[1] - 1).count("1") + 1 if split else None
        except Exception:
            stages = None
    cfg, desc = peft_config(algo, spec_in, stages)
    if cfg is None:
        return Variant(algo, "peft", error="peft has no such method")
    layer = frozen_copy(base)
    v = Variant(algo, "peft", exclude=storages(layer))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(Wrap(layer), cfg)
    model.train()
    v.params = [p for p in model.parameters() if p.requires_grad]
    v.fn = model
    named = [(n.split("layer.", 1)[-1].replace(".default", ""), p) for n, p in model.named_parameters()]
    v.setting = desc + "; " + param_summary(named)
    if algo == "boft":
        r = next(p for n, p in model.named_parameters() if "boft_R" in n)
        v.setting += f"; effective n_butterfly_factor {r.shape[0]}"
        if stages and r.shape[0] != stages:
            v.comparable = False
            # peft sets the factor to 1 where its CUDA extension does not load (every CPU run)
            v.note = (f"peft built {r.shape[0]} butterfly factor(s), not the {stages} asked (without its CUDA "
                      f"extension it sets 1): less work than the {stages} stages of lorakit and lycoris")
    v._keep = model  # noqa
    return v


def build(algo: str, impl: str, base: nn.Module, seed: int) -> Variant:
    try:
        if impl == "lorakit":
            v = build_lorakit(algo, base)
        elif impl == "lycoris":
            v = build_lycoris(algo, base, bypass=False)
        elif impl == "lycoris-bypass":
            v = build_lycoris(algo, base, bypass=True)
        else:
            v = build_peft(algo, base)
        if v.fn is not None:
            perturb(v.params, seed)
    except Exception as e:  # a peer that cannot do this: n/a with the reason
        v = Variant(algo, impl, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    v.note = NOT_COMPARABLE.get((algo, impl), v.note)
    return v


# ----------------------------------------------------------------------------------------------------------------
# Measuring

def clear_grads(x: torch.Tensor, params) -> None:
    x.grad = None
    for p in params:
        p.grad = None


def step(fn, x, g, params) -> None:
    y = fn(x)
    y.backward(g)
    clear_grads(x, params)


def check_runs(v: Variant, x, g) -> None:
    """One fwd+bwd to catch failures (a peer that breaks on this shape becomes n/a), its products counted."""
    def run():
        y = v.fn(x)
        if y.shape != g.shape:
            raise RuntimeError(f"output shape {tuple(y.shape)}, expected {tuple(g.shape)}")
        y.backward(g)

    try:
        v.flops = product_flops(run)
        missing = sum(p.grad is None for p in v.params)
        if missing and v.algo != "dylora":  # DyLoRA trains one block per step
            v.note = ((v.note + "; ") if v.note else "") + f"{missing} trainable tensors got no gradient"
        clear_grads(x, v.params)
    except Exception as e:
        v.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        v.fn = None
        clear_grads(x, v.params)


def time_once(fn, x, g, params, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        step(fn, x, g, params)
    return (time.perf_counter() - t0) / inner


def steps_per_sample(fn, x, g, params, min_time: float) -> int:
    """Steps per timed sample so that a sample lasts about min_time (from the fastest of three single steps)."""
    once = min(time_once(fn, x, g, params, 1) for _ in range(3))
    return max(1, math.ceil(min_time / max(once, 1e-6)))


def saved_records(fn, x) -> list[tuple[int, int, int, tuple]]:
    """(storage ptr, storage bytes, numel, shape) of each tensor autograd saves for backward of fn(x)."""
    recs = []  # the saved tensors, kept alive until measured

    def pack(t):
        recs.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    out = []
    for t in recs:
        try:
            s = t.untyped_storage()
            out.append((s.data_ptr(), s.nbytes(), t.numel(), tuple(t.shape)))
        except Exception:  # tensors without storage
            out.append((0, 0, t.numel(), tuple(t.shape)))
    del y
    recs.clear()
    return out


def measure_saved(v: Variant, x: torch.Tensor, x_half: torch.Tensor, weight_numel: int) -> dict[str, Any]:
    recs = saved_records(v.fn, x)
    half = saved_records(v.fn, x_half)
    # the method's own trainable tensors are in memory anyway: keeping them for backward costs nothing more
    own = v.exclude | {p.untyped_storage().data_ptr() for p in v.params}
    skip = own | {x.untyped_storage().data_ptr(), 0}
    skip_half = own | {x_half.untyped_storage().data_ptr(), 0}
    seen, total, full_w, big = set(), 0, [], []
    fixed_by_order = len(recs) == len(half)
    for i, (ptr, nbytes, numel, shape) in enumerate(recs):
        if ptr in skip or ptr in seen:
            continue
        seen.add(ptr)
        total += nbytes
        # "Weight-like": does not grow with the batch (same numel at batch 1), and at least the weight's size.
        if fixed_by_order:
            h = half[i]
            batch_free = h[2] == numel and h[0] not in skip_half
        else:
            batch_free = numel == weight_numel
        if batch_free and numel >= weight_numel:
            full_w.append(shape)
        big.append((nbytes, shape))
    big.sort(reverse=True)
    return {"bytes": total, "full_w": [list(s) for s in full_w],
            "largest": [[b, list(s)] for b, s in big[:4]]}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    from importlib import metadata

    for mod, dist in (("lycoris", "lycoris-lora"), ("peft", "peft"), ("lorakit", "lorakit")):
        try:
            info[mod] = metadata.version(dist)
        except Exception as e:
            info[mod] = f"unavailable ({type(e).__name__})"
    try:
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "lorakit"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        info["lorakit_commit"] = (rev or "?") + (" + uncommitted lorakit changes" if dirty else "")
    except Exception:
        info["lorakit_commit"] = "?"
    return info


def cpu_idle(interval: float = 0.3) -> float | None:
    """Fraction of CPU time idle over `interval` seconds (Linux /proc/stat), None where unknown."""
    def read():
        with open("/proc/stat") as f:
            v = [int(a) for a in f.readline().split()[1:]]
        return v[3] + (v[4] if len(v) > 4 else 0), sum(v)

    try:
        i0, t0 = read()
        time.sleep(interval)
        i1, t1 = read()
        return (i1 - i0) / max(1, t1 - t0)
    except (OSError, ValueError, IndexError):
        return None


def wait_idle(max_wait: float, threshold: float = 0.9) -> float:
    """Sleep until the other processes leave the CPUs idle (or max_wait passes); returns seconds waited."""
    if max_wait <= 0:
        return 0.0
    start = time.time()
    while time.time() - start < max_wait:
        idle = cpu_idle()
        if idle is None or idle >= threshold:
            break
        time.sleep(1.0)
    return time.time() - start


def _busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes have used, CPU seconds this process has used), for sampling others' load."""
    try:
        with open("/proc/stat") as f:
            v = [int(a) for a in f.readline().split()[1:]]
        busy = sum(v) - v[3] - (v[4] if len(v) > 4 else 0)
        t = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class Sampler:
    """Times one sample; with a wait budget, a sample during which other processes used more than `limit` of the
    CPUs is thrown away and taken again once they leave the CPUs idle (a shared machine's noise)."""

    def __init__(self, max_wait: float, limit: float = 0.1):
        self.max_wait, self.limit = max_wait, limit
        self.waited, self.redone, self.kept_busy = 0.0, 0, 0
        self.cpus = os.cpu_count() or 1

    def __call__(self, fn, x, g, params, inner: int) -> float:
        while True:
            # The first step after another method's pays for the memory the allocator maps again (page faults on
            # activation-sized buffers: up to ~10 ms on the k1 conv), which a training loop repeating one step does
            # not: one untimed step of this method first.
            step(fn, x, g, params)
            a = _busy_seconds()
            w0 = time.perf_counter()
            t = time_once(fn, x, g, params, inner)
            wall = time.perf_counter() - w0
            b = _busy_seconds()
            if self.max_wait <= 0 or a is None or b is None:
                return t
            foreign = ((b[0] - a[0]) - (b[1] - a[1])) / (wall * self.cpus)
            if foreign <= self.limit:
                return t
            if self.waited >= self.max_wait:
                self.kept_busy += 1
                return t
            self.redone += 1
            self.waited += wait_idle(min(30.0, self.max_wait - self.waited))


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


# ----------------------------------------------------------------------------------------------------------------
# Reporting

def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}"


def fmt_mb(b: int | None) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2 ** 20:.1f}" if b >= 2 ** 20 / 10 or b == 0 else f"{b / 2 ** 20:.3f}"


def verdict(algo: str, ratio: float | None, best: float | None, full_w: bool) -> str:
    if ratio is None:
        return "ERROR"
    fails = []
    target = TARGETS.get(algo)
    if target is not None and ratio > target:
        fails.append("target")
    if best is not None and ratio > best:
        fails.append("peer")
    if full_w and algo != "full":
        fails.append("FULL-W")
    return "PASS" if not fails else "FAIL (" + ", ".join(fails) + ")"


def report_shape(key: str, desc: str, base_t: float, base_flops: int, rows: dict[str, dict[str, Variant]], impls,
                 out) -> dict:
    """Markdown table for one shape; returns the JSON record."""
    p = lambda s="": print(s, file=out)  # noqa: E731
    p(f"### {desc}")
    p()
    p(f"Base layer (frozen, input requires grad): {base_t * 1e3:.2f} ms per forward+backward, "
      f"{base_flops / 1e6:.1f} MFLOP in its products.")
    p()
    peers = [i for i in impls if i != "lorakit"]
    head = ["algo", "lorakit", *peers, "best peer", "kit/peer", "kit FLOPs", "kit saved MB",
            *[f"{i} saved MB" for i in peers], "target", "verdict"]
    p("| " + " | ".join(head) + " |")
    p("|" + "|".join("---" for _ in head) + "|")
    footnotes: list[str] = []
    record = {"desc": desc, "base_s": base_t, "base_flops": base_flops, "rows": {}}

    def ratio_of(v: Variant | None):
        return STAT(v.times) / base_t if v and v.times else None

    def mark(v: Variant) -> str:
        msg = v.error or v.note
        if not msg:
            return ""
        if msg not in footnotes:
            footnotes.append(msg)
        return f" [{footnotes.index(msg) + 1}]"

    for algo, variants in rows.items():
        kit = variants.get("lorakit")
        kr = ratio_of(kit)
        peer_ratios = {i: ratio_of(variants.get(i)) for i in peers}
        def comparable(i: str) -> bool:
            return (algo, i) not in NOT_COMPARABLE and variants[i].comparable

        eligible = [r for i, r in peer_ratios.items() if r is not None and comparable(i)]
        best = min(eligible) if eligible else None
        kit_fullw = bool(kit and kit.saved and kit.saved["full_w"])
        cells = [algo]
        cells.append((fmt_ratio(kr) + (" FULL-W" if kit_fullw else "") + (mark(kit) if kit else "")))
        for i in peers:
            v = variants.get(i)
            if v is None:
                cells.append("-")
                continue
            c = fmt_ratio(peer_ratios[i])
            if v.saved and v.saved["full_w"]:
                c += " FULL-W"
            if not comparable(i) and peer_ratios[i] is not None:
                c += "*"
            cells.append(c + mark(v))
        cells.append(fmt_ratio(best))
        cells.append(f"{kr / best:.2f}" if kr is not None and best else "n/a")
        cells.append(fmt_ratio(kit.flops / base_flops) if kit and kit.flops is not None and base_flops else "n/a")
        cells.append(fmt_mb(kit.saved["bytes"]) if kit and kit.saved else "n/a")
        for i in peers:
            v = variants.get(i)
            cells.append(fmt_mb(v.saved["bytes"]) if v and v.saved else ("-" if v is None else "n/a"))
        t = TARGETS.get(algo)
        cells.append(f"<= {t:g}" if t else "-")
        cells.append(verdict(algo, kr, best, kit_fullw) if kit else "-")
        p("| " + " | ".join(cells) + " |")
        record["rows"][algo] = {
            "target": t, "best_peer_ratio": best,
            "verdict": verdict(algo, kr, best, kit_fullw) if kit else None,
            **{i: {"ratio": ratio_of(v), "stat_s": STAT(v.times) if v.times else None,
                   "times_s": v.times, "flops": v.flops, "saved": v.saved, "setting": v.setting, "error": v.error,
                   "note": v.note, "comparable": comparable(i)}
               for i, v in variants.items()},
        }
    p()
    if footnotes:
        p("Notes: " + "; ".join(f"[{n + 1}] {m}" for n, m in enumerate(footnotes)) + ". "
          "`*`: shown but not counted in \"best peer\". FULL-W: a saved tensor as large as the weight.")
        p()
    p("<details><summary>settings and parameters per implementation</summary>")
    p()
    for algo, variants in rows.items():
        p(f"- **{algo}** ({SETTINGS[algo]})")
        for i, v in variants.items():
            if v.setting:
                extra = ""
                if v.saved and v.saved["full_w"]:
                    extra = f" — weight-sized saved: {v.saved['full_w']}"
                p(f"  - {i}: {v.setting}{extra}")
    p()
    p("</details>")
    p()
    return record


# ----------------------------------------------------------------------------------------------------------------

def pick_names(ap: argparse.ArgumentParser, given: str, known, what: str) -> list[str]:
    """The comma-separated names of an option, each checked against the known ones (an argparse error if not)."""
    names = [s.strip() for s in given.split(",") if s.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        ap.error(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(known)})")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds per implementation (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed forward+backward per implementation")
    ap.add_argument("--min-time", type=float, default=0.1,
                    help="seconds each timed sample should last (fast shapes repeat the step inside a sample)")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up, 0.05 s samples")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {','.join(SHAPES)}")
    ap.add_argument("--algos", default=",".join(ALGOS), help=f"comma-separated subset of {','.join(ALGOS)}")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    ap.add_argument("--no-saved", action="store_true", help="skip the saved-tensor measurement")
    ap.add_argument("--json", metavar="PATH", help="also write the raw numbers to PATH")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="statistic over the rounds (min is steadier on a machine shared with other jobs)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="per shape, spend up to SECONDS waiting for other processes to leave the CPUs idle: a sample "
                         "during which others used >10%% of the CPUs is retaken (Linux /proc/stat)")
    args = ap.parse_args(argv)
    global STAT
    STAT = statistics.median if args.stat == "median" else min
    if args.quick:
        args.reps, args.warmup, args.min_time = 3, 1, 0.05

    shapes = pick_names(ap, args.shapes, SHAPES, "shape")
    algos = pick_names(ap, args.algos, ALGOS, "algo")
    impls = pick_names(ap, args.impls, IMPLS, "implementation")
    if "lorakit" not in impls:
        impls.insert(0, "lorakit")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore")
    try:
        import importlib

        importlib.import_module("lycoris")  # first, so that its logger exists and keeps our level
    except Exception:
        pass
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)  # its per-module INFO/WARNING lines
    out = sys.stdout
    info = machine()
    started = time.time()
    print("## bench/layers.py: forward+backward time over the frozen base layer", file=out)
    print(file=out)
    print(f"Machine: {info['cpu']} ({info['logical_cpus']} logical CPUs), torch {info['torch']} "
          f"with {info['threads']} threads, fp32; lorakit at {info['lorakit_commit']}; lycoris-lora {info['lycoris']}, "
          f"peft {info['peft']}, "
          f"python {info['python']}. Load average at start: {loadavg()}.", file=out)
    print(f"Method: {args.stat} of {args.reps} interleaved rounds after {args.warmup} warm-up steps; each sample "
          f">= {args.min_time:g} s, after one untimed step of the same method; loss gradient = fixed random "
          "grad_output; input requires grad. "
          "Ratio = method / frozen layer. Kit FLOPs = lorakit's matrix-product FLOPs over the frozen layer's "
          "(torch's FlopCounterMode; elementwise passes not counted): its ratio at the frozen layer's product speed. "
          "Saved MB = distinct storages autograd keeps for backward, "
          "excluding the input, the frozen weight/bias and the method's own trainable tensors. "
          "Best peer = fastest comparable peer column. "
          "A verdict FAIL (peer) with kit/peer within ~1.05 may be noise.", file=out)
    print(file=out)
    out.flush()

    results = {"machine": info, "args": vars(args), "shapes": {}}
    for key in shapes:
        make_layer, xshape, desc = SHAPES[key]
        torch.manual_seed(args.seed)
        base = make_layer()
        base.requires_grad_(False)
        x = torch.randn(xshape, requires_grad=True)
        g = torch.randn(base(x).shape)
        x_half = x[:1].detach().clone().requires_grad_(True)
        weight_numel = base.weight.numel()

        variants: dict[str, dict[str, Variant]] = {}
        for algo in algos:
            variants[algo] = {}
            for impl in impls:
                v = build(algo, impl, base, args.seed)
                if v.fn is not None:
                    check_runs(v, x, g)
                variants[algo][impl] = v
        live = [v for row in variants.values() for v in row.values() if v.fn is not None]

        # Saved tensors (one forward each, graph dropped).
        if not args.no_saved:
            for v in live:
                try:
                    v.saved = measure_saved(v, x, x_half, weight_numel)
                except Exception as e:
                    v.note = ((v.note + "; ") if v.note else "") + f"saved-tensor measurement failed: {e}"
                clear_grads(x, v.params)
            x_half.grad = None

        # Warm-up, then calibrate how many steps make one sample.
        base_fn = base
        base_flops = product_flops(lambda: step(base_fn, x, g, []))
        for _ in range(max(1, args.warmup)):
            step(base_fn, x, g, [])
        inner = steps_per_sample(base_fn, x, g, [], args.min_time)
        for v in live:
            for _ in range(args.warmup):
                step(v.fn, x, g, v.params)

        base_times: list[float] = []
        gc.collect()
        gc.disable()
        sample = Sampler(args.wait_idle)
        try:
            for r in range(args.reps):
                sample.waited += wait_idle(min(30.0, max(0.0, args.wait_idle - sample.waited)))
                base_times.append(sample(base_fn, x, g, [], inner))
                for v in live:
                    v.times.append(sample(v.fn, x, g, v.params, inner))
                base_times.append(sample(base_fn, x, g, [], inner))
        finally:
            gc.enable()
        base_t = STAT(base_times)
        rec = report_shape(key, f"{desc} ({inner} step(s) per sample)", base_t, base_flops, variants, impls, out)
        noise = ""
        if args.wait_idle > 0:
            noise = (f"; {sample.redone} samples retaken because other processes were busy, {sample.kept_busy} kept "
                     f"busy (wait budget spent), {sample.waited:.0f} s waited")
        print(f"Load average after this shape: {loadavg()}{noise}.", file=out)
        print(file=out)
        rec["base_times_s"] = base_times
        rec["inner_steps"] = inner
        results["shapes"][key] = rec
        out.flush()
        del variants, live
        gc.collect()

    print(f"Total wall time {time.time() - started:.0f} s; load average at end: {loadavg()}.", file=out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
