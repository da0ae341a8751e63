"""Parity with the reference codes: the released weights of ReDi and REPA load strictly and give the reference
networks' outputs (golden fixtures made by running zelaki/ReDi and sihyun-yu/REPA, see tests/fixtures/README.md);
ReDi's feature fusion and PCA file; CoReDi's stop-gradient in both spaces."""
import json
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import model as M
import sample
import train as T
from support.released import load_redi_pca, load_released, read_redi_pca

FIXTURES = Path(__file__).parent / "fixtures"
TOL = dict(atol=1e-5, rtol=1e-5)  # >10x the fixtures' float32-vs-float64 differences (README)


def fixture(name):
    return torch.load(FIXTURES / name, weights_only=True)


# -----------------------------------------------------------------------------
# ReDi: SiT with the 8 PCA channels concatenated to the 4 VAE channels

def test_redi_weights_load_and_match_the_reference_forward():
    f = fixture("redi_tiny.pt")
    model, cfg = load_released(f["state_dict"], num_heads=f["config"]["num_heads"])
    assert (cfg["mode"], model.in_channels, model.feat_dim, model.fusion) == ("redi", 4, 8, "channels")
    out_x, out_z, _ = model(f["x"][:, :4], f["t"], f["y"], f["x"][:, 4:])
    torch.testing.assert_close(torch.cat([out_x, out_z], 1), f["out"], **TOL)
    # the learn_sigma=True form: the doubled final layer is cut to its first half per patch
    v = f["learn_sigma_true"]
    model, _ = load_released({**f["state_dict"], **v["state_dict_overrides"]}, num_heads=4)
    torch.testing.assert_close(torch.cat(model(f["x"][:, :4], f["t"], f["y"], f["x"][:, 4:])[:2], 1), v["out"], **TOL)


def test_redi_guidance_matches_cfg_vae_and_rg():
    f = fixture("redi_tiny.pt")
    g = f["guidance"]
    model, _ = load_released(f["state_dict"], num_heads=4)
    x, t = g["x"][:2], float(g["t"][0])
    state = (x[:, :4], x[:, 4:])
    # CFG on the VAE channels only (ReDi's --cfg-vae): features keep the conditional prediction
    vx, vz = sample.guided_velocity(model, g["y_cfg"][:2], "v", cfg_scale=float(g["cfg_scale"]))(state, t)
    torch.testing.assert_close(torch.cat([vx, vz], 1), g["out_cfg_vae"][:2], **TOL)
    # representation guidance on all channels (forward_with_rg): the no-feature branch sees a zero feature input
    vx, vz = sample.guided_velocity(model, g["y_rg"][:2], "v", cfg_rep=float(g["rg_scale"]))(state, t)
    torch.testing.assert_close(torch.cat([vx, vz], 1), g["out_rg"][:2], **TOL)


def test_redi_xl_manifest_is_our_latent_redi_model():
    man = json.loads((FIXTURES / "redi_xl_manifest.json").read_text())
    with torch.device("meta"):  # shapes only
        ours = M.create_model("SiT-XL/2", input_size=32, in_channels=4, feat_dim=8, fusion="channels")
        model, cfg = load_released({k: torch.empty(s) for k, s in man["keys"]})
    assert [[k, list(v.shape)] for k, v in ours.state_dict().items()] == man["keys"]  # same keys, order, shapes
    assert (cfg["mode"], cfg["model"], cfg["image_size"], model.feat_dim) == ("redi", "SiT-XL/2", 256, 8)


# -----------------------------------------------------------------------------
# REPA: SiT + projector, with time running the other way and an eps - x output

def test_repa_weights_load_with_the_time_flip_and_match_the_reference():
    f = fixture("repa_tiny.pt")
    sd = f["state_dict"]
    model, cfg = load_released(sd, repa_depth=f["config"]["encoder_depth"], num_heads=4)
    assert cfg["mode"] == "repa" and model.repa_depth == 1
    # REPA's f(x, s) with s its time (1 = noise); ours at t = 1 - s must give -f, and the same projections
    out_x, _, repa = model(f["x"], 1 - f["t"], f["y"])
    torch.testing.assert_close(out_x, -f["out"], **TOL)
    torch.testing.assert_close(repa, f["zs"][0], **TOL)
    # without the conversion it is another function entirely (the test can fail)
    raw = {k.replace("projectors.0.", "projector."): v for k, v in sd.items()}
    plain = M.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                  repa_depth=1, repa_dim=32, projector_dim=128)
    plain.load_state_dict(raw)
    assert (plain(f["x"], 1 - f["t"], f["y"])[0] + f["out"]).abs().max() > 1e-2


def test_repa_xl_manifest_maps_to_our_repa_model():
    man = json.loads((FIXTURES / "repa_xl_manifest.json").read_text())
    with torch.device("meta"):
        ours = M.create_model("SiT-XL/2", input_size=32, in_channels=4, repa_depth=8, repa_dim=768)
        model, cfg = load_released({k: torch.empty(s) for k, s in man["keys"]})
    theirs = {k.replace("projectors.0.", "projector."): s for k, s in man["keys"]}
    assert {k: list(v.shape) for k, v in ours.state_dict().items()} == theirs
    assert (cfg["mode"], cfg["model"], model.repa_depth) == ("repa", "SiT-XL/2", 8)


def test_unknown_checkpoint_is_refused_in_one_line():
    with pytest.raises(M.UserError, match="expected the released weights of SiT, ReDi, REPA, JiT or SVG") as e:
        load_released({"net.weight": torch.zeros(3)})
    assert "\n" not in str(e.value)


def test_sample_py_accepts_a_wrapped_reference_training_checkpoint(tmp_path):
    # ReDi's and REPA's training checkpoints: {'model', 'ema', 'opt', 'args' (an argparse.Namespace)}
    import argparse
    redi = M.create_model("SiT-T/2", input_size=8, in_channels=4, feat_dim=8, fusion="channels", num_classes=10)
    ema = {k: v + 1 for k, v in redi.state_dict().items()}
    path = tmp_path / "redi.pt"
    torch.save({"model": redi.state_dict(), "ema": ema, "opt": {}, "args": argparse.Namespace(lr=1e-4)}, path)
    model, cfg = sample.load_checkpoint(str(path), argparse.Namespace(raw=False, mode=None))
    assert (cfg["mode"], cfg["model"], cfg["image_size"], model.feat_dim) == ("redi", "SiT-T/2", 64, 8)
    assert torch.equal(model.state_dict()["y_embedder.embedding_table.weight"], ema["y_embedder.embedding_table.weight"])
    with pytest.raises(M.UserError, match="none of the sizes"):  # an unnamed size is refused, not guessed
        load_released(fixture("redi_tiny.pt")["state_dict"])


# -----------------------------------------------------------------------------
# ReDi's PCA file and feature fusion

class StandInPCA:
    """Pickled under scikit-learn's module path, as ReDi's file holds a fitted sklearn PCA."""


def write_redi_pca_file(path, mean, std, pca_mean, components):
    names = ("sklearn", "sklearn.decomposition", "sklearn.decomposition._pca")
    modules = {n: types.ModuleType(n) for n in names}  # scikit-learn itself is not installed, nor needed
    StandInPCA.__module__, StandInPCA.__qualname__ = names[-1], "PCA"
    modules[names[-1]].PCA = StandInPCA
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(modules)
    try:
        pca = StandInPCA()
        pca.__dict__.update(n_components=len(components), whiten=False, components_=components, mean_=pca_mean,
                            explained_variance_=np.linspace(5, 1, len(components)).astype(np.float32))
        torch.save({"pca_model": pca, "mean": mean, "std": std}, path)
    finally:
        for n, m in saved.items():
            if m is None:
                del sys.modules[n]
            else:
                sys.modules[n] = m


def test_redi_pca_file_gives_redis_projection_and_fusion(tmp_path):
    f = fixture("redi_features.pt")  # ReDi's own lines run on stand-in statistics
    path = tmp_path / "dino_pca_model.pth"
    write_redi_pca_file(path, *(f[k].numpy() for k in ("mean", "std", "pca_mean", "components")))
    proj = M.FeatureProjection(32, 8)
    load_redi_pca(proj, read_redi_pca(path))
    z = proj(f["z0"])
    torch.testing.assert_close(z, f["z_tokens"], **TOL)  # ((z - mean)/std - pca.mean_) @ components_[:8].T
    dit = M.DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4, feat_dim=8,
                fusion="channels")
    zc = dit.features_in(z, (16, 16))  # 16x16 tokens -> bilinear 32x32, align_corners=False
    torch.testing.assert_close(zc, f["z_pca"], **TOL)
    torch.testing.assert_close(torch.cat([f["x"], zc], 1), f["x_joint"], **TOL)  # VAE channels first


def test_redi_pca_file_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path = tmp_path / "evil.pth"
    torch.save({"pca_model": Evil(), "mean": np.zeros(4), "std": np.ones(4)}, path)
    with pytest.raises(M.UserError, match="refusing to unpickle .*system"):
        read_redi_pca(path)
    assert not marker.exists()
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"pca_model": 1}))
    with pytest.raises(M.UserError, match="cannot read|not ReDi's PCA file"):
        read_redi_pca(tmp_path / "plain.pkl")


# -----------------------------------------------------------------------------
# CoReDi's stop-gradient: with a network that ignores its feature input, the feature loss gives P no gradient

@pytest.mark.parametrize("space", ["latent", "pixel"])
def test_stop_gradient_holds_in_both_spaces(space):
    latent = space == "latent"
    dit = M.DiT(input_size=8 if latent else 16, patch_size=2 if latent else 4, in_channels=4 if latent else 3,
                hidden_size=64, depth=1, num_heads=4, num_classes=4, feat_dim=8,
                fusion="channels" if latent else "tokens")
    for p in dit.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():  # cut the feature input path: the outputs no longer see z_t
        if latent:
            dit.x_embedder.proj.weight[:, 4:] = 0
        else:
            dit.z_embedder.weight.zero_()
    proj = M.FeatureProjection(32, 8, learnable=True)
    proj.fit(torch.randn(500, 32))
    g = torch.Generator().manual_seed(0)
    B, C, S = 4, dit.in_channels, dit.input_size
    x, y, z0 = torch.randn(B, C, S, S, generator=g), torch.arange(B) % 4, torch.randn(B, 16, 32, generator=g)
    noise = T.Noise(torch.rand(B, generator=g) * 0.9, torch.zeros(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool),
                    torch.randn(B, C, S, S, generator=g), torch.randn(B, *dit.z_shape, generator=g), None)
    grads = {}
    for sg in (True, False):
        loss = T.JointLoss(dit, proj, (4, 4), prediction="v" if latent else "x", proj_sg=sg, vf_weight=0,
                           ortho_weight=0, cov_weight=0)
        (grads[sg],) = torch.autograd.grad(loss(x, y, z0, noise)[0], proj.P, allow_unused=True)
    assert grads[True] is None or grads[True].abs().max() == 0
    assert grads[False] is not None and grads[False].abs().max() > 1e-4


def test_released_sit_samples_with_sits_cfg_rule():
    # SiT's forward_with_cfg, written out: out = f(cat[x, x], t, cat[y, null]); its first 3 channels are guided,
    # uncond + s (cond - uncond); the rest (the 4th latent channel) keeps the conditional output. The loader marks
    # released SiT weights so; our own runs and ReDi/REPA guide every image channel.
    g = fixture("sit_tiny.pt")
    model, cfg = load_released(g["state_dict"], num_heads=g["config"]["num_heads"])
    assert cfg["cfg_channels"] == 3
    x, y, s, t = g["x"][:2], g["y"][:2], 1.5, 0.4
    null = torch.full_like(y, model.num_classes)
    with torch.no_grad():
        out = model(torch.cat([x, x]), torch.full((4,), t), torch.cat([y, null]))[0]
        cond, uncond = out.chunk(2)
        sit = torch.cat([uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)
        ours, _ = sample.guided_velocity(model, y, "v", cfg_scale=s, cfg_channels=cfg["cfg_channels"])((x, None), t)
        every, _ = sample.guided_velocity(model, y, "v", cfg_scale=s)((x, None), t)
    torch.testing.assert_close(ours, sit, **TOL)
    torch.testing.assert_close(every, uncond + s * (cond - uncond), **TOL)
    assert not torch.allclose(every[:, 3], sit[:, 3])  # the rule matters
    f = fixture("redi_tiny.pt")
    assert load_released(f["state_dict"], num_heads=f["config"]["num_heads"])[1]["cfg_channels"] is None


def test_repa_legacy_layout_loads_as_the_same_model():
    # REPA's legacy checkpoints (its generate.py --legacy, utils.load_legacy_checkpoints) name the blocks after the
    # projector decoder_blocks.0.., renumbered from its --encoder-depth: the same weights load into the same model.
    f = fixture("repa_tiny.pt")
    k = f["config"]["encoder_depth"]
    legacy = {(f"decoder_blocks.{int(n.split('.')[1]) - k}.{n.split('.', 2)[2]}"
               if n.startswith("blocks.") and int(n.split(".")[1]) >= k else n): v for n, v in f["state_dict"].items()}
    assert any(n.startswith("decoder_blocks.") for n in legacy)
    new, _ = load_released(f["state_dict"], repa_depth=k, num_heads=4)
    old, cfg = load_released(legacy, repa_depth=k, num_heads=4)
    assert cfg["mode"] == "repa"
    for (a, v), (b, w) in zip(new.state_dict().items(), old.state_dict().items()):
        assert a == b and torch.equal(v, w), a
