"""A hand-written mutation pass: each mutant is a plausible one-line bug planted in a copy of the repository; the
tests that should notice it are run against the copy, and a mutant is 'killed' when they fail.

    python -m experiments.mutants                 # all mutants, a table of killed / survived
    python -m experiments.mutants --only 3,7      # some of them
    python -m experiments.mutants --list          # no tests: whether each mutant's text is still in its file

Each mutant names the file, the exact text it replaces (which must occur once), its replacement, and the test
files to run. A mutant whose text is no longer found once is 'stale' (the code moved or was renamed: update it).
Survivors are listed with the reason they are acceptable in docs/experiments.md ("The mutation pass").
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONV, TRAIN, SAMPLE, MODEL, FID, REF = ("tests/test_conventions.py", "tests/test_train.py", "tests/test_sample.py",
                                       "tests/test_model.py", "tests/test_fid.py", "tests/test_reference.py")
FCACHE, ERRORS, RNG = "tests/test_feature_cache.py", "tests/test_errors.py", "tests/test_rng.py"

# (name, file, old text, new text, tests)
MUTANTS = [
    ("interpolant direction flipped", "train.py",
     "x_t = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * noise.eps_x",
     "x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise.eps_x", [CONV]),
    ("velocity target sign flipped", "train.py", "(x - noise.eps_x)).pow(2).mean()",
     "(noise.eps_x - x)).pow(2).mean()", [CONV]),
    ("EMA decay on the wrong side", "train.py", "list(model.parameters()), 1 - decay)",
     "list(model.parameters()), decay)", [CONV]),
    ("feature interpolant flipped", "train.py", "z_noisy = tz * z + (1 - tz) * noise.eps_z",
     "z_noisy = (1 - tz) * z + tz * noise.eps_z", [CONV]),
    ("stop-gradient dropped from the target", "train.py", "z_target = z.detach() if self.proj_sg else z",
     "z_target = z if self.proj_sg else z", [REF]),
    ("stop-gradient dropped from the x->v conversion", "train.py",
     "z_noisy_in_loss = z_noisy.detach() if self.proj_sg else z_noisy",
     "z_noisy_in_loss = z_noisy if self.proj_sg else z_noisy", [REF]),
    ("null label is 0", "train.py", "torch.where(noise.drop_label, dit.num_classes, y)",
     "torch.where(noise.drop_label, 0, y)", [CONV]),
    ("label dropout inverted", "train.py", "drop[:, 0] < label_drop", "drop[:, 0] >= label_drop", [CONV]),
    ("feature dropout keeps the dropped", "train.py", "keep = (~noise.drop_feat).float()",
     "keep = noise.drop_feat.float()", [TRAIN]),
    ("JiT time mean sign", "train.py", "JIT_T_MEAN, JIT_T_STD = -0.8, 0.8", "JIT_T_MEAN, JIT_T_STD = 0.8, 0.8",
     [CONV]),
    ("uniform t replaced by normal", "train.py", "t = draw(torch.rand)\n", "t = draw(torch.randn).sigmoid()\n",
     [CONV]),
    ("warm-up off by one", "train.py", "min(1.0, step / warmup_steps)", "min(1.0, (step + 1) / warmup_steps)",
     [CONV]),
    ("REPA loss sign", "train.py", "-F.cosine_similarity(repa.float(), target, dim=-1).mean()",
     "F.cosine_similarity(repa.float(), target, dim=-1).mean()", [CONV]),
    ("REPA clips like the others (no clip)", "train.py", '"grad_clip":   (0.0,      1.0,        0.0,     0.0),',
     '"grad_clip":   (0.0,      0.0,        0.0,     0.0),', [CONV]),
    ("REPA depth of B models", "train.py", 'REPA_DEPTH = {"T": 2, "S": 4, "B": 4,',
     'REPA_DEPTH = {"T": 2, "S": 4, "B": 8,', [CONV]),
    ("per-sample seed ignores the seed", "support/cli.py", "repr((seed, *keys))", "repr((0, *keys))", [CONV]),
    ("VAE scale", "support/frozen.py", "scale = 0.18215", "scale = 0.18125", [CONV]),
    ("VAE posterior std", "support/frozen.py", "std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))",
     "std = torch.exp(logvar.clamp(-30.0, 20.0))", [CONV]),
    ("x->v clamp", "model.py", "(1 - t).clamp_min(0.05)", "(1 - t).clamp_min(0.01)", [CONV]),
    ("timestep embedding sin first", "model.py", "torch.cat([torch.cos(args), torch.sin(args)], dim=-1)",
     "torch.cat([torch.sin(args), torch.cos(args)], dim=-1)", [MODEL]),
    ("ReDi upsampling with align_corners", "model.py", 'size=size, mode="bilinear", align_corners=False)',
     'size=size, mode="bilinear", align_corners=True)', [REF]),
    ("REPA time flip not folded", "support/released.py",
     "R = torch.cat([torch.cat([cos, sin], 1), torch.cat([sin, -cos], 1)], 0)",
     "R = torch.eye(2 * half, dtype=torch.float64)", [REF]),
    ("REPA output not negated", "support/released.py",
     'sd["final_layer.linear.bias"] = -sd["final_layer.linear.bias"]',
     'sd["final_layer.linear.bias"] = sd["final_layer.linear.bias"]', [REF]),
    ("learn_sigma keeps the second half", "support/released.py", "[:, :, :C].reshape(p * p * C, -1)",
     "[:, :, C:].reshape(p * p * C, -1)", [MODEL, REF]),
    ("Cov normalised by d(d-1)", "model.py", ".pow(2).sum() / cov.shape[0]",
     ".pow(2).sum() / (cov.shape[0] * (cov.shape[0] - 1))", [MODEL]),
    ("PCA mean not subtracted", "model.py", "z = (self.standardize(z0) - self.pca_mean) @ self.P",
     "z = self.standardize(z0) @ self.P", [REF]),
    ("CFG on the features too", "sample.py",
     "return v_img, vz[0] + (cfg_rep - 1) * (vz[0] - vz[-1]) if use_rep else vz[0]",
     "return v_img, vz[0] + (cfg_scale - 1) * (vz[0] - vz[1]) if use_cfg else vz[0]", [REF, SAMPLE]),
    ("RG zeroes nothing", "sample.py", "zs + [torch.zeros_like(z)]", "zs + [z]", [SAMPLE, REF]),
    ("Heun without the final Euler step", "sample.py",
     "        if i == steps - 1:\n            return axpy(state, d, t_next - t)\n", "", [CONV, SAMPLE]),
    ("SDE last step size", "sample.py", "def sde_euler_maruyama(v, state, steps, noise, last_step=0.04):",
     "def sde_euler_maruyama(v, state, steps, noise, last_step=0.0):", [CONV, SAMPLE]),
    ("uint8 conversion offset", "sample.py", "(127.5 * x.float() + 128)", "(127.5 * x.float() + 127.5)", [CONV]),
    ("cached features: the unflipped view for a flipped image", "support/data.py", 'v[int(flip)] if k == "features"',
     'v[0] if k == "features"', [FCACHE]),
    ("cached features: the flipped view is the flipped features", "prepare.py", "for v in (x, x.flip(-1))[:views]]",
     "for v in (x, x)[:views]]", [FCACHE]),
    ("features stored as bfloat16-like (8 mantissa bits)", "prepare.py",
     'store["features"][rows] = torch.stack(z, 1).cpu().numpy().astype(fdtype)',
     'store["features"][rows] = torch.stack(z, 1).bfloat16().float().cpu().numpy().astype(fdtype)', [FCACHE]),
    ("cached features projected again", "train.py", "z_tilde = self.proj(z0) if z_tilde is None else z_tilde",
     "z_tilde = self.proj(z0) if z_tilde is None else z_tilde @ self.proj.P[:z_tilde.shape[-1]]", [FCACHE]),
    ("PCA fingerprint ignores P", "support/runs.py", "    for k in PCA_KEYS:\n        h.update(",
     "    for k in PCA_KEYS[:-1]:\n        h.update(", [FCACHE]),
    ("sampling seed ignored", "sample.py", "return tuple(None if s is None else rng.normal(seed, index,",
     "return tuple(None if s is None else rng.normal(0, index,", [SAMPLE]),
    ("Philox one round short", "support/rng.py", "    for r in range(rounds):", "    for r in range(rounds - 1):",
     [RNG]),
    ("Box-Muller angle from the radius's word", "support/rng.py", "angle = (2 * math.pi / 2 ** 32) * w[:, 1::2]",
     "angle = (2 * math.pi / 2 ** 32) * w[:, 0::2]", [RNG]),
    ("FID without the sqrtm term", "fid.py", "2 * np.trace(covmean)", "np.trace(covmean)", [FID]),
    ("FID covariance biased", "fid.py", "np.cov(", "np.cov(bias=True, m=", [FID]),
    ("every rank takes the first rows of the step's noise", "train.py",
     "generator=g, device=device)[rows.start:rows.stop]", "generator=g, device=device)[:len(rows)]", [CONV]),
    ("a non-finite loss or gradient goes unnoticed", "support/monitor.py", "        if bad:  # on every rank",
     "        if False:  # on every rank", [TRAIN]),
    ("--keep-every only at checkpoint steps", "train.py",
     "keep = args.keep_every and step % args.keep_every == 0", "keep = False", [TRAIN]),
    ("16-bit images clipped by convert", "support/images.py", 'if img.mode.startswith("I;16") or img.mode == "I":',
     "if False:", [ERRORS]),
    ("a run folder in use is not locked", "support/runs.py", "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)",
     "pass", [ERRORS]),
]


def stale(mutant):
    """Whether the mutant's text no longer occurs exactly once in its file (or its file or a test file is gone)."""
    name, path, old, new, tests = mutant
    if not all(os.path.isfile(os.path.join(ROOT, p)) for p in [path, *tests]):
        return True
    with open(os.path.join(ROOT, path)) as f:
        return f.read().count(old) != 1


def run(mutant):
    name, path, old, new, tests = mutant
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", "results", "__pycache__"))
        src = open(os.path.join(tmp, path)).read()
        if src.count(old) != 1:
            return "stale", 0.0  # the text moved: the mutant must be updated
        open(os.path.join(tmp, path), "w").write(src.replace(old, new))
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=tmp,
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return ("killed" if r.returncode != 0 else "SURVIVED"), time.time() - t0


def main():
    p = argparse.ArgumentParser(prog="python -m experiments.mutants", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated mutant numbers (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants, ok or stale, without running tests")
    args = p.parse_args()
    chosen = [int(i) for i in args.only.split(",")] if args.only else range(len(MUTANTS))
    if args.list:
        print("| # | mutant | file | text | tests |\n|---|---|---|---|---|")
        for i in chosen:
            name, path, _, _, tests = MUTANTS[i]
            print(f"| {i} | {name} | {path} | {'STALE' if stale(MUTANTS[i]) else 'ok'} | {', '.join(tests)} |")
        n = sum(stale(MUTANTS[i]) for i in chosen)
        print(f"\n{n} stale of {len(chosen)}")
        sys.exit(1 if n else 0)
    counts = {}
    print("| # | mutant | file | result | seconds |\n|---|---|---|---|---|")
    for i in chosen:
        result, sec = run(MUTANTS[i])
        counts[result] = counts.get(result, 0) + 1
        print(f"| {i} | {MUTANTS[i][0]} | {MUTANTS[i][1]} | {result} | {sec:.0f} |", flush=True)
    print(f"\n{counts.get('killed', 0)} killed, {counts.get('SURVIVED', 0)} survived, {counts.get('stale', 0)} stale "
          f"of {len(chosen)}")


if __name__ == "__main__":
    main()
