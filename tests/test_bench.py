"""bench.py: its analytic FLOP counts against torch's FlopCounterMode, and its command line end to end on tiny
configs, each variant a `python train.py` run. No timings are checked: they depend on the machine."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from experiments import bench
import model as M
from support.frozen import Encoder


def counted_flops(fn):
    # The math attention backend runs as matmuls that FlopCounterMode sees; the CPU flash kernel is not counted.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kw", [
    dict(input_size=16, in_channels=3, patch_size=4, bottleneck=32),                    # pixel space, sit
    dict(input_size=8, in_channels=4, patch_size=2, feat_dim=8),                        # latent, feature stream
    dict(input_size=8, in_channels=4, patch_size=2, feat_dim=8, fusion="channels"),     # ReDi's channel fusion
    dict(input_size=8, in_channels=4, patch_size=2, repa_depth=2, repa_dim=48),         # REPA head
    dict(input_size=8, in_channels=4, patch_size=2, feat_dim=8, repa_depth=1, repa_dim=48),
], ids=["pixel", "features", "channels", "repa", "features+repa"])
def test_dit_flops_match_flop_counter(kw):
    dit = M.DiT(hidden_size=64, depth=3, num_heads=4, num_classes=10, projector_dim=96, **kw)
    B = 3
    x = torch.randn(B, dit.in_channels, dit.input_size, dit.input_size)
    z = torch.randn(B, *dit.z_shape) if dit.feat_dim else None
    flops = counted_flops(lambda: dit(x, torch.rand(B), torch.randint(0, 10, (B,)), z))
    ours = bench.dit_flops(dit)
    assert sum(ours.values()) == pytest.approx(flops / B, rel=0.02)
    assert (ours["REPA projector"] > 0) == bool(dit.repa_depth)
    assert (ours["feature stream"] > 0) == bool(dit.feat_dim)


def test_encoder_flops_match_flop_counter():
    enc = Encoder(weights="random", img_size=56, depth=2, embed_dim=64, num_heads=2)  # 4 registers + class token
    flops = counted_flops(lambda: enc(torch.rand(2, 3, 32, 32) * 2 - 1))
    assert bench.vit_flops(enc.net) == pytest.approx(flops / 2, rel=0.02)


def test_dit_b2_flops_are_the_published_ones():
    # DiT's paper: DiT-B/2 at 256 px is 23.01 GFLOPs, counted as multiply-adds; we count 2 per multiply-add.
    with torch.device("meta"):  # shapes only
        dit = M.create_model("DiT-B/2", input_size=32, in_channels=4)
    assert sum(bench.dit_flops(dit).values()) / 2 == pytest.approx(23.01e9, rel=0.01)


TINY = ["--model", "DiT-T/4", "--image-size", "32", "--space", "pixel", "--iters", "1", "--warmup", "0",
        "--enc-weights", "tiny", "--batch", "4"]


def table(out, title):
    """The rows of the markdown table under '### title...' in out: lists of cells, the header first."""
    lines = out.split("### " + title, 1)[1].split("\n\n")[1].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if not line.startswith("| ---")]


def test_cli_train_tables(capsys):
    bench.main(TINY + ["--what", "train", "--compare", "sit,coredi+ckpt", "--iters", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    assert out.startswith("```\npython -m experiments.bench --model DiT-T/4")
    assert ("| variant | DiT params (M) | train GFLOP / image | ms / step | images/s | x first (ratio of medians) | "
            "MFU (% of peak) | memory GiB |") in out
    assert out.count("| sit |") == 1 and out.count("| coredi+ckpt |") == 1
    assert "| 1.00 |" in next(line for line in out.splitlines() if line.startswith("| sit |"))  # the first: ratio 1
    rows = {r[0]: r for r in table(out, "Training step")[1:]}
    # the FLOPs of the networks that each run's config rebuilds: DiT-T/4 at 32 px, 64 tokens; coredi adds the
    # tiny encoder's forward (and its feature stream) to the training FLOPs, not to the parameters
    sit = M.create_model("DiT-T/4", input_size=32, in_channels=3, num_classes=1000)
    assert rows["sit"][1] == f"{sum(p.numel() for p in sit.parameters()) / 1e6:.1f}"
    assert rows["sit"][2] == f"{3 * sum(bench.dit_flops(sit).values()) / 1e9:.1f}"
    assert float(rows["coredi+ckpt"][2]) > float(rows["sit"][2])
    for r in rows.values():  # images/s: the batch over the median step (both rounded)
        assert float(r[4]) == pytest.approx(4 / (float(r[3]) / 1e3), rel=0.02)
        assert r[6].endswith("%") and r[7] == "-"  # train.py's log has no peak memory (yet)
    # the parts of the first variant's step, timed apart, against train.py's whole step of the table above
    assert "### Parts of a sit step, timed apart" in out
    parts = table(out, "Parts of a sit step")
    assert parts[0] == ["encoder fwd", "DiT fwd+bwd", "AdamW step", "sum of parts", "train.py step",
                        "rest (data, noise, projection, losses, EMA, log)"]
    assert parts[1][0] == "-"  # sit runs no encoder
    assert parts[1][4] == rows["sit"][3]  # the same train.py step
    ms = [float(c.split()[0]) for c in parts[1][1:3]]
    assert abs(sum(ms) - float(parts[1][3].split()[0])) <= 1  # the sum of the rounded parts, to rounding
    assert abs(float(parts[1][4]) - float(parts[1][3].split()[0]) - float(parts[1][5])) <= 1


def test_cli_train_runs_train_py_as_a_user_does(capsys, monkeypatch):
    # every variant is one `python train.py` run with the variant's flags, on the bench's data, logging every step
    import experiments
    calls = []
    real = experiments.run_script
    monkeypatch.setattr(bench, "run_script", lambda name, script, flags, **kw: (
        calls.append((script, [str(f) for f in flags])), real(name, script, flags, **kw)))
    bench.main(TINY + ["--what", "train", "--compare", "sit,redi+repa", "--iters", "2", "--warmup", "1"])
    assert [c[0] for c in calls] == ["train.py", "train.py"]
    for (_, flags), mode, repa in zip(calls, ["sit", "redi"], [False, True]):
        f = dict(zip(flags, flags[1:]))
        assert (f["--preset"], f["--mode"], f["--model"], f["--global-batch-size"]) == ("pixel", mode, "DiT-T/4", "4")
        assert (f["--max-steps"], f["--log-every"], f["--sample-every"], f["--keep-every"]) == ("3", "1", "0", "0")
        assert int(f["--ckpt-every"]) > 3 and f["--data-path"].endswith("/images") and ("--repa" in flags) == repa
    out = capsys.readouterr().out
    assert out.count("| sit |") == 1 and out.count("| redi+repa |") == 1


def test_cli_data_and_sampling_latent(capsys):
    # latent space: a /tmp latent cache read by LatentCache, the SDE sampler with the (random) SD-VAE decode.
    # (The fid section is left out: the Inception at 299 px costs seconds on a CPU whatever the batch.)
    bench.main(["--model", "DiT-T/2", "--image-size", "32", "--space", "latent", "--iters", "1", "--warmup", "0",
                "--enc-weights", "tiny", "--batch", "2", "--compare", "redi",
                "--what", "data,sample", "--workers", "0", "--sample-steps", "2"])
    out = capsys.readouterr().out
    assert "### Data pipeline (LatentCache, 0 workers, 32 images in /tmp)" in out
    assert "| loader alone, images/s |" in out
    assert "| sde | 250 (timed 2 and 4) | 2 |" in out
    assert "### Training step" not in out and "| (not run) | - |" in out  # no train section: no step to compare


def test_cli_redi_from_the_cache(capsys):
    # redi+cache: redi's features from the latent cache, no encoder (its FLOPs and its encoder part vanish);
    # the cache layouts' bytes per image at 32 px: moments 8x4x4, image 32x32x3, features 256 tokens x 8.
    bench.main(["--model", "DiT-T/2", "--image-size", "32", "--space", "latent", "--iters", "1", "--warmup", "0",
                "--enc-weights", "tiny", "--batch", "2", "--compare", "redi+cache,redi", "--what", "train,data",
                "--workers", "0"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| redi")}
    assert float(rows["redi+cache"][3]) < float(rows["redi"][3])  # train GFLOP / image: no encoder forward
    assert table(out, "Parts of a redi+cache step")[1][0] == "-"  # no encoder part
    S, L = 32, 256  # the tiny encoder at its default 224 px: a 16 x 16 grid
    kb = lambda b: f"{b / 1024:.1f}"
    assert f"| (default) | moments fp32, images | {kb(8 * 4 * 4 * 4 + S * S * 3)} | every mode |" in out
    fp16 = kb(8 * 4 * 4 * 2 + L * 8 * 2)
    assert f"| --features --no-images --dtype float16 | moments fp16, features fp16 | {fp16} |" in out
    assert "### Data pipeline (LatentCache, 0 workers, 32 images in /tmp)" in out
    assert "| training step (redi+cache), images/s |" in out


def test_cli_svg_space(capsys, tmp_path):
    # --space svg: the DiT on a tiny SVG autoencoder's 68 x 4 x 4 latent, encoded from the images every step.
    from test_svg_space import TINY_AE
    import svg_ae
    torch.manual_seed(0)
    ae = svg_ae.build_autoencoder(TINY_AE)
    path = str(tmp_path / "ae.pt")
    torch.save({"residual": ae.residual.state_dict(), "decoder": ae.decoder.state_dict(), "config": TINY_AE}, path)
    bench.main(["--space", "svg", "--svg-ae", path, "--model", "DiT-T/1", "--image-size", "16", "--batch", "2",
                "--iters", "1", "--warmup", "0", "--enc-weights", "tiny", "--compare", "sit", "--what", "train,sample",
                "--workers", "0", "--sample-steps", "1"])
    out = capsys.readouterr().out
    assert "| SVG encode | encoder fwd | DiT fwd+bwd | AdamW step | sum of parts | train.py step |" in out
    assert table(out, "Parts of a sit step")[1][0] != "-"  # SVG's encode of the images is timed
    assert "| euler | 25 (timed 1 and 2) | 2 |" in out  # SVG's sampler
    assert out.count("| sit |") == 1


def test_cli_rejects_bad_variants_and_sections():
    with pytest.raises(M.UserError, match="\\+cache is redi's"):
        bench.main(TINY + ["--what", "train", "--compare", "sit+cache"])
    with pytest.raises(M.UserError, match="variant 'coredi\\+fast'"):
        bench.main(TINY + ["--what", "train", "--compare", "coredi+fast"])
    with pytest.raises(M.UserError, match="variant 'dit'"):
        bench.main(TINY + ["--what", "train", "--compare", "sit,dit"])
    with pytest.raises(M.UserError, match="--what"):
        bench.main(TINY + ["--what", "speed"])
    with pytest.raises(M.UserError, match="--svg-ae"):
        bench.main(TINY[:6] + ["--space", "svg", "--what", "train", "--compare", "sit"])
