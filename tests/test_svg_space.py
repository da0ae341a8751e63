"""--space svg: SVG's time shift and sampling grid, training and exact resume on the SVG latent, the SVG latent cache,
sampling through the autoencoder, and SVG's own DiT checkpoints (key manifest and golden forward from its code)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import model as M
import prepare as P
import sample as S
import svg_ae as A
import train as T
from support.cli import cli
from support.data import LatentCache, SyntheticImages
from support.released import from_svg, load_dit_state_dict, load_released

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
# A tiny untrained SVG autoencoder: 16-px images, patch 4 -> a 4x4 grid of 64 DINO + 4 residual channels.
TINY_AE = dict(dino=A.DINO3, dino_weights="tiny", image_size=16, patch_size=4, res_depth=1, res_width=32, res_heads=2,
               res_channels=4, res_dropout=0.0, dec_channels="16,16,16", dec_layers=1, dec_groups=8, seed=0)


@pytest.fixture(scope="module")
def ae_path(tmp_path_factory):
    torch.manual_seed(0)
    ae = A.build_autoencoder(TINY_AE)
    path = str(tmp_path_factory.mktemp("ae") / "last.pt")
    torch.save({"residual": ae.residual.state_dict(), "decoder": ae.decoder.state_dict(), "config": TINY_AE}, path)
    return path


def flags(ae_path, tmp_path, name, *more):
    return T.get_args(["--preset", "svg", "--space", "svg", "--svg-ae", ae_path, "--image-size", "16", "--model", "DiT-T/1",
                       "--synthetic", "64", "--num-classes", "4", "--global-batch-size", "8", "--num-workers", "0",
                       "--log-every", "1", "--sample-every", "0", "--ckpt-every", "1000", "--keep-every", "0",
                       "--stats-images", "40", "--lr", "1e-3", "--warmup-steps", "0", "--seed", "3",
                       "--enc-weights", "tiny", "--enc-size", "56", "--results-dir", str(tmp_path), "--run-name", name]
                      + [str(f) for f in more])


def params(m):
    return torch.cat([p.detach().flatten() for p in m.state_dict().values() if p.is_floating_point()])


def test_time_shift_and_sampling_grid_follow_svgs_formulas():
    # training, s = 0.4: t -> 0.4 t / (1 - 0.6 t), by hand
    assert M.shift_time(0.5, 0.4) == pytest.approx(0.2 / 0.7, abs=1e-12)
    assert M.shift_time(0.25, 0.4) == pytest.approx(0.1 / 0.85, abs=1e-12)
    assert (M.shift_time(0.0, 0.4), M.shift_time(1.0, 0.4)) == (0.0, 1.0)
    plain = T.step_noise(0, 5, range(6), 6, (2, 2, 2), space="svg")
    shifted = T.step_noise(0, 5, range(6), 6, (2, 2, 2), space="svg", time_shift=0.4)
    assert torch.allclose(shifted.t, 0.4 * plain.t / (1 - 0.6 * plain.t))
    assert torch.equal(shifted.eps_x, plain.eps_x)
    # sampling, 25 Euler steps on linspace(0, 1, 26) shifted with s = 0.15: 0.15 u / (1 - 0.85 u), by hand
    ts = S.time_grid(25, 0.15)
    assert len(ts) == 26 and ts[0] == 0 and ts[-1] == pytest.approx(1.0)
    for k, want in ((1, 0.006 / 0.966), (12, 0.072 / 0.592), (24, 0.144 / 0.184)):
        assert ts[k] == pytest.approx(want, rel=1e-6)
    seen = []
    S.euler_ode(lambda st, t: (seen.append(t), (torch.ones(1), None))[1], (torch.zeros(1), None), 25, 0.15)
    assert seen == pytest.approx(ts[:-1])
    assert S.default_sampler("svg") == dict(sampler="euler", steps=25, time_shift=0.15)


def test_svg_preset_is_svgs_recipe(ae_path):
    a = T.get_args(["--space", "svg", "--svg-ae", ae_path, "--data-path", "/imagenet/train"])
    assert (a.preset, a.mode, a.model, a.qk_norm, a.time_shift) == ("svg", "sit", "SiT-XL/1", True, 0.4)
    assert (a.lr, a.beta2, a.weight_decay, a.global_batch_size, a.warmup_epochs) == (1e-4, 0.999, 0.0, 256, 0)
    assert (a.grad_clip, a.flip, a.ema, a.label_drop, T.derive(a).prediction) == (0.0, True, 0.9999, 0.1, "v")
    assert T.get_args(["--space", "svg"]).preset == "demo-svg"


@pytest.mark.parametrize("mode", ["redi", "coredi"])
def test_redi_and_coredi_are_refused_in_svg_space_in_one_line(mode, ae_path, tmp_path):
    with pytest.raises(M.UserError, match="SVG's latent already is the encoder's feature map") as e:
        flags(ae_path, tmp_path, "x", "--mode", mode)
    assert "\n" not in str(e.value)  # cli prints it as one line


def test_svg_train_resume_is_exact_and_samples_through_the_autoencoder(ae_path, tmp_path):
    common = ["--mode", "repa"]
    dit_a, ema_a, _ = T.main(flags(ae_path, tmp_path, "straight", *common, "--max-steps", 6))
    T.main(flags(ae_path, tmp_path, "resumed", *common, "--max-steps", 3, "--ckpt-every", 3))
    dit_b, ema_b, _ = T.main(flags(ae_path, tmp_path, "resumed", *common, "--max-steps", 6, "--resume"))
    assert torch.equal(params(dit_a), params(dit_b)) and torch.equal(params(ema_a), params(ema_b))
    ckpt = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    cfg = ckpt["config"]
    assert (cfg["arch"]["in_channels"], cfg["arch"]["input_size"], cfg["arch"]["qk_norm"]) == (68, 4, True)
    assert cfg["time_shift"] == 0.4 and cfg["grad_clip"] == 0.0 and cfg["flip"] and cfg["ema"] == 0.9999  # SVG's
    assert ckpt["svg_stats"]["std"].shape == (68,) and (ckpt["svg_stats"]["std"] > 0).all()
    with open(tmp_path / "resumed" / "log.jsonl") as f:
        assert all(np.isfinite(json.loads(line)["repa"]) for line in f)
    out = tmp_path / "grid.png"
    S.main(["--ckpt", str(tmp_path / "resumed" / "last.pt"), "--n", "4", "--steps", "3", "--out", str(out)])
    assert np.asarray(Image.open(out)).shape == (2 * 66 + 2, 2 * 66 + 2, 3)  # 16 px samples shown at 64 px


def test_svg_cache_is_batch_fixed_and_trains(ae_path, tmp_path):
    data = SyntheticImages(40, 16, num_classes=2)
    for i in range(len(data)):
        img, c = data[i]
        os.makedirs(tmp_path / "imgs" / f"c{c}", exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "imgs" / f"c{c}" / f"{i:03d}.png")
    P.main(P.get_args(["--space", "svg", "--svg-ae", ae_path, "--data-path", str(tmp_path / "imgs"), "--out",
                       str(tmp_path / "cache"), "--image-size", "16", "--num-workers", "0", "--dtype", "float32",
                       "--flip"]))  # SVG's recipe flips: the mirror images are encoded too
    meta = json.load(open(tmp_path / "cache" / "meta.json"))
    assert meta["space"] == "svg" and meta["encode_chunk"] == 32
    cached = np.load(tmp_path / "cache" / "latents.npy")
    images = torch.from_numpy(np.load(tmp_path / "cache" / "images.npy")).permute(0, 3, 1, 2).float() / 127.5 - 1
    ae = A.load_autoencoder(ae_path)
    want = torch.cat([ae.encode(images[:32]), ae.encode(images[32:])])  # chunks of 32 in file order
    assert np.allclose(cached, want.numpy(), atol=1e-5)
    assert not torch.allclose(ae.encode(images[30:34]), want[30:34], atol=1e-3)  # another batch, another latent
    flipped = torch.cat([ae.encode(images[:32].flip(-1)), ae.encode(images[32:].flip(-1))])  # in the same chunks
    assert np.allclose(np.load(tmp_path / "cache" / "latents_flipped.npy"), flipped.numpy(), atol=1e-5)
    T.main(flags(ae_path, tmp_path, "cached", "--mode", "sit", "--latent-cache", str(tmp_path / "cache"),
                 "--num-classes", "2", "--max-steps", 2))
    with pytest.raises(M.UserError, match="holds svg latents"):
        LatentCache(str(tmp_path / "cache"), 16, None, "latent")


def test_svg_dit_checkpoint_loads_strictly_from_the_manifest():
    man = json.load(open(os.path.join(FIX, "svg_dit_keys.json")))
    with torch.device("meta"):
        svg_sd = {k: torch.empty(shape) for k, shape in man["keys"].items()}
        ours = M.create_model("SiT-XL/1", input_size=16, in_channels=392, qk_norm=True)
        load_dit_state_dict(ours, from_svg(svg_sd))
    assert man["num_parameters"] == 676_437_904  # SVG-XL with learn_sigma's 784 outputs, as SVG counts it
    assert sum(v.numel() for v in svg_sd.values()) == 676_437_904  # no buffers: pos_embed is a frozen parameter
    assert sum(p.numel() for p in ours.parameters()) == 676_437_904 - (1152 * 392 + 392)  # 675,985,928: no sigma
    assert {"blocks.27.attn.q_norm.weight", "blocks.27.attn.k_norm.bias"} <= ours.state_dict().keys()


def test_golden_forward_of_svgs_dit():
    f = torch.load(os.path.join(FIX, "svg_dit_tiny.pt"), weights_only=True)
    model, cfg = load_released(f["ema"], num_heads=f["num_heads"])
    assert cfg["space"] == "svg" and cfg["arch"]["qk_norm"]
    x = f["x"]  # SVG's input: tokens (B, 256, C), row-major on the 16x16 grid
    B, L, C = x.shape
    out, _, _ = model(x.transpose(1, 2).reshape(B, C, 16, 16), f["t"], f["y"])
    want = f["out"][..., :C]  # learn_sigma: SVG keeps the first C of 2C outputs
    assert want.abs().max() > 0.1
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), want, atol=1e-5, rtol=1e-5)


def test_svgs_own_checkpoint_samples_with_its_statistics_file(ae_path, tmp_path):
    # A checkpoint in the format of SVG's train_svg.py: {"ema": ...}, input Linear ln1, learn_sigma's 2C outputs.
    torch.manual_seed(0)
    ours = M.create_model("DiT-T/1", input_size=4, in_channels=68, num_classes=4, qk_norm=True)
    sd = ours.state_dict()
    sd["ln1.weight"], sd["ln1.bias"] = sd.pop("x_embedder.proj.weight")[:, :, 0, 0], sd.pop("x_embedder.proj.bias")
    for k in ("final_layer.linear.weight", "final_layer.linear.bias"):
        sd[k] = torch.cat([sd[k], torch.randn_like(sd[k])])
    torch.save({"ema": sd}, tmp_path / "svg.pt")
    torch.save({"dinov3_sp_mean": torch.zeros(1, 1, 70), "dinov3_sp_std": torch.ones(1, 1, 70)}, tmp_path / "stats.pt")
    out = tmp_path / "grid.png"
    with pytest.raises(SystemExit, match="--svg-stats"):
        S.main(["--ckpt", str(tmp_path / "svg.pt"), "--svg-ae", ae_path, "--out", str(out)])
    S.main(["--ckpt", str(tmp_path / "svg.pt"), "--svg-ae", ae_path, "--svg-stats", str(tmp_path / "stats.pt"),
            "--n", "2", "--steps", "2", "--out", str(out)])
    assert np.asarray(Image.open(out)).shape == (68, 134, 3)  # two 64-px tiles
