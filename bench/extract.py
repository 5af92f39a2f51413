"""Benchmark `lorakit extract` against LyCORIS' extract_linear / extract_conv on an SD1.5-size pair of models.

The pair: a full-size SD1.5 U-Net and text encoder with random weights (base), and tuned = base + per layer a known
change of rank --true-rank (singular values decaying 1 -> 0.1, Frobenius norm --change of the weight's) + dense
noise (--noise of the change's norm). lorakit extracts every layer of the `full` preset at rank --rank (randomized
SVD, its default for fixed ranks). LyCORIS (its functions as `extract_diff` calls them, mode "fixed", no Tucker) runs
on --per-shape layers of every distinct weight shape (all layers with --lycoris-all: hours on 2 cores); lorakit runs
on the same layers again for a like-for-like time, and the full-model LyCORIS time is estimated as sum over layers of
its mean time for that shape. Reconstruction error: ||delta - up @ down||_F per layer, lorakit / LyCORIS.

    python bench/extract.py                       # ~10 min on 2 busy cores
    python bench/extract.py --rank 32 --true-rank 64 --threads 2
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from collections import defaultdict

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_pair(seed: int, true_rank: int, change: float, noise: float):
    from lorakit.models.meta import build_on_meta
    from lorakit.models.model import StableDiffusionModel

    def make():
        unet, tes = build_on_meta("sd15")
        return unet.to_empty(device="cpu"), [t.to_empty(device="cpu") for t in tes]

    g = torch.Generator().manual_seed(seed)
    ub, tb = make()
    ut, tt = make()
    with torch.no_grad():
        for base_root, tuned_root in ((ub, ut), *zip(tb, tt)):
            tuned_mods = dict(tuned_root.named_modules())
            for path, m in base_root.named_modules():
                own = dict(m.named_parameters(recurse=False))
                t = tuned_mods[path]
                for name, p in own.items():
                    q = getattr(t, name)
                    if p.dim() < 2:
                        p.copy_(torch.ones_like(p) if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and name == "weight"
                                else torch.zeros_like(p))
                        q.copy_(p)
                        continue
                    fan_in = p[0].numel()
                    p.normal_(0, 1 / math.sqrt(3 * fan_in), generator=g)
                    q.copy_(p)
                    if not isinstance(m, (nn.Linear, nn.Conv2d)):
                        continue
                    out_dim = p.shape[0]
                    r = min(true_rank, out_dim, fan_in)
                    s = torch.logspace(0, -1, r)
                    a = torch.linalg.qr(torch.randn(out_dim, r, generator=g)).Q * s
                    b = torch.linalg.qr(torch.randn(fan_in, r, generator=g)).Q.mT
                    d = a @ b
                    d *= change * p.norm() / d.norm()
                    n = torch.randn(out_dim, fan_in, generator=g)
                    d += n * (noise * d.norm() / n.norm())
                    q.add_(d.reshape(p.shape))
    kw = dict(kind="sd1", v_parameterization=False, vae=None, tokenizers=[None], scheduler_config={})
    return (StableDiffusionModel(unet=ub, text_encoders=tb, source="random-base", **kw),
            StableDiffusionModel(unet=ut, text_encoders=tt, source="random-tuned", **kw))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16, help="extracted rank, linear and conv (default 16)")
    ap.add_argument("--true-rank", type=int, default=32, help="rank of the known change (default 32)")
    ap.add_argument("--change", type=float, default=0.05, help="|change| / |W| per layer (default 0.05)")
    ap.add_argument("--noise", type=float, default=0.1, help="|noise| / |change| per layer (default 0.1)")
    ap.add_argument("--per-shape", type=int, default=1, help="LyCORIS layers per distinct shape (default 1)")
    ap.add_argument("--lycoris-all", action="store_true", help="run LyCORIS on every layer (very long)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads make LAPACK's SVD "
                         "erratic, up to 100x slower, which would flatter lorakit)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lycoris.utils import extract_conv, extract_linear

    from lorakit.tools.extract import extract_layer, extract_lora

    rss0 = rss_mb()
    t0 = time.perf_counter()
    base, tuned = build_pair(args.seed, args.true_rank, args.change, args.noise)
    print(f"built the SD1.5 pair (U-Net + text encoder, fp32) in {time.perf_counter() - t0:.0f} s; "
          f"RSS {rss_mb():.0f} MB (before: {rss0:.0f} MB)", flush=True)
    rss_models = rss_mb()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = extract_lora(base, tuned, None, linear_dim=args.rank, conv_dim=args.rank, save_dtype=None, seed=args.seed,
                       show_progress=False)
    t_kit_all = time.perf_counter() - t0
    peak_kit = peak_mb()
    n_layers = len(res.layers)
    print(f"lorakit: {n_layers} layers in {t_kit_all:.1f} s; peak RSS {peak_kit:.0f} MB (models {rss_models:.0f} MB, "
          f"so {peak_kit - rss_models:.0f} MB over them); load avg {load0:.1f}", flush=True)

    # every extracted layer, grouped by weight shape
    parts = {"unet": base.unet, "text_encoder": base.text_encoders[0]}
    tparts = {"unet": tuned.unet, "text_encoder": tuned.text_encoders[0]}
    from lorakit.network import create_network

    entries = create_network(base.unet, base.text_encoders, preset="full", dim=1).entries
    by_shape = defaultdict(list)
    for name, e in entries.items():
        by_shape[tuple(parts[e.component].get_submodule(e.path).weight.shape)].append((name, e))
    rows = []
    gen = torch.Generator().manual_seed(args.seed)
    t_lyc_est = t_kit_sample = t_lyc_sample = 0.0
    err_k2 = err_l2 = 0.0
    worst = 0.0
    whole = 0
    for shape, items in sorted(by_shape.items(), key=lambda kv: -math.prod(kv[0])):
        sample = items if args.lycoris_all else items[: args.per_shape]
        tl = tk = shape_err = 0.0
        for name, e in sample:
            w_b = parts[e.component].get_submodule(e.path).weight
            w_t = tparts[e.component].get_submodule(e.path).weight
            delta = (w_t - w_b).detach()
            t0 = time.perf_counter()
            sub, _ = extract_layer(delta, "fixed", args.rank, None, generator=gen)
            tk += time.perf_counter() - t0
            t0 = time.perf_counter()
            got, how = (extract_conv if delta.dim() == 4 else extract_linear)(delta, "fixed", args.rank)
            tl += time.perf_counter() - t0
            if how != "low rank" or "diff" in sub:  # stored whole (rank >= out/2 in LyCORIS, numbers in lorakit)
                whole += 1
                continue
            a, b, _ = got
            flat = delta.flatten(1).double()
            ek = float((flat - sub["lora_up.weight"].flatten(1).double() @ sub["lora_down.weight"].flatten(1).double()).norm())
            el = float((flat - b.flatten(1).double() @ a.flatten(1).double()).norm())
            err_k2 += ek ** 2
            err_l2 += el ** 2
            worst = max(worst, ek / el)
            shape_err = max(shape_err, ek / el)
        t_lyc_sample += tl
        t_kit_sample += tk
        per = tl / len(sample)
        t_lyc_est += per * len(items)
        rows.append((shape, len(items), len(sample), tk / len(sample), per))
        print(f"  {str(shape):24s} x{len(items):3d}  lorakit {tk / len(sample):7.3f} s  lycoris {per:7.2f} s  "
              f"({per / max(tk / len(sample), 1e-9):5.1f}x)  error ratio {shape_err:.5f}", flush=True)
    load1 = os.getloadavg()[0]
    print()
    print(f"| rank {args.rank} (change rank {args.true_rank}, noise {args.noise}) | lorakit | lycoris-lora 4.1.3 | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| sampled layers ({sum(r[2] for r in rows)}, one per shape x {args.per_shape}) | {t_kit_sample:.1f} s | "
          f"{t_lyc_sample:.1f} s | {t_lyc_sample / t_kit_sample:.1f}x faster |")
    print(f"| whole model ({n_layers} layers; lycoris estimated from its per-shape times) | {t_kit_all:.1f} s | "
          f"~{t_lyc_est:.0f} s | ~{t_lyc_est / t_kit_all:.1f}x faster |")
    print(f"| reconstruction error on the sampled layers, sqrt(sum ||.||^2) | ratio {math.sqrt(err_k2 / err_l2):.5f} | "
          f"1 | worst layer {worst:.5f} |")
    if whole:
        print(f"({whole} sampled layer(s) stored whole by one of them, left out of the error)")
    print(f"\nlorakit peak RSS {peak_kit:.0f} MB with both models ({rss_models:.0f} MB) resident: "
          f"{peak_kit - rss_models:.0f} MB over them. threads {args.threads}; load average {load0:.1f} -> {load1:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
