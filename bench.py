"""
How fast is it: training step, data pipeline, samplers and the FID Inception, for one model, space, batch and
device. Prints Markdown tables (for the README's Speed section) under the exact command line.

    python bench.py                                             # DiT-B/2, latent, coredi: every section
    python bench.py --compare sit,repa,coredi --what train      # the modes side by side, ratios to the first
    python bench.py --compare coredi,coredi+ckpt --what train   # the cost of gradient checkpointing
    python bench.py --model DiT-XL/2 --batch 32 --compile       # GPU: bf16 autocast + torch.compile

What runs is the repo's own code, built as train.py builds it: train.get_args for the recipe, train.make_encoder
(the real DINOv2-B/14 architecture with random weights; timing does not depend on the weights), model.DiT,
model.FeatureProjection fitted to a PCA, train.JointLoss, train.step_noise, AdamW, clipping and the EMA; the data
pipeline is train.LatentCache (latent space) or train.ImageFolder of JPEGs (pixel space) behind train.Flipped,
train.GlobalBatchSampler and a DataLoader with train.py's default workers, on small files written to /tmp;
sampling is sample.generate with sample.default_sampler; FID is fid.py's input path and Inception.

Timing: --warmup rounds, then --iters rounds; in every round each variant runs once, so the slow phases of a
shared machine hit all of them alike. We report medians, and ratios as the median of the per-round ratios.
FLOPs are analytic (matmuls, attention included, 2 per multiply-add): a training step counts 3x the DiT's forward
(forward + backward; recomputation under --grad-checkpoint is not useful work) and 1x the frozen encoder's.
The peak is, on CPU, the fp32 matmul throughput sustained over about a second right before each step (each step's
share of peak uses its own), on H100/H200 the data sheet's dense bf16 (or TF32) peak.
"""
import argparse
import contextlib
import json
import math
import os
import resource
import shlex
import sys
import tempfile
import time
from copy import deepcopy

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import fid
import model as M
import sample as S
import train as T

VARIANT_HELP = "MODE[+repa][+ckpt], e.g. coredi, coredi+repa (REPA on top), coredi+ckpt (gradient checkpointing)"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-B/2")
    p.add_argument("--mode", default="coredi", help=f"the variant of the data and sampling sections: {VARIANT_HELP}")
    p.add_argument("--compare", default=None, help="comma-separated variants timed side by side (default: --mode)")
    p.add_argument("--space", choices=["latent", "pixel"], default="latent")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8, help="training images per step on this device")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast on GPU; CPU is fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss module, as train.py --compile")
    p.add_argument("--grad-checkpoint", action="store_true", help="for every variant (or add +ckpt to one)")
    p.add_argument("--enc-weights", choices=["random", "tiny"], default="random",
                   help="random: DINOv2-B/14's architecture; tiny: the demo's 2-block encoder (tests)")
    p.add_argument("--enc-size", type=int, default=224)
    p.add_argument("--what", default="train,data,sample,fid", help="sections: train, data, sample, fid")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--iters", type=int, default=3, help="timed rounds")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--peak-size", type=int, default=None, help="n of the n^3 peak matmul (default 2048 CPU, 8192 GPU)")
    # data
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: train.py's)")
    p.add_argument("--data-images", type=int, default=256, help="images in the /tmp latent cache or image folder")
    # sampling
    p.add_argument("--samplers", default=None,
                   help="SAMPLER:STEPS,... e.g. sde:250,heun:50 (default: sample.py's default for the space)")
    p.add_argument("--sample-steps", type=int, default=2,
                   help="run this many steps and scale to the full count by the time per model evaluation "
                        "(0: run the full count)")
    p.add_argument("--sample-batch", type=int, default=None, help="default: --batch on GPU, 2 on CPU")
    # fid
    p.add_argument("--fid-batch", type=int, default=None, help="default: 50 on GPU, 16 on CPU")
    args = p.parse_args(argv)
    args.what = [w for w in args.what.split(",") if w]
    if set(args.what) - {"train", "data", "sample", "fid"}:
        raise M.UserError(f"--what {','.join(args.what)}: choose among train, data, sample, fid")
    args.compare = args.compare.split(",") if args.compare else [args.mode]
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        raise M.UserError("--batch and --iters must be positive, --warmup non-negative")
    cuda = M.check_device(args.device).type == "cuda"
    args.sample_batch = args.sample_batch or (args.batch if cuda else 2)
    args.fid_batch = args.fid_batch or (50 if cuda else 16)
    args.peak_size = args.peak_size or (8192 if cuda else 2048)
    return args


# -----------------------------------------------------------------------------
# Analytic FLOPs per image (2 per multiply-add; norms, activations and elementwise ops are left out: they are few
# FLOPs, though not little time)

def dit_flops(dit):
    """Forward FLOPs per image of a model.DiT, by part. Per-token layers run on N = grid^2 tokens; the conditioning
    (timestep MLP, adaLN) runs once per image. Attention: scores Q K^T and the weighted sum A V, N^2 * hidden each."""
    D, N, depth = dit.pos_embed.shape[-1], dit.grid ** 2, len(dit.blocks)
    patch_in = dit.patch_size ** 2 * dit.in_channels
    mlp = dit.blocks[0].mlp.fc1.out_features
    bn = dit.x_embedder.bottleneck
    macs = {
        "patch embed": N * (patch_in * bn + bn * D if bn else patch_in * D),
        "conditioning (t MLP, adaLN)": dit.t_embedder.freq_dim * D + D * D + depth * D * 6 * D + D * 2 * D,
        "qkv + proj": depth * N * 4 * D * D,
        "attention (QK^T, AV)": depth * 2 * N * N * D,
        "MLP": depth * 2 * N * D * mlp,
        "final layer": N * D * patch_in,
        "feature stream": 2 * N * dit.feat_dim * D,  # z_embedder in, linear_z out
        "REPA projector": N * sum(m.in_features * m.out_features for m in dit.projector
                                  if isinstance(m, nn.Linear)) if dit.projector is not None else 0,
    }
    return {k: 2 * v for k, v in macs.items()}


def vit_flops(net):
    """Forward FLOPs per image of a timm ViT (the frozen encoder) at its input size: the patch embedding, then per
    block every Linear over all T tokens (patches + class + register tokens) and attention (2 T^2 * dim)."""
    conv, n_patch = net.patch_embed.proj, net.patch_embed.num_patches
    T_ = n_patch + net.num_prefix_tokens
    macs = n_patch * conv.in_channels * math.prod(conv.kernel_size) * conv.out_channels
    for blk in net.blocks:
        macs += T_ * sum(m.in_features * m.out_features for m in blk.modules() if isinstance(m, nn.Linear))
        macs += 2 * T_ * T_ * blk.attn.num_heads * blk.attn.head_dim
    return 2 * macs


# -----------------------------------------------------------------------------
# Clocks and peaks

class Clock:
    """Named timestamps; on GPU each one waits for the device, so a timestamp means the work before it is done."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.t = {}

    def mark(self, name, once=False):
        if once and name in self.t:
            return
        if self.cuda:
            torch.cuda.synchronize()
        self.t[name] = time.perf_counter()


def datasheet_peak(device, precision):
    """Dense bf16 tensor-core FLOP/s from Nvidia's data sheets (TF32 is half); None for other devices."""
    name = torch.cuda.get_device_name(device)
    for key, bf16 in (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12)):
        if key in name:
            return bf16 if precision == "bf16" else bf16 / 2
    return None


class MatmulPeak:
    """Sustained n x n x n matmul throughput over about a second, measured right before each step it is compared
    with: on a shared machine a single short matmul can land in a quiet moment that a step of seconds does not see."""

    def __init__(self, device, dtype, n):
        g = torch.Generator(device).manual_seed(0)
        self.a, self.b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
        self.device, self.flops = device, 2 * n ** 3

    def measure(self, seconds=1.0):
        c, n = Clock(self.device), 0
        self.a @ self.b  # warm
        c.mark("0")
        while n < 3 or time.perf_counter() - c.t["0"] < seconds:
            self.a @ self.b
            n += 1
            if self.device.type == "cuda" and n % 10 == 0:
                torch.cuda.synchronize()
        c.mark("1")
        return n * self.flops / (c.t["1"] - c.t["0"])


# -----------------------------------------------------------------------------
# One training configuration, built as train.main builds it, and its step

class Variant:
    def __init__(self, spec, opts, device, encoders):
        mode, *extras = spec.split("+")
        if mode not in ("sit", "repa", "redi", "coredi") or set(extras) - {"repa", "ckpt"}:
            raise M.UserError(f"variant '{spec}': use {VARIANT_HELP}")
        self.name, self.device, self.B = spec, device, opts.batch
        argv = ["--mode", mode, "--space", opts.space, "--model", opts.model, "--image-size", str(opts.image_size),
                "--num-classes", str(opts.num_classes), "--global-batch-size", str(opts.batch),
                "--enc-weights", opts.enc_weights, "--enc-size", str(opts.enc_size), "--precision", opts.precision]
        # a data flag keeps get_args from applying the demo preset; the folder is never opened (main() would)
        argv += ["--latent-cache" if opts.space == "latent" else "--data-path", "(bench)"]
        argv += ["--repa"] * ("repa" in extras) + ["--grad-checkpoint"] * ("ckpt" in extras or opts.grad_checkpoint)
        argv += ["--compile"] * opts.compile + ["--num-workers", str(opts.workers)] * (opts.workers is not None)
        self.args = a = T.get_args(argv)
        use_feats = mode in ("redi", "coredi")
        self.encoder = None
        if use_feats or a.repa:  # one encoder per architecture, shared by the variants
            key = (a.enc, a.enc_weights, a.enc_size)
            if key not in encoders:
                encoders[key] = T.make_encoder(a).to(device)
            self.encoder = encoders[key]
        self.enc_grid = self.encoder.grid if self.encoder is not None else None
        in_ch = 4 if a.space == "latent" else 3
        input_size = a.image_size // 8 if a.space == "latent" else a.image_size
        arch = dict(input_size=input_size, in_channels=in_ch, num_classes=a.num_classes,
                    feat_dim=a.feat_dim if use_feats else 0, bottleneck=a.bottleneck,
                    repa_depth=a.repa_depth if a.repa else 0, repa_dim=self.encoder.dim if a.repa else 0)
        torch.manual_seed(a.seed)
        self.dit = M.create_model(a.model, **arch).to(device)
        self.dit.grad_checkpoint = a.grad_checkpoint
        self.ema = deepcopy(self.dit).requires_grad_(False).eval()
        self.proj = None
        if use_feats:
            coredi = mode == "coredi"
            self.proj = M.FeatureProjection(self.encoder.dim, a.feat_dim, learnable=coredi,
                                            batchnorm=coredi and a.proj_bn,
                                            vf_map=a.vf_map if coredi and a.vf_weight else None).to(device)
        self.loss_fn = T.JointLoss(self.dit, self.proj, a)
        groups = [{"params": [p for p in self.dit.parameters() if p.requires_grad], "lr": a.lr}]
        if self.proj is not None and any(p.requires_grad for p in self.proj.parameters()):
            groups.append({"params": [p for p in self.proj.parameters() if p.requires_grad], "lr": a.proj_lr})
        self.params = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.AdamW(groups, betas=(0.9, a.beta2), weight_decay=a.weight_decay,
                                     fused=device.type == "cuda")
        self.module = torch.compile(self.loss_fn) if a.compile else self.loss_fn
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                                       enabled=device.type == "cuda" and a.precision == "bf16")
        self.x_shape = (in_ch, input_size, input_size)
        self.z_shape = (self.dit.grid ** 2, a.feat_dim) if use_feats else None
        self.vae_shape = self.x_shape if a.space == "latent" else None
        self.steps = 0
        self.flops = {"dit": dit_flops(self.dit), "encoder": vit_flops(self.encoder.net) if self.encoder else 0}
        self.saved_bytes = None

    def fit_projection(self, batch):
        """The PCA that train.fit_projection would fit, here on the encoder tokens of the benchmark batch."""
        if self.proj is not None:
            with torch.no_grad(), self.autocast:
                tokens = self.encoder(self.inputs(batch)[1]).float().reshape(-1, self.encoder.dim).cpu()
            self.proj.cpu().fit(tokens, init=self.args.proj_init, generator=torch.Generator().manual_seed(0))
            self.proj.to(self.device)

    def inputs(self, batch, noise_vae=None):
        """train.main's to_model_input for a latent-cache or an image batch (the cache holds VAE moments, so no VAE
        runs here): (clean x for the model, image in [-1, 1] for the encoder, labels)."""
        (x, y), dev = batch, self.device
        if isinstance(x, (list, tuple)):
            moments, img = x[0].to(dev), x[1].to(dev).float() / 127.5 - 1
            return M.VAE.sample(moments, noise_vae), img, y.to(dev)
        img = x.to(dev).float() / 127.5 - 1
        return img, img, y.to(dev)

    def step(self, batch, clock, split=False):
        """One iteration of train.main's loop between log steps (no learning-rate warm-up, logging or checkpoints;
        the loss's finiteness check is the step's only device sync). With split, the eager module runs with hooks
        that timestamp the DiT's forward and backward, and autograd's saved tensors are counted."""
        a = self.args
        clock.mark("start")
        noise = T.step_noise(a.seed, self.steps, range(self.B), self.x_shape, self.z_shape, self.vae_shape,
                             a.space, self.device)
        x, img, y = self.inputs(batch, noise[4])
        clock.mark("data")
        hooks, saved = (self.hooks(clock), {}) if split else ([], None)
        counting = torch.autograd.graph.saved_tensors_hooks(lambda t: count_saved(t, saved), lambda t: t)
        with self.autocast, counting if split else contextlib.nullcontext():
            z0 = self.encoder(img) if self.encoder is not None else None
            clock.mark("encoder")
            loss, _ = (self.loss_fn if split else self.module)(x, y, z0, self.enc_grid, noise)
        clock.mark("forward")
        if not torch.isfinite(loss):
            raise M.UserError(f"{self.name}: non-finite loss {loss.item()}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clock.mark("backward")
        nn.utils.clip_grad_norm_(self.params, a.grad_clip or float("inf"))
        self.opt.step()
        T.update_ema(self.ema, self.dit, a.ema)
        clock.mark("optimizer")
        for h in hooks:
            h.remove()
        if split:
            self.saved_bytes = sum(saved.values())
            if self.dit.grad_checkpoint:  # checkpointing keeps each block's inputs (h, c), out of autograd's sight
                hidden = self.dit.pos_embed.shape[-1]
                self.saved_bytes += len(self.dit.blocks) * self.B * (self.dit.grid ** 2 + 1) * hidden * 4
        self.steps += 1

    def hooks(self, clock):
        """Timestamps: DiT forward start/end; DiT backward from the first gradient reaching its outputs to the last
        gradient of its parameters (autograd runs later-created nodes first, so the projection's backward comes
        after the DiT's and the loss terms' before)."""
        def on_output(module, args, out):
            clock.mark("dit fwd end")
            for o in out:
                if o is not None and o.requires_grad:
                    o.register_hook(lambda g: clock.mark("dit bwd start", once=True))
        hs = [self.dit.register_forward_pre_hook(lambda m, a: clock.mark("dit fwd start")),
              self.dit.register_forward_hook(on_output)]
        return hs + [p.register_post_accumulate_grad_hook(lambda p: clock.mark("dit bwd end"))
                     for p in self.dit.parameters() if p.requires_grad]

    def state_bytes(self):
        """Weights, gradients, AdamW moments and EMA of the trained parts, and the frozen encoder's weights."""
        tensors = list(self.dit.parameters()) + list(self.ema.parameters()) + [p.grad for p in self.params]
        tensors += [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)]
        tensors += list(self.proj.state_dict().values()) if self.proj is not None else []
        tensors += list(self.encoder.parameters()) if self.encoder is not None else []
        return sum(t.nbytes for t in tensors if t is not None)

    def train_flops(self):
        """Per image: the DiT's forward and backward (3x forward) and the frozen encoder's forward."""
        return 3 * sum(self.flops["dit"].values()) + self.flops["encoder"]


def count_saved(t, saved):
    """saved_tensors_hooks pack: remember each storage autograd keeps for the backward pass (once)."""
    s = t.untyped_storage()
    saved[(s.data_ptr(), t.device)] = s.nbytes()
    return t


PHASES = ["data + noise", "encoder fwd", "projection + regularizers fwd+bwd", "DiT fwd", "DiT bwd", "losses fwd+bwd",
          "optimizer + EMA"]


def split_phases(t):
    """Seconds per part of a step from the split timestamps."""
    return {
        "data + noise": t["data"] - t["start"],
        "encoder fwd": t["encoder"] - t["data"],
        "projection + regularizers fwd+bwd": (t["dit fwd start"] - t["encoder"]) + (t["backward"] - t["dit bwd end"]),
        "DiT fwd": t["dit fwd end"] - t["dit fwd start"],
        "DiT bwd": t["dit bwd end"] - t["dit bwd start"],
        "losses fwd+bwd": (t["forward"] - t["dit fwd end"]) + (t["dit bwd start"] - t["forward"]),
        "optimizer + EMA": t["optimizer"] - t["backward"],
    }


def memory_batch(opts):
    """A fixed batch as the loader would deliver it: ([moments, uint8 image], labels) or (uint8 image, labels)."""
    g = torch.Generator().manual_seed(0)
    S_ = opts.image_size
    img = torch.randint(0, 256, (opts.batch, 3, S_, S_), dtype=torch.uint8, generator=g)
    y = torch.randint(0, opts.num_classes, (opts.batch,), generator=g)
    if opts.space == "pixel":
        return img, y
    h = S_ // 8
    moments = torch.cat([torch.randn(opts.batch, 4, h, h, generator=g), torch.full((opts.batch, 4, h, h), -6.0)], 1)
    return [moments, img], y


# -----------------------------------------------------------------------------
# Data: a small latent cache (latent space) or a folder of JPEGs (pixel space) in /tmp, read as train.py reads it

def write_latent_cache(root, n, size, num_classes):
    """The files prepare.py writes, with random contents: moments.npy (N, 8, S/8, S/8) float32, images.npy
    (N, S, S, 3) uint8, labels.npy (N,) int64 and meta.json."""
    rng = np.random.default_rng(0)
    h = size // 8
    moments = np.concatenate([rng.standard_normal((n, 4, h, h), np.float32), np.full((n, 4, h, h), -6, np.float32)], 1)
    np.save(os.path.join(root, "moments.npy"), moments)
    np.save(os.path.join(root, "images.npy"), rng.integers(0, 256, (n, size, size, 3), np.uint8))
    np.save(os.path.join(root, "labels.npy"), (np.arange(n) % num_classes).astype(np.int64))
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump({"image_size": size, "vae": "stabilityai/sd-vae-ft-ema", "num_images": n,
                   "num_classes": num_classes}, f)
    return T.LatentCache(root, size, None)


def write_image_folder(root, n, size, num_classes):
    """n JPEGs of ImageNet's typical 500x375, in min(10, classes) class folders, read by train.ImageFolder."""
    classes = min(10, num_classes)
    synth = T.SyntheticImages(n, 128, classes)
    for i in range(n):
        img, c = synth[i]
        os.makedirs(os.path.join(root, f"c{c}"), exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).resize((500, 375), Image.BICUBIC).save(
            os.path.join(root, f"c{c}", f"{i:05d}.jpg"), quality=90)
    return T.ImageFolder(root, size)


def make_loader(data, v):
    """The DataLoader of train.main for one rank."""
    a = v.args
    sampler = T.GlobalBatchSampler(len(data), a.global_batch_size, 0, 1, a.seed)
    return torch.utils.data.DataLoader(T.Flipped(data), batch_sampler=sampler, num_workers=a.num_workers,
                                       pin_memory=v.device.type == "cuda", persistent_workers=a.num_workers > 0)


def loader_rate(data, v):
    """Images/s a fresh loader delivers with the training idle, after the batches its workers made while starting."""
    it = iter(make_loader(data, v))
    skip, n = max(1, v.args.num_workers), max(20, 4 * v.args.num_workers)
    for _ in range(skip):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * v.B / (time.perf_counter() - t0)


# -----------------------------------------------------------------------------
# Sampling: sample.generate with a few steps, scaled to the full count by the time per model evaluation

def evaluations(sampler, steps):
    return 2 * steps - 1 if sampler == "heun" else steps


def bench_sampling(v, opts, device, vae):
    a, out = v.args, []
    specs = [s.split(":") for s in opts.samplers.split(",")] if opts.samplers else [[None, None]]
    cfg = {"prediction": a.prediction, "space": a.space}
    model, rows = v.ema, []
    for name, steps in specs:
        argv = ["--ckpt", ""] + ["--sampler", name] * bool(name) + ["--steps", steps] * bool(steps)
        sargs = S.default_sampler(S.get_args(argv + ["--fp32"] * (opts.precision == "fp32")), a.space)
        full = sargs.steps
        sargs.steps = min(full, opts.sample_steps) if opts.sample_steps else full
        if sargs.steps < (2 if sargs.sampler == "sde" else 1):
            raise M.UserError(f"--sample-steps {opts.sample_steps} is too few for {sargs.sampler}")
        totals, per_eval = [], []
        for r in range(opts.warmup + opts.iters):
            clock, calls = Clock(device), []

            def after(module, args, output):
                clock.mark("last")
                calls.append(1)
            hs = [model.register_forward_pre_hook(lambda m, args: clock.mark("first", once=True)),
                  model.register_forward_hook(after)]
            clock.mark("start")
            S.generate(model, cfg, sargs, list(range(opts.sample_batch)), device, vae)
            clock.mark("end")
            for h in hs:
                h.remove()
            if r >= opts.warmup:
                t = clock.t
                per_eval.append((t["last"] - t["first"]) / len(calls))
                totals.append(t["end"] - t["start"] - (t["last"] - t["first"]))  # noise, VAE decode, uint8
        e_full, e_run = evaluations(sargs.sampler, full), evaluations(sargs.sampler, sargs.steps)
        pe, fixed = float(np.median(per_eval)), float(np.median(totals))
        seconds = fixed + pe * e_full
        rows.append([f"{sargs.sampler} {full}", f"{e_full}" + (f" (ran {e_run})" if e_run != e_full else ""),
                     opts.sample_batch, f"{pe * 1e3:.1f}", f"{fixed * 1e3:.0f}", f"{seconds:.2f}",
                     f"{opts.sample_batch / seconds:.3g}"])
    out.append(f"\n### Sampling ({v.name}, EMA model, sample.generate{', VAE decode included' if vae else ''})\n")
    out += table(["sampler", "model evals", "batch", "ms / eval", "fixed ms (all but model evals)", "s / batch", "images/s"],
                 rows)
    if opts.sample_steps:
        out.append(f"\nRan {opts.sample_steps} steps per sampler (--sample-steps); the full count's time is the fixed "
                   f"part plus the measured time per model evaluation times the full number of evaluations.")
    return out


# -----------------------------------------------------------------------------
# FID: fid.py's input path and Inception against pytorch-fid's, same random weights, interleaved

def bench_fid(opts, device):
    out = []
    state = fid.InceptionV3().state_dict()  # random weights in the standard layout: nothing is downloaded
    ours = fid.InceptionV3()
    ours.load_state_dict(state)
    ours = ours.to(device, memory_format=torch.channels_last).eval()  # as fid.load_inception returns it
    methods = {"fid.py (uint8 NHWC in)": lambda x, f: ours(fid.preprocess(x))}
    note = ""
    try:
        import pytorch_fid.inception as pf
    except ImportError:
        note = "pytorch-fid is not installed (pip install pytorch-fid): fid.py alone."
    else:
        pf.load_state_dict_from_url = lambda *args, **kwargs: state  # its constructor would download the weights
        theirs = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
        # pytorch-fid resizes and normalises inside its forward; its loader hands it NCHW floats in [0, 1] (made in
        # loader workers, so left out here). Convolutions follow their input's layout: the second row feeds it
        # channels_last, as fid.py does.
        methods["pytorch-fid (float NCHW in)"] = lambda x, f: theirs(f)
        methods["pytorch-fid, channels_last input"] = \
            lambda x, f: theirs(f.contiguous(memory_format=torch.channels_last))
    S_ = opts.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (opts.fid_batch, S_, S_, 3), dtype=torch.uint8, generator=g)
    floats = images.permute(0, 3, 1, 2).float().div(255).contiguous()
    times = {name: [] for name in methods}
    with torch.inference_mode(), fid.full_float32(device):
        for r in range(opts.warmup + opts.iters):
            for name, run in methods.items():
                clock = Clock(device)
                clock.mark("start")
                run(images.to(device), floats.to(device))
                clock.mark("end")
                if r >= opts.warmup:
                    times[name].append(clock.t["end"] - clock.t["start"])
    first = np.array(times[next(iter(methods))])
    rows = [[name, f"{opts.fid_batch / np.median(t):.3g}", f"{np.median(np.array(t) / first):.2f}"]
            for name, t in times.items()]
    out.append(f"\n### FID Inception (batch {opts.fid_batch} of {S_}x{S_} uint8, resize to 299 included)\n")
    out += table(["method", "images/s", "time / fid.py's"], rows)
    if note:
        out.append("\n" + note)
    return out


# -----------------------------------------------------------------------------
# Report

def table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def med(xs):
    return float(np.median(xs))


def gib(n):
    return f"{n / 2 ** 30:.2f}"


def bench_train(opts, variants, specs, batch, device):
    """Training steps of every variant in interleaved rounds, and the data pipeline; returns the report's lines."""
    cuda, out = device.type == "cuda", []
    main_v = variants.get(opts.mode)
    # what runs in each round: the compared variants on the in-memory batch, and the main one fed by the real loader
    runs = [(s, variants[s], lambda: batch) for s in specs]
    if "data" in opts.what:
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
        write = write_latent_cache if opts.space == "latent" else write_image_folder
        data = write(tmp.name, max(opts.data_images, 2 * opts.batch), opts.image_size, min(10, opts.num_classes))
        loader_it = iter(make_loader(data, main_v))
        source = (f"{'train.LatentCache' if opts.space == 'latent' else 'train.ImageFolder (JPEG)'}, "
                  f"{main_v.args.num_workers} workers")
        runs.append((f"{opts.mode}, {source}", main_v, lambda: next(loader_it)))
    # On CPU without compile the split's hooks cost nothing, so every timed step is split; on GPU (where the split
    # synchronizes) or compiled (hooks would enter the graph) extra eager split steps run next to the plain ones.
    separate_split = cuda or opts.compile
    peak_mm = MatmulPeak(device, torch.bfloat16 if cuda and opts.precision == "bf16" else torch.float32,
                         opts.peak_size)
    sheet = datasheet_peak(device, opts.precision) if cuda else None
    first = {}
    # per run: step times and splits, each with the peak measured just before it, and CUDA peak memory
    steps, step_peaks, splits, split_peaks, mem = ({name: [] for name, _, _ in runs} for _ in range(5))
    for rnd in range(opts.warmup + opts.iters):
        for name, v, get in runs:
            for split in ([False, True] if separate_split else [True]):
                pk = sheet or peak_mm.measure()
                clock = Clock(device)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                    resident = torch.cuda.memory_allocated(device)
                v.step(get(), clock, split=split)
                elapsed = clock.t["optimizer"] - clock.t["start"]
                first.setdefault(name, elapsed)
                if rnd < opts.warmup:
                    continue
                if split:
                    splits[name].append(split_phases(clock.t))
                    split_peaks[name].append(pk)
                if not split or not separate_split:
                    steps[name].append(elapsed)
                    step_peaks[name].append(pk)
                if cuda and not split:
                    mem[name].append(torch.cuda.max_memory_allocated(device) - resident)
        print(f"bench: round {rnd + 1} of {opts.warmup + opts.iters} done", file=sys.stderr, flush=True)

    out.append("\n### Peak\n")
    if sheet:
        rows = [[f"{'bf16' if peak_mm.a.dtype == torch.bfloat16 else 'fp32'} matmul {opts.peak_size}^3",
                 f"{peak_mm.measure() / 1e9:.1f}", "measured once, for comparison"]]
        rows.append([f"data sheet, dense {'bf16' if opts.precision == 'bf16' else 'TF32'}", f"{sheet / 1e9:.0f}",
                     "the % of peak below"])
    else:
        all_peaks = [p for name in steps for p in step_peaks[name] + split_peaks[name]]
        rows = [[f"fp32 matmul {opts.peak_size}^3", f"{med(all_peaks) / 1e9:.1f} (median; {min(all_peaks) / 1e9:.0f} "
                 f"to {max(all_peaks) / 1e9:.0f})", "sustained over ~1 s before every step; the % of peak below "
                 "pairs each step with its own"]]
    out += table(["peak", "GFLOP/s", "note"], rows)

    out.append("\n### Model FLOPs per image (analytic; a training step = 3 x DiT forward + 1 x encoder forward)\n")
    rows = []
    for s in specs:
        v, d = variants[s], variants[s].flops["dit"]
        rows.append([s, f"{sum(p.numel() for p in v.dit.parameters()) / 1e6:.1f}", f"{sum(d.values()) / 1e9:.2f}",
                     f"{100 * d['attention (QK^T, AV)'] / sum(d.values()):.1f}%", f"{d['REPA projector'] / 1e9:.2f}",
                     f"{v.flops['encoder'] / 1e9:.2f}", f"{v.train_flops() / 1e9:.1f}"])
    out += table(["variant", "DiT params (M)", "DiT fwd GFLOP", "of which QK^T, AV", "of which REPA head",
                  "encoder fwd GFLOP", "train step GFLOP"], rows)

    out.append(f"\n### Training step (batch {opts.batch}; 'x first': median of per-round ratios to the first row)\n")
    rows, base, fractions = [], np.array(steps[runs[0][0]]), {}
    for name, v, _ in runs:
        t = np.array(steps[name])
        dit_flops_ = 3 * sum(v.flops["dit"].values()) * v.B
        dit_t = np.array([p["DiT fwd"] + p["DiT bwd"] for p in splits[name]])
        fractions[name] = med(dit_flops_ / dit_t / np.array(split_peaks[name]))
        transient = max(mem[name]) if cuda else v.saved_bytes
        rows.append([name, f"{med(t) * 1e3:.0f}", f"{v.B / med(t):.3g}", f"{med(t / base):.3f}",
                     f"{med(dit_flops_ / dit_t) / 1e9:.1f}", f"{100 * fractions[name]:.0f}%",
                     f"{100 * med(v.train_flops() * v.B / t / np.array(step_peaks[name])):.0f}%",
                     gib(v.state_bytes() + transient)])
    out += table(["variant", "ms / step", "images/s", "x first", "DiT fwd+bwd GFLOP/s", "DiT fwd+bwd % of peak",
                  "step % of peak", "memory GiB"], rows)
    if cuda:
        out.append("\nMemory: the step's peak allocation above what was resident before it (torch.cuda."
                   "max_memory_allocated), plus this variant's weights, gradients, AdamW moments, EMA and encoder.")
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.append("\nMemory: weights, gradients, AdamW moments, EMA and encoder, plus the activations autograd saved "
                   f"for the backward pass (the CPU allocator keeps no peak; this process's peak RSS: {gib(rss)} GiB).")
    if separate_split:
        out.append("First step (compilation included): " + ", ".join(f"{n} {t:.1f} s" for n, t in first.items())
                   + ". The split and the DiT's % of peak come from extra eager steps"
                   + (", timed with a device sync at each boundary." if cuda else "."))

    out.append("\n### Cost split within the step (ms, median, and share of the step)\n")
    rows = []
    for name, _, _ in runs:
        ph = {k: med([p[k] for p in splits[name]]) for k in PHASES}
        total = sum(ph.values())
        rows.append([name] + [f"{ph[k] * 1e3:.0f} ({100 * ph[k] / total:.0f}%)" for k in PHASES]
                    + [f"{total * 1e3:.0f}"])
    out += table(["variant"] + PHASES + ["sum"], rows)

    checks = []  # the targets, where this run has what they compare
    goal = 0.45 if cuda else 0.75
    if "coredi" in fractions:
        checks.append(f"coredi DiT fwd+bwd at {100 * fractions['coredi']:.1f}% of peak (target >= {100 * goal:.0f}%): "
                      f"{'met' if fractions['coredi'] >= goal else 'NOT met'}")
    for other, limit in (("repa", 1.05), ("sit", 1.40)):
        if "coredi" in steps and other in steps:
            r = med(np.array(steps["coredi"]) / np.array(steps[other]))
            checks.append(f"coredi step / {other} step = {r:.3f} (target <= {limit}): "
                          f"{'met' if r <= limit else 'NOT met'}")
    if "data" in opts.what:
        rate, step_rate = loader_rate(data, main_v), main_v.B / med(steps[opts.mode])
        out.append(f"\n### Data pipeline ({source}, {len(data)} images in /tmp, in the page cache)\n")
        out += table(["loader alone, images/s", f"training step ({opts.mode}, in-memory batch), images/s", "ratio"],
                     [[f"{rate:.0f}", f"{step_rate:.3g}", f"{rate / step_rate:.0f}x"]])
        checks.append(f"loader / training step = {rate / step_rate:.0f}x (target >= 3x): "
                      f"{'met' if rate >= 3 * step_rate else 'NOT met'}")
        del loader_it
        tmp.cleanup()
    if checks:
        out.append("\nTargets: " + "; ".join(checks) + ".")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = get_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
    dev_name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    precision = ("bf16 autocast" if opts.precision == "bf16" else "fp32 (TF32 matmuls)") if cuda else "fp32"
    report(["```", "python " + shlex.join(["bench.py"] + argv), "```", "",
            f"{dev_name}, torch {torch.__version__}, {precision}{', torch.compile' if opts.compile else ''}; "
            f"{opts.model}, {opts.space} space, {opts.image_size} px; {opts.warmup} warm-up + {opts.iters} timed "
            f"rounds, medians."])

    specs = opts.compare if "train" in opts.what else [opts.mode] if "data" in opts.what else []
    needed = specs + [opts.mode] * (opts.mode not in specs and ("data" in opts.what or "sample" in opts.what))
    encoders = {}
    variants = {s: Variant(s, opts, device, encoders) for s in needed}
    batch = memory_batch(opts)
    for v in variants.values():
        v.fit_projection(batch)
    if specs:
        report(bench_train(opts, variants, specs, batch, device))
    if "sample" in opts.what:
        vae = M.VAE("random").to(device) if opts.space == "latent" else None  # the SD-VAE architecture
        report(bench_sampling(variants[opts.mode], opts, device, vae))
    if "fid" in opts.what:
        report(bench_fid(opts, device))


def report(lines):
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    try:
        main()
    except M.UserError as e:
        sys.exit(f"error: {e}")
