"""redi's features stored in the latent cache (prepare.py --features): a run that reads them equals, step for step,
the same run with the encoder in the loop; what the cache stores is what the encoder and the PCA compute; a cache
that cannot serve a run is refused in one line."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import model as M
import prepare as P
import train as T
from test_errors import fails, train
from support.data import Flipped, LatentCache
from support.frozen import VAE, fit_projection, make_encoder
from support.runs import load_projection_file, pca_fingerprint

# The encoder, PCA and seed are shared by prepare.py and train.py; the VAE is the SD-VAE architecture, random.
SHARED = ["--image-size", "32", "--vae-weights", "random", "--num-workers", "0", "--enc-weights", "tiny",
          "--enc-size", "56", "--pca-images", "16", "--seed", "3"]
RUN = SHARED + ["--mode", "redi", "--space", "latent", "--model", "DiT-T/2", "--num-classes", "2",
                "--global-batch-size", "8", "--lr", "1e-3", "--warmup-steps", "0", "--max-steps", "4",
                "--log-every", "1", "--sample-every", "0", "--ckpt-every", "1000", "--keep-every", "0"]
CACHES = {  # name: prepare.py flags. "images": the cache an encoder-in-the-loop run reads; "features": redi's own
    "images32": ["--dtype", "float32"],
    "images32flip": ["--dtype", "float32", "--flip"],
    "features32": ["--dtype", "float32", "--features", "--no-images"],
    "features32flip": ["--dtype", "float32", "--features", "--flip", "--no-images"],
    "images16": ["--dtype", "float16"],
    "features16": ["--dtype", "float16", "--features", "--no-images"],
    "bare": ["--no-images"],  # moments alone: sit only
}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature_cache")
    for c in ("a", "b"):
        os.makedirs(root / "imgs" / c)
        for i in range(8):
            pixels = np.random.default_rng(i + 8 * (c == "b")).integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "imgs" / c / f"{i}.png")
    for name, flags in CACHES.items():
        P.main(P.get_args(SHARED + ["--data-path", str(root / "imgs"), "--out", str(root / name)] + flags))
    return root


def run(root, cache, name, *flags):
    dit, ema, proj = T.main(T.get_args(RUN + ["--latent-cache", str(root / cache), "--results-dir", str(root / "runs"),
                                              "--run-name", name, "--restart", *flags]))
    with open(root / "runs" / name / "log.jsonl") as f:
        return dit, proj, [json.loads(line) for line in f]


@pytest.mark.parametrize("dtype,flip", [("32", False), ("32", True), ("16", False)])
def test_redi_from_cached_features_equals_the_encoder_in_the_loop(caches, monkeypatch, dtype, flip):
    """Both runs read the same moments (same --dtype), so they differ only in where z~ comes from. float32: the
    numbers the loop computes, up to the order of float32 sums (prepare.py projects 16 images at once, the loop 8),
    so 1e-5. float16: each stored feature is off by at most 2^-11 of itself (round to nearest, 10 stored mantissa
    bits; test_stored_features below), and loss_z, a mean of squared errors of such terms, by at most about twice
    that: 2^-10 relative. loss_x sees the features only through the weights: 1e-5."""
    flags = ["--flip"] * flip
    _, proj_a, log_a = run(caches, f"images{dtype}" + "flip" * flip, f"loop{dtype}{flip}", *flags)
    built = []
    monkeypatch.setattr(T, "make_encoder", lambda args: built.append(args))  # a run from the features builds none
    dit_b, proj_b, log_b = run(caches, f"features{dtype}" + "flip" * flip, f"cached{dtype}{flip}", *flags)
    assert built == []
    assert torch.equal(proj_a.P, proj_b.P) and torch.equal(proj_a.enc_mean, proj_b.enc_mean)  # the same PCA fit
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b] == [1, 2, 3, 4]
    rtol_z = 1e-5 if dtype == "32" else 2 ** -10
    for a, b in zip(log_a, log_b):
        assert b["loss_x"] == pytest.approx(a["loss_x"], rel=1e-5)
        assert b["loss_z"] == pytest.approx(a["loss_z"], rel=rtol_z)
    if dtype == "32":  # and so the weights
        dit_a = torch.load(caches / "runs" / f"loop{dtype}{flip}" / "last.pt", weights_only=True)["model"]
        for k, v in dit_b.state_dict().items():
            torch.testing.assert_close(v, dit_a[k], rtol=1e-5, atol=1e-6)


def test_stored_features(caches):
    """features.npy holds proj(encoder(image)) of each image and, as view 1, of its mirror image; float16 storage is
    within 2^-11 of each float32 value; pca.pt is the projection of meta.json's fingerprint."""
    meta = json.loads((caches / "features32flip" / "meta.json").read_text())
    f = meta["features"]
    assert (f["views"], f["feat_dim"], f["grid"], f["enc_size"], f["enc_weights"], f["enc_seed"]) == \
        (2, 8, [4, 4], 56, "tiny", 3)
    assert meta["images"] is False and not (caches / "features32flip" / "images.npy").exists()
    args = T.get_args(RUN + ["--latent-cache", str(caches / "images32")])
    encoder = make_encoder(args)
    proj = M.build_projection("redi", encoder.dim, 8)
    load_projection_file(str(caches / "features32flip" / "pca.pt"), proj)
    assert pca_fingerprint(proj) == f["pca"]
    images = torch.from_numpy(np.load(caches / "images32" / "images.npy")).permute(0, 3, 1, 2)
    x = images.float() / 127.5 - 1
    with torch.no_grad():
        want = torch.stack([proj(encoder(x)), proj(encoder(x.flip(-1)))], 1)
    stored = torch.from_numpy(np.load(caches / "features32flip" / "features.npy"))
    torch.testing.assert_close(stored, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stored[:, 0], stored[:, 1], atol=1e-2)  # the mirror image's features are its own
    f32 = np.load(caches / "features32" / "features.npy")
    f16 = np.load(caches / "features16" / "features.npy")
    assert f16.dtype == np.float16 and f32.dtype == np.float32
    assert np.all(np.abs(f16.astype(np.float32) - f32) <= 2 ** -11 * np.abs(f32) + 2 ** -24)  # + fp16's smallest step
    m32, m16 = np.load(caches / "images32" / "moments.npy"), np.load(caches / "images16" / "moments.npy")
    assert np.all(np.abs(m16.astype(np.float32) - m32) <= 2 ** -11 * np.abs(m32) + 2 ** -24)


def test_layouts_and_bytes(caches):
    """What each layout stores per image (16 images; every .npy has a 128-byte header): a redi cache without images
    is the moments (8 x 4 x 4 here) and the features (16 tokens x 8) alone."""
    size = lambda c: sum(os.path.getsize(caches / c / f) for f in ("moments.npy", "moments_flipped.npy",
                                                                  "features.npy", "images.npy")
                         if (caches / c / f).exists())
    assert size("images32") == 2 * 128 + 16 * (8 * 4 * 4 * 4 + 32 * 32 * 3)
    assert size("features16") == 2 * 128 + 16 * (8 * 4 * 4 * 2 + 16 * 8 * 2)
    assert size("features32flip") == 3 * 128 + 16 * (2 * 8 * 4 * 4 * 4 + 2 * 16 * 8 * 4)  # + the flipped images'


def test_flipped_latents_are_encoded_not_flipped(caches):
    # The SD-VAE is not flip-equivariant: prepare.py --flip encodes the mirror images, and a flipped sample of a run
    # reads those moments (with the mirrored image), as SiT flips the image and then encodes it.
    data = LatentCache(str(caches / "images32flip"), 32, "random")
    moments, flipped = np.load(caches / "images32flip" / "moments.npy"), \
        np.load(caches / "images32flip" / "moments_flipped.npy")
    torch.manual_seed(3)  # the cache's VAE: random, seeded as prepare.py seeds it (--seed 3)
    vae = VAE("random")
    img = torch.from_numpy(np.load(caches / "images32flip" / "images.npy")[:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(vae.moments(img.flip(-1)), torch.from_numpy(flipped[:2]), atol=1e-4, rtol=1e-4)
    assert not np.allclose(flipped[:2], moments[:2, :, :, ::-1], atol=1e-3)  # not the stored latent, flipped
    data.keys = ["latent", "latent_flipped", "image"]
    item, _ = Flipped(data)[(1, True)]
    assert torch.equal(item["latent"], torch.from_numpy(flipped[1]))
    assert torch.equal(item["image"], data[1][0]["image"].flip(-1)) and "latent_flipped" not in item
    item, _ = Flipped(data)[(1, False)]
    assert torch.equal(item["latent"], torch.from_numpy(moments[1])) and "latent_flipped" not in item


def test_sit_reads_a_cache_without_images(caches):
    _, _, log = run(caches, "features32flip", "sit", "--mode", "sit", "--max-steps", "1")  # sit flips
    assert len(log) == 1 and np.isfinite(log[0]["loss_x"])


@pytest.fixture(scope="module")
def other_pca(caches):
    """A projection fitted on other images than the cache's (8 of them)."""
    args = T.get_args(RUN + ["--pca-images", "8", "--seed", "5"])
    encoder = make_encoder(T.get_args(RUN))
    proj = M.build_projection("redi", encoder.dim, 8)
    fit_projection(proj, LatentCache(str(caches / "images32"), 32, "random"), encoder, args, "cpu", 1)
    torch.save(proj.state_dict(), caches / "other_pca.pt")
    return caches / "other_pca.pt"


@pytest.mark.parametrize("cache,flags,words", [
    ("features32", ["--mode", "coredi"], ["no images", "coredi", "--no-images"]),
    ("features32", ["--mode", "repa"], ["no images", "REPA"]),
    ("features32", ["--repa"], ["no images", "REPA"]),
    ("bare", [], ["no images", "redi's features"]),  # redi without stored features runs the encoder
    ("features32", ["--flip"], ["--flip", "--no-flip"]),
    ("features32", ["--enc-size", "112"], ["112 px", "56 px", "prepare.py --features"]),
    ("features32", ["--feat-dim", "4"], ["--feat-dim 4", "--feat-dim 8"]),
    ("features32", ["--seed", "4"], ["seed 3", "seed 4"]),
    ("features32", ["--pca-file"], ["--pca-file", "not the PCA that made the features"]),
    ("features32", ["--pca-file", "SIGN"], ["--pca-file", "not the PCA that made the features"]),
])
def test_refusals(capsys, caches, other_pca, cache, flags, words):
    if flags == ["--pca-file", "SIGN"]:  # the cache's own PCA but for the sign of one direction
        pca = torch.load(caches / "features32" / "pca.pt", weights_only=True)
        pca["P"][:, 0] *= -1
        torch.save(pca, caches / "sign_pca.pt")
        flags = ["--pca-file", caches / "sign_pca.pt"]
    flags = [*flags, other_pca] if flags == ["--pca-file"] else flags
    fails(capsys, train, RUN + ["--latent-cache", caches / cache, "--results-dir", caches / "refused", *flags], *words,
          keep=[caches / cache])
    assert not (caches / "refused").exists()


def test_prepare_defaults_are_train_redi_defaults():
    """prepare.py --features makes the features of train.py --mode redi's defaults."""
    p, t = P.get_args(["--data-path", "x", "--out", "y"]), T.get_args(["--mode", "redi", "--latent-cache", "y"])
    assert [getattr(p, k) for k in ("enc", "enc_weights", "enc_size", "feat_dim", "pca_images", "seed")] == \
        [getattr(t, k) for k in ("enc", "enc_weights", "enc_size", "feat_dim", "pca_images", "seed")]


def test_resume_needs_the_pca_of_the_features(capsys, caches, other_pca):
    """A run resumed on another cache (--latent-cache may change on resume) must find features of its own PCA."""
    P.main(P.get_args(SHARED + ["--data-path", str(caches / "imgs"), "--out", str(caches / "features_other"),
                                "--dtype", "float32", "--features", "--no-images", "--pca-file", str(other_pca)]))
    run(caches, "features32", "resumed", "--max-steps", "2")
    flags = RUN + ["--results-dir", caches / "runs", "--run-name", "resumed", "--resume", "--max-steps", "3"]
    fails(capsys, train, flags + ["--latent-cache", caches / "features_other"], "last.pt", "--pca-file",
          keep=[caches / "runs" / "resumed"])
    T.main(T.get_args([str(f) for f in flags] + ["--latent-cache", str(caches / "features32")]))  # its own: resumes
    assert torch.load(caches / "runs" / "resumed" / "last.pt", weights_only=True)["step"] == 3
