"""First contact: a catalogue of "new user" cases, each run as a subprocess against a checkout of this repository,
each outcome classified, so that an issue's before/after counts can be given.

    python -m experiments.first_contact --repo /tmp/fc_before --label before     # -> results/first_contact/before.json
    python -m experiments.first_contact --repo /tmp/fc_after --label after
    python -m experiments.first_contact --compare before after      # -> results/first_contact/first_contact.md
    python -m experiments.first_contact --list                                   # the cases
    python -m experiments.first_contact --repo PATH --label x --only 3,sample-out-exists

The contract for bad input (docs/troubleshooting.md, "When things go wrong"): a non-zero exit status, exactly one line
on stderr (progress bars aside) that starts with `error: ` and names the problem and the fix, and the user's files
byte for byte as they were. Each case (the table CASES) gives the script and its flags, a setup that builds its files
in a fresh temporary folder (the subprocess's working directory, so `results/` lands there), the paths that must not
change (keep), what should happen (refuse or succeed), for a refusal the words its line must contain (lower-case
substrings) and for a success an optional check of the result. classify() turns one run into exactly one outcome:

  lost        a file under keep changed or vanished
  traceback   "Traceback" on stderr
  silent      a refusal expected but exit status 0, or a success whose result check fails (silently wrong)
  misleading  refused, but not one `error:` line with the expected words (or exit 0 with a wrong message, where a
              message is what the check reads)
  clear       refused with one `error:` line holding the expected words
  handled     a success expected and the result is right
  failed      a success expected but the input was refused (a valid input turned away)
  timeout     the case ran past its time limit

Offline and small: --enc-weights tiny, --vae-weights random, fid.py --inception-weights random-smoke-test, a DiT-T/4
on 16-px pixels for 2 steps (tests/test_errors.py's TINY). Cases that need a trained checkpoint copy one run made
once per sweep. Every subprocess runs with OMP_NUM_THREADS=1 and HF_HUB_OFFLINE=1, one at a time, and (when this
runs as root) without the capabilities that let root read and write past file permissions (setpriv), so the
permission cases behave as they do for a user. Scripts run as `python PATH/script.py`, never imported.
"""
import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "results", "first_contact")
TIMEOUT = 300
OUTCOMES = ("clear", "handled", "lost", "silent", "traceback", "misleading", "failed", "timeout", "setup-error")
ISSUE_CLASSES = {"lost": "data lost", "silent": "silently wrong", "traceback": "traceback where one line is promised",
                 "misleading": "a line that misleads", "first": "first contact", "odd": "odd-but-valid input",
                 "paths": "path flags (folder/file/missing/unreadable)", "outputs": "output paths"}
NOT_RUN = [("a full disk at a checkpoint, and during sample.py --num-samples",
            "needs a full file system (a small tmpfs or a quota); not made here, and tests/test_errors.py covers it "
            "by monkeypatching the writer")]

TINY = ["--synthetic", "32", "--num-classes", "4", "--model", "DiT-T/4", "--global-batch-size", "4",
        "--enc-weights", "tiny", "--enc-size", "28", "--num-workers", "0", "--log-every", "1", "--sample-every", "0",
        "--ckpt-every", "2", "--keep-every", "0", "--pca-images", "8", "--space", "pixel", "--image-size", "16",
        "--max-steps", "2", "--warmup-steps", "0"]
RUN = ["--results-dir", "results", "--run-name", "run"]
SHARED = TINY + ["--mode", "sit", "--sample-every", "2"] + RUN  # the one trained run the sample cases copy
IMGS = ["--data-path", "imgs", "--num-classes", "2"]  # the image folder of images()
PREP = ["--vae-weights", "random", "--image-size", "16", "--num-workers", "0", "--batch-size", "2"]
FID = ["--inception-weights", "random-smoke-test", "--device", "cpu"]
CKPT = ["--ckpt", "results/run/last.pt", "--steps", "2"]


def train(*flags, mode="sit"):
    return ["train.py", *TINY, "--mode", mode, *RUN, *flags]


# -----------------------------------------------------------------------------
# Setup helpers: each builds files in the case's folder d (a pathlib-free str)

def p(d, *parts):
    path = os.path.join(d, *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def picture(size=(24, 20), mode="RGB", seed=0, value=100):
    """A gradient around value with a little noise (so the PCA has directions), in a Pillow mode."""
    w, h = size
    g = np.linspace(-40, 40, w)[None, :] + np.random.default_rng(seed).normal(0, 8, (h, w))
    g = np.clip(np.round(value + g), 0, 255)  # whole numbers: the same picture in 8 and 16 bits
    if mode == "I;16":
        return Image.fromarray((g * 257).astype(np.uint16))
    grey = Image.fromarray(g.astype(np.uint8))
    if mode == "L":
        return grey
    rgb = Image.merge("RGB", [grey] * 3)
    if mode == "RGBA":
        return Image.merge("RGBA", [grey] * 3 + [Image.new("L", size, 128)])
    return rgb.convert("P", palette=Image.ADAPTIVE) if mode == "P" else rgb


def images(d, root="imgs", mode="RGB", ext="png", classes=2, per=4, sizes=None):
    for c in range(classes):
        for i in range(per):
            size = sizes[(c * per + i) % len(sizes)] if sizes else (24, 20)
            picture(size, mode, seed=c * per + i).save(p(d, root, f"class{c}", f"{i}.{ext}"))
    return os.path.join(d, root)


def npz(d, name="ref.npz", n=5, size=32, value=None):
    arr = np.stack([np.asarray(picture((size, size), seed=i).convert("RGB")) if value is None else
                    np.full((size, size, 3), value, np.uint8) for i in range(n)])
    np.savez(p(d, name), arr_0=arr)


def write(d, name, text="mine"):
    with open(p(d, name), "w") as f:
        f.write(text)


def png(d, name):
    picture().save(p(d, name))


def fake_cache(d, name="cache"):
    """A complete latent cache of 4 images at 32 px, as prepare.py writes one (tests/test_errors.py's, larger)."""
    np.save(p(d, name, "moments.npy"), np.zeros((4, 8, 4, 4), np.float32))
    np.save(p(d, name, "images.npy"), np.zeros((4, 32, 32, 3), np.uint8))
    np.save(p(d, name, "labels.npy"), np.arange(4) % 2)
    write(d, f"{name}/meta.json", '{"image_size": 32, "vae": "random", "num_images": 4, "num_classes": 2}')


def folder(d, name):
    os.makedirs(os.path.join(d, name))


def run_copy(d, shared):
    shutil.copytree(os.path.join(shared.path(), "results"), os.path.join(d, "results"))


def nan_weights(path):
    import torch
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for part in ("model", "ema"):
        sd = ckpt.get(part) or {}
        key = next((k for k in sd if "final_layer" in k and k.endswith("weight")), None) or \
            next(k for k, v in sd.items() if v.is_floating_point())
        sd[key].view(-1)[0] = float("nan")
    torch.save(ckpt, path)


def unreadable(path):
    os.chmod(path, 0)


def read_only(path):
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o555)


def fake_ae(d, name="results/svg-ae-demo/last.pt"):
    import torch
    torch.save({"config": {}, "residual": {}, "decoder": {}}, p(d, name))
    t = time.time() + 5  # newer than the run's last.pt
    os.utime(os.path.join(d, name), (t, t))


def chain(*steps):
    """One setup of several steps, each f(d, shared)."""
    return lambda d, shared: [f(d, shared) for f in steps]


def S(f, *a, **k):
    """A setup step that ignores the shared run: f(d, *a, **k)."""
    return lambda d, shared: f(d, *a, **k)


RUNCOPY = run_copy


# -----------------------------------------------------------------------------
# Result checks: f(d, stdout, stderr) -> bool

def tile_mean(d, lo=85, hi=115):
    """The first image of the projection picture's top row (the training image as the run sees it) is ~100 grey."""
    path = os.path.join(d, "results", "run", "projection.png")
    if not os.path.exists(path):
        return False
    a = np.asarray(Image.open(path).convert("RGB"), np.float64)[8:56, 88:136]
    return lo <= a.mean() <= hi


def exists(*pattern):
    return lambda d, out, err: bool(glob.glob(os.path.join(d, *pattern)))


def count(n, *pattern):
    return lambda d, out, err: len(glob.glob(os.path.join(d, *pattern))) == n


def fid_near_zero(name):
    def check(d, out, err):
        path = os.path.join(d, name)
        if not os.path.exists(path):
            return False
        metrics = {k.lower(): v for k, v in json.load(open(path)).items()}
        return abs(metrics.get("fid", 1e9)) < 1e-2
    return check


def grid_is_4_by_2(d, out, err):
    path = os.path.join(d, "grid.png")
    return os.path.exists(path) and Image.open(path).width > 1.5 * Image.open(path).height


def no_text(text):
    return lambda d, out, err: text not in out + err


def cache_mean(lo=85, hi=115):
    def check(d, out, err):
        path = os.path.join(d, "cache", "images.npy")
        return os.path.exists(path) and lo <= float(np.load(path).mean()) <= hi
    return check


def stopped(d, out, err):
    return os.path.exists(os.path.join(d, "results", "run", "last.pt")) and "--resume" in err


def moved_aside(d, out, err):
    return any(os.path.exists(os.path.join(f, "last.pt")) for f in glob.glob(os.path.join(d, "results", "run-*")))


# -----------------------------------------------------------------------------
# The cases. argv: the script and its flags, paths relative to the case's folder; setup(d, shared); keep: paths
# under d that must stay byte-identical; words: what the one line must contain (lower-case match); check(d, out, err)
# for a success; rc: the exit status a success has (143: stopped by SIGTERM); on_check_fail: the outcome of a failed
# check (misleading where the check reads a message); during: a training started first (argv, the file to wait for),
# killed after the case; signal: (file to wait for, signal) sent to the case's own process; reject: a regex the line
# must not match.

def C(id, cls, desc, argv, setup=None, keep=(), expect="refuse", words=(), check=None, **extra):
    return dict(id=id, cls=cls, desc=desc, argv=argv, setup=setup, keep=list(keep), expect=expect,
                words=[w.lower() for w in words], check=check, **extra)


LONG = ["--max-steps", "100000"]
QUIET = [*LONG, "--ckpt-every", "100000", "--log-every", "100000"]  # a training that writes nothing for a while
CASES = [
    # --- data lost
    C("prepare-overwrite-sources", "lost", "prepare.py --overwrite with --out the folder of the source images",
      ["prepare.py", "--data-path", "imgs", "--out", "imgs", "--overwrite", *PREP], S(images), ["imgs"],
      words=["--out", "not a latent cache"]),
    C("prepare-overwrite-parent", "lost", "prepare.py --overwrite with --out a folder that holds the images and notes",
      ["prepare.py", "--data-path", "work/imgs", "--out", "work", "--overwrite", *PREP],
      chain(S(images, "work/imgs"), S(write, "work/notes.txt")), ["work"], words=["--out", "not a latent cache"]),
    C("prepare-overwrite-cache-with-notes", "lost", "prepare.py --overwrite of a cache folder that also holds notes",
      ["prepare.py", "--data-path", "imgs", "--out", "cache", "--overwrite", *PREP],
      chain(S(images), S(fake_cache), S(write, "cache/notes.txt")), ["cache/notes.txt", "imgs"],
      words=["--out", "notes.txt"]),
    C("prepare-overwrite-cache", "lost", "prepare.py --overwrite of a complete cache replaces it (and only it)",
      ["prepare.py", "--data-path", "imgs", "--out", "cache", "--overwrite", *PREP], chain(S(images), S(fake_cache)),
      ["imgs"], expect="succeed", check=lambda d, o, e: json.load(open(os.path.join(d, "cache/meta.json")))
      .get("num_images") == 8),
    C("train-concurrent", "lost", "a second training into a run folder while the first still runs",
      train(), during=(train(*QUIET), "results/run"), words=["in use"]),
    C("train-concurrent-restart", "lost", "--restart into a run folder while its training still runs",
      train("--restart"), during=(train(*QUIET), "results/run"), words=["in use"]),
    C("train-restart-moves-aside", "lost", "--restart keeps the old run's files (moved aside)",
      train("--restart"), RUNCOPY, expect="succeed", check=lambda d, o, e: moved_aside(d, o, e)),
    C("sample-out-exists", "lost", "sample.py --out an existing PNG",
      ["sample.py", *CKPT, "--out", "mine.png"], chain(RUNCOPY, S(png, "mine.png")), ["mine.png"],
      words=["--out", "exists"]),
    C("sample-out-training-grid", "lost", "sample.py --out the training's own samples_0000002.png",
      ["sample.py", *CKPT, "--out", "results/run/samples_0000002.png"], RUNCOPY, ["results/run/samples_0000002.png"],
      words=["--out", "exists"]),
    C("sample-default-name-taken", "lost", "sample.py's default grid name already taken by an earlier grid",
      ["sample.py", *CKPT], chain(RUNCOPY, S(png, "results/run/grid_step2_cfg1.0_rep1.0_seed0.png")),
      ["results/run/grid_step2_cfg1.0_rep1.0_seed0.png"], expect="succeed", check=count(2, "results/run/grid_*.png")),
    C("sample-many-out-is-file", "lost", "sample.py --num-samples with --out an existing file",
      ["sample.py", *CKPT, "--num-samples", "2", "--out", "notes.txt"], chain(RUNCOPY, S(write, "notes.txt")),
      ["notes.txt"], words=["--out", "notes.txt"]),
    # --- silently wrong
    C("train-16bit-png", "silent", "training on 16-bit greyscale PNGs (I;16) sees grey, not white",
      train("--sample-every", "2", *IMGS, mode="coredi"), S(images, mode="I;16"), ["imgs"], expect="succeed",
      check=lambda d, o, e: tile_mean(d)),
    C("fid-16bit-png", "silent", "fid.py on a folder of 16-bit PNGs against the same images as 8-bit",
      ["fid.py", "--ref", "ref.npz", "--sample", "imgs/class0", *FID, "--out", "m.json"],
      chain(S(images, mode="I;16", classes=1, per=5, sizes=[(32, 32)]), S(npz)), ["imgs"], expect="succeed",
      check=fid_near_zero("m.json")),
    C("sit-repa", "silent", "--mode sit --repa", train("--repa"), words=["--repa", "--mode repa"]),
    C("data-path-and-latent-cache", "silent", "--data-path and --latent-cache both given",
      train("--space", "latent", "--vae-weights", "random", "--latent-cache", "cache", "--no-flip", "--image-size",
            "32", "--model", "DiT-T/2", *IMGS),
      chain(S(images), S(fake_cache)), ["imgs", "cache"], words=["--data-path", "--latent-cache"]),
    C("sample-nan-ckpt", "silent", "sample.py on a checkpoint with NaN weights",
      ["sample.py", *CKPT], chain(RUNCOPY, lambda d, s: nan_weights(os.path.join(d, "results/run/last.pt"))),
      ["results"], words=["finite", "step_"]),
    C("resume-nan-ckpt", "silent", "--resume of a checkpoint with NaN weights",
      ["train.py", *SHARED, "--resume", "--max-steps", "4"],
      chain(RUNCOPY, lambda d, s: nan_weights(os.path.join(d, "results/run/last.pt"))), ["results"],
      words=["finite", "--restart"]),
    C("lr-1e6", "silent", "--lr 1e6 diverges", train("--lr", "1e6", "--max-steps", "8"), words=["finite", "--lr"]),
    C("keep-every", "silent", "--keep-every 2 with --ckpt-every 4 keeps step 2", train("--ckpt-every", "4",
      "--keep-every", "2", "--max-steps", "4"), expect="succeed", check=exists("results/run/step_0000002.pt")),
    C("fid-sizes-batch-1", "silent", "fid.py --batch-size 1 on PNGs of two sizes",
      ["fid.py", "--ref", "ref.npz", "--sample", "imgs/class0", "--batch-size", "1", *FID],
      chain(S(images, classes=1, per=5, sizes=[(32, 32), (20, 20)]), S(npz)), ["imgs"], words=["sizes"]),
    # --- tracebacks where one line is promised
    C("train-data-unreadable", "traceback", "train.py --data-path a folder without read permission",
      train(*IMGS), chain(S(images), S(lambda d: unreadable(os.path.join(d, "imgs")))), words=["--data-path",
                                                                                               "permission"]),
    C("train-class-unreadable", "traceback", "train.py: one class folder without read permission",
      train(*IMGS), chain(S(images), S(lambda d: unreadable(os.path.join(d, "imgs/class1")))),
      words=["class1", "permission"]),
    C("train-image-unreadable", "traceback", "train.py: one image without read permission",
      train("--max-steps", "4", *IMGS), chain(S(images), S(lambda d: unreadable(os.path.join(d, "imgs/class1/2.png")))),
      words=["2.png", "permission"]),
    C("prepare-data-unreadable", "traceback", "prepare.py --data-path a folder without read permission",
      ["prepare.py", "--data-path", "imgs", "--out", "cache", *PREP],
      chain(S(images), S(lambda d: unreadable(os.path.join(d, "imgs")))), words=["--data-path", "permission"]),
    C("prepare-out-read-only", "traceback", "prepare.py --out inside a read-only folder",
      ["prepare.py", "--data-path", "imgs", "--out", "locked/cache", *PREP],
      chain(S(images), S(lambda d: read_only(os.path.join(d, "locked")))), words=["--out", "writ"]),
    C("results-dir-file", "traceback", "train.py --results-dir a file",
      ["train.py", *TINY, "--results-dir", "notes.txt"], S(write, "notes.txt"), ["notes.txt"],
      words=["--results-dir", "file"]),
    C("results-dir-read-only", "traceback", "train.py --results-dir a read-only folder",
      ["train.py", *TINY, "--results-dir", "locked"], S(lambda d: read_only(os.path.join(d, "locked"))),
      words=["--results-dir", "writable"]),
    C("feat-dim-too-wide", "traceback", "--feat-dim 70 with the 64-wide tiny encoder",
      train("--feat-dim", "70", mode="redi"), words=["--feat-dim", "70"]),
    C("svg-ae-train-ckpt", "traceback", "train.py --space svg --svg-ae a train.py checkpoint",
      ["train.py", *TINY, "--space", "svg", "--mode", "sit", "--svg-ae", "results/run/last.pt", "--results-dir", "r2"],
      RUNCOPY, ["results"], words=["results/run/last.pt", "svg_ae.py"]),
    C("svg-ae-png", "traceback", "train.py --space svg --svg-ae a PNG",
      ["train.py", *TINY, "--space", "svg", "--mode", "sit", "--svg-ae", "x.png", "--results-dir", "r2"],
      S(png, "x.png"), ["x.png"], words=["x.png", "svg_ae.py"]),
    C("fid-ref-folder", "traceback", "fid.py --ref a folder", ["fid.py", "--ref", "refs", "--sample", "s.npz", *FID],
      chain(S(npz, "refs/ref.npz"), S(npz, "s.npz")), ["refs", "s.npz"], words=["--ref", "folder"]),
    C("sample-out-xyz", "traceback", "sample.py --out with an extension Pillow cannot write",
      ["sample.py", *CKPT, "--out", "grid.xyz"], RUNCOPY, ["results"], words=["--out", ".xyz"]),
    C("fid-out-missing-folder", "traceback", "fid.py --out in a folder that does not exist",
      ["fid.py", "--ref", "ref.npz", "--sample", "s.npz", *FID, "--out", "missing/m.json"],
      chain(S(npz), S(npz, "s.npz")), ["ref.npz", "s.npz"], words=["--out", "missing"]),
    # --- lines that mislead
    C("sample-after-svg-ae", "misleading", "sample.py with no --ckpt after svg_ae.py wrote a newer last.pt",
      ["sample.py", "--steps", "2"], chain(RUNCOPY, S(fake_ae)), expect="succeed",
      check=exists("results/run/grid_*.png")),
    C("enc-weights-png", "misleading", "--enc-weights a PNG", train("--enc-weights", "x.png", mode="redi"),
      S(png, "x.png"), ["x.png"], words=["x.png", "no weights"]),
    C("enc-weights-ckpt", "misleading", "--enc-weights a train.py checkpoint",
      ["train.py", *TINY, "--mode", "redi", "--results-dir", "r2", "--enc-weights", "results/run/last.pt"], RUNCOPY,
      ["results"], words=["results/run/last.pt", "no weights"], reject=r'"[^"\s]*\)\s*;'),
    C("vae-weights-empty", "misleading", "--vae-weights an empty folder",
      train("--space", "latent", "--image-size", "32", "--vae-weights", "vae"), S(folder, "vae"),
      words=["--vae-weights", "config.json"]),
    C("data-path-file", "misleading", "--data-path a file", train("--data-path", "x.png"), S(png, "x.png"), ["x.png"],
      words=["--data-path", "a file"]),
    C("ckpt-run-folder", "misleading", "sample.py --ckpt a run folder", ["sample.py", "--ckpt", "results/run"],
      RUNCOPY, ["results"], words=["folder", "last.pt"]),
    C("sigterm", "misleading", "SIGTERM during training: saves, says how to resume, exits 143", train(*LONG),
      expect="succeed", rc=143, check=stopped, signal=("results/run/log.jsonl", signal.SIGTERM)),
    # --- first contact
    C("sit-random-encoder-note", "first", "a sit run does not say the encoder has RANDOM weights", train(),
      expect="succeed", check=no_text("RANDOM"), on_check_fail="misleading"),
    C("grid-8", "first", "an 8-sample grid is a full 4 x 2 rectangle", ["sample.py", *CKPT, "--out", "grid.png"],
      RUNCOPY, expect="succeed", check=grid_is_4_by_2),
    C("fid-minus-zero", "first", "fid.py of a batch against itself prints no -0.0000",
      ["fid.py", "--ref", "ref.npz", "--sample", "s.npz", *FID], chain(S(npz), S(npz, "s.npz")), ["ref.npz", "s.npz"],
      expect="succeed", check=no_text("-0.0000"), on_check_fail="misleading"),
]
CASES += [
    # --- path flags: a folder for a file, a file for a folder, a missing path, an unreadable one
    C("train-data-missing-nested", "paths", "train.py --data-path a missing folder", train("--data-path", "no/imgs"),
      words=["no/imgs", "does not exist"]),
    C("train-latent-cache-file", "paths", "train.py --latent-cache a file",
      train("--space", "latent", "--vae-weights", "random", "--latent-cache", "x.png", "--no-flip"), S(png, "x.png"),
      ["x.png"], words=["x.png", "prepare.py"]),
    C("train-latent-cache-missing", "paths", "train.py --latent-cache a missing folder",
      train("--space", "latent", "--vae-weights", "random", "--latent-cache", "nocache", "--no-flip"),
      words=["nocache", "prepare.py"]),
    C("train-pca-file-folder", "paths", "train.py --pca-file a folder", train("--pca-file", "results", mode="redi"),
      RUNCOPY, ["results"], words=["--pca-file", "folder"]),
    C("train-pca-file-unreadable", "paths", "train.py --pca-file without read permission",
      train("--pca-file", "pca.pt", mode="redi"), chain(S(write, "pca.pt"), S(lambda d: unreadable(
          os.path.join(d, "pca.pt")))), ["pca.pt"], words=["--pca-file", "permission"]),
    C("train-pca-file-ckpt", "paths", "train.py --pca-file a train.py checkpoint (not its pca.pt)",
      ["train.py", *TINY, "--mode", "redi", "--results-dir", "r2", "--pca-file", "results/run/last.pt"], RUNCOPY,
      ["results"], words=["--pca-file", "pca.pt"]),
    C("train-enc-weights-folder", "paths", "train.py --enc-weights a folder",
      train("--enc-weights", "encw", mode="redi"),
      S(write, "encw/model.safetensors.txt"), ["encw"], words=["--enc-weights", "folder"]),
    C("train-enc-weights-unreadable", "paths", "train.py --enc-weights a file without read permission",
      train("--enc-weights", "model.safetensors", mode="redi"),
      chain(S(write, "model.safetensors"), S(lambda d: unreadable(os.path.join(d, "model.safetensors")))),
      ["model.safetensors"], words=["model.safetensors", "permission"]),
    C("train-vae-weights-file", "paths", "train.py --vae-weights a file",
      train("--space", "latent", "--image-size", "32", "--vae-weights", "x.png"), S(png, "x.png"), ["x.png"],
      words=["--vae-weights", "folder"]),
    C("train-vae-weights-no-weights", "paths", "train.py --vae-weights a folder with config.json but no weights",
      train("--space", "latent", "--image-size", "32", "--vae-weights", "myvae"), S(write, "myvae/config.json", "{}"),
      ["myvae"], words=["--vae-weights", "myvae"]),
    C("train-fid-ref-folder", "paths", "train.py --fid-ref a folder",
      train("--fid-every", "1", "--fid-ref", "refs", "--fid-samples", "4", "--inception-weights", "random-smoke-test"),
      S(npz, "refs/ref.npz"), ["refs"], words=["--fid-ref", "refs"]),
    C("train-inception-folder", "paths", "train.py --inception-weights a folder",
      train("--fid-every", "1", "--fid-ref", "ref.npz", "--fid-samples", "4", "--inception-weights", "incw"),
      chain(S(npz), S(write, "incw/weights.txt")), ["ref.npz", "incw"], words=["--inception-weights", "incw"]),
    C("train-data-flat", "paths", "train.py --data-path a folder of images without class folders",
      train("--data-path", "imgs/class0"), S(images), ["imgs"], words=["imgs/class0", "class folders"]),
    C("train-data-no-images", "paths", "train.py --data-path with class folders that hold no images",
      train("--data-path", "imgs"), chain(S(write, "imgs/a/readme.txt"), S(folder, "imgs/b")), ["imgs"],
      words=["imgs", "no images"]),
    C("sample-ckpt-missing", "paths", "sample.py --ckpt a missing file", ["sample.py", "--ckpt", "no/last.pt"],
      words=["no/last.pt", "not found"]),
    C("sample-ckpt-png", "misleading", "sample.py --ckpt a PNG: torch.load's long reason, cut at a word",
      ["sample.py", "--ckpt", "x.png"], S(png, "x.png"), ["x.png"], reject=r"[A-Za-z`]\)$",
      words=["x.png", "checkpoint"]),
    C("sample-ckpt-unreadable", "paths", "sample.py --ckpt without read permission", ["sample.py", *CKPT],
      chain(RUNCOPY, S(lambda d: unreadable(os.path.join(d, "results/run/last.pt")))), ["results"],
      words=["last.pt", "permission"]),
    C("sample-results-dir-file", "paths", "sample.py --results-dir a file", ["sample.py", "--results-dir", "x.png"],
      S(png, "x.png"), ["x.png"], words=["x.png", "file"]),
    C("sample-results-dir-empty", "paths", "sample.py with an empty results folder", ["sample.py"],
      S(lambda d: os.makedirs(os.path.join(d, "results"))), words=["last.pt", "train"]),
    C("sample-out-folder", "paths", "sample.py --out an existing folder (grid)", ["sample.py", *CKPT, "--out", "pics"],
      chain(RUNCOPY, S(png, "pics/mine.png")), ["pics"], words=["--out", "folder"]),
    C("prepare-data-file", "paths", "prepare.py --data-path a file",
      ["prepare.py", "--data-path", "x.png", "--out", "cache", *PREP], S(png, "x.png"), ["x.png"],
      words=["--data-path", "a file"]),
    C("prepare-data-missing", "paths", "prepare.py --data-path a missing folder",
      ["prepare.py", "--data-path", "nothere", "--out", "cache", *PREP], words=["nothere", "does not exist"]),
    C("prepare-out-file", "paths", "prepare.py --out a file", ["prepare.py", "--data-path", "imgs", "--out", "x.png",
      *PREP], chain(S(images), S(png, "x.png")), ["x.png", "imgs"], words=["--out", "file"]),
    C("prepare-vae-weights-file", "paths", "prepare.py --vae-weights a file",
      ["prepare.py", "--data-path", "imgs", "--out", "cache", *PREP[2:], "--vae-weights", "x.png"],
      chain(S(images), S(png, "x.png")), ["x.png"], words=["--vae-weights", "folder"]),
    C("prepare-pca-file-folder", "paths", "prepare.py --features --pca-file a folder",
      ["prepare.py", "--data-path", "imgs", "--out", "cache", *PREP, "--features", "--enc-weights", "tiny",
       "--enc-size", "28", "--pca-file", "pcas"], chain(S(images), S(write, "pcas/a.txt")), ["pcas"],
      words=["--pca-file", "folder"]),
    C("prepare-enc-weights-png", "paths", "prepare.py --features --enc-weights a PNG",
      ["prepare.py", "--data-path", "imgs", "--out", "cache", *PREP, "--features", "--enc-weights", "x.png",
       "--enc-size", "28", "--pca-images", "8"], chain(S(images), S(png, "x.png")), ["x.png"],
      words=["x.png", "no weights"]),
    C("prepare-svg-ae-folder", "paths", "prepare.py --space svg --svg-ae a folder",
      ["prepare.py", "--data-path", "imgs", "--out", "cache", *PREP, "--space", "svg", "--svg-ae", "myae"],
      chain(S(images), S(write, "myae/a.txt")), ["myae"], words=["myae", "svg_ae.py"]),
    C("fid-sample-missing", "paths", "fid.py --sample a missing file", ["fid.py", "--ref", "ref.npz", "--sample",
      "gone.npz", *FID], S(npz), ["ref.npz"], words=["gone.npz", "no such"]),
    C("fid-sample-png", "paths", "fid.py --sample a PNG file",
      ["fid.py", "--ref", "ref.npz", "--sample", "x.png", *FID],
      chain(S(npz), S(png, "x.png")), ["ref.npz", "x.png"], words=["x.png", ".npz"]),
    C("fid-sample-unreadable", "paths", "fid.py --sample an .npz without read permission",
      ["fid.py", "--ref", "ref.npz", "--sample", "s.npz", *FID],
      chain(S(npz), S(npz, "s.npz"), S(lambda d: unreadable(os.path.join(d, "s.npz")))), ["ref.npz", "s.npz"],
      words=["s.npz", "permission"]),
    C("fid-sample-empty-folder", "paths", "fid.py --sample a folder with no PNGs",
      ["fid.py", "--ref", "ref.npz", "--sample", "empty", *FID], chain(S(npz), S(write, "empty/a.txt")), ["ref.npz"],
      words=["empty", ".png"]),
    C("fid-inception-folder", "paths", "fid.py --inception-weights a folder",
      ["fid.py", "--ref", "ref.npz", "--sample", "s.npz", "--device", "cpu", "--inception-weights", "incw"],
      chain(S(npz), S(npz, "s.npz"), S(write, "incw/a.txt")), ["ref.npz", "s.npz", "incw"],
      words=["--inception-weights", "incw"]),
    # --- output paths, checked before the expensive work
    C("fid-out-read-only", "outputs", "fid.py --out in a read-only folder",
      ["fid.py", "--ref", "ref.npz", "--sample", "s.npz", *FID, "--out", "locked/m.json"],
      chain(S(npz), S(npz, "s.npz"), S(lambda d: read_only(os.path.join(d, "locked")))), ["ref.npz", "s.npz"],
      words=["--out", "writable"]),
    C("fid-default-out-read-only", "outputs", "fid.py --sample in a read-only folder (its default --out)",
      ["fid.py", "--ref", "ref.npz", "--sample", "locked/s.npz", *FID],
      chain(S(npz), S(npz, "locked/s.npz"), S(lambda d: read_only(os.path.join(d, "locked")))), ["ref.npz", "locked"],
      words=["--out", "writable"]),
    C("sample-out-read-only", "outputs", "sample.py --out a grid in a read-only folder",
      ["sample.py", *CKPT, "--out", "locked/grid.png"],
      chain(RUNCOPY, S(lambda d: read_only(os.path.join(d, "locked")))),
      ["results"], words=["--out", "locked"]),
    C("sample-many-out-read-only", "outputs", "sample.py --num-samples --out in a read-only folder",
      ["sample.py", *CKPT, "--num-samples", "2", "--out", "locked/s"],
      chain(RUNCOPY, S(lambda d: read_only(os.path.join(d, "locked")))), ["results"], words=["--out", "locked"]),
    C("sample-ckpt-dir-read-only", "outputs", "sample.py, default grid next to a checkpoint in a read-only folder",
      ["sample.py", *CKPT], chain(RUNCOPY, S(lambda d: os.chmod(os.path.join(d, "results/run"), 0o555))), ["results"],
      words=["--out", "results/run"]),
    C("sample-out-new-folder", "outputs", "sample.py --out a grid in a folder that does not exist yet",
      ["sample.py", *CKPT, "--out", "new/grid.png"], RUNCOPY, expect="succeed", check=exists("new/grid.png")),
    C("sample-many-new-folder", "outputs", "sample.py --num-samples into a new nested folder",
      ["sample.py", *CKPT, "--num-samples", "2", "--out", "a/b/s"], RUNCOPY, expect="succeed",
      check=exists("a/b/s.npz")),
    C("prepare-out-missing-parent", "outputs", "prepare.py --out in a folder that does not exist yet",
      ["prepare.py", "--data-path", "imgs", "--out", "new/cache", *PREP], S(images), ["imgs"], expect="succeed",
      check=exists("new/cache/meta.json")),
    C("train-results-dir-new", "outputs", "train.py --results-dir a nested folder that does not exist yet",
      ["train.py", *TINY, "--mode", "sit", "--results-dir", "a/b", "--run-name", "run"], expect="succeed",
      check=exists("a/b/run/last.pt")),
    # --- odd-but-valid inputs that must just work
    C("train-grey-png", "odd", "training on greyscale (L) PNGs", train("--sample-every", "2", *IMGS, mode="coredi"),
      S(images, mode="L"), ["imgs"], expect="succeed", check=lambda d, o, e: tile_mean(d)),
    C("train-rgba-png", "odd", "training on RGBA PNGs", train("--sample-every", "2", *IMGS, mode="coredi"),
      S(images, mode="RGBA"), ["imgs"], expect="succeed", check=lambda d, o, e: tile_mean(d)),
    C("train-palette-png", "odd", "training on palette (P) PNGs", train("--sample-every", "2", *IMGS, mode="coredi"),
      S(images, mode="P"), ["imgs"], expect="succeed", check=lambda d, o, e: tile_mean(d)),
    C("train-upper-jpg-sizes", "odd", "training on .JPG files of mixed sizes",
      train("--sample-every", "2", *IMGS, mode="coredi"), S(images, ext="JPG", sizes=[(24, 20), (40, 33), (17, 30)]),
      ["imgs"], expect="succeed", check=lambda d, o, e: tile_mean(d)),
    C("train-stray-files", "odd", "a data folder with .DS_Store, a notes file and a stray top-level image",
      train(*IMGS), chain(S(images), S(write, "imgs/.DS_Store"), S(write, "imgs/class0/notes.txt"),
                          S(png, "imgs/cover.png")), ["imgs"], expect="succeed", check=exists("results/run/last.pt")),
    C("train-spaces", "odd", "spaces in --data-path and --results-dir",
      ["train.py", *TINY, "--mode", "sit", "--data-path", "my images", "--num-classes", "2", "--results-dir",
       "my results", "--run-name", "run"], S(images, "my images"), ["my images"], expect="succeed",
      check=exists("my results/run/last.pt")),
    C("train-symlink-trailing-slash", "odd", "--data-path a symlink, given with a trailing slash",
      train("--data-path", "link/", "--num-classes", "2"),
      chain(S(images), S(lambda d: os.symlink(os.path.join(d, "imgs"), os.path.join(d, "link")))), ["imgs"],
      expect="succeed", check=exists("results/run/last.pt")),
    C("prepare-16bit-png", "odd", "prepare.py on 16-bit PNGs stores grey, not white",
      ["prepare.py", "--data-path", "imgs", "--out", "cache", *PREP], S(images, mode="I;16"), ["imgs"],
      expect="succeed", check=cache_mean()),
    C("prepare-spaces", "odd", "prepare.py with spaces in --data-path and --out",
      ["prepare.py", "--data-path", "my images", "--out", "my cache", *PREP], S(images, "my images"), ["my images"],
      expect="succeed", check=exists("my cache/meta.json")),
    C("fid-png-folder", "odd", "fid.py --sample a folder of PNGs (not an .npz)",
      ["fid.py", "--ref", "ref.npz", "--sample", "imgs/class0", *FID], chain(S(npz), S(images, classes=1, per=5)),
      ["ref.npz", "imgs"], expect="succeed", check=exists("imgs/class0.metrics.json")),
]


# -----------------------------------------------------------------------------
# Classification

def visible_lines(text):
    """What a terminal shows on stderr: the last \\r-segment of each line, without tqdm's progress bars (and its cursor
    moves) and blank lines (tests/test_errors.py's rule)."""
    lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line.split("\r")[-1]).strip() for line in text.split("\n")]
    return [line for line in lines if line and not re.search(r"\d+%\|", line)]


def classify(case, rc, stderr, files_before, files_after, check_ok=True):
    """The one outcome of a run: rc the exit status (None: timed out), stderr its text, files_* the snapshots of the
    case's keep paths before and after, check_ok the result of the case's check (True when it has none)."""
    if rc is None:
        return "timeout"
    if any(v is not None and files_after.get(k) != v for k, v in files_before.items()):  # new files are no loss
        return "lost"
    if "Traceback" in stderr:
        return "traceback"
    if case["expect"] == "refuse":
        if rc == 0:
            return "silent"
        lines = visible_lines(stderr)
        if len(lines) != 1 or not lines[0].startswith("error: "):
            return "misleading"
        line = lines[0].lower()
        if not all(w in line for w in case["words"]) or (case.get("reject") and re.search(case["reject"], lines[0])):
            return "misleading"
        return "clear"
    if rc == case.get("rc", 0):
        return "handled" if check_ok else case.get("on_check_fail", "silent")
    return "silent" if rc == 0 else "failed"


def snapshot(d, keep):
    """sha256 of every file under the keep paths (relative to d); a missing path is None."""
    state = {}
    for rel in keep:
        root = os.path.join(d, rel)
        if os.path.isfile(root):
            files = [root]
        elif os.path.isdir(root):
            files = [os.path.join(f, n) for f, _, names in os.walk(root) for n in names
                     if n != ".lock"]  # a run folder's lock names its holder: the repository's, not the user's
            state[rel + "/"] = "folder"
        else:
            state[rel] = None
            continue
        for f in files:
            with open(f, "rb") as fh:
                state[os.path.relpath(f, d)] = hashlib.sha256(fh.read()).hexdigest()
    return state


# -----------------------------------------------------------------------------
# Running a case

def prefix():
    """As root, drop the capabilities that read and write past file permissions: a user's view of chmod."""
    if os.geteuid() == 0 and shutil.which("setpriv"):
        caps = "-dac_override,-dac_read_search"
        return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]
    return []


def environment():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def start(argv, repo, cwd, logs, name):
    cmd = prefix() + [sys.executable, os.path.join(repo, argv[0]), *argv[1:]]
    out, err = open(os.path.join(logs, name + ".out"), "w"), open(os.path.join(logs, name + ".err"), "w")
    return subprocess.Popen(cmd, cwd=cwd, env=environment(), stdout=out, stderr=err, start_new_session=True)


def wait_for(path, proc, seconds=240):
    t0 = time.time()
    while not os.path.exists(path) and proc.poll() is None and time.time() - t0 < seconds:
        time.sleep(0.2)


def stop(proc):
    """End a process this script started, and its group (DataLoader workers), by its id."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_case(case, repo, shared, logs):
    """Set up, run and classify one case; returns its record."""
    d = tempfile.mkdtemp(prefix=f"fc-{case['id']}-")
    background, rc, t0 = None, None, time.time()
    try:
        try:
            if case["setup"]:
                case["setup"](d, shared)
        except Exception as e:  # a mistake of the catalogue, not of the repository: reported as such
            return dict(id=case["id"], cls=case["cls"], desc=case["desc"], outcome="setup-error", rc=None,
                        line=f"{type(e).__name__}: {e}"[:200], seconds=0, command=" ".join(case["argv"]))
        before = snapshot(d, case["keep"])
        if case.get("during"):
            argv, path = case["during"]
            background = start(argv, repo, d, logs, case["id"] + ".during")
            wait_for(os.path.join(d, path), background)
        proc = start(case["argv"], repo, d, logs, case["id"])
        if case.get("signal"):
            path, sig = case["signal"]
            wait_for(os.path.join(d, path), proc)
            if proc.poll() is None:
                proc.send_signal(sig)
        try:
            rc = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            stop(proc)
        out, err = (open(os.path.join(logs, f"{case['id']}.{k}")).read() for k in ("out", "err"))
        after = snapshot(d, case["keep"])
        check_ok = True if case["check"] is None or rc is None else bool(case["check"](d, out, err))
        outcome = classify(case, rc, err, before, after, check_ok)
    finally:
        if background is not None:
            stop(background)
        subprocess.run(["chmod", "-R", "u+rwX", d], check=False)
        shutil.rmtree(d, ignore_errors=True)
    lines = visible_lines(err)
    return dict(id=case["id"], cls=case["cls"], desc=case["desc"], outcome=outcome, rc=rc,
                line=(lines[-1] if lines else "")[:200], seconds=round(time.time() - t0, 1),
                command=" ".join(case["argv"]))


class Shared:
    """The one trained run the cases copy, <path>/results/run (last.pt, samples_0000002.png), made on first use."""

    def __init__(self, repo, logs):
        self.repo, self.logs, self.folder = repo, logs, None

    def path(self):
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="fc-shared-")
            proc = start(["train.py", *SHARED], self.repo, self.folder, self.logs, "shared")
            rc = proc.wait(timeout=TIMEOUT)
            if rc != 0:
                print(f"the shared run failed (exit {rc}); the cases that copy it will show it", file=sys.stderr)
                os.makedirs(os.path.join(self.folder, "results", "run"), exist_ok=True)
        return self.folder

    def remove(self):
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


# -----------------------------------------------------------------------------
# The sweep, the comparison and the command line

def commit(repo):
    r = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def selected(only):
    if not only:
        return CASES
    keys = only.split(",")
    return [c for i, c in enumerate(CASES, 1) if str(i) in keys or c["id"] in keys]


def sweep(repo, label, only=None):
    repo, t0 = os.path.abspath(repo), time.time()
    logs = tempfile.mkdtemp(prefix=f"fc-logs-{label}-")
    shared, records = Shared(repo, logs), []
    try:
        for i, case in enumerate(selected(only), 1):
            rec = run_case(case, repo, shared, logs)
            records.append(rec)
            print(f"{i:3d} {rec['id']:36s} {rec['outcome']:10s} rc={rec['rc']} {rec['seconds']:5.1f}s  "
                  f"{rec['line'][:90]}", flush=True)
    finally:
        shared.remove()
    path = os.path.join(OUT_DIR, f"{label}.json")
    result = dict(label=label, repo=repo, commit=commit(repo), wall_s=round(time.time() - t0), logs=logs, rerun=[])
    if only and os.path.exists(path):  # a rerun of some cases: merged into the sweep's record
        old = json.load(open(path))
        new = {r["id"]: r for r in records}
        records = [new.pop(r["id"], r) for r in old["cases"]] + list(new.values())
        result.update(wall_s=old["wall_s"], rerun=old.get("rerun", []) + [dict(only=only, commit=result["commit"],
                                                                                wall_s=result["wall_s"])])
    result.update(counts={o: sum(r["outcome"] == o for r in records) for o in OUTCOMES}, cases=records)
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{len(records)} cases in {result['wall_s']} s: {result['counts']} -> {path}")
    return result


def compare(before, after):
    a, b = (json.load(open(os.path.join(OUT_DIR, f"{n}.json"))) for n in (before, after))
    rows = {r["id"]: r for r in a["cases"]}
    not_run = "; ".join(f"{what} ({why})" for what, why in NOT_RUN)
    header = (
        f"{len(b['cases'])} cases (the table CASES in `experiments/first_contact.py`), each a subprocess of the script "
        f"in a fresh temporary folder, run against `{a['label']}` = commit `{a['commit']}` ({a['wall_s']} s) and "
        f"`{b['label']}` = commit `{b['commit']}` ({b['wall_s']} s), one at a time, with OMP_NUM_THREADS=1, "
        f"HF_HUB_OFFLINE=1 and, as root, without the capabilities that pass file permissions. A case expects a "
        f"refusal (non-zero exit, exactly one stderr line starting `error: ` that holds the case's words) or a "
        f"success (exit 0, or 143 after SIGTERM, and a check of the result), with its `keep` files byte-identical. "
        f"Outcomes, the first that applies: lost (a kept file changed), traceback, silent (exit 0 where a refusal is "
        f"due, or a wrong result), misleading (a refusal that is not one `error:` line with the words, or a wrong "
        f"message on success), clear, handled, failed (a valid input refused); timeout after {TIMEOUT} s. "
        f"Not run: {not_run}." + "".join(
            f" Rerun in `{r['label']}` after a fix of the catalogue (merged): " + "; ".join(x["only"] for x in r["rerun"])
            + "." for r in (a, b) if r.get("rerun")))
    lines = [
        "# First contact: new-user cases before and after", "", header, "",
        "| outcome | " + " | ".join(OUTCOMES) + " | total |", "|---" * (len(OUTCOMES) + 2) + "|",
    ]
    for res in (a, b):
        lines.append(f"| {res['label']} | " + " | ".join(str(res["counts"][o]) for o in OUTCOMES)
                     + f" | {len(res['cases'])} |")
    lines += ["", f"| case | issue class | what | {a['label']} | {b['label']} | {b['label']}: last stderr line |",
              "|---|---|---|---|---|---|"]
    for r in b["cases"]:
        old = rows.get(r["id"], {}).get("outcome", "-")
        line = r["line"].replace("|", "\\|") if r["outcome"] not in ("handled",) else ""
        lines.append(f"| `{r['id']}` | {ISSUE_CLASSES[r['cls']]} | {r['desc']} | {old} | {r['outcome']} | {line} |")
    path = os.path.join(OUT_DIR, "first_contact.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=ROOT, help="the checkout whose scripts run (default: this repository)")
    ap.add_argument("--label", help="names results/first_contact/LABEL.json")
    ap.add_argument("--only", help="case numbers or ids, comma-separated")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="two labels: write first_contact.md")
    args = ap.parse_args(argv)
    if args.list:
        for i, c in enumerate(selected(args.only), 1):
            print(f"{i:3d} {c['id']:36s} {c['cls']:10s} {c['expect']:8s} {c['desc']}")
    elif args.compare:
        compare(*args.compare)
    elif args.label:
        sweep(args.repo, args.label, args.only)
    else:
        ap.error("pass --label NAME (a sweep), --compare BEFORE AFTER or --list")


if __name__ == "__main__":
    main()
