"""sample.py's file plumbing: which checkpoint (the newest last.pt), where the output goes (checked
writable before any sampling), and the bookkeeping of a long --num-samples run: one PNG per sample,
written atomically so that it marks the sample done, a settings.json so that a folder resumes only
under the same settings, and the PNGs packed into an ADM .npz at the end."""
import glob
import json
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from model import MODES
from support.cli import UserError, check_writable, reason


def is_train_checkpoint(path):
    """Whether path is a train.py checkpoint (its config and EMA weights), read lazily: svg_ae.py's last.pt is not."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return False
    return isinstance(ckpt, dict) and {"config", "ema"} <= ckpt.keys()


def newest_checkpoint(results_dir):
    """The most recently written train.py last.pt anywhere under results_dir: the run a user just trained."""
    if os.path.isfile(results_dir):
        raise UserError(f"--results-dir {results_dir} is a file; pass the folder of your runs, or --ckpt PATH")
    pattern = os.path.join(glob.escape(results_dir), "**", "last.pt")
    found = [p for p in sorted(glob.glob(pattern, recursive=True), key=os.path.getmtime) if is_train_checkpoint(p)]
    if not found:
        raise UserError(f"no --ckpt given and no last.pt under {results_dir}/: train a model first "
                        f"(python train.py) or pass --ckpt PATH")
    return found[-1]


def output_path(args, cfg, many):
    """--out, or its default next to the checkpoint, checked writable: a folder of samples (and the
    .npz beside it) with --num-samples, else a grid's PNG."""
    step = cfg.get("step")
    tag = step if step is not None else os.path.splitext(os.path.basename(args.ckpt))[0]
    if many:
        name = (f"samples_{tag}_{args.sampler}{args.steps}_cfg{args.cfg_scale}_rep{args.cfg_rep}"
                f"_seed{args.seed}_{args.num_samples}")
        out = args.out or os.path.join(os.path.dirname(args.ckpt), name)
        # before sampling, not after: the sample folder, and the .npz next to it
        for folder in (out, os.path.dirname(os.path.abspath(out))):
            check_writable(folder, f"--out {out}", "pass another --out")
        return out
    # "grid_...", not "samples_...": training's own sample grids are samples_<step>.png in the same
    # folder
    name = f"grid_{'step' if step is not None else ''}{tag}_cfg{args.cfg_scale}_rep{args.cfg_rep}"
    out = args.out or os.path.join(os.path.dirname(args.ckpt), f"{name}_seed{args.seed}.png")
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a folder; pass a .png path for a grid "
                        f"(or --num-samples N for a folder)")
    ext = os.path.splitext(out)[1].lower()
    if Image.registered_extensions().get(ext) not in Image.SAVE:
        raise UserError(f"--out {out}: Pillow cannot write {ext or 'a file without extension'}; "
                        f"pass a .png path")
    if os.path.exists(out) and args.out:  # nothing a user has is overwritten
        raise UserError(f"--out {out} exists; pass another --out or move the file away")
    stem, k = out[:-len(ext)], 2
    while os.path.exists(out):  # the default name of an earlier grid: the next free one
        out, k = f"{stem}-{k}{ext}", k + 1
    check_writable(os.path.dirname(os.path.abspath(out)), f"--out {out}", "pass another --out")
    return out


def sample_settings(args, cfg, bf16):
    """What makes the samples of a --num-samples folder: a resumed run must match it."""
    return dict(ckpt=os.path.abspath(args.ckpt), step=cfg.get("step"),
                weights="raw" if args.raw else "ema", sampler=args.sampler, steps=args.steps,
                time_shift=args.time_shift, cfg_scale=args.cfg_scale,
                cfg_interval=list(args.cfg_interval), cfg_channels=args.cfg_channels,
                cfg_rep=args.cfg_rep, seed=args.seed,
                num_samples=args.num_samples, classes=args.classes,
                precision="bf16" if bf16 else "fp32", save_features=args.save_features)


def check_settings(out, settings, rank):
    """Resume only a folder made with the same settings; rank 0 writes them to a new folder."""
    path = os.path.join(out, "settings.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        new = json.loads(json.dumps(settings))
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if diff:
            raise UserError(f"{out} holds samples made with other settings ({', '.join(diff)} "
                            f"differ); pass another --out or delete it")
    elif os.path.isdir(out) and any(f.endswith(".png") for f in os.listdir(out)):
        raise UserError(f"{out} holds samples but no settings.json; pass another --out or delete "
                        f"it")
    elif rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(settings, f, indent=1)
        os.replace(path + ".tmp", path)


def sample_path(out, i):
    """Sample i's files without their extension: <out>/000042.png (and .npy)."""
    return os.path.join(out, f"{i:06d}")


def done(out, n):
    """Which of the samples 0..n-1 have their PNG in out."""
    return [os.path.isfile(sample_path(out, i) + ".png") for i in range(n)]


def save_sample(out, i, image, features=None):
    """Sample i's features (.npy, if given), then its PNG. The PNG marks the sample done, so it is
    written last and atomically (a resume trusts it)."""
    name = sample_path(out, i)
    try:
        if features is not None:
            np.save(name + ".npy", features)
        Image.fromarray(image).save(name + ".png.tmp", format="PNG")
        os.replace(name + ".png.tmp", name + ".png")
    except OSError as e:  # a full disk: the finished samples stay, and the same command resumes
        for partial in (name + ".png.tmp", name + ".npy"):
            if os.path.exists(partial):
                os.remove(partial)
        raise UserError(f"cannot write sample {i} in {out} ({reason(e)}); the finished samples are kept: "
                        f"free disk space and run the same command to continue") from None


def write_npz(out, n, labels):
    """The n PNGs of out and their labels as <out>.npz in ADM's layout: arr_0 uint8 (N, H, W, C),
    arr_1 int64 (N,); written atomically."""
    first = np.asarray(Image.open(sample_path(out, 0) + ".png"))
    arr = np.empty((n, *first.shape), dtype=np.uint8)
    for i in tqdm(range(n), desc="npz"):
        arr[i] = np.asarray(Image.open(sample_path(out, i) + ".png"))
    npz = out.rstrip("/") + ".npz"
    try:
        with open(npz + ".tmp", "wb") as f:
            np.savez(f, arr_0=arr, arr_1=labels.numpy().astype(np.int64))
        os.replace(npz + ".tmp", npz)
    except OSError as e:
        if os.path.exists(npz + ".tmp"):
            os.remove(npz + ".tmp")
        raise UserError(f"cannot write {npz} ({reason(e)}); the samples in {out} are kept: free disk "
                        f"space and run the same command to write it") from None
    print(f"wrote {npz}: {arr.shape} uint8 images and their labels")


def check_flags(args, cfg, model):
    """The flags that depend on the checkpoint, checked before any sampling."""
    if args.steps < (2 if args.sampler == "sde" else 1):
        raise UserError(f"--steps {args.steps} is too few for {args.sampler}")
    if args.sampler == "sde" and args.time_shift != 1:
        raise UserError("--time-shift is for the euler and heun samplers")
    if args.cfg_rep != 1 and (not MODES[cfg["mode"]].features or cfg.get("feat_drop") == 0):
        raise UserError(f"--cfg-rep needs a ReDi/CoReDi model trained with feature dropout; this "
                        f"one is mode {cfg['mode']} with feat_drop={cfg.get('feat_drop', 0)}")
    if args.save_features and not model.feat_dim:
        raise UserError("--save-features: this model has no feature stream")
    if args.classes and not all(0 <= c < model.num_classes for c in args.classes):
        raise UserError(f"--classes must lie in [0, {model.num_classes - 1}]")
