"""Training-step speed and memory of ``lorakit train``: steps/s, peak RSS, and the share of the step spent
outside the U-Net's forward and backward (data, text encoding, noise, loss, optimizer, logging), with cached
latents and a U-Net-only LoRA, for the demo model and an SD1.5-size model (random weights).

    python bench/train_step.py                       # demo:tiny-sd (or a random tiny-sd) and SD1.5 at 512 px
    python bench/train_step.py --models tiny --steps 30

Each model runs in a fresh process (peak RSS is that process's VmHWM). The first ``--warmup`` steps are not
timed (allocator and kernel warm-up). Target: outside share <= 5%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _model_file(kind: str, work: Path) -> tuple[str, int]:
    """(model name or file, image size)."""
    if kind == "tiny":
        from lorakit.models.demo import DEMO_DIR, random_model
        from lorakit.models.save import save_checkpoint

        if (DEMO_DIR / "tiny-sd.safetensors").is_file():
            return "demo:tiny-sd", 64
        path = work / "tiny-sd.safetensors"
        save_checkpoint(random_model("tiny-sd", seed=0), path, dtype=None)
        return str(path), 64
    from load_model import make_file

    path = Path(tempfile.gettempdir()) / "lorakit-bench-sd15-fp16.safetensors"
    if not path.exists():
        make_file("sd15", path, torch.float16)
    return str(path), 512


def child(kind: str, steps: int, warmup: int, batch: int) -> dict:
    from load_model import status_mb
    from lorakit.models.demo_data import write_concept_folder
    from lorakit.train.config import load_train_config
    from lorakit.train.run import train

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-train-"))
    model, size = _model_file(kind, work)
    write_concept_folder(work / "data", n=max(8, batch * 2), repeats=1, size=size)
    base = dict(pretrained_model_name_or_path=model, train_data_dir=str(work / "data"), caption_extension=".txt",
                resolution=str(size), output_dir=str(work / "out"), network_dim=16, network_alpha=16,
                network_args=["preset=attn-mlp"], network_train_unet_only=True, learning_rate=1e-4,
                train_batch_size=batch, cache_latents=True, max_data_loader_n_workers=0, seed=0)
    # the warm-up run's phases are subtracted from the full run's: only steps warmup+1..steps count
    results = []
    for n in (warmup, steps):
        timings: dict = {}
        t0 = time.perf_counter()
        train(load_train_config(overrides=dict(base, max_train_steps=n)), timings=timings)
        results.append((timings, time.perf_counter() - t0))
    (short, _), (full, _) = results
    phase = {k: full.get(k, 0.0) - short.get(k, 0.0) for k in set(full) | set(short)}
    total = sum(phase[k] for k in ("data", "forward", "backward", "optimizer_and_log"))
    inside = phase["unet_forward"] + phase["backward"]
    n = steps - warmup
    return {"model": kind, "size": size, "batch": batch, "steps_timed": n, "s_per_step": total / n,
            "steps_per_s": n / total, "outside_share": 1 - inside / total,
            "phases_s_per_step": {k: round(v / n, 4) for k, v in sorted(phase.items()) if k != "batches"},
            "peak_rss_mb": status_mb("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps + warm-up (default: 40 tiny, 6 sd15)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="default: 8 tiny, 1 sd15")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, steps, warmup, batch = args.child
        print(json.dumps(child(kind, int(steps), int(warmup), int(batch))))
        return
    print(f"{'model':>6} {'px':>4} {'batch':>5} {'s/step':>8} {'steps/s':>8} {'outside U-Net':>14} {'peak RSS MB':>12}")
    for kind in args.models:
        steps = args.steps or (40 if kind == "tiny" else 6)
        batch = args.batch or (8 if kind == "tiny" else 1)
        out = subprocess.run([sys.executable, __file__, "--child", kind, str(steps), str(args.warmup), str(batch)],
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"{kind:>6} {r['size']:>4} {r['batch']:>5} {r['s_per_step']:8.3f} {r['steps_per_s']:8.2f} "
              f"{100 * r['outside_share']:13.1f}% {r['peak_rss_mb']:12.0f}")
        print(f"        per-step phases (s): {r['phases_s_per_step']}")


if __name__ == "__main__":
    main()
