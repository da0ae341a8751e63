"""
Make the latent cache that latent-space training reads (train.py --latent-cache DIR):

  torchrun --nproc_per_node 8 prepare.py --data-path /imagenet/train --out /data/in256_cache
  torchrun --nproc_per_node 8 prepare.py --data-path /imagenet/train --out /data/in256_redi \\
      --features --no-images --dtype float16             # redi without the encoder: about 20 KB per image
  torchrun --nproc_per_node 8 prepare.py --space svg --svg-ae results/svg-ae/last.pt --data-path ... --out ...

For every image (ADM centre crop at --image-size) it stores the SD-VAE posterior moments (mean and log-variance,
so training draws a fresh latent sample every step) and the uint8 image itself (the encoder's input), in large
memory-mapped arrays rather than a million small files: moments.npy (N, 8, S/8, S/8), images.npy (N, S, S, 3)
uint8, labels.npy (N,) int64, and meta.json, written last, which marks the cache complete and records how it was
made. The cache is written into <out>.partial and renamed to <out> when complete, so <out> is always complete or
absent; a complete cache is replaced only with --overwrite.

With --features it also stores redi's features: the frozen encoder's tokens, standardised and projected on the
top --feat-dim principal directions (the PCA fitted on --pca-images of these images, or --pca-file), as
features.npy (N, views, L, d) and the projection as pca.pt. ReDi's projection never changes during training, so
train.py --mode redi then reads them instead of running DINOv2 every step, and needs no images: with --no-images a
redi cache is the moments and the features alone. Neither the SD-VAE nor DINOv2 (nor SVG's encoder) is equivariant
to flips, so --flip also encodes the flipped images: moments_flipped.npy (or latents_flipped.npy) and a second view
of the features, which runs with --flip (sit's and SVG's default) read instead of flipping a stored latent.

With --space svg it stores the SVG autoencoder's latent instead, latents.npy (N, 392, S/16, S/16), raw (train.py
standardises it). SVG's encoder rescales its residual channels with statistics of the batch it encodes, so a latent
depends on its batch: images are encoded in fixed chunks of 32 consecutive images (svg_ae.SVGLatents.chunk), which
makes the cache the same for any number of processes.

Storage (--dtype): float16's rounding error, at most 2^-11 of each value, is far below the spread of every stored
array (docs/caches.md); the SD-VAE moments stay float32 by default, as REPA stores them.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from numpy.lib.format import open_memmap
from tqdm import tqdm

import model as M
from support.cli import (ArgumentParser, UserError, broadcast_from_rank0, check_file, cli, init_processes, nonneg_int,
                         positive_int)
from support.data import ImageFolder, check_cache_out, encoder_seed, remove_cache, weights_name
from support.frozen import DINO, VAE, fit_projection, make_encoder
from support.runs import load_projection_file, pca_fingerprint


def redi_projection(args, data, device, rank, ddp):
    """The frozen encoder and redi's projection, made by train.py's own code (make_encoder; fit_projection on the
    cache's images, as a run fits it, or --pca-file), so that a run from the stored features sees what it would
    compute. Every rank ends with rank 0's projection."""
    redi = argparse.Namespace(**vars(args), proj_init="pca")
    encoder = make_encoder(redi).to(device)
    proj = M.build_projection("redi", encoder.dim, args.feat_dim).to(device)
    if args.pca_file:
        load_projection_file(args.pca_file, proj)
    else:
        fit_projection(proj, data, encoder, redi, device, rank)
    if ddp:
        broadcast_from_rank0(proj.state_dict().values())
    return encoder, proj


def main(args):
    ddp, rank, world, device = init_processes()
    out = args.out.rstrip("/") or "/"
    check_cache_out(out, args.overwrite)  # only a cache is ever replaced, and nothing else deleted
    data = ImageFolder(args.data_path, args.image_size)
    n, s = len(data), args.image_size
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")  # as train.py on a GPU
    if args.space == "svg":
        import svg_ae  # only here: it needs torchvision
        ae = svg_ae.load_autoencoder(args.svg_ae, args.dino_weights, device)
        if ae.dino.img_size != s:
            raise UserError(f"the SVG autoencoder {args.svg_ae} works at {ae.dino.img_size} px, not --image-size {s}")
        shape, dtype, batch = (ae.decoder.conv_in.in_channels, *ae.dino.grid), np.dtype(args.dtype or "float16"), \
            svg_ae.SVGLatents.chunk
    else:
        torch.manual_seed(args.seed)  # --vae-weights random (tests): the same VAE in every cache
        vae = VAE(args.vae_weights).to(device)
        shape, dtype, batch = (8, s // 8, s // 8), np.dtype(args.dtype or "float32"), args.batch_size
    if args.features:
        encoder, proj = redi_projection(args, data, device, rank, ddp)
        views, fdtype = 1 + args.flip, np.dtype(args.dtype or "float16")
    name = "latents" if args.space == "svg" else "moments"
    partial = out + ".partial"  # our own scratch folder: whatever an interrupted run left there is started afresh
    arrays = {name: (dtype, (n, *shape))}
    if args.flip:  # the encoders are not flip-equivariant: a flipped image's latent is encoded, not flipped
        arrays[f"{name}_flipped"] = (dtype, (n, *shape))
    if args.images:
        arrays["images"] = (np.uint8, (n, s, s, 3))
    if args.features:
        arrays["features"] = (fdtype, (n, views, encoder.grid[0] * encoder.grid[1], args.feat_dim))
    paths = {k: os.path.join(partial, f"{k}.npy") for k in [*arrays, "labels"]}
    if rank == 0:  # allocate the arrays once; every rank then fills its own rows
        remove_cache(partial)  # what an interrupted run left there (cache files only) starts afresh
        os.makedirs(partial)
        for k, (dt, shp) in arrays.items():
            open_memmap(paths[k], "w+", dt, shp)
        np.save(paths["labels"], np.array([label for _, label in data.files], dtype=np.int64))
    if ddp:
        dist.barrier()
    store = {k: np.load(paths[k], mmap_mode="r+") for k in arrays}
    # Rank r encodes the chunks r, r + world, ... of `batch` consecutive images; each loader batch is one chunk.
    mine = [i for c in range(rank, -(-n // batch), world) for i in range(c * batch, min(n, (c + 1) * batch))]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, mine), batch_size=batch,
                                         num_workers=args.num_workers)
    done = 0
    for img, _ in tqdm(loader, disable=rank != 0, desc="encoding"):
        rows = mine[done:done + len(img)]
        x = img.to(device).float() / 127.5 - 1
        with torch.no_grad():
            for key, view in [(name, x)] + [(f"{name}_flipped", x.flip(-1))] * args.flip:
                # SVG: in fp32, as SVG encodes; the SD-VAE: in fp32 always (VAE.moments)
                mom = ae.encode(view) if args.space == "svg" else vae.moments(view)
                store[key][rows] = mom.float().cpu().numpy().astype(dtype)
            if args.images:
                store["images"][rows] = img.permute(0, 2, 3, 1).numpy()
            if args.features:
                with amp:
                    z = [proj(encoder(v)).float() for v in (x, x.flip(-1))[:views]]
                store["features"][rows] = torch.stack(z, 1).cpu().numpy().astype(fdtype)
        done += len(img)
    for a in store.values():
        a.flush()
    if ddp:
        dist.barrier()
    if rank == 0:
        meta = {"image_size": s, "num_images": n, "num_classes": data.num_classes, "images": args.images,
                "dtype": dtype.name, "flipped": args.flip}
        meta.update({"space": "svg", "svg_ae": os.path.abspath(args.svg_ae), "encode_chunk": batch}
                    if args.space == "svg" else {"vae": args.vae_weights})
        if args.features:
            torch.save({k: v.cpu() for k, v in proj.state_dict().items()}, os.path.join(partial, "pca.pt"))
            meta["features"] = {
                "enc": args.enc, "enc_weights": weights_name(args.enc_weights), "enc_seed": encoder_seed(args),
                "enc_size": args.enc_size, "enc_dim": encoder.dim, "grid": list(encoder.grid), "feat_dim": args.feat_dim, "views": views,
                "dtype": fdtype.name, "pca": pca_fingerprint(proj),
                "pca_from": os.path.abspath(args.pca_file) if args.pca_file else
                f"fitted on {min(args.pca_images, n)} of these images (seed {args.seed})"}
        with open(os.path.join(partial, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(out):  # --overwrite (or an empty folder): the old one goes once the new one is whole
            old = f"{out}.old-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(out, old)
            os.rename(partial, out)
            remove_cache(old)
        else:
            os.rename(partial, out)
        per_image = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / n
        print(f"wrote the latent cache of {n} images to {out} ({per_image / 1024:.1f} KB per image)")
    if ddp:
        dist.destroy_process_group()


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data-path", required=True, help="ImageFolder root (one sub-folder per class)")
    p.add_argument("--out", required=True, help="the cache folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a cache that is already at --out")
    p.add_argument("--image-size", type=positive_int, default=256,
                   help="ADM centre crop size (train.py --image-size)")
    p.add_argument("--vae-weights", default="stabilityai/sd-vae-ft-mse",
                   help="SD-VAE hub name or local diffusers folder ('random': tests): REPA's preprocessing (used by "
                        "ReDi and CoReDi) encodes with ft-mse; for SiT's recipe pass stabilityai/sd-vae-ft-ema")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per VAE forward (SVG: always 32, see above)")
    p.add_argument("--space", choices=["latent", "svg"], default="latent",
                   help="latent: SD-VAE posterior moments; svg: the SVG autoencoder's latents")
    p.add_argument("--svg-ae", default=None, help="svg: the trained SVG autoencoder (svg_ae.py's last.pt)")
    p.add_argument("--dino-weights", default=None, help="svg: local DINOv3 weights (default: the path its run recorded)")
    p.add_argument("--dtype", choices=["float16", "float32"], default=None,
                   help="how the latents, moments and features are stored; default: float16 for the SVG latents and "
                        "the features, float32 for the SD-VAE moments (REPA's)")
    p.add_argument("--images", action=argparse.BooleanOptionalAction, default=True,
                   help="store the images: the encoder's input, needed by every run that runs the encoder (repa, "
                        "coredi, redi without --features); sit and redi from --features need none")
    p.add_argument("--num-workers", type=nonneg_int, default=8, help="DataLoader worker processes per rank")
    # redi's features; the defaults are train.py's for --mode redi
    p.add_argument("--features", action="store_true",
                   help="also store redi's projected features, so that train.py --mode redi needs no encoder")
    p.add_argument("--flip", action="store_true",
                   help="also encode the horizontally flipped images (latents and --features), for runs "
                        "with --flip (sit's and SVG's default): the encoders are not flip-equivariant")
    p.add_argument("--enc", default=DINO, help="features: timm name of the encoder")
    p.add_argument("--enc-weights", default=None, help="features: as train.py --enc-weights (none = download)")
    p.add_argument("--enc-size", type=positive_int, default=224, help="features: the encoder's input resolution (DINOv2: 224)")
    p.add_argument("--feat-dim", type=positive_int, default=8, help="features: d, channels per token (ReDi: 8)")
    p.add_argument("--pca-file", default=None,
                   help="features: the projection to use (a run's pca.pt or ReDi's dino_pca_model.pth) instead "
                        "of a fit")
    p.add_argument("--pca-images", type=positive_int, default=2048, help="features: images that fit the PCA (train.py's default)")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="which images fit the PCA (train.py --seed), and random weights (tests)")
    args = p.parse_args(argv)
    if args.image_size % (16 if args.space == "svg" else 8):
        raise UserError(f"--image-size {args.image_size}: the {'SVG autoencoder' if args.space == 'svg' else 'SD-VAE'} "
                          f"needs a multiple of {16 if args.space == 'svg' else 8}")
    if args.space == "svg" and args.svg_ae is None:
        raise UserError("--space svg needs --svg-ae PATH, the trained SVG autoencoder (svg_ae.py's last.pt)")
    if args.features and args.space == "svg":
        raise UserError("--features is for --space latent: SVG's latent already is the encoder's feature map")
    if not args.features and args.pca_file:
        raise UserError("--pca-file is an option of --features (redi's stored features)")
    if args.pca_file:
        check_file(args.pca_file, "pass a run's pca.pt or ReDi's dino_pca_model.pth", "--pca-file")
    return args


if __name__ == "__main__":
    cli(lambda: main(get_args()))
