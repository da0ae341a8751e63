"""ablation.py end to end at a tiny step count, and its diagnostics recomputed from the saved projections."""
import json

import torch

import ablation as A
import train as T


def test_ablation_runs_and_reports_what_the_projections_give(tmp_path):
    out = tmp_path / "abl"
    A.main(["--steps", "3", "--batch", "8", "--held-out", "16", "--out", str(out), "--variants", "redi,naive,coredi",
            "--synthetic", "64", "--pca-images", "16"])
    for f in ("ablation.md", "ablation.json", "erank.png", "std.png"):
        assert (out / f).stat().st_size > 0
    rows = json.loads((out / "ablation.json").read_text())
    assert list(rows) == ["redi", "naive", "coredi"]
    table = (out / "ablation.md").read_text()
    for name, r in rows.items():
        assert f"| {name} | {r['train']['z_erank']:.2f} |" in table
        # Recompute the held-out diagnostics independently from the checkpoint's projection.
        ckpt = torch.load(out / r["run"] / "last.pt", weights_only=True)
        cfg = ckpt["config"]
        args = T.get_args(["--mode", cfg["mode"], "--enc-weights", cfg["enc_weights"], "--enc-size", str(cfg["enc_size"]),
                           "--seed", str(cfg["seed"])])
        enc = T.make_encoder(args)
        P = ckpt["proj"]["P"]
        data = T.SyntheticImages(16, cfg["image_size"], cfg["num_classes"], seed=cfg["seed"] + 1)
        img = torch.stack([data[i][0] for i in range(16)]).float() / 127.5 - 1
        z = ((enc(img) - ckpt["proj"]["enc_mean"]) / ckpt["proj"]["enc_std"] - ckpt["proj"]["pca_mean"]) @ P
        if "bn.running_mean" in ckpt["proj"]:  # eval-mode batch norm, by hand
            z = (z - ckpt["proj"]["bn.running_mean"]) / torch.sqrt(ckpt["proj"]["bn.running_var"] + 1e-5)
        z = z.reshape(-1, z.shape[-1])
        s = torch.linalg.svdvals(z - z.mean(0))
        p = s / s.sum()
        erank = torch.exp(-(p * p.log()).sum()).item()
        assert abs(erank - r["held_out"]["erank"]) < 1e-3, name
        assert abs(z.std(0).min().item() - r["held_out"]["std_min"]) < 1e-4, name
    # the training columns are the last logged values of each run
    log = [json.loads(line) for line in open(out / rows["coredi"]["run"] / "log.jsonl")]
    assert rows["coredi"]["train"]["z_erank"] == log[-1]["z_erank"]
