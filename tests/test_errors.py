"""Bad inputs and faults, script by script. Each case expects a non-zero exit status, one line on stderr (progress
bars aside) that names the problem and the way out, and the user's files byte for byte as they were. The scripts run
in-process through their command lines (cli turns an error into sys.exit(message)); only a DataLoader worker
needs a process of its own, and it gets one from the DataLoader."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import ablation as A
from experiments import bench as B
import fid
import model as M
import support.cli
import prepare as P
import sample as S
import train as T
from support.cli import cli
from support.data import LatentCache
from support.runs import default_run_name

TINY = ["--synthetic", "32", "--num-classes", "4", "--model", "DiT-T/4", "--global-batch-size", "4",
        "--enc-weights", "tiny", "--enc-size", "28", "--num-workers", "0", "--log-every", "1", "--sample-every", "0",
        "--ckpt-every", "2", "--keep-every", "0", "--pca-images", "8", "--space", "pixel", "--image-size", "16",
        "--max-steps", "2", "--warmup-steps", "0"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


def train(argv):
    cli(lambda: T.main(T.get_args(argv)))


def prepare(argv):
    cli(lambda: P.main(P.get_args(argv)))


def ablation(argv):
    cli(lambda: A.main(argv))


def bench(argv):
    cli(lambda: B.main(argv))


def read(path):
    with open(path, "rb") as f:
        return f.read()


def snapshot(paths):
    """Every file under paths, with its bytes; folders that do not exist are None."""
    state = {}
    for root in map(str, paths):
        if os.path.isfile(root):
            state[root] = read(root)
        elif os.path.isdir(root):
            for d, _, files in os.walk(root):
                for f in files:
                    state[os.path.join(d, f)] = read(os.path.join(d, f))
        else:
            state[root] = None
    return state


def visible_lines(text):
    """What a terminal shows: the last \\r-segment of each line, without tqdm's progress bars (and its cursor moves)
    and blank lines."""
    lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line.split("\r")[-1]).strip() for line in text.split("\n")]
    return [line for line in lines if line and not re.search(r"\d+%\|", line)]


def fails(capsys, entry, argv, *words, keep=(), seconds=None):
    """Run a script's command line; it must exit non-zero with one line on stderr that contains every word, within
    seconds if given, and leave the files under keep unchanged."""
    before, t0 = snapshot(keep), time.time()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        entry([str(a) for a in argv])
    code, err = e.value.code, capsys.readouterr().err
    lines = visible_lines(err) + ([code] if isinstance(code, str) else [])
    assert code not in (0, None), f"SILENT: exit status {code}"
    assert len(lines) == 1, f"UNCLEAR: {len(lines)} lines on stderr: {lines}"
    missing = [w for w in words if w not in lines[0]]
    assert not missing, f"UNCLEAR: {missing} not in {lines[0]!r}"
    assert snapshot(keep) == before, "CHANGED: the user's files were modified"
    if seconds is not None:
        assert time.time() - t0 < seconds, f"SLOW: {time.time() - t0:.0f} s"
    return lines[0]


# -----------------------------------------------------------------------------
# Fixtures: one tiny finished run, its checkpoint, an image folder and an ADM reference batch

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step sit run: results/run/last.pt."""
    root = tmp_path_factory.mktemp("finished")
    T.main(T.get_args(TINY + ["--mode", "sit", "--results-dir", str(root / "results"), "--run-name", "run"]))
    return root / "results"


@pytest.fixture
def results(finished, tmp_path):
    """A copy of the finished run's results folder, for cases that must leave it untouched."""
    shutil.copytree(finished, tmp_path / "results")
    return tmp_path / "results"


def run_flags(results, *flags):
    return [str(f) for f in TINY + ["--mode", "sit", "--results-dir", results, "--run-name", "run", *flags]]


@pytest.fixture
def images(tmp_path):
    """An image folder of 2 classes x 4 PNGs; b/1.png is broken (neither the first of its class nor in a fixed set)."""
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(4):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def npz(path, arr_0=None, **extra):
    arr_0 = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8) if arr_0 is None else arr_0
    np.savez(path, arr_0=arr_0, **extra)
    return path


def truncated_npz(path):
    """A zip whose arr_0.npy member is cut short (a copy interrupted while the archive was written)."""
    full = tmp = str(path) + ".full.npz"
    npz(tmp)
    with zipfile.ZipFile(full) as z:
        member = z.read("arr_0.npy")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("arr_0.npy", member[:len(member) // 2])
    os.remove(full)
    return path


# -----------------------------------------------------------------------------
# train.py: flags

@pytest.mark.parametrize("flag,value,word", [
    ("--lr", "0", "--lr"), ("--lr", "-1e-4", "--lr"), ("--feat-dim", "0", "--feat-dim"),
    ("--global-batch-size", "0", "--global-batch-size"), ("--label-drop", "1.5", "--label-drop"),
    ("--feat-drop", "-0.1", "--feat-drop"), ("--ema", "2", "--ema"), ("--beta2", "1", "--beta2"),
    ("--max-steps", "0", "--max-steps"), ("--num-workers", "-1", "--num-workers"), ("--log-every", "0", "--log-every"),
    ("--seed", "-1", "--seed"), ("--lr", "fast", "--lr"), ("--cov-weight", "nan", "--cov-weight"),
])
def test_train_numeric_flags(capsys, tmp_path, flag, value, word):
    fails(capsys, train, run_flags(tmp_path, flag, value), word, "--help")
    assert not (tmp_path / "run").exists()


def test_train_batch_not_divisible_by_ranks(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    fails(capsys, train, run_flags(tmp_path), "--global-batch-size 4", "multiple of 3")


def test_train_fid_every_without_ref(capsys, tmp_path):
    fails(capsys, train, run_flags(tmp_path, "--fid-every", 10, "--fid-samples", 4), "--fid-ref")


@pytest.mark.parametrize("ref", ["missing.npz", "notes.txt", "cut.npz"])
def test_train_bad_fid_ref_before_step_0(capsys, tmp_path, ref):
    (tmp_path / "notes.txt").write_text("not an npz")
    truncated_npz(tmp_path / "cut.npz")
    path = tmp_path / ref
    fails(capsys, train, run_flags(tmp_path, "--fid-every", 1, "--fid-ref", path, "--fid-samples", 4), str(path),
          keep=[tmp_path / "notes.txt", tmp_path / "cut.npz"])
    assert not (tmp_path / "run").exists()  # nothing trained, no folder left behind


def test_train_missing_inception_weights_before_step_0(capsys, tmp_path):
    fails(capsys, train, run_flags(tmp_path, "--fid-every", 1, "--fid-ref", npz(tmp_path / "ref.npz"), "--fid-samples", 4,
                                   "--inception-weights", tmp_path / "none.pth"), "--inception-weights")
    assert not (tmp_path / "run").exists()


def test_fid_failure_mid_run_is_logged_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: None)  # the checks before step 0 pass
    monkeypatch.setattr(fid, "evaluate", lambda *a, **k: (_ for _ in ()).throw(OSError("reference vanished")))
    monkeypatch.setattr(S, "default_sampler", lambda space: dict(sampler="euler", steps=1))
    T.main(T.get_args(run_flags(tmp_path, "--fid-every", 1, "--fid-ref", npz(tmp_path / "ref.npz"),
                                "--fid-samples", 4)))
    log = (tmp_path / "run" / "log.jsonl").read_text()
    assert log.count("reference vanished") == 2 and torch.load(tmp_path / "run" / "last.pt")["step"] == 2


# -----------------------------------------------------------------------------
# train.py: run folders, resume, checkpoints

def test_train_refuses_a_folder_with_a_run(capsys, results):
    fails(capsys, train, run_flags(results), "--resume", "--restart", keep=[results])


def test_train_restart_moves_the_old_run_aside(capsys, results):
    old = snapshot([results / "run"])
    train(run_flags(results, "--restart"))
    aside = [d for d in os.listdir(results) if d.startswith("run-")]
    assert len(aside) == 1
    moved = snapshot([results / aside[0]])
    assert sorted(v for v in moved.values()) == sorted(v for v in old.values())  # nothing lost
    assert (results / "run" / "last.pt").exists()


def test_demo_runs_are_named_by_mode():
    assert default_run_name(T.get_args([])) == "demo-coredi"
    assert default_run_name(T.get_args(["--mode", "redi"])) == "demo-redi"


def test_train_resume_without_checkpoint(capsys, tmp_path):
    fails(capsys, train, run_flags(tmp_path, "--resume"), "no checkpoint")


def test_train_resume_truncated_checkpoint(capsys, results):
    last = results / "run" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    fails(capsys, train, run_flags(results, "--resume", "--max-steps", 4), str(last), "--restart", keep=[results])


@pytest.mark.parametrize("flags,words", [
    (["--seed", "7"], ["--seed (0 in the checkpoint, 7 now)"]),
    (["--mode", "repa"], ["--mode (sit in the checkpoint, repa now)"]),
    (["--label-drop", "0.2", "--ema", "0.5"], ["--label-drop", "--ema", "--max-steps"]),
])
def test_train_resume_with_changed_flags(capsys, results, flags, words):
    fails(capsys, train, run_flags(results, "--resume", "--max-steps", 4, *flags), "cannot resume", *words,
          keep=[results])


def test_train_resume_applies_a_new_lr(results):
    train(run_flags(results, "--resume", "--max-steps", 3, "--lr", "5e-4"))
    ckpt = torch.load(results / "run" / "last.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["opt"]["param_groups"][0]["lr"] == 5e-4


def test_train_resume_and_restart_together(capsys, results):
    fails(capsys, train, run_flags(results, "--resume", "--restart"), "--resume", "--restart", keep=[results])


@pytest.fixture
def pca_files(tmp_path):
    proj = M.FeatureProjection(64, 8)  # the tiny encoder's width
    proj.fit(torch.randn(100, 64))
    torch.save(proj.state_dict(), tmp_path / "pca8.pt")
    torch.save({"P": proj.P}, tmp_path / "partial.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    return tmp_path


@pytest.mark.parametrize("file,flags,words", [
    ("missing.pt", [], ["--pca-file", "no such file"]),
    ("garbage.pt", [], ["--pca-file", "cannot read"]),
    ("partial.pt", [], ["--pca-file", "enc_mean"]),
    ("pca8.pt", ["--feat-dim", "4"], ["--pca-file", "--feat-dim 4"]),
])
def test_train_bad_pca_file(capsys, pca_files, file, flags, words):
    results = pca_files / "results"
    fails(capsys, train, TINY + ["--mode", "redi", "--results-dir", results, "--run-name", "run", "--pca-file",
                                 pca_files / file, *flags], *words, keep=[pca_files / file])
    assert not results.exists()  # a failed start leaves no run folder


def test_train_good_pca_file_is_used(pca_files):
    dit, ema, proj = T.main(T.get_args(TINY + ["--mode", "redi", "--results-dir", str(pca_files / "r"), "--run-name", "run",
                                               "--pca-file", str(pca_files / "pca8.pt"), "--max-steps", "1"]))
    assert torch.equal(proj.P, torch.load(pca_files / "pca8.pt")["P"])


@pytest.fixture
def cache(tmp_path):
    """A complete latent cache of 4 images at 16 px, written as prepare.py writes one."""
    root = tmp_path / "cache"
    os.makedirs(root)
    np.save(root / "moments.npy", np.zeros((4, 8, 2, 2), np.float32))
    np.save(root / "images.npy", np.zeros((4, 16, 16, 3), np.uint8))
    np.save(root / "labels.npy", np.arange(4) % 2)
    (root / "meta.json").write_text('{"image_size": 16, "vae": "random", "num_images": 4, "num_classes": 2}')
    return root


def test_latent_cache_complete_loads(cache):
    assert len(LatentCache(str(cache), 16, "random")) == 4


@pytest.mark.parametrize("fault,words", [
    ("no meta", ["meta.json", "prepare.py"]),
    ("short images", ["images.npy", "truncated"]),
    ("missing moments", ["moments.npy", "missing"]),
    ("meta disagrees", ["labels.npy", "meta.json"]),
])
def test_train_incomplete_latent_cache(capsys, cache, tmp_path, fault, words):
    if fault == "no meta":
        os.remove(cache / "meta.json")
    elif fault == "short images":
        data = (cache / "images.npy").read_bytes()
        (cache / "images.npy").write_bytes(data[:len(data) - 100])
    elif fault == "missing moments":
        os.remove(cache / "moments.npy")
    else:
        np.save(cache / "labels.npy", np.arange(3))
    fails(capsys, train, TINY + ["--mode", "sit", "--space", "latent", "--latent-cache", cache, "--vae-weights",
                                 "random", "--results-dir", tmp_path / "r", "--num-classes", "2"], *words, keep=[cache])


def test_train_unreadable_image_in_a_worker(capsys, images, tmp_path):
    fails(capsys, train, TINY + ["--mode", "sit", "--data-path", images, "--num-workers", "1", "--results-dir",
                                 tmp_path / "r", "--num-classes", "2"], str(images / "b" / "1.png"), keep=[images])


def test_train_missing_data(capsys, tmp_path):
    fails(capsys, train, TINY + ["--data-path", tmp_path / "nope", "--results-dir", tmp_path / "r"], "nope")


def test_train_missing_encoder_file(capsys, tmp_path):
    fails(capsys, train, run_flags(tmp_path, "--mode", "redi", "--enc-weights", tmp_path / "dino.pth"), "--enc-weights")


def test_train_offline_default_encoder_fails_at_once(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", hub.HF_HUB_OFFLINE)  # restored after the test
    monkeypatch.setattr(support.cli, "online", lambda *a, **k: False)
    i = TINY.index("--enc-weights")
    flags = TINY[:i] + TINY[i + 2:] + ["--preset", "pixel"]  # the real encoder's default: download it
    fails(capsys, train, flags + ["--mode", "redi", "--results-dir", tmp_path], "--enc-weights", seconds=10)


def test_train_sigint_saves_and_says_how_to_resume(capsys, tmp_path, monkeypatch):
    ema, calls = T.update_ema, []

    def ema_then_ctrl_c(*a):
        ema(*a)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(T, "update_ema", ema_then_ctrl_c)
    with pytest.raises(SystemExit) as e:
        train(run_flags(tmp_path, "--max-steps", 50))
    assert e.value.code == 130  # 128 + SIGINT, as a shell reports Ctrl-C
    lines = visible_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "SIGINT" in lines[0] and "--resume" in lines[0], lines
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2


# -----------------------------------------------------------------------------
# sample.py

@pytest.mark.parametrize("flags,word", [
    (["--steps", "0"], "--steps"), (["--n", "0"], "--n"), (["--num-samples", "0"], "--num-samples"),
    (["--batch-size", "0"], "--batch-size"), (["--seed", "-1"], "--seed"), (["--cfg-interval", "0.5", "2"], "--cfg-interval"),
    (["--cfg-interval", "0.8", "0.2"], "--cfg-interval"), (["--cfg-scale", "-1"], "--cfg-scale"),
])
def test_sample_numeric_flags(capsys, finished, flags, word):
    fails(capsys, S.main, ["--ckpt", finished / "run" / "last.pt", *flags], word, keep=[finished])


@pytest.mark.parametrize("many", [False, True])
def test_sample_unwritable_out_before_sampling(capsys, finished, tmp_path, monkeypatch, many):
    monkeypatch.setattr(S, "generate", lambda *a, **k: pytest.fail("sampled before checking --out"))
    (tmp_path / "file").write_text("a file, not a folder")
    out = tmp_path / "file" / ("samples" if many else "grid.png")
    fails(capsys, S.main, ["--ckpt", finished / "run" / "last.pt", "--out", out,
                           *(["--num-samples", "2"] if many else [])], "--out", "not a folder", keep=[tmp_path / "file"])


def test_sample_truncated_checkpoint(capsys, finished, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes((finished / "run" / "last.pt").read_bytes()[:2000])
    fails(capsys, S.main, ["--ckpt", cut], str(cut), keep=[cut])


def test_sample_ctrl_c_keeps_finished_images(capsys, finished, tmp_path, monkeypatch):
    real, calls = S.generate, []

    def interrupted(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(S, "generate", interrupted)
    out = tmp_path / "s"
    fails(capsys, S.main, ["--ckpt", finished / "run" / "last.pt", "--num-samples", 4, "--batch-size", 2, "--steps", 1,
                           "--out", out], "2 of 4", "same command")
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["000000.png", "000001.png"]


# -----------------------------------------------------------------------------
# fid.py

@NO_GPU
def test_fid_device_cuda_without_gpu(capsys, tmp_path):
    fails(capsys, fid.main, ["--ref", npz(tmp_path / "r.npz"), "--sample", npz(tmp_path / "s.npz"), "--device", "cuda"],
          "--device cpu", keep=[tmp_path])


def test_fid_batch_size_zero(capsys, tmp_path):
    fails(capsys, fid.main, ["--ref", "r.npz", "--sample", "s.npz", "--batch-size", "0"], "--batch-size")


@pytest.mark.parametrize("which", ["--ref", "--sample"])
def test_fid_truncated_arr_0(capsys, tmp_path, monkeypatch, which):
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: fid.InceptionV3())  # no weights needed to fail
    files = {"--ref": npz(tmp_path / "r.npz"), "--sample": npz(tmp_path / "s.npz")}
    files[which] = truncated_npz(tmp_path / "cut.npz")
    fails(capsys, fid.main, ["--ref", files["--ref"], "--sample", files["--sample"], "--device", "cpu"],
          str(tmp_path / "cut.npz"), "truncated", keep=[tmp_path])


def test_fid_missing_reference(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: fid.InceptionV3())
    fails(capsys, fid.main, ["--ref", tmp_path / "no.npz", "--sample", npz(tmp_path / "s.npz"), "--device", "cpu"],
          "no.npz")


def test_fid_offline_inception_fails_at_once(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(fid, "online", lambda *a, **k: False, raising=False)
    monkeypatch.setattr(support.cli, "online", lambda *a, **k: False)
    fails(capsys, fid.main, ["--ref", npz(tmp_path / "r.npz"), "--sample", npz(tmp_path / "s.npz"), "--device", "cpu"],
          "--inception-weights", seconds=10)


@pytest.mark.filterwarnings("ignore:.*covariance is singular")  # 4 images: only the cache matters here
def test_fid_damaged_activation_cache_is_recomputed(capsys, tmp_path):
    torch.manual_seed(0)
    net = fid.InceptionV3().eval()
    ref = npz(tmp_path / "r.npz", np.random.default_rng(1).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8))
    first = fid.reference(str(ref), net)
    (cache,) = [p for p in tmp_path.iterdir() if ".inception-" in p.name]
    cache.write_bytes(cache.read_bytes()[:300])
    capsys.readouterr()
    again = fid.reference(str(ref), net)
    assert np.array_equal(first[0], again[0])
    lines = visible_lines(capsys.readouterr().err)
    assert len(lines) == 1 and cache.name in lines[0], lines
    with np.load(cache) as c:  # and the cache is whole again
        assert np.array_equal(c["pool3"], first[0])


# -----------------------------------------------------------------------------
# prepare.py

def test_prepare_refuses_a_complete_cache(capsys, cache, images):
    fails(capsys, prepare, ["--data-path", images, "--out", cache, "--vae-weights", "random", "--image-size", 16,
                            "--num-workers", 0], "--overwrite", keep=[cache])


@pytest.mark.parametrize("flags,word", [
    (["--image-size", "30"], "multiple of 8"), (["--batch-size", "0"], "--batch-size"),
    (["--num-workers", "-2"], "--num-workers"),
])
def test_prepare_flags(capsys, images, tmp_path, flags, word):
    fails(capsys, prepare, ["--data-path", images, "--out", tmp_path / "c", "--vae-weights", "random", *flags], word)
    assert not (tmp_path / "c").exists()


def test_prepare_unreadable_image_in_a_worker(capsys, images, tmp_path):
    out = tmp_path / "c"
    fails(capsys, prepare, ["--data-path", images, "--out", out, "--vae-weights", "random", "--image-size", 16,
                            "--num-workers", 1, "--batch-size", 2], str(images / "b" / "1.png"), keep=[images])
    assert not out.exists()  # never half a cache under the name train.py reads


# -----------------------------------------------------------------------------
# ablation.py and bench.py

@pytest.mark.parametrize("flags,words", [
    (["--variants", "redi,bogus", "--steps", "1"], ["'bogus'", "--variants"]), (["--steps", "0"], ["--steps"]),
    (["--batch", "-3", "--steps", "1"], ["--batch"]),
])
def test_ablation_flags(capsys, tmp_path, flags, words):
    fails(capsys, ablation, ["--out", tmp_path / "abl", "--synthetic", "64", "--pca-images", "8", *flags], *words)
    assert not (tmp_path / "abl").exists()


def test_ablation_refuses_existing_runs(capsys, tmp_path):
    os.makedirs(tmp_path / "abl" / "redi")
    (tmp_path / "abl" / "redi" / "last.pt").write_bytes(b"a run")
    fails(capsys, ablation, ["--out", tmp_path / "abl", "--variants", "redi,coredi", "--steps", "1", "--synthetic", "64",
                             "--pca-images", "8"], "--restart", keep=[tmp_path / "abl"])


@NO_GPU
def test_bench_unknown_variant(capsys):
    fails(capsys, bench, ["--what", "train", "--compare", "bogus,sit"], "bogus")


def test_ablation_failed_run_is_one_line_naming_it(capsys, tmp_path):
    # a variant's `python train.py` run fails (here at its flags): one line, the variant's run and train.py's own error
    line = fails(capsys, ablation, ["--out", tmp_path / "abl", "--variants", "naive,coredi", "--steps", "1",
                                    "--synthetic", "64", "--pca-images", "8", "--pca-file", tmp_path / "none.pt"],
                 "variant 'naive'", str(tmp_path / "abl" / "naive"), "train.py failed", "--pca-file")
    assert "Traceback" not in line and "error: error:" not in line
    assert not (tmp_path / "abl").exists()


def test_bench_failed_run_is_one_line_naming_it(capsys):
    fails(capsys, bench, ["--model", "DiT-Q/4", "--space", "pixel", "--image-size", 32, "--batch", 2, "--enc-weights",
                          "tiny", "--iters", 1, "--warmup", 0, "--what", "train", "--compare", "sit", "--workers", 0],
          "variant 'sit'", "train.py failed", "DiT-Q/4")


def test_train_offline_default_vae_fails_at_once(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", hub.HF_HUB_OFFLINE)  # restored after the test
    monkeypatch.setattr(support.cli, "online", lambda *a, **k: False)
    fails(capsys, train, run_flags(tmp_path, "--space", "latent", "--image-size", 32), "--vae-weights", seconds=10)



# -----------------------------------------------------------------------------
# Nothing a user has is lost: a run folder in use, prepare.py --overwrite, sample.py --out

def sample(argv):
    cli(lambda: S.main([str(a) for a in argv]))


def test_a_run_folder_in_use_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    run = TINY + ["--mode", "sit", "--results-dir", tmp_path, "--run-name", "run"]
    train([str(a) for a in run])
    run_dir = tmp_path / "run"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from support.runs import lock_run_dir; lock_run_dir(sys.argv[2]); print('held', "
                               "flush=True); time.sleep(60)", root, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for flag in ("--resume", "--restart"):  # neither continues nor moves aside a run in progress
            fails(capsys, train, run + ["--max-steps", 4, flag], "is in use by another training",
                  f"pid {holder.pid}", keep=[tmp_path])
        assert os.listdir(tmp_path) == ["run"]
    finally:
        holder.kill()
        holder.wait()
    train([str(a) for a in run + ["--max-steps", 4, "--resume"]])  # the kernel dropped the killed one's lock
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 4


def test_prepare_overwrite_replaces_only_a_cache(tmp_path, capsys):
    images = tmp_path / "imgs" / "c0"
    images.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("mine")
    flags = ["--data-path", tmp_path / "imgs", "--image-size", 32, "--vae-weights", "random", "--batch-size", 2,
             "--num-workers", 0]
    for out in (tmp_path / "imgs", tmp_path):  # the source images, and a folder that holds them
        fails(capsys, prepare, flags + ["--out", out, "--overwrite"], "not a latent cache's", "another --out",
              keep=[tmp_path])
    (tmp_path / "stray.partial").mkdir()
    (tmp_path / "stray.partial" / "todo.txt").write_text("mine")
    fails(capsys, prepare, flags + ["--out", tmp_path / "stray"], "is not a cache that prepare.py was writing",
          keep=[tmp_path])
    cache = tmp_path / "cache"
    prepare([str(a) for a in flags + ["--out", cache]])
    first = read(cache / "moments.npy")
    fails(capsys, prepare, flags + ["--out", cache], "already holds a complete latent cache", "--overwrite",
          keep=[tmp_path])
    prepare([str(a) for a in flags + ["--out", cache, "--overwrite"]])  # a cache is replaced, whole
    assert read(cache / "moments.npy") == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "imgs", "stray.partial"]  # no .old left


def test_sample_out_never_overwrites(finished, tmp_path, capsys):
    ckpt = finished / "run" / "last.pt"
    base = ["--ckpt", ckpt, "--steps", 2, "--out", tmp_path / "grid.png"]
    sample(base)
    fails(capsys, sample, base, "exists", "another --out", keep=[tmp_path])
    fails(capsys, sample, base[:-1] + [tmp_path / "grid.xyz"], "Pillow cannot write .xyz", keep=[tmp_path])
    shutil.copy(ckpt, tmp_path / "last.pt")
    default = ["--ckpt", tmp_path / "last.pt", "--steps", 2]
    sample(default)
    sample(default)  # the same default name again: the next free one, the first grid kept
    grids = {p.name for p in tmp_path.glob("grid_step*.png")}
    assert grids == {"grid_step2_cfg1.0_rep1.0_seed0.png", "grid_step2_cfg1.0_rep1.0_seed0-2.png"}


def test_data_path_and_latent_cache_exclude_each_other(capsys, tmp_path):
    fails(capsys, train, TINY + ["--data-path", tmp_path, "--latent-cache", tmp_path], "--data-path",
          "--latent-cache", keep=[tmp_path])


def test_an_8_sample_grid_is_4_by_2(tmp_path):
    S.save_grid(np.zeros((8, 64, 64, 3), np.uint8), tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").size == (4 * 66 + 2, 2 * 66 + 2)  # no empty cell


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16_bit_images_read_as_their_grey_not_white(tmp_path, ext):
    # A mid-grey 16-bit image (32896 = 128 * 257; a PNG opens as I;16, a 32-bit TIFF as I) is grey 128 to
    # training's image folder and to fid.py, not the 255 of Pillow's convert("RGB") (which clips); fid.py's size
    # check covers every file, whatever --batch-size.
    (tmp_path / "c0").mkdir()
    grey = Image.fromarray(np.full((40, 40), 128 * 257, np.uint16)) if ext == ".png" else \
        Image.new("I", (40, 40), 128 * 257)
    grey.save(tmp_path / "c0" / f"a{ext}")
    assert Image.open(tmp_path / "c0" / f"a{ext}").mode == ("I;16" if ext == ".png" else "I")
    from support.data import ImageFolder
    img, _ = ImageFolder(str(tmp_path), 32)[0]
    assert img.shape == (3, 32, 32) and int(img.float().mean().round()) == 128
    if ext == ".png":
        n, batches = fid.image_batches(str(tmp_path / "c0"), 1)
        assert n == 1 and int(next(batches).mean().round()) == 128
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "c0" / "b.png")
        with pytest.raises(M.UserError, match="different sizes"):
            fid.image_batches(str(tmp_path / "c0"), 1)


def test_first_contact_lines_name_the_right_problem(capsys, tmp_path, finished):
    # a file where a folder is expected, and the reverse; the newest last.pt of another kind is skipped
    fails(capsys, train, TINY + ["--data-path", finished / "run" / "last.pt"], "is a file, not a folder")
    (tmp_path / "file").write_text("x")
    fails(capsys, train, TINY + ["--results-dir", tmp_path / "file"], "--results-dir", "a file")
    fails(capsys, S.main, ["--ckpt", finished / "run"], "is a folder", f"--ckpt {finished / 'run' / 'last.pt'}")
    fails(capsys, train, TINY + ["--feat-dim", "70", "--results-dir", tmp_path], "has no 70 directions",
          "--feat-dim")  # the tiny encoder is 64 wide
    results = tmp_path / "results"
    shutil.copytree(finished / "run", results / "run")
    (results / "svg-ae-demo").mkdir()
    torch.save({"config": {}, "residual": {}, "decoder": {}}, results / "svg-ae-demo" / "last.pt")  # newer
    from support.sampling_io import newest_checkpoint
    assert newest_checkpoint(str(results)) == str(results / "run" / "last.pt")


def test_fid_checks_ref_and_out_before_any_inception(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: pytest.fail("ran before checking the flags"))
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    fails(capsys, fid.main, ["--ref", tmp_path, "--sample", tmp_path / "s.npz"], "--ref", "is a folder", ".npz")
    fails(capsys, fid.main, ["--ref", tmp_path / "s.npz", "--sample", tmp_path / "s.npz", "--out",
                             tmp_path / "missing" / "m.json"], "--out", "not a writable folder")


def test_weights_of_another_kind_are_named(capsys, tmp_path, finished):
    # a PNG or a training checkpoint as --enc-weights, and an empty folder as --vae-weights: the line says what
    # the file or folder is missing, not "pass --enc-weights PATH"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "not_weights.png")
    for path in (tmp_path / "not_weights.png", finished / "run" / "last.pt"):
        line = fails(capsys, train, TINY + ["--enc-weights", path, "--mode", "redi", "--results-dir", tmp_path],
                     "--enc-weights", "holds no weights of", "model.safetensors")
        assert str(path) in line
    (tmp_path / "vae").mkdir()
    fails(capsys, train, TINY + ["--space", "latent", "--image-size", "32", "--vae-weights", tmp_path / "vae",
                                 "--results-dir", tmp_path], "--vae-weights", "without config.json")


def test_a_checkpoint_with_nan_weights_is_named_not_sampled_or_resumed(capsys, results):
    last = results / "run" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    for part in ("model", "ema"):
        ckpt[part]["final_layer.linear.weight"][0, 0] = float("nan")
    torch.save(ckpt, last)
    fails(capsys, S.main, ["--ckpt", last], "not finite", "final_layer.linear.weight", "step_N.pt", keep=[results])
    fails(capsys, train, run_flags(results, "--resume", "--max-steps", 4), "non-finite weights", "--restart",
          keep=[results])


def test_sample_many_on_a_full_disk_keeps_the_finished_and_resumes(capsys, finished, tmp_path, monkeypatch):
    out = tmp_path / "s"
    argv = ["--ckpt", finished / "run" / "last.pt", "--steps", 2, "--num-samples", 3, "--batch-size", 1, "--out", out]
    save, calls = Image.Image.save, []

    def full_disk_at_the_third(self, fp, *a, **kw):
        calls.append(fp)
        if len(calls) == 3:
            with open(fp, "wb") as f:
                f.write(b"half")
            raise OSError(28, "No space left on device")
        return save(self, fp, *a, **kw)
    monkeypatch.setattr(Image.Image, "save", full_disk_at_the_third)
    fails(capsys, sample, argv, "No space left on device", "finished samples are kept", "same command")
    assert sorted(p.name for p in out.glob("*.png*")) == ["000000.png", "000001.png"]  # no partial file
    monkeypatch.setattr(Image.Image, "save", save)
    sample(argv)  # resumes: only the missing sample, then the .npz
    assert np.load(tmp_path / "s.npz")["arr_0"].shape[0] == 3


def test_path_flags_name_a_folder_a_missing_file_and_no_permission(capsys, tmp_path, finished, monkeypatch):
    # file flags given a folder say "is a folder"; a file given where a folder is due says "is a file"
    (tmp_path / "refs").mkdir()
    fails(capsys, train, run_flags(tmp_path, "--fid-every", 1, "--fid-ref", tmp_path / "refs", "--fid-samples", 4),
          "--fid-ref", "is a folder", ".npz")
    fails(capsys, train, TINY + ["--mode", "redi", "--pca-file", tmp_path / "refs", "--results-dir", tmp_path],
          "--pca-file", "is a folder", "pca.pt")
    fails(capsys, train, TINY + ["--mode", "redi", "--enc-weights", tmp_path / "refs", "--results-dir", tmp_path],
          "--enc-weights", "is a folder", "weights file")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    fails(capsys, train, TINY + ["--space", "latent", "--image-size", "32", "--vae-weights", tmp_path / "x.png",
                                 "--results-dir", tmp_path], "--vae-weights", "is a file", "AutoencoderKL folder")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")  # the config alone: the weights are named, before diffusers
    fails(capsys, train, TINY + ["--space", "latent", "--image-size", "32", "--vae-weights", tmp_path / "vae",
                                 "--results-dir", tmp_path], "without diffusion_pytorch_model.safetensors")
    fails(capsys, S.main, ["--results-dir", tmp_path / "x.png"], "--results-dir", "is a file")
    # no read permission (root passes permission checks, so os.access stands in for a chmod 000)
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).endswith("s.npz") else real(p, mode, **kw))
    fails(capsys, fid.main, ["--ref", tmp_path / "s.npz", "--sample", tmp_path / "s.npz"], "--ref", "s.npz",
          "no read permission")  # before the Inception is loaded


def test_an_unreadable_class_folder_is_one_line(capsys, images, tmp_path, monkeypatch):
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "Permission denied", p))
                        if str(p).endswith(os.sep + "b") else real(p))
    fails(capsys, train, TINY + ["--data-path", images, "--num-classes", 2, "--results-dir", tmp_path],
          "--data-path", "cannot be read", "Permission denied", "chmod")


def test_prepare_makes_the_missing_folders_above_out(images, tmp_path):
    out = tmp_path / "new" / "deeper" / "cache"
    os.remove(images / "b" / "1.png")  # the fixture's broken image
    P.main(P.get_args([str(a) for a in ["--data-path", images, "--out", out, "--vae-weights", "random",
                                        "--image-size", "16", "--num-workers", "0", "--batch-size", "2"]]))
    assert (out / "meta.json").is_file()
