"""convergence.py: the toy evaluator's Frechet distance and accuracy, the toy encoder's round trip through
--enc-weights, and the whole command at a tiny budget (every generator a `python train.py` run)."""
import json

import numpy as np
import pytest
import torch

from experiments import convergence as C
import fid
import model as M
import train as T
from support.data import SyntheticImages
from support.frozen import DINO, Encoder, make_encoder

TINY = ["--steps", "2", "--eval-every", "1", "--seeds", "0,1", "--samples", "70", "--sample-steps", "2",
        "--ref-images", "100", "--enc-images", "100", "--enc-steps", "3", "--evaluator-images", "100",
        "--evaluator-steps", "3", "--cls-batch", "16", "--batch", "8", "--synthetic", "32", "--pca-images", "8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence")
    C.main(TINY + ["--out", str(out)])
    return out


def test_command_writes_table_and_chart(run):
    for f in ("convergence.md", "convergence.json", "convergence.png", "toy_encoder.safetensors", "toy_evaluator.pt"):
        assert (run / f).stat().st_size > 0
    res = json.loads((run / "convergence.json").read_text())
    assert res["steps"] == [1, 2] and set(res["curves"]) == set(C.MODES)
    assert all(len(r["fd"]) == 2 for runs in res["curves"].values() for r in runs)
    table = (run / "convergence.md").read_text()
    for mode in C.MODES:
        assert f"| {mode} |" in table
    for m, runs in res["curves"].items():  # every run's measurements are in the table, to its precision
        assert f"| {m} | {np.mean([r['fd'][0] for r in runs]):.2f} (" in table


def test_rerun_reuses_finished_runs_and_refuses_other_settings(run):
    C.main(TINY + ["--out", str(run)])  # nothing to train: every run has its measurements
    with pytest.raises(M.UserError, match="other settings"):
        C.main(TINY[:-2] + ["--pca-images", "9", "--out", str(run)])


def test_a_failed_train_py_run_is_a_one_line_error_naming_it(run):
    # each generator is a `python train.py` process; its failure (here: train.py refuses a flag) names the run
    # and train.py's own error, without a traceback, and leaves the finished runs alone
    argv = TINY[:4] + ["--seeds", "5"] + TINY[6:] + ["--out", str(run), "--lr", "-1"]
    with pytest.raises(M.UserError) as e:
        C.main(argv)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"run {run / 'sit-s5'}: train.py failed (exit status 1): ")
    assert "--lr" in msg and "Traceback" not in msg
    assert not (run / "sit-s5").exists() and (run / "sit-s0" / "measured.json").exists()


def test_evaluator_fd_is_zero_for_identical_sets_and_grows_with_a_shift(run):
    net, _, _ = C.load_evaluator(run / "toy_evaluator.pt")
    images, _ = C.hard_set(100, 32, C.REF_SEED)
    stats = fid.statistics(C.evaluator_outputs(net, images)[0])
    assert abs(C.toy_fd(net, images, stats)) < 1e-6
    shifted = [C.toy_fd(net, (images.int() + s).clamp(0, 255).to(torch.uint8), stats) for s in (20, 60, 120)]
    assert 0 < shifted[0] < shifted[1] < shifted[2]
    # and in feature space the distance of a mean shift by delta is exactly |delta|^2
    f = C.evaluator_outputs(net, images)[0]
    delta = np.full(f.shape[1], 0.1)
    d = fid.frechet_distance(*fid.statistics(f + delta), *fid.statistics(f))
    assert d == pytest.approx(delta @ delta, rel=1e-4, abs=1e-6)


def test_evaluator_accuracy_on_real_held_out_images_is_the_reported_one(run):
    net, ckpt, _ = C.load_evaluator(run / "toy_evaluator.pt")
    images, labels = C.hard_set(ckpt["ref_images"], ckpt["image_size"], ckpt["ref_seed"])
    assert C.class_accuracy(net, images.permute(0, 2, 3, 1), labels) == ckpt["accuracy"]  # NHWC, as samples come


def test_toy_encoder_loads_through_enc_weights_with_its_architecture(run):
    path = str(run / "toy_encoder.safetensors")
    args = T.get_args(["--mode", "redi", "--enc", DINO, "--enc-weights", path, "--enc-size", "56"])
    enc = make_encoder(args)
    assert enc.dim == C.TINY["embed_dim"] and len(enc.net.blocks) == C.TINY["depth"] and enc.grid == (4, 4)
    from safetensors.torch import load_file
    saved = load_file(path)
    assert all(torch.equal(saved[k], v) for k, v in enc.net.state_dict().items())


def test_hard_synthetic_set_is_deterministic_and_leaves_the_default_set_alone():
    a, b = SyntheticImages(20, 32, seed=3, hard=True), SyntheticImages(20, 32, seed=3, hard=True)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == i % 10 for i in range(20))
    easy = SyntheticImages(20, 32, seed=3)
    assert not any(torch.equal(a[i][0], easy[i][0]) for i in range(20))


def test_unreadable_safetensors_is_a_one_line_error(tmp_path):
    bad = tmp_path / "enc.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(M.UserError, match="cannot read encoder weights"):
        Encoder(DINO, str(bad), 56)
