"""svg_ae.py: the real architectures' sizes against SVG's, the residual masking, SVG's statistics matching, the
LDM <-> diffusers decoder key mapping on a manifest of SVG's decoder, training steps, exact resume, one-line errors."""
import json
import os

import numpy as np
import pytest
import torch

import model as M
import svg_ae as S

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--synthetic", "32", "--image-size", "16", "--patch-size", "4", "--dino-weights", "tiny", "--res-depth", "1",
        "--res-width", "32", "--res-heads", "2", "--dec-channels", "16,16,32", "--dec-layers", "1", "--dec-groups", "8",
        "--disc-channels", "8", "--disc-layers", "2", "--global-batch-size", "4", "--num-workers", "0",
        "--log-every", "1", "--picture-every", "0", "--ckpt-every", "1000", "--lr", "1e-3", "--mask-ratio", "0.5",
        "--seed", "5"]


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_real_sizes_match_svg():
    # SVG's numbers: its residual ViT (create_small_vit_s), Decoder(**ddconfig) and taming's NLayerDiscriminator.
    assert count(S.ResidualEncoder().vit) == 11_192_840
    with torch.device("meta"):
        dec = S.make_decoder(392)
    assert count(dec) == 43_076_483
    assert count(S.PatchGAN()) == 2_765_633
    dino = S.make_dino(S.DINO3, "random", 256, 16)
    assert count(dino) == 28_683_264 and dino.dim == 384 and dino.grid == (16, 16)


def test_latent_shape_and_decoder_upsampling():
    cfg = vars(S.get_args(TINY))
    ae = S.build_autoencoder(cfg).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (3, 64 + 8, 4, 4)
        assert ae.decode(z).shape == x.shape


def test_masking_replaces_the_drawn_images():
    positions = range(5000)
    flags = S.mask_flags(7, 11, positions, 0.1, "cpu")
    # independently: the same seeded per-image draw
    expected = [torch.rand(1, generator=torch.Generator().manual_seed(hash((7, 11, p)) & (2 ** 63 - 1))).item() < 0.1
                for p in positions]
    assert flags.tolist() == expected
    assert abs(flags.float().mean().item() - 0.1) < 3 * (0.1 * 0.9 / 5000) ** 0.5
    assert torch.equal(S.mask_flags(7, 11, positions, 0.1, "cpu"), flags)  # a function of (seed, step, position)
    res = S.ResidualEncoder(32, 8, 1, 32, 2, 8, 0.0).eval()
    mask = S.mask_flags(0, 0, range(16), 0.5, "cpu")
    assert 0 < mask.sum() < 16
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        plain, masked = res(x), res(x, mask)
    token = res.mask_token.view(1, 8, 1, 1).expand(int(mask.sum()), 8, 4, 4)
    assert torch.equal(masked[mask], token)  # the whole residual of a masked image is the token
    assert torch.equal(masked[~mask], plain[~mask])


def test_match_distribution_gives_dino_average_statistics():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(4, 12, 5, 5, generator=g) * torch.linspace(0.2, 2, 12).view(1, -1, 1, 1) + 0.7
    x = torch.randn(4, 3, 5, 5, generator=g) * torch.tensor([1.0, 3.0, 9.0]).view(1, -1, 1, 1) - 4
    out = S.match_distribution(x, target)

    def per_channel(t):  # independent path: numpy, one channel at a time, unbiased std
        a = t.detach().double().numpy()
        return (np.array([a[:, c].mean() for c in range(a.shape[1])]),
                np.array([a[:, c].std(ddof=1) for c in range(a.shape[1])]))
    m_t, s_t = per_channel(target)
    m_o, s_o = per_channel(out)
    m_x, s_x = per_channel(x)
    assert m_o.mean() == pytest.approx(m_t.mean(), abs=1e-5)
    assert s_o.mean() == pytest.approx(s_t.mean(), rel=1e-5)
    np.testing.assert_allclose(s_o / s_o.sum(), s_x / s_x.sum(), rtol=1e-5)  # relative channel scales are kept
    # batch statistics, detached: the gradient is the constant factor s_t / s_x
    x.requires_grad_(True)
    S.match_distribution(x, target).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, s_t.mean() / (s_x.mean() + 1e-6)), rtol=1e-5, atol=0)


def test_decoder_key_mapping_round_trips_on_svg_manifest():
    with open(os.path.join(HERE, "fixtures", "svg_decoder_keys.json")) as f:
        manifest = json.load(f)["keys"]
    g = torch.Generator().manual_seed(0)
    ldm = {k: torch.randn(shape, generator=g) for k, shape in manifest.items()}
    ours = S.ldm_to_diffusers(ldm, 5)
    with torch.device("meta"):
        ref = S.make_decoder(392).state_dict()
    assert set(ours) == set(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)
    back = S.diffusers_to_ldm(ours, 5)
    assert list(back) == list(ldm)
    assert all(torch.equal(back[k], ldm[k]) for k in ldm)


def test_loss_falls_on_a_fixed_batch():
    cfg = vars(S.get_args(TINY))
    torch.manual_seed(0)
    ae = S.build_autoencoder(cfg)
    params = list(ae.residual.parameters()) + list(ae.decoder.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.5, 0.9))
    x = torch.stack([S.SyntheticImages(8, 16)[i][0] for i in range(8)]).float() / 127.5 - 1
    losses = []
    for _ in range(8):
        loss = S.reconstruction_loss(x, ae(x), None, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_training_with_gan_and_exact_resume(tmp_path):
    flags = TINY + ["--results-dir", str(tmp_path), "--disc-start", "2"]
    ae_a, disc_a = S.main(S.get_args(flags + ["--run-name", "straight", "--max-steps", "5"]))
    S.main(S.get_args(flags + ["--run-name", "resumed", "--max-steps", "3"]))
    ckpt = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)  # a plain dict
    assert ckpt["step"] == 3
    ae_b, disc_b = S.main(S.get_args(flags + ["--run-name", "resumed", "--max-steps", "5", "--resume"]))
    for a, b in [(ae_a.residual, ae_b.residual), (ae_a.decoder, ae_b.decoder), (disc_a, disc_b)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    logs = [json.loads(line) for line in open(tmp_path / "straight" / "log.jsonl")]
    assert "d_loss" not in logs[1] and "d_loss" in logs[2]  # the GAN joins at --disc-start
    # the saved autoencoder loads for encode/decode
    ae = S.load_autoencoder(str(tmp_path / "straight" / "last.pt"))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ae.decode(ae.encode(x)), ae_a.eval()(x))


def test_refuses_to_overwrite_and_one_line_errors(tmp_path):
    flags = TINY + ["--results-dir", str(tmp_path), "--run-name", "r", "--max-steps", "1"]
    S.main(S.get_args(flags))
    with pytest.raises(M.UserError, match="--resume"):
        S.main(S.get_args(flags))
    with pytest.raises(M.UserError, match="--dino-weights"):
        S.make_dino(S.DINO3, str(tmp_path / "missing.pth"), 256, 16)
    with pytest.raises(M.UserError, match="--lpips-heads"):
        S.get_args(TINY + ["--lpips-vgg", "x.pth"])
    with pytest.raises(M.UserError, match="--lpips-vgg"):
        S.LPIPS(str(tmp_path / "no_vgg.pth"), str(tmp_path / "no_heads.pth"))
    with pytest.raises(M.UserError, match="--patch-size"):
        S.get_args(TINY + ["--dec-channels", "16,32"])


def test_lpips_is_zero_for_equal_images_and_loads_local_files(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, tmp_path / "vgg.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(S.LPIPS.WIDTHS)},
               tmp_path / "heads.pth")
    lp = S.LPIPS(str(tmp_path / "vgg.pth"), str(tmp_path / "heads.pth"))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert lp(x, x).abs().max() < 1e-6
    d = lp(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert not any(p.requires_grad for p in lp.parameters())
