"""Tests for model.py: CPU only, offline, tiny configs (the real encoder/VAE architectures run with random weights).
Expected values are either given by the reference implementations (parameter counts, tests/fixtures/sit_tiny.pt,
tests/fixtures/jit_tiny.pt) or derived here from how the test data is constructed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.linalg import hadamard

from model import (DiT, FeatureProjection, UserError, apply_rope, cov_loss, create_model, feature_stats, ortho_loss,
                   rope_2d, sincos_pos_embed, timestep_embedding, to_velocity, vf_loss)
from support.shapes import resize_tokens
from support.frozen import Encoder, VAE
from support.released import load_dit_state_dict

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "sit_tiny.pt"
JIT_FIXTURE = ROOT / "tests" / "fixtures" / "jit_tiny.pt"
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
# jit_tiny.pt's config in our argument names (the reference calls the bottleneck bottleneck_dim).
JIT_TINY = dict(input_size=32, patch_size=4, in_channels=3, hidden_size=64, depth=2, num_heads=4, mlp_ratio=4.0,
                num_classes=10, bottleneck=16, in_context_len=4, in_context_start=1)


def randomize_(model, seed=0, scale=0.05):
    """Give every trainable parameter random values (as the golden fixture's rule does): at DiT's init the adaLN
    gates and the output layers are zero, so most of the network would not affect the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def inputs(model, B=2, seed=0, feat=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.rand(B, generator=g)
    y = torch.randint(0, model.num_classes + 1, (B,), generator=g)
    z = torch.randn(B, model.grid ** 2, model.feat_dim, generator=g) if feat and model.feat_dim else None
    return x, t, y, z


def exact_cov_sample(n, C, seed=0):
    """n samples (float64) whose sample mean is exactly 0 and whose unbiased sample covariance is exactly C."""
    x = torch.randn(n, C.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    L = torch.linalg.cholesky(x.T @ x / (n - 1))
    x = torch.linalg.solve_triangular(L, x.T, upper=False).T  # sample covariance = I
    evals, evecs = torch.linalg.eigh(C)
    return x @ (evecs * evals.sqrt()) @ evecs.T  # times C^(1/2)


# -----------------------------------------------------------------------------
# Configs and parameter counts

@pytest.mark.parametrize("name, count", [("SiT-B/2", 130_500_112), ("SiT-XL/2", 675_111_184)])
def test_parameter_count(name, count):
    # The references' counts (DiT/SiT without learn_sigma), including the frozen pos_embed. Built on the meta device.
    with torch.device("meta"):
        model = create_model(name, input_size=32, in_channels=4)
    assert model.pos_embed.is_meta and not model.pos_embed.requires_grad
    assert sum(p.numel() for p in model.parameters()) == count


def test_meta_construction_matches_cpu():
    # The meta device builds the same architecture as a real build (so the counts above are the real model's).
    with torch.device("meta"):
        meta = create_model("DiT-S/2", input_size=32, in_channels=4, feat_dim=8, repa_depth=4, repa_dim=768)
    cpu = create_model("DiT-S/2", input_size=32, in_channels=4, feat_dim=8, repa_depth=4, repa_dim=768)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in cpu.state_dict().items()}


# -----------------------------------------------------------------------------
# Golden parity with the SiT reference implementation

@pytest.fixture(scope="module")
def golden():
    return torch.load(FIXTURE, weights_only=True)


def test_golden_forward(golden):
    model = DiT(**TINY)
    # The model builds the reference's fixed pos_embed itself, before anything is loaded.
    torch.testing.assert_close(model.pos_embed.detach(), golden["state_dict"]["pos_embed"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sincos_pos_embed(64, 4)[None], golden["state_dict"]["pos_embed"], atol=1e-5, rtol=1e-5)
    load_dit_state_dict(model, golden["state_dict"]).eval()

    captured = {}
    hook = model.final_layer.linear.register_forward_hook(lambda m, i, o: captured.update(h=i[0]))
    with torch.no_grad():
        out, out_z, repa = model(golden["x"], golden["t"], golden["y"])
        c = model.t_embedder(golden["t"]) + model.y_embedder(golden["y"])
    hook.remove()
    assert out_z is None and repa is None
    torch.testing.assert_close(out, golden["out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, golden["c"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(timestep_embedding(golden["t"], 256), golden["t_freq"], atol=1e-5, rtol=1e-5)

    # The unconverted learn_sigma layer on the same final hidden state, laid out (p, q, 2C) per token, gives
    # out_full: this pins the layout that load_dit_state_dict relies on to keep the first C channels.
    sd = golden["state_dict"]
    full = F.linear(captured["h"], sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    full = full.reshape(4, 4, 4, 2, 2, 8).permute(0, 5, 1, 3, 2, 4).reshape(4, 8, 8, 8)
    torch.testing.assert_close(full, golden["out_full"], atol=1e-5, rtol=1e-5)


def test_golden_wrapped_checkpoint(golden):
    # DiT/SiT training checkpoints: {"ema": ...}, keys possibly prefixed by DDP's "module.".
    model = load_dit_state_dict(DiT(**TINY), {"ema": {"module." + k: v for k, v in golden["state_dict"].items()}})
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(golden["x"], golden["t"], golden["y"])[0], golden["out"],
                                   atol=1e-5, rtol=1e-5)
    # A learn_sigma-free state_dict (our own) loads as is.
    again = load_dit_state_dict(DiT(**TINY), model.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(golden["x"], golden["t"], golden["y"])[0],
                           model(golden["x"], golden["t"], golden["y"])[0])


def test_state_dict_layout_matches_sit(golden):
    ref = {k: tuple(v.shape) for k, v in golden["state_dict"].items()}
    ref["final_layer.linear.weight"] = (16, 64)  # learn_sigma=False: half the output channels
    ref["final_layer.linear.bias"] = (16,)
    for kwargs in ({}, {"feat_dim": 0}):  # d = 0 is the plain model
        own = {k: tuple(v.shape) for k, v in DiT(**TINY, **kwargs).state_dict().items()}
        assert own == ref


# -----------------------------------------------------------------------------
# The transformer: init, feature stream, REPA, checkpoints

@pytest.mark.parametrize("kwargs", [
    dict(input_size=8, patch_size=2, in_channels=4),  # plain latent model
    dict(input_size=8, patch_size=2, in_channels=4, feat_dim=8, repa_depth=1, repa_dim=16, projector_dim=32),
    dict(input_size=32, patch_size=8, in_channels=3, bottleneck=16, feat_dim=8),  # pixel space
], ids=["plain", "features", "pixel"])
def test_output_zero_at_init(kwargs):
    model = DiT(hidden_size=64, depth=2, num_heads=4, num_classes=10, **kwargs)
    x, t, y, z = inputs(model, B=3)
    with torch.no_grad():
        out_x, out_z, _ = model(x, t, y, z)
    assert out_x.shape == x.shape and torch.equal(out_x, torch.zeros_like(x))
    if model.feat_dim:
        assert out_z.shape == z.shape and torch.equal(out_z, torch.zeros_like(z))
    else:
        assert out_z is None


def test_feature_stream_latent_shapes():
    # DiT-B/2's token grid at 256 px (latent 4x32x32 -> 16x16 tokens), with d=8 feature channels per token.
    model = randomize_(DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                           num_classes=10, feat_dim=8))
    x, t, y, z = inputs(model)
    assert z.shape == (2, 256, 8)
    with torch.no_grad():
        out_x, out_z, repa = model(x, t, y, z)
        out_x2, _, _ = model(x, t, y, torch.zeros_like(z))  # zero features = representation guidance's "none"
    assert out_x.shape == (2, 4, 32, 32) and out_z.shape == (2, 256, 8) and repa is None
    assert not torch.allclose(out_x, out_x2)  # the feature tokens are fused into the image tokens


def test_feature_stream_pixel_shapes():
    # JiT pixel space: 3x256x256 at patch 16 (16x16 tokens), bottleneck patch embedding of 128 channels.
    model = randomize_(DiT(input_size=256, patch_size=16, in_channels=3, hidden_size=64, depth=1, num_heads=4,
                           num_classes=10, feat_dim=8, bottleneck=128))
    assert model.x_embedder.proj1.weight.shape == (128, 3, 16, 16)
    assert model.x_embedder.proj2.weight.shape == (64, 128, 1, 1)
    x, t, y, z = inputs(model)
    with torch.no_grad():
        out_x, out_z, _ = model(x, t, y, z)
    assert out_x.shape == (2, 3, 256, 256) and out_z.shape == (2, 256, 8)


@pytest.mark.parametrize("k", [1, 2])
def test_repa_projector_reads_block_k(k):
    model = randomize_(DiT(**{**TINY, "depth": 3}, repa_depth=k, repa_dim=24, projector_dim=48)).eval()
    x, t, y, _ = inputs(model, B=3)
    captured = {}
    model.blocks[k - 1].register_forward_hook(lambda m, i, o: captured.update(h=o))
    with torch.no_grad():
        out, _, repa = model(x, t, y)
        assert repa.shape == (3, model.grid ** 2, 24)
        torch.testing.assert_close(repa, model.projector(captured["h"]), atol=1e-6, rtol=1e-6)
        # A block after k changes the output but not the projection; block k itself changes the projection.
        model.blocks[k].mlp.fc2.weight.add_(0.1)
        out2, _, repa2 = model(x, t, y)
        assert torch.equal(repa2, repa) and not torch.allclose(out2, out)
        model.blocks[k - 1].mlp.fc2.weight.add_(0.1)
        assert not torch.allclose(model(x, t, y)[2], repa)


@pytest.mark.parametrize("net", ["DiT", "JiT"])
def test_gradient_checkpointing_same_result(net):
    model = randomize_(DiT(**TINY, feat_dim=4) if net == "DiT" else DiT(block="jit", **JIT_TINY, feat_dim=4)).train()
    x, t, y, z = inputs(model)

    def run():
        model.zero_grad()
        out_x, out_z, _ = model(x, t, y, z)
        (out_x.square().mean() + out_z.square().mean()).backward()
        return out_x.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ref_out, ref_grads = run()
    model.grad_checkpoint = True
    out, grads = run()
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_state_dict_round_trip(tmp_path):
    kwargs = dict(**TINY, feat_dim=8, repa_depth=1, repa_dim=16, projector_dim=32)
    model = randomize_(DiT(**kwargs), seed=1).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = randomize_(DiT(**kwargs), seed=2).eval()
    x, t, y, z = inputs(model)
    with torch.no_grad():
        before = fresh(x, t, y, z)
        fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
        for a, b, c in zip(model(x, t, y, z), fresh(x, t, y, z), before):
            assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("coredi", [False, True], ids=["redi", "coredi"])
def test_feature_projection_round_trip(tmp_path, coredi):
    z0 = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(0)) * 3 + 1
    kwargs = dict(d=4, learnable=coredi, batchnorm=coredi)
    proj = FeatureProjection(32, **kwargs)
    proj.fit(z0)
    keys = {"P", "enc_mean", "enc_std", "pca_mean", "pca_var"}
    if coredi:
        keys |= {"bn.running_mean", "bn.running_var", "vf_map.weight"}
        with torch.no_grad():
            proj.P.add_(0.01)  # as after some training
            proj.train()
            proj(z0), proj(z0 * 2)  # moves the BN running statistics
    proj.eval()
    sd = proj.state_dict()
    assert keys <= sd.keys() and all(isinstance(v, torch.Tensor) for v in sd.values())
    torch.save(sd, tmp_path / "proj.pt")
    fresh = FeatureProjection(32, **kwargs).eval()
    with torch.no_grad():
        before = fresh(z0)
        fresh.load_state_dict(torch.load(tmp_path / "proj.pt", weights_only=True))
        assert torch.equal(fresh(z0), proj(z0)) and not torch.equal(before, proj(z0))
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_to_velocity():
    # x_t = t x + (1 - t) eps, v = x - eps: predicting the clean x exactly gives the exact velocity.
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.5, 0.9])
    x_t = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * eps
    torch.testing.assert_close(to_velocity(x, x_t, t, "x"), x - eps, atol=1e-5, rtol=1e-5)
    assert to_velocity(x, x_t, t, "v") is x
    # Near the data end 1 - t is clamped at 0.05.
    one = torch.ones(3)
    torch.testing.assert_close(to_velocity(x, torch.zeros_like(x), one, "x"), x / 0.05)


# -----------------------------------------------------------------------------
# JiT, the pixel-space transformer: parity with the JiT reference implementation (LTH14/JiT)

@pytest.mark.parametrize("name, count, trainable", [
    ("JiT-B/16", 131_320_320, 131_123_712),
    ("JiT-L/16", 459_139_808, 458_877_664),
    ("JiT-H/16", 952_842_048, 952_514_368),
])
def test_jit_parameter_count(name, count, trainable):
    # Measured by running the reference, LTH14/JiT model_jit.py @ cbc743a: JiT_models[name](input_size=256,
    # num_classes=1000) built on the meta device, sum of p.numel() over model.parameters() (all, and those with
    # requires_grad: all but the frozen pos_embed). The paper gives JiT-B/16 as 131M. Ours must have the same
    # count and, as the golden test checks on a tiny config, the same state_dict keys, so JiT's weights load.
    with torch.device("meta"):
        model = create_model(name, input_size=256, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == count
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


def test_jit_sizes():
    # JiT's sizes (model_jit.py): in-context class tokens from block 4/8/10, bottleneck 128/128/256, SwiGLU width
    # int(int(4 * hidden) * 2 / 3).
    for name, blocks, start, bottleneck, width in (("JiT-B/16", 12, 4, 128, 2048), ("JiT-L/16", 24, 8, 128, 2730),
                                                   ("JiT-H/16", 32, 10, 256, 3413)):
        with torch.device("meta"):
            model = create_model(name, input_size=256, num_classes=1000)
        assert len(model.blocks) == blocks and model.in_context_start == start and model.in_context_len == 32
        assert model.x_embedder.proj1.out_channels == bottleneck and model.blocks[0].mlp.w3.in_features == width
        assert model.patch_size == 16 and model.grid == 16
    tiny = create_model("JiT-T/4", input_size=32, num_classes=10)
    assert tiny.grid == 8 and tiny.in_context_len == 8 and tiny.in_context_start == 1
    with torch.device("meta"):  # a bottleneck given to create_model replaces the size's
        assert create_model("JiT-H/16", bottleneck=64).x_embedder.proj1.out_channels == 64


@pytest.fixture(scope="module")
def jit_golden():
    return torch.load(JIT_FIXTURE, weights_only=True)


def test_jit_golden_forward(jit_golden):
    g = jit_golden
    assert {**g["config"], "bottleneck": g["config"]["bottleneck_dim"]} == {**JIT_TINY, "bottleneck_dim": 16}
    model = DiT(block="jit", **JIT_TINY)
    # The fixed tables are built, not loaded: the sin-cos pos_embed and the RoPE tables (in-context rows first).
    assert torch.equal(model.pos_embed.detach(), g["state_dict"]["pos_embed"])
    assert torch.equal(model.rope_cos, g["rope_cos"]) and torch.equal(model.rope_sin, g["rope_sin"])
    # The same key names as the reference: its state_dict loads strictly, with no mapping.
    model.load_state_dict(g["state_dict"], strict=True)
    model.eval()
    tokens = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: tokens.append(o.shape[1]))
    with torch.no_grad():
        out, out_z, repa = model(g["x"], g["t"], g["y"])
        c = model.t_embedder(g["t"]) + model.y_embedder(g["y"])
    assert out_z is None and repa is None
    assert tokens == [64, 4 + 64]  # the in-context class tokens join at block in_context_start = 1
    torch.testing.assert_close(out, g["out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, g["c"], atol=1e-5, rtol=1e-5)  # t fed to the timestep embedder unscaled


def test_jit_loads_jit_checkpoint(jit_golden):
    # JiT's checkpoint-last.pth: {'model', 'model_ema1', 'model_ema2', ...}, the network under 'net.'; JiT samples
    # with model_ema1, so that is what load_dit_state_dict takes.
    sd = jit_golden["state_dict"]
    other = {"net." + k: torch.zeros_like(v) for k, v in sd.items()}
    ckpt = {"model": other, "model_ema1": {"net." + k: v for k, v in sd.items()}, "model_ema2": other, "epoch": 5}
    model = load_dit_state_dict(DiT(block="jit", **JIT_TINY), ckpt).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(jit_golden["x"], jit_golden["t"], jit_golden["y"])[0], jit_golden["out"],
                                   atol=1e-5, rtol=1e-5)


def test_jit_init_matches_reference(jit_golden):
    # Per parameter, the reference's own initialisation: constants (zeroed adaLN and output layers, zero biases,
    # unit RMSNorm scales, the fixed pos_embed) exactly; random ones (xavier, N(0, 0.02)) in spread.
    torch.manual_seed(0)
    sd = DiT(block="jit", **JIT_TINY).state_dict()
    for k, ref_std in jit_golden["init_std"].items():
        ref_mean, own = jit_golden["init_mean"][k], sd[k]
        if k == "pos_embed":
            assert torch.equal(own, jit_golden["state_dict"][k])
        elif ref_std == 0:
            assert torch.equal(own, torch.full_like(own, ref_mean.item())), k
        else:
            assert abs(own.std().item() / ref_std.item() - 1) < 0.2, k
            assert abs(own.mean().item()) < 0.2 * ref_std.item() + 1e-3, k


@pytest.mark.parametrize("feat_dim", [0, 8])
def test_jit_output_zero_at_init(feat_dim):
    # As JiT's init gives: the zeroed final layer predicts exactly 0 (the clean image at the data mean) for any
    # input, and the zeroed adaLN gates make every block the identity.
    model = DiT(block="jit", **JIT_TINY, feat_dim=feat_dim)
    x, t, y, z = inputs(model, B=3)
    with torch.no_grad():
        out_x, out_z, _ = model(x, t, y, z)
        h = torch.randn(3, 4 + 64, 64)
        cos, sin = model.rope_cos, model.rope_sin
        assert all(torch.equal(block(h, model.t_embedder(t), cos, sin), h) for block in model.blocks)
    assert torch.equal(out_x, torch.zeros_like(x))
    assert out_z is None if not feat_dim else torch.equal(out_z, torch.zeros_like(z))


def test_jit_feature_stream_shapes():
    # JiT-B/16's token grid at 256 px (16x16 tokens of 16x16x3 pixels), d = 8 feature values per token; and the
    # plain model without a feature stream.
    for feat_dim in (8, 0):
        model = randomize_(DiT(block="jit", input_size=256, patch_size=16, in_channels=3, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                               bottleneck=128, in_context_len=8, in_context_start=1, feat_dim=feat_dim))
        x, t, y, z = inputs(model)
        with torch.no_grad():
            out_x, out_z, repa = model(x, t, y, z)
        assert out_x.shape == (2, 3, 256, 256) and repa is None
        assert out_z is None if not feat_dim else out_z.shape == (2, 256, 8)
        assert model.x_embedder.proj1.weight.shape == (128, 3, 16, 16)


def test_jit_feature_stream_changes_output_only_when_z_nonzero(jit_golden):
    # The reference weights plus a feature stream as initialised (z_embedder's bias is zero): zero feature tokens
    # give the reference's output, real ones change it.
    model = DiT(block="jit", **JIT_TINY, feat_dim=8)
    missing, unexpected = model.load_state_dict(jit_golden["state_dict"], strict=False)
    assert sorted(missing) == ["final_layer.linear_z.bias", "final_layer.linear_z.weight", "z_embedder.bias",
                               "z_embedder.weight"] and not unexpected
    model.eval()
    g = jit_golden
    z = torch.randn(4, 64, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out0, out_z0, _ = model(g["x"], g["t"], g["y"], torch.zeros_like(z))
        out1, _, _ = model(g["x"], g["t"], g["y"], z)
    torch.testing.assert_close(out0, g["out"], atol=1e-5, rtol=1e-5)
    assert out_z0.shape == (4, 64, 8)
    assert (out1 - out0).abs().max() > 1e-3


def test_rope_relative_positions():
    # RoPE makes q.k depend on the two tokens' offset only; the prefix rows (in-context tokens) are not rotated.
    grid, prefix, dim = 6, 3, 16
    cos, sin = rope_2d(dim, grid, prefix)
    assert cos.shape == (prefix + grid * grid, dim)
    assert torch.equal(cos[:prefix], torch.ones(prefix, dim)) and torch.equal(sin[:prefix], torch.zeros(prefix, dim))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    cos, sin = cos[prefix:].double(), sin[prefix:].double()

    def score(a, b):  # token a's query against token b's key, tokens as (row, col)
        i, j = a[0] * grid + a[1], b[0] * grid + b[1]
        return (apply_rope(q, cos[i], sin[i]) * apply_rope(k, cos[j], sin[j])).sum()

    torch.testing.assert_close(score((0, 0), (2, 1)), score((3, 4), (5, 5)))
    assert not torch.allclose(score((0, 0), (2, 1)), score((0, 0), (1, 2)))  # rows and columns differ
    torch.testing.assert_close(score((1, 1), (1, 1)), q @ k)  # no offset, no rotation


@pytest.mark.parametrize("k", [1, 2])
def test_jit_repa_projector_reads_image_tokens_of_block_k(k):
    # Block 1 runs before the in-context tokens join, block 2 after: the projection is on the image tokens only.
    model = randomize_(DiT(block="jit", **{**JIT_TINY, "depth": 3}, repa_depth=k, repa_dim=24, projector_dim=48)).eval()
    x, t, y, _ = inputs(model, B=3)
    captured = {}
    model.blocks[k - 1].register_forward_hook(lambda m, i, o: captured.update(h=o))
    with torch.no_grad():
        _, _, repa = model(x, t, y)
    assert repa.shape == (3, 64, 24)
    torch.testing.assert_close(repa, model.projector(captured["h"][:, -64:]), atol=1e-6, rtol=1e-6)


def test_jit_bf16_autocast():
    # Training runs under bf16 autocast: the float32 RoPE tables and norms must hand SDPA one dtype.
    model = randomize_(create_model("JiT-T/4", input_size=32, num_classes=10, feat_dim=8, repa_depth=2, repa_dim=16))
    x, t, y, z = inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_x, out_z, repa = model(x, t, y, z)
    (out_x.float().square().mean() + out_z.float().square().mean() + repa.float().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_jit_dropout_in_middle_blocks():
    # JiT's --proj_dropout (0.2 for H) acts in blocks depth/4 .. 3 depth/4 only.
    model = DiT(block="jit", **{**JIT_TINY, "depth": 8}, dropout=0.2)
    assert [b.mlp.drop.p for b in model.blocks] == [0, 0, 0.2, 0.2, 0.2, 0.2, 0, 0]
    assert [b.attn.proj_drop.p for b in model.blocks] == [0, 0, 0.2, 0.2, 0.2, 0.2, 0, 0]
    with torch.device("meta"):  # JiT-H's recipe has it by default, the other sizes none
        assert [b.mlp.drop.p for b in create_model("JiT-H/16").blocks][7:9] == [0.0, 0.2]
        assert {b.mlp.drop.p for b in create_model("JiT-B/16").blocks} == {0.0}


def test_jit_bad_config():
    with pytest.raises(UserError, match="divisible by 4"):
        DiT(block="jit", **{**JIT_TINY, "hidden_size": 72})  # 4 heads of 18 channels: 2-D RoPE rotates pairs per axis
    with pytest.raises(UserError, match="in-context tokens start at block 2"):
        DiT(block="jit", **{**JIT_TINY, "in_context_start": 2})
    x, t, y, _ = inputs(DiT(block="jit", **JIT_TINY))
    with pytest.raises(UserError, match="takes features of shape"):
        DiT(block="jit", **JIT_TINY, feat_dim=8)(x, t, y, torch.randn(2, 256, 8))  # the encoder's grid, not the model's 8x8
# -----------------------------------------------------------------------------
# Feature projection (ReDi PCA / CoReDi), regularizers and collapse diagnostics

D, d = 32, 4


@pytest.fixture(scope="module")
def pca_data():
    """Encoder-like tokens whose standardized covariance has a known eigen-decomposition. Q: d columns of a
    normalised Hadamard matrix, whose entries all have magnitude 1/sqrt(D), so C = Q diag(lam) Q^T + s2 I has a
    constant diagonal and standardizing it only divides it by that constant: the standardized covariance has
    eigenvectors Q with eigenvalues (lam + s2) / diag. The channels then get different scales and offsets, which
    fit's standardization must remove (otherwise the principal directions would follow the large channels)."""
    g = torch.Generator().manual_seed(0)
    H = torch.tensor(hadamard(D), dtype=torch.float64) / D ** 0.5
    Q = H[:, torch.randperm(D, generator=g)[:d]]
    lam, s2 = torch.tensor([8.0, 6.0, 4.0, 2.0], dtype=torch.float64), 1.0
    C = Q @ torch.diag(lam) @ Q.T + s2 * torch.eye(D, dtype=torch.float64)
    diag = C[0, 0].item()
    assert torch.allclose(torch.diag(C), torch.full((D,), diag, dtype=torch.float64))
    x = exact_cov_sample(4096, C, seed=1)
    scale = torch.rand(D, generator=g, dtype=torch.float64) * 5 + 0.2
    shift = torch.randn(D, generator=g, dtype=torch.float64) * 3
    z0 = (x * scale + shift).float().reshape(64, 64, D)  # (B, L, D_enc)
    return z0, Q, (lam + s2) / diag


def test_pca_recovers_principal_subspace(pca_data):
    z0, Q, expected_var = pca_data
    proj = FeatureProjection(D, d=d)
    proj.fit(z0)
    P = proj.P.double()
    assert P.shape == (D, d) and not proj.P.requires_grad and not list(proj.parameters())
    torch.testing.assert_close(P.T @ P, torch.eye(d, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(P @ P.T, Q @ Q.T, atol=1e-4, rtol=0)  # the same subspace
    torch.testing.assert_close((P.T @ Q).abs(), torch.eye(d, dtype=torch.float64), atol=1e-4, rtol=0)  # same order
    torch.testing.assert_close(proj.pca_var.double(), expected_var, atol=1e-4, rtol=1e-4)


def test_pca_sign_is_deterministic():
    # Each column's largest entry is positive, so every rank fits the same P (the Hadamard data above has ties).
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2000, 16, generator=g) @ torch.randn(16, 16, generator=g)
    proj = FeatureProjection(16, d=4)
    proj.fit(z0)
    assert (proj.P[proj.P.abs().argmax(0), torch.arange(4)] > 0).all()
    again = FeatureProjection(16, d=4)
    again.fit(-z0)  # the same covariance, so the same principal directions up to sign
    torch.testing.assert_close(again.P, proj.P, atol=1e-5, rtol=0)


def test_redi_scaling_not_whitened(pca_data):
    # Standardize, subtract the PCA mean, project: the projected channels are uncorrelated, centred, and keep
    # the PCA eigenvalues as their variances.
    z0, _, expected_var = pca_data
    proj = FeatureProjection(D, d=d)
    proj.fit(z0)
    with torch.no_grad():
        z = proj(z0).reshape(-1, d).double()
    torch.testing.assert_close(z.mean(0), torch.zeros(d, dtype=torch.float64), atol=1e-4, rtol=0)
    cov = torch.cov(z.T)
    torch.testing.assert_close(cov, torch.diag(expected_var), atol=1e-3, rtol=1e-3)


def test_random_init_orthonormal(pca_data):
    z0, Q, _ = pca_data
    proj = FeatureProjection(D, d=d, learnable=True)
    proj.fit(z0, init="random", generator=torch.Generator().manual_seed(0))
    P = proj.P.detach().double()
    assert proj.P.requires_grad
    torch.testing.assert_close(P.T @ P, torch.eye(d, dtype=torch.float64), atol=1e-5, rtol=0)
    assert not torch.allclose(P @ P.T, Q @ Q.T, atol=0.1)
    assert torch.equal(proj.vf_map.weight, proj.P.detach())  # the VF map starts as P^T: z @ P^T


def test_coredi_batchnorm(pca_data):
    z0, _, _ = pca_data
    proj = FeatureProjection(D, d=d, learnable=True, batchnorm=True)
    proj.fit(z0)
    assert proj.bn.weight is None and proj.bn.bias is None  # no affine parameters
    proj.train()
    z = proj(z0)
    flat = z.detach().reshape(-1, d)  # over batch x tokens
    torch.testing.assert_close(flat.mean(0), torch.zeros(d), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(0, unbiased=False), torch.ones(d), atol=1e-3, rtol=0)
    with torch.no_grad():  # without BN the channels keep the PCA variances, far from 1
        raw = ((proj.standardize(z0) - proj.pca_mean) @ proj.P).reshape(-1, d)
    assert (raw.std(0) - 1).abs().max() > 0.3
    # P learns through z~.
    (z * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert proj.P.grad is not None and proj.P.grad.abs().sum() > 0


def test_pca_needs_more_tokens_than_d():
    with pytest.raises(UserError, match="has no 8 directions"):
        FeatureProjection(16, d=8).fit(torch.randn(1, 8, 16))


def test_ortho_loss():
    P = torch.linalg.qr(torch.randn(D, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    assert ortho_loss(P).item() < 1e-20
    # a P: P^T P - I = (a^2 - 1) I, so the loss is d (a^2 - 1)^2.
    torch.testing.assert_close(ortho_loss(1.1 * P), torch.tensor(d * (1.21 - 1) ** 2, dtype=torch.float64))
    bent = P.clone()
    bent[:, 1] += 0.3 * P[:, 0]  # not orthogonal any more
    assert ortho_loss(bent).item() > 0.1


def test_cov_loss():
    white = exact_cov_sample(500, torch.eye(6, dtype=torch.float64), seed=0)
    assert cov_loss(white.reshape(5, 100, 6)).item() < 1e-10  # exactly decorrelated channels
    assert cov_loss(white * torch.arange(1, 7)).item() < 1e-10  # scale per channel does not matter
    # Exactly known covariance C = I + 0.5 (all 30 off-diagonal entries 0.5): VICReg's sum / d = 30 * 0.25 / 6.
    C = torch.eye(6, dtype=torch.float64) + 0.5
    expected = torch.tensor(30 * 0.25 / 6, dtype=torch.float64)
    torch.testing.assert_close(cov_loss(exact_cov_sample(500, C, seed=1)).double(), expected, atol=1e-6, rtol=1e-5)


def test_vf_loss():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 64, 16, generator=g)
    for margins in (dict(cos_margin=0.0, dist_margin=0.0), {}):
        assert vf_loss(f, f, nn.Identity(), **margins).item() < 1e-6
        # The same features with the tokens of each image shuffled: neither term is satisfied.
        scrambled = f[:, torch.randperm(64, generator=g)]
        assert vf_loss(scrambled, f, nn.Identity(), **margins).item() > 0.1
    # Through a map: z in R^d, mapped back exactly by an orthonormal P^T.
    P = torch.linalg.qr(torch.randn(16, 4, generator=g))[0]
    f_low = f @ P @ P.T  # encoder features that live in span(P)
    vf_map = nn.Linear(4, 16, bias=False)
    with torch.no_grad():
        vf_map.weight.copy_(P)
    assert vf_loss(f_low @ P, f_low, vf_map, cos_margin=0.0, dist_margin=0.0).item() < 1e-5
    assert vf_loss(-(f_low @ P), f_low, vf_map).item() > 0.1  # the map term sees the sign flip
    # The distance-matrix term alone: z = f A with a non-orthogonal A is mapped back exactly by A^-1, so every
    # token's cosine term is satisfied, but A distorts the angles between tokens. Its margin leaves small
    # distortions unpenalised.
    for stretch, margin, positive in ((10.0, 0.25, True), (1.02, 0.0, True), (1.02, 0.25, False)):
        A = torch.eye(16)
        A[0, 0] = stretch
        inverse = nn.Linear(16, 16, bias=False)
        with torch.no_grad():
            inverse.weight.copy_(torch.linalg.inv(A).T)  # Linear computes z @ W^T = z @ A^-1
        loss = vf_loss(f @ A, f, inverse, cos_margin=0.0, dist_margin=margin).item()
        assert (loss > 1e-4) if positive else (loss < 1e-6), (stretch, margin, loss)


def test_feature_stats():
    # Exactly isotropic (all singular values equal): effective rank d; per-channel std as constructed.
    white = exact_cov_sample(1000, torch.eye(8, dtype=torch.float64), seed=0)
    std, rank = feature_stats(white.float().reshape(10, 100, 8))
    torch.testing.assert_close(std, torch.ones(8), atol=1e-5, rtol=0)
    assert abs(rank - 8) < 1e-3
    # Random isotropic features, many tokens: close to d.
    z = torch.randn(20000, 8, generator=torch.Generator().manual_seed(1))
    assert abs(feature_stats(z)[1] - 8) < 0.05
    # Different scales per channel: std follows them, and the rank drops below d.
    scales = torch.tensor([4.0, 2, 1, 0.5, 0.25, 0.1, 0.1, 0.1])
    std, rank = feature_stats(white.float() * scales + 3)
    torch.testing.assert_close(std, scales, atol=1e-5, rtol=1e-5)
    p = scales / scales.sum()  # the singular values are proportional to the scales
    assert abs(rank - torch.exp(-(p * p.log()).sum()).item()) < 1e-3
    # Rank one (collapse): 1.
    g = torch.Generator().manual_seed(2)
    one = torch.randn(5000, 1, generator=g) * torch.randn(1, 8, generator=g) + torch.randn(8, generator=g)
    assert abs(feature_stats(one)[1] - 1) < 1e-3


# -----------------------------------------------------------------------------
# Token resizing

def test_resize_tokens():
    z = torch.randn(2, 256, 5)
    assert resize_tokens(z, (16, 16), (16, 16)) is z
    assert resize_tokens(z, (16, 16), (8, 8)).shape == (2, 64, 5)
    # Row-major token order: a field that varies only along the columns keeps doing so after resizing.
    cols = torch.arange(16.0).repeat(16)  # token r*16 + c -> c
    out = resize_tokens(cols.view(1, 256, 1).expand(2, 256, 5).contiguous(), (16, 16), (8, 8))
    grid = out[0, :, 0].view(8, 8)
    torch.testing.assert_close(grid, grid[:1].expand(8, 8))
    assert (grid[0, 1:] > grid[0, :-1]).all()
    const = resize_tokens(torch.full((1, 256, 3), 2.5), (16, 16), (4, 4))
    torch.testing.assert_close(const, torch.full((1, 16, 3), 2.5))
    with pytest.raises(UserError, match="aspect"):
        resize_tokens(z, (16, 16), (8, 4))
    with pytest.raises(UserError, match="200 feature tokens"):
        resize_tokens(torch.randn(2, 200, 5), (16, 16), (8, 8))


# -----------------------------------------------------------------------------
# Frozen parts: the real architectures with random weights; the offline errors

def test_encoder_random_dinov2():
    enc = Encoder(weights="random")
    assert 85e6 < sum(p.numel() for p in enc.parameters()) < 87e6  # DINOv2-B/14: 86M
    assert enc.grid == (16, 16) and enc.dim == 768 and enc.net.num_prefix_tokens == 5  # cls + 4 registers
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.net.training  # frozen: stays in eval mode
    g = torch.Generator().manual_seed(0)
    z = enc(torch.rand(1, 3, 224, 224, generator=g) * 2 - 1)
    assert z.shape == (1, 256, 768) and torch.isfinite(z).all()
    assert enc(torch.rand(1, 3, 64, 64, generator=g) * 2 - 1).shape == (1, 256, 768)  # resized inside


def test_vae_random_sd_vae():
    vae = VAE("random")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    moments = vae.moments(x)
    assert moments.shape == (2, 8, 8, 8)
    latent = VAE.sample(moments)
    assert latent.shape == (2, 4, 8, 8)
    assert vae.decode(latent).shape == (2, 3, 64, 64)
    # sample = (mean + exp(logvar / 2) * eps) * 0.18215, with the given noise.
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    mean, logvar = moments[:, :4], moments[:, 4:]
    torch.testing.assert_close(VAE.sample(moments, eps), (mean + (0.5 * logvar).exp() * eps) * 0.18215)


def test_encoder_missing_file():
    with pytest.raises(UserError, match="--enc-weights") as e:
        Encoder(weights="/nonexistent.pth")
    assert "\n" not in str(e.value) and "/nonexistent.pth" in str(e.value)


def test_offline_errors_name_the_flags(tmp_path):
    # Default weights with the hub offline and an empty cache: no network is touched, the download fails.
    script = (
        "import json\n"
        "from support.cli import UserError\n"
        "from support.frozen import Encoder, VAE\n"
        "for name, make in (('enc', Encoder), ('vae', VAE)):\n"
        "    try:\n"
        "        make()\n"
        "        print(json.dumps([name, None]))\n"
        "    except UserError as e:\n"
        "        print(json.dumps([name, str(e)]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "TORCH_HOME": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    messages = dict(json.loads(line) for line in res.stdout.splitlines() if line.startswith("["))
    for name, flag in (("enc", "--enc-weights"), ("vae", "--vae-weights")):
        msg = messages[name]
        assert msg is not None, f"{name} loaded weights offline from an empty cache"
        assert "\n" not in msg and flag in msg


# -----------------------------------------------------------------------------
# Bad input gets a clear UserError

def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown model 'DiT-Q/3'"):
        create_model("DiT-Q/3")


def test_size_not_divisible_by_patch():
    with pytest.raises(UserError, match="not divisible"):
        DiT(input_size=30, patch_size=4, hidden_size=64, depth=1, num_heads=4)


def test_repa_deeper_than_model():
    with pytest.raises(UserError, match="REPA depth"):
        DiT(**TINY, repa_depth=3, repa_dim=8)


def test_checkpoint_shape_mismatch(golden):
    with pytest.raises(UserError) as e:
        load_dit_state_dict(DiT(**{**TINY, "num_classes": 20}), golden["state_dict"])
    assert "y_embedder.embedding_table.weight" in str(e.value)
    assert "(11, 64)" in str(e.value) and "(21, 64)" in str(e.value)
    with pytest.raises(UserError, match="z_embedder"):  # a plain checkpoint into a feature-stream model
        load_dit_state_dict(DiT(**TINY, feat_dim=8), golden["state_dict"])


def test_forward_bad_inputs():
    plain, feat = DiT(**TINY), DiT(**TINY, feat_dim=8)
    x, t, y, _ = inputs(plain)
    with pytest.raises(UserError, match="images of shape"):
        plain(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(UserError, match="images of shape"):
        plain(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(UserError, match="must be given exactly"):
        plain(x, t, y, torch.randn(2, 16, 8))  # z given to a model without a feature stream
    with pytest.raises(UserError, match="must be given exactly"):
        feat(x, t, y)  # and missing for one with it
    # Feature tokens on the wrong grid (e.g. the encoder's 16x16 instead of the model's 4x4), with the wrong d,
    # or one token that would silently broadcast over all of them.
    for shape in ((2, 256, 8), (2, 16, 4), (2, 1, 8), (1, 16, 8)):
        with pytest.raises(UserError, match="takes features of shape"):
            feat(x, t, y, torch.randn(shape))


def test_pca_scale_puts_each_channel_at_its_pca_std():
    # --proj-scale pca: z~ enters the DiT with each channel at the std of its PCA direction (ReDi's feature scale);
    # unit: std 1. pca_var is the PCA's explained variance, so its square root is that std. The regularizers see
    # z~ itself, at unit variance after batch norm, either way.
    g = torch.Generator().manual_seed(0)  # tokens with 8 strong directions, so their PCA stds are not 1
    z0 = (torch.randn(64, 16, 8, generator=g) @ torch.randn(8, 32, generator=g)
          + 0.1 * torch.randn(64, 16, 32, generator=g))
    for scale in ("unit", "pca"):
        proj = FeatureProjection(32, 8, learnable=True, batchnorm=True, scale=scale)
        proj.fit(z0)
        z = proj(z0)
        torch.testing.assert_close(z.reshape(-1, 8).std(0, unbiased=False), torch.ones(8), atol=1e-3, rtol=1e-3)
        stream = (z * proj.stream_scale).reshape(-1, 8).std(0, unbiased=False)
        want = proj.pca_var.sqrt() if scale == "pca" else torch.ones(8)
        torch.testing.assert_close(stream, want, atol=1e-3, rtol=1e-3)
        assert scale == "unit" or (want > 1.2).all()  # a scale that differs from 1, so the test can fail
