"""
Sample images from a trained joint image-feature diffusion model (SiT, REPA, ReDi, CoReDi) or from the released
weights of SiT, ReDi, REPA, JiT or SVG (recognised by their keys).

    python sample.py --cfg-rep 1.5        # a PNG grid from the newest results/*/last.pt, next to it
    python sample.py --ckpt results/demo-coredi/last.pt --cfg-rep 1.5            # the same, named
    python sample.py --ckpt SiT-ReDi-XL-2.pt --cfg-scale 2.4                    # ReDi's published setting
    python sample.py --ckpt svg_xl.pt --svg-ae svg-ae/last.pt --svg-stats dinov3_sp_stats.pt
        # SVG's DiT weights: Euler, 25 steps on the grid shifted with 0.15, CFG 4 (SVG's sampler)
    torchrun --nproc_per_node 8 sample.py --ckpt last.pt --num-samples 50000 --out samples/run
        # one PNG per sample in samples/run/, then samples/run.npz for fid.py (ADM layout)

Time runs from t=0 (noise) to t=1 (data): x_t = t*x + (1-t)*eps, velocity v = x - eps. The features z are noised
and integrated together with the image (the joint state (x, z)) and dropped at the end.
Every sample's label and noise depend only on --seed and the sample's index, so the same images come out
whatever the number of GPUs or the batch size, and an interrupted run resumes where it stopped.
"""
import argparse
import glob
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from model import MODES, create_model, shift_time, to_velocity
from support.cli import (ArgumentParser, UserError, cli, init_processes, nonneg_float, nonneg_int, positive_float,
                         positive_int, probability, seeded_generator)
from support.frozen import VAE
from support.released import load_dit_state_dict, load_released


# -----------------------------------------------------------------------------
# Checkpoint

def newest_checkpoint(results_dir):
    """The most recently written last.pt anywhere under results_dir: the run a user just trained."""
    found = sorted(glob.glob(os.path.join(glob.escape(results_dir), "**", "last.pt"), recursive=True),
                   key=os.path.getmtime)
    if not found:
        raise UserError(f"no --ckpt given and no last.pt under {results_dir}/: train a model first (python train.py) "
                        f"or pass --ckpt PATH")
    return found[-1]


def load_checkpoint(path, args):
    """A train.py checkpoint (its config rebuilds the network; EMA weights unless --raw), or the released weights
    of SiT, ReDi, REPA or JiT, recognised by their keys (model.load_released)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:  # the reference codes' training checkpoints also hold their argparse settings: plain data, allowed
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"could not read checkpoint {path} ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint (a dict of tensors)")
    if "config" in ckpt:
        cfg = dict(ckpt["config"], step=ckpt.get("step"), svg_stats=ckpt.get("svg_stats"))
        sd = ckpt.get("model" if args.raw else "ema")
        if sd is None:
            raise UserError(f"checkpoint {path} has no {'raw' if args.raw else 'EMA'} weights"
                            f"{'' if args.raw else '; pass --raw for the raw weights'}")
        model = load_dit_state_dict(create_model(cfg["model"], **cfg["arch"]), sd).eval().requires_grad_(False)
    else:
        model, cfg = load_released(ckpt)
        print(f"{path}: released {cfg['mode']} weights, {cfg['model']} at {cfg['image_size']} px ({cfg['space']} space)")
    if args.mode and args.mode != cfg["mode"]:
        raise UserError(f"checkpoint {path} was trained with --mode {cfg['mode']}, not --mode {args.mode}")
    return model, cfg


def svg_latents(args, cfg, model):
    """SVG space: the autoencoder that decodes (--svg-ae, else the run's) and the latent statistics to undo first
    (--svg-stats, else the run's checkpoint; SVG's own checkpoints carry none)."""
    import svg_ae  # only in SVG space: it needs diffusers and torchvision
    path = args.svg_ae or cfg.get("svg_ae")
    if path is None or not os.path.isfile(path):
        raise UserError(f"SVG space decodes with the SVG autoencoder: pass --svg-ae PATH to svg_ae.py's last.pt"
                        f"{'' if path is None else f' ({path} not found)'}")
    ae = svg_ae.load_autoencoder(path, args.svg_dino_weights or cfg.get("svg_dino_weights"))
    C = ae.decoder.conv_in.in_channels
    if C != model.in_channels:
        raise UserError(f"the SVG autoencoder {path} makes {C}-channel latents; the model takes {model.in_channels}")
    if args.svg_stats:
        mean, std = svg_ae.read_svg_stats(args.svg_stats, C)
    elif cfg.get("svg_stats"):
        mean, std = cfg["svg_stats"]["mean"], cfg["svg_stats"]["std"]
    else:
        raise UserError("SVG's checkpoints hold no latent statistics: pass --svg-stats PATH to SVG's dinov3_sp_stats.pt")
    return svg_ae.SVGLatents(ae, mean, std)


# -----------------------------------------------------------------------------
# Labels and noise: a function of (seed, sample index) only

def generators(seed, indices):
    """One CPU generator per sample. It yields, in order: the sample's label, its image noise, its feature
    noise, then one noise per SDE step; so a sample never depends on its batch, rank or device."""
    return [seeded_generator(seed, i) for i in indices]


def draw_labels(gens, indices, num_classes, classes=None):
    # Always drawn, so that --classes changes the labels but not the noise.
    y = torch.stack([torch.randint(num_classes, (), generator=g) for g in gens])
    if classes:
        y = torch.tensor([classes[i % len(classes)] for i in indices])
    return y


def draw_noise(gens, shapes, device):
    """A noise tensor (B, *shape) per stream of the joint state; None for an absent stream."""
    return tuple(None if s is None else torch.stack([torch.randn(s, generator=g) for g in gens]).to(device)
                 for s in shapes)


# -----------------------------------------------------------------------------
# Velocity of the joint state, with classifier-free and representation guidance

def guided_velocity(model, y, prediction, cfg_scale=1.0, cfg_interval=(0.0, 1.0), cfg_rep=1.0, bf16=False):
    """Returns v(state, t) for the joint state (x, z) at time t (a float, 0 = noise, 1 = data), with
    v_c = v(x, z, y), v_nolabel = v(x, z, null) and v_nofeat = v(x, 0, y):
      image channels:   v = v_c + (w_cfg - 1)(v_c - v_nolabel) + (w_rep - 1)(v_c - v_nofeat)
      feature channels: v = v_c + (w_rep - 1)(v_c - v_nofeat)
    Classifier-free guidance acts on the image only (ReDi's --cfg-vae, used for its published FID) and only inside
    cfg_interval; representation guidance on all channels (ReDi's forward_with_rg). A weight of 1 drops its branch.
    All branches run as one batched forward."""
    null = torch.full_like(y, model.num_classes)

    def v(state, t):
        x, z = state
        use_cfg = cfg_scale != 1 and cfg_interval[0] <= t <= cfg_interval[1]
        use_rep = cfg_rep != 1 and z is not None
        xs, zs, ys = [x], [z], [y]
        if use_cfg:
            xs, zs, ys = xs + [x], zs + [z], ys + [null]
        if use_rep:
            xs, zs, ys = xs + [x], zs + [torch.zeros_like(z)], ys + [y]
        n, x_in = len(xs), torch.cat(xs)
        t_in = torch.full((x_in.shape[0],), t, device=x.device)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out_x, out_z, _ = model(x_in, t_in, torch.cat(ys), None if z is None else torch.cat(zs))
        vx = to_velocity(out_x.float(), x_in, t_in, prediction).chunk(n)
        v_img = vx[0]
        if use_cfg:
            v_img = v_img + (cfg_scale - 1) * (vx[0] - vx[1])
        if use_rep:
            v_img = v_img + (cfg_rep - 1) * (vx[0] - vx[-1])
        if z is None:
            return v_img, None
        vz = to_velocity(out_z.float(), torch.cat([z] * n), t_in, prediction).chunk(n)  # at the state's own z
        return v_img, vz[0] + (cfg_rep - 1) * (vz[0] - vz[-1]) if use_rep else vz[0]
    return v


# -----------------------------------------------------------------------------
# Samplers: integrate the joint state (x, z) from t=0 (noise) to t=1 (data); z may be None

def axpy(state, d, h):
    """state + h * d, stream by stream."""
    return tuple(None if s is None else s + h * ds for s, ds in zip(state, d))


def time_grid(steps, shift=1.0):
    """steps + 1 times from 0 (noise) to 1 (data): uniform, then shifted as SVG's sampler does (model.shift_time;
    its 0.15 puts most steps near the noise end)."""
    return [shift_time(t, shift) for t in torch.linspace(0, 1, steps + 1).tolist()]


def euler_ode(v, state, steps, shift=1.0):
    """Euler on the probability-flow ODE dx/dt = v on time_grid(steps, shift): steps model evaluations."""
    ts = time_grid(steps, shift)
    for t, t_next in zip(ts[:-1], ts[1:]):
        state = axpy(state, v(state, t), t_next - t)
    return state


def heun_ode(v, state, steps, shift=1.0):
    """Heun (trapezoidal predictor-corrector) over time_grid(steps, shift); the last interval is a plain Euler step, as
    in JiT and EDM, since the correction would evaluate at t=1 where the x-prediction velocity
    (x_hat - x_t)/max(1-t, 0.05) is clamped. That is 2*steps - 1 model evaluations."""
    ts = time_grid(steps, shift)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        d = v(state, t)
        if i == steps - 1:
            return axpy(state, d, t_next - t)
        d_next = v(axpy(state, d, t_next - t), t_next)
        state = axpy(state, tuple(None if a is None else (a + b) / 2 for a, b in zip(d, d_next)), t_next - t)


def sde_euler_maruyama(v, state, steps, noise, last_step=0.04):
    """Euler-Maruyama on SiT's reverse SDE, dX = [v + D(t) s] dt + sqrt(2 D(t)) dW (drift v + g^2 s / 2 for the
    noise level g^2 = 2D), with SiT's defaults:
    diffusion form "sigma" D(t) = 1 - t (diffusion norm 1), and a last deterministic "Mean" step of size 0.04.
    Any D >= 0 keeps the marginals of the flow (the D s term cancels the diffusion in the Fokker-Planck equation).
    The score comes from the velocity: eps_hat = x_t - t v, s = -eps_hat / (1 - t), so D s = -eps_hat and the
    drift v - eps_hat stays finite up to t = 1. Time grid linspace(0, 1 - last_step, steps): steps - 1 noisy
    steps and the mean step, steps model evaluations. noise() gives one standard normal per stream."""
    ts = torch.linspace(0, 1 - last_step, steps).tolist()

    def drift(state, t):
        return tuple(None if s is None else ds - (s - t * ds) for s, ds in zip(state, v(state, t)))

    for t, t_next in zip(ts[:-1], ts[1:]):
        state = axpy(state, drift(state, t), t_next - t)
        state = axpy(state, noise(), math.sqrt(2 * (1 - t) * (t_next - t)))
    return axpy(state, drift(state, ts[-1]), last_step)


# -----------------------------------------------------------------------------
# Generation: labels + noise -> joint state -> images

@torch.no_grad()
def generate(model, indices, device, prediction, vae=None, sampler="sde", steps=250, cfg_scale=1.0,
             cfg_interval=(0.0, 1.0), cfg_rep=1.0, seed=0, classes=None, bf16=False, time_shift=1.0):
    """Samples for the given global indices: uint8 images (B, H, W, 3), labels (B,), final features or None.
    prediction: what the model outputs ('v' latent space, 'x' pixel space); vae: decodes latents (None: pixels; an
    SVGLatents in SVG space); time_shift: the ODE samplers' time grid (time_grid)."""
    indices = list(indices)
    gens = generators(seed, indices)
    y = draw_labels(gens, indices, model.num_classes, classes)
    shapes = ((model.in_channels, model.input_size, model.input_size), model.z_shape)
    state = draw_noise(gens, shapes, device)
    v = guided_velocity(model, y.to(device), prediction, cfg_scale, cfg_interval, cfg_rep, bf16=bf16)
    if sampler == "sde":
        x, z = sde_euler_maruyama(v, state, steps, lambda: draw_noise(gens, shapes, device))
    else:
        x, z = (euler_ode if sampler == "euler" else heun_ode)(v, state, steps, time_shift)
    if vae is not None:
        x = vae.decode(x)
    images = (127.5 * x.float() + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return images, y, (None if z is None else z.float().cpu().numpy())


def default_sampler(space, sampler=None, steps=None, time_shift=None):
    """SiT's SDE with 250 steps in latent space, JiT's Heun with 50 in pixel space, SVG's Euler with 25 on the time
    grid shifted with 0.15 in SVG space (sample_svg.py), unless given."""
    sampler = sampler or {"latent": "sde", "pixel": "heun", "svg": "euler"}[space]
    steps = steps or (250 if sampler == "sde" else 25 if space == "svg" else 50)
    return dict(sampler=sampler, steps=steps, time_shift=time_shift or (0.15 if space == "svg" else 1.0))


def save_grid(images, path):
    """uint8 images (N, H, W, C) in a square grid, each enlarged (nearest neighbour: its pixels stay visible) to at
    least 64 px, so that the demo's 32-px samples can be seen."""
    zoom = math.ceil(64 / images.shape[1])
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    n, H, W, C = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (H + 2) + 2, cols * (W + 2) + 2, C), 255, dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[2 + r * (H + 2):2 + r * (H + 2) + H, 2 + c * (W + 2):2 + c * (W + 2) + W] = img
    Image.fromarray(grid).save(path)


# -----------------------------------------------------------------------------
# Many samples, many processes: one PNG per sample, resumable, then an ADM .npz

def check_settings(out, settings, rank):
    """Resume only a folder made with the same settings; rank 0 writes them to a new folder."""
    path = os.path.join(out, "settings.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        new = json.loads(json.dumps(settings))
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if diff:
            raise UserError(f"{out} holds samples made with other settings ({', '.join(diff)} differ); "
                            f"pass another --out or delete it")
    elif os.path.isdir(out) and any(f.endswith(".png") for f in os.listdir(out)):
        raise UserError(f"{out} holds samples but no settings.json; pass another --out or delete it")
    elif rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(settings, f, indent=1)
        os.replace(path + ".tmp", path)


def check_writable(folder):
    """Fail before sampling, not after, if folder (existing or to be made) cannot be written to."""
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        why = "read-only" if os.path.isdir(parent) else "not a folder"
        raise UserError(f"--out: cannot write to {folder} ({parent} is {why}); pass another --out")


def sample_many(model, cfg, args, device, vae, rank, world, kw):
    out, N = args.out, args.num_samples
    settings = dict(ckpt=os.path.abspath(args.ckpt), step=cfg.get("step"), weights="raw" if args.raw else "ema",
                    sampler=args.sampler, steps=args.steps, time_shift=args.time_shift, cfg_scale=args.cfg_scale,
                    cfg_interval=list(args.cfg_interval), cfg_rep=args.cfg_rep, seed=args.seed, num_samples=N,
                    classes=args.classes, precision="bf16" if device.type == "cuda" and not args.fp32 else "fp32",
                    save_features=args.save_features)
    check_settings(out, settings, rank)
    if world > 1:
        dist.barrier()  # the folder exists and nobody has written a sample yet: all ranks see the same to-do list
    name = lambda i: os.path.join(out, f"{i:06d}")
    todo = [i for i in range(N) if not os.path.isfile(name(i) + ".png")]
    mine = todo[rank::world]  # deal what is left, so a resumed run stays balanced
    batches = [mine[k:k + args.batch_size] for k in range(0, len(mine), args.batch_size)]
    if rank == 0:
        print(f"{N - len(todo)} of {N} samples already in {out}; {len(todo)} to go on {world} process(es)")
    try:
        for idx in tqdm(batches, disable=rank != 0):
            images, _, feats = generate(model, idx, device, **kw)
            for k, i in enumerate(idx):
                if args.save_features:
                    np.save(name(i) + ".npy", feats[k])
                # The PNG marks the sample done, so it is written last and atomically (a resume trusts it).
                Image.fromarray(images[k]).save(name(i) + ".png.tmp", format="PNG")
                os.replace(name(i) + ".png.tmp", name(i) + ".png")
    except KeyboardInterrupt:  # Ctrl-C: the finished PNGs stay, and the same command skips them
        done = sum(os.path.isfile(name(i) + ".png") for i in range(N))
        raise UserError(f"interrupted: {done} of {N} samples are in {out}; run the same command again to finish "
                        f"the rest") from None
    if dist.is_initialized():
        # Work is balanced, so this barrier is short; then rank 0 assembles alone and nobody waits on it.
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return
    first = np.asarray(Image.open(name(0) + ".png"))
    arr = np.empty((N, *first.shape), dtype=np.uint8)
    for i in tqdm(range(N), desc="npz"):
        arr[i] = np.asarray(Image.open(name(i) + ".png"))
    labels = draw_labels(generators(args.seed, range(N)), range(N), model.num_classes, args.classes)
    npz = out.rstrip("/") + ".npz"
    with open(npz + ".tmp", "wb") as f:
        np.savez(f, arr_0=arr, arr_1=labels.numpy().astype(np.int64))
    os.replace(npz + ".tmp", npz)
    print(f"wrote {npz}: {arr.shape} uint8 images and their labels")


# -----------------------------------------------------------------------------
# Command line


def class_list(s):
    return [int(c) for c in s.split(",")]


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", default=None, help="a train.py checkpoint, or released SiT, ReDi, REPA or JiT weights, or "
                                                "SVG's DiT checkpoint; none = the newest last.pt under --results-dir")
    p.add_argument("--results-dir", default="results", help="where to look for the newest last.pt without --ckpt")
    p.add_argument("--mode", choices=list(MODES), default=None,
                   help="fail unless the checkpoint was trained in this mode")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--sampler", choices=["euler", "heun", "sde"], default=None,
                   help="default: sde in latent space (SiT), heun in pixel space (JiT), euler in SVG space (SVG)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="model evaluations per sample for euler and sde, intervals for heun (2*steps-1 evaluations); "
                        "guidance multiplies the batch of each evaluation, not their number. Default: 250 for sde, 25 in SVG space, "
                        "50 otherwise")
    p.add_argument("--time-shift", type=positive_float, default=None,
                   help="euler/heun: the time grid t -> s t / (1 + (s - 1) t); default 0.15 in SVG space (SVG), else 1")
    p.add_argument("--cfg-scale", type=nonneg_float, default=None,
                   help="classifier-free guidance on the image channels; 1 = off (SiT-XL/2's FID 2.06: 1.5; "
                        "ReDi's 1.64: 2.4). Default: 4 in SVG space (SVG's sampler, all channels), else 1")
    p.add_argument("--cfg-interval", type=probability, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"),
                   help="apply CFG only for LOW <= t <= HIGH (t=0 noise); REPA's interval [0, 0.7] is 0.3 1 here")
    p.add_argument("--cfg-rep", type=nonneg_float, default=1.0,
                   help="representation guidance weight (needs a model trained with --feat-drop > 0); 1 = off")
    p.add_argument("--seed", type=nonneg_int, default=0, help="labels and noise are functions of (seed, sample index)")
    p.add_argument("--classes", type=class_list, default=None,
                   help="labels, e.g. 207,360,387 (cycled over the samples); default: uniformly random")
    p.add_argument("--n", type=positive_int, default=8, help="number of samples in the grid")
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help="sample this many images, one PNG each, and an ADM .npz (the mode torchrun uses)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="samples per forward per process")
    p.add_argument("--out", default=None, help="grid: PNG path (default <ckpt dir>/grid_step<step>_cfg<cfg-scale>"
                   "_rep<cfg-rep>_seed<seed>.png); --num-samples: a folder; the .npz is written next to it as "
                   "<folder>.npz")
    p.add_argument("--save-features", action="store_true", help="also save the final feature tokens (.npy)")
    p.add_argument("--vae-weights", default=None, help="local SD-VAE folder (overrides the checkpoint's)")
    p.add_argument("--svg-ae", default=None, help="SVG space: the autoencoder (svg_ae.py's last.pt; overrides the run's)")
    p.add_argument("--svg-dino-weights", default=None, help="SVG space: local DINOv3 weights (overrides the run's)")
    p.add_argument("--svg-stats", default=None,
                   help="SVG space: SVG's dinov3_sp_stats.pt (needed for SVG's own checkpoints; overrides the run's)")
    p.add_argument("--fp32", action="store_true", help="on GPU: no bf16 autocast, no TF32")
    return p.parse_args(argv)


def main(argv=None):
    cli(lambda: run(get_args(argv)))


def run(args):
    world = int(os.environ.get("WORLD_SIZE", 1))
    many = args.num_samples is not None or world > 1
    if world > 1 and args.num_samples is None:
        raise UserError("under torchrun pass --num-samples N")
    lo, hi = args.cfg_interval
    if lo > hi:
        raise UserError(f"--cfg-interval {lo} {hi}: need LOW <= HIGH")
    _, rank, world, device = init_processes()
    if device.type == "cuda" and not args.fp32:
        torch.set_float32_matmul_precision("high")  # TF32

    if args.ckpt is None:
        args.ckpt = newest_checkpoint(args.results_dir)
        if rank == 0:
            print(f"no --ckpt given: the newest checkpoint under {args.results_dir}/ is {args.ckpt}")
    model, cfg = load_checkpoint(args.ckpt, args)
    d = default_sampler(cfg["space"], args.sampler, args.steps, args.time_shift)
    args.sampler, args.steps, args.time_shift = d["sampler"], d["steps"], d["time_shift"]
    if args.cfg_scale is None:
        args.cfg_scale = 4.0 if cfg["space"] == "svg" else 1.0
    if args.steps < (2 if args.sampler == "sde" else 1):
        raise UserError(f"--steps {args.steps} is too few for {args.sampler}")
    if args.sampler == "sde" and args.time_shift != 1:
        raise UserError("--time-shift is for the euler and heun samplers")
    lo, hi = args.cfg_interval
    if not lo <= hi:
        raise UserError(f"--cfg-interval {lo} {hi}: need LOW <= HIGH")
    if args.cfg_rep != 1 and (not MODES[cfg["mode"]].features or cfg.get("feat_drop") == 0):
        raise UserError(f"--cfg-rep needs a ReDi/CoReDi model trained with feature dropout; this one is mode "
                        f"{cfg['mode']} with feat_drop={cfg.get('feat_drop', 0)}")
    if args.save_features and not model.feat_dim:
        raise UserError("--save-features: this model has no feature stream")
    if args.classes and not all(0 <= c < model.num_classes for c in args.classes):
        raise UserError(f"--classes must lie in [0, {model.num_classes - 1}]")
    tag = cfg["step"] if cfg.get("step") is not None else os.path.splitext(os.path.basename(args.ckpt))[0]
    if many:
        args.out = args.out or os.path.join(
            os.path.dirname(args.ckpt), f"samples_{tag}_{args.sampler}{args.steps}_cfg{args.cfg_scale}"
                                        f"_rep{args.cfg_rep}_seed{args.seed}_{args.num_samples}")
        check_writable(args.out)  # the sample folder,
        check_writable(os.path.dirname(os.path.abspath(args.out)))  # and the .npz next to it
    else:
        # "grid_...", not "samples_...": training's own sample grids are samples_<step>.png in the same folder
        name = f"grid_{'step' if cfg.get('step') is not None else ''}{tag}_cfg{args.cfg_scale}_rep{args.cfg_rep}"
        out = args.out or os.path.join(os.path.dirname(args.ckpt), f"{name}_seed{args.seed}.png")
        if os.path.isdir(out):
            raise UserError(f"--out {out} is a folder; pass a .png path for a grid (or --num-samples N for a folder)")
        check_writable(os.path.dirname(os.path.abspath(out)))
    model.to(device)
    # Decode with the run's VAE; released weights with sd-vae-ft-ema, as SiT's, REPA's and ReDi's samplers do.
    vae = VAE(weights=args.vae_weights or cfg.get("vae_weights")).to(device) if cfg["space"] == "latent" else None
    if cfg["space"] == "svg":
        vae = svg_latents(args, cfg, model).to(device)
    kw = dict(prediction=cfg["prediction"], vae=vae, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
              cfg_interval=args.cfg_interval, cfg_rep=args.cfg_rep, seed=args.seed, classes=args.classes,
              bf16=device.type == "cuda" and not args.fp32, time_shift=args.time_shift)

    if many:
        sample_many(model, cfg, args, device, vae, rank, world, kw)
        return
    chunks = [list(range(k, min(k + args.batch_size, args.n))) for k in range(0, args.n, args.batch_size)]
    results = [generate(model, idx, device, **kw) for idx in chunks]
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    save_grid(np.concatenate([r[0] for r in results]), out)
    print(f"wrote {out} (classes {torch.cat([r[1] for r in results]).tolist()})")
    if args.save_features:
        np.save(os.path.splitext(out)[0] + "_features.npy", np.concatenate([r[2] for r in results]))


if __name__ == "__main__":
    main()
