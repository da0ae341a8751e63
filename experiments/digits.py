"""
The papers' central claim on real data a laptop can learn: with an encoder whose tokens carry the
class, do REPA, ReDi and CoReDi reach SiT's sample quality in fewer training steps? Asked on
handwritten digits.

  OMP_NUM_THREADS=1 python -m experiments.digits   # the experiment (docs/experiments.md, digits)
  python -m experiments.digits --steps 2 --eval-every 1 --seeds 0 --runs sit,coredi ...  # smoke

Data: experiments/digits.npz, the 1,797 8x8 handwritten digits that ship with scikit-learn
(load_digits: a copy of the test set of the UCI "Optical Recognition of Handwritten Digits" data,
E. Alpaydin and C. Kaynak, 1998, https://archive.ics.uci.edu/dataset/80, licence CC BY 4.0):
images (1797x8x8 uint8 counts 0..16, as the source has them), labels 0..9 and a fixed split, drawn
once with a seeded permutation (numpy default_rng(1797)) and stored with them (split: 0 train 1000,
1 evaluator 400, 2 reference 397). extract() rebuilds the file with scikit-learn, which the project
does not otherwise need. Every network sees the digits upscaled to 32 px (bicubic, white on black).
  generators  train.py in pixel space on the train split, written once as an ImageFolder
              (<out>/data/train, a folder of PNGs per class) and read through --data-path: the demo
              preset's DiT-T/4 (8x8 tokens), optimiser and EMA; the same seed, batch and steps for
              every mode, no flips, no feature dropout
  encoder     a ViT of DINOv2's architecture at the demo's tiny size (convergence.TINY), trained
              supervised (every patch token classified on its own) on the train split only, its
              held-out accuracy measured on the other 797 digits, saved as .safetensors with its
              timm overrides: every mode loads it with the ordinary --enc-weights PATH.
              Control: coredi with a random encoder of the same architecture (--enc-weights tiny),
              the run "coredi-random"
  evaluator   convergence.ToyEvaluator (a small CNN) trained on the evaluator split only: the class
              accuracy of class-conditional samples, and the Frechet distance of its 64-d features
              to the reference split's (toy-FD, fid.py's code). The ceiling: real reference digits
              measured the same way
Every --eval-every steps the EMA weights draw --samples images from fixed noise and balanced labels
(Euler, --sample-steps, no guidance: convergence.measure). Writes <out>/digits.md (tables),
digits.json, digits.png (both metrics over steps) and samples.png (the last samples of the first
seed, a block per run).
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
from experiments import convergence as C
from support.charts import chart, font
from support.cli import HelpFormatter, UserError, cli
from support.frozen import DINO, Encoder

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")
SPLITS = {"train": 0, "evaluator": 1, "reference": 2}  # the stored split's values
SIZE = 32  # the generators' resolution: 8x8 digits upscaled 4x
RUNS = {  # run name: (mode, flags after the shared ones)
    "sit": ("sit", []), "repa": ("repa", []), "redi": ("redi", []), "coredi": ("coredi", []),
    "coredi-random": ("coredi", ["--enc-weights", "tiny"])}  # the control: a random encoder
NUM_CLASSES = C.NUM_CLASSES


# -----------------------------------------------------------------------------
# The data: a file in the repository, a fixed split, 32 px

def extract(path=DATA):
    """Writes the data file from scikit-learn's copy of the digits (once; not a dependency)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    images, labels = d.images.astype(np.uint8), d.target.astype(np.uint8)
    assert (images == d.images).all()  # integer counts 0..16: uint8 is exact
    perm = np.random.default_rng(1797).permutation(len(labels))
    split = np.zeros(len(labels), np.uint8)
    split[perm[1000:1400]], split[perm[1400:]] = SPLITS["evaluator"], SPLITS["reference"]
    np.savez_compressed(path, images=images, labels=labels, split=split)


def split_indices(name, path=DATA):
    """The indices (into the file) of a split, ascending: the same every call (stored split)."""
    with np.load(path, allow_pickle=False) as f:
        return np.flatnonzero(f["split"] == SPLITS[name])


def upscale(counts):
    """uint8 counts 0..16 (N, 8, 8) -> uint8 (N, 3, 32, 32): to 0..255, bicubic 4x, grey as RGB."""
    x = torch.from_numpy(counts.astype(np.float32) * (255 / 16))[:, None]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def load_split(name, path=DATA):
    """A split's digits at 32 px as uint8 (N, 3, 32, 32) and their labels (N,) int64."""
    idx = split_indices(name, path)
    with np.load(path, allow_pickle=False) as f:
        return upscale(f["images"][idx]), torch.from_numpy(f["labels"][idx].astype(np.int64))


def balanced(labels, n):
    """Indices of n items labelled i % 10 in turn, as the samples are: a class's first unused."""
    pools = [list(np.flatnonzero(np.asarray(labels) == c)) for c in range(NUM_CLASSES)]
    return [pools[i % NUM_CLASSES].pop(0) for i in range(n)]


def write_image_folder(root):
    """The train split as train.py's --data-path: root/<label>/<index in the file>.png, 32-px RGB.
    Written to a temporary folder renamed when complete, so that a folder that exists is whole."""
    if os.path.isdir(root):
        return
    images, labels = load_split("train")
    tmp = root + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for c in range(NUM_CLASSES):
        os.makedirs(os.path.join(tmp, str(c)))
    for i, img, y in zip(split_indices("train"), images, labels.tolist()):
        png = os.path.join(tmp, str(y), f"{i:04d}.png")
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(png)
    os.replace(tmp, root)


# -----------------------------------------------------------------------------
# The classifiers: the encoder and the evaluator

def shift(x, g, pad):
    """Random shifts of up to pad pixels, black outside; no flips: they make digits other shapes."""
    x = F.pad(x, (pad,) * 4, value=-1.0)
    i, j = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    return x[..., i:i + x.shape[-2] - 2 * pad, j:j + x.shape[-1] - 2 * pad]


def train_encoder(path, a):
    """Supervised, as convergence.train_encoder and for its reason (class-separating tokens within
    minutes), but taught per token: a linear head classifies every patch token on its own (cross-
    entropy averaged over the 8x8 tokens), as the generators use every token; an image's prediction
    is the mean of its tokens' logits. No augmentation: on the 8x8 grid each token sees one pixel of
    the 8x8 original, and this ViT learns shifted digits far more slowly (a mean-pooled head after
    500 steps: 58% held-out with shifts of 1 px, 76% without). Trained on the train split only,
    tested on the other 797 digits, saved without its head."""
    from safetensors.torch import save_file
    t0 = time.time()
    images, labels = load_split("train")
    torch.manual_seed(a.seeds[0])
    enc = Encoder(DINO, "random", a.enc_size, **C.TINY)
    enc.net.requires_grad_(True)
    head = nn.Linear(enc.dim, NUM_CLASSES)
    tokens = Encoder.forward.__wrapped__  # without its no_grad: the same resize and normalisation
    token_logits = lambda x: head(tokens(enc, x))  # (B, L, classes)
    n_tokens = enc.grid[0] * enc.grid[1]
    per_token = lambda x, y: F.cross_entropy(token_logits(x).transpose(1, 2),
                                             y[:, None].expand(-1, n_tokens))
    print(f"training the encoder (tiny DINOv2, {a.enc_steps} steps on the {len(images)} training "
          f"digits)")
    C.fit_classifier(list(enc.net.parameters()) + list(head.parameters()), per_token, images, labels,
                     a.enc_steps, a.cls_batch, 3e-3, a.seeds[0], augment=lambda x, g: x)  # none: see above
    test, test_labels = (torch.cat(t) for t in zip(load_split("evaluator"),
                                                   load_split("reference")))
    with torch.no_grad():
        logits = token_logits(test.float() / 127.5 - 1)
    acc = (logits.mean(1).argmax(1) == test_labels).float().mean().item()
    token_acc = (logits.argmax(2) == test_labels[:, None]).float().mean().item()
    info = {"timm_arch": json.dumps(C.TINY), "accuracy": f"{acc:.4f}",
            "token_accuracy": f"{token_acc:.4f}", "seconds": f"{time.time() - t0:.0f}",
            "trained_on": f"digits.npz train split ({len(images)} digits), {a.enc_steps} steps, "
                          f"supervised per token"}
    save_file({k: v.contiguous() for k, v in enc.net.state_dict().items()}, path, metadata=info)
    print(f"encoder: accuracy {acc:.3f} on the {len(test)} held-out digits ({token_acc:.3f} per "
          f"token alone), {info['seconds']} s -> {path}")


def train_evaluator(path, a):
    """Trained on the evaluator split only; its accuracy on the reference split (never trained on)
    is the ceiling. Shifts: a CNN learns them at no cost, and samples vary in position."""
    t0 = time.time()
    images, labels = load_split("evaluator")
    torch.manual_seed(a.seeds[0])
    net = C.ToyEvaluator()
    print(f"training the evaluator (CNN, {a.evaluator_steps} steps on the {len(images)} evaluator "
          f"digits)")
    C.fit_classifier(net.parameters(), lambda x, y: F.cross_entropy(net(x)[1], y), images, labels,
                     a.evaluator_steps, a.cls_batch, 3e-3, a.seeds[0],
                     augment=lambda x, g: shift(x, g, 3))  # shifts only: flips make digits other shapes
    net.eval()
    acc = C.class_accuracy(net, *load_split("reference"))
    torch.save({"model": net.state_dict(), "accuracy": acc, "seconds": time.time() - t0}, path)
    print(f"evaluator: accuracy {acc:.3f} on the reference digits, {time.time() - t0:.0f} s -> "
          f"{path}")


def load_evaluator(path):
    """The evaluator, its checkpoint dict and the statistics (mu, sigma) of the reference split."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = C.ToyEvaluator()
    net.load_state_dict(ckpt["model"])
    net.eval()
    return net, ckpt, fid.statistics(C.evaluator_outputs(net, load_split("reference")[0])[0])


def real_values(net, ref_stats, n):
    """toy-FD and accuracy of n real digits, labelled as the samples are (balanced, in turn) and
    measured as they are: from the reference split (the ceiling) and from the train split (the
    generators' own data)."""
    out = {}
    for name in ("reference", "train"):
        images, labels = load_split(name)
        idx = balanced(labels, min(n, len(labels)))
        out[name] = {"fd": C.toy_fd(net, images[idx], ref_stats),
                     "acc": C.class_accuracy(net, images[idx], labels[idx])}
    return out


# -----------------------------------------------------------------------------
# The generators: a train.py process each, measured every --eval-every steps (convergence.measure)

def run_flags(name, seed, data, enc, out, a, extra):
    """train.py's flags: the shared ones, the user's extra ones, then the run's own (the control's
    --enc-weights wins)."""
    mode, own = RUNS[name]
    return ["--preset", "demo", "--mode", mode, "--data-path", data, "--image-size", str(SIZE),
            "--num-classes", str(NUM_CLASSES), "--no-flip", "--model", a.model, "--enc", DINO,
            "--enc-weights", enc, "--enc-size", str(a.enc_size), "--seed", str(seed),
            "--max-steps", str(a.steps), "--global-batch-size", str(a.batch),
            "--warmup-steps", str(a.warmup), "--feat-drop", "0", "--results-dir", out,
            "--run-name", f"{name}-s{seed}", "--sample-every", "0",
            "--ckpt-every", str(a.eval_every), "--keep-every", str(a.eval_every),
            "--log-every", str(a.eval_every),
            "--num-workers", "0"] + extra + own


def train_and_measure(name, seed, paths, net, ref_stats, a, extra):
    """One generator, or the measurements of a finished one with the same settings:
    [{step, fd, acc}] and the seconds its training and measuring took."""
    ab = {k: os.path.abspath(v) for k, v in paths.items()}  # train.py runs in the repository root
    return C.run_and_measure(
        os.path.join(a.out, f"{name}-s{seed}"), run_flags(name, seed, paths["data"], paths["enc"], a.out, a, extra),
        run_flags(name, seed, ab["data"], ab["enc"], os.path.abspath(a.out), a, extra), net, ref_stats, a,
        lambda images, run_dir: np.save(os.path.join(run_dir, "samples_last.npy"), images))  # samples.png's


# -----------------------------------------------------------------------------
# Report: tables, the chart, the samples

def real_table(real, ev_acc):
    rows = [("real reference digits (the ceiling)", real["reference"]),
            ("real training digits (the generators' data)", real["train"])]
    return "\n".join(
        ["**real digits, measured as the samples are** (as many, labelled alike); the evaluator's "
         f"accuracy on all reference digits: {ev_acc:.3f}", "",
         "| digits | toy-FD | class accuracy |", "|---|---|---|"]
        + [f"| {n} | {v['fd']:.2f} | {v['acc']:.3f} |" for n, v in rows])


def draw(curves, steps, real, path, title):
    """Two charts in one picture: toy-FD and class accuracy over training steps, the seed mean per
    run, and the real reference digits' values as a flat line (the ceiling)."""
    ceiling, charts = "real digits (ceiling)", []
    for key, ylabel, ylim in (("fd", "toy-FD (lower is better)", None),
                              ("acc", "class accuracy", (0, 1))):
        series = {name: list(zip(steps, np.mean([r[key] for r in runs], 0)))
                  for name, runs in curves.items()}
        series[ceiling] = [(0, real["reference"][key]), (steps[-1], real["reference"][key])]
        top = title if key == "fd" else "class accuracy of the samples (chance: 0.1)"
        charts.append(chart(series, top, ylabel, ylim=ylim, size=(860, 320)))
    im = Image.new("RGB", (860, 640), "white")
    for k, c in enumerate(charts):
        im.paste(c, (0, 320 * k))
    im.save(path)


def sample_sheet(blocks, path, zoom=2, cols=2):
    """{title: uint8 (40, H, W, 3) images labelled i % 10} as blocks of 4 rows x 10 columns (a
    column per class), cols blocks a row."""
    H = blocks[next(iter(blocks))].shape[1] * zoom
    bw, bh = NUM_CLASSES * (H + 2) + 2, 4 * (H + 2) + 2 + 22
    rows = (len(blocks) + cols - 1) // cols
    im = Image.new("RGB", (cols * (bw + 10), rows * (bh + 6)), "white")
    d = ImageDraw.Draw(im)
    for k, (title, images) in enumerate(blocks.items()):
        x0, y0 = (k % cols) * (bw + 10), (k // cols) * (bh + 6)
        d.text((x0 + 4, y0 + 3), title, fill="black", font=font(15))
        for i, img in enumerate(images[:4 * NUM_CLASSES]):
            r, c = divmod(i, NUM_CLASSES)
            tile = Image.fromarray(np.ascontiguousarray(img)).resize((H, H), Image.NEAREST)
            im.paste(tile, (x0 + 2 + c * (H + 2), y0 + 22 + 2 + r * (H + 2)))
    im.save(path)


# -----------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.digits", description=__doc__,
                                formatter_class=HelpFormatter,
                                epilog="any other flag is passed to every train.py run")
    add = p.add_argument
    add("--out", default="results/digits", help="folder of the data, networks, runs and report")
    add("--runs", default=",".join(RUNS), help="comma-separated runs; sit must be one")
    add("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1],
        help="comma-separated seeds: each trains every run (weights, noise, data order)")
    # The budget, fixed before the first full run from one timed run of 100 steps (1 thread, the
    # other core busy): 0.21 s a training step, ~6 s to start, 5 s a measurement; encoder 2.5 min,
    # evaluator 40 s. 5 runs x 2 seeds x (600 steps + 6 measurements) is then about 30 minutes.
    add("--steps", type=int, default=600, help="training steps of every run (the budget)")
    add("--eval-every", type=int, default=100, help="measure the EMA weights every N steps")
    add("--batch", type=int, default=32, help="global batch size of every run (the demo's)")
    add("--warmup", type=int, default=50, help="warm-up steps of every run (the demo's 50)")
    add("--model", default="DiT-T/4", help="the DiT of every run (the demo's: 8x8 tokens at 32 px)")
    add("--enc-size", type=int, default=112, help="the encoder's input size (112/14: 8x8 tokens)")
    add("--samples", type=int, default=200, help="samples per measurement (balanced over classes)")
    add("--sample-steps", type=int, default=10, help="Euler steps of every measurement")
    add("--enc-steps", type=int, default=1500, help="training steps of the encoder")
    add("--evaluator-steps", type=int, default=600, help="training steps of the evaluator")
    add("--cls-batch", type=int, default=64, help="batch size of both classifiers")
    a, extra = p.parse_known_args(argv)
    a.runs = a.runs.split(",")
    if "sit" not in a.runs or not set(a.runs) <= set(RUNS):
        raise UserError(f"--runs must include sit and be among {','.join(RUNS)}")
    C.check_schedule(a)
    return a, extra


def report(argv, a, enc, ev, real, curves, steps, seconds):
    wall, run_s = seconds
    cmd = " ".join(["python -m experiments.digits", *(argv if argv is not None else sys.argv[1:])])
    return (
        f"`{cmd}`: {', '.join(a.runs)} x seeds {', '.join(map(str, a.seeds))}, {a.steps} steps of "
        f"{a.model} (pixel space, 32 px) at batch {a.batch} on the {len(split_indices('train'))} "
        f"training digits; {a.samples} EMA samples per point (Euler {a.sample_steps} steps, no "
        f"guidance). Encoder (tiny DINOv2, supervised per token): held-out accuracy "
        f"{float(enc['accuracy']):.3f} ({float(enc['token_accuracy']):.3f} per token alone), "
        f"trained in {enc['seconds']} s. Evaluator: accuracy {ev['accuracy']:.3f} on the reference "
        f"digits, trained in {ev['seconds']:.0f} s. The runs took {run_s / 60:.1f} min (training "
        f"and measuring, summed over runs, reused ones included); this invocation "
        f"{wall / 60:.1f} min with {torch.get_num_threads()} thread(s) on {os.cpu_count()} CPUs."
        "\n\n" + C.tables(curves, steps, a) + "\n\n" + real_table(real, ev["accuracy"]) + "\n")


def main(argv=None):
    a, extra = get_args(argv)
    t_start = time.time()
    os.makedirs(a.out, exist_ok=True)
    paths = {"data": os.path.join(a.out, "data", "train"),
             "enc": os.path.join(a.out, "encoder.safetensors")}
    eval_path = os.path.join(a.out, "evaluator.pt")
    write_image_folder(paths["data"])
    for path, train in ((paths["enc"], train_encoder), (eval_path, train_evaluator)):
        if os.path.exists(path):
            print(f"reusing {path} (delete it to retrain)")
        else:
            train(path, a)
    net, ev, ref_stats = load_evaluator(eval_path)
    enc, real = C.encoder_info(paths["enc"]), real_values(net, ref_stats, a.samples)
    steps = list(range(a.eval_every, a.steps + 1, a.eval_every))
    curves, run_seconds = C.measure_all(a.runs, a.seeds,
                                        lambda n, s: train_and_measure(n, s, paths, net, ref_stats, a, extra))
    wall = time.time() - t_start
    text = report(argv, a, enc, ev, real, curves, steps, (wall, run_seconds))
    with open(os.path.join(a.out, "digits.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "digits.json"), "w") as f:
        json.dump({"steps": steps, "curves": curves, "encoder": enc, "real": real,
                   "evaluator_accuracy": ev["accuracy"], "wall_s": wall, "run_s": run_seconds},
                  f, indent=1)
    draw(curves, steps, real, os.path.join(a.out, "digits.png"),
         f"{a.model} on handwritten digits, {len(a.seeds)} seed(s): EMA samples every "
         f"{a.eval_every} steps")
    images, labels = load_split("reference")
    blocks = {f"{name}, step {a.steps}, seed {a.seeds[0]}":
              np.load(os.path.join(a.out, f"{name}-s{a.seeds[0]}", "samples_last.npy"))
              for name in a.runs}
    blocks["real reference digits"] = images[balanced(labels, 40)].permute(0, 2, 3, 1).numpy()
    sample_sheet(blocks, os.path.join(a.out, "samples.png"))
    print(text)
    print(f"wrote {a.out}/digits.md, digits.json, digits.png, samples.png")


if __name__ == "__main__":
    cli(main)
