"""
Train a class-conditional diffusion transformer in one of four modes, in latent or pixel space:

  sit     plain SiT flow matching                     (Ma et al. 2024)
  repa    SiT + REPA alignment of a hidden layer      (Yu et al. 2025)
  redi    joint image + fixed-PCA DINOv2 features     (Kouzelis et al. 2025)
  coredi  joint image + learned, co-evolving P        (Kouzelis et al. 2026)

  torchrun --nproc_per_node 8 train.py --mode coredi --latent-cache /data/in256_cache
  torchrun --nproc_per_node 8 train.py --mode redi --space pixel --data-path /imagenet/train
  python train.py                      # no data: the CPU demo on the built-in synthetic data set

Time convention (SiT): x_t = t*x + (1-t)*eps, t=0 noise, t=1 data, velocity target v = x - eps.
"""
import argparse
import json
import os
import signal
import time
from collections import namedtuple
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import model as M

# -----------------------------------------------------------------------------
# Configuration: argparse defaults come from a preset, applied before the final parse, so `--help` shows the
# values a run will use and anything given on the command line wins. The paper presets reproduce the recipes;
# the demo preset is what `python train.py` with no data runs.

PRESETS = {
    # SiT-XL/2 on SD-VAE latents: SiT's, REPA's and ReDi's recipe (AdamW 1e-4, batch 256, no warm-up).
    "latent": dict(space="latent", model="SiT-XL/2", global_batch_size=256, lr=1e-4, beta2=0.999, warmup_steps=0),
    # JiT-B/16 on pixels (JiT's main_jit.py): batch 1024, lr 5e-5 per 256 images (derived below), betas (0.9, 0.95),
    # 5 warm-up epochs of ImageNet's 1.28M images at batch 1024 = 6250 steps, no gradient clipping, flips.
    "pixel": dict(space="pixel", model="JiT-B/16", global_batch_size=1024, lr=None, beta2=0.95, warmup_steps=6250,
                  grad_clip=0.0, flip=True),
    # A tiny model on the synthetic set that trains in about 2.5 minutes on a laptop CPU, with a random encoder;
    # its high learning rate is clipped at 1.0 in every mode (our choice, for stability).
    "demo": dict(space="pixel", synthetic=5000, image_size=32, num_classes=10, model="DiT-T/4", global_batch_size=32,
                 grad_clip=1.0,
                 lr=1.5e-3, beta2=0.99, warmup_steps=50, max_steps=800, ema=0.99, feat_drop=0.2, enc_weights="tiny",
                 enc_size=112, pca_images=256, num_workers=0, ckpt_every=400, keep_every=0, sample_every=400,
                 run_name="demo"),
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


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=M.HelpFormatter, add_help=False,
                                epilog="presets (the defaults above are the chosen preset's): " +
                                "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("-h", "--help", action="store_true", help="show this help (with the preset's defaults) and exit")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="the defaults of a run: the paper recipe of a space, or the CPU demo. Default: demo when no "
                        "--data-path/--latent-cache is given, else the recipe of --space")
    p.add_argument("--mode", choices=list(M.MODES), default="coredi", help="what is trained (see the table above)")
    p.add_argument("--space", choices=["latent", "pixel"], default="latent",
                   help="latent: SD-VAE latents (SiT's recipe); pixel: raw pixels, x-prediction (JiT's recipe)")
    p.add_argument("--model", default=None,
                   help="(DiT|SiT)-(T|S|B|L|XL)/(1|2|4|8|16); T is our tiny size for the demo and the tests")
    p.add_argument("--repa", action="store_true", help="add REPA's alignment loss to redi/coredi (on in --mode repa)")
    # data
    p.add_argument("--data-path", default=None, help="ImageFolder root (one sub-folder per class); none = demo")
    p.add_argument("--latent-cache", default=None, help="folder made by prepare.py (latent space)")
    p.add_argument("--synthetic", type=int, default=5000, help="images in the built-in synthetic set (used without data)")
    p.add_argument("--synthetic-hard", action="store_true",
                   help="the synthetic set's hard variant: the class is a shape alone, in any colour (convergence.py)")
    p.add_argument("--image-size", type=int, default=256, help="training resolution (ADM centre crop)")
    p.add_argument("--num-classes", type=int, default=1000, help="label embedding rows (the null label is one more)")
    p.add_argument("--num-workers", type=int, default=8, help="DataLoader worker processes per rank")
    # optimisation
    p.add_argument("--global-batch-size", type=int, default=None, help="images per step over all ranks")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate; pixel preset: JiT's 5e-5 * batch / 256 when not given")
    p.add_argument("--beta2", type=float, default=None, help="AdamW beta2 (beta1 is 0.9): SiT 0.999, JiT 0.95")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (SiT, REPA, ReDi, JiT: 0)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up (JiT: 5 epochs)")
    p.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (0 = off); default: the mode's")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips of the training images; default: the mode's")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay of the weights that are sampled (DiT, SiT)")
    p.add_argument("--max-steps", type=int, default=400_000, help="training steps (the papers compare at 400K)")
    p.add_argument("--label-drop", type=float, default=0.1, help="probability of the null label, for CFG (DiT)")
    p.add_argument("--seed", type=int, default=0, help="the seed of everything: weights, data order, all noise")
    # features (redi / coredi)
    p.add_argument("--feat-dim", type=int, default=8, help="d, projected feature channels per token (ReDi: 8)")
    p.add_argument("--lambda-z", type=float, default=1.0, help="weight of the feature loss (ReDi: 1)")
    p.add_argument("--feat-drop", type=float, default=0.0,
                   help="per-sample feature dropout; 0.2 (ReDi) enables representation guidance (--cfg-rep)")
    p.add_argument("--pca-images", type=int, default=2048, help="images whose encoder tokens fit the PCA")
    p.add_argument("--pca-file", default=None, help="a projection saved by an earlier run (its pca.pt) instead of a fit")
    p.add_argument("--proj-init", choices=["pca", "random"], default="pca", help="coredi: initial P")
    p.add_argument("--proj-sg", action=argparse.BooleanOptionalAction, default=True,
                   help="coredi: stop-gradient on the feature target (the paper's stabiliser)")
    p.add_argument("--proj-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="coredi: batch norm (no affine) on z~ (our reading of the paper's 'normalization')")
    p.add_argument("--proj-lr", type=float, default=None, help="coredi: learning rate of P (default: --lr)")
    p.add_argument("--vf-weight", type=float, default=0.1, help="coredi: weight of the VF regularizer (our choice)")
    p.add_argument("--vf-map", choices=["learned", "fixed"], default="learned",
                   help="coredi: VF's map from z~ back to the encoder space: a learned linear map, or P^T")
    p.add_argument("--ortho-weight", type=float, default=0.1, help="coredi: weight of ||P^T P - I||^2 (our choice)")
    p.add_argument("--cov-weight", type=float, default=1.0,
                   help="coredi: weight of the off-diagonal covariance penalty (our choice)")
    p.add_argument("--repa-weight", type=float, default=0.5, help="weight of REPA's alignment loss (REPA: 0.5)")
    p.add_argument("--repa-depth", type=int, default=None, help="align after this block (default: REPA's, by size)")
    # frozen networks
    p.add_argument("--enc", default=None, help="timm name of the frozen encoder; default: the mode's")
    p.add_argument("--enc-weights", default=None,
                   help="local file of the encoder's weights (a timm state_dict, .pth or .safetensors); default: "
                        "download. 'random' (its architecture) or 'tiny' (2 blocks): demo and tests only")
    p.add_argument("--enc-size", type=int, default=224, help="the encoder's input resolution (DINOv2: 224)")
    p.add_argument("--vae-weights", default=None,
                   help="SD-VAE: a hub name (downloaded once), a local diffusers folder, or 'random' (tests); "
                        "default: the mode's")
    # bookkeeping
    p.add_argument("--results-dir", default="results", help="parent folder of the run folders")
    p.add_argument("--run-name", default=None, help="run folder name (default: <mode>-<space>-<model>)")
    p.add_argument("--resume", action="store_true", help="continue from <run folder>/last.pt")
    p.add_argument("--log-every", type=int, default=100, help="append averaged losses to log.jsonl every N steps")
    p.add_argument("--ckpt-every", type=int, default=5000, help="overwrite last.pt every N steps")
    p.add_argument("--keep-every", type=int, default=50_000, help="also keep step_N.pt every N steps (0: never)")
    p.add_argument("--sample-every", type=int, default=10_000,
                   help="EMA sample grid and a row of the projection picture every N steps (0: never)")
    p.add_argument("--fid-every", type=int, default=0, help="FID of EMA samples every N steps (0: never)")
    p.add_argument("--fid-ref", default=None, help="ADM reference .npz for --fid-every")
    p.add_argument("--fid-samples", type=int, default=5000, help="samples per in-training FID")
    p.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05 file for the FID")
    # speed
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast on GPU; CPU is fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (GPU)")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute blocks in backward (memory only)")

    given, _ = p.parse_known_args(argv)
    preset = given.preset or ("demo" if given.data_path is None and given.latent_cache is None else given.space)
    p.set_defaults(**{**MODE_DEFAULTS[given.mode], **PRESETS[preset]})  # the preset wins; the command line over both
    args = p.parse_args(argv)
    if args.help:
        p.print_help()
        p.exit()
    del args.help
    args.preset = preset

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
    return args


# What each space fixes. Latent: SD-VAE latents (8x fewer pixels, 4 channels), SiT's velocity prediction,
# t ~ U(0, 1) and ReDi's feature layout (extra input channels). Pixel: JiT's x-prediction, t ~ sigmoid(N(-0.8, 0.8))
# and features added per token (the image token grid is the encoder grid).
SPACES = {
    "latent": dict(channels=4, downsample=8, prediction="v", fusion="channels"),
    "pixel": dict(channels=3, downsample=1, prediction="x", fusion="tokens"),
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
    """The folder written by prepare.py: VAE posterior moments (N, 8, h, w) float32, the uint8 image the encoder
    needs (N, H, W, 3) and labels, memory-mapped. Items are ((moments, image), label)."""

    def __init__(self, root, size, vae_weights):
        try:
            with open(os.path.join(root, "meta.json")) as f:
                meta = json.load(f)
            self.moments = np.load(os.path.join(root, "moments.npy"), mmap_mode="r", allow_pickle=False)
            self.images = np.load(os.path.join(root, "images.npy"), mmap_mode="r", allow_pickle=False)
            self.labels = np.load(os.path.join(root, "labels.npy"), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise M.UserError(f"cannot read the latent cache {root} ({e}); make it with prepare.py") from None
        if meta["image_size"] != size or meta["vae"] != vae_weights:
            raise M.UserError(f"the latent cache {root} was made at {meta['image_size']} px with VAE {meta['vae']}, "
                              f"but this run asks for {size} px with {vae_weights}; "
                              f"remake it with prepare.py or change --image-size/--vae-weights")
        self.num_classes = meta["num_classes"]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return (torch.from_numpy(np.array(self.moments[i])), torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)), \
            int(self.labels[i])


def make_data(args):
    """The run's data set: the latent cache, an image folder, or (no data given) the synthetic set."""
    if args.latent_cache:
        if args.space != "latent":
            raise M.UserError("--latent-cache is for --space latent")
        data = LatentCache(args.latent_cache, args.image_size, args.vae_weights)
    elif args.data_path:
        data = ImageFolder(args.data_path, args.image_size)
    else:
        data = SyntheticImages(args.synthetic, args.image_size, args.num_classes, args.seed, args.synthetic_hard)
    if data.num_classes > args.num_classes:
        raise M.UserError(f"the data has {data.num_classes} classes but --num-classes is {args.num_classes}")
    return data


def fixed_images(data, n):
    """n uint8 images of n different classes spread over the data's classes (the first image of each), for
    pictures that follow the same images through training."""
    classes = np.unique(data.labels)
    picked = classes[np.linspace(0, len(classes) - 1, min(n, len(classes))).round().astype(int)]
    return torch.stack([item_image(data[int(np.argmax(data.labels == c))]) for c in picked])


def item_image(item):
    """The uint8 CHW image of a data item; a latent-cache item carries (moments, image)."""
    x = item[0]
    return x[1] if isinstance(x, tuple) else x


class Flipped:
    """Horizontal flips decided by the sampler (so they are reproducible): items are requested as (index, flip)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, item):
        i, flip = item
        x, y = self.data[i]
        flip_ = (lambda a: a.flip(-1)) if flip else (lambda a: a)
        return (tuple(flip_(a) for a in x) if isinstance(x, tuple) else flip_(x)), y


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


def build_networks(args, enc_dim=0):
    """The DiT (seeded: the same initial weights on every rank), its EMA copy and the mode's feature projection.
    enc_dim: the encoder's channels (REPA's target and the projection's input). Returns dit, ema, proj, arch;
    arch is what a checkpoint stores to rebuild the DiT."""
    space, mode = SPACES[args.space], M.MODES[args.mode]
    arch = dict(input_size=args.image_size // space["downsample"], in_channels=space["channels"],
                num_classes=args.num_classes, feat_dim=args.feat_dim if mode.features else 0,
                fusion=space["fusion"], repa_depth=args.repa_depth if args.repa else 0,
                repa_dim=enc_dim if args.repa else 0)
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
    """A data batch -> (clean x that the DiT denoises, the image in [-1, 1] for the encoder, labels)."""
    x, y = batch
    y = y.to(device)
    if isinstance(x, list):  # latent cache: posterior moments and the image; a fresh latent sample every step
        return M.VAE.sample(x[0].to(device), eps_vae), x[1].to(device).float() / 127.5 - 1, y
    img = x.to(device).float() / 127.5 - 1
    if vae is None:  # pixel space
        return img, img, y
    with amp or torch.autocast(device.type, enabled=False):  # latent space from images: encode on the fly
        return M.VAE.sample(vae.moments(img).float(), eps_vae), img, y


Noise = namedtuple("Noise", "t drop_label drop_feat eps_x eps_z eps_vae")
Noise.__doc__ = """A step's random numbers for B samples: t (B,) in [0, 1], 0 = noise, 1 = data; boolean label and
feature dropout (B,); standard normal noise of the image, of the feature tokens and of the VAE posterior sample
(None where the run has no such stream)."""


def step_noise(seed, step, positions, x_shape, z_shape=None, vae_shape=None, space="latent", label_drop=0.0,
               feat_drop=0.0, device="cpu"):
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
    return Noise(torch.cat(t), drop[:, 0] < label_drop, drop[:, 1] < feat_drop, stack(eps_x), stack(eps_z),
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

    def forward(self, x, y, z0, noise, diagnostics=False):
        """x: clean image or latent (B, C, H, W); y: labels; z0: encoder tokens (B, L, D) or None; noise: a Noise
        for these samples. Returns the total loss and a dict of logged terms, with the collapse diagnostics of z~
        when asked (an SVD: only at logging steps)."""
        dit, t = self.dit, noise.t
        y = torch.where(noise.drop_label, dit.num_classes, y)  # the null label, for CFG
        tt = t.view(-1, 1, 1, 1)
        x_t = tt * x + (1 - tt) * noise.eps_x
        logs, z_in, terms = {}, None, {}
        if self.proj is not None:
            zt = self.proj(z0)  # z~ on the encoder grid (B, L_enc, d)
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


def make_loss(dit, proj, encoder, args):
    """train.py's JointLoss for these flags."""
    return JointLoss(dit, proj, encoder.grid if encoder is not None else None, args.prediction, args.lambda_z,
                     args.proj_sg, args.vf_weight, args.ortho_weight, args.cov_weight, args.repa_weight)


# -----------------------------------------------------------------------------
# Checkpoints: plain dicts, written atomically, loadable with torch.load(weights_only=True)

def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous file untouched


def checkpoint_state(dit, ema, proj, opt, step, args, arch):
    """What last.pt holds: weights of the bare modules (never the DDP or compiled wrappers), the optimizer, the
    step and the run's config; the data order and all noise are functions of (seed, step), so nothing else."""
    return {"model": dit.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "proj": proj.state_dict() if proj is not None else {}, "step": step, "config": {**vars(args), "arch": arch}}


def run_identity(args):
    """What a resumed run must share with the checkpoint."""
    return {k: getattr(args, k) for k in ("mode", "space", "model", "image_size", "feat_dim", "repa", "num_classes")}


def load_for_resume(path, args, dit, ema, proj, opt):
    """Restore a run from its last.pt; returns the step to continue from."""
    if not os.path.exists(path):
        raise M.UserError(f"--resume: no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    theirs, ours = {k: ckpt["config"].get(k) for k in run_identity(args)}, run_identity(args)
    if theirs != ours:
        diff = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
        raise M.UserError(f"cannot resume {path}: it was trained with different settings (checkpoint, now): {diff}")
    dit.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    if proj is not None:
        proj.load_state_dict(ckpt["proj"])
    opt.load_state_dict(ckpt["opt"])
    return ckpt["step"]


# -----------------------------------------------------------------------------
# Main: the training loop

def main(args):
    # processes and devices
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and args.precision == "bf16")
    run_dir = os.path.join(args.results_dir, args.run_name or f"{args.mode}-{args.space}-{args.model.replace('/', '')}")
    last, log_path = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "log.jsonl")
    if master:
        os.makedirs(run_dir, exist_ok=True)
        if args.enc_weights in ("random", "tiny"):
            print(f"NOTE: the encoder has RANDOM weights ({args.enc_weights}); fine for the demo, meaningless otherwise")

    # data and networks
    data = make_data(args)
    vae = M.VAE(args.vae_weights).to(device) if args.space == "latent" else None
    use_encoder = M.MODES[args.mode].features or args.repa
    encoder = make_encoder(args).to(device) if use_encoder else None
    dit, ema, proj, arch = build_networks(args, encoder.dim if use_encoder else 0)
    dit, ema = dit.to(device), ema.to(device)
    proj = proj.to(device) if proj is not None else None
    opt = make_optimizer(dit, proj, args, fused=device.type == "cuda")
    step = 0
    if args.resume:
        step = load_for_resume(last, args, dit, ema, proj, opt)
    elif proj is not None:
        if args.pca_file:
            proj.load_state_dict(torch.load(args.pca_file, map_location="cpu", weights_only=True), strict=False)
        else:
            fit_projection(proj, data, encoder, args, device, rank)
            if master:
                torch.save(proj.state_dict(), os.path.join(run_dir, "pca.pt"))
        if ddp:  # every rank ends with rank 0's projection
            for t in proj.state_dict().values():
                dist.broadcast(t, 0)
        ema.load_state_dict(dit.state_dict())
    train_step = make_loss(dit, proj, encoder, args)
    if ddp:
        train_step = DDP(train_step, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_step = torch.compile(train_step)
    if master:
        print(f"{args.mode} / {args.space} / {args.model}: {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M "
              f"parameters, {len(data)} images, {world} rank(s), global batch {args.global_batch_size}, "
              f"starting at step {step}")

    # the loop
    fixed_img = fixed_images(data, 8).to(device).float() / 127.5 - 1  # for the projection picture
    sampler = GlobalBatchSampler(len(data), args.global_batch_size, rank, world, args.seed, args.flip, step)
    loader = torch.utils.data.DataLoader(Flipped(data), batch_sampler=sampler, num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0)
    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
    b = args.global_batch_size // world
    positions = range(rank * b, (rank + 1) * b)
    x_shape = (arch["in_channels"], arch["input_size"], arch["input_size"])
    z_shape = dit.z_shape
    acc, t0, n_acc = {}, time.time(), 0  # logged sums and counts, kept on the device until a log step
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, dynamic_ncols=True)
    data_iter = iter(loader)
    while step < args.max_steps:
        noise = step_noise(args.seed, step, positions, x_shape, z_shape, x_shape if vae else None, args.space,
                           args.label_drop, args.feat_drop, device)
        x, img, y = model_input(next(data_iter), device, vae, noise.eps_vae, amp)
        with amp:
            z0 = encoder(img) if encoder is not None else None
            diagnostics = (step + 1) % args.log_every == 0 or step + 1 == args.max_steps
            loss, logs = train_step(x, y, z0, noise, diagnostics)
        if not torch.isfinite(loss):
            raise M.UserError(f"non-finite loss {loss.item()} at step {step}; stopping without saving "
                              f"(the last good checkpoint is {last}); try a lower --lr")
        warmup_lr(opt, step, args.warmup_steps)
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
            pictures(ema, proj, encoder, fixed_img, args, run_dir, step, device, amp, vae)
        if args.fid_every and args.fid_ref and step % args.fid_every == 0:
            run_fid(ema, args, step, device, rank, world, vae, log_path)

        if ddp:  # every rank must stop at the same step, whichever got the signal
            flag = torch.tensor(float(stop["signal"] is not None), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop["signal"] = stop["signal"] or (signal.SIGTERM if flag.item() else None)
        if master and (step % args.ckpt_every == 0 or step == args.max_steps or stop["signal"] is not None):
            if not all(torch.isfinite(p).all() for p in dit.parameters()):
                raise M.UserError(f"non-finite weights at step {step}; not overwriting {last}")
            state = checkpoint_state(dit, ema, proj, opt, step, args, arch)
            save_checkpoint(last, state)
            if args.keep_every and step % args.keep_every == 0:
                save_checkpoint(os.path.join(run_dir, f"step_{step:07d}.pt"), state)
        if stop["signal"] is not None:
            if master:
                print(f"received signal {stop['signal']}: saved {last} at step {step}, exiting")
            break
    bar.close()
    if ddp:
        dist.destroy_process_group()
    return dit, ema, proj


# -----------------------------------------------------------------------------
# During training: EMA sample grids, the projection picture and FID, drawn through sample.py

def pictures(ema, proj, encoder, fixed_img, args, run_dir, step, device, amp, vae):
    """A grid of 16 EMA samples from fixed noise and labels, and a row of the projection picture."""
    import sample as S
    images, _, _ = S.generate(ema, range(16), device, args.prediction, vae=vae, seed=args.seed,
                              classes=[i % args.num_classes for i in range(16)], **S.default_sampler(args.space))
    S.save_grid(images, os.path.join(run_dir, f"samples_{step:07d}.png"))
    if proj is not None:
        proj.eval()  # batch norm with its running statistics, as for any fixed image
        with amp:
            zt = proj(encoder(fixed_img)).float()
        proj.train()
        append_row(os.path.join(run_dir, "projection.png"), projection_row(zt, encoder.grid), f"step {step}")


def run_fid(ema, args, step, device, rank, world, vae, log_path):
    """FID of --fid-samples EMA samples against --fid-ref: every rank samples its share, rank 0 scores. The noise
    seed differs from the pictures' (seed + 1)."""
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
        net = fid.load_inception(args.inception_weights, device)
        metrics = fid.evaluate(imgs.cpu().numpy(), args.fid_ref, net, device=device)
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}}) + "\n")
        print(f"step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
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


def append_row(path, row, label):
    img = row.permute(1, 2, 0).cpu().numpy()
    if os.path.exists(path):
        img = np.concatenate([np.asarray(Image.open(path).convert("RGB")), img], axis=0)
    Image.fromarray(img).save(path)
    print(f"projection picture: row for {label} -> {path}")


if __name__ == "__main__":
    M.cli(lambda: main(get_args()))
