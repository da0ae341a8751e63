"""
Train a class-conditional diffusion transformer in one of four modes, in latent, pixel or SVG space:

  sit     plain SiT flow matching                     (Ma et al. 2024)
  repa    SiT + REPA alignment of a hidden layer      (Yu et al. 2025)
  redi    joint image + fixed-PCA DINOv2 features     (Kouzelis et al. 2025)
  coredi  joint image + learned, co-evolving P        (Kouzelis et al. 2026)

  torchrun --nproc_per_node 8 train.py --mode coredi --data-path /imagenet/train
  python train.py                      # no data: the CPU demo on the built-in synthetic set

Time (SiT's): x_t = t*x + (1-t)*eps, t=0 noise, t=1 data, velocity v = x - eps. Reading order:
a batch, the networks, the loss, the loop; the flags and the recipe tables close the file (DiT's).
"""
import argparse
import os
from copy import deepcopy
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import model as M
from support.cli import (ArgumentParser, broadcast_from_rank0, cli, init_processes,
                         nonneg_float, nonneg_int, number, positive_float, positive_int,
                         preset_epilog, probability, seeded_generator)
from support.data import Flipped, GlobalBatchSampler, cache_reads, make_data, runs_encoder
from support.frozen import DINO, DINO_NOREG, VAE, VAE_EMA, VAE_MSE, fit_projection, make_encoder
from support.monitor import LogWriter, Monitor, check_fid
from support.runs import (StopSignal, check_cache_projection, check_train_flags, checkpoint_state,
                          end_message, load_for_resume, load_projection_file, prepare_run_dir,
                          read_checkpoint, run_folder, save_run, start_messages)
from support.shapes import resize_tokens
from svg_ae import fit_svg_stats, make_svg_latents

# -----------------------------------------------------------------------------
# Data: what each space diffuses, and a batch as the DiT sees it

# latent: SD-VAE latents (8x fewer pixels, 4 channels), SiT's velocity prediction, t ~ U(0, 1),
# ReDi's features as extra channels. pixel: JiT's x-prediction, t ~ sigmoid(N(-0.8, 0.8)), features
# added per token. svg: velocity, t ~ U(0, 1) then --time-shift, SVG's autoencoder sets the shape.
SPACES = {
    "latent": dict(channels=4, downsample=8, prediction="v", fusion="channels"),
    "pixel": dict(channels=3, downsample=1, prediction="x", fusion="tokens"),
    "svg": dict(channels=None, downsample=None, prediction="v", fusion=None),
}
JIT_T_MEAN, JIT_T_STD = -0.8, 0.8  # JiT's logit-normal time distribution


def model_input(batch, device, autoencoder=None, eps_vae=None):
    """A data batch -> (x: the clean image or latent the DiT denoises, img: the image in [-1, 1]
    for the encoder, z_tilde: redi's projected features from the latent cache, y: labels); what
    the batch lacks is None. autoencoder: the SD-VAE, SVG's (SVGLatents) or None (pixels)."""
    x, y = batch
    y = y.to(device)
    if isinstance(x, dict):  # the latent cache: the arrays that cache_reads chose
        img = x["image"].to(device).float() / 127.5 - 1 if "image" in x else None
        z_tilde = x["features"].to(device).float() if "features" in x else None
        # the SD-VAE: a fresh posterior sample of the stored moments every step; SVG: standardised
        return autoencoder.cached_latent(x["latent"].to(device).float(), eps_vae), img, z_tilde, y
    img = x.to(device).float() / 127.5 - 1
    if autoencoder is None:  # pixel space
        return img, img, None, y
    return autoencoder.latent(img, eps_vae), img, None, y  # encoded on the fly, in fp32


# -----------------------------------------------------------------------------
# Networks: the DiT, its EMA copy and the feature projection; the optimizer

def build_networks(args, enc_dim=0, latent_shape=None, repa_depth=8):
    """The DiT (seeded: the same initial weights on every rank), its EMA copy, the mode's feature
    projection, and arch: the DiT's constructor arguments, which a checkpoint stores. enc_dim: the
    encoder's width (P's input, REPA's target); latent_shape: (channels, grid) of SVG's latent."""
    space = SPACES[args.space]
    channels, size = latent_shape or (space["channels"], args.image_size // space["downsample"])
    arch = dict(input_size=size, in_channels=channels, num_classes=args.num_classes,
                feat_dim=args.feat_dim if M.MODES[args.mode].features else 0,
                fusion=space["fusion"], repa_depth=repa_depth if args.repa else 0,
                repa_dim=enc_dim if args.repa else 0)
    if args.qk_norm:
        arch["qk_norm"] = True
    torch.manual_seed(args.seed)
    dit = M.create_model(args.model, **arch)
    dit.grad_checkpoint = args.grad_checkpoint
    ema = deepcopy(dit).requires_grad_(False).eval()
    proj = M.build_projection(args.mode, enc_dim, args.feat_dim, batchnorm=args.proj_bn,
                              vf_map=args.vf_map if args.vf_weight else None, scale=args.proj_scale)
    return dit, ema, proj, arch


def make_optimizer(dit, proj, args, lr, proj_lr, fused=False):
    """AdamW over the DiT and, in a parameter group of its own, CoReDi's P. base_lr: each group's
    rate after the warm-up."""
    groups = [dict(params=[p for p in dit.parameters() if p.requires_grad], lr=lr, base_lr=lr)]
    if proj is not None and any(p.requires_grad for p in proj.parameters()):
        params = [p for p in proj.parameters() if p.requires_grad]
        groups.append(dict(params=params, lr=proj_lr, base_lr=proj_lr))
    return torch.optim.AdamW(groups, betas=(0.9, args.beta2), weight_decay=args.weight_decay,
                             fused=fused)


def warmup_steps(args, n_images):
    """--warmup-steps, or --warmup-epochs of the data actually given: JiT's 5 epochs are 6,255
    steps of ImageNet at batch 1024, but 40 steps of 64 images at batch 8 (full batches only)."""
    if args.warmup_steps is not None:
        return args.warmup_steps
    return round(args.warmup_epochs * (n_images // args.global_batch_size))


def warmup_lr(opt, step, warmup_steps):
    """Linear warm-up from 0 at step 0 to each group's base_lr, then constant (JiT's; SiT: none)."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * (min(1.0, step / warmup_steps) if warmup_steps else 1.0)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, in one fused kernel per group of tensors."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


# -----------------------------------------------------------------------------
# The loss: joint noising of image and features, the stop-gradient, the regularizers, REPA

class Noise(NamedTuple):
    """A step's random numbers for B samples (step_noise); None where the run has no such stream."""
    t: torch.Tensor  # (B,) in [0, 1], 0 = noise, 1 = data, after --time-shift
    drop_label: torch.Tensor  # (B,) bool: the null label replaces the class (for CFG)
    drop_feat: torch.Tensor  # (B,) bool: no feature input and no feature loss (for --cfg-rep)
    eps_x: torch.Tensor  # (B, *x_shape) standard normal noise of the image or latent
    eps_z: Optional[torch.Tensor]  # (B, *z_shape) noise of the features, in the DiT's layout
    eps_vae: Optional[torch.Tensor]  # (B, 4, h, w) noise of the SD-VAE posterior sample


def step_noise(seed, step, rows, batch, x_shape, z_shape=None, vae_shape=None, space="latent",
               label_drop=0.0, feat_drop=0.0, time_shift=1.0, device="cpu"):
    """Every random number of a step, drawn for the whole global batch of `batch` samples from one
    generator seeded by (seed, step), of which this rank takes its rows (a range): 1 or N ranks,
    and a resumed run, draw the same numbers, in a handful of kernels."""
    g = seeded_generator(seed, step, device=device)
    draw = lambda f, *shape: f(batch, *shape, generator=g, device=device)[rows.start:rows.stop]
    if space == "pixel":  # JiT's logit-normal
        t = torch.sigmoid(JIT_T_MEAN + JIT_T_STD * draw(torch.randn))
    else:  # SiT's uniform
        t = draw(torch.rand)
    drop = draw(torch.rand, 2)
    return Noise(M.shift_time(t, time_shift), drop[:, 0] < label_drop, drop[:, 1] < feat_drop,
                 draw(torch.randn, *x_shape), z_shape and draw(torch.randn, *z_shape),
                 vae_shape and draw(torch.randn, *vae_shape))


class JointLoss(nn.Module):
    """Flow matching on the image and (redi, coredi) the projected features; REPA's alignment; a
    learned P's regularizers. One module, so that DDP averages the DiT's and P's gradients together.
    Weights: ReDi's lambda_z 1, REPA's 0.5; where CoReDi is silent, ours (VF, Ortho 0.1; Cov 1)."""

    def __init__(self, dit, proj=None, enc_grid=None, prediction="v", lambda_z=1.0, proj_sg=True,
                 vf_weight=0.1, ortho_weight=0.1, cov_weight=1.0, repa_weight=0.5):
        super().__init__()
        self.dit, self.proj, self.enc_grid, self.prediction = dit, proj, enc_grid, prediction
        self.lambda_z, self.proj_sg, self.repa_weight = lambda_z, proj_sg, repa_weight
        learned = proj is not None and proj.learnable  # the regularizers act on a learned P only
        self.reg_weights = dict(vf=vf_weight, ortho=ortho_weight, cov=cov_weight) if learned else {}

    def forward(self, x, y, z0, noise, diagnostics=False, z_tilde=None):
        """x: clean image or latent (B, C, H, W); y: labels (B,); z0: encoder tokens (B, L, D) or
        None; noise: a Noise; z_tilde: redi's cached features (B, L, d), in place of proj(z0).
        Returns the loss and the logged terms (with z~'s collapse diagnostics if diagnostics)."""
        dit, t = self.dit, noise.t
        y = torch.where(noise.drop_label, dit.num_classes, y)  # the null label, for CFG
        x_t = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * noise.eps_x
        logs, z_in, terms = {}, None, {}
        if self.proj is not None:
            z_tilde = self.proj(z0) if z_tilde is None else z_tilde  # (B, L_enc, d), encoder grid
            if diagnostics:
                std, logs["z_erank"] = M.feature_stats(z_tilde)
                logs["z_std_min"] = std.min()
            z = dit.features_in(z_tilde * self.proj.stream_scale, self.enc_grid)  # DiT's layout
            tz = t.view(-1, *[1] * (z.dim() - 1))
            z_noisy = tz * z + (1 - tz) * noise.eps_z
            keep = (~noise.drop_feat).float()  # feature dropout: zero input, no feature loss
            z_in = z_noisy * keep.view_as(tz)
            # Stop-gradient: P learns only through the DiT's input z_in. The target and, with
            # x-prediction, the noisy features inside the x -> v conversion are constants.
            z_target = z.detach() if self.proj_sg else z
            z_noisy_in_loss = z_noisy.detach() if self.proj_sg else z_noisy
            w, proj = self.reg_weights, self.proj
            if w.get("vf"):
                terms["vf"] = (w["vf"], M.vf_loss(z_tilde, proj.standardize(z0), proj.map_back))
            if w.get("ortho"):
                terms["ortho"] = (w["ortho"], M.ortho_loss(proj.P))
            if w.get("cov"):
                terms["cov"] = (w["cov"], M.cov_loss(z_tilde))
        out_x, out_z, repa = dit(x_t, t, y, z_in)
        v_x = M.to_velocity(out_x, x_t, t, self.prediction)
        loss_x = (v_x - (x - noise.eps_x)).pow(2).mean()
        total, logs["loss_x"] = loss_x, loss_x.detach()
        if self.proj is not None:
            # Dropped samples count as zero: a plain batch mean, which DDP averages exactly.
            v_z = M.to_velocity(out_z, z_noisy_in_loss, t, self.prediction)
            per_sample = (v_z - (z_target - noise.eps_z)).pow(2).flatten(1).mean(1)
            loss_z = (keep * per_sample).mean()
            total, logs["loss_z"] = total + self.lambda_z * loss_z, loss_z.detach()
        if repa is not None:  # REPA: per token, the encoder's features on the DiT's token grid
            target = resize_tokens(z0, self.enc_grid, (dit.grid, dit.grid)).float()
            terms["repa"] = (self.repa_weight,
                             -F.cosine_similarity(repa.float(), target, dim=-1).mean())
        for name, (weight, value) in terms.items():
            total = total + weight * value
            logs[name] = value.detach()
        return total, logs


# -----------------------------------------------------------------------------
# The loop: set-up, then the steps with EMA, logging, pictures and checkpoints

def frozen_networks(args, data, cached, device):
    """The autoencoder (SD-VAE, SVG's, or None for pixels), the encoder (None when no feature or
    REPA target needs it) and the encoder's width and token grid (the cache's, without encoder)."""
    autoencoder = VAE(args.vae_weights).to(device) if args.space == "latent" else None
    if args.space == "svg":
        autoencoder = make_svg_latents(args, device)
    encoder = make_encoder(args).to(device) if runs_encoder(args, cached) else None
    enc_dim, enc_grid = (encoder.dim, encoder.grid) if encoder is not None else (0, None)
    if cached:
        enc_dim, enc_grid = data.meta["features"]["enc_dim"], tuple(data.meta["features"]["grid"])
    return autoencoder, encoder, enc_dim, enc_grid


def initialise(args, dit, ema, proj, svg, data, encoder, cached, device, rank):
    """A new run: P from a PCA fit (or --pca-file, or the cache's pca.pt) and SVG's latent
    statistics, equal on every rank; the EMA starts as the DiT."""
    if proj is not None:
        if cached or args.pca_file:  # redi from the cache: its own pca.pt, or --pca-file
            load_projection_file(args.pca_file or os.path.join(data.root, "pca.pt"), proj)
        else:
            fit_projection(proj, data, encoder, args, device, rank)
        broadcast_from_rank0(proj.state_dict().values())
        ema.load_state_dict(dit.state_dict())
    if svg is not None and not args.svg_stats:
        fit_svg_stats(svg, data, args, device, rank)
        broadcast_from_rank0((svg.mean, svg.std))


def main(args):
    ddp, rank, world, device = init_processes()
    master, derived = rank == 0, derive(args)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bf16 = device.type == "cuda" and args.precision == "bf16"
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    # What a bad flag or file can break is checked before anything expensive, and the run folder
    # is made only once start-up has succeeded: a failed start leaves nothing behind.
    run_dir = run_folder(args, master)
    ckpt = read_checkpoint(os.path.join(run_dir, "last.pt"), args) if args.resume else None
    inception = check_fid(args, device) if args.fid_every and master else None
    data = make_data(args)
    reads = cache_reads(data, args)  # a latent cache: the arrays this run reads
    if reads:
        data.keys = reads
    cached = "features" in reads  # redi's features from the cache: no encoder
    autoencoder, encoder, enc_dim, enc_grid = frozen_networks(args, data, cached, device)
    svg = autoencoder if args.space == "svg" else None
    latent_shape = svg and (len(svg.mean), svg.ae.dino.grid[0])
    dit, ema, proj, arch = build_networks(args, enc_dim, latent_shape, derived.repa_depth)
    dit, ema = dit.to(device), ema.to(device)
    proj = proj.to(device) if proj is not None else None
    opt = make_optimizer(dit, proj, args, derived.lr, derived.proj_lr, fused=device.type == "cuda")
    if args.resume:  # --lr and --proj-lr may change on resume
        step = load_for_resume(ckpt, dit, ema, proj, opt, (derived.lr, derived.proj_lr), svg)
    else:
        step = 0
        initialise(args, dit, ema, proj, svg, data=data, encoder=encoder, cached=cached,
                   device=device, rank=rank)
    if cached:
        check_cache_projection(proj, data, args)
    warmup = warmup_steps(args, len(data))
    if master:
        print(*start_messages(args, data, cached, warmup, derived.lr, dit=dit, world=world,
                              step=step), sep="\n")
        prepare_run_dir(run_dir, args, proj)
    loss_fn = JointLoss(dit, proj, enc_grid, derived.prediction, lambda_z=args.lambda_z,
                        proj_sg=args.proj_sg, vf_weight=args.vf_weight, cov_weight=args.cov_weight,
                        ortho_weight=args.ortho_weight, repa_weight=args.repa_weight)
    if ddp:
        loss_fn = DDP(loss_fn, device_ids=[device.index] if device.type == "cuda" else None)
    for block in dit.blocks if args.compile else []:  # regional: one block's graph, compiled once
        block.compile()
    monitor = Monitor(args, run_dir, derived.prediction, autoencoder, amp, device, inception,
                      projection=(proj, encoder, data) if encoder and proj is not None else None)

    sampler = GlobalBatchSampler(len(data), args.global_batch_size, rank, world, args.seed,
                                 args.flip, step)
    batches = iter(torch.utils.data.DataLoader(
        Flipped(data), batch_sampler=sampler, num_workers=args.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0))
    b = args.global_batch_size // world
    rows = range(rank * b, (rank + 1) * b)  # this rank's rows of the global batch
    x_shape = (arch["in_channels"], arch["input_size"], arch["input_size"])
    params = [p for group in opt.param_groups for p in group["params"]]
    log, stop = LogWriter(run_dir, args, world, device, master), StopSignal()
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, dynamic_ncols=True)
    while step < args.max_steps:
        noise = step_noise(args.seed, step, rows, args.global_batch_size, x_shape, dit.z_shape,
                           vae_shape=x_shape if args.space == "latent" else None, space=args.space,
                           label_drop=args.label_drop, feat_drop=args.feat_drop,
                           time_shift=args.time_shift, device=device)
        x, img, z_tilde, y = model_input(next(batches), device, autoencoder, noise.eps_vae)
        with amp:
            z0 = encoder(img) if encoder is not None else None
            loss, logs = loss_fn(x, y, z0, noise, diagnostics=log.due(step + 1), z_tilde=z_tilde)
        warmup_lr(opt, step, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        logs["grad_norm"] = nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf"))
        opt.step()
        update_ema(ema, dit, args.ema)
        step += 1
        bar.update(1)
        log.add(logs, step, bar)
        end = step == args.max_steps
        if master and args.sample_every and (step % args.sample_every == 0 or end):
            monitor.pictures(ema, step)
        if args.fid_every and step % args.fid_every == 0:
            monitor.fid(ema, step, rank, world)
        keep = args.keep_every and step % args.keep_every == 0  # step_N.pt, between checkpoints too
        saving = end or step % args.ckpt_every == 0 or keep
        stopping = stop.agreed(ddp, device, sync=saving or log.due(step))  # all ranks, at one step
        if master and (saving or stopping):
            config = {**vars(args), "prediction": derived.prediction, "arch": arch}
            save_run(run_dir, checkpoint_state(dit, ema, proj, opt, step, config, svg), step,
                     args.keep_every)
        if stopping:
            stop.report(master, bar, run_dir, step)
            break
    bar.close()
    stop.restore(run_dir)
    if master:
        print(end_message(args, run_dir, step))
    if ddp:
        torch.distributed.destroy_process_group()
    return dit, ema, proj


# -----------------------------------------------------------------------------
# Flags. A flag's own default is SiT's latent-space recipe: SiT-XL/2, batch 256, AdamW 1e-4 with
# betas (0.9, 0.999), no warm-up, EMA 0.9999, 400K steps. Two tables change it, each value in one
# place: MODE_DEFAULTS, from each mode's reference code (docs/conventions.md gives file and line),
# and over it PRESETS. A flag given on the command line wins over both.

MODE_DEFAULTS = {  # sit: SiT's train.py; repa: REPA's; redi: ReDi's; coredi: ReDi's (paper silent)
    #               sit       repa        redi     coredi
    "grad_clip":   (0.0,      1.0,        0.0,     0.0),      # only REPA clips
    "flip":        (True,     False,      False,   False),    # REPA's and ReDi's latents: unflipped
    "vae_weights": (VAE_EMA,  VAE_MSE,    VAE_MSE, VAE_MSE),  # the VAE of the training latents
    "enc":         (DINO,     DINO_NOREG, DINO,    DINO),     # REPA's DINOv2 has no registers
    "repa":        (False,    True,       False,   False),
}
_ = "default"  # in PRESETS: the preset keeps the flag's (or the mode's) default
PRESETS = {  # pixel: JiT-B/16 (JiT's main_jit.py); svg: SVG's config/example_svg_xl.yaml; demo: CPU
    #                    pixel       svg         demo       demo-svg
    "space":             ("pixel",   "svg",      "pixel",   "svg"),
    "mode":              (_,         "sit",      _,         "sit"),  # SVG: sit and repa only
    "model":             ("JiT-B/16", "SiT-XL/1", "DiT-T/4", "DiT-T/1"),
    "global_batch_size": (1024,      _,          32,        32),
    "lr":                (None,      _,          1.5e-3,    1.5e-3),  # None: 5e-5 * batch / 256
    "beta2":             (0.95,      _,          0.99,      0.99),
    "warmup_epochs":     (5,         _,          0.32,      _),  # JiT: 6,255 ImageNet steps
    "warmup_steps":      (_,         _,          _,         50),
    "grad_clip":         (0.0,       0.0,        1.0,       1.0),  # demo: clipped, for stability
    "flip":              (True,      True,       _,         True),
    "qk_norm":           (_,         True,       _,         True),
    "time_shift":        (_,         0.4,        _,         0.4),
    "max_steps":         (_,         _,          600,       800),
    "ema":               (_,         _,          0.99,      0.99),
    "synthetic":         (_,         _,          5000,      2000),
    "image_size":        (_,         _,          32,        32),
    "num_classes":       (_,         _,          10,        10),
    "feat_drop":         (_,         _,          0.2,       _),
    "enc_weights":       (_,         _,          "tiny",    "tiny"),
    "enc_size":          (_,         _,          112,       112),
    "pca_images":        (_,         _,          256,       _),
    "stats_images":      (_,         _,          _,         512),
    "svg_ae":            (_,         _,          _,         "results/svg-ae-demo/last.pt"),
    "num_workers":       (_,         _,          0,         0),
    "log_every":         (_,         _,          50,        50),
    "ckpt_every":        (_,         _,          300,       400),
    "keep_every":        (_,         _,          0,         0),
    "sample_every":      (_,         _,          300,       400),
}
PRESET_NAMES = ("pixel", "svg", "demo", "demo-svg")  # the columns; "latent": the flags' defaults
JIT_BASE_LR = 5e-5  # JiT scales the learning rate with the batch: lr = 5e-5 * batch / 256
REPA_DEPTH = {"T": 2, "S": 4, "B": 4, "L": 8, "XL": 8}  # REPA's block, by size (T: ours)


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, late_help=True,
                       epilog=preset_epilog(PRESETS, PRESET_NAMES, _))
    add = p.add_argument_group("model and mode").add_argument
    add("--preset", choices=["latent", *PRESET_NAMES], help="default: demo, or --space's")
    add("--mode", choices=list(M.MODES), default="coredi", help="what is trained (see above)")
    add("--space", choices=["latent", "pixel", "svg"], default="latent",
        help="SD-VAE latents (SiT), pixels (JiT), SVG's latent (sit and repa only)")
    add("--model", default="SiT-XL/2", help="(DiT|SiT)-(T|S|B|L|XL)/patch or JiT-(T|B|L|H)/patch")
    add("--repa", action="store_true", help="add REPA's alignment loss to redi or coredi")
    add("--qk-norm", action=argparse.BooleanOptionalAction, default=False, help="SVG's qk-norm")
    add("--enc", help="timm name of the frozen encoder; default: the mode's")
    add("--enc-weights", help="none: download; PATH: local file; random, tiny: tests and demo only")
    add("--enc-size", type=positive_int, default=224, help="the encoder's input resolution")
    add("--vae-weights", help="SD-VAE hub name or folder (random: tests); default: the mode's")
    add = p.add_argument_group("data").add_argument
    add("--data-path", help="ImageFolder root (a folder per class); none: the synthetic demo set")
    add("--latent-cache", help="a folder made by prepare.py (latent or SVG space)")
    add("--synthetic", type=positive_int, default=5000, help="images of the synthetic set")
    add("--synthetic-hard", action="store_true", help="the synthetic set's shape-only variant")
    add("--image-size", type=positive_int, default=256, help="resolution (ADM centre crop)")
    add("--num-classes", type=positive_int, default=1000, help="classes (+1: the null label)")
    add("--flip", action=argparse.BooleanOptionalAction, help="flip images; default: the mode's")
    add("--num-workers", type=nonneg_int, default=8, help="DataLoader workers per rank")
    add = p.add_argument_group("optimisation").add_argument
    add("--global-batch-size", type=positive_int, default=256, help="images per step, all ranks")
    add("--lr", type=positive_float, default=1e-4, help="AdamW learning rate")
    add("--beta2", type=number(float, 0, 1, high_open=True, what="in [0, 1)"), default=0.999,
        help="AdamW beta2; beta1 is 0.9")
    add("--weight-decay", type=nonneg_float, default=0.0, help="AdamW weight decay")
    add("--warmup-epochs", type=nonneg_float, default=0.0, help="linear warm-up, data epochs")
    add("--warmup-steps", type=nonneg_int, help="the warm-up in steps instead")
    add("--grad-clip", type=nonneg_float, help="max gradient norm, 0 = off; default: the mode's")
    add("--ema", type=probability, default=0.9999, help="EMA decay of the sampled weights")
    add("--max-steps", type=positive_int, default=400_000, help="training steps (papers: 400K)")
    add("--label-drop", type=probability, default=0.1, help="probability of the null label (CFG)")
    add("--time-shift", type=positive_float, default=1.0, help="t -> s t / (1 + (s-1) t); SVG: 0.4")
    add("--seed", type=nonneg_int, default=0, help="the seed of weights, data order and all noise")
    add("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast on GPU; CPU: fp32")
    add("--compile", action="store_true", help="torch.compile each DiT block (GPU)")
    add("--grad-checkpoint", action="store_true", help="recompute blocks in backward: less memory")
    add = p.add_argument_group("features and CoReDi's projection").add_argument
    add("--feat-dim", type=positive_int, default=8, help="d, feature channels per token (ReDi: 8)")
    add("--lambda-z", type=nonneg_float, default=1.0, help="weight of the feature loss (ReDi: 1)")
    add("--feat-drop", type=probability, default=0.0, help="feature dropout; 0.2 enables --cfg-rep")
    add("--pca-images", type=positive_int, default=2048, help="images whose tokens fit the PCA")
    add("--pca-file", help="a run's pca.pt or ReDi's PCA file, instead of a fit")
    add("--proj-init", choices=["pca", "random"], default="pca", help="coredi: the initial P")
    add("--proj-sg", action=argparse.BooleanOptionalAction, default=True,
        help="coredi: stop-gradient on the feature target")
    add("--proj-bn", action=argparse.BooleanOptionalAction, default=True, help="coredi: BN on z~")
    add("--proj-scale", choices=["unit", "pca"], default="unit", help="coredi: std 1, or the PCA's")
    add("--proj-lr", type=positive_float, help="coredi: learning rate of P; default: --lr's")
    add("--vf-weight", type=nonneg_float, default=0.1, help="coredi: VF regularizer weight (ours)")
    add("--vf-map", choices=["learned", "fixed"], default="learned", help="coredi: VF's z~ -> z0")
    add("--ortho-weight", type=nonneg_float, default=0.1, help="coredi: Ortho weight (ours)")
    add("--cov-weight", type=nonneg_float, default=1.0, help="coredi: covariance weight (ours)")
    add("--repa-weight", type=nonneg_float, default=0.5, help="REPA's loss weight (REPA: 0.5)")
    add("--repa-depth", type=positive_int, help="align after this block; default: REPA's by size")
    add = p.add_argument_group("logging and checkpoints").add_argument
    add("--results-dir", default="results", help="parent folder of the run folders")
    add("--run-name", help="run folder; default: <mode>-<space>-<model> (demo: demo-<mode>)")
    add("--resume", action="store_true", help="continue <run folder>/last.pt")
    add("--restart", action="store_true", help="start over; the old run's folder is moved aside")
    add("--log-every", type=positive_int, default=100, help="append mean losses to log.jsonl")
    add("--ckpt-every", type=positive_int, default=5000, help="overwrite last.pt every N steps")
    add("--keep-every", type=nonneg_int, default=50_000, help="also keep step_N.pt (0: never)")
    add("--sample-every", type=nonneg_int, default=10_000, help="EMA sample grid (0: never)")
    add("--fid-every", type=nonneg_int, default=0, help="FID of EMA samples (0: never)")
    add("--fid-ref", help="ADM reference .npz for --fid-every")
    add("--fid-samples", type=positive_int, default=5000, help="samples per in-training FID")
    add("--inception-weights", help="as fid.py's: none = download, or PATH")
    add = p.add_argument_group("SVG space").add_argument
    add("--svg-ae", help="the trained SVG autoencoder (svg_ae.py's last.pt)")
    add("--svg-dino-weights", help="local DINOv3 weights; default: the autoencoder's")
    add("--svg-stats", help="SVG's dinov3_sp_stats.pt; default: fitted at the start")
    add("--stats-images", type=positive_int, default=10_000, help="images that fit the statistics")

    given, _unknown = p.parse_known_args(argv)
    data = given.data_path is not None or given.latent_cache is not None
    demo = "demo-svg" if given.space == "svg" else "demo"
    preset = given.preset or (given.space if data else demo)
    mode = list(M.MODES).index(given.mode)
    p.set_defaults(preset=preset, **{k: v[mode] for k, v in MODE_DEFAULTS.items()})
    if preset != "latent":  # the preset over the mode's defaults; the command line over both
        column = PRESET_NAMES.index(preset)
        p.set_defaults(**{k: v[column] for k, v in PRESETS.items() if v[column] is not _})
    args = p.parse_args(argv)  # answers --help, with the defaults just set
    check_train_flags(args)
    return args


def derive(args):
    """Values that follow from the flags: not written into args, so a checkpoint keeps the flags."""
    lr = args.lr or JIT_BASE_LR * args.global_batch_size / 256
    size = args.model.split("-")[-1].split("/")[0]
    return argparse.Namespace(lr=lr, proj_lr=args.proj_lr or lr, repa_depth=args.repa_depth or
                              REPA_DEPTH.get(size, 8), prediction=SPACES[args.space]["prediction"])


if __name__ == "__main__":
    cli(lambda: main(get_args()))
