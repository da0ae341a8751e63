"""The data: ImageFolder with ADM's centre crop, the built-in synthetic set, prepare.py's latent cache (and what a
run reads from it), reproducible flips and the global batch sampler that makes 1 and N ranks see the same data."""
import json
import math
import os

import numpy as np
import torch
from PIL import Image

from model import MODES
from support.cli import UserError, check_writable, reason
from support.images import open_rgb

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
            what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
            raise UserError(f"--data-path {root} {what}; pass the folder of class folders")
        try:  # the folder and each class folder: OSError, e.g. without read permission
            classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            self.files = [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
                          for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMG_EXT)]
        except OSError as e:
            raise UserError(f"--data-path {root} cannot be read ({reason(e)}); make it readable "
                            f"(chmod -R u+rX {root})") from None
        if not classes:
            raise UserError(f"{root} has no class folders: expected {root}/<class>/<image>.jpg")
        if not self.files:
            raise UserError(f"{root} has class folders but no images ({', '.join(IMG_EXT)})")
        self.size, self.num_classes = size, len(classes)
        self.labels = np.array([label for _, label in self.files])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path, label = self.files[i]
        a = center_crop_arr(open_rgb(path), self.size)
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
    """The folder written by prepare.py, memory-mapped: the VAE posterior moments (N, 8, h, w) (SVG: the raw SVG
    latents (N, C, h, w)), the uint8 images (N, H, W, 3) that the encoder needs (absent from a --no-images cache),
    redi's projected features (N, views, L, d) where prepare.py --features stored them (view 1: of the flipped
    image), and the labels. Items are ({"latent", "image", "features"}, label), with the arrays named in self.keys
    (use_cache sets them: a run reads only what it uses)."""

    def __init__(self, root, size, vae_weights, space="latent", svg_ae=None):
        # prepare.py writes meta.json last and renames the whole folder into place, so a cache without it, or whose
        # arrays disagree with it (a copy cut short, a file replaced), is incomplete: refused with the file named.
        if not os.path.isfile(os.path.join(root, "meta.json")):
            raise UserError(f"{root} is not a complete latent cache (no meta.json); make it with prepare.py")
        try:
            with open(os.path.join(root, "meta.json")) as f:
                meta = json.load(f)
            n, s, made = meta["num_images"], meta["image_size"], meta.get("space", "latent")
            feats = meta.get("features")
            want = {"latent": ("latents.npy" if made == "svg" else "moments.npy",
                               None if made == "svg" else (n, 8, s // 8, s // 8)), "labels": ("labels.npy", (n,))}
            if meta.get("images", True):  # caches made before --no-images existed all hold images
                want["image"] = ("images.npy", (n, s, s, 3))
            if feats:
                want["features"] = ("features.npy", (n, feats["views"], math.prod(feats["grid"]), feats["feat_dim"]))
            if meta.get("flipped"):  # prepare.py --flip: the latents of the flipped images
                base, shape = want["latent"]
                want["latent_flipped"] = (base.replace(".npy", "_flipped.npy"), shape)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{root}/meta.json is unreadable ({type(e).__name__}); remake the cache with prepare.py") from None
        if made != space:
            raise UserError(f"the latent cache {root} holds {made} latents, but this run is --space {space}")
        self.arrays = {}
        for k, (name, shape) in want.items():
            path = os.path.join(root, name)
            try:
                a = self.arrays[k] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:  # missing, or shorter than its header says (a cut copy)
                raise UserError(f"latent cache file {path} is missing or truncated ({type(e).__name__}); "
                                  f"remake the cache with prepare.py") from None
            if a.shape[:1] != (n,) or (shape is not None and a.shape != shape):
                raise UserError(f"latent cache file {path} has shape {a.shape}, but meta.json says "
                                  f"{shape or (n, '...')}; remake the cache with prepare.py")
        if space == "svg" and (meta["image_size"] != size or meta["svg_ae"] != os.path.abspath(svg_ae)):
            raise UserError(f"the latent cache {root} was made at {meta['image_size']} px with the SVG autoencoder "
                              f"{meta['svg_ae']}, but this run asks for {size} px with {os.path.abspath(svg_ae)}; "
                              f"remake it with prepare.py --space svg or change --image-size/--svg-ae")
        if space == "latent" and (meta["image_size"] != size or meta["vae"] != vae_weights):
            raise UserError(f"the latent cache {root} was made at {meta['image_size']} px with VAE {meta['vae']}, "
                              f"but this run asks for {size} px with {vae_weights}; "
                              f"remake it with prepare.py or change --image-size/--vae-weights")
        self.root, self.meta, self.num_classes = root, meta, meta["num_classes"]
        self.labels = self.arrays.pop("labels")
        self.keys = [k for k in ("latent", "image") if k in self.arrays]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = {k: torch.from_numpy(np.array(self.arrays[k][i])) for k in self.keys}
        if "image" in x:
            x["image"] = x["image"].permute(2, 0, 1)  # stored HWC, as images are; CHW as ImageFolder's
        return x, int(self.labels[i])


def weights_name(weights):
    """--enc-weights as a cache records it: a file as its absolute path, a name (or none: download) as given."""
    return os.path.abspath(weights) if weights and os.path.exists(weights) else weights


def encoder_seed(args):
    """The seed that made a random encoder's weights (make_encoder), None for real weights."""
    return args.seed if args.enc_weights in ("random", "tiny") else None


def runs_encoder(args, cached=False):
    """Whether the frozen encoder runs every step: for the features of redi and coredi (unless redi's come from the
    latent cache: cached) and for REPA's target."""
    return bool((MODES[args.mode].features and not cached) or args.repa)


def cache_reads(data, args):
    """The arrays of a latent cache that this run reads ([] for any other data set), refusing in one line a cache
    that cannot serve it. redi takes its features from the cache where prepare.py
    --features stored them, and then needs no encoder (unless REPA is on) and no images; the cache must have been
    made by the run's encoder, projection size, PCA (--pca-file) and flips. Every other use of the encoder needs
    the images."""
    if not isinstance(data, LatentCache):
        return []
    f, root = data.meta.get("features"), data.root
    cached = args.mode == "redi" and f is not None
    if cached:
        made = (f["enc"], f["enc_weights"], f["enc_size"], f["feat_dim"], f["enc_seed"])
        asked = (args.enc, weights_name(args.enc_weights), args.enc_size, args.feat_dim, encoder_seed(args))
        if made != asked:
            say = lambda e: f"encoder {e[0]} (weights {e[1]}{'' if e[4] is None else f', seed {e[4]}'}, {e[2]} px) " \
                            f"with --feat-dim {e[3]}"
            raise UserError(f"the features in {root} were made by {say(made)}, but this run asks for {say(asked)}; "
                            f"match the flags or remake the cache with prepare.py --features")
        if args.flip and f["views"] < 2:
            raise UserError(f"this run flips images (--flip) but {root} holds the features of unflipped images "
                            f"only; remake it with prepare.py --features --flip, or train with --no-flip")
    if args.flip and not data.meta.get("flipped"):
        raise UserError(f"this run flips images (--flip: sit's and SVG's default) but {root} holds the latents of "
                        f"unflipped images only (the VAE is not flip-equivariant); remake it with prepare.py --flip, "
                        f"or train with --no-flip")
    keys = ["latent"] + ["latent_flipped"] * bool(args.flip)
    if runs_encoder(args, cached):
        if "image" not in data.arrays:
            need = "REPA's target" if args.repa else f"{args.mode}'s features"
            raise UserError(f"the latent cache {root} holds no images (prepare.py --no-images), but {need} come "
                            f"from the encoder, which needs them; remake it without --no-images")
        keys.append("image")  # the largest array: read only when the encoder runs
    return keys + ["features"] * cached


def make_data(args):
    """The run's data set: the latent cache, an image folder, or (no data given) the synthetic set."""
    if args.latent_cache:
        if args.space == "pixel":
            raise UserError("--latent-cache is for --space latent or svg")
        data = LatentCache(args.latent_cache, args.image_size, args.vae_weights, args.space, args.svg_ae)
    elif args.data_path:
        data = ImageFolder(args.data_path, args.image_size)
    else:
        data = SyntheticImages(args.synthetic, args.image_size, args.num_classes, args.seed, args.synthetic_hard)
    if data.num_classes > args.num_classes:
        raise UserError(f"the data has {data.num_classes} classes but --num-classes is {args.num_classes}")
    return data


def fixed_images(data, n):
    """n uint8 images of n different classes spread over the data's classes (the first image of each), and their
    labels, for pictures that follow the same images through training."""
    classes = np.unique(data.labels)
    picked = classes[np.linspace(0, len(classes) - 1, min(n, len(classes))).round().astype(int)]
    return torch.stack([item_image(data[int(np.argmax(data.labels == c))]) for c in picked]), picked.tolist()


def item_image(item):
    """The uint8 CHW image of a data item; a latent-cache item is a dict."""
    x = item[0]
    return x["image"] if isinstance(x, dict) else x


class Flipped:
    """Horizontal flips decided by the sampler (so they are reproducible): items are requested as (index, flip)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, item):
        i, flip = item
        x, y = self.data[i]
        if not isinstance(x, dict):
            return (x.flip(-1) if flip else x), y
        # A latent-cache item: the encoders are not equivariant to flips, so the latent and the features of the
        # flipped image were stored (latent_flipped, features' view 1), not derived; only the image is flipped.
        flipped = x.pop("latent_flipped", None)  # read by a run that flips (cache_reads)
        x = {k: v[int(flip)] if k == "features" else v.flip(-1) if flip and k == "image" else v for k, v in x.items()}
        if flip:
            x["latent"] = flipped
        return x, y


class GlobalBatchSampler:
    """Epoch e visits the data in a permutation seeded by (seed, e); global batch k is positions
    [k*G, (k+1)*G) of it and rank r takes the r-th slice. The data order is a function of the step alone,
    whatever the number of ranks, so a resumed run continues where it stopped."""

    def __init__(self, n, global_batch, rank, world, seed, flip=True, start_step=0):
        if n < global_batch:
            raise UserError(f"the data set has {n} images, fewer than one global batch ({global_batch})")
        self.n, self.G, self.rank, self.world, self.seed, self.flip = n, global_batch, rank, world, seed, flip
        self.per_epoch = n // global_batch
        self.step = start_step

    def __iter__(self):
        b = self.G // self.world
        while True:
            epoch, k = divmod(self.step, self.per_epoch)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()  # Python lists: nothing per step
            flips = (torch.rand(self.n, generator=g) < 0.5).tolist()
            for k in range(k, self.per_epoch):
                pos = perm[k * self.G + self.rank * b: k * self.G + (self.rank + 1) * b]
                yield [(i, self.flip and flips[i]) for i in pos]
                self.step += 1



CACHE_FILES = ("meta.json", "moments.npy", "latents.npy", "moments_flipped.npy", "latents_flipped.npy", "images.npy",
               "labels.npy", "features.npy", "pca.pt")


def check_cache_out(out, overwrite):
    """prepare.py --out, before any work: a new folder, an empty one, or (--overwrite) a latent cache, i.e. a
    folder of cache files only. Anything else there (images, notes, a run) is never replaced."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder; pass a folder for the cache")
    check_writable(os.path.dirname(os.path.abspath(out)), f"--out {out}", "pass --out in a writable folder")
    held = sorted(os.listdir(out)) if os.path.isdir(out) else []
    foreign = [f for f in held if f not in CACHE_FILES or not os.path.isfile(os.path.join(out, f))]
    if foreign:
        raise UserError(f"--out {out} holds files that are not a latent cache's ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); only a cache is ever replaced: pass another --out")
    if held and not overwrite:
        what = "a complete latent cache" if "meta.json" in held else "the files of a latent cache"
        raise UserError(f"{out} already holds {what}; pass --overwrite to replace it (or another --out)")
    partial = out + ".partial"
    if os.path.exists(partial) and not all(f in CACHE_FILES for f in os.listdir(partial)):
        raise UserError(f"{partial} exists and is not a cache that prepare.py was writing; move it away")


def remove_cache(folder):
    """Delete a cache folder's files (CACHE_FILES) and the folder, and nothing else: a folder that holds anything
    more is left as it is."""
    if not os.path.isdir(folder):
        return
    for f in CACHE_FILES:
        if os.path.isfile(os.path.join(folder, f)):
            os.remove(os.path.join(folder, f))
    if not os.listdir(folder):
        os.rmdir(folder)
