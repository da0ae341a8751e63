"""
How fast is it: the training step of each mode, the data pipeline, sampling and the FID Inception. Markdown tables:

    python -m experiments.bench --compare sit,repa,redi,coredi --what train   # the modes side by side (DiT-B/2)
    python -m experiments.bench --compare coredi,coredi+ckpt --what train     # the cost of gradient checkpointing
    python -m experiments.bench --compare redi,redi+cache --what train,data   # redi's features from the latent cache
    python -m experiments.bench --space pixel --model DiT-B/16 --what data,sample,fid
    python -m experiments.bench --space svg --svg-ae results/svg-ae/last.pt --compare sit,repa   # SiT-XL/1 on SVG
    python -m experiments.bench --model DiT-XL/2 --batch 32 --compile --peak-tflops 989   # GPU: MFU against a peak

Training is timed as a user runs it: each variant is a `python train.py` process of its own (the paper preset of
--space, the encoder and the SD-VAE with random weights), one after another, on data written to a temporary
folder: 16 batches of JPEGs of ImageNet's 500x375 and, in latent space, the latent cache that prepare.py makes of
them (+cache variants: one made with prepare.py --features). Each run takes --warmup + --iters steps with
--log-every 1, so every line of its log.jsonl is one step, and a step's time is the batch over that line's
img_per_s: the whole step of train.py's loop (data, noise, encoder, DiT forward and backward, optimizer, EMA, and
the step's log line with z~'s diagnostics). We report the median over the steps after the warm-up; the parts of
the first variant's step (SVG encode, encoder forward, DiT forward and backward, AdamW) are timed apart in this
process. The first variant's last.pt gives the config and EMA weights that the data and sample sections use (a
one-step run when the train section is not asked). FLOPs are analytic, of the networks that the run's config
rebuilds; MFU divides them by a matmul peak measured before each variant and after the last (fp32 on CPU, bf16 on
GPU) or by --peak-tflops.
"""
import argparse
import json
import os
import shlex
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import fid
import model as M
import sample as S
from experiments import run_script
from support.cli import HelpFormatter, UserError, cli, seeded_generator
from support.data import (Flipped, GlobalBatchSampler, ImageFolder, LatentCache, SyntheticImages, cache_reads,
                          runs_encoder)
from support.frozen import VAE, make_encoder
from svg_ae import make_svg_latents

SECTIONS = ("train", "data", "sample", "fid")
SPACES = ("latent", "pixel", "svg")  # train.py's --space; each has its paper --preset
MEMORY_KEY = "max_mem_gib"  # a log.jsonl field of the peak GPU memory, read when train.py writes one
med = lambda xs: float(np.median(xs))


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="DiT-B/2", help="the DiT, as train.py --model")
    p.add_argument("--space", choices=SPACES, default="latent", help="train.py's --space and --preset")
    p.add_argument("--image-size", type=int, default=256, help="image resolution in pixels")
    p.add_argument("--batch", type=int, default=8, help="images per training step, sampling and Inception batch")
    p.add_argument("--compare", default="coredi",
                   help="variants MODE[+repa][+ckpt][+cache],...; the first is sampled. +cache: redi's features read "
                        "from the latent cache (prepare.py --features), no encoder")
    p.add_argument("--what", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (rounds) first")
    p.add_argument("--iters", type=int, default=3, help="timed steps (rounds)")
    p.add_argument("--compile", action="store_true", help="torch.compile each DiT block, as train.py --compile")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="as train.py --precision (GPU)")
    p.add_argument("--enc-weights", choices=["random", "tiny"], default="random", help="tiny: 2 blocks (tests)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the peak for MFU (default: measure a matmul)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: train.py's)")
    p.add_argument("--sample-steps", type=int, default=2, help="time N and 2N steps, extrapolate to the full count")
    p.add_argument("--svg-ae", default=None, help="--space svg: the SVG autoencoder (svg_ae.py's last.pt)")
    opts = p.parse_args(argv)
    opts.what, opts.compare = opts.what.split(","), opts.compare.split(",")
    if set(opts.what) - set(SECTIONS):
        raise UserError(f"--what {','.join(opts.what)}: choose among {', '.join(SECTIONS)}")
    if opts.space == "svg" and opts.svg_ae is None:
        raise UserError("--space svg needs --svg-ae PATH, the SVG autoencoder (svg_ae.py's last.pt)")
    opts.variants = []  # each with its train.py flags, under the paper preset of the space
    for spec in opts.compare:
        mode, *extras = spec.split("+")
        if mode not in M.MODES or set(extras) - {"repa", "ckpt", "cache"}:
            raise UserError(f"variant '{spec}': use MODE[+repa][+ckpt][+cache], MODE one of {', '.join(M.MODES)}")
        if "cache" in extras and (mode != "redi" or opts.space != "latent"):
            raise UserError(f"variant '{spec}': +cache is redi's features from the latent cache (--space latent)")
        flags = ["--preset", opts.space, "--mode", mode, "--model", opts.model, "--image-size", opts.image_size,
                 "--global-batch-size", opts.batch, "--pca-images", opts.batch, "--enc-weights", opts.enc_weights]
        flags += ["--num-workers", opts.workers] * (opts.workers is not None)
        flags += ["--svg-ae", os.path.abspath(opts.svg_ae)] if opts.svg_ae is not None else []
        flags += ["--vae-weights", "random"] * (opts.space == "latent")  # the SD-VAE of the bench's latent cache
        flags += ["--repa"] * ("repa" in extras) + ["--grad-checkpoint"] * ("ckpt" in extras)
        flags += ["--compile"] * opts.compile + ["--precision", opts.precision]
        opts.variants.append(argparse.Namespace(name=spec, flags=[str(f) for f in flags], cached="cache" in extras))
    return opts


# -----------------------------------------------------------------------------
# Analytic FLOPs per image (2 per multiply-add; norms, activations and elementwise ops left out)

def dit_flops(dit):
    """Forward FLOPs per image of a model.DiT, by part. Per-token layers run on N = grid^2 tokens; the conditioning
    (timestep MLP, adaLN) once per image. Attention: scores Q K^T and the weighted sum A V, N^2 * hidden each."""
    D, N, depth, p2 = dit.pos_embed.shape[-1], dit.grid ** 2, len(dit.blocks), dit.patch_size ** 2
    bn, d = dit.x_embedder.bottleneck, dit.feat_dim
    embed = lambda channels: N * p2 * channels * (bn or D)  # the patch embedding's first linear
    macs = {
        "patch embed": embed(dit.in_channels) + N * bn * D,
        "conditioning (t MLP, adaLN)": dit.t_embedder.freq_dim * D + D * D + depth * D * 6 * D + D * 2 * D,
        "qkv + proj": depth * N * 4 * D * D,
        "attention (QK^T, AV)": depth * 2 * N * N * D,
        "MLP": depth * 2 * N * D * dit.blocks[0].mlp.fc1.out_features,
        "final layer": N * D * p2 * dit.in_channels,
        "feature stream": embed(d) + N * D * p2 * d if dit.fusion == "channels" else 2 * N * d * D,  # in + out
        "REPA projector": N * sum(m.in_features * m.out_features for m in dit.projector
                                  if isinstance(m, nn.Linear)) if dit.projector is not None else 0,
    }
    return {k: 2 * v for k, v in macs.items()}


def vit_flops(net):
    """Forward FLOPs per image of a timm ViT (the frozen encoder) at its input size: the patch embedding, then per
    block every Linear over all T tokens (patches + class + register tokens) and attention (2 T^2 * dim)."""
    n_patch = net.patch_embed.num_patches
    T_, macs = n_patch + net.num_prefix_tokens, n_patch * net.patch_embed.proj.weight.numel()
    for blk in net.blocks:
        macs += T_ * sum(m.in_features * m.out_features for m in blk.modules() if isinstance(m, nn.Linear))
        macs += 2 * T_ * T_ * blk.attn.num_heads * blk.attn.head_dim
    return 2 * macs


def now(device):  # a timestamp after the GPU's queued work is done
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def seconds(fn, device):
    t0, _ = now(device), fn()
    return now(device) - t0


def matmul_peak(device, dtype):
    """FLOP/s of n x n x n matmuls sustained over about a second (n = 8192 on GPU, 2048 on CPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    k = max(1, int(1.0 / seconds(lambda: a @ b, device)))
    return k * 2 * n ** 3 / seconds(lambda: [a @ b for _ in range(k)], device)


def report(title, header, rows, note=""):
    lines = ["| " + " | ".join(str(c) for c in row) + " |" for row in [header, ["---"] * len(header)] + rows]
    print(f"\n### {title}\n\n" + "\n".join(lines) + f"\n\n{note}" * bool(note), flush=True)


# -----------------------------------------------------------------------------
# The bench's data and the train.py runs

def make_data(opts, variants, root):
    """16 batches of JPEGs of ImageNet's 500x375 in root/images, one folder per class (synthetic pictures); in
    latent space the latent cache that prepare.py makes of them with the SD-VAE's architecture (random weights) in
    root/cache, and for +cache variants one with redi's features (prepare.py --features) in root/cache-features."""
    n = 16 * opts.batch
    synth = SyntheticImages(n, 128, 10)
    for i, (img, c) in enumerate(map(synth.__getitem__, range(n))):
        os.makedirs(f"{root}/images/c{c}", exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).resize((500, 375), Image.BICUBIC).save(
            f"{root}/images/c{c}/{i:05d}.jpg", quality=90)
    if opts.space != "latent":
        return
    flags = ["--data-path", f"{root}/images", "--image-size", opts.image_size, "--vae-weights", "random",
             "--num-workers", 0, "--flip"]  # the flipped images' latents too: any variant may flip
    if not all(v.cached for v in variants):
        run_script("the bench's latent cache", "prepare.py", flags + ["--out", f"{root}/cache"], quiet=True)
    if any(v.cached for v in variants):  # the encoder and the PCA a redi run with these flags would use
        run_script("the bench's latent cache with features", "prepare.py", flags + [
            "--out", f"{root}/cache-features", "--features", "--enc-weights", opts.enc_weights,
            "--pca-images", opts.batch], quiet=True)


def run_variant(opts, v, root, steps):
    """`python train.py` of variant v for `steps` steps on the bench's data, logging every step. Sets v.dir (its run
    folder), v.args (its config, from last.pt: every flag and the DiT's arch) and v.log (log.jsonl's lines)."""
    data = ["--latent-cache", f"{root}/cache" + "-features" * v.cached] if opts.space == "latent" else \
        ["--data-path", f"{root}/images"]
    run = v.name.replace("+", "_")
    run_script(f"variant '{v.name}'", "train.py", v.flags + data + [
        "--max-steps", steps, "--log-every", 1, "--sample-every", 0, "--ckpt-every", 10 ** 9, "--keep-every", 0,
        "--results-dir", f"{root}/runs", "--run-name", run], quiet=True)
    v.dir = os.path.join(root, "runs", run)
    with open(os.path.join(v.dir, "log.jsonl")) as f:
        v.log = [json.loads(line) for line in f]
    config = torch.load(os.path.join(v.dir, "last.pt"), map_location="cpu", mmap=True, weights_only=True)["config"]
    v.args = argparse.Namespace(**config)


def analytic(v):
    """The DiT's parameters and the training FLOPs per image of variant v (3x the DiT's forward, and the encoder's
    forward when it runs every step), of the networks its config rebuilds, on the meta device (shapes only)."""
    a = v.args
    with torch.device("meta"):
        dit = M.create_model(a.model, **a.arch)
        enc = make_encoder(a) if runs_encoder(a, v.cached) else None
    v.params = sum(p.numel() for p in dit.parameters())
    v.flops = 3 * sum(dit_flops(dit).values()) + (vit_flops(enc.net) if enc is not None else 0)


# -----------------------------------------------------------------------------
# Sections

def bench_train(opts, variants, root, device):
    """Every variant's train.py run, one after another; the table of step times, FLOPs and MFU."""
    cuda, first, steps = device.type == "cuda", variants[0], opts.warmup + opts.iters
    dtype = torch.bfloat16 if cuda else torch.float32  # train.py's precision: bf16 autocast on GPU
    peaks = []

    def measure_peak():
        peaks.append(opts.peak_tflops * 1e12 if opts.peak_tflops else matmul_peak(device, dtype))
        if cuda:
            torch.cuda.empty_cache()  # the matmul's memory goes back to the GPU, for the train.py processes
    for v in variants:
        measure_peak()
        run_variant(opts, v, root, steps)
        timed = [r for r in v.log if r["step"] > opts.warmup]
        if len(timed) != opts.iters:
            raise UserError(f"variant '{v.name}': {len(timed)} log lines after step {opts.warmup} in {v.dir}, "
                            f"expected {opts.iters} (train.py --log-every 1)")
        v.step_s = med([opts.batch / r["img_per_s"] for r in timed])
        mem = [r.get(MEMORY_KEY) for r in timed]
        v.memory = f"{max(mem):.2f}" if all(m is not None for m in mem) else "-"
        analytic(v)
        print(f"bench: {v.name}: {steps} steps of train.py done", file=sys.stderr, flush=True)
    measure_peak()
    peak = med(peaks)
    how = "--peak-tflops" if opts.peak_tflops else \
        f"{str(dtype)[6:]} matmul before each run and after the last: {min(peaks) / 1e9:.0f} to {max(peaks) / 1e9:.0f}"
    report(f"Training step (batch {opts.batch}; peak {peak / 1e9:.0f} GFLOP/s, {how})",
           ["variant", "DiT params (M)", "train GFLOP / image", "ms / step", "images/s", "x first (ratio of medians)",
            "MFU (% of peak)", "memory GiB"],
           [[v.name, f"{v.params / 1e6:.1f}", f"{v.flops / 1e9:.1f}", f"{v.step_s * 1e3:.0f}",
             f"{opts.batch / v.step_s:.3g}", f"{v.step_s / first.step_s:.2f}",
             f"{100 * v.flops * opts.batch / v.step_s / peak:.0f}%", v.memory] for v in variants],
           f"Each variant: a train.py process of its own, {opts.warmup} + {opts.iters} steps with --log-every 1; "
           f"ms / step: the median over its last {opts.iters} steps of the batch over log.jsonl's img_per_s (the "
           f"whole step of train.py's loop, its data loading and per-step log line included). Memory: the peak GPU "
           f"memory of the run where its log records one ({MEMORY_KEY}), else -." +
           (" FLOPs: the DiT's (and REPA's encoder); SVG's encode of the images, every step, is timed in the parts "
            "table but not counted." if opts.space == "svg" else ""))


def bench_parts(opts, v, device):
    """The parts of variant v's step, each timed apart in this process on random inputs of its run's shapes, in
    train.py's precision: SVG's encode of the images (SVG space), the frozen encoder's forward (when the run runs
    it), the DiT's forward and backward (the mean square of its outputs standing in for the losses) and AdamW's
    step over the DiT's weights. Compared with train.py's whole step; the rest is what the parts leave out."""
    a, cuda = v.args, device.type == "cuda"
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and a.precision == "bf16")
    dit = M.create_model(a.model, **a.arch).to(device).train()
    dit.grad_checkpoint = a.grad_checkpoint
    for block in dit.blocks if a.compile else []:  # as train.py --compile: each block, one graph
        block.compile()
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4, betas=(0.9, a.beta2), weight_decay=a.weight_decay,
                            fused=cuda)  # the learning rate does not change the time
    enc = make_encoder(a).to(device) if runs_encoder(a, v.cached) else None
    svg = make_svg_latents(a, device) if a.space == "svg" else None
    g, B = torch.Generator().manual_seed(0), opts.batch
    img = (torch.rand(B, 3, a.image_size, a.image_size, generator=g) * 2 - 1).to(device)
    x = torch.randn(B, dit.in_channels, dit.input_size, dit.input_size, generator=g).to(device)
    t, y = torch.rand(B, generator=g).to(device), torch.randint(0, dit.num_classes, (B,), generator=g).to(device)
    z = torch.randn(B, *dit.z_shape, generator=g).to(device) if dit.feat_dim else None

    def encode(net):
        with torch.no_grad(), amp:
            net(img)

    def forward_backward():
        opt.zero_grad(set_to_none=True)
        with amp:
            outs = dit(x, t, y, z)
        sum(o.float().pow(2).mean() for o in outs if o is not None).backward()

    parts = {"SVG encode": lambda: svg.encode(img)} if svg is not None else {}  # None: not in this run's step
    parts.update({"encoder fwd": (lambda: encode(enc)) if enc is not None else None,
                  "DiT fwd+bwd": forward_backward, "AdamW step": opt.step})
    times = {k: [] for k, fn in parts.items() if fn is not None}
    for rnd in range(opts.warmup + opts.iters):
        for k in times:
            s = seconds(parts[k], device)
            times[k] += [s] * (rnd >= opts.warmup)
    ms, step = {k: med(ts) for k, ts in times.items()}, v.step_s
    share = lambda s: f"{s * 1e3:.0f} ({100 * s / step:.0f}%)"
    report(f"Parts of a {v.name} step, timed apart (ms, median; share of train.py's step)",
           [*parts, "sum of parts", "train.py step", "rest (data, noise, projection, losses, EMA, log)"],
           [[share(ms[k]) if k in ms else "-" for k in parts] + [share(sum(ms.values())), f"{step * 1e3:.0f}",
                                                                  f"{(step - sum(ms.values())) * 1e3:.0f}"]],
           "Each part in this process after the runs, on random inputs of the run's shapes (-: the run has no such "
           "part); the rest is train.py's step less the parts.")


def cache_layouts(opts, d, grid):
    """Bytes per image of prepare.py's latent-cache layouts at this size, from the arrays' shapes and dtypes; d:
    feature channels per token, grid: the encoder's token grid."""
    S_, L = opts.image_size, grid[0] * grid[1]
    moments, images, view = 8 * (S_ // 8) ** 2, S_ * S_ * 3, L * d
    rows = [("(default)", "moments fp32, images", 4 * moments + images, "every mode"),
            ("--features --no-images", "moments fp32, features fp16", 4 * moments + 2 * view, "redi, sit"),
            ("--features --no-images --dtype float16", "moments fp16, features fp16", 2 * moments + 2 * view,
             "redi, sit"),
            ("--features --flip --no-images --dtype float16", "moments fp16 and features fp16, x 2 views",
             4 * moments + 4 * view, "redi --flip, sit (flips)")]
    report(f"Latent cache per image ({S_} px, {L} feature tokens x {d})",
           ["prepare.py flags", "stores", "KB / image", "read by"],
           [[flags, what, f"{b / 1024:.1f}", who] for flags, what, b, who in rows])


def loader(data, a, workers, device):
    """train.py's DataLoader, for one rank."""
    sampler = GlobalBatchSampler(len(data), a.global_batch_size, 0, 1, a.seed, a.flip)
    return iter(torch.utils.data.DataLoader(Flipped(data), batch_sampler=sampler, num_workers=workers,
                                            pin_memory=device.type == "cuda"))


def bench_data(opts, v, device, step_rate):
    """Images/s of variant v's DataLoader alone (its data set, reading what train.py reads), after the batches that
    its workers made while starting."""
    a = v.args
    if a.latent_cache:
        data = LatentCache(a.latent_cache, a.image_size, a.vae_weights)
        data.keys = cache_reads(data, a)  # the arrays train.py reads
    else:
        data = ImageFolder(a.data_path, a.image_size)
    it, k = loader(data, a, a.num_workers, device), max(20, 4 * a.num_workers)
    [next(it) for _ in range(max(1, a.num_workers))]
    rate = k * opts.batch / seconds(lambda: [next(it) for _ in range(k)], device)
    report(f"Data pipeline ({type(data).__name__}, {a.num_workers} workers, {len(data)} images in /tmp)",
           ["loader alone, images/s", f"training step ({v.name}), images/s", "loader / step"],
           [[f"{rate:.0f}", f"{step_rate:.3g}" if step_rate else "(not run)",
             f"{rate / step_rate:.1f}x" if step_rate else "-"]])


def bench_sampling(opts, v, device):
    """sample.generate on variant v's EMA DiT (its last.pt, loaded as sample.py loads it) at N and 2N steps,
    extrapolated linearly to the sampler's full count."""
    model, cfg = S.load_checkpoint(os.path.join(v.dir, "last.pt"), argparse.Namespace(raw=False, mode=None))
    model = model.to(device)
    if cfg["space"] == "latent":
        vae = VAE("random").to(device)  # the SD-VAE architecture
    elif cfg["space"] == "svg":
        vae = S.svg_latents(argparse.Namespace(svg_ae=None, svg_dino_weights=None, svg_stats=None), cfg, model)
        vae = vae.to(device)
    else:
        vae = None
    sampler, bf16 = S.default_sampler(cfg["space"]), device.type == "cuda" and cfg["precision"] == "bf16"
    n = min(opts.sample_steps, sampler["steps"])
    run = lambda steps: seconds(lambda: S.generate(model, range(opts.batch), device, cfg["prediction"], vae=vae,
                                                   sampler=sampler["sampler"], steps=steps, bf16=bf16), device)
    ts = np.array([(run(n), run(2 * n)) for _ in range(opts.warmup + opts.iters)][opts.warmup:])
    per_step = max(med(ts[:, 1]) - med(ts[:, 0]), 0) / n
    total = med(ts[:, 0]) + per_step * (sampler["steps"] - n)
    # An SDE step's noise: sample.draw_noise (counter-based, on the device) against one CPU generator per sample
    # copied to the device, the scheme it replaced, which made the host wait for the copy every step.
    index, gens = torch.arange(opts.batch, device=device), [seeded_generator(0, i) for i in range(opts.batch)]
    shapes = [(model.in_channels, model.input_size, model.input_size), model.z_shape]
    per_sample = lambda: [torch.stack([torch.randn(s, generator=g) for g in gens]).to(device) for s in shapes if s]
    noise = [med([seconds(fn, device) for _ in range(opts.warmup + 5 * opts.iters)][opts.warmup:])
             for fn in (lambda: S.draw_noise(0, index, 2, shapes), per_sample)]
    report(f"Sampling ({v.name}, EMA DiT, sample.generate{', decoder included' if vae else ''})",
           ["sampler", "steps", "batch", "ms / step", "s / batch", "images/s", "SDE noise, ms / step",
            "per-sample CPU generators, ms / step"],
           [[sampler["sampler"], f"{sampler['steps']} (timed {n} and {2 * n})", opts.batch,
             f"{per_step * 1e3:.1f}", f"{total:.2f}", f"{opts.batch / total:.3g}", f"{noise[0] * 1e3:.2f}",
             f"{noise[1] * 1e3:.2f}"]])


def bench_fid(opts, device):
    """fid.activations (uint8 NHWC in, resized to 299 px, true fp32) on fid.py's Inception with random weights."""
    net = fid.InceptionV3().to(device, memory_format=torch.channels_last).eval()
    images = np.random.default_rng(0).integers(0, 256, (opts.batch, opts.image_size, opts.image_size, 3), np.uint8)
    run = lambda: seconds(lambda: fid.activations(images, net, opts.batch, device), device)
    t = med([run() for _ in range(opts.warmup + opts.iters)][opts.warmup:])
    report(f"FID Inception (fid.activations, {opts.image_size} px in)", ["batch", "ms / batch", "images/s"],
           [[opts.batch, f"{t * 1e3:.0f}", f"{opts.batch / t:.3g}"]])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = get_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
    print("```\n" + shlex.join(["python", "-m", "experiments.bench"] + argv) + "\n```\n\n" +
          (torch.cuda.get_device_name() + ", bf16 autocast" if cuda else
           f"CPU, {torch.get_num_threads()} threads, fp32") +
          f"{', torch.compile' if opts.compile else ''}, torch {torch.__version__}; {opts.model}, {opts.space} space, "
          f"{opts.image_size} px; {opts.warmup} warm-up + {opts.iters} timed steps (rounds), medians.", flush=True)
    runs = opts.variants if "train" in opts.what else \
        opts.variants[:1] if {"sample", "data"} & set(opts.what) else []
    with tempfile.TemporaryDirectory(prefix="bench_") as root:
        if runs:
            make_data(opts, runs, root)
        step_rate = None
        if "train" in opts.what:
            bench_train(opts, runs, root, device)
            bench_parts(opts, runs[0], device)
            torch.cuda.empty_cache() if cuda else None
            step_rate = opts.batch / runs[0].step_s
        elif runs:  # the data and sample sections use the first variant's config and EMA weights
            run_variant(opts, runs[0], root, 1)
            print(f"bench: {runs[0].name}: a one-step train.py run for its config and EMA weights", file=sys.stderr)
        if any(v.cached for v in runs):
            with open(f"{root}/cache-features/meta.json") as f:
                features = json.load(f)["features"]
            cache_layouts(opts, features["feat_dim"], features["grid"])
        if "data" in opts.what:
            bench_data(opts, runs[0], device, step_rate)
        if "sample" in opts.what:
            bench_sampling(opts, runs[0], device)
    if "fid" in opts.what:
        bench_fid(opts, device)


if __name__ == "__main__":
    cli(main)
