"""Pre-train the bundled demo models "demo:tiny-sd" and "demo:tiny-sdxl" on CPU.

    python scripts/pretrain_demo.py --models tiny-sd &     # the shipped weights: each model in its own process
    python scripts/pretrain_demo.py --models tiny-sdxl &   # (one thread each; ~49 min wall on 2 cores)
    python scripts/pretrain_demo.py --quick         # a 2-minute smoke run into /tmp, to try settings

Stages (all seeded; the same machine and torch version give the same weights):

1. Data: ``demo_data.pretraining_set`` (coloured shapes on backgrounds, captions such as "a red circle on a
   blue background"), never the held-out colour.
2. VAE (shared by both models), trained on shapes of every palette colour (held-out one included: the codec is
   general, as SD's is; only the U-Net and text encoders never see that colour): reconstruction (MSE + L1), a
   small KL term and a colour term (latent channels 0-2 = each 8x8 cell's mean RGB, as SD's latents roughly
   are: it spread the colours evenly in latent space, magenta from 0.37 to 0.88 from its nearest colour, and cut
   the reconstruction error from 11.2 to 4.3 of 255); then its ``scaling_factor`` is measured as 1 / std of the latents
   over the data set (how SD's 0.18215 was chosen) and written into both models' vae/config.json; then the
   decoder alone is trained further (the encoder, hence the latent space, stays as it is).
3. Each model: text encoders + U-Net trained jointly on the epsilon loss (the SD DDPM schedule), captions
   dropped 10% of the time so that classifier-free guidance works; SDXL gets its time ids (64, 64, 0, 0, 64,
   64) and pooled text embeds. A noise offset (0.2) hides the clean image's colour, which an 8x8 latent's
   per-channel mean otherwise leaks even at t~950, so the colour must come from the caption; min-SNR weighting
   (gamma 5) spends the loss on the noisy steps where colour and layout are decided. Both, with higher learning
   rates (U-Net 2e-3, text 3e-3 instead of 1e-3 each), took tiny-sd's named shape colour from 17% to 65% and
   its background from 15% to 96% at 1600 steps in a side-by-side run (no EMA). Conditioning is ``lorakit.models.text.encode_prompts`` (kohya's), the one the
   trainer uses.
4. Evaluation: samples of seen colours (is the named shape colour / background colour there?) and of the
   held-out colour (``demo_detector.concept_rate``: should be ~0 before any LoRA).
5. ``lorakit.models.save.save_checkpoint`` writes ``<out>/tiny-sd.safetensors`` and ``tiny-sdxl.safetensors``
   in float16.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorakit.models import demo_data  # noqa: E402
from lorakit.models.configs import config_dir  # noqa: E402
from lorakit.models.demo import random_model  # noqa: E402
from lorakit.models.demo_detector import concept_rate, shows_colour  # noqa: E402
from lorakit.models.sample import generate  # noqa: E402
from lorakit.models.text import encode_prompts, tokenize  # noqa: E402

T0 = time.time()


def log(msg: str) -> None:
    # wall time and this process's CPU time (on a shared machine the CPU time is the honest cost)
    print(f"[{time.time() - T0:7.1f}s wall {time.process_time():7.1f}s cpu] {msg}", flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt, step, total, warmup):
    for group in opt.param_groups:
        group["lr"] = lr_at(step, total, group["peak_lr"], warmup)


# --- data ---------------------------------------------------------------------------------------------------
def load_data(n: int, seed: int, samples=None):
    samples = demo_data.pretraining_set(n, seed) if samples is None else samples
    pixels = np.stack([np.asarray(s.image) for s in samples])  # N, H, W, 3 uint8
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, [s.caption for s in samples]


# --- VAE ----------------------------------------------------------------------------------------------------
def train_vae(vae, images, steps: int, batch: int, lr: float, kl_weight: float, crop: int, g: torch.Generator,
              decoder_only: bool = False, colour_weight: float = 0.0):
    """Trained on random ``crop`` x ``crop`` windows: the VAE is convolutional, and a 32x32 window costs a quarter
    of the full image while still holding shape edges and flat colour. ``decoder_only`` keeps the encoder (so the
    latent space, and every U-Net trained on it, stays valid) and trains the decoder alone, as SD's ft-MSE VAE was
    made. ``colour_weight`` pulls the first three latent channels towards each 8x8 cell's mean RGB (see
    ``colour_loss``)."""
    vae.train()
    params = ([*vae.decoder.parameters(), *vae.post_quant_conv.parameters()] if decoder_only
              else list(vae.parameters()))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for group in opt.param_groups:
        group["peak_lr"] = lr
    running, name = 0.0, "vae decoder" if decoder_only else "vae"
    for step in range(steps):
        set_lr(opt, step, steps, warmup=50)
        x = images[torch.randint(len(images), (batch,), generator=g)]
        top, left = (int(v) for v in torch.randint(images.shape[-1] - crop + 1, (2,), generator=g))
        x = x[:, :, top:top + crop, left:left + crop]
        with torch.set_grad_enabled(not decoder_only):
            posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        if not decoder_only:
            loss = loss + kl_weight * posterior.kl().mean() + colour_weight * colour_loss(posterior.mean, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running += loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"{name} step {step + 1}/{steps} loss {running / ((step % 100) + 1):.4f}")
            running = 0.0
    vae.eval()


def colour_loss(latent_mean, x):
    """Latent channels 0-2 as the mean RGB of their 8x8 pixel cell (the fourth channel, and what the three keep
    beside it, carry the edges). SD's own latents are close to such a linear map of colour; without it this VAE
    packed the colours unevenly, with the held-out magenta 0.37-0.47 from blue against a median distance of ~1.9
    between training colours, and LoRA samples of magenta drifted to blue-violet."""
    return F.mse_loss(latent_mean[:, :3], F.avg_pool2d(x, x.shape[-1] // latent_mean.shape[-1]))


def codec_images(n: int, seed: int):
    """The VAE's data: shapes of every palette colour, the held-out one included (the codec is general, as SD's
    is; only the U-Net and the text encoders never see that colour). (Adding n/4 more shapes of the held-out
    colour was tried: its latent moved closer to blue's, 0.47 -> 0.37, and the retrained models were weaker.)"""
    return load_data(0, 0, [demo_data.sample(i, seed + 1, tuple(demo_data.PALETTE)) for i in range(n)])[0]


def finetune_decoder(vae, args) -> None:
    """The second VAE stage, with its own generator so that the U-Net stages draw the same numbers with or
    without it. The first stage's decoder drew the held-out colour poorly (a third of magenta shapes lost the
    detector's colour in a round trip), which capped what any LoRA could show."""
    g = torch.Generator().manual_seed(args.seed + 7)
    images = codec_images(args.images // 2, args.seed)
    before = held_out_round_trip(vae, args.seed)
    train_vae(vae, images, args.decoder_steps, args.vae_batch, args.decoder_lr, 0.0, args.vae_crop, g,
              decoder_only=True)
    log(f"held-out colour kept by a VAE round trip: {before:.2f} -> {held_out_round_trip(vae, args.seed):.2f}")


@torch.no_grad()
def held_out_round_trip(vae, seed: int, n: int = 96) -> float:
    """Share of held-out-colour images whose VAE round trip still shows the colour (demo_detector)."""
    x, _ = load_data(0, 0, demo_data.concept_set(n, seed + 2))
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    pixels = ((recon + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return concept_rate(pixels)


@torch.no_grad()
def encode_all(vae, images, batch: int = 256):
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(images[i:i + batch]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_report(vae, images, scaling: float) -> None:
    x = images[:256]
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    err = ((recon - x).abs() * 127.5).mean().item()
    log(f"vae: mean abs reconstruction error {err:.1f}/255, scaling_factor {scaling:.5f}")
    # how far the held-out colour sits from its nearest training colour in (scaled) latent space
    flat = torch.tensor([demo_data.PALETTE[c] for c in demo_data.PALETTE], dtype=torch.float32) / 127.5 - 1
    z = vae.encode(flat[:, :, None, None].expand(-1, -1, 64, 64)).latent_dist.mean.mean(dim=(2, 3)) * scaling
    names = list(demo_data.PALETTE)
    held = names.index(demo_data.HELD_OUT_COLOUR)
    dist = {c: (z[i] - z[held]).norm().item() for i, c in enumerate(names) if i != held}
    nearest = min(dist, key=dist.get)
    log(f"vae latents: {demo_data.HELD_OUT_COLOUR} is {dist[nearest]:.2f} from {nearest} (median distance "
        f"between training colours {torch.pdist(torch.cat([z[:held], z[held + 1:]])).median().item():.2f})")


def write_scaling_factor(scaling: float) -> None:
    """Store the measured factor in both demo models' vae/config.json (they share the VAE)."""
    for name in ("tiny-sd", "tiny-sdxl"):
        path = config_dir(name) / "vae" / "config.json"
        cfg = json.loads(path.read_text())
        cfg["scaling_factor"] = round(scaling, 5)
        path.write_text(json.dumps(cfg, indent=2) + "\n")


def pretrain_vae(args, images, g: torch.Generator):
    vae = random_model("tiny-sd", args.seed).vae
    train_vae(vae, codec_images(args.images // 2, args.seed), args.vae_steps, args.vae_batch, args.vae_lr,
              args.kl_weight, args.vae_crop, g, colour_weight=args.colour_weight)
    means, stds = encode_all(vae, images)
    scaling = 1.0 / (means + stds * torch.randn(means.shape, generator=g)).std().item()
    vae.register_to_config(scaling_factor=round(scaling, 5))
    return vae, means, stds, scaling


# --- diffusion ----------------------------------------------------------------------------------------------
def train_diffusion(model, means, stds, captions, args, g: torch.Generator, steps: int) -> None:
    unet, encoders = model.unet, model.text_encoders
    scaling = model.vae.config.scaling_factor
    sched = model.noise_scheduler()
    alphas = sched.alphas_cumprod
    # tokenize once: [N, 1, 77] per tokenizer, plus the empty caption (caption dropout)
    ids = [tokenize(tok, captions) for tok in model.tokenizers]
    empty = [tokenize(tok, [""]) for tok in model.tokenizers]
    params = [{"params": list(unet.parameters()), "peak_lr": args.unet_lr, "weight_decay": 1e-2},
              {"params": [p for e in encoders for p in e.parameters()], "peak_lr": args.te_lr, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(params, lr=args.unet_lr)
    ema = copy.deepcopy(unet).requires_grad_(False) if args.ema else None
    ema_te = [copy.deepcopy(e).requires_grad_(False) for e in encoders] if args.ema else None
    unet.train()
    for e in encoders:
        e.train()
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    running, t_start = 0.0, time.time()
    for step in range(steps):
        set_lr(opt, step, steps, warmup=args.warmup)
        idx = torch.randint(len(means), (args.batch,), generator=g)
        drop = torch.rand(args.batch, generator=g) < args.caption_dropout
        batch_ids = [torch.where(drop[:, None, None], e, i[idx]) for i, e in zip(ids, empty)]
        cond = encode_prompts(model, None, input_ids=batch_ids)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scaling
        noise = torch.randn(latents.shape, generator=g)
        if args.noise_offset:
            # 8x8 latents: the noisy latent's per-channel mean leaks the clean colour even at t~950 (SNR ~0.5),
            # a leak that sampling from pure noise does not have; an offset hides it, so colour comes from text
            noise = noise + args.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=g)
        t = torch.randint(0, len(alphas), (args.batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        added = None
        if model.is_sdxl:
            added = {"text_embeds": cond.pooled, "time_ids": time_ids.expand(args.batch, 6)}
        pred = unet(noisy, t, encoder_hidden_states=cond.hidden, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if args.min_snr_gamma:
            snr = alphas[t] / (1 - alphas[t])
            loss = loss * snr.clamp(max=args.min_snr_gamma) / snr  # min-SNR weighting (epsilon target)
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for grp in params for p in grp["params"]], 1.0)
        opt.step()
        if ema is not None:
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for src, dst in zip([unet, *encoders], [ema, *ema_te]):
                    for ps, pd in zip(src.parameters(), dst.parameters()):
                        pd.lerp_(ps, 1 - decay)
        running += loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            rate = (step + 1) / (time.time() - t_start)
            log(f"{model.source} step {step + 1}/{steps} loss {running / ((step % 100) + 1):.4f} ({rate:.2f} it/s)")
            running = 0.0
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps:
            with swapped_in(ema, unet), swapped_in_all(ema_te, encoders):
                metrics, _, _ = evaluate(model, args.eval_samples)
            log(f"{model.source} step {step + 1} eval: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    if ema is not None:
        unet.load_state_dict(ema.state_dict())
        for e, s in zip(encoders, ema_te):
            e.load_state_dict(s.state_dict())
    unet.eval()
    for e in encoders:
        e.eval()


@contextlib.contextmanager
def swapped_in(saved, module):
    """``module`` holds ``saved``'s weights (the EMA, when there is one) in eval mode for the block."""
    backup = copy.deepcopy(module.state_dict()) if saved is not None else None
    if saved is not None:
        module.load_state_dict(saved.state_dict())
    module.eval()
    try:
        yield
    finally:
        if backup is not None:
            module.load_state_dict(backup)
        module.train()


@contextlib.contextmanager
def swapped_in_all(saved, modules):
    with contextlib.ExitStack() as stack:
        for i, module in enumerate(modules):
            stack.enter_context(swapped_in(saved[i] if saved else None, module))
        yield


# --- evaluation ---------------------------------------------------------------------------------------------
def eval_prompts(n: int, seed: int, shape_colours) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        colour = shape_colours[rng.integers(len(shape_colours))]
        bgs = [c for c in demo_data.TRAIN_COLOURS if c != colour]
        out.append((colour, demo_data.SHAPES[rng.integers(len(demo_data.SHAPES))], bgs[rng.integers(len(bgs))]))
    return out


def evaluate(model, n: int, seed: int = 1234, steps: int = 20, guidance: float = 5.0) -> dict[str, float]:
    seen = eval_prompts(n, seed, demo_data.TRAIN_COLOURS)
    images = generate(model, [demo_data.caption(c, s, b) for c, s, b in seen], steps=steps,
                      guidance_scale=guidance, seed=seed)
    shape_ok = [shows_colour(im, c) for im, (c, _, _) in zip(images, seen)]
    bg_ok = [shows_colour(im, b, min_fraction=0.3) for im, (_, _, b) in zip(images, seen)]
    held = eval_prompts(n, seed + 1, (demo_data.HELD_OUT_COLOUR,))
    held_images = generate(model, [demo_data.caption(c, s, b) for c, s, b in held], steps=steps,
                           guidance_scale=guidance, seed=seed)
    return {"seen_shape_colour": float(np.mean(shape_ok)), "seen_background": float(np.mean(bg_ok)),
            "seen_both": float(np.mean([a and b for a, b in zip(shape_ok, bg_ok)])),
            "held_out_rate_on_seen_prompts": concept_rate(images),
            "held_out_rate_on_held_out_prompts": concept_rate(held_images)}, images, held_images


def save_grid(images, path: Path, cols: int = 8) -> None:
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    grid.save(path)


def save(model, out: Path, name: str) -> None:
    from lorakit.models.save import save_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.safetensors"
    save_checkpoint(model, path, dtype=torch.float16)
    log(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB)")


def decoder_into_shipped(args) -> int:
    """Run the decoder stage on the shipped models' VAE (the same in both) and write it back into both files:
    the U-Nets and text encoders stay bit for bit as they are."""
    from lorakit.models.load import load_model

    models = {name: load_model(f"demo:{name}") for name in args.models.split(",")}
    first = next(iter(models.values()))
    vae = copy.deepcopy(first.vae).float()
    for name, model in models.items():
        for key, value in model.vae.state_dict().items():
            if not torch.equal(value, first.vae.state_dict()[key]):
                raise SystemExit(f"{name}'s VAE differs from {next(iter(models))}'s at {key}")
    finetune_decoder(vae, args)
    for name, model in models.items():
        model.vae = copy.deepcopy(vae).to(torch.float16)
        if not args.no_save:
            save(model, args.out, name)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "lorakit" / "models" / "demo")
    p.add_argument("--work", type=Path, default=Path("/tmp/lorakit-pretrain"), help="sample grids, fallbacks")
    p.add_argument("--seed", type=int, default=0)
    # One thread: these layers are so small that a second thread mostly waits at barriers; on a shared 2-core
    # machine 2 threads measured ~9x slower per step than 1 (oversubscription), and barely faster when idle.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-crop", type=int, default=32)
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--colour-weight", type=float, default=4.0, help="weight of the VAE's colour term (0: off)")
    p.add_argument("--decoder-steps", type=int, default=1500, help="second VAE stage: the decoder alone (0: off)")
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    p.add_argument("--decoder-into-shipped", action="store_true",
                   help="only run the decoder stage on the shipped models' VAE and write it back into them")
    p.add_argument("--sd-steps", type=int, default=5000)
    p.add_argument("--sdxl-steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--unet-lr", type=float, default=2e-3)
    p.add_argument("--te-lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--noise-offset", type=float, default=0.2)
    p.add_argument("--min-snr-gamma", type=float, default=5.0, help="0: off")
    p.add_argument("--vae-from", default=None, help="take the VAE from this model (e.g. demo:tiny-sd): no VAE stage")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (0: off)")
    p.add_argument("--eval-samples", type=int, default=48)
    p.add_argument("--eval-every", type=int, default=1000, help="evaluate every N steps too (0: only at the end)")
    p.add_argument("--models", default="tiny-sd,tiny-sdxl")
    p.add_argument("--quick", action="store_true", help="tiny step counts, results into --work only")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.vae_steps, args.sd_steps, args.sdxl_steps, args.eval_samples = 200, 300, 300, 16
        args.images, args.no_save = 2000, True
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    log(f"settings: {vars(args)}")

    if args.decoder_into_shipped:
        return decoder_into_shipped(args)
    images, captions = load_data(args.images, args.seed)
    log(f"data: {len(images)} images, e.g. {captions[:3]}")

    t = time.time()
    if args.vae_from:
        from lorakit.models.load import load_model

        vae = load_model(args.vae_from, dtype=torch.float32).vae
        scaling = vae.config.scaling_factor
        means, stds = encode_all(vae, images)
    else:
        vae, means, stds, scaling = pretrain_vae(args, images, g)
        if not args.no_save:
            write_scaling_factor(scaling)
        if args.decoder_steps:
            finetune_decoder(vae, args)
    vae_report(vae, images, scaling)
    log(f"stage vae: {time.time() - t:.0f}s")

    for name in filter(None, args.models.split(",")):  # --models "": the VAE stage only
        t = time.time()
        model = random_model(name, args.seed)
        model.vae = copy.deepcopy(vae)
        model.source = name
        steps = args.sd_steps if name == "tiny-sd" else args.sdxl_steps
        train_diffusion(model, means, stds, captions, args, g, steps)
        log(f"stage {name} training: {time.time() - t:.0f}s")
        metrics, seen, held = evaluate(model, args.eval_samples)
        log(f"{name} eval: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        save_grid(seen, args.work / f"{name}-seen.png")
        save_grid(held, args.work / f"{name}-held-out.png")
        if not args.no_save:
            save(model, args.out, name)
        log(f"stage {name}: {time.time() - t:.0f}s")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
