"""
Make the latent cache that latent-space training reads (train.py --latent-cache DIR):

  torchrun --nproc_per_node 8 prepare.py --data-path /imagenet/train --out /data/in256_cache

For every image (ADM centre crop at --image-size) it stores the SD-VAE posterior moments (mean and log-variance,
so training draws a fresh latent sample every step) and the uint8 image itself (the encoder's input), in three
large memory-mapped arrays rather than a million small files: moments.npy (N, 8, S/8, S/8) float32,
images.npy (N, S, S, 3) uint8, labels.npy (N,) int64, and meta.json, written last, which marks the cache complete.
The cache is written into <out>.partial and renamed to <out> when complete, so <out> is always complete or absent;
a complete cache is replaced only with --overwrite.
"""
import json
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from numpy.lib.format import open_memmap
from tqdm import tqdm

import model as M
from train import ImageFolder


def main(args):
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    out = args.out.rstrip("/")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        what = "a complete latent cache" if os.path.isfile(os.path.join(out, "meta.json")) else "files"
        raise M.UserError(f"{out} already holds {what}; pass --overwrite to replace it (or another --out)")
    data = ImageFolder(args.data_path, args.image_size)
    vae = M.VAE(args.vae_weights).to(device)
    n, s = len(data), args.image_size
    partial = out + ".partial"  # our own scratch folder: whatever an interrupted run left there is started afresh
    paths = {k: os.path.join(partial, f"{k}.npy") for k in ("moments", "images", "labels")}
    if rank == 0:  # allocate the arrays once; every rank then fills its own rows
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        open_memmap(paths["moments"], "w+", np.float32, (n, 8, s // 8, s // 8))
        open_memmap(paths["images"], "w+", np.uint8, (n, s, s, 3))
        np.save(paths["labels"], np.array([label for _, label in data.files], dtype=np.int64))
    if ddp:
        dist.barrier()
    moments, images = (np.load(paths[k], mmap_mode="r+") for k in ("moments", "images"))
    mine = list(range(rank, n, world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, mine), batch_size=args.batch_size,
                                         num_workers=args.num_workers)
    done = 0
    for img, _ in tqdm(loader, disable=rank != 0, desc="encoding"):
        rows = mine[done:done + len(img)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            mom = vae.moments(img.to(device).float() / 127.5 - 1)
        moments[rows] = mom.float().cpu().numpy()
        images[rows] = img.permute(0, 2, 3, 1).numpy()
        done += len(img)
    moments.flush()
    images.flush()
    if ddp:
        dist.barrier()
    if rank == 0:
        meta = {"image_size": s, "vae": args.vae_weights, "num_images": n,
                "num_classes": data.num_classes}
        with open(os.path.join(partial, "meta.json"), "w") as f:
            json.dump(meta, f)
        if os.path.isdir(out):  # --overwrite (or an empty folder): the old one goes only once the new one is whole
            old = f"{out}.old-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(out, old)
            os.rename(partial, out)
            shutil.rmtree(old)
        else:
            os.rename(partial, out)
        print(f"wrote the latent cache of {n} images to {out}")
    if ddp:
        dist.destroy_process_group()


def get_args(argv=None):
    p = M.ArgumentParser(description=__doc__)
    p.add_argument("--data-path", required=True, help="ImageFolder root (one sub-folder per class)")
    p.add_argument("--out", required=True, help="the cache folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a cache that is already at --out")
    p.add_argument("--image-size", type=M.positive_int, default=256,
                   help="ADM centre crop size (train.py --image-size)")
    p.add_argument("--vae-weights", default="stabilityai/sd-vae-ft-mse",
                   help="SD-VAE hub name or local diffusers folder ('random': tests): REPA's preprocessing (used by "
                        "ReDi and CoReDi) encodes with ft-mse; for SiT's recipe pass stabilityai/sd-vae-ft-ema")
    p.add_argument("--batch-size", type=M.positive_int, default=64, help="images per VAE forward")
    p.add_argument("--num-workers", type=M.nonneg_int, default=8, help="DataLoader worker processes per rank")
    args = p.parse_args(argv)
    if args.image_size % 8:
        raise M.UserError(f"--image-size {args.image_size}: the SD-VAE needs a multiple of 8")
    return args


if __name__ == "__main__":
    M.cli(lambda: main(get_args()))
