"""A hand-written mutation pass: each mutant is a plausible one-line bug planted in a copy of the repository; the
tests that should notice it are run against the copy, and a mutant is 'killed' when they fail.

    python tools/mutants.py                 # all mutants, a table of killed / survived
    python tools/mutants.py --only 3,7      # some of them

Each mutant names the file, the exact text it replaces (which must occur once), its replacement, and the test
files to run. Survivors are listed with the reason they are acceptable in the README ("Tests").
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
FCACHE = "tests/test_feature_cache.py"

# (name, file, old text, new text, tests)
MUTANTS = [
    ("interpolant direction flipped", "train.py", "x_t = tt * x + (1 - tt) * noise.eps_x",
     "x_t = (1 - tt) * x + tt * noise.eps_x", [CONV]),
    ("velocity target sign flipped", "train.py", "(x - noise.eps_x)).pow(2).mean()", "(noise.eps_x - x)).pow(2).mean()",
     [CONV]),
    ("EMA decay on the wrong side", "train.py", "e.lerp_(p.detach(), 1 - decay)", "e.lerp_(p.detach(), decay)", [CONV]),
    ("feature interpolant flipped", "train.py", "z_t = tz * z + (1 - tz) * noise.eps_z", "z_t = (1 - tz) * z + tz * noise.eps_z",
     [CONV]),
    ("stop-gradient dropped from the target", "train.py", "(z.detach(), z_t.detach()) if self.proj_sg", "(z, z_t.detach()) if self.proj_sg",
     [REF]),
    ("stop-gradient dropped from the x->v conversion", "train.py", "(z.detach(), z_t.detach()) if self.proj_sg",
     "(z.detach(), z_t) if self.proj_sg", [REF]),
    ("null label is 0", "train.py", "torch.where(noise.drop_label, dit.num_classes, y)", "torch.where(noise.drop_label, 0, y)",
     [CONV]),
    ("label dropout inverted", "train.py", "drop[:, 0] < label_drop", "drop[:, 0] >= label_drop", [CONV]),
    ("feature dropout keeps the dropped", "train.py", "keep = (~noise.drop_feat).float()", "keep = noise.drop_feat.float()",
     [TRAIN]),
    ("JiT time mean sign", "train.py", "JIT_T_MEAN, JIT_T_STD = -0.8, 0.8", "JIT_T_MEAN, JIT_T_STD = 0.8, 0.8", [CONV]),
    ("uniform t replaced by normal", "train.py", "t.append(torch.rand(1, generator=g, device=device))",
     "t.append(torch.randn(1, generator=g, device=device).sigmoid())", [CONV]),
    ("warm-up off by one", "train.py", "min(1.0, (step + 1) / warmup_steps)", "min(1.0, step / warmup_steps)", [CONV]),
    ("REPA loss sign", "train.py", "-F.cosine_similarity(repa.float(), target.float(), dim=-1).mean()",
     "F.cosine_similarity(repa.float(), target.float(), dim=-1).mean()", [CONV]),
    ("REPA clips like the others (no clip)", "train.py", '"repa": dict(grad_clip=1.0,', '"repa": dict(grad_clip=0.0,', [CONV]),
    ("REPA depth of B models", "train.py", 'REPA_DEPTH = {"T": 2, "S": 4, "B": 4,', 'REPA_DEPTH = {"T": 2, "S": 4, "B": 8,',
     [CONV]),
    ("per-sample seed ignores the seed", "model.py", "repr((seed, *keys))", "repr((0, *keys))", [CONV]),
    ("VAE scale", "model.py", "scale = 0.18215", "scale = 0.18125", [CONV]),
    ("VAE posterior std", "model.py", "std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))", "std = torch.exp(logvar.clamp(-30.0, 20.0))",
     [CONV]),
    ("x->v clamp", "model.py", "(1 - t).clamp_min(0.05)", "(1 - t).clamp_min(0.01)", [CONV]),
    ("timestep embedding sin first", "model.py", "torch.cat([torch.cos(args), torch.sin(args)], dim=-1)",
     "torch.cat([torch.sin(args), torch.cos(args)], dim=-1)", [MODEL]),
    ("ReDi upsampling with align_corners", "model.py", "mode=\"bilinear\",\n                             align_corners=False)",
     "mode=\"bilinear\",\n                             align_corners=True)", [REF]),
    ("REPA time flip not folded", "model.py", "R = torch.cat([torch.cat([cos, sin], 1), torch.cat([sin, -cos], 1)], 0)",
     "R = torch.eye(2 * half, dtype=torch.float64)", [REF]),
    ("REPA output not negated", "model.py", 'sd["final_layer.linear.bias"] = -sd["final_layer.linear.bias"]',
     'sd["final_layer.linear.bias"] = sd["final_layer.linear.bias"]', [REF]),
    ("learn_sigma keeps the second half", "model.py", "[:, :, :C].reshape(p * p * C, -1)", "[:, :, C:].reshape(p * p * C, -1)",
     [MODEL, REF]),
    ("Cov normalised by d(d-1)", "model.py", ".pow(2).sum() / cov.shape[0]", ".pow(2).sum() / (cov.shape[0] * (cov.shape[0] - 1))",
     [MODEL]),
    ("PCA mean not subtracted", "model.py", "z = (self.standardize(z0) - self.pca_mean) @ self.P",
     "z = self.standardize(z0) @ self.P", [REF]),
    ("CFG on the features too", "sample.py", "return v_img, vz[0] + (cfg_rep - 1) * (vz[0] - vz[-1]) if use_rep else vz[0]",
     "return v_img, vz[0] + (cfg_scale - 1) * (vz[0] - vz[1]) if use_cfg else vz[0]", [REF, SAMPLE]),
    ("RG zeroes nothing", "sample.py", "zs + [torch.zeros_like(z)]", "zs + [z]", [SAMPLE, REF]),
    ("Heun without the final Euler step", "sample.py", "        if i == steps - 1:\n            return axpy(state, d, t_next - t)\n",
     "", [CONV, SAMPLE]),
    ("SDE last step size", "sample.py", "def sde_euler_maruyama(v, state, steps, noise, last_step=0.04):",
     "def sde_euler_maruyama(v, state, steps, noise, last_step=0.0):", [CONV, SAMPLE]),
    ("uint8 conversion offset", "sample.py", "(127.5 * x.float() + 128)", "(127.5 * x.float() + 127.5)", [CONV]),
    ("cached features: the unflipped view for a flipped image", "train.py", 'v[int(flip)] if k == "features"',
     'v[0] if k == "features"', [FCACHE]),
    ("cached features: the flipped view is the flipped features", "prepare.py", "for v in (x, x.flip(-1))[:views]]",
     "for v in (x, x)[:views]]", [FCACHE]),
    ("features stored as bfloat16-like (8 mantissa bits)", "prepare.py",
     'store["features"][rows] = torch.stack(z, 1).cpu().numpy().astype(fdtype)',
     'store["features"][rows] = torch.stack(z, 1).bfloat16().float().cpu().numpy().astype(fdtype)', [FCACHE]),
    ("cached features projected again", "train.py", "zt = self.proj(z0) if zt is None else zt",
     "zt = self.proj(z0) if zt is None else zt @ self.proj.P[:zt.shape[-1]]", [FCACHE]),
    ("PCA fingerprint ignores P", "train.py", "    for k in PCA_KEYS:\n        h.update(",
     "    for k in PCA_KEYS[:-1]:\n        h.update(", [FCACHE]),
    ("sampling seed ignored", "sample.py", "return [seeded_generator(seed, i) for i in indices]",
     "return [seeded_generator(0, i) for i in indices]", [CONV]),
    ("FID without the sqrtm term", "fid.py", "2 * np.trace(covmean)", "np.trace(covmean)", [FID]),
    ("FID covariance biased", "fid.py", "np.cov(", "np.cov(bias=True, m=", [FID]),
]


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated mutant numbers (default: all)")
    args = p.parse_args()
    chosen = [int(i) for i in args.only.split(",")] if args.only else range(len(MUTANTS))
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
