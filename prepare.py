"""
Make the latent cache that latent-space training reads (train.py --latent-cache DIR):

  torchrun --nproc_per_node 8 prepare.py --data-path /imagenet/train --out /data/in256_cache
  torchrun --nproc_per_node 8 prepare.py --space svg --svg-ae results/svg-ae/last.pt --data-path ... --out ...

For every image (ADM centre crop at --image-size) it stores the SD-VAE posterior moments (mean and log-variance,
so training draws a fresh latent sample every step) and the uint8 image itself (the encoder's input), in three
large memory-mapped arrays rather than a million small files: moments.npy (N, 8, S/8, S/8) float32,
images.npy (N, S, S, 3) uint8, labels.npy (N,) int64, and meta.json, written last, which marks the cache complete.
The cache is written into <out>.partial and renamed to <out> when complete, so <out> is always complete or absent;
a complete cache is replaced only with --overwrite.

With --space svg it stores the SVG autoencoder's latent instead, latents.npy (N, 392, S/16, S/16), raw (train.py
standardises it). SVG's encoder rescales its residual channels with statistics of the batch it encodes, so a latent
depends on its batch: images are encoded in fixed chunks of 32 consecutive images (model.SVGLatents.chunk), which
makes the cache the same for any number of processes. float16 halves the 400 KB per image of float32 for an error
far below the latent's spread (README, "SVG").
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
    ddp, rank, world, device = M.init_processes()
    out = args.out.rstrip("/")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        what = "a complete latent cache" if os.path.isfile(os.path.join(out, "meta.json")) else "files"
        raise M.UserError(f"{out} already holds {what}; pass --overwrite to replace it (or another --out)")
    data = ImageFolder(args.data_path, args.image_size)
    n, s = len(data), args.image_size
    if args.space == "svg":
        import svg_ae  # only here: it needs torchvision
        ae = svg_ae.load_autoencoder(args.svg_ae, args.dino_weights, device)
        if ae.dino.img_size != s:
            raise M.UserError(f"the SVG autoencoder {args.svg_ae} works at {ae.dino.img_size} px, not --image-size {s}")
        shape, dtype, batch = (ae.decoder.conv_in.in_channels, *ae.dino.grid), np.dtype(args.dtype), M.SVGLatents.chunk
    else:
        vae = M.VAE(args.vae_weights).to(device)
        shape, dtype, batch = (8, s // 8, s // 8), np.dtype(np.float32), args.batch_size
    name = "latents" if args.space == "svg" else "moments"
    partial = out + ".partial"  # our own scratch folder: whatever an interrupted run left there is started afresh
    paths = {k: os.path.join(partial, f"{k}.npy") for k in (name, "images", "labels")}
    if rank == 0:  # allocate the arrays once; every rank then fills its own rows
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        open_memmap(paths[name], "w+", dtype, (n, *shape))
        open_memmap(paths["images"], "w+", np.uint8, (n, s, s, 3))
        np.save(paths["labels"], np.array([label for _, label in data.files], dtype=np.int64))
    if ddp:
        dist.barrier()
    moments, images = (np.load(paths[k], mmap_mode="r+") for k in (name, "images"))
    # Rank r encodes the chunks r, r + world, ... of `batch` consecutive images; each loader batch is one chunk.
    mine = [i for c in range(rank, -(-n // batch), world) for i in range(c * batch, min(n, (c + 1) * batch))]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, mine), batch_size=batch,
                                         num_workers=args.num_workers)
    done = 0
    for img, _ in tqdm(loader, disable=rank != 0, desc="encoding"):
        rows = mine[done:done + len(img)]
        x = img.to(device).float() / 127.5 - 1
        if args.space == "svg":  # in fp32, as SVG encodes
            with torch.no_grad():
                mom = ae.encode(x)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                mom = vae.moments(x)
        moments[rows] = mom.float().cpu().numpy().astype(dtype)
        images[rows] = img.permute(0, 2, 3, 1).numpy()
        done += len(img)
    moments.flush()
    images.flush()
    if ddp:
        dist.barrier()
    if rank == 0:
        meta = {"image_size": s, "num_images": n, "num_classes": data.num_classes}
        meta.update({"space": "svg", "svg_ae": os.path.abspath(args.svg_ae), "dtype": dtype.name,
                     "encode_chunk": batch} if args.space == "svg" else {"vae": args.vae_weights})
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
    p.add_argument("--batch-size", type=M.positive_int, default=64,
                   help="images per VAE forward (SVG: always 32, see above)")
    p.add_argument("--space", choices=["latent", "svg"], default="latent",
                   help="latent: SD-VAE posterior moments; svg: the SVG autoencoder's latents")
    p.add_argument("--svg-ae", default=None, help="svg: the trained SVG autoencoder (svg_ae.py's last.pt)")
    p.add_argument("--dino-weights", default=None, help="svg: local DINOv3 weights (default: the path its run recorded)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="svg: how the latents are stored")
    p.add_argument("--num-workers", type=M.nonneg_int, default=8, help="DataLoader worker processes per rank")
    args = p.parse_args(argv)
    if args.image_size % (16 if args.space == "svg" else 8):
        raise M.UserError(f"--image-size {args.image_size}: the {'SVG autoencoder' if args.space == 'svg' else 'SD-VAE'} "
                          f"needs a multiple of {16 if args.space == 'svg' else 8}")
    if args.space == "svg" and args.svg_ae is None:
        raise M.UserError("--space svg needs --svg-ae PATH, the trained SVG autoencoder (svg_ae.py's last.pt)")
    return args


if __name__ == "__main__":
    M.cli(lambda: main(get_args()))
