"""
The papers' central claim on a laptop: with a semantic encoder, REPA, ReDi and CoReDi reach a given sample quality
in fewer training steps than plain SiT.

  python -m experiments.convergence                        # the experiment (docs/experiments.md, "Convergence")
  python -m experiments.convergence --steps 8 --eval-every 4 --seeds 0 --samples 32 ...   # a smoke run

Everything uses the hard synthetic set (support.data.SyntheticImages(hard=True): the class is a shape in any colour),
in disjoint splits, one seed of the generator each:
  generators     train.py's own data (seed = the run's --seeds value), the same tiny DiT, batch, steps for every mode,
                 each trained by a `python train.py` run of its own
  toy encoder    a tiny ViT of DINOv2's architecture (make_encoder's 'tiny' size), trained here as a classifier on split
                 ENC_SEED and saved as .safetensors with its timm overrides in the metadata; every mode loads it with
                 --enc-weights, exactly as it would load real DINOv2 weights
  toy evaluator  a small CNN (another architecture, so it does not share the encoder's view), trained as a classifier
                 on split EVAL_SEED, never seen by a generator or the encoder; its penultimate features give a
                 Frechet distance ("toy-FD", fid.py's code) between samples and the reference split REF_SEED, its
                 predictions the class accuracy of class-conditional samples
Every --eval-every steps the EMA weights sample --samples images from fixed noise and fixed, balanced labels, without
guidance, with the same sampler. Writes <out>/convergence.md (tables), convergence.json and convergence.png (both
metrics over steps, mean and min-max band over seeds).
"""
import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import fid
import model as M
import sample as S
from experiments import run_script
from support.charts import nice_ticks
from support.cli import HelpFormatter, UserError, cli
from support.data import SyntheticImages
from support.frozen import DINO, Encoder
from support.released import load_dit_state_dict

MODES = ["sit", "repa", "redi", "coredi"]
NUM_CLASSES = 10
ENC_SEED, EVAL_SEED, REF_SEED, ENC_TEST_SEED, NOISE_SEED = 1000, 2000, 2001, 1001, 3000  # data splits, sample noise
TINY = dict(depth=2, embed_dim=64, num_heads=2)  # support.frozen.make_encoder's 'tiny' DINOv2 architecture


def hard_set(n, size, seed):
    """n images of the hard synthetic set as a uint8 (n, 3, size, size) tensor, and their labels."""
    data = SyntheticImages(n, size, NUM_CLASSES, seed, hard=True)
    return torch.stack([data[i][0] for i in range(n)]), torch.from_numpy(data.labels)


def augment(x, g):
    """Random flips and shifts of up to 1/8 of the image (reflect padding): both classifiers should see shapes,
    not pixel positions."""
    x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
    pad = x.shape[-1] // 8
    x = F.pad(x, (pad,) * 4, mode="reflect")
    i, j = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    return x[..., i:i + x.shape[-2] - 2 * pad, j:j + x.shape[-1] - 2 * pad]


def fit_classifier(params, loss_of, images, labels, steps, batch, lr, seed, augment=augment):
    """AdamW with a one-cycle schedule (10% warm-up, cosine decay) on loss_of(x in [-1, 1], labels), e.g. the
    cross-entropy of a classifier's logits; images uint8 (N, 3, H, W), augmented by augment(x, generator)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=g)
        loss = loss_of(augment(images[idx].float() / 127.5 - 1, g), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"  step {step + 1}/{steps}: loss {loss.item():.3f}")


# -----------------------------------------------------------------------------
# The toy encoder: DINOv2's architecture, tiny, trained as a classifier

def train_encoder(path, a):
    """A classifier, not self-supervised: in ~2 CPU minutes a supervised ViT reliably learns tokens that separate the
    classes (what makes DINOv2's features useful to the generators: they are linearly class-separable), while DINO-
    style self-distillation needs far longer to leave its trivial solutions. The head reads the mean patch token, so
    the patch tokens, which every mode uses, carry the class. Saved without the head, as DINOv2 is."""
    t0 = time.time()
    images, labels = hard_set(a.enc_images, a.image_size, ENC_SEED)
    torch.manual_seed(a.seeds[0])
    enc = Encoder(DINO, "random", a.enc_size, **TINY)
    enc.net.requires_grad_(True)
    head = nn.Linear(enc.dim, NUM_CLASSES)
    tokens = Encoder.forward.__wrapped__  # Encoder.forward without its no_grad: the same resize and normalisation
    logits = lambda x: head(tokens(enc, x).mean(1))
    print(f"training the toy encoder (tiny DINOv2, {a.enc_steps} steps on {a.enc_images} images of split {ENC_SEED})")
    fit_classifier(list(enc.net.parameters()) + list(head.parameters()), lambda x, y: F.cross_entropy(logits(x), y),
                   images, labels, a.enc_steps, a.cls_batch, 3e-3, a.seeds[0])
    with torch.no_grad():
        test, test_labels = hard_set(a.ref_images, a.image_size, ENC_TEST_SEED)
        acc = (logits(test.float() / 127.5 - 1).argmax(1) == test_labels).float().mean().item()
    from safetensors.torch import save_file
    info = {"timm_arch": json.dumps(TINY), "accuracy": f"{acc:.4f}", "seconds": f"{time.time() - t0:.0f}",
            "trained_on": f"SyntheticImages(hard=True) seed {ENC_SEED}, {a.enc_images} images, {a.enc_steps} steps"}
    save_file({k: v.contiguous() for k, v in enc.net.state_dict().items()}, path, metadata=info)
    print(f"toy encoder: accuracy {acc:.3f} on {a.ref_images} held-out images (split {ENC_TEST_SEED}), "
          f"{info['seconds']} s -> {path}")


def encoder_info(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return f.metadata()


# -----------------------------------------------------------------------------
# The toy evaluator: a small CNN, trained on its own split

class ToyEvaluator(nn.Module):
    """Three conv stages (16, 32, 64 channels, each two 3x3 convs with batch norm), global average pooling and a
    64-d penultimate layer: its activations are the toy-FD's features (as Inception's pool3 for FID), its head the
    classifier. Input: images in [-1, 1]."""

    def __init__(self, num_classes=NUM_CLASSES, feat_dim=64):
        super().__init__()
        layers, c_in = [], 3
        for c in (16, 32, 64):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, feat_dim),
                                      nn.ReLU())
        self.head = nn.Linear(feat_dim, num_classes)

    def forward(self, x):
        f = self.features(x)
        return f, self.head(f)


@torch.no_grad()
def evaluator_outputs(net, images, batch=500):
    """uint8 images, (N, H, W, 3) as sample.generate returns them or (N, 3, H, W) -> float64 features, predictions."""
    x = torch.as_tensor(images)
    x = x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x
    feats, preds = [], []
    for i in range(0, len(x), batch):
        f, logits = net(x[i:i + batch].float() / 127.5 - 1)
        feats.append(f.double())
        preds.append(logits.argmax(1))
    return torch.cat(feats).numpy(), torch.cat(preds)


def class_accuracy(net, images, labels):
    return (evaluator_outputs(net, images)[1] == torch.as_tensor(labels)).float().mean().item()


def toy_fd(net, images, ref_stats):
    """Frechet distance of the images' evaluator features to the reference statistics (fid.py's code)."""
    return fid.frechet_distance(*fid.statistics(evaluator_outputs(net, images)[0]), *ref_stats)


def train_evaluator(path, a):
    t0 = time.time()
    images, labels = hard_set(a.evaluator_images, a.image_size, EVAL_SEED)
    torch.manual_seed(a.seeds[0])
    net = ToyEvaluator()
    print(f"training the toy evaluator (CNN, {a.evaluator_steps} steps on {a.evaluator_images} images of split "
          f"{EVAL_SEED})")
    fit_classifier(net.parameters(), lambda x, y: F.cross_entropy(net(x)[1], y), images, labels, a.evaluator_steps,
                   a.cls_batch, 3e-3, a.seeds[0])
    net.eval()
    ref, ref_labels = hard_set(a.ref_images, a.image_size, REF_SEED)
    acc = class_accuracy(net, ref, ref_labels)
    torch.save({"model": net.state_dict(), "accuracy": acc, "ref_seed": REF_SEED, "ref_images": a.ref_images,
                "image_size": a.image_size, "seconds": time.time() - t0}, path)
    print(f"toy evaluator: accuracy {acc:.3f} on the {a.ref_images} reference images (split {REF_SEED}), "
          f"{time.time() - t0:.0f} s -> {path}")


def load_evaluator(path):
    """The evaluator, its checkpoint dict and the reference statistics (mu, sigma) of its reference split."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = ToyEvaluator()
    net.load_state_dict(ckpt["model"])
    net.eval()
    ref, _ = hard_set(ckpt["ref_images"], ckpt["image_size"], ckpt["ref_seed"])
    return net, ckpt, fid.statistics(evaluator_outputs(net, ref)[0])


# -----------------------------------------------------------------------------
# The generators: a train.py process each, EMA checkpoints every --eval-every steps, each sampled and measured

@torch.no_grad()
def measure(ckpt_path, net, ref_stats, a):
    """toy-FD and class accuracy of --samples EMA samples: fixed noise (NOISE_SEED and the sample's index), balanced
    labels, no guidance, Euler with --sample-steps steps."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    dit = load_dit_state_dict(M.create_model(cfg["model"], **cfg["arch"]), ckpt["ema"]).eval()
    images, y, _ = S.generate(dit, range(a.samples), "cpu", cfg["prediction"], sampler="euler", steps=a.sample_steps,
                              seed=NOISE_SEED, classes=list(range(NUM_CLASSES)))
    return toy_fd(net, images, ref_stats), class_accuracy(net, images, y), images


def train_and_measure(mode, seed, enc_path, net, ref_stats, a, extra):
    """One generator: trains it (or reuses the measurements of a finished run with the same flags) and returns
    [{step, fd, acc}] at every --eval-every steps, and the seconds its training and measuring took."""
    run = f"{mode}-s{seed}"
    flags = lambda out, enc: [
        "--mode", mode, "--synthetic-hard", "--enc", DINO, "--enc-weights", enc, "--enc-size", str(a.enc_size),
        "--image-size", str(a.image_size), "--model", a.model, "--seed", str(seed), "--max-steps", str(a.steps),
        "--global-batch-size", str(a.batch), "--feat-drop", "0", "--results-dir", out, "--run-name", run,
        "--sample-every", "0", "--ckpt-every", str(a.eval_every), "--keep-every", str(a.eval_every),
        "--log-every", str(a.eval_every), "--num-workers", "0"] + extra
    return run_and_measure(os.path.join(a.out, run), flags(a.out, enc_path),  # train.py runs in the repository root
                           flags(os.path.abspath(a.out), os.path.abspath(enc_path)), net, ref_stats, a,
                           lambda images, run_dir: S.save_grid(images, os.path.join(run_dir, "samples_last.png")))


def run_and_measure(run_dir, flags, argv, net, ref_stats, a, save_samples):
    """`python train.py argv` into run_dir, its EMA measured every --eval-every steps: [{step, fd, acc}] and the
    seconds its training and measuring took; or the measurements of a finished run whose flags (as given) and
    sampling settings are the same. save_samples(images, run_dir) keeps samples of the last measurement (also
    digits.py)."""
    run = os.path.basename(run_dir)
    settings = {"flags": flags, "samples": a.samples, "sample_steps": a.sample_steps}
    done = os.path.join(run_dir, "measured.json")
    if os.path.exists(done):
        with open(done) as f:
            old = json.load(f)
        if {k: old[k] for k in settings} != settings:
            raise UserError(f"{run_dir} was measured with other settings; choose another --out or delete it")
        print(f"=== {run}: reusing {done}")
        return old["evals"], old["seconds"]
    if os.path.isdir(run_dir):  # an interrupted run of this script: its partial log and checkpoints go
        print(f"=== {run}: removing the unfinished {run_dir}")
        shutil.rmtree(run_dir)
    print(f"=== {run}: python train.py {' '.join(argv)}", flush=True)
    t0 = time.time()
    run_script(f"run {run_dir}", "train.py", argv)
    evals = []
    for step in range(a.eval_every, a.steps + 1, a.eval_every):
        path = os.path.join(run_dir, f"step_{step:07d}.pt")
        fd, acc, images = measure(path, net, ref_stats, a)
        evals.append({"step": step, "fd": fd, "acc": acc})
        print(f"{run} step {step}: toy-FD {fd:.3f}, accuracy {acc:.3f}")
        os.remove(path)  # the measurements are what this script keeps; last.pt stays
    save_samples(images[:4 * NUM_CLASSES], run_dir)
    seconds = time.time() - t0
    with open(done, "w") as f:
        json.dump({**settings, "evals": evals, "seconds": seconds}, f)
    return evals, seconds


# -----------------------------------------------------------------------------
# Report: tables and the chart

def reach(steps, values, target, lower_is_better):
    """The first checkpoint whose value is at least as good as target, or None."""
    for s, v in zip(steps, values):
        if (v <= target) if lower_is_better else (v >= target):
            return s
    return None


def speedups(curves, steps, key, lower_is_better):
    """Per mode: the steps it needs to reach SiT's final value, per seed (against that seed's SiT), and the speed-up
    (the budget over those steps) of the seed-mean curve against SiT's seed-mean final value."""
    out = {}
    sit_mean = np.mean([c[key][-1] for c in curves["sit"]])
    for mode, runs in curves.items():
        per_seed = [reach(steps, r[key], sit[key][-1], lower_is_better) for r, sit in zip(runs, curves["sit"])]
        mean_reach = reach(steps, np.mean([r[key] for r in runs], 0), sit_mean, lower_is_better)
        out[mode] = (per_seed, steps[-1] / mean_reach if mean_reach else None)
    return out


def cell(vals, fmt):
    return f"{np.mean(vals):{fmt}} ({np.min(vals):{fmt}}–{np.max(vals):{fmt}})" if len(vals) > 1 else f"{vals[0]:{fmt}}"


def tables(curves, steps, a):
    lines = []
    for key, name, fmt in (("fd", "toy-FD (lower is better)", ".2f"), ("acc", "class accuracy", ".3f")):
        lines += [f"**{name}**, mean (min–max) over seeds {', '.join(map(str, a.seeds))}", "",
                  "| mode | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
        for mode, runs in curves.items():
            lines.append(f"| {mode} | " + " | ".join(cell([r[key][j] for r in runs], fmt) for j in range(len(steps)))
                         + " |")
        lines.append("")
    lines += ["**steps to reach SiT's final value** (per seed, against that seed's SiT; '>N': not within the budget) "
              "and the speed-up of the seed-mean curve (budget / steps to SiT's seed-mean final value)", "",
              "| mode | toy-FD: steps | toy-FD: speed-up | accuracy: steps | accuracy: speed-up |", "|---" * 5 + "|"]
    fd, acc = speedups(curves, steps, "fd", True), speedups(curves, steps, "acc", False)
    show = lambda per: ", ".join(str(s) if s else f">{steps[-1]}" for s in per)
    speed = lambda x: f"{x:.2f}x" if x else "<1x"
    # An accuracy within two binomial standard errors of chance is no level to reach: its speed-ups would be noise.
    chance = 1 / NUM_CLASSES
    at_chance = np.mean([r["acc"][-1] for r in curves["sit"]]) < chance + 2 * np.sqrt(chance * (1 - chance) / a.samples)
    for mode in curves:
        acc_cells = "n/a (SiT at chance) | n/a" if at_chance else f"{show(acc[mode][0])} | {speed(acc[mode][1])}"
        lines.append(f"| {mode} | {show(fd[mode][0])} | {speed(fd[mode][1])} | {acc_cells} |")
    return "\n".join(lines)


def draw(curves, steps, path, title):
    """Two panels (toy-FD, accuracy) over training steps: the seed mean as a line, the min-max over seeds as a band."""
    colors = {"sit": (0, 0, 0), "repa": (31, 119, 180), "redi": (255, 127, 14), "coredi": (214, 39, 40)}
    PW, PH, L, TOP, BOT, GAP = 420, 300, 60, 50, 50, 40
    W, H = 2 * (L + PW) + GAP + 20, TOP + PH + BOT + 30
    im = Image.new("RGB", (W, H), "white")
    band = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d, db = ImageDraw.Draw(im), ImageDraw.Draw(band)
    d.text((L, 10), title, fill="black")
    panels = [("fd", "toy-FD (lower is better)"), ("acc", "class accuracy of the samples")]
    for k, (key, ylabel) in enumerate(panels):
        x0 = L + k * (L + PW + GAP)
        vals = [v for runs in curves.values() for r in runs for v in r[key]]
        lo, hi = (0.0, 1.0) if key == "acc" else (0.0, max(vals) * 1.05)
        X = lambda s: x0 + PW * s / steps[-1]
        Y = lambda v: TOP + PH - PH * (v - lo) / (hi - lo)
        for v in [v for v in nice_ticks(lo, hi) if lo <= v <= hi]:  # the ticks inside the panel
            d.line([(x0, Y(v)), (x0 + PW, Y(v))], fill=(230, 230, 230))
            d.text((x0 - 8 - 6 * len(f"{v:g}"), Y(v) - 6), f"{v:g}", fill="black")
        for s in [0] + steps:
            d.line([(X(s), TOP + PH), (X(s), TOP + PH + 4)], fill="black")
            d.text((X(s) - 3 * len(str(s)), TOP + PH + 7), str(s), fill="black")
        d.rectangle([x0, TOP, x0 + PW, TOP + PH], outline="black")
        d.text((x0 + PW // 2 - 45, TOP + PH + 24), "training step", fill="black")
        d.text((x0, TOP - 16), ylabel, fill="black")
        if key == "acc":  # chance level, the floor a class-blind generator sits on
            for x in range(x0, x0 + PW, 8):
                d.line([(x, Y(1 / NUM_CLASSES)), (x + 4, Y(1 / NUM_CLASSES))], fill=(120, 120, 120))
            d.text((x0 + 4, Y(1 / NUM_CLASSES) - 14), "chance", fill=(120, 120, 120))
        for j, (mode, runs) in enumerate(curves.items()):
            c = colors.get(mode, (120, 120, 120))
            arr = np.array([r[key] for r in runs])
            pts = lambda v: [(X(s), Y(y)) for s, y in zip(steps, v)]
            if len(runs) > 1:
                db.polygon(pts(arr.max(0)) + pts(arr.min(0))[::-1], fill=c + (50,))
            d.line(pts(arr.mean(0)), fill=c, width=2)
            for p in pts(arr.mean(0)):
                d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=c)
            if k == 1:  # the legend, once
                d.line([(x0 + PW - 90, TOP + 12 + 16 * j), (x0 + PW - 70, TOP + 12 + 16 * j)], fill=c, width=3)
                d.text((x0 + PW - 64, TOP + 6 + 16 * j), mode, fill="black")
    im = Image.alpha_composite(im.convert("RGBA"), band).convert("RGB")
    ImageDraw.Draw(im).text((L, H - 18), "line: mean over seeds; band: min-max over seeds", fill="black")
    im.save(path)


# -----------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.convergence", description=__doc__,
                                formatter_class=HelpFormatter,
                                epilog="any other flag is passed to every train.py run")
    p.add_argument("--out", default="results/convergence", help="folder of the encoder, evaluator, runs and report")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes; sit (the reference) must be one")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1],
                   help="comma-separated seeds: each trains every mode (weights, noise, data order and data split)")
    p.add_argument("--steps", type=int, default=240, help="training steps of every run (the budget)")
    p.add_argument("--eval-every", type=int, default=60, help="measure the EMA weights every N steps")
    p.add_argument("--batch", type=int, default=32, help="global batch size of every run")
    p.add_argument("--model", default="DiT-T/8", help="the tiny DiT of every run (T/8 at 32 px: 4x4 tokens)")
    p.add_argument("--image-size", type=int, default=32, help="image resolution of every network")
    p.add_argument("--enc-size", type=int, default=56, help="the encoder's input size (56 / patch 14: the 4x4 grid)")
    p.add_argument("--samples", type=int, default=160, help="samples per measurement (balanced over the 10 classes)")
    p.add_argument("--sample-steps", type=int, default=10, help="Euler steps of every measurement")
    p.add_argument("--ref-images", type=int, default=1000, help="reference (and held-out) images for FD and accuracy")
    p.add_argument("--enc-images", type=int, default=5000, help="training images of the toy encoder")
    p.add_argument("--enc-steps", type=int, default=1200, help="training steps of the toy encoder")
    p.add_argument("--evaluator-images", type=int, default=5000, help="training images of the toy evaluator")
    p.add_argument("--evaluator-steps", type=int, default=300, help="training steps of the toy evaluator")
    p.add_argument("--cls-batch", type=int, default=64, help="batch size of both classifiers")
    a, extra = p.parse_known_args(argv)
    a.modes = a.modes.split(",")
    if "sit" not in a.modes or not set(a.modes) <= set(MODES):
        raise UserError(f"--modes must include sit and be among {','.join(MODES)}")
    check_schedule(a)
    return a, extra


def measure_all(names, seeds, measure):
    """Every run, seed by seed, through measure(name, seed) -> (its measurements, its training seconds): the toy-FD
    and accuracy curves of each name (one per seed) and the total training seconds (also digits.py)."""
    curves, run_seconds = {n: [] for n in names}, 0.0
    for seed in seeds:
        for name in names:
            evals, seconds = measure(name, seed)
            run_seconds += seconds
            curves[name].append({"fd": [e["fd"] for e in evals], "acc": [e["acc"] for e in evals]})
    return curves, run_seconds


def check_schedule(a):
    """--steps a multiple of --eval-every, and a warning when --samples are too few for the toy-FD (also digits.py)."""
    if a.eval_every < 1 or a.steps % a.eval_every:
        raise UserError(f"--steps {a.steps} must be a multiple of --eval-every {a.eval_every}")
    if a.samples <= 64:
        print(f"WARNING: {a.samples} samples for 64-d features: the toy-FD's covariance is singular (smoke runs only)")


def main(argv=None):
    a, extra = get_args(argv)
    t_start, load_start = time.time(), os.getloadavg()
    os.makedirs(a.out, exist_ok=True)
    enc_path, eval_path = os.path.join(a.out, "toy_encoder.safetensors"), os.path.join(a.out, "toy_evaluator.pt")
    for path, train in ((enc_path, train_encoder), (eval_path, train_evaluator)):
        if os.path.exists(path):
            print(f"reusing {path} (delete it to retrain)")
        else:
            train(path, a)
    net, eval_ckpt, ref_stats = load_evaluator(eval_path)
    enc = encoder_info(enc_path)
    steps = list(range(a.eval_every, a.steps + 1, a.eval_every))
    curves, run_seconds = measure_all(a.modes, a.seeds,
                                      lambda m, s: train_and_measure(m, s, enc_path, net, ref_stats, a, extra))
    wall, load_end = time.time() - t_start, os.getloadavg()
    cmd = " ".join(["python -m experiments.convergence", *(argv if argv is not None else sys.argv[1:])])
    report = (f"`{cmd}`: {', '.join(a.modes)} x seeds {', '.join(map(str, a.seeds))}, {a.steps} steps of {a.model} "
              f"at batch {a.batch}; {a.samples} EMA samples per point (Euler {a.sample_steps} steps, no guidance). "
              f"Toy encoder: held-out accuracy {float(enc['accuracy']):.3f}, trained in {enc['seconds']} s. Toy "
              f"evaluator: accuracy {eval_ckpt['accuracy']:.3f} on the reference images (the ceiling), trained in "
              f"{eval_ckpt['seconds']:.0f} s. The runs took {run_seconds / 60:.1f} min (training and measuring, "
              f"summed over runs, reused ones included); this invocation {wall / 60:.1f} min with "
              f"{torch.get_num_threads()} thread(s), "
              f"load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end "
              f"({os.cpu_count()} CPUs).\n\n" + tables(curves, steps, a) + "\n")
    with open(os.path.join(a.out, "convergence.md"), "w") as f:
        f.write(report)
    with open(os.path.join(a.out, "convergence.json"), "w") as f:
        json.dump({"steps": steps, "curves": curves, "encoder": enc, "evaluator_accuracy": eval_ckpt["accuracy"],
                   "wall_s": wall, "run_s": run_seconds}, f, indent=1)
    draw(curves, steps, os.path.join(a.out, "convergence.png"),
         f"{a.model}, hard synthetic set, {len(a.seeds)} seed(s): EMA samples every {a.eval_every} steps "
         f"(evaluator ceiling: accuracy {eval_ckpt['accuracy']:.3f})")
    print(report)
    print(f"wrote {a.out}/convergence.md, convergence.json, convergence.png")


if __name__ == "__main__":
    cli(main)
