"""experiments/digits.py: the shipped digits and their fixed split, the 32-px ImageFolder train.py
reads, the evaluator's metrics on known inputs, the encoder's round trip through --enc-weights, and
the whole command at a tiny budget (every generator a `python train.py` run)."""
import hashlib
import json

import numpy as np
import pytest
import torch

import fid
import model as M
import train as T
from experiments import digits as D
from support.data import ImageFolder
from support.frozen import make_encoder

TINY = ["--steps", "2", "--eval-every", "1", "--seeds", "0", "--runs", "sit,coredi-random",
        "--samples", "70", "--sample-steps", "2", "--enc-steps", "3", "--evaluator-steps", "30",
        "--cls-batch", "16", "--batch", "8", "--pca-images", "8"]
SPLIT = {  # pinned: the count and the sha256 of the indices (int64, little-endian) of each split
    "train": (1000, "e6ce6f035337984a"),
    "evaluator": (400, "18401d7f9b0d9145"),
    "reference": (397, "8c446d7d4c905472"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    D.main(TINY + ["--out", str(out)])
    return out


def test_shipped_file_holds_the_1797_digits():
    with np.load(D.DATA, allow_pickle=False) as f:
        images, labels, split = f["images"], f["labels"], f["split"]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 16  # the source's counts, not rescaled
    assert labels.shape == (1797,) and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert split.shape == (1797,) and set(np.unique(split)) == {0, 1, 2}
    assert hashlib.sha256(images.tobytes()).hexdigest()[:16] == "8f26b2bd9d135c25"


def test_split_is_fixed_and_disjoint():
    parts = {name: D.split_indices(name) for name in D.SPLITS}
    for name, idx in parts.items():
        digest = hashlib.sha256(idx.astype("<i8").tobytes()).hexdigest()[:16]
        assert (len(idx), digest) == SPLIT[name]
        assert np.array_equal(idx, D.split_indices(name))  # the same every call
    together = np.concatenate(list(parts.values()))
    assert len(np.unique(together)) == len(together) == 1797  # disjoint, and every digit in one


def test_the_file_is_scikit_learns_digits(tmp_path):
    pytest.importorskip("sklearn")  # not a dependency: where it is installed, the file is rebuilt
    from sklearn.datasets import load_digits
    d = load_digits()
    D.extract(tmp_path / "digits.npz")
    with np.load(D.DATA, allow_pickle=False) as f, np.load(tmp_path / "digits.npz") as g:
        assert np.array_equal(f["images"], d.images) and np.array_equal(f["labels"], d.target)
        assert all(np.array_equal(f[k], g[k]) for k in ("images", "labels", "split"))


def test_upscaled_digits_and_balanced_choice():
    images, labels = D.load_split("reference")
    assert images.shape == (397, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], images[:, 2])  # grey
    assert images.max() == 255 and (images == 0).float().mean() > 0.3  # white ink on black
    idx = D.balanced(labels, 30)
    assert labels[idx].tolist() == [i % 10 for i in range(30)] and len(set(idx)) == 30


def test_image_folder_is_the_train_split_as_train_py_reads_it(run):
    data = ImageFolder(str(run / "data" / "train"), 32)
    images, labels = D.load_split("train")
    assert len(data) == 1000 and data.labels.tolist() == sorted(labels.tolist())
    order = {int(path.rsplit("/", 1)[1][:4]): k for k, (path, _) in enumerate(data.files)}
    for k, i in enumerate(D.split_indices("train")[::97]):  # a few, by their index in the file
        x, y = data[order[int(i)]]
        assert torch.equal(x, images[k * 97]) and y == labels[k * 97]


def test_command_writes_table_chart_and_samples(run):
    for f in ("digits.md", "digits.json", "digits.png", "samples.png", "encoder.safetensors",
              "evaluator.pt"):
        assert (run / f).stat().st_size > 0
    res = json.loads((run / "digits.json").read_text())
    assert res["steps"] == [1, 2] and set(res["curves"]) == {"sit", "coredi-random"}
    table = (run / "digits.md").read_text()
    for name, runs in res["curves"].items():  # every run's measurements are in the table
        assert f"| {name} | {runs[0]['fd'][0]:.2f} |" in table
    assert "real reference digits (the ceiling)" in table
    flags = json.loads((run / "coredi-random-s0" / "measured.json").read_text())["flags"]
    assert flags[-2:] == ["--enc-weights", "tiny"]  # the control: a random encoder


def test_rerun_reuses_finished_runs_and_refuses_other_settings(run):
    D.main(TINY + ["--out", str(run)])  # nothing to train: every run has its measurements
    with pytest.raises(M.UserError, match="other settings"):
        D.main(TINY[:-2] + ["--pca-images", "9", "--out", str(run)])


def test_evaluator_fd_is_zero_for_identical_sets_and_grows_with_a_shift(run):
    net, _, ref_stats = D.load_evaluator(run / "evaluator.pt")
    images, _ = D.load_split("reference")
    assert abs(D.C.toy_fd(net, images, ref_stats)) < 1e-6  # the reference set against itself
    shifted = [D.C.toy_fd(net, torch.roll(images, s, dims=-1), ref_stats) for s in (2, 6)]
    assert 0 < shifted[0] < shifted[1]


def test_ceiling_is_the_evaluators_accuracy_on_the_real_reference_digits(run):
    net, ckpt, ref_stats = D.load_evaluator(run / "evaluator.pt")
    images, labels = D.load_split("reference")
    acc = D.C.class_accuracy(net, images.permute(0, 2, 3, 1), labels)  # NHWC, as samples come
    reported = json.loads((run / "digits.json").read_text())["evaluator_accuracy"]
    assert acc == ckpt["accuracy"] == reported
    assert f"accuracy on all reference digits: {acc:.3f}" in (run / "digits.md").read_text()
    real = D.real_values(net, ref_stats, 70)
    idx = D.balanced(labels, 70)
    assert real["reference"]["acc"] == D.C.class_accuracy(net, images[idx], labels[idx])
    feats = D.C.evaluator_outputs(net, images[idx])[0]
    assert real["reference"]["fd"] == pytest.approx(fid.frechet_distance(*fid.statistics(feats),
                                                                         *ref_stats))


def test_encoder_loads_through_enc_weights_with_its_architecture(run):
    path = str(run / "encoder.safetensors")
    args = T.get_args(["--mode", "redi", "--enc-weights", path, "--enc-size", "112"])
    enc = make_encoder(args)
    assert enc.dim == D.C.TINY["embed_dim"] and len(enc.net.blocks) == 2 and enc.grid == (8, 8)
    from safetensors.torch import load_file
    saved = load_file(path)
    assert all(torch.equal(saved[k], v) for k, v in enc.net.state_dict().items())
    info = D.C.encoder_info(path)
    assert 0 <= float(info["accuracy"]) <= 1 and "train split" in info["trained_on"]
