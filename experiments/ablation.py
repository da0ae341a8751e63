"""
CoReDi's co-evolution ablation: does learning the feature projection P jointly with the diffusion model collapse,
and does the recipe (stop-gradient target, batch norm, VF/Ortho/Cov regularizers) prevent it?

  python -m experiments.ablation                   # all variants, about 12 minutes on 2 CPU cores
  python -m experiments.ablation --steps 20        # a smoke run

Every variant trains the demo's model (train.py's demo preset: synthetic data, pixel space, tiny random encoder)
from the same seed for --steps steps, each a `python train.py` run of its own, then is rebuilt from its last.pt and
measured on held-out images (another seed of the synthetic set).
Writes <out>/ablation.md (the table), ablation.json, and the charts erank.png and std.png (effective rank and
smallest channel std of z~ over training).
"""
import argparse
import json
import os
import sys

import torch

import model as M
from experiments import run_script
from support.charts import chart
from support.cli import ArgumentParser, UserError, cli, nonneg_int, positive_int
from support.data import SyntheticImages
from support.frozen import make_encoder

NO_REG = ["--vf-weight", "0", "--ortho-weight", "0", "--cov-weight", "0"]
VARIANTS = {
    "redi": ["--mode", "redi"],
    "naive": ["--mode", "coredi", "--no-proj-sg", "--no-proj-bn", *NO_REG],
    "+sg": ["--mode", "coredi", "--proj-sg", "--no-proj-bn", *NO_REG],
    "+bn": ["--mode", "coredi", "--no-proj-sg", "--proj-bn", *NO_REG],
    "+sg+bn": ["--mode", "coredi", "--proj-sg", "--proj-bn", *NO_REG],
    "coredi": ["--mode", "coredi"],
    "coredi -VF": ["--mode", "coredi", "--vf-weight", "0"],
    "coredi -Ortho": ["--mode", "coredi", "--ortho-weight", "0"],
    "coredi -Cov": ["--mode", "coredi", "--cov-weight", "0"],
    "coredi +pca-scale": ["--mode", "coredi", "--proj-scale", "pca"],
}


# train.py's distribution of t per space (t in [0, 1], 0 = noise, 1 = data): JiT's logit-normal sigmoid(N(mean, std))
# in pixel space, SiT's uniform otherwise, then --time-shift (tests/test_ablation.py checks them against train.py).
LOGIT_NORMAL_T = {"pixel": (-0.8, 0.8)}


def fixed_noise(n, x_shape, z_shape, space, time_shift, seed):
    """The held-out noise, from one generator seeded by seed (every variant of the same shapes gets the same
    numbers): t (n,) from the space's training distribution, eps_x (n, *x_shape), eps_z (n, *z_shape)."""
    g = torch.Generator().manual_seed(seed)
    if space in LOGIT_NORMAL_T:
        mean, std = LOGIT_NORMAL_T[space]
        t = torch.sigmoid(mean + std * torch.randn(n, generator=g))
    else:
        t = torch.rand(n, generator=g)
    return M.shift_time(t, time_shift), torch.randn(n, *x_shape, generator=g), torch.randn(n, *z_shape, generator=g)


def plain_losses(dit, proj, enc_grid, prediction, x, y, z0, t, eps_x, eps_z):
    """The conditional flow-matching losses, without dropout or regularizers. t (B,) in [0, 1], 0 = noise. Image:
    x_t = t x + (1 - t) eps_x; features: z_t = t z + (1 - t) eps_z, z = z~ = proj(z0) in the model's layout
    (dit.features_in); each loss the mean squared error of the predicted velocity against x - eps (z - eps); the
    feature loss averaged per sample, then over the samples, as train.py sums it (equal to float precision).
    Returns (loss_x, loss_z) as tensors."""
    tx = t.view(-1, *[1] * (x.dim() - 1))
    x_t = tx * x + (1 - tx) * eps_x
    z = dit.features_in(proj(z0) * proj.stream_scale, enc_grid)
    tz = t.view(-1, *[1] * (z.dim() - 1))
    z_t = tz * z + (1 - tz) * eps_z
    out_x, out_z, _ = dit(x_t, t, y, z_t)
    loss_x = (M.to_velocity(out_x, x_t, t, prediction) - (x - eps_x)).pow(2).mean()
    loss_z = (M.to_velocity(out_z, z_t, t, prediction) - (z - eps_z)).pow(2).flatten(1).mean(1).mean()
    return loss_x, loss_z


def load_variant(ckpt_path):
    """A variant's trained (not EMA) DiT and its projection, rebuilt from last.pt's config, both in eval mode (batch
    norm with its running statistics); and the frozen encoder, which make_encoder rebuilds from the run's seed."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    encoder = make_encoder(argparse.Namespace(**cfg))
    dit = M.create_model(cfg["model"], **cfg["arch"])
    dit.load_state_dict(ckpt["model"])
    proj = M.build_projection(cfg["mode"], encoder.dim, cfg["feat_dim"], batchnorm=cfg["proj_bn"],
                              vf_map=cfg["vf_map"] if cfg["vf_weight"] else None,
                              scale=cfg.get("proj_scale", "unit"))
    proj.load_state_dict(ckpt["proj"])
    return cfg, encoder, dit.eval(), proj.eval()


def held_out_images(n_images, size, num_classes, seed):
    """n_images of the synthetic set's split seed, in [-1, 1], and their labels."""
    data = SyntheticImages(n_images, size, num_classes, seed=seed)
    img = torch.stack([data[i][0] for i in range(n_images)]).float() / 127.5 - 1
    return img, torch.tensor([data[i][1] for i in range(n_images)])


@torch.no_grad()
def held_out(ckpt_path, n_images, seed):
    """Rebuild a variant from its checkpoint and measure z~ and both losses on held-out synthetic images, with
    fixed noise (the same for every variant) and no dropout: the plain conditional losses."""
    cfg, encoder, dit, proj = load_variant(ckpt_path)
    img, y = held_out_images(n_images, cfg["image_size"], cfg["num_classes"], seed)
    z0 = encoder(img)
    std, erank = M.feature_stats(proj(z0))
    noise = fixed_noise(n_images, img.shape[1:], dit.z_shape, cfg["space"], cfg["time_shift"], seed)
    loss_x, loss_z = plain_losses(dit, proj, encoder.grid, cfg["prediction"], img, y, z0, *noise)
    return {"erank": erank, "std_min": std.min().item(), "loss_x": loss_x.item(), "loss_z": loss_z.item(),
            "d": cfg["feat_dim"]}


def main(argv=None):
    p = ArgumentParser(prog="python -m experiments.ablation", description=__doc__,
                       epilog="any other flag is passed to every train.py run")
    p.add_argument("--steps", type=positive_int, default=300, help="training steps per variant")
    p.add_argument("--batch", type=positive_int, default=32, help="global batch size of every variant")
    p.add_argument("--out", default="results/ablation", help="folder of the runs, the table and the charts")
    p.add_argument("--held-out", type=positive_int, default=256, help="held-out images")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of every run; held-out images use seed + 1")
    a, extra = p.parse_known_args(argv)  # extra flags go to every train.py run
    names = a.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(map(repr, unknown))}; --variants takes a comma-separated "
                          f"subset of: {', '.join(VARIANTS)}")
    out = os.path.abspath(a.out)  # train.py runs from the repository root
    runs = {name: name.replace(" ", "").replace("+", "p").replace("-", "m") for name in names}
    held = [r for r in runs.values() if os.path.isdir(os.path.join(a.out, r)) and os.listdir(os.path.join(a.out, r))]
    if held and not {"--restart", "--resume"} & set(extra):  # refused before the first variant trains, not after
        raise UserError(f"{a.out} already holds the runs {', '.join(held)}: pass --restart to start them over "
                          f"(the old files are moved aside), or another --out")
    rows = {}
    for name, run in runs.items():
        flags = VARIANTS[name] + ["--max-steps", str(a.steps), "--global-batch-size", str(a.batch), "--seed",
                                  str(a.seed), "--results-dir", out, "--run-name", run, "--sample-every", "0",
                                  "--ckpt-every", str(a.steps), "--log-every", str(max(1, a.steps // 30)),
                                  "--feat-drop", "0", "--num-workers", "0"] + extra
        print(f"=== {name}: python train.py {' '.join(flags)}", flush=True)
        run_script(f"variant '{name}' ({os.path.join(a.out, run)})", "train.py", flags)
        with open(os.path.join(a.out, run, "log.jsonl")) as f:
            log = [json.loads(line) for line in f if '"loss_x"' in line]
        rows[name] = {"train": {k: log[-1][k] for k in ("z_erank", "z_std_min", "loss_x", "loss_z")},
                      "held_out": held_out(os.path.join(a.out, run, "last.pt"), a.held_out, a.seed + 1),
                      "erank_curve": [(r["step"], r["z_erank"]) for r in log],
                      "std_curve": [(r["step"], r["z_std_min"]) for r in log], "run": run}
    d = next(iter(rows.values()))["held_out"]["d"]
    lines = [f"| variant | eff. rank (of {d}) | min channel std | image loss | feature loss | held-out eff. rank | "
             "held-out min std | held-out image loss | held-out feature loss |", "|---" * 9 + "|"]
    for name, r in rows.items():
        t, h = r["train"], r["held_out"]
        lines.append(f"| {name} | {t['z_erank']:.2f} | {t['z_std_min']:.3f} | {t['loss_x']:.4f} | "
                     f"{t['loss_z']:.4f} | {h['erank']:.2f} | {h['std_min']:.3f} | {h['loss_x']:.4f} | "
                     f"{h['loss_z']:.4f} |")
    table = "\n".join(lines)
    with open(os.path.join(a.out, "ablation.md"), "w") as f:
        cmd = " ".join(["python -m experiments.ablation", *(argv if argv is not None else sys.argv[1:])])
        f.write(f"`{cmd}`, {a.steps} steps, batch {a.batch}, seed {a.seed}; training columns: the last logging "
                f"window; held-out columns: {a.held_out} images of seed {a.seed + 1}, fixed noise, no dropout\n\n"
                f"{table}\n")
    with open(os.path.join(a.out, "ablation.json"), "w") as f:
        json.dump(rows, f, indent=1)
    chart({k: r["erank_curve"] for k, r in rows.items()}, f"effective rank of z~ over training (of d = {d})",
            "effective rank", ylim=(0, d * 1.05), size=(860, 420)).save(os.path.join(a.out, "erank.png"))
    chart({k: r["std_curve"] for k, r in rows.items()}, "smallest per-channel std of z~ over training (log scale)",
            "min channel std", log=True, size=(860, 420)).save(os.path.join(a.out, "std.png"))
    print(table)
    print(f"wrote {a.out}/ablation.md, ablation.json, erank.png, std.png")


if __name__ == "__main__":
    cli(main)
