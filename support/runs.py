"""Run bookkeeping: checkpoints (plain dicts, written atomically, loadable with torch.load(weights_only=True)), the
resume rules, run folders and their lock, stop signals, the start and end messages, train.py's flag checks, and the
projection files (a run's pca.pt, ReDi's PCA file, the cache's fingerprint)."""
import fcntl
import hashlib
import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist

from model import MODES
from support.cli import UserError, check_file, check_writable, reason
from support.data import runs_encoder
from support.released import load_redi_pca, nonfinite, read_redi_pca


def save_checkpoint(path, state):
    """Write state to path atomically: a crash or a full disk mid-write leaves the previous file untouched, and a
    failed write leaves no partial file (which would keep the disk full)."""
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError from its writer
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {path} ({reason(e)}); the previous "
                        f"{os.path.basename(path)} is kept; free disk space and continue with --resume") from None


def checkpoint_state(dit, ema, proj, opt, step, config, svg=None):
    """What last.pt holds: weights of the bare modules (never the DDP or compiled wrappers), the optimizer, the
    step and the run's config (its flags, the prediction and the DiT's arch), and in SVG space the latent
    statistics (svg: the SVGLatents); the data order and all noise are functions of (seed, step), so nothing else."""
    state = {"model": dit.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
             "proj": proj.state_dict() if proj is not None else {}, "step": step, "config": config}
    if svg is not None:
        state["svg_stats"] = {"mean": svg.mean.cpu(), "std": svg.std.cpu()}
    return state


# The flags a resumed run may change: how long, how fast, how often it logs and saves, the FID, where the data and
# results live, and how it runs. Any other flag must equal the checkpoint's: the run would be another experiment.
RESUME_MAY_CHANGE = ("max_steps", "lr", "proj_lr", "log_every", "ckpt_every", "keep_every", "sample_every", "fid_every",
                     "fid_ref", "fid_samples", "inception_weights", "num_workers", "data_path", "latent_cache",
                     "results_dir", "run_name", "precision", "compile", "grad_checkpoint", "resume", "restart")


def read_checkpoint(path, args):
    """The last.pt that --resume continues, read and compared with this run's flags before anything expensive."""
    if not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint at {path}; leave out --resume to start a new run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        config, step = ckpt["config"], ckpt["step"]
    except Exception as e:  # truncated (a full disk, a cut copy), or not a train.py checkpoint
        raise UserError(f"cannot read {path} ({type(e).__name__}): it is truncated or not a train.py checkpoint; "
                          f"restore a copy (step_N.pt with --keep-every) or start over with --restart") from None
    if nonfinite(ckpt["model"]):
        raise UserError(f"{path} holds non-finite weights (a diverged run, saved before this check existed); "
                        f"restore an earlier step_N.pt as last.pt, or start over with --restart")
    diff = [f"--{k.replace('_', '-')} ({config[k]} in the checkpoint, {v} now)" for k, v in vars(args).items()
            if k in config and k not in RESUME_MAY_CHANGE and config[k] != v]
    if diff:  # the first few, and how many more: one readable line
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise UserError(f"cannot resume {path} with different settings: {', '.join(diff[:4])}{more}; a resumed run "
                        f"may change only --max-steps, --lr, --proj-lr, the log/checkpoint/sample/FID flags, paths "
                        f"and speed flags (or start over with --restart)")
    changed = [f"--{k.replace('_', '-')} {config[k]} -> {getattr(args, k)}" for k in RESUME_MAY_CHANGE
               if k in config and config[k] != getattr(args, k) and k not in ("resume", "restart")]
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"resuming {path} at step {step} with: {', '.join(changed)}")
    return ckpt


def load_for_resume(ckpt, dit, ema, proj, opt, lrs, svg=None):
    """Restore a run from its checkpoint (read_checkpoint; lrs: this run's learning rates of the DiT and of P, which
    may change on resume; svg: the SVGLatents, whose statistics it restores); returns the step to continue from."""
    dit.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    if proj is not None:
        proj.load_state_dict(ckpt["proj"])
    opt.load_state_dict(ckpt["opt"])
    for g, lr in zip(opt.param_groups, lrs):
        g["base_lr"] = lr  # --lr and --proj-lr may change on resume
    if svg is not None:
        svg.mean.copy_(ckpt["svg_stats"]["mean"])
        svg.std.copy_(ckpt["svg_stats"]["std"])
    return ckpt["step"]


PCA_KEYS = ("enc_mean", "enc_std", "pca_mean", "pca_var", "P")  # what FeatureProjection.fit sets


def pca_fingerprint(proj):
    """A short hash of the standardisation and PCA in proj: prepare.py records the one that made the features it
    stores, and a run that reads them must project with the same."""
    h = hashlib.sha256()
    for k in PCA_KEYS:
        h.update(getattr(proj, k).detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_cache_projection(proj, data, args):
    """redi from cached features: the run must project with the PCA that made them (meta.json's fingerprint)."""
    if pca_fingerprint(proj) == data.meta["features"]["pca"]:
        return
    if args.resume:
        raise UserError(f"the projection in this run's last.pt is not the PCA that made the features in {data.root}; "
                          f"resume with the run's own cache, or one made with prepare.py --features --pca-file "
                          f"<this run's PCA>")
    if args.pca_file:
        raise UserError(f"--pca-file {args.pca_file} is not the PCA that made the features in {data.root}; leave "
                          f"it out (the cache's own is used) or remake the cache with prepare.py --features "
                          f"--pca-file {args.pca_file}")
    raise UserError(f"{data.root}/pca.pt is not the PCA that meta.json says made its features; remake the cache "
                      f"with prepare.py")


def load_projection_file(path, proj):
    """--pca-file: the standardization and PCA of an earlier run's pca.pt, or ReDi's own pcs/dino_pca_model.pth,
    instead of a fit. Every tensor that the fit sets must be there with this run's shapes (the encoder's width,
    --feat-dim); the rest of the file is ignored."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if os.path.isfile(path) and "sklearn" in str(e):  # ReDi's file pickles a scikit-learn PCA
            return load_redi_pca(proj, read_redi_pca(path))
        raise UserError(f"--pca-file {path}: cannot read it ({type(e).__name__}); pass the pca.pt of an earlier run "
                          f"or ReDi's dino_pca_model.pth") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(sd.get(k)) for k in PCA_KEYS):
        raise UserError(f"--pca-file {path}: not a pca.pt (it needs the tensors {', '.join(PCA_KEYS)})")
    own = proj.state_dict()
    for k in PCA_KEYS:
        if sd[k].shape != own[k].shape:
            raise UserError(f"--pca-file {path}: {k} has shape {tuple(sd[k].shape)} but this run needs "
                              f"{tuple(own[k].shape)} (encoder width {proj.P.shape[0]}, --feat-dim {proj.d})")
    with torch.no_grad():
        for k in PCA_KEYS:
            own[k].copy_(sd[k])
        if proj.vf_map is not None:  # as the fit does: VF's map starts as P^T
            proj.vf_map.weight.copy_(proj.P)


def default_run_name(args):
    """<mode>-<space>-<model>; demo runs are <preset>-<mode> (demo-coredi, demo-svg-sit), so a demo in another mode
    does not meet the first."""
    if args.preset.startswith("demo"):
        return f"{args.preset}-{args.mode}"
    return f"{args.mode}-{args.space}-{args.model.replace('/', '')}"


def check_run_dir(run_dir, args):
    """Nothing is overwritten by accident: a folder that holds a run is continued with --resume or, with --restart,
    moved aside (when training starts)."""
    if not args.resume and not args.restart and os.path.isdir(run_dir) and set(os.listdir(run_dir)) - {".lock"}:
        held = "a checkpoint (last.pt)" if os.path.exists(os.path.join(run_dir, "last.pt")) else "files of a run"
        raise UserError(f"{run_dir} already holds {held}: pass --resume to continue it, or --restart to start over "
                          f"(its files are moved to {run_dir}-<time>, nothing is deleted)")


def run_folder(args, master=True):
    """The run's folder, <results-dir>/<run-name>, after checking that this start may use it (check_run_dir)
    and, where it exists, that no other training holds it (rank 0 takes its lock)."""
    run_dir = os.path.join(args.results_dir, args.run_name or default_run_name(args))
    check_writable(args.results_dir, f"--results-dir {args.results_dir}", "pass another --results-dir")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"{run_dir} is a file, not a run folder; pass another --run-name or --results-dir")
    if master and os.path.isdir(run_dir):
        lock_run_dir(run_dir)
    check_run_dir(run_dir, args)
    return run_dir


HELD = {}  # the run folders whose lock this process holds: {real path: open lock file}


def lock_run_dir(run_dir):
    """Hold <run>/.lock (an flock) for the rest of this process: a second training into the same folder gets one
    line. The kernel drops an flock when its process ends, so a killed run leaves no stale lock; a later run in
    the same process (the tests) keeps the one it holds."""
    path = os.path.join(run_dir, ".lock")
    held = HELD.get(os.path.realpath(run_dir))
    if held is not None and os.path.exists(path) and os.fstat(held.fileno()).st_ino == os.stat(path).st_ino:
        return
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{run_dir} is in use by another training ({owner}); wait for it to end, or pass "
                        f"another --run-name") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    HELD[os.path.realpath(run_dir)] = f


def prepare_run_dir(run_dir, args, proj):
    """Once start-up has succeeded (rank 0): with --restart the old run's files are moved to <run>-<time>; the
    folder is made, and a new run saves its projection as pca.pt (prepare.py and --pca-file can reuse it)."""
    if os.path.isdir(run_dir):
        lock_run_dir(run_dir)  # (again: a training may have made the folder since this one started)
    if args.restart and os.path.isdir(run_dir) and set(os.listdir(run_dir)) - {".lock"}:
        aside = f"{run_dir}-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(run_dir, aside)
        print(f"--restart: moved the files of the previous run to {aside}")
    os.makedirs(run_dir, exist_ok=True)
    lock_run_dir(run_dir)
    if proj is not None and not args.resume and not args.pca_file:
        torch.save(proj.state_dict(), os.path.join(run_dir, "pca.pt"))


def save_run(run_dir, state, step, keep_every):
    """Overwrite <run>/last.pt (atomically) and, every keep_every steps, keep step_N.pt; never with non-finite
    weights, which would replace the last good checkpoint."""
    last = os.path.join(run_dir, "last.pt")
    if nonfinite(state["model"]):
        raise UserError(f"non-finite weights at step {step}; not overwriting {last}")
    save_checkpoint(last, state)
    if keep_every and step % keep_every == 0:
        save_checkpoint(os.path.join(run_dir, f"step_{step:07d}.pt"), state)


class StopSignal:
    """SIGTERM (a cluster's notice) and SIGINT (Ctrl-C) stop the run at the next step boundary, after a checkpoint;
    a second Ctrl-C interrupts at once. Under DDP every rank stops at the same step, whichever got the signal."""

    def __init__(self):
        self.signal = None
        self.handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(self, sig, frame):
        if self.signal == signal.SIGINT and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = sig

    def agreed(self, ddp, device, sync=True):
        """Whether this step is the last. One process stops at the step it got the signal at; under DDP
        the ranks agree at a step where they synchronise anyway (sync: a log or checkpoint step), so that
        the other steps make no round trip to the host."""
        if ddp:
            if not sync:
                return False
            flag = torch.tensor(float(self.signal or 0), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signal = self.signal or (signal.Signals(int(flag.item())) if flag.item() else None)
        return self.signal is not None

    def report(self, master, bar, run_dir, step):
        """After the checkpoint of a stopped run: say so, and exit with 128 + the signal's number (143 for SIGTERM,
        130 for Ctrl-C), so that a scheduler or a shell can tell a stopped run from a finished one."""
        if master:
            bar.close()
            print(f"stopped by {signal.Signals(self.signal).name}: saved {run_dir}/last.pt at step {step}; continue "
                  f"with the same command and --resume", file=sys.stderr)
        self.restore(run_dir)
        raise SystemExit(128 + int(self.signal))

    def restore(self, run_dir=None):
        """At the end of the loop: the signal handlers as they were, and run_dir's lock released."""
        for s, h in self.handlers.items():
            signal.signal(s, h)
        held = HELD.pop(os.path.realpath(run_dir), None) if run_dir else None
        if held is not None:
            held.close()


def start_messages(args, data, cached, warmup, lr, dit=None, world=1, step=0):
    """What rank 0 says before the first step: where redi's features come from, a random encoder that runs,
    one-line warnings for a run that cannot learn as asked, and what is trained (given the DiT). Adam moves each weight by at most about lr per step, so
    the learning rate summed over the run bounds how far any weight can travel: under 0.01, below the weights'
    initial scale (xavier: 0.02 for XL, 0.06 for T), the model stays at its initialisation, whose output is zero
    (DiT zero-inits its last layer): flat grey samples."""
    lines = []
    if cached:
        lines.append(f"redi's features come from the latent cache (PCA {data.meta['features']['pca_from']}); "
                     + ("the encoder runs for REPA's target only" if args.repa else "no encoder is built"))
    if args.enc_weights in ("random", "tiny") and runs_encoder(args, cached):
        lines.append(f"NOTE: the encoder has RANDOM weights ({args.enc_weights}); fine for the demo, meaningless "
                     f"otherwise")
    per_epoch, steps = len(data) // args.global_batch_size, args.max_steps
    w = min(warmup, steps)
    travel = lr * (w * (w - 1) / (2 * warmup) + steps - w) if warmup else lr * steps  # warmup_lr summed
    if warmup > steps:
        lines.append(f"WARNING: the warm-up ({warmup} steps; an epoch of {len(data)} images is {per_epoch} steps) "
                     f"is longer than the run ({steps} steps): the learning rate never reaches --lr {lr:.3g}; "
                     f"lower --warmup-epochs")
    if travel < 0.01:
        lines.append(f"WARNING: the learning rate summed over the run is {travel:.2g} (--lr {lr:.3g}, {steps} "
                     f"steps, {warmup} warm-up): Adam moves a weight by at most about lr per step, so the weights "
                     f"stay near their initialisation and the samples stay flat; raise --lr or --max-steps")
    if dit is not None:
        lines.append(f"{args.mode} / {args.space} / {args.model}: {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}"
                     f"M parameters, {len(data)} images, {world} rank(s), global batch {args.global_batch_size}, "
                     f"starting at step {step}")
    return lines


def check_train_flags(args):
    """train.py's flags that exclude each other or name a missing file, refused in one line before any work."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.space == "svg" and MODES[args.mode].features:
        raise UserError(f"--space svg trains sit or repa, not {args.mode}: SVG's latent already is the encoder's "
                        f"feature map, so there are no separate features to diffuse beside it")
    if args.space == "svg" and args.svg_ae is None:
        raise UserError("--space svg needs --svg-ae PATH, the trained SVG autoencoder (svg_ae.py's last.pt)")
    if args.repa and args.mode == "sit":
        raise UserError("--repa adds REPA's loss to redi or coredi; SiT with REPA is --mode repa")
    if args.qk_norm and args.model.startswith("JiT"):
        raise UserError("--qk-norm is a DiT/SiT option (JiT always normalises queries and keys)")
    if args.global_batch_size % world:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by the {world} ranks; "
                        f"use a multiple of {world}")
    if args.data_path and args.latent_cache:
        raise UserError("--data-path and --latent-cache exclude each other: a run reads one data set")
    if args.resume and args.restart:
        raise UserError("--resume and --restart exclude each other: continue the run, or start it over")
    if args.pca_file:
        check_file(args.pca_file, "pass the pca.pt of an earlier run", "--pca-file")
    if bool(args.fid_every) != bool(args.fid_ref):
        raise UserError("--fid-every N needs --fid-ref REF.npz (an ADM reference batch), and --fid-ref needs "
                        "--fid-every")
    if args.fid_ref:
        check_file(args.fid_ref, "pass an ADM reference batch (.npz), e.g. VIRTUAL_imagenet256_labeled.npz", "--fid-ref")
    if args.fid_every and args.fid_samples // world * world < 4:
        raise UserError(f"--fid-samples {args.fid_samples}: the FID needs at least 4 samples (a few thousand to "
                        f"mean something)")


def end_message(args, run_dir, step):
    """What rank 0 says when a run ends: where it is, what it saved, and the next command."""
    files = sorted(os.listdir(run_dir))
    grids = [f for f in files if f.startswith("samples_")]
    saved = [f for f in ("last.pt", "pca.pt", "log.jsonl", "losses.png", "projection.png") if f in files]
    saved += [f"{len(grids)} sample grids ({grids[-1]} the last)"] if grids else []
    saved += [f"{n} kept checkpoints (step_*.pt)" for n in [sum(f.startswith("step_") for f in files)] if n]
    rep = " --cfg-rep 1.5" if MODES[args.mode].features and args.feat_drop > 0 else ""
    return (f"done: {run_dir} at step {step} holds {', '.join(saved)}; sample it with: python sample.py --ckpt "
            f"{os.path.join(run_dir, 'last.pt')}{rep}")
