"""What a run shows while it trains: EMA sample grids, the projection picture (z~ of fixed images over training), the
loss curves and the FID, drawn through sample.py and fid.py."""
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

import fid
import sample as S
from support.data import fixed_images
from support.charts import chart, font
from support.cli import UserError

class Monitor:
    """Pictures and FID during training. pictures(): a grid of 16 EMA samples from fixed noise and labels, a row of
    the projection picture (z~ of 8 fixed images, when projection = (proj, encoder, data) is given) and the loss
    curves so far. fid(): the FID of --fid-samples EMA samples against --fid-ref (inception: check_fid's network)."""

    def __init__(self, args, run_dir, prediction, autoencoder, amp, device, inception=None, projection=None):
        self.args, self.run_dir, self.prediction, self.autoencoder = args, run_dir, prediction, autoencoder
        self.amp, self.device, self.inception, self.fixed = amp, device, inception, None
        if projection is not None:  # the projection picture follows the same images through training
            self.proj, self.encoder, data = projection
            img, labels = fixed_images(data, 8)
            self.fixed = (img.to(device).float() / 127.5 - 1, labels)

    def pictures(self, ema, step):
        a, run_dir = self.args, self.run_dir
        images, _, _ = S.generate(ema, range(16), self.device, self.prediction, vae=self.autoencoder, seed=a.seed,
                                  classes=[i % a.num_classes for i in range(16)], **S.default_sampler(a.space))
        S.save_grid(images, os.path.join(run_dir, f"samples_{step:07d}.png"))
        if self.fixed is not None:
            img, labels = self.fixed
            self.proj.eval()  # batch norm with its running statistics, as for any fixed image
            with self.amp:
                z_tilde = self.proj(self.encoder(img)).float()
            self.proj.train()
            path = os.path.join(run_dir, "projection.png")
            header = None if os.path.exists(path) else projection_header(img, labels)
            append_row(path, projection_row(z_tilde, self.encoder.grid), f"step {step}", header)
        loss_curves(os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "losses.png"), a.feat_dim)

    def fid(self, ema, step, rank, world):
        run_fid(ema, self.args, step, self.device, rank, world, self.autoencoder,
                os.path.join(self.run_dir, "log.jsonl"), self.inception, self.prediction)


class LogWriter:
    """The logged terms of each step, summed on the device (no host synchronisation) and written every --log-every
    steps and at the last: averaged over the window and over the ranks, one JSON line in <run>/log.jsonl. A
    non-finite mean (a loss, the gradient norm) stops the run there, with one line."""

    def __init__(self, run_dir, args, world, device, master):
        self.path, self.args, self.world, self.device, self.master = os.path.join(run_dir, "log.jsonl"), args, \
            world, device, master
        self.sums, self.counts, self.steps, self.t0 = {}, {}, 0, time.time()

    def due(self, step):
        """Whether step (counted from 1) writes a log line; the loss computes its costlier diagnostics then."""
        return step % self.args.log_every == 0 or step == self.args.max_steps

    def add(self, logs, step, bar):
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1
        if not self.due(step):
            return
        keys = sorted(self.sums)
        stats = torch.tensor([float(self.sums[k]) / self.counts[k] for k in keys], device=self.device)
        if self.world > 1:
            dist.all_reduce(stats)
            stats /= self.world
        means = dict(zip(keys, stats.tolist()))
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:  # on every rank (the means are all-reduced), before any checkpoint of this step
            raise UserError(f"non-finite loss or gradient ({', '.join(bad)}) in steps {step - self.steps + 1}"
                            f"-{step}; stopping without saving (the last good checkpoint is "
                            f"{os.path.dirname(self.path)}/last.pt); try a lower --lr")
        rec = {"step": step, **means,
               "img_per_s": self.steps * self.args.global_batch_size / (time.time() - self.t0)}
        if self.device.type == "cuda":  # the peak memory of the window's steps
            rec["max_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.write(" ".join(f"{k} {v:.4g}" for k, v in rec.items()))
        self.sums, self.counts, self.steps, self.t0 = {}, {}, 0, time.time()


def check_fid(args, device):
    """Before step 0: --fid-ref must be a readable ADM reference and the Inception weights must load, so that a bad
    flag fails now rather than at the first FID. Returns the Inception network."""
    fid.image_batches(args.fid_ref, 1)
    return fid.load_inception(args.inception_weights, device)


def run_fid(ema, args, step, device, rank, world, vae, log_path, inception, prediction):
    """FID of --fid-samples EMA samples against --fid-ref: every rank samples its share, rank 0 scores. The noise
    seed differs from the pictures' (seed + 1). A failure of the scoring is logged and training goes on."""
    n = args.fid_samples // world * world
    mine = list(range(rank, n, world))
    imgs = [S.generate(ema, mine[i:i + 64], device, prediction, vae=vae, seed=args.seed + 1,
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

