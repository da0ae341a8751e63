"""train.py and prepare.py on tiny configs: every mode and space, exact resume, DDP equivalence, the CoReDi
stop-gradient, feature dropout, atomic checkpoints and the one-line errors."""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import model as M
import train as T
from support.data import ImageFolder, LatentCache, SyntheticImages, center_crop_arr
from support.monitor import LABEL_W, Monitor
from support.runs import save_checkpoint, start_messages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--synthetic", "64", "--num-classes", "4", "--model", "DiT-T/4", "--global-batch-size", "8",
        "--enc-weights", "tiny", "--enc-size", "56", "--num-workers", "0", "--log-every", "1",
        "--sample-every", "0", "--ckpt-every", "1000", "--keep-every", "0", "--pca-images", "16",
        "--lr", "1e-3", "--warmup-steps", "0", "--seed", "3"]
SPACE = {"pixel": ["--space", "pixel", "--image-size", "16"],
         "latent": ["--space", "latent", "--image-size", "32", "--model", "DiT-T/2", "--vae-weights", "random"]}


def run(tmp_path, *flags, name="run"):
    args = T.get_args(TINY + ["--results-dir", str(tmp_path), "--run-name", name] + [str(f) for f in flags])
    return T.main(args)


def log(tmp_path, name="run"):
    with open(tmp_path / name / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def params(m):
    return torch.cat([p.detach().flatten() for p in m.state_dict().values() if p.is_floating_point()])


@pytest.mark.parametrize("mode", ["sit", "repa", "redi", "coredi"])
def test_pixel_modes_learn(tmp_path, mode):
    run(tmp_path, "--mode", mode, *SPACE["pixel"], "--max-steps", 40)
    rec = log(tmp_path)
    assert len(rec) == 40
    first, last = np.mean([r["loss_x"] for r in rec[:5]]), np.mean([r["loss_x"] for r in rec[-5:]])
    assert last < 0.8 * first, (first, last)
    keys = set(rec[-1])
    assert {"loss_x", "grad_norm", "img_per_s"} <= keys
    assert ("loss_z" in keys) == (mode in ("redi", "coredi"))
    assert ("repa" in keys) == (mode == "repa")
    assert ({"vf", "ortho", "cov", "z_erank", "z_std_min"} <= keys) == (mode == "coredi")


@pytest.mark.parametrize("mode", ["sit", "repa", "redi", "coredi"])
def test_latent_modes_run(tmp_path, mode):
    dit, ema, proj = run(tmp_path, "--mode", mode, *SPACE["latent"], "--max-steps", 3)
    assert dit.in_channels == 4 and dit.input_size == 4
    assert all(np.isfinite(r["loss_x"]) for r in log(tmp_path))


def test_latent_loss_falls(tmp_path):
    run(tmp_path, "--mode", "redi", *SPACE["latent"], "--max-steps", 30)
    rec = log(tmp_path)
    assert np.mean([r["loss_x"] for r in rec[-5:]]) < 0.9 * np.mean([r["loss_x"] for r in rec[:5]])


def test_warmup_counts_epochs_of_the_data_given():
    pixel = T.get_args(["--data-path", "x", "--space", "pixel", "--global-batch-size", "8", "--max-steps", "1000"])
    assert pixel.warmup_epochs == 5 and pixel.lr is None and T.derive(pixel).lr == 5e-5 * 8 / 256
    assert T.warmup_steps(pixel, 64) == 40  # 5 epochs of 8 full batches
    assert T.warmup_steps(pixel, 100) == 60  # the last, partial batch of an epoch is not drawn
    imagenet = T.get_args(["--data-path", "x", "--space", "pixel"])
    assert T.warmup_steps(imagenet, 1_281_167) == 6255  # JiT's 5 epochs at batch 1024
    demo = T.get_args([])
    assert T.warmup_steps(demo, 5000) == 50  # the demo: 0.32 epochs at batch 32
    assert not [m for m in start_messages(demo, range(5000), False, 50, demo.lr) if m.startswith("WARNING")]
    assert T.warmup_steps(T.get_args(["--data-path", "x"]), 10_000) == 0  # latent: SiT has no warm-up
    assert T.warmup_steps(T.get_args(["--warmup-steps", "7"]), 5000) == 7  # steps given win
    # JiT's recipe on 64 images at batch 8 for 20 steps: the warm-up outlasts the run, and lr 1.6e-6 moves nothing
    short = T.get_args(["--data-path", "x", "--space", "pixel", "--global-batch-size", "8", "--max-steps", "20"])
    warm = T.warmup_steps(short, 64)
    problems = [m for m in start_messages(short, range(64), False, warm, T.derive(short).lr) if "WARNING" in m]
    assert warm == 40 and len(problems) == 2 and all("\n" not in p for p in problems)
    assert "longer than the run" in problems[0] and "summed over the run" in problems[1]


def test_pictures_a_run_writes(tmp_path):
    run(tmp_path, "--mode", "coredi", *SPACE["pixel"], "--max-steps", 4, "--sample-every", 2)
    for f in ("samples_0000002.png", "samples_0000004.png", "losses.png"):
        assert (tmp_path / "run" / f).stat().st_size > 0
    projection = Image.open(tmp_path / "run" / "projection.png")
    assert projection.size == (LABEL_W + 4 * 64, 64 + 18 + 2 * 64)  # the images with their classes, two rows
    assert Image.open(tmp_path / "run" / "losses.png").height == 2 * 320  # losses, effective rank


@pytest.mark.parametrize("mode", ["coredi", "repa"])
def test_resume_is_exact(tmp_path, mode):
    flags = ["--mode", mode, *SPACE["pixel"], "--feat-drop", "0.3"]
    dit_a, ema_a, proj_a = run(tmp_path, *flags, "--max-steps", 6, name="straight")
    run(tmp_path, *flags, "--max-steps", 3, "--ckpt-every", 3, name="resumed")
    ckpt = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)  # plain data only
    assert ckpt["step"] == 3 and ckpt["config"]["mode"] == mode
    dit_b, ema_b, proj_b = run(tmp_path, *flags, "--max-steps", 6, "--resume", name="resumed")
    assert torch.equal(params(dit_a), params(dit_b))
    assert torch.equal(params(ema_a), params(ema_b))
    if proj_a is not None:
        assert torch.equal(params(proj_a), params(proj_b))
    assert not torch.equal(params(dit_a), params(ema_a))  # the EMA really is another set of weights


def test_resume_with_a_warmup_in_epochs(tmp_path):
    """The same command plus --resume continues a run whose warm-up is counted in epochs (derived at the start), and
    the warm-up goes on where it stopped: 64 images at batch 8 are 8 steps an epoch, the resume falls at step 3."""
    i = TINY.index("--warmup-steps")
    argv = TINY[:i] + TINY[i + 2:] + ["--mode", "sit", *SPACE["pixel"], "--warmup-epochs", "1", "--results-dir",
                                      str(tmp_path)]
    straight, _, _ = T.main(T.get_args(argv + ["--run-name", "straight", "--max-steps", "6"]))
    T.main(T.get_args(argv + ["--run-name", "resumed", "--max-steps", "3"]))
    resumed, _, _ = T.main(T.get_args(argv + ["--run-name", "resumed", "--max-steps", "6", "--resume"]))
    assert torch.equal(params(straight), params(resumed))


MODES_2R = {"sit": [], "repa": [], "redi": ["--repa"], "coredi": []}  # redi with REPA on top: every loss term


def two_rank_flags(mode, tmp_path, name):
    return TINY + ["--mode", mode, *SPACE["pixel"], "--max-steps", "3", "--ckpt-every", "3", "--feat-drop", "0.3",
                   *MODES_2R[mode], "--results-dir", str(tmp_path), "--run-name", name]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Every mode trained by 2 gloo ranks, in one pair of processes (imports are most of a short run's time)."""
    tmp = tmp_path_factory.mktemp("ddp")
    runs = {m: two_rank_flags(m, tmp, f"two-{m}") for m in MODES_2R}
    script = ("import json, os, sys\nimport train as T\n"
              "for argv, port in json.loads(sys.argv[1]):\n"
              "    os.environ['MASTER_PORT'] = str(port)\n"
              "    T.main(T.get_args(argv))\n")
    jobs = json.dumps([(argv, free_port()) for argv in runs.values()])
    procs = [subprocess.Popen([sys.executable, "-c", script, jobs], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", WORLD_SIZE="2",
                                       RANK=str(r), LOCAL_RANK=str(r), PYTHONPATH=ROOT))
             for r in range(2)]
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-3000:]
    return tmp


@pytest.mark.parametrize("mode", list(MODES_2R))
def test_two_ranks_match_one(tmp_path, two_rank_runs, mode):
    # coredi's batch norm and Cov penalty see the global batch (all-reduced statistics), so it too trains the same.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' kernels
    try:
        T.main(T.get_args(two_rank_flags(mode, tmp_path, "one")))
    finally:
        torch.set_num_threads(threads)
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    two = torch.load(two_rank_runs / f"two-{mode}" / "last.pt", weights_only=True)
    for part in ("model", "proj"):  # proj: P, the VF map and batch norm's running statistics
        assert one[part].keys() == two[part].keys()
        for k in one[part]:
            torch.testing.assert_close(one[part][k], two[part][k], atol=1e-5, rtol=1e-4)
    one_log, two_log = log(tmp_path, "one"), log(two_rank_runs, f"two-{mode}")
    assert len(one_log) == len(two_log)
    for a, b in zip(one_log, two_log):
        for k in ("loss_x", "loss_z", "cov"):  # a mode writes the same keys on 1 and 2 ranks
            assert (k in a) == (k in b), k
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-4), k


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_loss(mode="coredi", **kw):
    dit = M.create_model("DiT-T/4", input_size=16, in_channels=3, num_classes=4, feat_dim=8)
    for p in dit.parameters():  # the DiT starts at exactly zero output: give it weights that do something
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    proj = M.FeatureProjection(32, 8, learnable=mode == "coredi", batchnorm=False, vf_map=None)
    proj.fit(torch.randn(500, 32))
    return T.JointLoss(dit, proj, (4, 4), **{"prediction": "x", **kw}), dit, proj


def batch(B=4, drop_feat=()):
    g = torch.Generator().manual_seed(0)
    x, y, z0 = torch.randn(B, 3, 16, 16, generator=g), torch.arange(B) % 4, torch.randn(B, 16, 32, generator=g)
    dropped = torch.zeros(B, dtype=torch.bool)
    dropped[list(drop_feat)] = True  # these samples' features are dropped
    noise = T.Noise(torch.rand(B, generator=g), torch.zeros(B, dtype=torch.bool), dropped,
                    torch.randn(B, 3, 16, 16, generator=g), torch.randn(B, 16, 8, generator=g), None)
    return x, y, z0, noise


def test_feature_dropout_masks_exactly_the_dropped_samples():
    loss_fn, dit, proj = make_loss("redi")
    x, y, z0, noise = batch(drop_feat=[1, 2])
    seen = {}
    dit.z_embedder.register_forward_hook(lambda m, i, o: seen.update(z=i[0].detach().clone()))
    _, ref = loss_fn(x, y, z0, noise)
    assert seen["z"][[1, 2]].abs().max() == 0 and seen["z"][[0, 3]].abs().min() > 0  # zero input when dropped
    for i, should_change in [(1, False), (2, False), (0, True), (3, True)]:
        z0b = z0.clone()
        z0b[i] += 3.0  # other features for sample i (redi has no batch norm: samples are independent)
        _, logs = loss_fn(x, y, z0b, noise)
        assert (logs["loss_z"] != ref["loss_z"]).item() == should_change, i


def test_crash_during_checkpoint_write_keeps_the_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(M.UserError, match="disk full.*is kept; free disk space"):  # one line, not a traceback
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    ck = torch.load(path, weights_only=True)
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.ones(3))
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # the partial .tmp does not fill the disk


def test_non_finite_loss_stops_without_overwriting(tmp_path, monkeypatch):
    flags = ["--mode", "sit", *SPACE["pixel"], "--ckpt-every", 2]
    run(tmp_path, *flags, "--max-steps", 2)
    before = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    forward = T.JointLoss.forward
    monkeypatch.setattr(T.JointLoss, "forward",
                        lambda self, *a, **kw: (lambda l: (l[0] * float("nan"), l[1]))(forward(self, *a, **kw)))
    with pytest.raises(M.UserError, match="non-finite loss"):
        run(tmp_path, *flags, "--max-steps", 4, "--resume")
    after = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert after["step"] == 2 and torch.equal(params_sd(before["model"]), params_sd(after["model"]))


def params_sd(sd):
    return torch.cat([v.flatten() for v in sd.values()])


def test_sigterm_saves_and_exits(tmp_path, monkeypatch):
    ema = T.update_ema
    calls = []

    def ema_then_signal(*a):
        ema(*a)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(T, "update_ema", ema_then_signal)
    old = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:  # 128 + 15: a scheduler sees a stopped run, not a finished one
            run(tmp_path, "--mode", "sit", *SPACE["pixel"], "--max-steps", 50)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert e.value.code == 143 and signal.getsignal(signal.SIGTERM) == old
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2


def test_latent_cache_roundtrip(tmp_path):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(4):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    out = tmp_path / "cache"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--data-path", str(root), "--out", str(out),
                        "--image-size", "32", "--vae-weights", "random", "--num-workers", "0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cache = LatentCache(str(out), 32, "random")
    x, label = cache[5]
    mom, img = x["latent"], x["image"]
    assert mom.shape == (8, 4, 4) and img.shape == (3, 32, 32) and img.dtype == torch.uint8 and label == 1
    want = center_crop_arr(Image.open(root / "b" / "1.png"), 32)
    assert np.array_equal(img.permute(1, 2, 0).numpy(), want)
    run(tmp_path, "--mode", "redi", *SPACE["latent"], "--latent-cache", str(out), "--max-steps", 2,
        "--global-batch-size", 4, "--num-classes", 2)
    with pytest.raises(M.UserError, match="made at 32 px"):
        LatentCache(str(out), 64, "random")
    with pytest.raises(M.UserError, match="VAE"):
        LatentCache(str(out), 32, None)


def test_center_crop_is_adm():
    img = Image.fromarray(np.arange(600 * 300 * 3, dtype=np.uint8).reshape(300, 600, 3) % 251)
    a = center_crop_arr(img, 64)
    assert a.shape == (64, 64, 3)  # 600x300 -> box-halved twice (while short side >= 128) -> 150x75
    ref = img.resize((300, 150), Image.BOX).resize((150, 75), Image.BOX).resize((128, 64), Image.BICUBIC)
    assert np.array_equal(a, np.asarray(ref)[:, 32:96])  # -> bicubic to short side 64 -> centre crop


def test_synthetic_set_is_deterministic_and_class_conditional():
    d = SyntheticImages(20, 24, num_classes=10, seed=1)
    x, y = d[13]
    assert x.shape == (3, 24, 24) and x.dtype == torch.uint8 and y == 3
    assert torch.equal(x, SyntheticImages(20, 24, num_classes=10, seed=1)[13][0])
    assert not torch.equal(x, SyntheticImages(20, 24, num_classes=10, seed=2)[13][0])


def test_bad_input_errors(tmp_path, monkeypatch):
    with pytest.raises(M.UserError, match="does not exist"):
        ImageFolder(str(tmp_path / "nope"), 32)
    os.makedirs(tmp_path / "flat")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(M.UserError, match="no class folders"):
        ImageFolder(str(tmp_path / "flat"), 32)
    os.makedirs(tmp_path / "empty" / "cls")
    with pytest.raises(M.UserError, match="no images"):
        ImageFolder(str(tmp_path / "empty"), 32)
    os.makedirs(tmp_path / "bad" / "cls")
    (tmp_path / "bad" / "cls" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(M.UserError, match="broken.jpg"):
        ImageFolder(str(tmp_path / "bad"), 32)[0]
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(M.UserError, match="not divisible by the 3 ranks"):
        T.get_args(TINY)
    monkeypatch.delenv("WORLD_SIZE")
    run(tmp_path, "--mode", "sit", *SPACE["pixel"], "--max-steps", 1, "--ckpt-every", 1)
    with pytest.raises(M.UserError, match="different settings.*mode"):
        run(tmp_path, "--mode", "repa", *SPACE["pixel"], "--max-steps", 2, "--resume")
    with pytest.raises(M.UserError, match="--enc-weights"):
        run(tmp_path, "--mode", "redi", *SPACE["pixel"], "--max-steps", 1, "--enc-weights", tmp_path / "none.pth",
            name="other")


def test_cli_prints_one_line_errors(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data-path", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [f"error: --data-path {tmp_path / 'nope'} does not exist; pass the folder of class folders"]


def test_in_training_fid_noise_differs_from_the_pictures(tmp_path, monkeypatch):
    # The sample grids use --seed and the FID seed + 1: the FID must not score the pictures' noise again.
    import fid
    import sample as S
    (tmp_path / "ref.npz").write_bytes(b"")  # never read: fid.evaluate is replaced below
    args = T.get_args(TINY + ["--mode", "sit", *SPACE["pixel"], "--fid-every", "1", "--fid-ref",
                              str(tmp_path / "ref.npz"), "--fid-samples", "4"])
    ema = M.create_model("DiT-T/4", input_size=16, in_channels=3, num_classes=4)
    seeds, real = [], S.generate

    def generate(*a, seed, **kw):
        seeds.append(seed)
        return real(*a, seed=seed, **kw)
    monkeypatch.setattr(S, "generate", generate)
    monkeypatch.setattr(S, "default_sampler", lambda space: dict(sampler="euler", steps=1))
    monkeypatch.setattr(fid, "evaluate", lambda *a, **kw: {"fid": 1.0})
    monitor = Monitor(args, str(tmp_path), "x", None, None, "cpu")
    monitor.pictures(ema, 1)
    monitor.fid(ema, 1, 0, 1)
    assert seeds == [args.seed, args.seed + 1]
    shapes = ((3, 16, 16), None)
    pictures, fids = (S.draw_noise(s, torch.arange(4), 1, shapes)[0] for s in seeds)
    assert (pictures - fids).abs().min() > 0


def test_no_host_synchronisation_between_log_steps(tmp_path, monkeypatch):
    # A step that neither logs nor saves asks the device for no value: runs of 2 and 5 steps, each logging and
    # saving once (at its end), make the same number of such calls from the project's code (torch's own, e.g.
    # the CPU AdamW's step counter, are not ours; on a GPU the optimizer is fused).
    calls = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **kw):
            if sys._getframe(1).f_code.co_filename.startswith(ROOT + os.sep):
                calls.append(sys._getframe(1).f_code.co_name)
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for steps in (2, 5):
        calls.clear()
        run(tmp_path, "--mode", "coredi", *SPACE["pixel"], "--feat-drop", "0.2", "--max-steps", steps,
            "--log-every", steps, "--ckpt-every", steps, name=f"steps{steps}")
        counts.append(len(calls))
    assert counts[0] > 0  # the counting sees the log step's and the checkpoint's reads
    assert counts[1] == counts[0], calls


def test_compile_is_regional(tmp_path, monkeypatch):
    # --compile compiles each transformer block (one graph, reused by all blocks), not the whole step: the
    # compiled modules are exactly the DiT's blocks. (torch.compile itself is not run here: minutes on a CPU.)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **kw: compiled.append(self))
    dit, ema, proj = run(tmp_path, "--mode", "coredi", *SPACE["pixel"], "--max-steps", 1, "--compile")
    assert len(compiled) == len(dit.blocks) and all(a is b for a, b in zip(compiled, dit.blocks))


def test_keep_every_keeps_at_its_own_steps(tmp_path):
    # --keep-every 3 with --ckpt-every 1000: step_N.pt at 3 and 6 (not only at multiples of --ckpt-every)
    run(tmp_path, "--mode", "sit", *SPACE["pixel"], "--max-steps", 7, "--keep-every", 3)
    kept = sorted(p.name for p in (tmp_path / "run").glob("step_*.pt"))
    assert kept == ["step_0000003.pt", "step_0000006.pt"]
    assert torch.load(tmp_path / "run" / "step_0000003.pt", weights_only=True)["step"] == 3


def test_a_run_ends_saying_where_it_is_and_what_next(tmp_path, capsys):
    run(tmp_path, "--mode", "coredi", *SPACE["pixel"], "--max-steps", 2, "--sample-every", 2, "--feat-drop", 0.2)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    run_dir = tmp_path / "run"
    assert last == (f"done: {run_dir} at step 2 holds last.pt, pca.pt, log.jsonl, losses.png, projection.png, 1 "
                    f"sample grids (samples_0000002.png the last); sample it with: python sample.py --ckpt "
                    f"{run_dir / 'last.pt'} --cfg-rep 1.5")
