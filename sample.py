"""
Sample images from a trained joint image-feature diffusion model (SiT, REPA, ReDi, CoReDi) or from
the released weights of SiT, ReDi, REPA, JiT or SVG (recognised by their keys).

    python sample.py --cfg-rep 1.5      # a PNG grid from the newest results/*/last.pt, next to it
    python sample.py --ckpt results/demo-coredi/last.pt --cfg-rep 1.5          # the same, named
    python sample.py --ckpt SiT-ReDi-XL-2.pt --cfg-scale 2.4              # ReDi's published setting
    python sample.py --ckpt svg_xl.pt --svg-ae svg-ae/last.pt --svg-stats dinov3_sp_stats.pt
        # SVG's DiT weights: Euler, 25 steps on the grid shifted with 0.15, CFG 4 (SVG's sampler)
    torchrun --nproc_per_node 8 sample.py --ckpt last.pt --num-samples 50000 --out samples/run
        # one PNG per sample in samples/run/, then samples/run.npz for fid.py (ADM layout)

Time runs from t=0 (noise) to t=1 (data): x_t = t*x + (1-t)*eps, velocity v = x - eps. The features
z are noised and integrated together with the image (the joint state (x, z)) and dropped at the end.
Every sample's label and noise depend only on --seed and the sample's index, so the same images come
out whatever the number of GPUs or the batch size (up to float rounding: a batch of another size can
move one pixel by one level), and an interrupted run resumes where it stopped.
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from model import MODES, create_model, shift_time, to_velocity
from support.cli import (ArgumentParser, UserError, cli, init_processes, nonneg_float, nonneg_int,
                         positive_float, positive_int, probability, reason)
from support import rng
from support.frozen import VAE, VAE_EMA
from support.released import load_dit_state_dict, load_released
from support.sampling_io import (check_flags, check_settings, done, newest_checkpoint, output_path,
                                 sample_settings, save_sample, write_npz)


# -----------------------------------------------------------------------------
# Checkpoint

def load_checkpoint(path, args):
    """A train.py checkpoint (its config rebuilds the network; EMA weights unless --raw), or the
    released weights of SiT, ReDi, REPA or JiT, recognised by their keys (support.released)."""
    if not os.path.isfile(path):
        last = os.path.join(path, "last.pt")
        hint = f"; pass --ckpt {last}" if os.path.isfile(last) else ""
        what = "is a folder" if os.path.isdir(path) else "not found"
        raise UserError(f"checkpoint {path} {what}{hint}")
    # reference codes' training checkpoints also hold their argparse settings: plain data, allowed
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = reason(e)
        raise UserError(f"could not read checkpoint {path} ({why})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint "
                        f"(a dict of tensors)")
    if "config" in ckpt:
        cfg = dict(ckpt["config"], step=ckpt.get("step"), svg_stats=ckpt.get("svg_stats"))
        sd = ckpt.get("model" if args.raw else "ema")
        if sd is None:
            raise UserError(f"checkpoint {path} has no {'raw' if args.raw else 'EMA'} weights"
                            f"{'' if args.raw else '; pass --raw for the raw weights'}")
        model = load_dit_state_dict(create_model(cfg["model"], **cfg["arch"]), sd)
        model.eval().requires_grad_(False)
    else:
        model, cfg = load_released(ckpt)
        print(f"{path}: released {cfg['mode']} weights, {cfg['model']} at {cfg['image_size']} px "
              f"({cfg['space']} space)")
    if args.mode and args.mode != cfg["mode"]:
        raise UserError(f"checkpoint {path} was trained with --mode {cfg['mode']}, "
                        f"not --mode {args.mode}")
    return model, cfg


def svg_latents(args, cfg, model):
    """SVG space: the autoencoder that decodes (--svg-ae, else the run's) and the latent statistics
    to undo first (--svg-stats, else the run's checkpoint; SVG's own checkpoints carry none)."""
    import svg_ae  # only in SVG space: it needs diffusers and torchvision
    path = args.svg_ae or cfg.get("svg_ae")
    if path is None or not os.path.isfile(path):
        raise UserError("SVG space decodes with the SVG autoencoder: pass --svg-ae PATH to "
                        f"svg_ae.py's last.pt{'' if path is None else f' ({path} not found)'}")
    ae = svg_ae.load_autoencoder(path, args.svg_dino_weights or cfg.get("svg_dino_weights"))
    C = ae.decoder.conv_in.in_channels
    if C != model.in_channels:
        raise UserError(f"the SVG autoencoder {path} makes {C}-channel latents; "
                        f"the model takes {model.in_channels}")
    if args.svg_stats:
        mean, std = svg_ae.read_svg_stats(args.svg_stats, C)
    elif cfg.get("svg_stats"):
        mean, std = cfg["svg_stats"]["mean"], cfg["svg_stats"]["std"]
    else:
        raise UserError("SVG's checkpoints hold no latent statistics: "
                        "pass --svg-stats PATH to SVG's dinov3_sp_stats.pt")
    return svg_ae.SVGLatents(ae, mean, std)


# -----------------------------------------------------------------------------
# Labels and noise: a function of (seed, sample index) only

# Each is a counter-based draw (support.rng: Philox, on the sampling device) keyed by the seed and
# counted by (sample index, draw, stream): draw 0 is the label, draw 1 the starting noise, draw 1 + k
# the noise of SDE step k; stream 0 the image, 1 the features. So a sample never depends on its
# batch, rank or device, and a step's noise is a few hundred kernels, not one draw per sample.

def draw_labels(seed, index, num_classes, classes=None):
    """The labels (B,) of the samples with global indices index (an int64 tensor)."""
    if classes:
        return torch.tensor([classes[i % len(classes)] for i in index.tolist()])
    return rng.randint(seed, index, 0, num_classes)


def draw_noise(seed, index, draw, shapes):
    """A noise tensor (B, *shape) per stream of the joint state; None for an absent stream."""
    return tuple(None if s is None else rng.normal(seed, index, draw, s, stream)
                 for stream, s in enumerate(shapes))


# -----------------------------------------------------------------------------
# Velocity of the joint state, with classifier-free and representation guidance

def guided_velocity(model, y, prediction, cfg_scale=1.0, cfg_interval=(0.0, 1.0), cfg_rep=1.0,
                    bf16=False, cfg_channels=None):
    """Returns v(state, t) for the joint state (x, z) at time t (a float, 0 = noise, 1 = data), with
    v_c = v(x, z, y), v_nolabel = v(x, z, null) and v_nofeat = v(x, 0, y):
      image channels:   v = v_c + (w_cfg - 1)(v_c - v_nolabel) + (w_rep - 1)(v_c - v_nofeat)
      feature channels: v = v_c + (w_rep - 1)(v_c - v_nofeat)
    Classifier-free guidance acts on the image only (ReDi's --cfg-vae, used for its published FID)
    and only inside cfg_interval; representation guidance on all channels (ReDi's forward_with_rg).
    A weight of 1 drops its branch. All branches run as one batched forward. cfg_channels: CFG
    guides the first so many image channels only (SiT's released weights: 3, as its sampler)."""
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
            k = cfg_channels or v_img.shape[1]  # the rest stays conditional
            guided = v_img[:, :k] + (cfg_scale - 1) * (vx[0] - vx[1])[:, :k]
            v_img = torch.cat([guided, v_img[:, k:]], dim=1)
        if use_rep:
            v_img = v_img + (cfg_rep - 1) * (vx[0] - vx[-1])
        if z is None:
            return v_img, None
        # the feature velocity at the state's own z
        vz = to_velocity(out_z.float(), torch.cat([z] * n), t_in, prediction).chunk(n)
        return v_img, vz[0] + (cfg_rep - 1) * (vz[0] - vz[-1]) if use_rep else vz[0]
    return v


# -----------------------------------------------------------------------------
# Samplers: integrate the joint state (x, z) from t=0 (noise) to t=1 (data); z may be None

def axpy(state, d, h):
    """state + h * d, stream by stream."""
    return tuple(None if s is None else s + h * ds for s, ds in zip(state, d))


def time_grid(steps, shift=1.0):
    """steps + 1 times from 0 (noise) to 1 (data): uniform, then shifted as SVG's sampler does
    (model.shift_time; its 0.15 puts most steps near the noise end)."""
    return [shift_time(t, shift) for t in torch.linspace(0, 1, steps + 1).tolist()]


def euler_ode(v, state, steps, shift=1.0):
    """Euler on the probability-flow ODE dx/dt = v on time_grid(steps, shift): steps model
    evaluations."""
    ts = time_grid(steps, shift)
    for t, t_next in zip(ts[:-1], ts[1:]):
        state = axpy(state, v(state, t), t_next - t)
    return state


def heun_ode(v, state, steps, shift=1.0):
    """Heun (trapezoidal predictor-corrector) over time_grid(steps, shift); the last interval is a
    plain Euler step, as in JiT and EDM, since the correction would evaluate at t=1 where the
    x-prediction velocity (x_hat - x_t)/max(1-t, 0.05) is clamped. 2*steps - 1 model evaluations."""
    ts = time_grid(steps, shift)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        d = v(state, t)
        if i == steps - 1:
            return axpy(state, d, t_next - t)
        d_next = v(axpy(state, d, t_next - t), t_next)
        d_mean = tuple(None if a is None else (a + b) / 2 for a, b in zip(d, d_next))
        state = axpy(state, d_mean, t_next - t)


def sde_euler_maruyama(v, state, steps, noise, last_step=0.04):
    """Euler-Maruyama on SiT's reverse SDE, dX = [v + D(t) s] dt + sqrt(2 D(t)) dW (drift
    v + g^2 s / 2 for the noise level g^2 = 2D), with SiT's defaults: diffusion form "sigma"
    D(t) = 1 - t (diffusion norm 1), and a last deterministic "Mean" step of size 0.04. Any D >= 0
    keeps the marginals of the flow (the D s term cancels the diffusion in the Fokker-Planck
    equation). The score comes from the velocity: eps_hat = x_t - t v, s = -eps_hat / (1 - t), so
    D s = -eps_hat and the drift v - eps_hat stays finite up to t = 1. Time grid linspace(0,
    1 - last_step, steps): steps - 1 noisy steps and the mean step, steps model evaluations.
    noise(k) gives step k's standard normals, one per stream."""
    ts = torch.linspace(0, 1 - last_step, steps).tolist()

    def drift(state, t):
        return tuple(None if s is None else ds - (s - t * ds) for s, ds in zip(state, v(state, t)))

    for k, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        state = axpy(state, drift(state, t), t_next - t)
        state = axpy(state, noise(k), math.sqrt(2 * (1 - t) * (t_next - t)))
    return axpy(state, drift(state, ts[-1]), last_step)


def default_sampler(space, sampler=None, steps=None, time_shift=None):
    """SiT's SDE with 250 steps in latent space, JiT's Heun with 50 in pixel space, SVG's Euler with
    25 on the time grid shifted with 0.15 in SVG space (sample_svg.py), unless given."""
    sampler = sampler or {"latent": "sde", "pixel": "heun", "svg": "euler"}[space]
    steps = steps or (250 if sampler == "sde" else 25 if space == "svg" else 50)
    time_shift = time_shift or (0.15 if space == "svg" else 1.0)
    return dict(sampler=sampler, steps=steps, time_shift=time_shift)


# -----------------------------------------------------------------------------
# Generation: labels + noise -> joint state -> images

@torch.no_grad()
def generate(model, indices, device, prediction, vae=None, sampler="sde", steps=250,
             cfg_scale=1.0, cfg_interval=(0.0, 1.0), cfg_rep=1.0, seed=0, classes=None, bf16=False,
             time_shift=1.0, cfg_channels=None):
    """Samples for the given global indices: uint8 images (B, H, W, 3), labels (B,), final features
    or None. prediction: what the model outputs ('v' latent space, 'x' pixel space); vae: decodes
    latents (None: pixels; an SVGLatents in SVG space); time_shift: the ODE samplers' time_grid."""
    indices = list(indices)
    index = torch.tensor(indices, dtype=torch.int64, device=device)
    y = draw_labels(seed, index, model.num_classes, classes).cpu()
    shapes = ((model.in_channels, model.input_size, model.input_size), model.z_shape)
    state = draw_noise(seed, index, 1, shapes)
    v = guided_velocity(model, y.to(device), prediction, cfg_scale, cfg_interval, cfg_rep,
                        bf16=bf16, cfg_channels=cfg_channels)
    if sampler == "sde":
        x, z = sde_euler_maruyama(v, state, steps, lambda k: draw_noise(seed, index, 2 + k, shapes))
    else:
        x, z = (euler_ode if sampler == "euler" else heun_ode)(v, state, steps, time_shift)
    if vae is not None:
        x = vae.decode(x)
    images = (127.5 * x.float() + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return images.cpu().numpy(), y, (None if z is None else z.float().cpu().numpy())


# -----------------------------------------------------------------------------
# A grid of samples

def save_grid(images, path):
    """uint8 images (N, H, W, C) in a square grid, each enlarged (nearest neighbour: its pixels stay
    visible) to at least 64 px, so that the demo's 32-px samples can be seen."""
    zoom = math.ceil(64 / images.shape[1])
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    n, H, W, C = images.shape
    side = math.sqrt(n)  # a full rectangle if one is near square (8: 4 x 2), else near square
    full = [c for c in range(math.ceil(side), math.floor(2 * side) + 1) if n % c == 0]
    cols = full[0] if full else math.ceil(side)
    rows = math.ceil(n / cols)
    grid = np.full((rows * (H + 2) + 2, cols * (W + 2) + 2, C), 255, dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[2 + r * (H + 2):2 + r * (H + 2) + H, 2 + c * (W + 2):2 + c * (W + 2) + W] = img
    Image.fromarray(grid).save(path)


# -----------------------------------------------------------------------------
# Many samples, many processes: one PNG per sample, resumable, then an ADM .npz

def sample_many(model, cfg, args, device, vae, rank, world, kw):
    """--num-samples N: every process makes its share of the samples not yet in --out (one PNG each,
    support.sampling_io), then rank 0 packs all N with their labels into <out>.npz."""
    out, N = args.out, args.num_samples
    check_settings(out, sample_settings(args, cfg, kw["bf16"]), rank)
    if world > 1:
        # the folder exists and nobody has written a sample yet: all ranks see the same to-do list
        dist.barrier()
    todo = [i for i, ok in enumerate(done(out, N)) if not ok]
    mine = todo[rank::world]  # deal what is left, so a resumed run stays balanced
    batches = [mine[k:k + args.batch_size] for k in range(0, len(mine), args.batch_size)]
    if rank == 0:
        print(f"{N - len(todo)} of {N} samples already in {out}; {len(todo)} to go on {world} "
              f"process(es)")
    try:
        for idx in tqdm(batches, disable=rank != 0):
            images, _, feats = generate(model, idx, device, **kw)
            for k, i in enumerate(idx):
                save_sample(out, i, images[k], feats[k] if args.save_features else None)
    except KeyboardInterrupt:  # Ctrl-C: the finished PNGs stay, and the same command skips them
        raise UserError(f"interrupted: {sum(done(out, N))} of {N} samples are in {out}; "
                        f"run the same command again to finish the rest") from None
    if dist.is_initialized():
        # Balanced work, so a short barrier; then rank 0 assembles alone and nobody waits on it.
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        write_npz(out, N, draw_labels(args.seed, torch.arange(N), model.num_classes, args.classes))


# -----------------------------------------------------------------------------
# Command line

def class_list(s):
    return [int(c) for c in s.split(",")]


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", default=None,
                   help="a train.py checkpoint, or released SiT, ReDi, REPA or JiT weights, or "
                        "SVG's DiT checkpoint; none = the newest last.pt under --results-dir")
    p.add_argument("--results-dir", default="results",
                   help="where to look for the newest last.pt without --ckpt")
    p.add_argument("--mode", choices=list(MODES), default=None,
                   help="fail unless the checkpoint was trained in this mode")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--sampler", choices=["euler", "heun", "sde"], default=None,
                   help="default: sde in latent space (SiT), heun in pixel space (JiT), euler in "
                        "SVG space (SVG)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="model evaluations per sample for euler and sde, intervals for heun "
                        "(2*steps-1 evaluations); guidance multiplies the batch of each "
                        "evaluation, not their number. Default: 250 for sde, 25 in SVG space, 50 "
                        "otherwise")
    p.add_argument("--time-shift", type=positive_float, default=None,
                   help="euler/heun: the time grid t -> s t / (1 + (s - 1) t); default 0.15 in SVG "
                        "space (SVG), else 1")
    p.add_argument("--cfg-scale", type=nonneg_float, default=None,
                   help="classifier-free guidance on the image channels; 1 = off (SiT-XL/2's FID "
                        "2.06: 1.5; ReDi's 1.64: 2.4). Default: 4 in SVG space (SVG's sampler, all "
                        "channels), else 1")
    p.add_argument("--cfg-interval", type=probability, nargs=2, default=(0.0, 1.0),
                   metavar=("LOW", "HIGH"),
                   help="apply CFG only for LOW <= t <= HIGH (t=0 noise); REPA's interval [0, 0.7] "
                        "is 0.3 1 here")
    p.add_argument("--cfg-channels", type=positive_int, default=None,
                   help="CFG guides the first N image channels; default: 3 for released SiT "
                        "weights (SiT's rule), else all")
    p.add_argument("--cfg-rep", type=nonneg_float, default=1.0,
                   help="representation guidance weight (needs a model trained with --feat-drop > "
                        "0); 1 = off")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="labels and noise are functions of (seed, sample index)")
    p.add_argument("--classes", type=class_list, default=None,
                   help="labels, e.g. 207,360,387 (cycled over the samples); default: uniformly "
                        "random")
    p.add_argument("--n", type=positive_int, default=8, help="number of samples in the grid")
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help="sample this many images, one PNG each, and an ADM .npz (the mode torchrun "
                        "uses)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="samples per forward per process")
    p.add_argument("--out", default=None,
                   help="grid: PNG path (default <ckpt dir>/grid_step<step>_cfg<cfg-scale>"
                        "_rep<cfg-rep>_seed<seed>.png); --num-samples: a folder; the .npz is "
                        "written next to it as <folder>.npz")
    p.add_argument("--save-features", action="store_true",
                   help="also save the final feature tokens (.npy)")
    p.add_argument("--vae-weights", default=None,
                   help="the SD-VAE that decodes (hub name or local folder); default: "
                        "sd-vae-ft-ema, the decoder of SiT's, REPA's and ReDi's samplers")
    p.add_argument("--svg-ae", default=None,
                   help="SVG space: the autoencoder (svg_ae.py's last.pt; overrides the run's)")
    p.add_argument("--svg-dino-weights", default=None,
                   help="SVG space: local DINOv3 weights (overrides the run's)")
    p.add_argument("--svg-stats", default=None,
                   help="SVG space: SVG's dinov3_sp_stats.pt (needed for SVG's own checkpoints; "
                        "overrides the run's)")
    p.add_argument("--bf16", action="store_true",
                   help="on GPU: bf16 autocast and TF32, faster; default fp32, as SiT, REPA and ReDi sample")
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
    bf16 = device.type == "cuda" and args.bf16
    if bf16:
        torch.set_float32_matmul_precision("high")  # TF32

    if args.ckpt is None:
        args.ckpt = newest_checkpoint(args.results_dir)
        if rank == 0:
            print(f"no --ckpt given: the newest checkpoint under {args.results_dir}/ is "
                  f"{args.ckpt}")
    model, cfg = load_checkpoint(args.ckpt, args)
    d = default_sampler(cfg["space"], args.sampler, args.steps, args.time_shift)
    args.sampler, args.steps, args.time_shift = d["sampler"], d["steps"], d["time_shift"]
    if args.cfg_scale is None:
        args.cfg_scale = 4.0 if cfg["space"] == "svg" else 1.0
    check_flags(args, cfg, model)
    args.cfg_channels = args.cfg_channels or cfg.get("cfg_channels")
    args.out = output_path(args, cfg, many)  # checked writable before any sampling
    model.to(device)
    # sd-vae-ft-ema decodes, as SiT's, REPA's and ReDi's samplers, whether ft-ema or ft-mse (one
    # encoder) made the latents; a test run's random VAE stays random
    vae = None
    if cfg["space"] == "latent":
        default = "random" if cfg.get("vae_weights") == "random" else VAE_EMA
        vae = VAE(weights=args.vae_weights or default).to(device)
    elif cfg["space"] == "svg":
        vae = svg_latents(args, cfg, model).to(device)
    kw = dict(prediction=cfg["prediction"], vae=vae, sampler=args.sampler, steps=args.steps,
              cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, cfg_rep=args.cfg_rep,
              seed=args.seed, classes=args.classes, bf16=bf16, time_shift=args.time_shift,
              cfg_channels=args.cfg_channels)

    if many:
        sample_many(model, cfg, args, device, vae, rank, world, kw)
        return
    B = args.batch_size
    chunks = [list(range(k, min(k + B, args.n))) for k in range(0, args.n, B)]
    results = [generate(model, idx, device, **kw) for idx in chunks]
    out = args.out
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    save_grid(np.concatenate([r[0] for r in results]), out)
    print(f"wrote {out} (classes {torch.cat([r[1] for r in results]).tolist()})")
    if args.save_features:
        np.save(os.path.splitext(out)[0] + "_features.npy", np.concatenate([r[2] for r in results]))


if __name__ == "__main__":
    main()
