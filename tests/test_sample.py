"""sample.py: samplers against exact flows, guidance algebra, seeding independent of world size and batch,
the ADM .npz, resume, errors, and the latent (VAE) path. CPU, offline, tiny models."""
import argparse
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402
from model import UserError, create_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# Samplers on a Gaussian data distribution, where the flow is known in closed form

def gaussian_velocity(m, s):
    """Exact velocity E[x - eps | x_t] for data x ~ N(m, s^2), x_t = t x + (1-t) eps. Its flow maps the noise
    x_0 to x_1 = m + s x_0, and the marginals are N(t m, t^2 s^2 + (1-t)^2)."""
    def v(x, t):
        return m + (t * s * s - (1 - t)) / (t * t * s * s + (1 - t) ** 2) * (x - t * m)
    return v


# Two streams with different statistics, so the samplers are checked on the joint state (x, z).
VX, VZ = gaussian_velocity(1.0, 0.5), gaussian_velocity(-2.0, 2.0)


def joint_v(state, t):
    return VX(state[0], t), VZ(state[1], t)


def ode_error(solver, steps):
    g = torch.Generator().manual_seed(0)
    x0, z0 = torch.randn(500, dtype=torch.float64, generator=g), torch.randn(500, dtype=torch.float64, generator=g)
    x, z = solver(joint_v, (x0, z0), steps)
    return max((x - (1 + 0.5 * x0)).abs().max().item(), (z - (-2 + 2 * z0)).abs().max().item())


def test_euler_first_order_heun_second_order():
    e = [ode_error(sample.euler_ode, n) for n in (16, 32, 64)]
    h = [ode_error(sample.heun_ode, n) for n in (16, 32, 64)]
    assert all(hi < ei / 10 for hi, ei in zip(h, e))  # Heun beats Euler at equal steps
    for a, b in zip(e, e[1:]):
        assert 1.8 < a / b < 2.2  # halving the step halves Euler's error
    for a, b in zip(h, h[1:]):
        assert 3.5 < a / b < 4.6  # ... and quarters Heun's
    assert h[-1] < 2e-3


def test_ode_without_feature_stream():
    x0 = torch.randn(100, dtype=torch.float64)
    x, z = sample.heun_ode(lambda st, t: (VX(st[0], t), None), (x0, None), 64)
    assert z is None and torch.allclose(x, 1 + 0.5 * x0, atol=2e-3)


def test_sde_matches_target_distribution():
    N, g = 20000, torch.Generator().manual_seed(1)
    state = (torch.randn(N, dtype=torch.float64, generator=g), torch.randn(N, dtype=torch.float64, generator=g))
    noise = lambda k: (torch.randn(N, dtype=torch.float64, generator=g), torch.randn(N, dtype=torch.float64, generator=g))
    x, z = sample.sde_euler_maruyama(joint_v, state, 250, noise)
    for got, m, s in ((x, 1.0, 0.5), (z, -2.0, 2.0)):
        assert abs(got.mean().item() - m) < 5 * s / N ** 0.5 + 0.01 * s
        assert abs(got.std().item() / s - 1) < 0.03
    # It is stochastic: the noise decorrelates the samples from their initial noise more than the ODE would.
    assert torch.corrcoef(torch.stack([x, state[0]]))[0, 1] < 0.9


# -----------------------------------------------------------------------------
# Guidance

class BranchStub(nn.Module):
    """Output tells the branches apart: +10 for the null label, +100 for a zero feature input."""
    num_classes, feat_dim, grid, in_channels, input_size = 10, 2, 2, 1, 2

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, t, y, z):
        self.batches.append(len(x))
        nl = (y == self.num_classes).float()
        nf = (z.flatten(1).abs().sum(1) == 0).float()
        off = 1 + 10 * nl + 100 * nf
        return x + off.view(-1, 1, 1, 1), z + 7 * off.view(-1, 1, 1), None


def stub_state(B=3):
    return torch.randn(B, 1, 2, 2), torch.randn(B, 4, 2)


def test_guidance_weight_one_is_no_guidance():
    m, (x, z), y = BranchStub(), stub_state(), torch.tensor([1, 2, 3])
    vx, vz = sample.guided_velocity(m, y, "v", cfg_scale=1.0, cfg_rep=1.0)((x, z), 0.5)
    assert m.batches == [3]  # no extra branch evaluated
    assert torch.equal(vx, x + 1) and torch.equal(vz, z + 7)


def test_combined_guidance_formula():
    m, (x, z), y = BranchStub(), stub_state(), torch.tensor([1, 2, 3])
    w_cfg, w_rep = 3.0, 2.5
    vx, vz = sample.guided_velocity(m, y, "v", cfg_scale=w_cfg, cfg_rep=w_rep)((x, z), 0.5)
    v_c, v_nolabel, v_nofeat = x + 1, x + 11, x + 101
    assert m.batches == [9]  # one batched forward of 3 branches
    assert torch.allclose(vx, v_c + (w_cfg - 1) * (v_c - v_nolabel) + (w_rep - 1) * (v_c - v_nofeat))
    v_c_z, v_nofeat_z = z + 7, torch.zeros_like(z) + 707  # the no-feature branch sees z = 0
    assert torch.allclose(vz, v_c_z + (w_rep - 1) * (v_c_z - v_nofeat_z))  # RG on the features too, no CFG
    # each guidance alone is the familiar form v_uncond + w (v_c - v_uncond)
    vx, _ = sample.guided_velocity(m, y, "v", cfg_rep=w_rep)((x, z), 0.5)
    assert torch.allclose(vx, v_nofeat + w_rep * (v_c - v_nofeat))
    vx, _ = sample.guided_velocity(m, y, "v", cfg_scale=w_cfg)((x, z), 0.5)
    assert torch.allclose(vx, v_nolabel + w_cfg * (v_c - v_nolabel))


def test_cfg_interval_skips_the_branch_outside():
    m, (x, z), y = BranchStub(), stub_state(), torch.tensor([1, 2, 3])
    v = sample.guided_velocity(m, y, "v", cfg_scale=4.0, cfg_interval=(0.3, 1.0))
    vx, _ = v((x, z), 0.1)
    assert torch.equal(vx, x + 1)
    v((x, z), 0.5)
    assert m.batches == [3, 6]


# -----------------------------------------------------------------------------
# Whole runs on a tiny pixel-space CoReDi checkpoint

def tiny_model(seed=0, **arch):
    arch = dict(dict(input_size=16, in_channels=3, num_classes=10, feat_dim=8), **arch)
    with torch.random.fork_rng():  # the same weights in every session: no test depends on the global seed
        torch.manual_seed(seed)
        model = create_model("DiT-T/4", **arch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # DiT's init outputs exactly zero: give every weight some signal
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, arch


def save_ckpt(path, mode="coredi", space="pixel", feat_drop=0.2, **arch):
    model, arch = tiny_model(**arch)
    sd = model.state_dict()
    config = dict(mode=mode, space=space, model="DiT-T/4", arch=arch, prediction="x" if space == "pixel" else "v",
                  image_size=arch["input_size"] * (8 if space == "latent" else 1), feat_drop=feat_drop,
                  vae_weights="random" if space == "latent" else None, num_classes=arch["num_classes"])
    torch.save(dict(model=sd, ema=sd, config=config, step=100), path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_ckpt(tmp_path_factory.mktemp("ckpt") / "last.pt")


FAST = ["--steps", "2", "--cfg-scale", "2", "--cfg-rep", "1.5", "--seed", "5"]


def load_npz(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_grid(ckpt, tmp_path, capsys):
    out = tmp_path / "grid.png"
    sample.main(["--ckpt", ckpt, "--n", "5", "--classes", "1,2", "--out", str(out), "--save-features"] + FAST)
    assert str(out) in capsys.readouterr().out
    assert Image.open(out).size == (3 * 66 + 2, 2 * 66 + 2)  # 5 images of 16 px, zoomed to 64, in 3 columns
    assert np.load(tmp_path / "grid_features.npy").shape == (5, 16, 8)


def test_without_ckpt_the_newest_run_is_sampled(tmp_path, capsys):
    results = tmp_path / "results"
    old, new = results / "new-name" / "last.pt", results / "old-name" / "deeper" / "last.pt"
    for path, mtime in ((old, 1_000_000), (new, 2_000_000)):  # written in the other order: mtime decides
        path.parent.mkdir(parents=True)
        save_ckpt(path)
        os.utime(path, (mtime, mtime))
    sample.main(["--results-dir", str(results), "--n", "2", "--steps", "1", "--cfg-rep", "1.5"])
    out = capsys.readouterr().out
    assert f"is {new}" in out
    assert (new.parent / "grid_step100_cfg1.0_rep1.5_seed0.png").is_file()
    assert not list(old.parent.glob("*.png"))
    msg = run_error(["--results-dir", str(tmp_path / "empty")])
    assert msg.startswith("error: no --ckpt given and no last.pt under") and "\n" not in msg


def test_noise_depends_only_on_seed_and_index():
    shapes = ((3, 4, 4), (16, 8))
    every = torch.arange(6)
    y_all, (x_all, z_all) = sample.draw_labels(0, every, 10), sample.draw_noise(0, every, 1, shapes)
    idx = [4, 1]
    y, (x, z) = sample.draw_labels(0, torch.tensor(idx), 10), sample.draw_noise(0, torch.tensor(idx), 1, shapes)
    assert torch.equal(y, y_all[idx]) and torch.equal(x, x_all[idx]) and torch.equal(z, z_all[idx])
    assert sample.draw_labels(0, torch.tensor(idx), 10, classes=[7]).tolist() == [7, 7]
    # every draw, stream and seed is its own noise
    later, other_seed = sample.draw_noise(0, every, 2, shapes), sample.draw_noise(1, every, 1, shapes)
    for a in (later[0], other_seed[0], z_all.flatten(1)[:, :48].reshape(6, 3, 4, 4)):
        assert (a - x_all).abs().min() > 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_seeds_on_one_and_two_processes(ckpt, tmp_path):
    # Equal seeds give equal samples and different seeds different ones, on 1 process and on 2 (gloo). Batches of
    # one: a batch of another size may round the network's floats differently (one pixel level, now and then), while
    # the noise's independence of the batch is exact (test_noise_depends_only_on_seed_and_index).
    common = ["--ckpt", ckpt, "--num-samples", "6", "--batch-size", "1", "--sampler", "sde"] + FAST[:-2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the single-threaded workers, for bit-equal floats
    try:
        for seed in (5, 6):
            sample.main(common + ["--seed", str(seed), "--out", str(tmp_path / f"one{seed}")])
    finally:
        torch.set_num_threads(threads)
    # The two ranks as torchrun would start them (env:// rendezvous), without torchrun's own process; both seeds in
    # one pair of processes, each run with its own rendezvous port.
    script = ("import os, sys\nimport sample\n"
              "for seed, port in ((5, sys.argv[1]), (6, sys.argv[2])):\n"
              "    os.environ['MASTER_PORT'] = port\n"
              f"    sample.main({common!r} + ['--seed', str(seed), '--out', {str(tmp_path)!r} + f'/two{{seed}}'])\n")
    ports = [str(free_port()), str(free_port())]
    procs = [subprocess.Popen([sys.executable, "-c", script, *ports],
                              env=dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", WORLD_SIZE="2",
                                       RANK=str(r), LOCAL_RANK=str(r), PYTHONPATH=ROOT),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    for p in procs:
        log = p.communicate(timeout=180)[0]
        assert p.returncode == 0, log[-3000:]
    got = {k: load_npz(tmp_path / f"{k}.npz") for k in ("one5", "one6", "two5", "two6")}
    for seed in (5, 6):
        assert np.array_equal(got[f"one{seed}"]["arr_0"], got[f"two{seed}"]["arr_0"])
        assert np.array_equal(got[f"one{seed}"]["arr_1"], got[f"two{seed}"]["arr_1"])
    for n in ("one", "two"):
        assert not np.array_equal(got[f"{n}5"]["arr_0"], got[f"{n}6"]["arr_0"])
    assert not np.array_equal(got["one5"]["arr_0"][0], got["one6"]["arr_0"][0])  # sample by sample, not a shuffle


def test_npz_layout_and_resume(ckpt, tmp_path, monkeypatch):
    args = ["--ckpt", ckpt, "--num-samples", "5", "--batch-size", "2", "--steps", "2", "--seed", "3"]
    sample.main(args + ["--out", str(tmp_path / "fresh")])
    fresh = load_npz(tmp_path / "fresh.npz")
    assert sorted(fresh) == ["arr_0", "arr_1"]
    assert fresh["arr_0"].dtype == np.uint8 and fresh["arr_0"].shape == (5, 16, 16, 3)
    assert fresh["arr_1"].dtype == np.int64 and fresh["arr_1"].shape == (5,)
    assert fresh["arr_0"].std() > 0

    # Interrupt a run after its first batch, then resume it.
    real, calls = sample.generate, []

    def interrupted(model, idx, *rest, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(list(idx))
        return real(model, idx, *rest, **kw)
    monkeypatch.setattr(sample, "generate", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(SystemExit) as e:  # Ctrl-C: one line that says how to finish
        sample.main(args + ["--out", str(out)])
    assert str(e.value.code) == f"error: interrupted: 2 of 5 samples are in {out}; run the same command again to finish the rest"
    done = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out) if p.endswith(".png")}
    assert sorted(done) == ["000000.png", "000001.png"]

    calls.clear()
    monkeypatch.setattr(sample, "generate", lambda m, idx, *r, **kw: calls.append(list(idx)) or real(m, idx, *r, **kw))
    sample.main(args + ["--out", str(out)])
    assert calls == [[2, 3], [4]]  # only the missing samples, the last batch short
    assert all(os.stat(out / p).st_mtime_ns == t for p, t in done.items())
    resumed = load_npz(tmp_path / "resumed.npz")
    assert np.array_equal(resumed["arr_0"], fresh["arr_0"]) and np.array_equal(resumed["arr_1"], fresh["arr_1"])


def run_error(args, capsys=None):
    with pytest.raises(SystemExit) as e:
        sample.main(args)
    return str(e.value.code)


def test_clear_errors(ckpt, tmp_path):
    assert run_error(["--ckpt", str(tmp_path / "nope.pt")]).startswith("error: checkpoint")
    assert "trained with --mode coredi" in run_error(["--ckpt", ckpt, "--mode", "redi"])
    assert "--num-samples" in run_error(["--ckpt", ckpt, "--num-samples", "0"])
    out = str(tmp_path / "s")
    sample.main(["--ckpt", ckpt, "--num-samples", "2", "--steps", "2", "--out", out])
    msg = run_error(["--ckpt", ckpt, "--num-samples", "2", "--steps", "2", "--out", out, "--seed", "1"])
    assert "other settings" in msg and "seed" in msg and "steps" not in msg
    no_drop = save_ckpt(tmp_path / "nodrop.pt", feat_drop=0.0)
    assert "feature dropout" in run_error(["--ckpt", no_drop, "--cfg-rep", "1.5"])
    sit = save_ckpt(tmp_path / "sit.pt", mode="sit", feat_dim=0)
    assert "feature dropout" in run_error(["--ckpt", sit, "--cfg-rep", "1.5"])
    bare = tmp_path / "bare.pt"
    torch.save(tiny_model()[0].state_dict(), bare)
    assert "neither SiT's (4) nor ReDi's" in run_error(["--ckpt", str(bare)])


def test_bare_sit_state_dict(tmp_path):
    model, _ = tiny_model(input_size=8, in_channels=4, num_classes=1000, feat_dim=0)
    torch.save(model.state_dict(), tmp_path / "SiT.pt")
    a = argparse.Namespace(raw=False, mode=None)
    loaded, cfg = sample.load_checkpoint(str(tmp_path / "SiT.pt"), a)  # the architecture is read off the shapes
    assert cfg["space"] == "latent" and cfg["prediction"] == "v" and loaded.input_size == 8
    assert (cfg["model"], cfg["mode"], cfg["image_size"]) == ("SiT-T/4", "sit", 64)
    assert torch.equal(loaded.final_layer.linear.weight, model.final_layer.linear.weight)
    with pytest.raises(UserError, match="--mode"):
        sample.load_checkpoint(str(tmp_path / "SiT.pt"), argparse.Namespace(**dict(vars(a), mode="redi")))


def test_latent_space_decodes_with_the_vae(tmp_path):
    ckpt = save_ckpt(tmp_path / "latent.pt", space="latent", input_size=8, in_channels=4)
    out = tmp_path / "grid.png"
    sample.main(["--ckpt", ckpt, "--n", "1", "--steps", "2", "--out", str(out)])  # default sampler: sde
    assert Image.open(out).size == (66 + 2, 66 + 2)  # a 64x64 image from 8x8 latents (the CPU VAE is slow)


def test_run_uses_sits_cfg_rule_and_the_ft_ema_decoder(tmp_path, monkeypatch):
    # A released SiT checkpoint samples with its own CFG rule (3 channels); a latent-space run trained on ft-mse
    # latents decodes with ft-ema, as SiT's, REPA's and ReDi's samplers do; --cfg-channels overrides the rule.
    seen, vaes = [], []
    monkeypatch.setattr(sample, "generate", lambda m, idx, *a, **kw: seen.append(kw) or
                        (np.zeros((len(idx), 8, 8, 3), np.uint8), torch.zeros(len(idx), dtype=torch.long), None))

    class FakeVAE(nn.Module):
        def __init__(self, weights=None):
            super().__init__()
            vaes.append(weights)
    monkeypatch.setattr(sample, "VAE", FakeVAE)
    torch.save({"ema": create_model("SiT-T/2", input_size=8, in_channels=4, num_classes=10).state_dict()},
               tmp_path / "sit.pt")  # a released-format SiT: a bare state_dict, no config
    sample.main(["--ckpt", str(tmp_path / "sit.pt"), "--cfg-scale", "1.5", "--n", "2", "--out", str(tmp_path / "a.png")])
    sample.main(["--ckpt", str(tmp_path / "sit.pt"), "--cfg-scale", "1.5", "--n", "2", "--cfg-channels", "4",
                 "--out", str(tmp_path / "b.png")])
    path = save_ckpt(tmp_path / "redi.pt", mode="redi", space="latent", input_size=8, in_channels=4)
    ck = torch.load(path, weights_only=True)
    ck["config"]["vae_weights"] = "stabilityai/sd-vae-ft-mse"
    torch.save(ck, path)
    sample.main(["--ckpt", path, "--cfg-scale", "1.5", "--n", "2", "--out", str(tmp_path / "c.png")])
    assert [kw["cfg_channels"] for kw in seen] == [3, 4, None]
    assert vaes == ["stabilityai/sd-vae-ft-ema"] * 3
