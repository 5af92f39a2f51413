"""Peak memory and time of loading a full-size checkpoint with lorakit.models.load_model.

Writes a random SD1.5-size (or SDXL-size) single-file checkpoint in the LDM/SGM layout once (weights do not
matter for memory), then loads it in a fresh process per dtype and reports peak RSS against the size of the
loaded model: a loader that reads the whole file first would show about 2x.

    python bench/load_model.py --model sd15 --file-dtype fp16 --dtypes fp16 fp32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_file(model: str, path: Path, dtype: torch.dtype) -> None:
    from lorakit.formats.checkpoint_layout import COMPONENT_PREFIXES, to_checkpoint
    from lorakit.formats.safetensors_io import save_file
    from lorakit.models.configs import load_config
    from lorakit.models.meta import component_on_meta, text_encoder_components

    kind = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}[model]
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for component in ["unet", "vae", *text_encoder_components(model)]:
        module = component_on_meta(component, load_config(model, component))
        state = {k: (torch.randn(v.shape, generator=g) * 0.02).to(dtype) for k, v in module.state_dict().items()}
        for key, value in to_checkpoint(kind, component, state, module.config).items():
            tensors[COMPONENT_PREFIXES[kind][component] + key] = value
        del state
    save_file(tensors, path)


def status_mb(field: str) -> float:
    # VmHWM (peak resident) belongs to the process image: unlike ru_maxrss it is not inherited from the
    # parent across fork+exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(path: str, dtype: str) -> dict:
    """Run in a child process: baseline RSS after imports, then peak RSS over the load."""
    import lorakit.models.load as load  # noqa: F401  (imports diffusers/transformers before the baseline)
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    base = status_mb("VmHWM")
    t0 = time.perf_counter()
    model = load.load_model(path, dtype=dtype)
    seconds = time.perf_counter() - t0
    peak = status_mb("VmHWM")
    size = sum(t.numel() * t.element_size() for _, m in model.components() for t in m.state_dict().values()) / 2**20
    return {"dtype": dtype, "seconds": seconds, "baseline_mb": base, "peak_mb": peak, "model_mb": size,
            "over_baseline_per_model": (peak - base) / size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", choices=["sd15", "sd21", "sdxl"])
    parser.add_argument("--file-dtype", default="fp16", choices=["fp16", "fp32"])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "fp32"])
    parser.add_argument("--file", help="reuse (or create) this checkpoint file")
    parser.add_argument("--child", nargs=2, metavar=("FILE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(2)
        print(json.dumps(measure(*args.child)))
        return
    path = Path(args.file or Path(tempfile.gettempdir()) / f"lorakit-bench-{args.model}-{args.file_dtype}.safetensors")
    if not path.exists():
        print(f"writing a random {args.model} checkpoint to {path} ...", flush=True)
        make_file(args.model, path, {"fp16": torch.float16, "fp32": torch.float32}[args.file_dtype])
    print(f"file: {path} ({os.path.getsize(path) / 2**20:.0f} MB, {args.file_dtype})")
    print(f"{'load dtype':>10} {'seconds':>8} {'model MB':>9} {'peak RSS MB':>12} {'baseline MB':>12} "
          f"{'(peak-base)/model':>18}")
    for dtype in args.dtypes:
        out = subprocess.run([sys.executable, __file__, "--child", str(path), dtype], check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"{dtype:>10} {r['seconds']:8.1f} {r['model_mb']:9.0f} {r['peak_mb']:12.0f} {r['baseline_mb']:12.0f} "
              f"{r['over_baseline_per_model']:18.2f}")


if __name__ == "__main__":
    main()
