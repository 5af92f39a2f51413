"""What each adapter costs per call, apart from what it costs per position, on the layers of bench/layers.py.

Forward+backward is timed at the shape's positions (N) and at one position, for the adapted layer and the frozen
one, in interleaved rounds (min over rounds: what a step costs when nothing else runs):

    ratio               = adapted(N) / frozen(N)                 (as in bench/layers.py, with min)
    per call            = adapted(1) - frozen(1)                 (dispatch, autograd nodes, per-call products)
    ratio less per call = (adapted(N) - per call) / frozen(N)

The last column is the ratio that would remain if every per-call cost were gone: where it is above a target, cutting
fixed costs (fewer ops, less Python) cannot reach the target by itself; the work per position must shrink too. A
path chosen by position count (a merged weight on many positions) can differ at one position from the one timed at
N, so on long calls "per call" is an estimate (and small against the layer there).

    python bench/per_call.py                                  # every shape and algorithm, lorakit only
    python bench/per_call.py --shapes linear768x320 --impls lorakit,peft
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import layers  # noqa: E402  (bench/layers.py: shapes, settings, how each implementation is built and stepped)


def one_position(xshape: tuple[int, ...], conv: bool) -> tuple[int, ...]:
    """The input shape of a call with one output position: one token, or one pixel of one sample."""
    if conv:
        return (1, xshape[1]) + (1,) * (len(xshape) - 2)
    return (1,) * (len(xshape) - 1) + (xshape[-1],)


def measure_shape(key: str, algos, impls, reps: int, min_time: float, seed: int) -> tuple[list[dict], dict]:
    """(one row per implementation, the frozen layer's best times at N and at one position)."""
    make_layer, xshape, _ = layers.SHAPES[key]
    torch.manual_seed(seed)
    base = make_layer().requires_grad_(False)
    conv = isinstance(base, torch.nn.Conv2d)
    inputs = {}
    for size, shape in (("n", xshape), ("1", one_position(xshape, conv))):
        x = torch.randn(shape, requires_grad=True)
        inputs[size] = (x, torch.randn(base(x).shape))
    runs = [("frozen", None, base, [])]
    for algo in algos:
        for impl in impls:
            v = layers.build(algo, impl, base, seed)
            if v.fn is not None:
                layers.check_runs(v, *inputs["n"])
            if v.fn is not None:
                runs.append((algo, impl, v.fn, v.params))
    inner = {size: {} for size in inputs}
    failed = {}  # run index -> why it cannot take one position (a peer's own limit)
    for i, (_, _, fn, params) in enumerate(runs):
        for size, (x, g) in inputs.items():
            try:
                layers.step(fn, x, g, params)
            except Exception as e:
                if size == "n":
                    raise
                layers.clear_grads(x, params)
                failed[i] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
                continue
            inner[size][i] = layers.steps_per_sample(fn, x, g, params, min_time)
    times = {size: {i: [] for i in range(len(runs))} for size in inputs}
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            for size, (x, g) in inputs.items():
                for i, (_, _, fn, params) in enumerate(runs):
                    if i in inner[size]:
                        layers.step(fn, x, g, params)  # as bench/layers.py: one untimed step of this method first
                        times[size][i].append(layers.time_once(fn, x, g, params, inner[size][i]))
    finally:
        gc.enable()
    best = {size: {i: min(t) for i, t in per.items() if t} for size, per in times.items()}
    rows = []
    for i, (algo, impl, _, _) in enumerate(runs[1:], start=1):
        row = {"algo": algo, "impl": impl, "ratio": best["n"][i] / best["n"][0], "per_call_s": None,
               "less_per_call": None, "why": failed.get(i)}
        if i in best["1"]:
            row["per_call_s"] = per_call = best["1"][i] - best["1"][0]
            row["less_per_call"] = (best["n"][i] - per_call) / best["n"][0]
        rows.append(row)
    return rows, {"frozen_n_s": best["n"][0], "frozen_1_s": best["1"][0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(layers.SHAPES))
    ap.add_argument("--algos", default=",".join(layers.ALGOS))
    ap.add_argument("--impls", default="lorakit", help=f"comma-separated subset of {','.join(layers.IMPLS)}")
    ap.add_argument("--reps", type=int, default=7, help="interleaved rounds (the min is reported)")
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per timed sample")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    shapes = layers.pick_names(ap, args.shapes, layers.SHAPES, "shape")
    algos = layers.pick_names(ap, args.algos, layers.ALGOS, "algo")
    impls = layers.pick_names(ap, args.impls, layers.IMPLS, "implementation")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    info = layers.machine()
    print("## bench/per_call.py: per-call and per-position cost over the frozen layer")
    print()
    print(f"Machine: {info['cpu']} ({info['logical_cpus']} logical CPUs), torch {info['torch']} with "
          f"{args.threads} threads, fp32; lorakit at {info['lorakit_commit']}. Min of {args.reps} interleaved rounds "
          f"(samples >= {args.min_time:g} s). Load average at start: {layers.loadavg()}.")
    print()
    for key in shapes:
        started = time.time()
        rows, frozen = measure_shape(key, algos, impls, args.reps, args.min_time, args.seed)
        print(f"### {layers.SHAPES[key][2]}")
        print()
        print(f"Frozen layer: {frozen['frozen_n_s'] * 1e3:.3f} ms at N positions, "
              f"{frozen['frozen_1_s'] * 1e6:.1f} us at one position.")
        print()
        print("| algo | impl | ratio | per call (us) | ratio less per call | target |")
        print("|---|---|---|---|---|---|")
        notes = []
        for r in rows:
            t = layers.TARGETS.get(r["algo"])
            if r["per_call_s"] is None:
                notes.append(f"{r['algo']} {r['impl']}: no one-position call ({r['why']})")
                call, less = "n/a", "n/a"
            else:
                call, less = f"{r['per_call_s'] * 1e6:.0f}", f"{r['less_per_call']:.2f}"
            print(f"| {r['algo']} | {r['impl']} | {r['ratio']:.2f} | {call} | {less} | {f'<= {t:g}' if t else '-'} |")
        print()
        if notes:
            print("n/a: " + "; ".join(notes) + ".")
            print()
        print(f"({time.time() - started:.0f} s; load average now {layers.loadavg()})")
        print()
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
