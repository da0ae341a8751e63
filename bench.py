"""
How fast is it: the training step of each mode, the data pipeline, sampling and the FID Inception. Markdown tables:

    python bench.py --compare sit,repa,redi,coredi --what train      # the modes side by side (DiT-B/2, latent)
    python bench.py --compare coredi,coredi+ckpt --what train        # the cost of gradient checkpointing
    python bench.py --compare redi,redi+cache --what train,data       # redi's features from the latent cache
    python bench.py --space pixel --model DiT-B/16 --what data,sample,fid
    python bench.py --space svg --svg-ae results/svg-ae/last.pt --compare sit,repa    # SiT-XL/1 on the SVG latent
    python bench.py --model DiT-XL/2 --batch 32 --compile --peak-tflops 989   # GPU: MFU against a peak you give

It runs train.py's code (get_args under --preset latent|pixel, make_encoder with random weights, build_networks,
make_optimizer, make_loss, model_input, step_noise), sample.generate and fid.py. Variants run in interleaved rounds,
so a shared machine's slow phases hit all alike; we report medians. MFU: analytic FLOPs over a measured matmul
peak (fp32 on CPU, bf16 on GPU) or --peak-tflops.
"""
import argparse
import json
import os
import resource
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
import train as T

SECTIONS = ("train", "data", "sample", "fid")
med = lambda xs: float(np.median(xs))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=M.HelpFormatter)
    p.add_argument("--model", default="DiT-B/2", help="the DiT, as train.py --model")
    p.add_argument("--space", choices=list(T.SPACES), default="latent", help="train.py's --space and --preset")
    p.add_argument("--image-size", type=int, default=256, help="image resolution in pixels")
    p.add_argument("--batch", type=int, default=8, help="images per training step, sampling and Inception batch")
    p.add_argument("--compare", default="coredi",
                   help="variants MODE[+repa][+ckpt][+cache],...; the first is sampled. +cache: redi's features read "
                        "from the latent cache (prepare.py --features), no encoder")
    p.add_argument("--what", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--iters", type=int, default=3, help="timed rounds")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss, as train.py --compile")
    p.add_argument("--enc-weights", choices=["random", "tiny"], default="random", help="tiny: 2 blocks (tests)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the peak for MFU (default: measure a matmul)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: train.py's)")
    p.add_argument("--sample-steps", type=int, default=2, help="time N and 2N steps, extrapolate to the full count")
    p.add_argument("--svg-ae", default=None, help="--space svg: the SVG autoencoder (svg_ae.py's last.pt)")
    opts = p.parse_args(argv)
    opts.what, opts.compare = opts.what.split(","), opts.compare.split(",")
    if set(opts.what) - set(SECTIONS):
        raise M.UserError(f"--what {','.join(opts.what)}: choose among {', '.join(SECTIONS)}")
    opts.train_args = []  # train.get_args of each variant, under the paper preset of the space
    for spec in opts.compare:
        mode, *extras = spec.split("+")
        if mode not in M.MODES or set(extras) - {"repa", "ckpt", "cache"}:
            raise M.UserError(f"variant '{spec}': use MODE[+repa][+ckpt][+cache], MODE one of {', '.join(M.MODES)}")
        if "cache" in extras and (mode != "redi" or opts.space != "latent"):
            raise M.UserError(f"variant '{spec}': +cache is redi's features from the latent cache (--space latent)")
        argv = ["--preset", opts.space, "--mode", mode, "--model", opts.model, "--image-size", str(opts.image_size),
                "--global-batch-size", str(opts.batch), "--pca-images", str(opts.batch), "--enc-weights",
                opts.enc_weights] + ["--num-workers", str(opts.workers)] * (opts.workers is not None)
        argv += ["--svg-ae", opts.svg_ae] * (opts.svg_ae is not None)
        argv += ["--repa"] * ("repa" in extras) + ["--grad-checkpoint"] * ("ckpt" in extras) + ["--compile"] * opts.compile
        opts.train_args.append(argparse.Namespace(**vars(T.get_args(argv)), name=spec, cached="cache" in extras))
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


def build(a, device, encoders):
    """A variant as train.main builds it; the frozen encoders, by name, are shared by the variants. A +cache variant
    runs no encoder (it fits the PCA and gives the features' shape only)."""
    use_enc = T.runs_encoder(a)  # the encoder also fits the PCA and gives the features' shape of a +cache variant
    if use_enc and a.enc not in encoders:
        encoders[a.enc] = T.make_encoder(a).to(device)
    frozen = encoders[a.enc] if use_enc else None
    enc = frozen if T.runs_encoder(a, a.cached) else None
    if a.space == "svg" and "svg" not in encoders:  # SVG's frozen autoencoder encodes the images every step
        encoders["svg"] = T.make_svg_latents(a, device)
    svg = encoders.get("svg") if a.space == "svg" else None
    latent_shape = (len(svg.mean), svg.ae.dino.grid[0]) if svg is not None else None
    dit, ema, proj, arch = T.build_networks(a, frozen.dim if frozen else 0, latent_shape)
    v = argparse.Namespace(args=a, encoder=enc, dit=dit.to(device), ema=ema.to(device), step=0, vae=svg,
                           proj=proj.to(device) if proj is not None else None)
    v.opt = T.make_optimizer(v.dit, v.proj, a, fused=device.type == "cuda")
    v.loss = (torch.compile if a.compile else lambda m: m)(T.make_loss(v.dit, v.proj, frozen and frozen.grid, a))
    v.x_shape = (arch["in_channels"], arch["input_size"], arch["input_size"])
    v.z_shape = dit.z_shape
    v.flops = 3 * sum(dit_flops(dit).values()) + (vit_flops(enc.net) if enc else 0)
    v.state_bytes = sum(t.nbytes for t in [  # resident between steps: weights, EMA, P, encoder, AdamW's moments
        *dit.parameters(), *ema.parameters(), *(proj.state_dict().values() if proj else []),
        *(enc.parameters() if enc else []), *(svg.parameters() if svg is not None else []),
        *[p for g in v.opt.param_groups for p in g["params"]] * 2])
    return v


def train_step(v, batch, device):
    """One step of train.main's loop without logging and checkpoints; returns [(phase, end time)]."""
    a, marks = v.args, [("start", now(device))]
    mark = lambda name: marks.append((name, now(device)))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and a.precision == "bf16")
    noise = T.step_noise(a.seed, v.step, range(a.global_batch_size), v.x_shape, v.z_shape,
                         v.x_shape if a.space == "latent" else None, a.space, a.label_drop, a.feat_drop, device)
    x, img, zt, y = T.model_input(batch, device, v.vae, noise.eps_vae, amp)
    mark("data + noise" + " + SVG encode" * (a.space == "svg"))
    with amp:
        z0 = v.encoder(img) if v.encoder is not None else None
        mark("encoder fwd")
        loss, _ = v.loss(x, y, z0, noise, zt=zt if a.cached else None)
    T.warmup_lr(v.opt, v.step, a.warmup_steps)
    v.opt.zero_grad(set_to_none=True)
    loss.backward()
    mark("DiT fwd+bwd (losses, projection)")
    nn.utils.clip_grad_norm_([p for g in v.opt.param_groups for p in g["params"]], a.grad_clip or float("inf"))
    v.opt.step()
    T.update_ema(v.ema, v.dit, a.ema)
    mark("optimizer + EMA")
    v.step += 1
    return marks


def bench_train(opts, variants, batch, device):
    """Every variant once per round on one in-memory batch; returns the first variant's images/s."""
    cuda, first = device.type == "cuda", next(iter(variants))
    dtype = torch.bfloat16 if cuda else torch.float32  # train.py's precision: bf16 autocast on GPU
    times, mem, peaks = {s: [] for s in variants}, dict.fromkeys(variants, 0), []
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for rnd in range(opts.warmup + opts.iters):
        peaks.append(opts.peak_tflops * 1e12 if opts.peak_tflops else matmul_peak(device, dtype))
        for name, v in variants.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device) - v.state_bytes if cuda else rss()
            marks = train_step(v, batch, device)
            if not cuda or rnd >= opts.warmup:  # GPU: after the optimizer's state exists; CPU: the first step counts
                mem[name] = max(mem[name], (torch.cuda.max_memory_allocated(device) if cuda else rss()) - before)
            times[name] += [marks] * (rnd >= opts.warmup)
        print(f"bench: round {rnd + 1} of {opts.warmup + opts.iters} done", file=sys.stderr, flush=True)
    peak, step = med(peaks), {s: med([m[-1][1] - m[0][1] for m in times[s]]) for s in variants}
    how = "--peak-tflops" if opts.peak_tflops else \
        f"{str(dtype)[6:]} matmul, median of {min(peaks) / 1e9:.0f} to {max(peaks) / 1e9:.0f}"
    report(f"Training step (batch {opts.batch}; peak {peak / 1e9:.0f} GFLOP/s, {how})",
           ["variant", "DiT params (M)", "train GFLOP / image", "ms / step", "images/s", "x first (ratio of medians)",
            "MFU (% of peak)", "memory GiB"],
           [[s, f"{sum(p.numel() for p in v.dit.parameters()) / 1e6:.1f}", f"{v.flops / 1e9:.1f}",
             f"{step[s] * 1e3:.0f}", f"{opts.batch / step[s]:.3g}", f"{step[s] / step[first]:.2f}",
             f"{100 * v.flops * opts.batch / step[s] / peak:.0f}%", f"{mem[s] / 2 ** 30:.2f}"]
            for s, v in variants.items()],
           "Memory: " + ("the step's peak, less what the other variants hold." if cuda else
                         "growth of the process's peak RSS in the variant's steps (depends on the order).") +
           (" FLOPs: the DiT's (and REPA's encoder); SVG's encode of the images, every step, is timed in the cost "
            "split's first phase but not counted." if opts.space == "svg" else ""))
    ph = [med([m[k][1] - m[k - 1][1] for m in times[first]]) for k in range(1, len(times[first][0]))]
    report(f"Cost split of a {first} step (ms, median, share)", [p for p, _ in times[first][0][1:]] + ["sum"],
           [[f"{t * 1e3:.0f} ({100 * t / sum(ph):.0f}%)" for t in ph] + [f"{sum(ph) * 1e3:.0f}"]])
    return opts.batch / step[first]


def make_data(opts, a, root, encoder=None):
    """16 batches in /tmp for train.py: a latent cache (prepare.py's files, random; with redi's features when an
    encoder gives their shape) or JPEGs of ImageNet's 500x375."""
    n, S_, rng = 16 * opts.batch, opts.image_size, np.random.default_rng(0)
    if opts.space == "latent":
        moments = rng.standard_normal((n, 8, S_ // 8, S_ // 8), np.float32)
        moments[:, 4:] = -6  # the log-variance: samples close to the mean
        np.save(f"{root}/moments.npy", moments)
        np.save(f"{root}/images.npy", rng.integers(0, 256, (n, S_, S_, 3), np.uint8))
        np.save(f"{root}/labels.npy", np.arange(n, dtype=np.int64) % 10)
        meta = {"image_size": S_, "vae": a.vae_weights, "num_images": n, "num_classes": 10}
        if encoder is not None:
            L = encoder.grid[0] * encoder.grid[1]
            np.save(f"{root}/features.npy", rng.standard_normal((n, 1, L, a.feat_dim)).astype(np.float16))
            meta["features"] = {"grid": list(encoder.grid), "feat_dim": a.feat_dim, "views": 1}
        with open(f"{root}/meta.json", "w") as f:
            json.dump(meta, f)
        data = T.LatentCache(root, S_, a.vae_weights)
        data.keys = list(data.arrays)  # one batch serves every variant; each takes what it reads
        return data
    synth = T.SyntheticImages(n, 128, 10)
    for i, (img, c) in enumerate(map(synth.__getitem__, range(n))):
        os.makedirs(f"{root}/c{c}", exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).resize((500, 375), Image.BICUBIC).save(
            f"{root}/c{c}/{i:05d}.jpg", quality=90)
    return T.ImageFolder(root, S_)


def cache_layouts(opts, a, grid):
    """Bytes per image of prepare.py's latent-cache layouts at this size, from the arrays' shapes and dtypes."""
    S_, L, d = opts.image_size, grid[0] * grid[1], a.feat_dim
    moments, images, view = 8 * (S_ // 8) ** 2, S_ * S_ * 3, L * d
    rows = [("(default)", "moments fp32, images", 4 * moments + images, "every mode"),
            ("--features --no-images", "moments fp32, features fp16", 4 * moments + 2 * view, "redi, sit"),
            ("--features --no-images --dtype float16", "moments fp16, features fp16", 2 * moments + 2 * view,
             "redi, sit"),
            ("--features --flip --no-images --dtype float16", "moments fp16, features fp16 x 2 views",
             2 * moments + 4 * view, "redi --flip, sit")]
    report(f"Latent cache per image ({S_} px, {L} feature tokens x {d})",
           ["prepare.py flags", "stores", "KB / image", "read by"],
           [[flags, what, f"{b / 1024:.1f}", who] for flags, what, b, who in rows])


def loader(data, a, workers, device):
    """train.main's DataLoader, for one rank."""
    sampler = T.GlobalBatchSampler(len(data), a.global_batch_size, 0, 1, a.seed, a.flip)
    return iter(torch.utils.data.DataLoader(T.Flipped(data), batch_sampler=sampler, num_workers=workers,
                                            pin_memory=device.type == "cuda"))


def bench_data(opts, a, data, device, step_rate):
    """Images/s of the DataLoader alone, after the batches that its workers made while starting."""
    it, k = loader(data, a, a.num_workers, device), max(20, 4 * a.num_workers)
    [next(it) for _ in range(max(1, a.num_workers))]
    rate = k * opts.batch / seconds(lambda: [next(it) for _ in range(k)], device)
    report(f"Data pipeline (train.{type(data).__name__}, {a.num_workers} workers, {len(data)} images in /tmp)",
           ["loader alone, images/s", f"training step ({a.name}), images/s", "loader / step"],
           [[f"{rate:.0f}", f"{step_rate:.3g}" if step_rate else "(not run)",
             f"{rate / step_rate:.1f}x" if step_rate else "-"]])


def bench_sampling(opts, v, device):
    """sample.generate on the EMA DiT at N and 2N steps, extrapolated linearly to the sampler's full count."""
    a, vae = v.args, M.VAE("random").to(device) if v.args.space == "latent" else v.vae  # the SD-VAE architecture
    cfg, bf16 = S.default_sampler(a.space), device.type == "cuda" and a.precision == "bf16"
    n = min(opts.sample_steps, cfg["steps"])
    run = lambda steps: seconds(lambda: S.generate(v.ema, range(opts.batch), device, a.prediction, vae=vae,
                                                   sampler=cfg["sampler"], steps=steps, bf16=bf16), device)
    ts = np.array([(run(n), run(2 * n)) for _ in range(opts.warmup + opts.iters)][opts.warmup:])
    per_step = max(med(ts[:, 1]) - med(ts[:, 0]), 0) / n
    total = med(ts[:, 0]) + per_step * (cfg["steps"] - n)
    report(f"Sampling ({a.name}, EMA DiT, sample.generate{', decoder included' if vae else ''})",
           ["sampler", "steps", "batch", "ms / step", "s / batch", "images/s"],
           [[cfg["sampler"], f"{cfg['steps']} (timed {n} and {2 * n})", opts.batch, f"{per_step * 1e3:.1f}",
             f"{total:.2f}", f"{opts.batch / total:.3g}"]])


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
    print("```\npython " + shlex.join(["bench.py"] + argv) + "\n```\n\n" +
          (torch.cuda.get_device_name() + ", bf16 autocast" if cuda else f"CPU, {torch.get_num_threads()} threads, fp32") +
          f"{', torch.compile' if opts.compile else ''}, torch {torch.__version__}; {opts.model}, {opts.space} space, "
          f"{opts.image_size} px; {opts.warmup} warm-up + {opts.iters} timed rounds, medians.", flush=True)
    specs = opts.train_args if "train" in opts.what else \
        opts.train_args[:1] if {"sample", "data"} & set(opts.what) else []
    with tempfile.TemporaryDirectory(prefix="bench_") as root:
        variants, encoders = {}, {}
        for a in specs:
            variants[a.name] = build(a, device, encoders)
        first = opts.train_args[0]
        data = make_data(opts, first, root, encoders.get(first.enc))
        for a in specs:  # train.fit_projection's PCA on --pca-images (one batch); rank 1: no message
            if variants[a.name].proj is not None:
                T.fit_projection(variants[a.name].proj, data, encoders[a.enc], a, device, rank=1)
        batch = next(loader(data, first, 0, device))
        step_rate = bench_train(opts, variants, batch, device) if "train" in opts.what else None
        if any(a.cached for a in specs):
            cache_layouts(opts, first, encoders[first.enc].grid)
        if "data" in opts.what:
            if isinstance(data, T.LatentCache):  # what the first variant reads, as train.use_cache chooses
                data.keys = ["latent"] + ["image"] * T.runs_encoder(first, first.cached) + ["features"] * first.cached
            bench_data(opts, first, data, device, step_rate)
    if "sample" in opts.what:
        bench_sampling(opts, variants[opts.compare[0]], device)
    if "fid" in opts.what:
        bench_fid(opts, device)


if __name__ == "__main__":
    M.cli(main)
