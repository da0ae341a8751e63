"""ablation.py end to end at a tiny step count, its diagnostics recomputed from the saved projections, and its
held-out losses pinned to train.py's JointLoss (the script trains through `python train.py`, never imports it)."""
import json

import pytest
import torch

from experiments import ablation as A
import model as M
import train as T
from support.data import SyntheticImages
from support.frozen import make_encoder


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation") / "abl"
    A.main(["--steps", "3", "--batch", "8", "--held-out", "16", "--out", str(out), "--variants", "redi,naive,coredi",
            "--synthetic", "64", "--pca-images", "16"])
    return out


def test_ablation_runs_and_reports_what_the_projections_give(out):
    for f in ("ablation.md", "ablation.json", "erank.png", "std.png"):
        assert (out / f).stat().st_size > 0
    rows = json.loads((out / "ablation.json").read_text())
    assert list(rows) == ["redi", "naive", "coredi"]
    table = (out / "ablation.md").read_text()
    assert table.startswith("`python -m experiments.ablation --steps 3 --batch 8")
    for name, r in rows.items():
        assert f"| {name} | {r['train']['z_erank']:.2f} |" in table
        assert set(r["held_out"]) == {"erank", "std_min", "loss_x", "loss_z", "d"}
        # Recompute the held-out diagnostics independently from the checkpoint's projection.
        ckpt = torch.load(out / r["run"] / "last.pt", weights_only=True)
        cfg = ckpt["config"]
        args = T.get_args(["--mode", cfg["mode"], "--enc-weights", cfg["enc_weights"], "--enc-size",
                           str(cfg["enc_size"]), "--seed", str(cfg["seed"])])
        enc = make_encoder(args)
        P = ckpt["proj"]["P"]
        data = SyntheticImages(16, cfg["image_size"], cfg["num_classes"], seed=cfg["seed"] + 1)
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


def joint_loss(dit, proj, enc_grid, cfg, x, y, z0, t, eps_x, eps_z):
    """train.py's JointLoss on these inputs with no label or feature dropout and zero regularizer weights."""
    loss = T.JointLoss(dit, proj, enc_grid, cfg["prediction"], lambda_z=cfg["lambda_z"], proj_sg=cfg["proj_sg"],
                       vf_weight=0.0, ortho_weight=0.0, cov_weight=0.0, repa_weight=cfg["repa_weight"])
    none = torch.zeros(len(t), dtype=torch.bool)
    noise = T.Noise(t, none, none, eps_x, eps_z, None)
    return loss(x, y, z0, noise)[1]


@pytest.mark.parametrize("variant", ["redi", "naive", "coredi"])
def test_held_out_losses_are_train_py_joint_loss(out, variant):
    rows = json.loads((out / "ablation.json").read_text())
    path = out / rows[variant]["run"] / "last.pt"
    cfg, encoder, dit, proj = A.load_variant(path)
    assert not dit.training and not proj.training
    ckpt = torch.load(path, weights_only=True)
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in ckpt["model"].items())  # the trained weights
    # held_out's own inputs: the held-out images of seed + 1 and its fixed noise ...
    img, y = A.held_out_images(16, cfg["image_size"], cfg["num_classes"], cfg["seed"] + 1)
    noise = A.fixed_noise(16, img.shape[1:], dit.z_shape, cfg["space"], cfg["time_shift"], cfg["seed"] + 1)
    with torch.no_grad():
        z0 = encoder(img)
        ours = A.plain_losses(dit, proj, encoder.grid, cfg["prediction"], img, y, z0, *noise)
        logs = joint_loss(dit, proj, encoder.grid, cfg, img, y, z0, *noise)
    # ... give JointLoss's losses, and held_out reports exactly those
    assert torch.allclose(ours[0], logs["loss_x"], rtol=0, atol=1e-6)
    assert torch.allclose(ours[1], logs["loss_z"], rtol=0, atol=1e-6)
    assert rows[variant]["held_out"]["loss_x"] == pytest.approx(ours[0].item(), rel=0, abs=1e-6)
    assert rows[variant]["held_out"]["loss_z"] == pytest.approx(ours[1].item(), rel=0, abs=1e-6)
    # on other inputs too: another t and noise, and the latent space's channel layout of the features
    g = torch.Generator().manual_seed(5)
    t, eps_x, eps_z = torch.rand(16, generator=g), torch.randn(img.shape, generator=g), torch.randn(16, *dit.z_shape,
                                                                                                     generator=g)
    with torch.no_grad():
        ours = A.plain_losses(dit, proj, encoder.grid, cfg["prediction"], img, y, z0, t, eps_x, eps_z)
        logs = joint_loss(dit, proj, encoder.grid, cfg, img, y, z0, t, eps_x, eps_z)
    assert torch.allclose(torch.stack(ours), torch.stack([logs["loss_x"], logs["loss_z"]]), rtol=0, atol=1e-6)


def test_held_out_losses_in_latent_space_are_joint_loss():
    # ReDi's channel fusion and velocity prediction (the ablation's runs are pixel space, x-prediction)
    torch.manual_seed(0)
    dit = M.create_model("DiT-T/2", input_size=8, in_channels=4, num_classes=4, feat_dim=8, fusion="channels").eval()
    proj = M.build_projection("coredi", 16, 8).eval()
    with torch.no_grad():
        for p in dit.parameters():  # DiT's zero-initialised layers would make every output 0
            p.add_(0.02 * torch.randn_like(p))
        proj.P.copy_(torch.randn(16, 8))
    x, y, z0 = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 4]), torch.randn(3, 16, 16)
    t, eps_x, eps_z = A.fixed_noise(3, x.shape[1:], dit.z_shape, "latent", 1.0, 7)
    cfg = dict(prediction="v", lambda_z=1.0, proj_sg=True, repa_weight=0.5)
    with torch.no_grad():
        ours = A.plain_losses(dit, proj, (4, 4), "v", x, y, z0, t, eps_x, eps_z)
        logs = joint_loss(dit, proj, (4, 4), cfg, x, y, z0, t, eps_x, eps_z)
    assert ours[0].item() > 0 and ours[1].item() > 0
    assert torch.allclose(torch.stack(ours), torch.stack([logs["loss_x"], logs["loss_z"]]), rtol=0, atol=1e-6)


def test_held_out_noise_follows_train_py_time_distribution():
    # the constants ablation.py keeps of train.py's t distribution are train.py's
    assert A.LOGIT_NORMAL_T == {"pixel": (T.JIT_T_MEAN, T.JIT_T_STD)}
    assert T.SPACES["pixel"]["prediction"] == "x" and T.SPACES["latent"]["prediction"] == "v"
    a = A.fixed_noise(4000, (3, 2, 2), (4, 8), "pixel", 1.0, 1)
    b = A.fixed_noise(4000, (3, 2, 2), (4, 8), "pixel", 1.0, 1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # fixed: the same for every variant
    logit = torch.logit(a[0])
    assert abs(logit.mean().item() - T.JIT_T_MEAN) < 0.05 and abs(logit.std().item() - T.JIT_T_STD) < 0.05
    u = A.fixed_noise(4000, (3, 2, 2), (4, 8), "latent", 1.0, 1)[0]
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.02
    shifted = A.fixed_noise(4000, (3, 2, 2), (4, 8), "latent", 0.4, 1)[0]
    assert torch.allclose(shifted, M.shift_time(u, 0.4))
