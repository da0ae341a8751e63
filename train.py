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
import sys
import time
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
# Configuration. Defaults reproduce the papers: SiT/REPA/ReDi in latent space (AdamW 1e-4, batch 256,
# t ~ U(0,1)), JiT in pixel space (lr 5e-5 per 256 images, betas (0.9, 0.95), 5 warm-up epochs, batch 1024,
# t ~ sigmoid(N(-0.8, 0.8)), x-prediction). Flags left at None take the value of the chosen space.

RECIPES = {
    "latent": dict(model="SiT-XL/2", global_batch_size=256, lr=1e-4, beta2=0.999, warmup_steps=0, prediction="v"),
    "pixel": dict(model="DiT-B/16", global_batch_size=1024, lr=None, beta2=0.95, warmup_steps=6250, prediction="x",
                  bottleneck=128),
}
JIT_BASE_LR = 5e-5  # JiT scales the learning rate linearly with the batch: lr = 5e-5 * batch / 256
REPA_DEPTH = {"T": 2, "S": 4, "B": 4, "L": 8, "XL": 8}  # REPA aligns block 4 (B) or 8 (L, XL)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["sit", "repa", "redi", "coredi"], default="coredi")
    p.add_argument("--space", choices=["latent", "pixel"], default="latent")
    p.add_argument("--model", default=None, help="DiT/SiT name, e.g. SiT-XL/2 (default: per space)")
    p.add_argument("--repa", action="store_true", help="add REPA's alignment loss to redi/coredi")
    # data
    p.add_argument("--data-path", default=None, help="ImageFolder root (class sub-folders); none = demo")
    p.add_argument("--latent-cache", default=None, help="folder made by prepare.py (latent space)")
    p.add_argument("--synthetic", type=int, default=None, help="images in the built-in synthetic set (the demo's data)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--num-workers", type=int, default=8)
    # optimisation
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--beta2", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm, as REPA/ReDi (0 = off)")
    p.add_argument("--ema", type=float, default=0.9999)
    p.add_argument("--max-steps", type=int, default=400_000)
    p.add_argument("--label-drop", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    # features (redi / coredi)
    p.add_argument("--feat-dim", type=int, default=8, help="d, feature channels per token")
    p.add_argument("--lambda-z", type=float, default=1.0, help="weight of the feature loss")
    p.add_argument("--feat-drop", type=float, default=0.0, help="feature dropout; 0.2 enables --cfg-rep sampling")
    p.add_argument("--pca-images", type=int, default=2048, help="images whose tokens fit the PCA")
    p.add_argument("--pca-file", default=None, help="load the fitted projection from this file instead")
    p.add_argument("--proj-init", choices=["pca", "random"], default="pca")
    p.add_argument("--proj-sg", action=argparse.BooleanOptionalAction, default=True, help="stop-gradient target")
    p.add_argument("--proj-bn", action=argparse.BooleanOptionalAction, default=True, help="batch norm on z~")
    p.add_argument("--proj-lr", type=float, default=None, help="lr of P (default: the model's)")
    p.add_argument("--vf-weight", type=float, default=0.1)
    p.add_argument("--vf-map", choices=["learned", "fixed"], default="learned")
    p.add_argument("--ortho-weight", type=float, default=0.1)
    p.add_argument("--cov-weight", type=float, default=1.0)
    p.add_argument("--repa-weight", type=float, default=0.5)
    p.add_argument("--repa-depth", type=int, default=None, help="align after this block (default: REPA's)")
    # frozen networks
    p.add_argument("--enc", default=M.DINO, help="timm encoder name")
    p.add_argument("--enc-weights", default=None, help="local encoder weights; 'random' or 'tiny': demo/tests only")
    p.add_argument("--enc-size", type=int, default=224)
    p.add_argument("--vae-weights", default=None, help="local diffusers folder of stabilityai/sd-vae-ft-ema")
    # bookkeeping
    p.add_argument("--results-dir", default="results")
    p.add_argument("--run-name", default=None)
    p.add_argument("--resume", action="store_true", help="continue from <run>/last.pt")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=5000, help="overwrite last.pt every N steps")
    p.add_argument("--keep-every", type=int, default=50_000, help="also keep step_N.pt every N steps")
    p.add_argument("--sample-every", type=int, default=10_000, help="EMA sample grid + projection picture (0: never)")
    p.add_argument("--fid-every", type=int, default=0)
    p.add_argument("--fid-ref", default=None, help="ADM reference .npz for --fid-every")
    p.add_argument("--fid-samples", type=int, default=5000)
    p.add_argument("--inception-weights", default=None)
    # speed
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast on GPU; CPU is fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute blocks in backward (memory only)")
    args = p.parse_args(argv)
    if args.data_path is None and args.latent_cache is None:
        apply_demo_preset(args, argv)
    for k, v in RECIPES[args.space].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.lr is None:
        args.lr = JIT_BASE_LR * args.global_batch_size / 256
    args.proj_lr = args.proj_lr or args.lr
    args.repa = args.repa or args.mode == "repa"
    if args.repa_depth is None:
        args.repa_depth = REPA_DEPTH[args.model.split("-")[1].split("/")[0]] if args.model[:4] in ("DiT-", "SiT-") else 8
    args.bottleneck = RECIPES[args.space].get("bottleneck", 0)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.global_batch_size % world:
        raise M.UserError(f"--global-batch-size {args.global_batch_size} is not divisible by the {world} ranks; "
                          f"use a multiple of {world}")
    return args


DEMO = dict(space="pixel", synthetic=5000, image_size=32, num_classes=10, model="DiT-T/4", global_batch_size=32,
            lr=1.5e-3, beta2=0.99, warmup_steps=50, max_steps=800, ema=0.99, feat_drop=0.2, enc_weights="tiny",
            enc_size=112, pca_images=256, num_workers=0, log_every=100, ckpt_every=400, keep_every=0,
            sample_every=400, results_dir="results", run_name="demo")


def apply_demo_preset(args, argv):
    """No data given: a tiny model on the synthetic set that trains in a few minutes on a laptop CPU. Values the
    user set explicitly win, so `python train.py --mode sit` is the demo in another mode."""
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
             if a.startswith("--")}
    for k, v in DEMO.items():
        if k not in given:
            setattr(args, k, v)


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
    vary per image. Enough structure for a tiny model to learn in minutes, and for the tests."""
    SHAPES = 5

    def __init__(self, n, size, num_classes=10, seed=0):
        self.n, self.size, self.num_classes, self.seed = n, size, num_classes, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        c = i % self.num_classes
        v, u = np.meshgrid(*[np.linspace(-1, 1, self.size)] * 2, indexing="ij")
        cx, cy, rot = rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0, np.pi)
        s = rng.uniform(0.35, 0.6)
        x, y = (u - cx) * np.cos(rot) + (v - cy) * np.sin(rot), -(u - cx) * np.sin(rot) + (v - cy) * np.cos(rot)
        r = np.hypot(x, y)
        sdf = [r - s,  # signed distances, negative inside
               np.maximum(abs(x), abs(y)) - 0.8 * s,
               np.maximum(abs(x) * 0.866 + y * 0.5, -y) - 0.5 * s,
               abs(r - 0.7 * s) - 0.25 * s,
               np.minimum(np.maximum(abs(x) - 0.25 * s, abs(y) - s), np.maximum(abs(y) - 0.25 * s, abs(x) - s))
               ][c % self.SHAPES]
        inside = np.clip(0.5 - sdf * self.size / 4, 0, 1)[..., None]  # ~2-pixel anti-aliased edge
        hue = (c // self.SHAPES) / max(1, (self.num_classes - 1) // self.SHAPES + 1) + rng.uniform(-0.04, 0.04)
        fg = 0.5 + 0.45 * np.cos(2 * np.pi * (hue + np.array([0, 1 / 3, 2 / 3])))
        bg = rng.uniform(0.0, 0.35, 3) + 0.15 * v[..., None] * rng.uniform(-1, 1, 3)
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
        if meta["image_size"] != size or meta["vae"] != (vae_weights or "stabilityai/sd-vae-ft-ema"):
            raise M.UserError(f"the latent cache {root} was made at {meta['image_size']} px with VAE {meta['vae']}, "
                              f"but this run asks for {size} px with {vae_weights or 'stabilityai/sd-vae-ft-ema'}; "
                              f"remake it with prepare.py or change --image-size/--vae-weights")
        self.num_classes = meta["num_classes"]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return (torch.from_numpy(np.array(self.moments[i])), torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)), \
            int(self.labels[i])


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

    def __init__(self, n, global_batch, rank, world, seed, start_step=0):
        if n < global_batch:
            raise M.UserError(f"the data set has {n} images, fewer than one global batch ({global_batch})")
        self.n, self.G, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
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
                yield [(int(i), bool(flips[i])) for i in pos]
                self.step += 1


def make_encoder(args):
    """The frozen encoder. A random one (the demo's 'tiny', or 'random') is seeded, so that every rank, a resumed
    run and ablation.py's evaluation get the same network."""
    torch.manual_seed(args.seed)
    tiny = dict(depth=2, embed_dim=64, num_heads=2) if args.enc_weights == "tiny" else {}
    return M.Encoder(args.enc, "random" if tiny else args.enc_weights, args.enc_size, **tiny)


# -----------------------------------------------------------------------------
# Per-sample randomness. Every random number of a training step is drawn from a generator seeded by
# (seed, step, global position in the batch): 1 or N ranks, and a resumed run, see the same numbers, and
# there is no RNG state to save.

def step_noise(seed, step, positions, x_shape, z_shape, vae_shape, space, device):
    t, drop, eps_x, eps_z, eps_vae = [], [], [], [], []
    for pos in positions:
        g = torch.Generator(device).manual_seed(hash((seed, step, pos)) & (2 ** 63 - 1))
        u = torch.randn(1, generator=g, device=device) if space == "pixel" else torch.rand(1, generator=g, device=device)
        t.append(torch.sigmoid(0.8 * u - 0.8) if space == "pixel" else u)  # JiT's logit-normal / SiT's uniform
        drop.append(torch.rand(2, generator=g, device=device))  # label dropout, feature dropout
        eps_x.append(torch.randn(x_shape, generator=g, device=device))
        eps_z.append(torch.randn(z_shape, generator=g, device=device) if z_shape else None)
        eps_vae.append(torch.randn(vae_shape, generator=g, device=device) if vae_shape else None)
    stack = lambda xs: torch.stack(xs) if xs[0] is not None else None
    return torch.cat(t), torch.stack(drop), stack(eps_x), stack(eps_z), stack(eps_vae)


# -----------------------------------------------------------------------------
# The loss: one module, so DDP averages the gradients of the DiT and of the projection P together

class JointLoss(nn.Module):
    def __init__(self, dit, proj, args):
        super().__init__()
        self.dit, self.proj, self.args = dit, proj, args

    def forward(self, x, y, z0, enc_grid, noise, diagnostics=False):
        """x: clean image or latent (B, C, H, W); y: labels; z0: encoder tokens (B, L, D) or None;
        noise: step_noise(...) for these samples. Returns the total loss and a dict of logged terms, with the
        collapse diagnostics of z~ when asked (an SVD: only at logging steps)."""
        a, dit = self.args, self.dit
        t, drop, eps_x, eps_z, _ = noise
        y = torch.where(drop[:, 0] < a.label_drop, dit.num_classes, y)  # the null label, for CFG
        tt = t.view(-1, 1, 1, 1)
        x_t = tt * x + (1 - tt) * eps_x
        logs, z_in, terms = {}, None, {}
        if self.proj is not None:
            zt = self.proj(z0)  # z~ on the encoder grid (B, L_enc, d)
            if diagnostics:
                std, logs["z_erank"] = M.feature_stats(zt)
                logs["z_std_min"] = std.min()
            z = M.resize_tokens(zt, enc_grid, (dit.grid, dit.grid))
            target_z = z.detach() if a.proj_sg else z  # stop-gradient: P learns only through the model's input
            t3 = t.view(-1, 1, 1)
            z_t = t3 * z + (1 - t3) * eps_z
            keep = (drop[:, 1] >= a.feat_drop).float()  # feature dropout: zero input, no feature loss
            z_in = z_t * keep.view(-1, 1, 1)
            if a.mode == "coredi":
                f = self.proj.standardize(z0)
                if a.vf_weight:
                    vf_map = self.proj.vf_map if a.vf_map == "learned" else (lambda v: v @ self.proj.P.T)
                    terms["vf"] = (a.vf_weight, M.vf_loss(zt, f, vf_map))
                if a.ortho_weight:
                    terms["ortho"] = (a.ortho_weight, M.ortho_loss(self.proj.P))
                if a.cov_weight:
                    terms["cov"] = (a.cov_weight, M.cov_loss(zt))
        out_x, out_z, repa = dit(x_t, t, y, z_in)
        loss_x = (M.to_velocity(out_x, x_t, t, a.prediction) - (x - eps_x)).pow(2).mean()
        total = loss_x
        logs["loss_x"] = loss_x.detach()
        if self.proj is not None:
            # Dropped samples count as zero, so this stays a plain mean over the batch (which DDP averages exactly).
            per_sample = (M.to_velocity(out_z, z_t, t, a.prediction) - (target_z - eps_z)).pow(2).mean((1, 2))
            loss_z = (keep * per_sample).mean()
            total = total + a.lambda_z * loss_z
            logs["loss_z"] = loss_z.detach()
        if repa is not None:
            target = M.resize_tokens(z0, enc_grid, (dit.grid, dit.grid))
            terms["repa"] = (a.repa_weight, -F.cosine_similarity(repa.float(), target.float(), dim=-1).mean())
        for k, (w, v) in terms.items():
            total = total + w * v
            logs[k] = v.detach()
        return total, logs


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


# -----------------------------------------------------------------------------
# Checkpoints: plain dicts, written atomically, loadable with torch.load(weights_only=True)

def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous file untouched


def run_identity(args):
    """What a resumed run must share with the checkpoint."""
    return {k: getattr(args, k) for k in ("mode", "space", "model", "image_size", "feat_dim", "repa", "num_classes")}


# -----------------------------------------------------------------------------
# Pictures: EMA sample grids and the projection over training

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


# -----------------------------------------------------------------------------
# Main

def main(args):
    # --- processes and devices
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)  # the same initial weights on every rank and on resume
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and args.precision == "bf16")
    master = rank == 0
    run_dir = os.path.join(args.results_dir, args.run_name or f"{args.mode}-{args.space}-{args.model.replace('/', '')}")
    last = os.path.join(run_dir, "last.pt")
    if master:
        os.makedirs(run_dir, exist_ok=True)
        if args.enc_weights in ("random", "tiny"):
            print(f"NOTE: the encoder has RANDOM weights ({args.enc_weights}); fine for the demo, meaningless otherwise")

    # --- data
    if args.latent_cache:
        if args.space != "latent":
            raise M.UserError("--latent-cache is for --space latent")
        data = LatentCache(args.latent_cache, args.image_size, args.vae_weights)
    elif args.data_path:
        data = ImageFolder(args.data_path, args.image_size)
    else:
        data = SyntheticImages(args.synthetic, args.image_size, args.num_classes, args.seed)
    if data.num_classes > args.num_classes:
        raise M.UserError(f"the data has {data.num_classes} classes but --num-classes is {args.num_classes}")
    vae = M.VAE(args.vae_weights).to(device) if args.space == "latent" else None
    use_feats = args.mode in ("redi", "coredi")
    encoder = make_encoder(args).to(device) if use_feats or args.repa else None

    def to_model_input(batch, noise_vae=None):
        """A data batch -> (clean x for the model, image in [-1, 1] for the encoder, labels)."""
        x, y = batch
        if isinstance(x, list):  # latent cache: posterior moments and the image
            moments, img = x[0].to(device), x[1].to(device).float() / 127.5 - 1
            latent = M.VAE.sample(moments, noise_vae)
            return latent, img, y.to(device)
        img = x.to(device).float() / 127.5 - 1
        if vae is not None:  # latent space straight from images: encode on the fly
            with autocast:
                latent = M.VAE.sample(vae.moments(img).float(), noise_vae)
            return latent, img, y.to(device)
        return img, img, y.to(device)

    # --- networks
    in_ch = 4 if args.space == "latent" else 3
    input_size = args.image_size // 8 if args.space == "latent" else args.image_size
    arch = dict(input_size=input_size, in_channels=in_ch, num_classes=args.num_classes,
                feat_dim=args.feat_dim if use_feats else 0, bottleneck=args.bottleneck,
                repa_depth=args.repa_depth if args.repa else 0, repa_dim=encoder.dim if args.repa else 0)
    dit = M.create_model(args.model, **arch).to(device)
    dit.grad_checkpoint = args.grad_checkpoint
    ema = deepcopy(dit).requires_grad_(False).eval()
    proj = None
    if use_feats:
        coredi = args.mode == "coredi"
        proj = M.FeatureProjection(encoder.dim, args.feat_dim, learnable=coredi, batchnorm=coredi and args.proj_bn,
                                   vf_map=args.vf_map if coredi and args.vf_weight else None).to(device)

    # --- resume, or fit the projection
    step = 0
    ckpt = None
    if args.resume:
        if not os.path.exists(last):
            raise M.UserError(f"--resume: no checkpoint at {last}")
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        theirs, ours = {k: ckpt["config"].get(k) for k in run_identity(args)}, run_identity(args)
        if theirs != ours:
            diff = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
            raise M.UserError(f"cannot resume {last}: it was trained with different settings (checkpoint, now): {diff}")
        dit.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        if proj is not None:
            proj.load_state_dict(ckpt["proj"])
        step = ckpt["step"]
    elif proj is not None:
        if args.pca_file:
            proj.load_state_dict(torch.load(args.pca_file, map_location="cpu", weights_only=True), strict=False)
        else:
            fit_projection(proj, data, encoder, to_model_input, args, device, rank)
            if master:
                torch.save(proj.state_dict(), os.path.join(run_dir, "pca.pt"))
        if ddp:  # every rank ends with rank 0's projection
            for t in proj.state_dict().values():
                dist.broadcast(t.data if isinstance(t, nn.Parameter) else t, 0)
        ema.load_state_dict(dit.state_dict())

    loss_fn = JointLoss(dit, proj, args)
    groups = [{"params": [p for p in dit.parameters() if p.requires_grad], "lr": args.lr}]
    if proj is not None and any(p.requires_grad for p in proj.parameters()):
        groups.append({"params": [p for p in proj.parameters() if p.requires_grad], "lr": args.proj_lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, betas=(0.9, args.beta2), weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    if ckpt is not None:
        opt.load_state_dict(ckpt["opt"])
    train_module = DDP(loss_fn, device_ids=[device.index] if device.type == "cuda" else None) if ddp else loss_fn
    if args.compile:
        train_module = torch.compile(train_module)
    if master:
        n_params = sum(p.numel() for p in dit.parameters())
        print(f"{args.mode} / {args.space} / {args.model}: {n_params / 1e6:.2f}M parameters, {len(data)} images, "
              f"{world} rank(s), global batch {args.global_batch_size}, starting at step {step}")

    # --- fixed things for the pictures
    n_fixed = 8
    fixed = [data[i * len(data) // n_fixed] for i in range(n_fixed)]  # spread over the classes
    fixed_img = torch.stack([item_image(f) for f in fixed]).to(device).float() / 127.5 - 1
    enc_grid = encoder.grid if encoder is not None else None

    # --- the loop
    sampler = GlobalBatchSampler(len(data), args.global_batch_size, rank, world, args.seed, start_step=step)
    loader = torch.utils.data.DataLoader(Flipped(data), batch_sampler=sampler, num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0)
    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
    b = args.global_batch_size // world
    positions = range(rank * b, (rank + 1) * b)
    log_path = os.path.join(run_dir, "log.jsonl")
    acc, t0, n_acc = {}, time.time(), 0  # logged sums and counts, kept on the device until a log step
    z_shape = (dit.grid ** 2, args.feat_dim) if use_feats else None
    x_shape = (in_ch, input_size, input_size)
    vae_shape = x_shape if args.space == "latent" else None
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, dynamic_ncols=True)
    data_iter = iter(loader)
    while step < args.max_steps:
        batch = next(data_iter)
        noise = step_noise(args.seed, step, positions, x_shape, z_shape, vae_shape, args.space, device)
        x, img, y = to_model_input(batch, noise[4])
        with autocast:
            z0 = encoder(img) if encoder is not None else None
            diagnostics = (step + 1) % args.log_every == 0 or step + 1 == args.max_steps
            loss, logs = train_module(x, y, z0, enc_grid, noise, diagnostics)
        if not torch.isfinite(loss):
            raise M.UserError(f"non-finite loss {loss.item()} at step {step}; stopping without saving "
                              f"(the last good checkpoint is {last}); try a lower --lr")
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else g["base_lr"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        logs["grad_norm"] = nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]],
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
            acc, t0, n_acc = {}, time.time(), 0  # logged sums and counts, kept on the device until a log step

        if args.sample_every and (step % args.sample_every == 0 or step == args.max_steps):
            pictures(ema, proj, encoder, fixed_img, args, run_dir, step, device, master, autocast, vae)

        if args.fid_every and args.fid_ref and step % args.fid_every == 0:
            run_fid(ema, args, run_dir, step, device, rank, world, vae, log_path)

        if ddp:  # every rank must stop at the same step, whichever got the signal
            flag = torch.tensor(float(stop["signal"] is not None), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop["signal"] = stop["signal"] or (signal.SIGTERM if flag.item() else None)
        save = step % args.ckpt_every == 0 or step == args.max_steps or stop["signal"] is not None
        if save and master:
            if not all(torch.isfinite(p).all() for p in dit.parameters()):
                raise M.UserError(f"non-finite weights at step {step}; not overwriting {last}")
            epoch, k = divmod(step, sampler.per_epoch)
            state = {"model": dit.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                     "proj": proj.state_dict() if proj is not None else {}, "step": step,
                     "data": {"epoch": epoch, "batch_in_epoch": k},
                     "config": {**vars(args), "arch": arch}}
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


@torch.no_grad()
def fit_projection(proj, data, encoder, to_model_input, args, device, rank):
    """Fit the standardization and PCA on the encoder tokens of --pca-images images (a fixed seeded subset,
    the same on every rank; rank 0's result is broadcast anyway)."""
    n = min(args.pca_images, len(data))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
    tokens = []
    for i in range(0, n, 64):
        items = [data[j] for j in idx[i:i + 64]]
        imgs = torch.stack([item_image(it) for it in items]).to(device)
        tokens.append(encoder(imgs.float() / 127.5 - 1).float().reshape(-1, encoder.dim).cpu())
    proj.cpu().fit(torch.cat(tokens), init=args.proj_init, generator=torch.Generator().manual_seed(args.seed))
    proj.to(device)
    if rank == 0:
        print(f"fitted the projection on {n} images: PCA variance of the first {args.feat_dim} components "
              f"{[round(v, 2) for v in proj.pca_var.tolist()]}")


def sampling_args(args, classes=None, seed=0):
    """sample.py's settings for the pictures and FID during training: its default sampler for the space."""
    import sample as S
    argv = ["--ckpt", "", "--seed", str(seed)] + (["--classes", ",".join(map(str, classes))] if classes else [])
    return S.default_sampler(S.get_args(argv), args.space)


def pictures(ema, proj, encoder, fixed_img, args, run_dir, step, device, master, autocast, vae):
    """A grid of EMA samples from fixed noise and labels, and a row of the projection picture."""
    if not master:
        return
    import sample as S
    sargs = sampling_args(args, classes=[i % args.num_classes for i in range(16)], seed=args.seed)
    images, _, _ = S.generate(ema, vars(args), sargs, list(range(16)), device, vae)
    S.save_grid(images, os.path.join(run_dir, f"samples_{step:07d}.png"))
    if proj is not None:
        proj.eval()  # batch norm with its running statistics, as for any fixed image
        with autocast:
            zt = proj(encoder(fixed_img)).float()
        proj.train()
        append_row(os.path.join(run_dir, "projection.png"), projection_row(zt, encoder.grid), f"step {step}")


def run_fid(ema, args, run_dir, step, device, rank, world, vae, log_path):
    """FID of --fid-samples EMA samples against --fid-ref: every rank samples its share, rank 0 scores."""
    import fid
    import sample as S
    sargs = sampling_args(args, seed=args.seed + 1)
    n = args.fid_samples // world * world
    mine = list(range(rank, n, world))
    imgs = [S.generate(ema, vars(args), sargs, mine[i:i + 64], device, vae)[0] for i in range(0, len(mine), 64)]
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


if __name__ == "__main__":
    try:
        main(get_args())
    except M.UserError as e:
        sys.exit(f"error: {e}")
    except Exception as e:  # errors raised in DataLoader workers arrive wrapped: show their last line only
        if "UserError" in str(e):
            sys.exit(f"error: {str(e).strip().splitlines()[-1].split('UserError: ')[-1]}")
        raise
