"""
Train a class-conditional diffusion transformer in one of four modes, in latent, pixel or SVG space:

  sit     plain SiT flow matching                     (Ma et al. 2024)
  repa    SiT + REPA alignment of a hidden layer      (Yu et al. 2025)
  redi    joint image + fixed-PCA DINOv2 features     (Kouzelis et al. 2025)
  coredi  joint image + learned, co-evolving P        (Kouzelis et al. 2026)

  torchrun --nproc_per_node 8 train.py --mode coredi --latent-cache /data/in256_cache
  torchrun --nproc_per_node 8 train.py --mode redi --space pixel --data-path /imagenet/train
  torchrun --nproc_per_node 8 train.py --mode sit --space svg --svg-ae results/svg-ae/last.pt \\
      --data-path /imagenet/train       # SVG's latent (svg_ae.py's autoencoder): sit and repa only
  python train.py                      # no data: the CPU demo on the built-in synthetic data set
  python train.py --space svg          # the SVG demo (after `python svg_ae.py`, which trains its autoencoder)

Time convention (SiT): x_t = t*x + (1-t)*eps, t=0 noise, t=1 data, velocity target v = x - eps.
"""
import argparse
import hashlib
import json
import math
import os
import signal
import sys
import textwrap
import time
from collections import namedtuple
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import model as M

# -----------------------------------------------------------------------------
# Configuration: argparse defaults come from a preset, applied before the final parse, so `--help` shows the
# values a run will use and anything given on the command line wins. The paper presets reproduce the recipes;
# the demo preset is what `python train.py` with no data runs.

PRESETS = {
    # SiT-XL/2 on SD-VAE latents: SiT's, REPA's and ReDi's recipe (AdamW 1e-4, batch 256, no warm-up).
    "latent": dict(space="latent", model="SiT-XL/2", global_batch_size=256, lr=1e-4, beta2=0.999, warmup_epochs=0),
    # JiT-B/16 on pixels (JiT's main_jit.py): batch 1024, lr 5e-5 per 256 images (derived below), betas (0.9, 0.95),
    # 5 warm-up epochs (6,255 steps of ImageNet's 1.28M images; counted in epochs of the data actually given), no
    # gradient clipping, flips.
    "pixel": dict(space="pixel", model="JiT-B/16", global_batch_size=1024, lr=None, beta2=0.95, warmup_epochs=5,
                  grad_clip=0.0, flip=True),
    # A tiny model on the synthetic set that trains in about 3 minutes on a laptop CPU, with a random encoder;
    # 0.32 epochs of 5000 images at batch 32 = 50 warm-up steps. Its high learning rate is clipped at 1.0 in every
    # mode (our choice, for stability).
    "demo": dict(space="pixel", synthetic=5000, image_size=32, num_classes=10, model="DiT-T/4", global_batch_size=32,
                 lr=1.5e-3, beta2=0.99, warmup_epochs=0.32, max_steps=800, ema=0.99, feat_drop=0.2, enc_weights="tiny",
                 enc_size=112, pca_images=256, num_workers=0, log_every=50, ckpt_every=400, keep_every=0,
                 sample_every=400, grad_clip=1.0),
    # SiT-XL/1 on the 392x16x16 SVG latent (SVG's config/example_svg_xl.yaml and train_svg.py): patch 1, qk-norm,
    # AdamW 1e-4 betas (0.9, 0.999), batch 256, no warm-up, no clipping, flips, t shifted towards noise with s = 0.4;
    # the mode defaults to sit here (SVG's), since the feature modes do not run in this space.
    "svg": dict(space="svg", mode="sit", model="SiT-XL/1", global_batch_size=256, lr=1e-4, beta2=0.999, warmup_epochs=0,
                grad_clip=0.0, flip=True, qk_norm=True, time_shift=0.4),
    # The demo's tiny DiT on the latent of svg_ae.py's demo autoencoder (32 px, 72 channels on an 8x8 grid), with
    # SVG's qk-norm and time shift and the demo's optimiser settings.
    "demo-svg": dict(space="svg", mode="sit", synthetic=2000, image_size=32, num_classes=10, model="DiT-T/1",
                     global_batch_size=32, grad_clip=1.0, lr=1.5e-3, beta2=0.99, warmup_steps=50, max_steps=800,
                     ema=0.99, flip=True, qk_norm=True, time_shift=0.4, svg_ae="results/svg-ae-demo/last.pt",
                     stats_images=512, enc_weights="tiny", enc_size=112, num_workers=0, log_every=50, ckpt_every=400,
                     keep_every=0, sample_every=400),
}
# Each mode's defaults in latent space, from its reference code (README, "Per-mode defaults", gives file and line):
# gradient clipping (REPA clips at 1; SiT and ReDi do not), horizontal flips (SiT flips; REPA's and ReDi's latents
# are unflipped), the SD-VAE that made the training latents (SiT encodes with ft-ema; REPA's preprocessing, which
# ReDi reuses, with ft-mse; both share the encoder, only their decoders differ) and the DINOv2 (REPA: without
# registers; ReDi: with). CoReDi takes ReDi's where the paper is silent.
VAE_EMA, VAE_MSE = "stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse"
MODE_DEFAULTS = {
    "sit": dict(grad_clip=0.0, flip=True, vae_weights=VAE_EMA, enc=M.DINO),
    "repa": dict(grad_clip=1.0, flip=False, vae_weights=VAE_MSE, enc=M.DINO_NOREG),
    "redi": dict(grad_clip=0.0, flip=False, vae_weights=VAE_MSE, enc=M.DINO),
    "coredi": dict(grad_clip=0.0, flip=False, vae_weights=VAE_MSE, enc=M.DINO),
}
JIT_BASE_LR = 5e-5  # JiT scales the learning rate linearly with the batch: lr = 5e-5 * batch / 256
REPA_DEPTH = {"T": 2, "S": 4, "B": 4, "L": 8, "XL": 8}  # REPA aligns block 4 (B) or 8 (L, XL); T is ours


def presets_help():
    """The presets as the flags they set, one paragraph each, for --help (a flag and its value on one line)."""
    def flag(k, v):  # a switch is shown as the switch (--flip, --no-flip), a value as --name value
        name = k.replace("_", "-")
        if isinstance(v, bool):
            return f"--{'' if v else 'no-'}{name}"
        return f"--{name}\0{'derived' if v is None else v}"
    width = max(map(len, PRESETS)) + 3
    return "presets (the defaults above are the chosen preset's; a flag given wins):\n" + "\n".join(
        textwrap.fill(f"  {name:{width - 2}s}{' '.join(flag(k, v) for k, v in d.items())}", 100,
                      subsequent_indent=" " * width, break_on_hyphens=False)
        for name, d in PRESETS.items()).replace("\0", " ")


def get_args(argv=None):
    p = M.ArgumentParser(description=__doc__, add_help=False, epilog=presets_help())
    p.add_argument("-h", "--help", action="store_true", help="show this help (with the preset's defaults) and exit")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="the defaults of a run: the paper recipe of a space, or the CPU demo. Default: demo when no "
                        "--data-path/--latent-cache is given, else the recipe of --space")
    p.add_argument("--mode", choices=list(M.MODES), default="coredi", help="what is trained (see the table above)")
    p.add_argument("--space", choices=["latent", "pixel", "svg"], default="latent",
                   help="latent: SD-VAE latents (SiT's recipe); pixel: raw pixels, x-prediction (JiT's recipe); "
                        "svg: the SVG autoencoder's DINOv3 + residual latent (SVG's recipe; sit and repa only)")
    p.add_argument("--model", default=None,
                   help="<DiT|SiT>-<size>/<patch> (both names build the same network), size "
                        f"{'|'.join(M.SIZES)}, patch 1|2|4|8|16: SiT-XL/2 (latent), DiT-B/16 (pixel, JiT-B/16's "
                        "size); T is our tiny size for the demo and the tests")
    p.add_argument("--repa", action="store_true", help="add REPA's alignment loss to redi/coredi (on in --mode repa)")
    # data
    p.add_argument("--data-path", default=None, help="ImageFolder root (one sub-folder per class); none = demo")
    p.add_argument("--latent-cache", default=None,
                   help="folder made by prepare.py (latent or svg space); redi reads the features stored there by "
                        "prepare.py --features instead of running the encoder")
    p.add_argument("--synthetic", type=M.positive_int, default=5000,
                   help="images in the built-in synthetic set (used without data)")
    p.add_argument("--synthetic-hard", action="store_true",
                   help="the synthetic set's hard variant: the class is a shape alone, in any colour (convergence.py)")
    p.add_argument("--image-size", type=M.positive_int, default=256, help="training resolution (ADM centre crop)")
    p.add_argument("--num-classes", type=M.positive_int, default=1000,
                   help="label embedding rows (the null label is one more)")
    p.add_argument("--num-workers", type=M.nonneg_int, default=8, help="DataLoader worker processes per rank")
    # optimisation
    p.add_argument("--global-batch-size", type=M.positive_int, default=None, help="images per step over all ranks")
    p.add_argument("--lr", type=M.positive_float, default=None,
                   help="AdamW learning rate; pixel preset: JiT's 5e-5 * batch / 256 when not given")
    p.add_argument("--beta2", type=M.number(float, 0, 1, high_open=True, what="in [0, 1)"), default=None,
                   help="AdamW beta2 (beta1 is 0.9): SiT 0.999, JiT 0.95")
    p.add_argument("--weight-decay", type=M.nonneg_float, default=0.0,
                   help="AdamW weight decay (SiT, REPA, ReDi, JiT: 0)")
    p.add_argument("--warmup-epochs", type=M.nonneg_float, default=None,
                   help="linear learning-rate warm-up, in epochs of the data given (JiT: 5; SiT: 0)")
    p.add_argument("--warmup-steps", type=M.nonneg_int, default=None, help="warm-up in steps instead of --warmup-epochs")
    p.add_argument("--grad-clip", type=M.nonneg_float, default=None,
                   help="max gradient norm (0 = off); default: the mode's")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips of the training images; default: the mode's")
    p.add_argument("--ema", type=M.probability, default=0.9999,
                   help="EMA decay of the weights that are sampled (DiT, SiT)")
    p.add_argument("--max-steps", type=M.positive_int, default=400_000,
                   help="training steps (the papers compare at 400K)")
    p.add_argument("--label-drop", type=M.probability, default=0.1, help="probability of the null label, for CFG (DiT)")
    p.add_argument("--seed", type=M.nonneg_int, default=0,
                   help="the seed of everything: weights, data order, all noise")
    p.add_argument("--time-shift", type=M.positive_float, default=1.0,
                   help="train on t -> s t / (1 + (s - 1) t), s < 1 moving t towards noise (SVG: 0.4); 1 = none")
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False,
                   help="DiT: LayerNorm on each head's queries and keys (SVG's DiT)")
    # features (redi / coredi)
    p.add_argument("--feat-dim", type=M.positive_int, default=8,
                   help="d, projected feature channels per token (ReDi: 8)")
    p.add_argument("--lambda-z", type=M.nonneg_float, default=1.0, help="weight of the feature loss (ReDi: 1)")
    p.add_argument("--feat-drop", type=M.probability, default=0.0,
                   help="per-sample feature dropout; 0.2 (ReDi) enables representation guidance (--cfg-rep)")
    p.add_argument("--pca-images", type=M.positive_int, default=2048, help="images whose encoder tokens fit the PCA")
    p.add_argument("--pca-file", default=None, help="a projection saved by an earlier run (its pca.pt) instead of a fit")
    p.add_argument("--proj-init", choices=["pca", "random"], default="pca", help="coredi: initial P")
    p.add_argument("--proj-sg", action=argparse.BooleanOptionalAction, default=True,
                   help="coredi: stop-gradient on the feature target (the paper's stabiliser)")
    p.add_argument("--proj-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="coredi: batch norm (no affine) on z~ (our reading of the paper's 'normalization')")
    p.add_argument("--proj-lr", type=M.positive_float, default=None, help="coredi: learning rate of P; none = --lr")
    p.add_argument("--vf-weight", type=M.nonneg_float, default=0.1,
                   help="coredi: weight of the VF regularizer (our choice)")
    p.add_argument("--vf-map", choices=["learned", "fixed"], default="learned",
                   help="coredi: VF's map from z~ back to the encoder space: a learned linear map, or P^T")
    p.add_argument("--ortho-weight", type=M.nonneg_float, default=0.1,
                   help="coredi: weight of ||P^T P - I||^2 (our choice)")
    p.add_argument("--cov-weight", type=M.nonneg_float, default=1.0,
                   help="coredi: weight of the off-diagonal covariance penalty (our choice)")
    p.add_argument("--repa-weight", type=M.nonneg_float, default=0.5,
                   help="weight of REPA's alignment loss (REPA: 0.5)")
    p.add_argument("--repa-depth", type=M.positive_int, default=None,
                   help="align after this block; none = REPA's choice by model size (B: 4, L/XL: 8)")
    # frozen networks
    p.add_argument("--enc", default=None, help="timm name of the frozen encoder; default: the mode's")
    p.add_argument("--enc-weights", default=None,
                   help="none = download with timm; PATH = a local weights file that timm loads for --enc: timm's "
                        "model.safetensors or Meta's original .pth (see README, Offline and smoke tests); "
                        "random = the architecture with random weights, tiny = a 2-block random one (demo, tests)")
    p.add_argument("--enc-size", type=M.positive_int, default=224, help="the encoder's input resolution (DINOv2: 224)")
    p.add_argument("--vae-weights", default=None,
                   help="SD-VAE: a hub name (downloaded once), a local diffusers folder (config.json and the weights), "
                        "or 'random' (its architecture with random weights: tests); default: the mode's")
    p.add_argument("--svg-ae", default=None, help="svg: the trained SVG autoencoder (svg_ae.py's last.pt)")
    p.add_argument("--svg-dino-weights", default=None,
                   help="svg: local DINOv3 weights for the autoencoder (default: the path its run recorded)")
    p.add_argument("--svg-stats", default=None,
                   help="svg: SVG's per-channel latent statistics (its dinov3_sp_stats.pt); default: fitted on "
                        "--stats-images images at the start and kept in the checkpoint")
    p.add_argument("--stats-images", type=M.positive_int, default=10_000, help="svg: images that fit the latent statistics")
    # bookkeeping
    p.add_argument("--results-dir", default="results", help="parent folder of the run folders")
    p.add_argument("--run-name", default=None,
                   help="run folder under --results-dir; none = <mode>-<space>-<model> (the demo: demo-<mode>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <run folder>/last.pt; only --max-steps, --lr, --proj-lr, the logging, checkpoint, "
                        "sample and FID flags, --num-workers, paths and speed flags may change (RESUME_MAY_CHANGE)")
    p.add_argument("--restart", action="store_true",
                   help="start over in a run folder that holds a run: its files are moved to <run folder>-<time>")
    p.add_argument("--log-every", type=M.positive_int, default=100,
                   help="append averaged losses to log.jsonl every N steps")
    p.add_argument("--ckpt-every", type=M.positive_int, default=5000, help="overwrite last.pt every N steps")
    p.add_argument("--keep-every", type=M.nonneg_int, default=50_000,
                   help="also keep step_N.pt every N steps (0: never)")
    p.add_argument("--sample-every", type=M.nonneg_int, default=10_000,
                   help="EMA sample grid and a row of the projection picture every N steps (0: never)")
    p.add_argument("--fid-every", type=M.nonneg_int, default=0, help="FID of EMA samples every N steps (0: never)")
    p.add_argument("--fid-ref", default=None, help="ADM reference .npz for --fid-every")
    p.add_argument("--fid-samples", type=M.positive_int, default=5000, help="samples per in-training FID")
    p.add_argument("--inception-weights", default=None,
                   help="as fid.py's: none = download; PATH = local pt_inception-2015-12-05-6726825d.pth; "
                        "random-smoke-test = random weights, meaningless FID (smoke tests)")
    # speed
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast on GPU; CPU is fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (GPU)")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute blocks in backward (memory only)")

    given, _ = p.parse_known_args(argv)
    demo = "demo-svg" if given.space == "svg" else "demo"
    preset = given.preset or (demo if given.data_path is None and given.latent_cache is None else given.space)
    p.set_defaults(**{**MODE_DEFAULTS[given.mode], **PRESETS[preset]})  # the preset wins; the command line over both
    args = p.parse_args(argv)
    if args.help:
        p.print_help()
        p.exit()
    del args.help
    args.preset = preset

    if args.space == "svg" and M.MODES[args.mode].features:
        raise M.UserError(f"--space svg trains sit or repa, not {args.mode}: SVG's latent already is the encoder's "
                          f"feature map, so there are no separate features to diffuse beside it")
    if args.space == "svg" and args.svg_ae is None:
        raise M.UserError("--space svg needs --svg-ae PATH, the trained SVG autoencoder (svg_ae.py's last.pt)")
    if args.qk_norm and args.model.startswith("JiT"):
        raise M.UserError("--qk-norm is a DiT/SiT option (JiT always normalises queries and keys)")
    # Derived values: fixed by the space, or by a paper's rule.
    args.prediction = SPACES[args.space]["prediction"]
    if args.lr is None:
        args.lr = JIT_BASE_LR * args.global_batch_size / 256
    args.proj_lr = args.proj_lr or args.lr
    args.repa = args.repa or M.MODES[args.mode].repa
    if args.repa_depth is None:
        args.repa_depth = REPA_DEPTH.get(args.model.split("-")[-1].split("/")[0], 8)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.global_batch_size % world:
        raise M.UserError(f"--global-batch-size {args.global_batch_size} is not divisible by the {world} ranks; "
                          f"use a multiple of {world}")
    if args.resume and args.restart:
        raise M.UserError("--resume and --restart exclude each other: continue the run, or start it over")
    if args.pca_file and not os.path.isfile(args.pca_file):
        raise M.UserError(f"--pca-file {args.pca_file}: no such file; pass the pca.pt of an earlier run")
    if bool(args.fid_every) != bool(args.fid_ref):
        raise M.UserError("--fid-every N needs --fid-ref REF.npz (an ADM reference batch), and --fid-ref needs --fid-every")
    if args.fid_every and args.fid_samples // world * world < 4:
        raise M.UserError(f"--fid-samples {args.fid_samples}: the FID needs at least 4 samples (a few thousand to mean "
                          f"something)")
    return args


# What each space fixes. Latent: SD-VAE latents (8x fewer pixels, 4 channels), SiT's velocity prediction,
# t ~ U(0, 1) and ReDi's feature layout (extra input channels). Pixel: JiT's x-prediction, t ~ sigmoid(N(-0.8, 0.8))
# and features added per token (the image token grid is the encoder grid). SVG: velocity prediction and t ~ U(0, 1)
# (then --time-shift) on the SVG latent, whose channels and grid the autoencoder sets (392 at 16x16 at 256 px).
SPACES = {
    "latent": dict(channels=4, downsample=8, prediction="v", fusion="channels"),
    "pixel": dict(channels=3, downsample=1, prediction="x", fusion="tokens"),
    "svg": dict(channels=None, downsample=None, prediction="v", fusion=None),
}
JIT_T_MEAN, JIT_T_STD = -0.8, 0.8  # JiT's logit-normal time distribution


# -----------------------------------------------------------------------------
# Data: ImageFolder with ADM's centre crop, the synthetic set, and the latent cache

IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def center_crop_arr(img, size):
    """ADM's crop: halve with a box filter while the image is at least twice the target, resize the short side
    to `size` with bicubic, crop the centre. Returns uint8 HWC."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    a = np.asarray(img)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top:top + size, left:left + size]


class ImageFolder:
    """root/<class>/<image>; classes sorted by name. Items are (uint8 CHW image, label)."""

    def __init__(self, root, size):
        if not os.path.isdir(root):
            raise M.UserError(f"data directory {root} does not exist")
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not classes:
            raise M.UserError(f"{root} has no class folders: expected {root}/<class>/<image>.jpg")
        self.files = [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
                      for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMG_EXT)]
        if not self.files:
            raise M.UserError(f"{root} has class folders but no images ({', '.join(IMG_EXT)})")
        self.size, self.num_classes = size, len(classes)
        self.labels = np.array([label for _, label in self.files])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path, label = self.files[i]
        try:
            with Image.open(path) as img:
                a = center_crop_arr(img.convert("RGB"), self.size)
        except Exception as e:
            raise M.UserError(f"cannot read image {path}: {e}") from None
        return torch.from_numpy(a.copy()).permute(2, 0, 1), label


class SyntheticImages:
    """A procedural, class-conditional image set at any resolution, deterministic by (seed, index). Class c is a
    shape (disc, square, triangle, ring, cross) in a class hue; position, size, rotation, colours and background
    vary per image. Enough structure for a tiny model to learn in minutes, and for the tests.
    hard=True (convergence.py): the class is the shape alone (one of 10), its hue is random, positions spread wider
    and the background carries a random grating, so no colour statistic gives the class away and a model must
    learn shapes, which is what a semantic encoder knows."""
    SHAPES, HARD_SHAPES = 5, 10

    def __init__(self, n, size, num_classes=10, seed=0, hard=False):
        self.n, self.size, self.num_classes, self.seed, self.hard = n, size, num_classes, seed, hard
        self.labels = np.arange(n) % num_classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        c = i % self.num_classes
        v, u = np.meshgrid(*[np.linspace(-1, 1, self.size)] * 2, indexing="ij")
        cx, cy, rot = rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0, np.pi)
        s = rng.uniform(0.35, 0.6)
        if self.hard:
            cx, cy = 1.4 * cx, 1.4 * cy
        x, y = (u - cx) * np.cos(rot) + (v - cy) * np.sin(rot), -(u - cx) * np.sin(rot) + (v - cy) * np.cos(rot)
        r = np.hypot(x, y)
        shapes = [lambda: r - s,  # signed distances, negative inside
                  lambda: np.maximum(abs(x), abs(y)) - 0.8 * s,
                  lambda: np.maximum(abs(x) * 0.866 + y * 0.5, -y) - 0.5 * s,
                  lambda: abs(r - 0.7 * s) - 0.25 * s,
                  lambda: np.minimum(np.maximum(abs(x) - 0.25 * s, abs(y) - s), np.maximum(abs(y) - 0.25 * s, abs(x) - s)),
                  # the hard set's five more: bar, square frame, half disc, five-pointed star, two dots
                  lambda: np.maximum(abs(x) - s, abs(y) - 0.3 * s),
                  lambda: abs(np.maximum(abs(x), abs(y)) - 0.65 * s) - 0.18 * s,
                  lambda: np.maximum(r - s, -y),
                  lambda: r - s * (0.6 + 0.4 * np.cos(5 * np.arctan2(y, x))),
                  lambda: np.minimum(np.hypot(x - 0.5 * s, y), np.hypot(x + 0.5 * s, y)) - 0.4 * s]
        sdf = shapes[c % (self.HARD_SHAPES if self.hard else self.SHAPES)]()
        inside = np.clip(0.5 - sdf * self.size / 4, 0, 1)[..., None]  # ~2-pixel anti-aliased edge
        hue = (c // self.SHAPES) / max(1, (self.num_classes - 1) // self.SHAPES + 1) + rng.uniform(-0.04, 0.04)
        fg = 0.5 + 0.45 * np.cos(2 * np.pi * (hue + np.array([0, 1 / 3, 2 / 3])))
        bg = rng.uniform(0.0, 0.35, 3) + 0.15 * v[..., None] * rng.uniform(-1, 1, 3)
        if self.hard:  # drawn after the easy set's numbers, so hard=False images stay as they were
            fg = 0.5 + 0.45 * np.cos(2 * np.pi * (rng.uniform() + np.array([0, 1 / 3, 2 / 3])))
            freq, angle, phase = rng.uniform(4, 12), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
            grating = np.sin(freq * (u * np.cos(angle) + v * np.sin(angle)) + phase)[..., None]
            bg = bg + 0.12 * grating * rng.uniform(0.3, 1, 3)
        img = inside * fg + (1 - inside) * bg
        return torch.from_numpy((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).permute(2, 0, 1), c


class LatentCache:
    """The folder written by prepare.py, memory-mapped: the VAE posterior moments (N, 8, h, w) (SVG: the raw SVG
    latents (N, C, h, w)), the uint8 images (N, H, W, 3) that the encoder needs (absent from a --no-images cache),
    redi's projected features (N, views, L, d) where prepare.py --features stored them (view 1: of the flipped
    image), and the labels. Items are ({"latent", "image", "features"}, label), with the arrays named in self.keys
    (use_cache sets them: a run reads only what it uses)."""

    def __init__(self, root, size, vae_weights, space="latent", svg_ae=None):
        # prepare.py writes meta.json last and renames the whole folder into place, so a cache without it, or whose
        # arrays disagree with it (a copy cut short, a file replaced), is incomplete: refused with the file named.
        if not os.path.isfile(os.path.join(root, "meta.json")):
            raise M.UserError(f"{root} is not a complete latent cache (no meta.json); make it with prepare.py")
        try:
            with open(os.path.join(root, "meta.json")) as f:
                meta = json.load(f)
            n, s, made = meta["num_images"], meta["image_size"], meta.get("space", "latent")
            feats = meta.get("features")
            want = {"latent": ("latents.npy" if made == "svg" else "moments.npy",
                               None if made == "svg" else (n, 8, s // 8, s // 8)), "labels": ("labels.npy", (n,))}
            if meta.get("images", True):  # caches made before --no-images existed all hold images
                want["image"] = ("images.npy", (n, s, s, 3))
            if feats:
                want["features"] = ("features.npy", (n, feats["views"], math.prod(feats["grid"]), feats["feat_dim"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise M.UserError(f"{root}/meta.json is unreadable ({type(e).__name__}); remake the cache with prepare.py") from None
        if made != space:
            raise M.UserError(f"the latent cache {root} holds {made} latents, but this run is --space {space}")
        self.arrays = {}
        for k, (name, shape) in want.items():
            path = os.path.join(root, name)
            try:
                a = self.arrays[k] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:  # missing, or shorter than its header says (a cut copy)
                raise M.UserError(f"latent cache file {path} is missing or truncated ({type(e).__name__}); "
                                  f"remake the cache with prepare.py") from None
            if a.shape[:1] != (n,) or (shape is not None and a.shape != shape):
                raise M.UserError(f"latent cache file {path} has shape {a.shape}, but meta.json says "
                                  f"{shape or (n, '...')}; remake the cache with prepare.py")
        if space == "svg" and (meta["image_size"] != size or meta["svg_ae"] != os.path.abspath(svg_ae)):
            raise M.UserError(f"the latent cache {root} was made at {meta['image_size']} px with the SVG autoencoder "
                              f"{meta['svg_ae']}, but this run asks for {size} px with {os.path.abspath(svg_ae)}; "
                              f"remake it with prepare.py --space svg or change --image-size/--svg-ae")
        if space == "latent" and (meta["image_size"] != size or meta["vae"] != vae_weights):
            raise M.UserError(f"the latent cache {root} was made at {meta['image_size']} px with VAE {meta['vae']}, "
                              f"but this run asks for {size} px with {vae_weights}; "
                              f"remake it with prepare.py or change --image-size/--vae-weights")
        self.root, self.meta, self.num_classes = root, meta, meta["num_classes"]
        self.labels = self.arrays.pop("labels")
        self.keys = [k for k in ("latent", "image") if k in self.arrays]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = {k: torch.from_numpy(np.array(self.arrays[k][i])) for k in self.keys}
        if "image" in x:
            x["image"] = x["image"].permute(2, 0, 1)  # stored HWC, as images are; CHW as ImageFolder's
        return x, int(self.labels[i])


def weights_name(weights):
    """--enc-weights as a cache records it: a file as its absolute path, a name (or none: download) as given."""
    return os.path.abspath(weights) if weights and os.path.exists(weights) else weights


def encoder_seed(args):
    """The seed that made a random encoder's weights (make_encoder), None for real weights."""
    return args.seed if args.enc_weights in ("random", "tiny") else None


def runs_encoder(args, cached=False):
    """Whether the frozen encoder runs every step: for the features of redi and coredi (unless redi's come from the
    latent cache: cached) and for REPA's target."""
    return bool((M.MODES[args.mode].features and not cached) or args.repa)


def use_cache(data, args):
    """Choose what the run reads from a latent cache, refusing in one line a cache that cannot serve it. redi takes
    its features from the cache where prepare.py --features stored them, and then needs no encoder (unless REPA is
    on) and no images; the cache must have been made by the run's encoder, projection size, PCA (--pca-file) and
    flips. Every other use of the encoder needs the images. Returns whether the features come from the cache."""
    if not isinstance(data, LatentCache):
        return False
    f, root = data.meta.get("features"), data.root
    cached = args.mode == "redi" and f is not None
    if cached:
        made = (f["enc"], f["enc_weights"], f["enc_size"], f["feat_dim"], f["enc_seed"])
        asked = (args.enc, weights_name(args.enc_weights), args.enc_size, args.feat_dim, encoder_seed(args))
        if made != asked:
            say = lambda e: f"encoder {e[0]} (weights {e[1]}{'' if e[4] is None else f', seed {e[4]}'}, {e[2]} px) " \
                            f"with --feat-dim {e[3]}"
            raise M.UserError(f"the features in {root} were made by {say(made)}, but this run asks for {say(asked)}; "
                              f"match the flags or remake the cache with prepare.py --features")
        if args.flip and f["views"] < 2:
            raise M.UserError(f"this run flips images (--flip) but {root} holds the features of unflipped images "
                              f"only; remake it with prepare.py --features --flip, or train with --no-flip")
    if runs_encoder(args, cached):
        if "image" not in data.arrays:
            need = "REPA's target" if args.repa else f"{args.mode}'s features"
            raise M.UserError(f"the latent cache {root} holds no images (prepare.py --no-images), but {need} come "
                              f"from the encoder, which needs them; remake it without --no-images")
    elif "image" in data.keys:  # nothing reads it: the loader skips the largest array
        data.keys.remove("image")
    if cached:
        data.keys.append("features")
    return cached


def make_data(args):
    """The run's data set: the latent cache, an image folder, or (no data given) the synthetic set."""
    if args.latent_cache:
        if args.space == "pixel":
            raise M.UserError("--latent-cache is for --space latent or svg")
        data = LatentCache(args.latent_cache, args.image_size, args.vae_weights, args.space, args.svg_ae)
    elif args.data_path:
        data = ImageFolder(args.data_path, args.image_size)
    else:
        data = SyntheticImages(args.synthetic, args.image_size, args.num_classes, args.seed, args.synthetic_hard)
    if data.num_classes > args.num_classes:
        raise M.UserError(f"the data has {data.num_classes} classes but --num-classes is {args.num_classes}")
    return data


def fixed_images(data, n):
    """n uint8 images of n different classes spread over the data's classes (the first image of each), and their
    labels, for pictures that follow the same images through training."""
    classes = np.unique(data.labels)
    picked = classes[np.linspace(0, len(classes) - 1, min(n, len(classes))).round().astype(int)]
    return torch.stack([item_image(data[int(np.argmax(data.labels == c))]) for c in picked]), picked.tolist()


def item_image(item):
    """The uint8 CHW image of a data item; a latent-cache item is a dict."""
    x = item[0]
    return x["image"] if isinstance(x, dict) else x


class Flipped:
    """Horizontal flips decided by the sampler (so they are reproducible): items are requested as (index, flip)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, item):
        i, flip = item
        x, y = self.data[i]
        if not isinstance(x, dict):
            return (x.flip(-1) if flip else x), y
        # A latent-cache item: the latent and the image are flipped; the encoder is not equivariant to flips, so the
        # features of the flipped image were stored (view 1), not derived.
        return {k: v[int(flip)] if k == "features" else v.flip(-1) if flip else v for k, v in x.items()}, y


class GlobalBatchSampler:
    """Epoch e visits the data in a permutation seeded by (seed, e); global batch k is positions
    [k*G, (k+1)*G) of it and rank r takes the r-th slice. The data order is a function of the step alone,
    whatever the number of ranks, so a resumed run continues where it stopped."""

    def __init__(self, n, global_batch, rank, world, seed, flip=True, start_step=0):
        if n < global_batch:
            raise M.UserError(f"the data set has {n} images, fewer than one global batch ({global_batch})")
        self.n, self.G, self.rank, self.world, self.seed, self.flip = n, global_batch, rank, world, seed, flip
        self.per_epoch = n // global_batch
        self.step = start_step

    def __iter__(self):
        b = self.G // self.world
        while True:
            epoch, k = divmod(self.step, self.per_epoch)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm, flips = torch.randperm(self.n, generator=g), torch.rand(self.n, generator=g) < 0.5
            for k in range(k, self.per_epoch):
                pos = perm[k * self.G + self.rank * b: k * self.G + (self.rank + 1) * b]
                yield [(int(i), self.flip and bool(flips[i])) for i in pos]
                self.step += 1


# -----------------------------------------------------------------------------
# Networks: the frozen encoder and VAE, the DiT, its EMA and the feature projection; the optimizer

def make_encoder(args):
    """The frozen encoder. A random one (the demo's 'tiny', or 'random') is seeded, so that every rank, a resumed
    run and ablation.py's evaluation get the same network."""
    torch.manual_seed(args.seed)
    tiny = dict(depth=2, embed_dim=64, num_heads=2) if args.enc_weights == "tiny" else {}
    return M.Encoder(args.enc, "random" if tiny else args.enc_weights, args.enc_size, **tiny)


def make_svg_latents(args, device):
    """SVG space: the frozen autoencoder with SVG's statistics (--svg-stats), or unit ones until fit_svg_stats or
    the checkpoint sets them."""
    import svg_ae  # not at the top: svg_ae.py imports this file
    if not os.path.isfile(args.svg_ae):
        raise M.UserError(f"--svg-ae {args.svg_ae} not found; train the SVG autoencoder with svg_ae.py "
                          f"(`python svg_ae.py` makes the demo's results/svg-ae-demo/last.pt)")
    ae = svg_ae.load_autoencoder(args.svg_ae, args.svg_dino_weights)
    dino = args.svg_dino_weights or torch.load(args.svg_ae, mmap=True, weights_only=True)["config"]["dino_weights"]
    if dino in ("random", "tiny"):
        print(f"NOTE: the SVG autoencoder's DINO has RANDOM weights ({dino}); fine for the demo, meaningless otherwise")
    if ae.dino.img_size != args.image_size:
        raise M.UserError(f"the SVG autoencoder {args.svg_ae} was trained at {ae.dino.img_size} px, this run is at "
                          f"{args.image_size} px (--image-size)")
    C = ae.decoder.conv_in.in_channels
    mean, std = M.read_svg_stats(args.svg_stats, C) if args.svg_stats else (torch.zeros(C), torch.ones(C))
    return M.SVGLatents(ae, mean, std).to(device)


@torch.no_grad()
def fit_svg_stats(latents, data, args, device, rank):
    """Per-channel mean and std of the raw SVG latent over the positions of --stats-images images (a fixed seeded
    subset in a fixed order, so fixed encoding chunks: the same on every rank; rank 0's are broadcast anyway)."""
    n = min(args.stats_images, len(data))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
    total, sq, count = 0, 0, 0
    for i in range(0, n, 256):
        items = [data[j][0] for j in idx[i:i + 256]]
        if isinstance(items[0], dict):  # the SVG latent cache
            z = torch.stack([x["latent"] for x in items]).to(device).double()
        else:
            z = latents.raw(torch.stack(items).to(device).float() / 127.5 - 1).double()
        total, sq, count = total + z.sum((0, 2, 3)), sq + z.pow(2).sum((0, 2, 3)), count + z[:, 0].numel()
    mean = total / count
    latents.mean.copy_(mean)
    latents.std.copy_((sq / count - mean ** 2).clamp_min(1e-12).sqrt())
    if rank == 0:
        print(f"fitted the SVG latent statistics on {n} images: mean std over channels "
              f"{latents.std.mean().item():.3g}")


def build_networks(args, enc_dim=0, latent_shape=None):
    """The DiT (seeded: the same initial weights on every rank), its EMA copy and the mode's feature projection.
    enc_dim: the encoder's channels (REPA's target and the projection's input); latent_shape: (channels, grid) of
    the SVG latent, which the autoencoder sets. Returns dit, ema, proj, arch; arch is what a checkpoint stores to
    rebuild the DiT."""
    space, mode = SPACES[args.space], M.MODES[args.mode]
    channels, size = latent_shape or (space["channels"], args.image_size // space["downsample"])
    arch = dict(input_size=size, in_channels=channels,
                num_classes=args.num_classes, feat_dim=args.feat_dim if mode.features else 0,
                fusion=space["fusion"], repa_depth=args.repa_depth if args.repa else 0,
                repa_dim=enc_dim if args.repa else 0)
    if args.qk_norm:
        arch["qk_norm"] = True
    torch.manual_seed(args.seed)
    dit = M.create_model(args.model, **arch)
    dit.grad_checkpoint = args.grad_checkpoint
    ema = deepcopy(dit).requires_grad_(False).eval()
    proj = M.build_projection(args.mode, enc_dim, args.feat_dim, batchnorm=args.proj_bn,
                              vf_map=args.vf_map if args.vf_weight else None)
    return dit, ema, proj, arch


def make_optimizer(dit, proj, args, fused=False):
    """AdamW over the DiT and, in its own parameter group (--proj-lr), CoReDi's P. base_lr is the rate after warm-up."""
    groups = [{"params": [p for p in dit.parameters() if p.requires_grad], "lr": args.lr}]
    if proj is not None and any(p.requires_grad for p in proj.parameters()):
        groups.append({"params": [p for p in proj.parameters() if p.requires_grad], "lr": args.proj_lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=(0.9, args.beta2), weight_decay=args.weight_decay, fused=fused)


def schedule(args, n_images):
    """The warm-up in steps, and one-line warnings for a run that cannot learn as asked. The warm-up counts epochs of
    the data actually given (JiT's 5 epochs are 6,255 steps of ImageNet at batch 1024, but 40 steps of 64 images at
    batch 8); --warmup-steps, if given, wins. Adam moves each weight by at most about lr per step, so the learning
    rate summed over the run bounds how far any weight can travel: under 0.01, below the weights' initial scale
    (xavier: 0.02 for XL, 0.06 for T), the model stays at its initialisation, whose output is zero (DiT zero-inits
    its last layer): flat grey samples."""
    per_epoch = n_images // args.global_batch_size  # GlobalBatchSampler's full batches
    warm = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_epochs * per_epoch)
    steps, w = args.max_steps, min(warm, args.max_steps)
    travel = args.lr * (w * (w + 1) / (2 * warm) + steps - w) if warm else args.lr * steps
    warnings = []
    if warm > steps:
        warnings.append(f"WARNING: the warm-up ({warm} steps; an epoch of {n_images} images is {per_epoch} steps) is "
                        f"longer than the run ({steps} steps): the learning rate never reaches --lr {args.lr:.3g}; "
                        f"lower --warmup-epochs")
    if travel < 0.01:
        warnings.append(f"WARNING: the learning rate summed over the run is {travel:.2g} (--lr {args.lr:.3g}, {steps} "
                        f"steps, {warm} warm-up): Adam moves a weight by at most about lr per step, so the weights "
                        f"stay near their initialisation and the samples stay flat; raise --lr or --max-steps")
    return warm, warnings


def warmup_lr(opt, step, warmup_steps):
    """Linear warm-up to each group's base_lr over the first warmup_steps steps, then constant (SiT, JiT)."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * min(1.0, (step + 1) / warmup_steps) if warmup_steps else g["base_lr"]


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


@torch.no_grad()
def fit_projection(proj, data, encoder, args, device, rank):
    """Fit the standardization and PCA on the encoder tokens of --pca-images images (a fixed seeded subset,
    the same on every rank; rank 0's result is broadcast anyway)."""
    n = min(args.pca_images, len(data))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
    tokens = []
    for i in range(0, n, 64):
        imgs = torch.stack([item_image(data[j]) for j in idx[i:i + 64]]).to(device)
        tokens.append(encoder(imgs.float() / 127.5 - 1).float().reshape(-1, encoder.dim).cpu())
    proj.cpu().fit(torch.cat(tokens), init=args.proj_init, generator=torch.Generator().manual_seed(args.seed))
    proj.to(device)
    if rank == 0:
        print(f"fitted the projection on {n} images: PCA variance of the first {args.feat_dim} components "
              f"{[round(v, 2) for v in proj.pca_var.tolist()]}")


# -----------------------------------------------------------------------------
# A training step's inputs: the clean image or latent, and every random number, drawn per sample from a
# generator seeded by (seed, step, global position in the batch). 1 or N ranks, and a resumed run, see the
# same numbers, and there is no RNG state to save.

def model_input(batch, device, vae=None, eps_vae=None, amp=None):
    """A data batch -> (clean x that the DiT denoises, the image in [-1, 1] for the encoder, redi's projected
    features from the latent cache, labels); what the batch does not carry is None."""
    x, y = batch
    y = y.to(device)
    if isinstance(x, dict):  # latent cache: the arrays that use_cache chose
        img = x["image"].to(device).float() / 127.5 - 1 if "image" in x else None
        zt = x["features"].to(device).float() if "features" in x else None
        if isinstance(vae, M.SVGLatents):  # SVG: a deterministic latent, standardised
            return vae.normalize(x["latent"].to(device).float()), img, zt, y
        return M.VAE.sample(x["latent"].to(device).float(), eps_vae), img, zt, y  # a fresh latent sample every step
    img = x.to(device).float() / 127.5 - 1
    if vae is None:  # pixel space
        return img, img, None, y
    if isinstance(vae, M.SVGLatents):  # encoded in fp32, as SVG does
        return vae.encode(img), img, None, y
    with amp or torch.autocast(device.type, enabled=False):  # latent space from images: encode on the fly
        return M.VAE.sample(vae.moments(img).float(), eps_vae), img, None, y


Noise = namedtuple("Noise", "t drop_label drop_feat eps_x eps_z eps_vae")
Noise.__doc__ = """A step's random numbers for B samples: t (B,) in [0, 1], 0 = noise, 1 = data (after time_shift,
M.shift_time, which is exactly the identity at 1); boolean label and feature dropout (B,); standard normal noise of
the image, of the feature tokens and of the VAE posterior sample (None where the run has no such stream)."""


def step_noise(seed, step, positions, x_shape, z_shape=None, vae_shape=None, space="latent", label_drop=0.0,
               feat_drop=0.0, device="cpu", time_shift=1.0):
    t, drop, eps_x, eps_z, eps_vae = [], [], [], [], []
    for pos in positions:
        g = M.seeded_generator(seed, step, pos, device=device)
        if space == "pixel":  # JiT's logit-normal
            t.append(torch.sigmoid(JIT_T_MEAN + JIT_T_STD * torch.randn(1, generator=g, device=device)))
        else:  # SiT's uniform
            t.append(torch.rand(1, generator=g, device=device))
        drop.append(torch.rand(2, generator=g, device=device))
        eps_x.append(torch.randn(x_shape, generator=g, device=device))
        eps_z.append(torch.randn(z_shape, generator=g, device=device) if z_shape else None)
        eps_vae.append(torch.randn(vae_shape, generator=g, device=device) if vae_shape else None)
    stack = lambda xs: torch.stack(xs) if xs[0] is not None else None
    drop = torch.stack(drop)
    return Noise(M.shift_time(torch.cat(t), time_shift), drop[:, 0] < label_drop, drop[:, 1] < feat_drop, stack(eps_x), stack(eps_z),
                 stack(eps_vae))


# -----------------------------------------------------------------------------
# The loss: one module, so DDP averages the gradients of the DiT and of the projection P together

class JointLoss(nn.Module):
    """Flow matching on the image, plus (redi, coredi) on the projected features, plus REPA's alignment, plus
    (coredi) the regularizers of the learned projection. The defaults are the papers' values (ReDi: lambda_z 1;
    REPA: 0.5) and ours where the CoReDi paper is silent (VF 0.1, Ortho 0.1, Cov 1)."""

    def __init__(self, dit, proj=None, enc_grid=None, prediction="v", lambda_z=1.0, proj_sg=True, vf_weight=0.1,
                 ortho_weight=0.1, cov_weight=1.0, repa_weight=0.5):
        super().__init__()
        self.dit, self.proj, self.enc_grid, self.prediction = dit, proj, enc_grid, prediction
        self.lambda_z, self.proj_sg, self.repa_weight = lambda_z, proj_sg, repa_weight
        learned = proj is not None and proj.learnable  # the regularizers act on a learned P only
        self.reg_weights = dict(vf=vf_weight, ortho=ortho_weight, cov=cov_weight) if learned else {}

    def forward(self, x, y, z0, noise, diagnostics=False, zt=None):
        """x: clean image or latent (B, C, H, W); y: labels; z0: encoder tokens (B, L, D) or None; noise: a Noise
        for these samples; zt: the projected features z~ (B, L, d) when they come from the latent cache (redi), in
        place of proj(z0). Returns the total loss and a dict of logged terms, with the collapse diagnostics of z~
        when asked (an SVD: only at logging steps)."""
        dit, t = self.dit, noise.t
        y = torch.where(noise.drop_label, dit.num_classes, y)  # the null label, for CFG
        tt = t.view(-1, 1, 1, 1)
        x_t = tt * x + (1 - tt) * noise.eps_x
        logs, z_in, terms = {}, None, {}
        if self.proj is not None:
            zt = self.proj(z0) if zt is None else zt  # z~ on the encoder grid (B, L_enc, d)
            if diagnostics:
                std, logs["z_erank"] = M.feature_stats(zt)
                logs["z_std_min"] = std.min()
            z = dit.features_in(zt, self.enc_grid)  # ReDi's channel layout, or per token
            tz = t.view(-1, *[1] * (z.dim() - 1))
            z_t = tz * z + (1 - tz) * noise.eps_z
            keep = (~noise.drop_feat).float()  # feature dropout: zero input, no feature loss
            z_in = z_t * keep.view_as(tz)
            # Stop-gradient: P learns only through the model's input z_in. The target and, with x-prediction, the
            # z_t inside the x -> v conversion are constants of the feature loss.
            target_z, z_t = (z.detach(), z_t.detach()) if self.proj_sg else (z, z_t)
            w = self.reg_weights
            if w.get("vf"):
                terms["vf"] = (w["vf"], M.vf_loss(zt, self.proj.standardize(z0), self.proj.map_back))
            if w.get("ortho"):
                terms["ortho"] = (w["ortho"], M.ortho_loss(self.proj.P))
            if w.get("cov"):
                terms["cov"] = (w["cov"], M.cov_loss(zt))
        out_x, out_z, repa = dit(x_t, t, y, z_in)
        loss_x = (M.to_velocity(out_x, x_t, t, self.prediction) - (x - noise.eps_x)).pow(2).mean()
        total = loss_x
        logs["loss_x"] = loss_x.detach()
        if self.proj is not None:
            # Dropped samples count as zero, so this stays a plain mean over the batch (which DDP averages exactly).
            per_sample = (M.to_velocity(out_z, z_t, t, self.prediction) - (target_z - noise.eps_z)).pow(2)
            per_sample = per_sample.flatten(1).mean(1)
            loss_z = (keep * per_sample).mean()
            total = total + self.lambda_z * loss_z
            logs["loss_z"] = loss_z.detach()
        if repa is not None:
            target = M.resize_tokens(z0, self.enc_grid, (dit.grid, dit.grid))  # REPA: per token
            terms["repa"] = (self.repa_weight, -F.cosine_similarity(repa.float(), target.float(), dim=-1).mean())
        for k, (w, v) in terms.items():
            total = total + w * v
            logs[k] = v.detach()
        return total, logs


def make_loss(dit, proj, enc_grid, args):
    """train.py's JointLoss for these flags; enc_grid: the encoder's token grid (None without features or REPA)."""
    return JointLoss(dit, proj, enc_grid, args.prediction, args.lambda_z,
                     args.proj_sg, args.vf_weight, args.ortho_weight, args.cov_weight, args.repa_weight)


# -----------------------------------------------------------------------------
# Checkpoints: plain dicts, written atomically, loadable with torch.load(weights_only=True)

def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous file untouched


def checkpoint_state(dit, ema, proj, opt, step, args, arch, svg=None):
    """What last.pt holds: weights of the bare modules (never the DDP or compiled wrappers), the optimizer, the
    step and the run's config, and in SVG space the latent statistics (svg: the SVGLatents); the data order and all
    noise are functions of (seed, step), so nothing else."""
    state = {"model": dit.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
             "proj": proj.state_dict() if proj is not None else {}, "step": step, "config": {**vars(args), "arch": arch}}
    if svg is not None:
        state["svg_stats"] = {"mean": svg.mean.cpu(), "std": svg.std.cpu()}
    return state


# The flags a resumed run may change: how long, how fast, how often it logs and saves, the FID, where the data and
# results live, and how it runs. Any other flag must equal the checkpoint's: the run would be another experiment.
RESUME_MAY_CHANGE = ("max_steps", "lr", "proj_lr", "log_every", "ckpt_every", "keep_every", "sample_every", "fid_every",
                     "fid_ref", "fid_samples", "inception_weights", "num_workers", "data_path", "latent_cache",
                     "results_dir", "run_name", "precision", "compile", "grad_checkpoint", "resume", "restart")


def read_checkpoint(path, args):
    """The last.pt that --resume continues, read and compared with this run's flags before anything expensive."""
    if not os.path.isfile(path):
        raise M.UserError(f"--resume: no checkpoint at {path}; leave out --resume to start a new run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        config, step = ckpt["config"], ckpt["step"]
    except Exception as e:  # truncated (a full disk, a cut copy), or not a train.py checkpoint
        raise M.UserError(f"cannot read {path} ({type(e).__name__}): it is truncated or not a train.py checkpoint; "
                          f"restore a copy (step_N.pt with --keep-every) or start over with --restart") from None
    diff = [f"--{k.replace('_', '-')} ({config[k]} in the checkpoint, {v} now)" for k, v in vars(args).items()
            if k in config and k not in RESUME_MAY_CHANGE and config[k] != v]
    if diff:
        raise M.UserError(f"cannot resume {path} with different settings: {', '.join(diff)}; only "
                          f"{', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE[:-2])} may change")
    changed = [f"--{k.replace('_', '-')} {config[k]} -> {getattr(args, k)}" for k in RESUME_MAY_CHANGE
               if k in config and config[k] != getattr(args, k) and k not in ("resume", "restart")]
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"resuming {path} at step {step} with: {', '.join(changed)}")
    return ckpt


def load_for_resume(ckpt, args, dit, ema, proj, opt, svg=None):
    """Restore a run from its checkpoint (read_checkpoint; svg: the SVGLatents, whose statistics it restores);
    returns the step to continue from."""
    dit.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    if proj is not None:
        proj.load_state_dict(ckpt["proj"])
    opt.load_state_dict(ckpt["opt"])
    for g, lr in zip(opt.param_groups, (args.lr, args.proj_lr)):
        g["base_lr"] = lr  # --lr and --proj-lr may change on resume
    if svg is not None:
        svg.mean.copy_(ckpt["svg_stats"]["mean"])
        svg.std.copy_(ckpt["svg_stats"]["std"])
    return ckpt["step"]


PCA_KEYS = ("enc_mean", "enc_std", "pca_mean", "pca_var", "P")  # what FeatureProjection.fit sets


def pca_fingerprint(proj):
    """A short hash of the standardisation and PCA in proj: prepare.py records the one that made the features it
    stores, and a run that reads them must project with the same."""
    h = hashlib.sha256()
    for k in PCA_KEYS:
        h.update(getattr(proj, k).detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_cache_projection(proj, data, args):
    """redi from cached features: the run must project with the PCA that made them (meta.json's fingerprint)."""
    if pca_fingerprint(proj) == data.meta["features"]["pca"]:
        return
    if args.resume:
        raise M.UserError(f"the projection in this run's last.pt is not the PCA that made the features in {data.root}; "
                          f"resume with the run's own cache, or one made with prepare.py --features --pca-file "
                          f"<this run's PCA>")
    if args.pca_file:
        raise M.UserError(f"--pca-file {args.pca_file} is not the PCA that made the features in {data.root}; leave "
                          f"it out (the cache's own is used) or remake the cache with prepare.py --features "
                          f"--pca-file {args.pca_file}")
    raise M.UserError(f"{data.root}/pca.pt is not the PCA that meta.json says made its features; remake the cache "
                      f"with prepare.py")


def load_projection_file(path, proj):
    """--pca-file: the standardization and PCA of an earlier run's pca.pt, or ReDi's own pcs/dino_pca_model.pth,
    instead of a fit. Every tensor that the fit sets must be there with this run's shapes (the encoder's width,
    --feat-dim); the rest of the file is ignored."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if os.path.isfile(path) and "sklearn" in str(e):  # ReDi's file pickles a scikit-learn PCA
            return proj.load_redi_pca(M.read_redi_pca(path))
        raise M.UserError(f"--pca-file {path}: cannot read it ({type(e).__name__}); pass the pca.pt of an earlier run "
                          f"or ReDi's dino_pca_model.pth") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(sd.get(k)) for k in PCA_KEYS):
        raise M.UserError(f"--pca-file {path}: not a pca.pt (it needs the tensors {', '.join(PCA_KEYS)})")
    own = proj.state_dict()
    for k in PCA_KEYS:
        if sd[k].shape != own[k].shape:
            raise M.UserError(f"--pca-file {path}: {k} has shape {tuple(sd[k].shape)} but this run needs "
                              f"{tuple(own[k].shape)} (encoder width {proj.P.shape[0]}, --feat-dim {proj.d})")
    with torch.no_grad():
        for k in PCA_KEYS:
            own[k].copy_(sd[k])
        if proj.vf_map is not None:  # as the fit does: VF's map starts as P^T
            proj.vf_map.weight.copy_(proj.P)


def default_run_name(args):
    """<mode>-<space>-<model>; demo runs are <preset>-<mode> (demo-coredi, demo-svg-sit), so a demo in another mode
    does not meet the first."""
    if args.preset.startswith("demo"):
        return f"{args.preset}-{args.mode}"
    return f"{args.mode}-{args.space}-{args.model.replace('/', '')}"


def check_run_dir(run_dir, args):
    """Nothing is overwritten by accident: a folder that holds a run is continued with --resume or, with --restart,
    moved aside (when training starts)."""
    if not args.resume and not args.restart and os.path.isdir(run_dir) and os.listdir(run_dir):
        held = "a checkpoint (last.pt)" if os.path.exists(os.path.join(run_dir, "last.pt")) else "files of a run"
        raise M.UserError(f"{run_dir} already holds {held}: pass --resume to continue it, or --restart to start over "
                          f"(its files are moved to {run_dir}-<time>, nothing is deleted)")


# -----------------------------------------------------------------------------
# Main: the training loop

def main(args):
    # processes and devices
    ddp, rank, world, device = M.init_processes()
    master = rank == 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and args.precision == "bf16")
    run_dir = os.path.join(args.results_dir, args.run_name or default_run_name(args))
    last, log_path = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "log.jsonl")
    # Everything a bad flag or file can break is checked before anything expensive; the run folder is made only
    # once start-up has succeeded, so a failed start leaves nothing behind.
    check_run_dir(run_dir, args)
    ckpt = read_checkpoint(last, args) if args.resume else None
    inception = check_fid(args, device) if args.fid_every and master else None
    if master and args.enc_weights in ("random", "tiny"):
        print(f"NOTE: the encoder has RANDOM weights ({args.enc_weights}); fine for the demo, meaningless otherwise")

    # data and networks
    data = make_data(args)
    cached = use_cache(data, args)  # redi: features from the latent cache, no encoder
    if master and cached:
        print(f"redi's features come from the latent cache (PCA {data.meta['features']['pca_from']}); "
              + ("the encoder runs for REPA's target only" if args.repa else "no encoder is built"))
    warmup, problems = schedule(args, len(data))  # derived, not written into args: the checkpoint keeps the flags
    for line in problems if master else []:
        print(line)
    svg = make_svg_latents(args, device) if args.space == "svg" else None
    vae = M.VAE(args.vae_weights).to(device) if args.space == "latent" else svg  # SVG decodes through the same call
    encoder = make_encoder(args).to(device) if runs_encoder(args, cached) else None
    enc_dim, enc_grid = (encoder.dim, encoder.grid) if encoder is not None else (0, None)
    if cached:  # the encoder that made the cache's features
        enc_dim, enc_grid = data.meta["features"]["enc_dim"], tuple(data.meta["features"]["grid"])
    latent_shape = (len(svg.mean), svg.ae.dino.grid[0]) if svg is not None else None
    dit, ema, proj, arch = build_networks(args, enc_dim, latent_shape)
    dit, ema = dit.to(device), ema.to(device)
    proj = proj.to(device) if proj is not None else None
    opt = make_optimizer(dit, proj, args, fused=device.type == "cuda")
    step = 0
    if args.resume:
        step = load_for_resume(ckpt, args, dit, ema, proj, opt, svg)
    elif proj is not None:
        if cached or args.pca_file:  # redi from the cache: its own pca.pt unless a --pca-file is given
            load_projection_file(args.pca_file or os.path.join(data.root, "pca.pt"), proj)
        else:
            fit_projection(proj, data, encoder, args, device, rank)
        if ddp:
            M.broadcast_from_rank0(proj.state_dict().values())
        ema.load_state_dict(dit.state_dict())
    if cached:
        check_cache_projection(proj, data, args)
    if svg is not None and not args.resume and not args.svg_stats:
        fit_svg_stats(svg, data, args, device, rank)
        if ddp:
            M.broadcast_from_rank0((svg.mean, svg.std))
    if master:
        if args.restart and os.path.isdir(run_dir) and os.listdir(run_dir):
            aside = f"{run_dir}-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(run_dir, aside)
            print(f"--restart: moved the files of the previous run to {aside}")
        os.makedirs(run_dir, exist_ok=True)
        if proj is not None and not args.resume and not args.pca_file:
            torch.save(proj.state_dict(), os.path.join(run_dir, "pca.pt"))
    train_step = make_loss(dit, proj, enc_grid, args)
    if ddp:
        train_step = DDP(train_step, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_step = torch.compile(train_step)
    if master:
        print(f"{args.mode} / {args.space} / {args.model}: {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M "
              f"parameters, {len(data)} images, {world} rank(s), global batch {args.global_batch_size}, "
              f"starting at step {step}")

    # the loop
    fixed = None  # the projection picture's images; redi from cached features draws none (its P never changes)
    if proj is not None and encoder is not None:
        fixed_img, fixed_labels = fixed_images(data, 8)
        fixed = (fixed_img.to(device).float() / 127.5 - 1, fixed_labels)
    sampler = GlobalBatchSampler(len(data), args.global_batch_size, rank, world, args.seed, args.flip, step)
    loader = torch.utils.data.DataLoader(Flipped(data), batch_sampler=sampler, num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0)
    # SIGTERM (a cluster's notice) and SIGINT (Ctrl-C) stop the run at the next step boundary with a checkpoint; a
    # second Ctrl-C interrupts at once.
    stop = {"signal": None}

    def on_signal(sig, frame):
        if stop["signal"] == signal.SIGINT and sig == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signal"] = sig
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    b = args.global_batch_size // world
    positions = range(rank * b, (rank + 1) * b)
    x_shape = (arch["in_channels"], arch["input_size"], arch["input_size"])
    z_shape = dit.z_shape
    acc, t0, n_acc = {}, time.time(), 0  # logged sums and counts, kept on the device until a log step
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, dynamic_ncols=True)
    data_iter = iter(loader)
    while step < args.max_steps:
        noise = step_noise(args.seed, step, positions, x_shape, z_shape, x_shape if args.space == "latent" else None,
                           args.space, args.label_drop, args.feat_drop, device, args.time_shift)
        x, img, zt, y = model_input(next(data_iter), device, vae, noise.eps_vae, amp)
        with amp:
            z0 = encoder(img) if encoder is not None else None
            diagnostics = (step + 1) % args.log_every == 0 or step + 1 == args.max_steps
            loss, logs = train_step(x, y, z0, noise, diagnostics, zt)
        if not torch.isfinite(loss):
            raise M.UserError(f"non-finite loss {loss.item()} at step {step}; stopping without saving "
                              f"(the last good checkpoint is {last}); try a lower --lr")
        warmup_lr(opt, step, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        logs["grad_norm"] = nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                                     args.grad_clip or float("inf"))
        opt.step()
        update_ema(ema, dit, args.ema)
        step += 1
        bar.update(1)
        for k, v in logs.items():
            s, c = acc.get(k, (0.0, 0))
            acc[k] = (s + v, c + 1)
        n_acc += 1

        if step % args.log_every == 0 or step == args.max_steps:
            stats = torch.tensor([float(acc[k][0]) / acc[k][1] for k in sorted(acc)], device=device)
            if ddp:
                dist.all_reduce(stats)
                stats /= world
            rec = {"step": step, **dict(zip(sorted(acc), stats.tolist())),
                   "img_per_s": n_acc * args.global_batch_size / (time.time() - t0)}
            if master:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.write(" ".join(f"{k} {v:.4g}" for k, v in rec.items()))
            acc, t0, n_acc = {}, time.time(), 0
        if args.sample_every and (step % args.sample_every == 0 or step == args.max_steps) and master:
            pictures(ema, proj, encoder, fixed, args, run_dir, step, device, amp, vae)
        if args.fid_every and step % args.fid_every == 0:
            run_fid(ema, args, step, device, rank, world, vae, log_path, inception)

        if ddp:  # every rank must stop at the same step, whichever got the signal
            flag = torch.tensor(float(stop["signal"] or 0), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop["signal"] = stop["signal"] or (signal.Signals(int(flag.item())) if flag.item() else None)
        if master and (step % args.ckpt_every == 0 or step == args.max_steps or stop["signal"] is not None):
            if not all(torch.isfinite(p).all() for p in dit.parameters()):
                raise M.UserError(f"non-finite weights at step {step}; not overwriting {last}")
            state = checkpoint_state(dit, ema, proj, opt, step, args, arch, svg)
            save_checkpoint(last, state)
            if args.keep_every and step % args.keep_every == 0:
                save_checkpoint(os.path.join(run_dir, f"step_{step:07d}.pt"), state)
        if stop["signal"] is not None:
            if master:
                bar.close()
                print(f"stopped by {signal.Signals(stop['signal']).name}: saved {last} at step {step}; continue with "
                      f"the same command and --resume", file=sys.stderr)
            break
    bar.close()
    for s, h in handlers.items():
        signal.signal(s, h)
    if ddp:
        dist.destroy_process_group()
    return dit, ema, proj


# -----------------------------------------------------------------------------
# During training: EMA sample grids, the projection picture, the loss curves and FID, drawn through sample.py

def pictures(ema, proj, encoder, fixed, args, run_dir, step, device, amp, vae):
    """A grid of 16 EMA samples from fixed noise and labels, a row of the projection picture for the fixed
    (images, labels) (None: no picture), and the loss curves so far."""
    import sample as S
    images, _, _ = S.generate(ema, range(16), device, args.prediction, vae=vae, seed=args.seed,
                              classes=[i % args.num_classes for i in range(16)], **S.default_sampler(args.space))
    S.save_grid(images, os.path.join(run_dir, f"samples_{step:07d}.png"))
    if fixed is not None:
        img, labels = fixed
        proj.eval()  # batch norm with its running statistics, as for any fixed image
        with amp:
            zt = proj(encoder(img)).float()
        proj.train()
        path = os.path.join(run_dir, "projection.png")
        header = None if os.path.exists(path) else projection_header(img, labels)
        append_row(path, projection_row(zt, encoder.grid), f"step {step}", header)
    loss_curves(os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "losses.png"), args.feat_dim)


def check_fid(args, device):
    """Before step 0: --fid-ref must be a readable ADM reference and the Inception weights must load, so that a bad
    flag fails now rather than at the first FID. Returns the Inception network."""
    import fid
    fid.image_batches(args.fid_ref, 1)
    return fid.load_inception(args.inception_weights, device)


def run_fid(ema, args, step, device, rank, world, vae, log_path, inception):
    """FID of --fid-samples EMA samples against --fid-ref: every rank samples its share, rank 0 scores. The noise
    seed differs from the pictures' (seed + 1). A failure of the scoring is logged and training goes on."""
    import fid
    import sample as S
    n = args.fid_samples // world * world
    mine = list(range(rank, n, world))
    imgs = [S.generate(ema, mine[i:i + 64], device, args.prediction, vae=vae, seed=args.seed + 1,
                       **S.default_sampler(args.space))[0] for i in range(0, len(mine), 64)]
    imgs = torch.from_numpy(np.concatenate(imgs)).to(device)
    if world > 1:
        gathered = [torch.empty_like(imgs) for _ in range(world)]
        dist.all_gather(gathered, imgs)
        imgs = torch.cat(gathered)
    if rank == 0:
        try:
            metrics = fid.evaluate(imgs.cpu().numpy(), args.fid_ref, inception, device=device)
            rec, msg = {f"eval_{k}": v for k, v in metrics.items()}, " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            if args.inception_weights == fid.SMOKE_TEST:
                rec["eval_warning"], msg = fid.SMOKE_WARNING, f"{msg}  ({fid.SMOKE_WARNING})"
        except Exception as e:  # the reference moved or broke mid-run, a full disk, ...: not worth the run
            err = " ".join(str(e).split())
            rec, msg = {"eval_error": err}, f"FID failed ({type(e).__name__}: {err}); training continues"
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, **rec}) + "\n")
        print(f"step {step}: {msg}")
    if world > 1:
        dist.barrier()


def projection_row(zt, grid, tile=64):
    """First three channels of z~ (B, L, d) as RGB on the encoder grid, each image a tile; channels are
    standardized over the row and clipped at +-2.5 std, so a collapsed channel shows as flat grey."""
    z = zt[..., :3].float()
    z = (z - z.mean((0, 1))) / (z.std((0, 1)) + 1e-6)
    z = ((z.clamp(-2.5, 2.5) + 2.5) / 5 * 255).round().to(torch.uint8)
    z = z.reshape(z.shape[0], *grid, z.shape[-1]).permute(0, 3, 1, 2)
    z = F.interpolate(z.float(), size=(tile, tile), mode="nearest").to(torch.uint8)
    return torch.cat(list(z), dim=2)  # (3, tile, B*tile)


LABEL_W = 80  # the projection picture's left column, where each row says its step


def projection_header(img, labels, tile=64):
    """The projection picture's first row: each fixed image (in [-1, 1]) over its class."""
    row = Image.new("RGB", (LABEL_W + tile * len(img), tile + 18), "white")
    d = ImageDraw.Draw(row)
    for k, (x, c) in enumerate(zip(img, labels)):
        x = ((x.float().cpu() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        row.paste(Image.fromarray(x).resize((tile, tile), Image.BICUBIC), (LABEL_W + k * tile, 0))
        d.text((LABEL_W + k * tile + 4, tile + 2), f"class {int(c)}", fill="black", font=font(13))
    d.multiline_text((4, 4), "image\n\nrows below:\nz~ ch. 1-3\nas RGB", fill="black", font=font(12), spacing=2)
    return row


def append_row(path, row, label, header=None):
    """Add a row (3, tile, n*tile) under the picture at path, labelled at its left; a new picture starts with header."""
    row = row.permute(1, 2, 0).cpu().numpy()
    img = Image.new("RGB", (LABEL_W + row.shape[1], row.shape[0]), "white")
    img.paste(Image.fromarray(row), (LABEL_W, 0))
    ImageDraw.Draw(img).text((4, row.shape[0] // 2 - 8), label, fill="black", font=font(13))
    top = Image.open(path).convert("RGB") if header is None else header
    out = Image.new("RGB", (img.width, top.height + img.height), "white")
    out.paste(top, (0, 0))
    out.paste(img, (0, top.height))
    out.save(path)
    print(f"projection picture: row for {label} -> {path}")


# -----------------------------------------------------------------------------
# Charts drawn with Pillow (no plotting dependency), for the loss curves here and ablation.py's comparisons

COLORS = [(31, 119, 180), (214, 39, 40), (255, 127, 14), (44, 160, 44), (148, 103, 189), (0, 0, 0),
          (140, 86, 75), (227, 119, 194), (23, 190, 207)]


def font(size):
    return ImageFont.load_default(size=size)


def nice_ticks(lo, hi, n=5):
    """About n round values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1)]


def chart(series, title, ylabel, xlabel="training step", log=False, ylim=None, legend=None, size=(760, 320),
          legend_names=()):
    """A line chart of {name: [(x, y), ...]} as a PIL image: ticks, axis names and a legend (by default with more
    than one series). log: log10 y axis over whole decades. ylim: (low, high), else the data's range rounded out
    to ticks. legend_names: more names the legend must have room for, so that stacked charts line up."""
    ys = [y for pts in series.values() for _, y in pts if not log or y > 0]
    lo, hi = ylim or (min(ys), max(ys))
    if log:
        lo, hi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        hi += hi == lo
        yticks = [e + math.log10(m) for e in range(lo, hi) for m in ((1, 2, 5) if hi - lo <= 3 else (1,))] + [hi]
    else:
        hi += (hi == lo) * max(1e-3, abs(hi) * 0.1)
        yticks = nice_ticks(lo, hi)
        lo, hi = (lo, hi) if ylim else (yticks[0], yticks[-1])
        yticks = [v for v in yticks if lo <= v <= hi]
    xmax = max(x for pts in series.values() for x, _ in pts) or 1
    xticks = nice_ticks(0, xmax)
    xmax = xticks[-1]
    small, big = font(13), font(15)
    legend = len(series) > 1 if legend is None else legend
    legend_w = 24 + max(big.getlength(k) for k in [*series, *legend_names]) if legend else 0
    W, H = size
    L, R, TOP, BOT = 78, W - 16 - legend_w, 34, H - 48
    X = lambda x: L + (R - L) * x / xmax
    Y = lambda y: BOT - (BOT - TOP) * ((math.log10(max(y, 1e-30)) if log else y) - lo) / (hi - lo)
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    d.text((L, 8), title, fill="black", font=big)
    for v in yticks:
        y = BOT - (BOT - TOP) * (v - lo) / (hi - lo)
        d.line([(L, y), (R, y)], fill=(225, 225, 225))
        d.text((L - 6, y), f"{10.0 ** v:.3g}" if log else f"{v:g}", fill="black", font=small, anchor="rm")
    for v in xticks:
        d.line([(X(v), BOT), (X(v), BOT + 4)], fill="black")
        d.text((X(v), BOT + 6), f"{v:g}", fill="black", font=small, anchor="ma")
    d.rectangle([L, TOP, R, BOT], outline="black")
    d.text(((L + R) / 2, H - 6), xlabel, fill="black", font=big, anchor="md")
    label = Image.new("RGB", (int(big.getlength(ylabel)) + 4, 20), "white")
    ImageDraw.Draw(label).text((2, 2), ylabel, fill="black", font=big)
    label = label.rotate(90, expand=True)
    im.paste(label, (4, int((TOP + BOT - label.height) / 2)))
    for k, (name, pts) in enumerate(series.items()):
        c = COLORS[k % len(COLORS)]
        pts = [(X(x), Y(y)) for x, y in pts]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for x, y in pts if len(pts) <= 20 else []:  # few points: mark them, so a curve of three is not a guess
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        if legend:
            d.line([(R + 10, TOP + 10 + 20 * k), (R + 28, TOP + 10 + 20 * k)], fill=c, width=3)
            d.text((R + 32, TOP + 10 + 20 * k), name, fill="black", font=big, anchor="lm")
    return im


def loss_curves(log_path, path, feat_dim):
    """The run's curves from log.jsonl as one picture: image and feature loss (log scale) and, for the feature
    modes, the effective rank of z~ (of feat_dim), which falls when the projection collapses."""
    if not os.path.exists(log_path):  # nothing logged yet
        return
    with open(log_path) as f:
        log = [r for r in map(json.loads, f) if "loss_x" in r]
    if not log:
        return
    curve = lambda k: [(r["step"], r[k]) for r in log if k in r]
    losses = {"image loss": curve("loss_x"), "feature loss": curve("loss_z")}
    names = [*losses, "effective rank"]  # one legend width for both panels, so their plot areas line up
    panels = [chart({k: v for k, v in losses.items() if v}, "training losses (averaged over each logging window)",
                    "loss", log=True, legend=True, legend_names=names)]
    if "z_erank" in log[-1]:
        panels.append(chart({"effective rank": curve("z_erank")}, f"effective rank of z~ (of {feat_dim}; a collapse "
                            "shows as a fall)", "effective rank", ylim=(0, feat_dim * 1.05), legend=True,
                            legend_names=names))
    out = Image.new("RGB", (panels[0].width, sum(p.height for p in panels)), "white")
    for k, p in enumerate(panels):
        out.paste(p, (0, sum(q.height for q in panels[:k])))
    out.save(path)


if __name__ == "__main__":
    M.cli(lambda: main(get_args()))
