"""One training step of a full-size SD1.5 U-Net with rank-16 LoRA, against the frozen U-Net, lycoris-lora and peft.

A step is forward + MSE loss to a fixed random target + backward, fp32, batch 1, on the SD1.5 U-Net built from
lorakit's bundled config with random weights (no download). The adapters are LoRA rank 16 / alpha 8 on kohya's
attn-mlp set (every Linear and 1x1 conv inside the Transformer2DModel blocks: 192 modules on SD1.5):

    frozen          the U-Net alone, no adapter (the baseline)
    lorakit         create_network(unet, preset="attn-mlp", dim=16, alpha=8).apply()
    lycoris         lycoris.kohya.create_network(algo="lora", 16, 8), its default (weight-rebuild) mode
    lycoris-bypass  the same with bypass_mode=True
    peft            peft.inject_adapter_in_model(LoraConfig(r=16, lora_alpha=8, target_modules=<lorakit's paths>))

The latents require grad in every method, the frozen baseline included, so that backward runs through the whole
U-Net in each case and the ratio is the adapters' own cost. Time: all methods live at once on copies of one U-Net
that share its weights, and are timed interleaved round by round (median of --steps rounds after --warmup).
Memory: each method runs one step in a fresh subprocess (`--worker METHOD --size S`), which reports its peak RSS
(getrusage ru_maxrss) and the RSS right after the U-Net was built; every worker imports the same libraries first.

Run `python bench/unet_step.py --help`; bench/README.md has examples.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import layers as common  # noqa: E402  (bench/layers.py: machine header, load, perturbation, formatting helpers)
from allocator import keep_freed_memory, minor_faults  # noqa: E402
from flops import product_flops  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

METHODS = ("frozen", "lorakit", "lycoris", "lycoris-bypass", "peft")
SIZES = (32, 64)
RANK, ALPHA = 16, 8
TIMESTEP = 500
MODEL = "sd15"
# Targets from the issue, for lorakit.
TARGET_FROZEN = 1.05  # s/step <= 1.05 x the frozen step
TARGET_PEFT = 0.9  # s/step <= 0.9 x peft's
RESULT_TAG = "UNET_STEP_RESULT "
MB = 2 ** 20

# lycoris' own attn-mlp preset also lists TimestepEmbedding (time_embedding.linear_1/2: 194 modules on SD1.5);
# this is kohya's (and lorakit's) attn-mlp set, as a preset file for lycoris.kohya.create_network.
LYCORIS_PRESET = """enable_conv = false
unet_target_module = ["Transformer2DModel"]
unet_target_name = []
text_encoder_target_module = []
text_encoder_target_name = []
"""


# ----------------------------------------------------------------------------------------------------------------
# The U-Net

def build_unet(init: str, seed: int) -> nn.Module:
    """SD1.5 UNet2DConditionModel from lorakit's bundled config, random weights, fp32, frozen, train mode."""
    from diffusers import UNet2DConditionModel
    from lorakit.models.configs import config_dir

    cfg = UNet2DConditionModel.load_config(str(config_dir(MODEL) / "unet"))
    if init == "diffusers":
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(cfg)
    else:
        # "fast": the same modules, filled from one pool of normal samples at torch's default scale
        # (std 1/sqrt(3 fan_in) for Linear/Conv weights and biases, norms 1 and 0). Drawing 860M samples takes
        # ~10 s on 2 cores; the step's cost and memory do not depend on the values.
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(cfg)
        unet.to_empty(device="cpu")
        g = torch.Generator().manual_seed(seed)
        pool = torch.randn(1 << 22, generator=g)
        k = 0
        with torch.no_grad():
            for mod in unet.modules():
                own = dict(mod.named_parameters(recurse=False))
                if not own:
                    continue
                if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
                    for name, p in own.items():
                        p.fill_(1.0 if name == "weight" else 0.0)
                    continue
                w = own.get("weight")
                fan_in = w[0].numel() if w is not None and w.ndim > 1 else 1
                std = (3.0 * fan_in) ** -0.5
                for p in own.values():
                    k += 1
                    _fill(p, pool, (k * 1_000_003) % pool.numel(), std)
    unet.requires_grad_(False)
    unet.train()  # as in training; no dropout in SD1.5's U-Net, GroupNorm/LayerNorm have no running stats
    return unet


def _fill(p: torch.Tensor, pool: torch.Tensor, start: int, std: float) -> None:
    flat, done, pos = p.view(-1), 0, start
    while done < flat.numel():
        m = min(flat.numel() - done, pool.numel() - pos)
        flat[done:done + m].copy_(pool[pos:pos + m])
        done, pos = done + m, 0
    flat.mul_(std)


def shared_copy(unet: nn.Module) -> nn.Module:
    """A copy of the module tree that shares the (frozen) parameters and buffers of `unet`."""
    memo = {id(t): t for t in (*unet.parameters(), *unet.buffers())}
    return copy.deepcopy(unet, memo)


def attn_mlp_paths(unet: nn.Module) -> list[str]:
    """The module paths lorakit's attn-mlp preset selects (create_network does not touch the model)."""
    from lorakit import create_network

    net = create_network(unet, preset="attn-mlp", dim=RANK, alpha=ALPHA)
    return [e.path for e in net.entries.values()]


# ----------------------------------------------------------------------------------------------------------------
# The methods

@dataclass
class Method:
    name: str
    model: nn.Module | None = None
    params: list[torch.Tensor] = field(default_factory=list)
    count: int | None = None  # adapted modules
    names: list[str] = field(default_factory=list)  # adapted module paths (or kohya names), for the same-set check
    setting: str = ""
    error: str | None = None
    note: str | None = None
    times: list[float] = field(default_factory=list)
    foreign: list[float] = field(default_factory=list)  # share of the CPUs other processes used per sample
    faults: list[int] = field(default_factory=list)  # minor page faults per sample
    flops: int | None = None  # matrix-product FLOPs of the warm-up step (bench/flops.py)
    mem: dict[str, Any] | None = None
    keep: Any = None  # the network object, kept alive


def quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def setup(name: str, unet: nn.Module, paths: list[str], seed: int, preset_file: str | None) -> Method:
    """Adapts `unet` in place for method `name` (the frozen method leaves it as it is)."""
    m = Method(name)
    base_ids = {id(p) for p in unet.parameters()}
    try:
        if name == "frozen":
            m.model, m.count, m.setting = unet, 0, "no adapter"
        elif name == "lorakit":
            from lorakit import create_network

            net = create_network(unet, preset="attn-mlp", dim=RANK, alpha=ALPHA)
            net.apply()
            net.train()
            m.keep, m.model = net, unet
            m.params = [p for p in net.parameters() if p.requires_grad]
            m.names = [e.path for e in net.entries.values()]
            m.count = len(net)
            m.setting = f'create_network(unet, preset="attn-mlp", dim={RANK}, alpha={ALPHA}).apply()'
        elif name in ("lycoris", "lycoris-bypass"):
            from lycoris.kohya import create_network as lycoris_network

            bypass = name == "lycoris-bypass"
            with quiet():
                net = lycoris_network(1.0, RANK, ALPHA, None, [], unet, algo="lora", preset=preset_file,
                                      bypass_mode=bypass)
                net.apply_to([], unet, False, True)  # sd-scripts: apply_to(text_encoder, unet, train_te, train_unet)
                net.prepare_grad_etc()
            net.train()
            m.keep, m.model = net, unet
            m.params = [p for p in net.parameters() if p.requires_grad]
            by_id = {id(mod): path for path, mod in unet.named_modules()}
            m.names = [by_id.get(id(lo.org_module[0]), lo.lora_name) for lo in net.unet_loras]
            m.count = len(net.unet_loras) + len(net.text_encoder_loras)
            m.setting = (f'lycoris.kohya.create_network(1.0, {RANK}, {ALPHA}, algo="lora", preset=<attn-mlp without '
                         f'TimestepEmbedding>, bypass_mode={bypass}); apply_to([], unet, False, True)')
        elif name == "peft":
            from peft import LoraConfig, inject_adapter_in_model
            from peft.tuners.lora import LoraLayer

            cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(paths))
            with quiet():
                model = inject_adapter_in_model(cfg, unet)
            model.train()
            m.model = model
            m.params = [p for p in model.parameters() if p.requires_grad]
            m.names = [n for n, mod in model.named_modules() if isinstance(mod, LoraLayer)]
            m.count = len(m.names)
            m.setting = (f"peft.inject_adapter_in_model(LoraConfig(r={RANK}, lora_alpha={ALPHA}, "
                         f"target_modules=<lorakit's {len(paths)} attn-mlp paths>), unet)")
        else:
            raise ValueError(f"unknown method {name}")
        if name != "frozen":
            common.perturb(m.params, seed)  # no adapter sits at its exact zero start
            n = sum(p.numel() for p in m.params)
            m.setting += f"; {len(m.params)} trainable tensors, {n / 1e6:.2f}M parameters"
            if any(p.requires_grad for p in unet.parameters() if id(p) in base_ids):
                m.note = "some U-Net weights require grad"
    except Exception as e:
        m.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        m.model = None
    return m


@dataclass
class Inputs:
    x: torch.Tensor
    t: torch.Tensor
    c: torch.Tensor
    target: torch.Tensor


def make_inputs(size: int, batch: int, seed: int) -> Inputs:
    g = torch.Generator().manual_seed(seed + size)
    x = torch.randn(batch, 4, size, size, generator=g).requires_grad_(True)
    c = torch.randn(batch, 77, 768, generator=g)
    target = torch.randn(batch, 4, size, size, generator=g)
    return Inputs(x, torch.full((batch,), TIMESTEP, dtype=torch.long), c, target)


def step(m: Method, inp: Inputs) -> None:
    y = m.model(inp.x, inp.t, encoder_hidden_states=inp.c).sample
    F.mse_loss(y, inp.target).backward()
    inp.x.grad = None
    for p in m.params:
        p.grad = None


def check_step(m: Method, inp: Inputs) -> None:
    """The warm-up step, checking that the input and every adapter parameter get a gradient."""
    y = m.model(inp.x, inp.t, encoder_hidden_states=inp.c).sample
    if y.shape != inp.target.shape:
        raise RuntimeError(f"output shape {tuple(y.shape)}, expected {tuple(inp.target.shape)}")
    F.mse_loss(y, inp.target).backward()
    missing = sum(p.grad is None for p in m.params)
    if inp.x.grad is None:
        raise RuntimeError("no gradient reached the latents")
    if missing:
        m.note = ((m.note + "; ") if m.note else "") + f"{missing} trainable tensors got no gradient"
    inp.x.grad = None
    for p in m.params:
        p.grad = None


# ----------------------------------------------------------------------------------------------------------------
# Memory: one method, one step, in this (fresh) process

def rss_now() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def import_all() -> None:
    """Every worker imports the same libraries before the U-Net is built, so that totals compare too."""
    with quiet():
        import diffusers  # noqa: F401
        import lorakit  # noqa: F401
        import lorakit.network  # noqa: F401
        import peft  # noqa: F401
        import peft.tuners.lora  # noqa: F401

        try:
            import lycoris  # noqa: F401
            import lycoris.kohya  # noqa: F401
        except Exception:
            pass
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)


def worker(args) -> int:
    """`--worker METHOD --size S`: builds the U-Net, adapts it, runs --mem-steps steps, prints one JSON line."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import_all()
    out: dict[str, Any] = {"method": args.worker, "size": args.size}
    preset_file = None
    try:
        unet = build_unet(args.init, args.seed)
        paths = attn_mlp_paths(unet)  # in every worker (its adapters are built and dropped), before the RSS
        gc.collect()
        out["rss_model"] = rss_now()
        out["peak_build"] = peak_rss()
        base = {t.untyped_storage().data_ptr() for t in (*unet.parameters(), *unet.buffers())}
        if args.worker.startswith("lycoris"):
            preset_file = _write_preset()
        m = setup(args.worker, unet, paths, args.seed, preset_file)
        out.update(count=m.count, error=m.error, note=m.note)
        if m.model is not None:
            out["rss_adapted"] = rss_now()
            inp = make_inputs(args.size, args.batch, args.seed)
            skip = base | {inp.x.untyped_storage().data_ptr(), inp.c.untyped_storage().data_ptr(), 0}
            saved: dict[int, int] = {}

            def pack(t):
                try:
                    s = t.untyped_storage()
                    if s.data_ptr() not in skip:
                        saved[s.data_ptr()] = s.nbytes()
                except Exception:
                    pass
                return t

            times = []
            for i in range(max(1, args.mem_steps)):
                t0 = time.perf_counter()
                if i == 0:
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        y = m.model(inp.x, inp.t, encoder_hidden_states=inp.c).sample
                    F.mse_loss(y, inp.target).backward()
                    del y
                    inp.x.grad = None
                    for p in m.params:
                        p.grad = None
                else:
                    step(m, inp)
                times.append(time.perf_counter() - t0)
            out["saved_bytes"] = sum(saved.values())
            out["step_s"] = times
            out["peak"] = peak_rss()
            out["rss_end"] = rss_now()
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        if preset_file:
            os.unlink(preset_file)
    print(RESULT_TAG + json.dumps(out), flush=True)
    return 0


def _write_preset() -> str:
    fd, path = tempfile.mkstemp(prefix="unet_step_lycoris_", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(LYCORIS_PRESET)
    return path


def run_worker(method: str, size: int, args) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--size", str(size),
           "--threads", str(args.threads), "--seed", str(args.seed), "--init", args.init,
           "--batch", str(args.batch), "--mem-steps", str(args.mem_steps)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            rec = json.loads(line[len(RESULT_TAG):])
            rec["wall_s"] = time.time() - t0
            return rec
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    return {"method": method, "size": size, "error": f"worker exited {proc.returncode}: {tail[0][:200]}"}


# ----------------------------------------------------------------------------------------------------------------
# Reporting

def fmt_s(t: float | None) -> str:
    return "n/a" if t is None else f"{t:.2f}"


def fmt_x(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}"


def fmt_mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / MB:.0f}"


def mem_extra(m: Method) -> int | None:
    mem = m.mem
    if not mem or mem.get("peak") is None or mem.get("rss_model") is None:
        return None
    return mem["peak"] - mem["rss_model"]


def report_size(size: int, methods: dict[str, Method], args, out) -> dict:
    p = lambda s="": print(s, file=out)  # noqa: E731
    b = args.batch
    p(f"### Latents {b}x4x{size}x{size}, encoder states {b}x77x768")
    p()

    def med(m: Method | None) -> float | None:
        return statistics.median(m.times) if m and m.times else None

    frozen_t = med(methods.get("frozen"))
    peft_m = methods.get("peft")
    peft_t = med(peft_m)
    peft_extra = mem_extra(peft_m) if peft_m else None
    if frozen_t is not None:
        p(f"Frozen step (forward + MSE + backward into the latents, which require grad): {frozen_t:.2f} s.")
        p()
    frozen_flops = methods["frozen"].flops if "frozen" in methods else None
    head = ["method", "adapted modules", "s/step", "x frozen", "x peft", "FLOPs x frozen", "peak RSS MB",
            "over model MB", "saved MB", "verdict"]
    p("| " + " | ".join(head) + " |")
    p("|" + "|".join("---" for _ in head) + "|")
    footnotes: list[str] = []
    record: dict[str, Any] = {"frozen_s": frozen_t, "methods": {}}
    busy = [f for m in methods.values() for f in m.foreign]
    noisy = bool(busy) and max(busy) > 0.1  # other processes used >10% of the CPUs during some sample

    def mark(msg: str | None) -> str:
        if not msg:
            return ""
        if msg not in footnotes:
            footnotes.append(msg)
        return f" [{footnotes.index(msg) + 1}]"

    for name, m in methods.items():
        t = med(m)
        rf = t / frozen_t if t is not None and frozen_t else None
        rp = t / peft_t if t is not None and peft_t else None
        extra = mem_extra(m)
        mem = m.mem or {}
        verdict = None
        if name == "lorakit":
            fails, unknown = [], []
            if rf is None:
                unknown.append("time")
            elif rf > TARGET_FROZEN:
                fails.append(f"x frozen {rf:.3f} > {TARGET_FROZEN}")
            if rp is None:
                unknown.append("x peft")
            elif rp > TARGET_PEFT:
                fails.append(f"x peft {rp:.3f} > {TARGET_PEFT}")
            if extra is None or peft_extra is None:
                unknown.append("memory")
            elif extra > peft_extra:
                fails.append(f"peak +{(extra - peft_extra) / MB:.0f} MB over peft's")
            verdict = ("ERROR" if m.error else "FAIL (" + "; ".join(fails) + ")" if fails else "PASS")
            if unknown and not fails and not m.error:
                verdict = "PASS (n/a: " + ", ".join(unknown) + ")"
            if noisy and not m.error:
                verdict += " (noisy)"
        msg = m.error or m.note
        mem_msg = mem.get("error") if mem and mem.get("error") != m.error else None
        cells = [name + mark(msg) + mark(mem_msg and f"memory worker: {mem_msg}"),
                 "-" if m.count is None else str(m.count), fmt_s(t), fmt_x(rf), fmt_x(rp),
                 fmt_x(m.flops / frozen_flops if m.flops is not None and frozen_flops else None),
                 fmt_mib(mem.get("peak")), fmt_mib(extra), fmt_mib(mem.get("saved_bytes")), verdict or "-"]
        p("| " + " | ".join(cells) + " |")
        record["methods"][name] = {
            "count": m.count, "flops": m.flops, "times_s": m.times, "median_s": t, "ratio_frozen": rf, "ratio_peft": rp,
            "foreign_cpu": m.foreign, "page_faults": m.faults, "memory": m.mem, "peak_over_model_bytes": extra,
            "setting": m.setting, "error": m.error, "note": m.note, "verdict": verdict,
        }
    p()
    p(f"Targets for lorakit: <= {TARGET_FROZEN}x the frozen step, <= {TARGET_PEFT}x peft's step, peak RSS over "
      "the model <= peft's.")
    kit = methods.get("lorakit")
    if frozen_flops:
        line = ("FLOPs x frozen: the method's matrix-product FLOPs in its warm-up step (torch's FlopCounterMode; "
                "elementwise passes not counted) over the frozen step's, i.e. its time ratio if every product ran "
                "at the frozen step's speed.")
        if kit and kit.flops and peft_t and frozen_t:
            floor = kit.flops / frozen_flops
            line += (f" At that speed lorakit's step would take {floor:.3f}x the frozen step, "
                     f"{floor * frozen_t / peft_t:.3f}x peft's measured step.")
        p(line)
    if footnotes:
        p("Notes: " + "; ".join(f"[{i + 1}] {s}" for i, s in enumerate(footnotes)) + ".")
    p("Samples (s): " + "; ".join(f"{n} " + ", ".join(f"{t:.2f}" for t in m.times)
                                   for n, m in methods.items() if m.times) + ".")
    p("Minor page faults per step (median): " + "; ".join(f"{n} {statistics.median(m.faults):.0f}"
                                                            for n, m in methods.items() if m.faults) + ".")
    if busy:
        p(f"Other processes used {statistics.median(busy) * 100:.0f}% (median; max {max(busy) * 100:.0f}%) of the "
          f"CPUs during the samples; load average now {common.loadavg()}."
          + (" The times are noisy: rerun on an idle machine or with --wait-idle before acting on a verdict."
             if noisy else ""))
    p()
    p("<details><summary>settings per method</summary>")
    p()
    for name, m in methods.items():
        if m.setting:
            p(f"- {name}: {m.setting}")
    p()
    p("</details>")
    p()
    return record


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="latent sizes, comma-separated (32,64)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated subset of {','.join(METHODS)} (frozen is always run)")
    ap.add_argument("--steps", type=int, default=3, help="timed rounds (the median is reported; default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per method and size (default 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", choices=("fast", "diffusers"), default="fast",
                    help="random weights: fast (one pool of normal samples at torch's default scale, ~1 s) or "
                         "diffusers (its own init, ~10 s per build on 2 cores)")
    ap.add_argument("--no-mem", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--mem-steps", type=int, default=1, help="steps each memory subprocess runs (default 1)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="per size, spend up to SECONDS before rounds waiting for other processes to leave the "
                         "CPUs idle (Linux /proc/stat)")
    ap.add_argument("--allocator", choices=("default", "keep"), default="default",
                    help="default: the C library's own behaviour, as a user's process has it; keep: the timing "
                         "process's glibc keeps freed memory (bench/allocator.py), so steps do not pay a varying "
                         "number of page faults (to tell that noise from the adapters' cost). The memory "
                         "subprocesses always run with the default")
    ap.add_argument("--json", metavar="PATH", help="also write the raw numbers to PATH")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        if args.size is None:
            ap.error("--worker needs --size")
        return worker(args)

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes: integers expected, got {args.sizes!r}")
    if not sizes or any(s <= 0 or s % 8 for s in sizes):
        ap.error("--sizes: positive multiples of 8 (the U-Net downsamples three times)")
    names = [s.strip() for s in args.methods.split(",") if s.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad:
        ap.error(f"unknown method: {', '.join(bad)} (choose from {', '.join(METHODS)})")
    methods = [m for m in METHODS if m in names or m == "frozen"]

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import_all()
    kept = args.allocator == "keep" and keep_freed_memory()
    out = sys.stdout
    info = common.machine()
    try:
        from importlib import metadata

        info["diffusers"] = metadata.version("diffusers")
    except Exception:
        info["diffusers"] = "?"
    started = time.time()
    p = lambda s="": print(s, file=out, flush=True)  # noqa: E731
    log = lambda s: print(f"[unet_step {time.time() - started:5.0f}s] {s}", file=sys.stderr, flush=True)  # noqa
    p("## bench/unet_step.py: one SD1.5 U-Net training step, LoRA rank 16 on attn-mlp, over the frozen step")
    p()
    commit = f", lorakit {info['lorakit_commit']}" if info.get("lorakit_commit") else ""
    p(f"Machine: {info['cpu']} ({info['logical_cpus']} logical CPUs), torch {info['torch']} with "
      f"{args.threads} threads, fp32; diffusers {info['diffusers']}, lycoris-lora {info['lycoris']}, "
      f"peft {info['peft']}, lorakit {info['lorakit']}{commit}, python {info['python']}. "
      f"Load average at start: {common.loadavg()}.")
    p(f"Method: SD1.5 UNet2DConditionModel from lorakit's bundled config, random weights ({args.init} init), fp32, "
      f"frozen, train mode, diffusers' default attention processor (SDPA); batch {args.batch}, timestep "
      f"{TIMESTEP}, random encoder states. One step = forward + MSE to a fixed random target + backward; the "
      "latents require grad in every method (frozen included), so backward runs through the whole U-Net. "
      f"LoRA rank {RANK}, alpha {ALPHA} on kohya's attn-mlp set (Linear and 1x1 conv in the Transformer2DModel "
      f"blocks). Time: median of {args.steps} interleaved rounds after {args.warmup} warm-up step(s), all methods "
      "on copies of one U-Net sharing its weights. Memory: one subprocess per method and size runs "
      f"{args.mem_steps} step(s): peak RSS (ru_maxrss), and the same over the RSS right after the U-Net was built "
      "(= activations, saved tensors, adapters and their grads); saved MB = distinct storages autograd keeps "
      "for backward, without the U-Net weights and the inputs. Allocator of the timing process: "
      + ("glibc told to keep freed memory (no trimming, no per-allocation mappings: bench/allocator.py)" if kept
         else "the C library's default" + (" (--allocator keep: not glibc)" if args.allocator == "keep" else ""))
      + "; the memory subprocesses use the default.")
    p()

    # Memory first, each in its own process, while this one holds no U-Net.
    mems: dict[tuple[int, str], dict] = {}
    if not args.no_mem:
        for size in sizes:
            for name in methods:
                log(f"memory worker {name} @ {size}x{size}")
                mems[(size, name)] = run_worker(name, size, args)
                rec = mems[(size, name)]
                log(f"  peak {fmt_mib(rec.get('peak'))} MB, model {fmt_mib(rec.get('rss_model'))} MB"
                    + (f", error: {rec['error']}" if rec.get("error") else ""))

    # Time: every method on its own copy of one U-Net (shared weights), interleaved.
    log("building the U-Net for timing")
    base = build_unet(args.init, args.seed)
    paths = attn_mlp_paths(base)
    preset_file = _write_preset()
    try:
        built: dict[str, Method] = {}
        for name in methods:
            built[name] = setup(name, base if name == "frozen" else shared_copy(base), paths, args.seed, preset_file)
    finally:
        os.unlink(preset_file)
    ref = set(paths)
    same = []
    for name, m in built.items():
        if name != "frozen" and m.error is None and set(m.names) != ref:
            extra_n, missing_n = len(set(m.names) - ref), len(ref - set(m.names))
            m.note = ((m.note + "; ") if m.note else "") + \
                f"adapts another module set than lorakit ({extra_n} more, {missing_n} missing)"
        elif name != "frozen" and m.error is None:
            same.append(name)
    p(f"Adapted modules: lorakit's attn-mlp selects {len(paths)}; the same module set (checked by path) in: "
      f"{', '.join(same) or 'none'}.")
    p()

    results: dict[str, Any] = {"machine": info, "args": vars(args), "paths": paths, "sizes": {}}
    for size in sizes:
        inp = make_inputs(size, args.batch, args.seed)
        runs = {n: built[n] for n in methods}
        for m in runs.values():
            m.times, m.foreign, m.faults = [], [], []
            m.mem = mems.get((size, m.name))
        live = [m for m in runs.values() if m.model is not None]
        for m in list(live):
            log(f"warm-up {m.name} @ {size}x{size}")
            try:
                m.flops = product_flops(lambda: check_step(m, inp))
                for _ in range(args.warmup - 1):
                    step(m, inp)
            except Exception as e:
                m.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                live.remove(m)
                inp.x.grad = None
        waited = 0.0
        gc.collect()
        gc.disable()
        try:
            for r in range(args.steps):
                waited += common.wait_idle(min(30.0, max(0.0, args.wait_idle - waited)))
                order = live[r % len(live):] + live[:r % len(live)] if live else []
                for m in order:
                    a, f0 = common._busy_seconds(), minor_faults()
                    t0 = time.perf_counter()
                    step(m, inp)
                    wall = time.perf_counter() - t0
                    b = common._busy_seconds()
                    m.times.append(wall)
                    m.faults.append(minor_faults() - f0)
                    if a and b:
                        m.foreign.append(max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / (wall * (os.cpu_count() or 1))))
                log(f"round {r + 1}/{args.steps} @ {size}x{size}: "
                    + ", ".join(f"{m.name} {m.times[-1]:.2f}s" for m in live))
        finally:
            gc.enable()
        results["sizes"][str(size)] = report_size(size, runs, args, out)
        del inp
        gc.collect()

    p(f"Total wall time {time.time() - started:.0f} s; load average at end: {common.loadavg()}.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
