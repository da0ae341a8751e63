"""
CoReDi's co-evolution ablation: does learning the feature projection P jointly with the diffusion model collapse,
and does the recipe (stop-gradient target, batch norm, VF/Ortho/Cov regularizers) prevent it?

  python ablation.py                   # all variants, about 12 minutes on 2 CPU cores
  python ablation.py --steps 20        # a smoke run

Every variant trains the demo's model (train.py's demo preset: synthetic data, pixel space, tiny random encoder)
from the same seed for --steps steps, then is measured on held-out images (another seed of the synthetic set).
Writes <out>/ablation.md (the table), ablation.json, and the charts erank.png and std.png (effective rank and
smallest channel std of z~ over training).
"""
import argparse
import json
import os
import sys

import torch

import model as M
import train as T

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
}


@torch.no_grad()
def held_out(ckpt_path, n_images, seed):
    """Rebuild a variant from its checkpoint and measure z~ and both losses on held-out synthetic images, with
    fixed noise (the same for every variant) and no dropout: the plain conditional losses."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    args = argparse.Namespace(**ckpt["config"])
    encoder = T.make_encoder(args)
    dit, _, proj, _ = T.build_networks(args, encoder.dim)
    dit.load_state_dict(ckpt["model"])
    proj.load_state_dict(ckpt["proj"])
    dit.eval(), proj.eval()  # batch norm with its running statistics
    data = T.SyntheticImages(n_images, args.image_size, args.num_classes, seed=seed)
    img = torch.stack([data[i][0] for i in range(n_images)]).float() / 127.5 - 1
    y = torch.tensor([data[i][1] for i in range(n_images)])
    z0 = encoder(img)
    std, erank = M.feature_stats(proj(z0))
    noise = T.step_noise(seed, 0, range(n_images), tuple(img.shape[1:]), (dit.grid ** 2, args.feat_dim),
                         space=args.space)
    _, logs = T.make_loss(dit, proj, encoder.grid, args)(img, y, z0, noise)
    return {"erank": erank, "std_min": std.min().item(), "loss_x": logs["loss_x"].item(), "loss_z": logs["loss_z"].item(),
            "d": args.feat_dim}


def main(argv=None):
    p = M.ArgumentParser(description=__doc__, epilog="any other flag is passed to every train.py run")
    p.add_argument("--steps", type=M.positive_int, default=300, help="training steps per variant")
    p.add_argument("--batch", type=M.positive_int, default=32, help="global batch size of every variant")
    p.add_argument("--out", default="results/ablation", help="folder of the runs, the table and the charts")
    p.add_argument("--held-out", type=M.positive_int, default=256, help="held-out images")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--seed", type=M.nonneg_int, default=0, help="seed of every run; held-out images use seed + 1")
    a, extra = p.parse_known_args(argv)  # extra flags go to every train.py run
    names = a.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise M.UserError(f"unknown variant(s) {', '.join(map(repr, unknown))}; --variants takes a comma-separated "
                          f"subset of: {', '.join(VARIANTS)}")
    runs = {name: name.replace(" ", "").replace("+", "p").replace("-", "m") for name in names}
    held = [r for r in runs.values() if os.path.isdir(os.path.join(a.out, r)) and os.listdir(os.path.join(a.out, r))]
    if held and not {"--restart", "--resume"} & set(extra):  # refused before the first variant trains, not after
        raise M.UserError(f"{a.out} already holds the runs {', '.join(held)}: pass --restart to start them over "
                          f"(the old files are moved aside), or another --out")
    rows = {}
    for name, run in runs.items():
        flags = VARIANTS[name] + ["--max-steps", str(a.steps), "--global-batch-size", str(a.batch), "--seed",
                                  str(a.seed), "--results-dir", a.out, "--run-name", run, "--sample-every", "0",
                                  "--ckpt-every", str(a.steps), "--log-every", str(max(1, a.steps // 30)),
                                  "--feat-drop", "0", "--num-workers", "0"] + extra
        print(f"=== {name}: train.py {' '.join(flags)}")
        T.main(T.get_args(flags))
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
        lines.append(f"| {name} | {t['z_erank']:.2f} | {t['z_std_min']:.3f} | {t['loss_x']:.4f} | {t['loss_z']:.4f} | "
                     f"{h['erank']:.2f} | {h['std_min']:.3f} | {h['loss_x']:.4f} | {h['loss_z']:.4f} |")
    table = "\n".join(lines)
    with open(os.path.join(a.out, "ablation.md"), "w") as f:
        f.write(f"`python ablation.py {' '.join(argv if argv is not None else sys.argv[1:])}`, {a.steps} steps, "
                f"batch {a.batch}, seed {a.seed}; training columns: the last logging window\n\n{table}\n")
    with open(os.path.join(a.out, "ablation.json"), "w") as f:
        json.dump(rows, f, indent=1)
    T.chart({k: r["erank_curve"] for k, r in rows.items()}, f"effective rank of z~ over training (of d = {d})",
            "effective rank", ylim=(0, d * 1.05), size=(860, 420)).save(os.path.join(a.out, "erank.png"))
    T.chart({k: r["std_curve"] for k, r in rows.items()}, "smallest per-channel std of z~ over training (log scale)",
            "min channel std", log=True, size=(860, 420)).save(os.path.join(a.out, "std.png"))
    print(table)
    print(f"wrote {a.out}/ablation.md, ablation.json, erank.png, std.png")


if __name__ == "__main__":
    M.cli(main)
