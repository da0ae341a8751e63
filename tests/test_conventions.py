"""Every convention pinned to the value it must equal, derived here independently of the code under test: the
interpolant's direction and the velocity's sign (a network that returns the exact target has loss 0), label
dropout, the EMA update, per-sample noise, the time distributions, the VAE posterior sample, the sample -> uint8
conversion, the samplers' number of network evaluations, the warm-up, and the papers' default values."""
import math

import numpy as np
import pytest
import torch

import model as M
import sample as S
import train as T
from support.frozen import VAE

B = 6


class Oracle(M.DiT):
    """A DiT whose forward returns a chosen function of its inputs; it records what it was given."""

    def __init__(self, respond, **arch):
        super().__init__(hidden_size=32, depth=1, num_heads=2, num_classes=10, **arch)
        self.respond, self.seen = respond, {}

    def forward(self, x, t, y, z=None):
        self.seen = dict(x=x, t=t, y=y, z=z)
        return (*self.respond(x, t, y, z), None)


def draw(space, feat=False, label_drop=0.0, seed=0):
    """Clean data, z0 and a step's Noise for a tiny run of the given space."""
    latent = space == "latent"
    arch = dict(input_size=8, patch_size=2, in_channels=4 if latent else 3, feat_dim=8 if feat else 0,
                fusion="channels" if latent else "tokens")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, arch["in_channels"], 8, 8, generator=g)
    z0 = torch.randn(B, 16, 32, generator=g)
    probe = M.DiT(hidden_size=32, depth=1, num_heads=2, num_classes=10, **arch)
    noise = T.step_noise(seed, 0, range(B), B, tuple(x.shape[1:]), probe.z_shape, space=space, label_drop=label_drop)
    return arch, x, z0, noise._replace(t=noise.t * 0.9)  # t < 0.95: x-prediction's v divides by max(1 - t, 0.05)


def proj8():
    p = M.FeatureProjection(32, 8)
    p.fit(torch.randn(400, 32, generator=torch.Generator().manual_seed(1)))
    return p


@pytest.mark.parametrize("space", ["latent", "pixel"])
def test_a_network_returning_the_exact_target_has_zero_loss(space):
    arch, x, z0, noise = draw(space, feat=True)
    proj = proj8()
    t = noise.t.view(-1, 1, 1, 1)
    # Our convention, written out: x_t = t x + (1 - t) eps (t = 1 is data), target v = x - eps.
    v_x = x - noise.eps_x
    assert noise.t.max() < 0.95  # (x-prediction's v divides by max(1 - t, 0.05))
    if space == "latent":  # v-prediction: return the velocity itself
        respond = lambda x_t, t_, y, z: (v_x, None)
    else:  # x-prediction: return the clean image
        respond = lambda x_t, t_, y, z: (x, None)
    zc = None

    def with_features(x_t, t_, y, z):
        out_x, _ = respond(x_t, t_, y, z)
        # the clean features are what the input z_t = t z~ + (1 - t) eps_z implies, given the known noise
        tz = t_.view(-1, *[1] * (z.dim() - 1))
        z_clean = (z - (1 - tz) * noise.eps_z) / tz
        out_z = z_clean - noise.eps_z if space == "latent" else z_clean
        zc_box.append(z_clean)
        return out_x, out_z
    zc_box = []
    dit = Oracle(with_features, **arch)
    total, logs = T.JointLoss(dit, proj, (4, 4), "v" if space == "latent" else "x", vf_weight=0, ortho_weight=0,
                              cov_weight=0)(x, torch.arange(B) % 10, z0, noise)
    assert logs["loss_x"].item() < 1e-10 and logs["loss_z"].item() < 1e-8
    # the x_t the network saw is t x + (1 - t) eps, exactly
    torch.testing.assert_close(dit.seen["x"], t * x + (1 - t) * noise.eps_x, atol=0, rtol=0)
    zc = zc_box[0]
    torch.testing.assert_close(zc, dit.features_in(proj(z0), (4, 4)), atol=1e-5, rtol=1e-5)


def test_a_zero_network_has_the_known_loss():
    arch, x, z0, noise = draw("latent")
    dit = Oracle(lambda x_t, t, y, z: (torch.zeros_like(x_t), None), **arch)
    _, logs = T.JointLoss(dit)(x, torch.arange(B) % 10, None, noise)
    want = ((x - noise.eps_x) ** 2).mean()  # |0 - v|^2 with v = x - eps
    torch.testing.assert_close(logs["loss_x"], want)


def test_label_dropout_gives_the_null_label_to_exactly_the_dropped_samples():
    arch, x, z0, noise = draw("latent", label_drop=0.5)
    assert 0 < noise.drop_label.sum() < B  # some dropped, some kept at this seed
    dit = Oracle(lambda x_t, t, y, z: (torch.zeros_like(x_t), None), **arch)
    y = torch.arange(B) % 10
    T.JointLoss(dit)(x, y, None, noise)
    want = torch.where(noise.drop_label, torch.full_like(y, 10), y)  # null = num_classes
    assert torch.equal(dit.seen["y"], want)
    # and the dropout rate is the flag's: over many samples the fraction is within 3 sigma of p
    many = T.step_noise(1, 0, range(2000), 2000, (1,), label_drop=0.1, feat_drop=0.2)
    assert abs(many.drop_label.float().mean() - 0.1) < 3 * math.sqrt(0.1 * 0.9 / 2000)
    assert abs(many.drop_feat.float().mean() - 0.2) < 3 * math.sqrt(0.2 * 0.8 / 2000)


def test_ema_after_one_update():
    ema, model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        ema.weight.fill_(1.0), ema.bias.fill_(-2.0), model.weight.fill_(3.0), model.bias.fill_(2.0)
    T.update_ema(ema, model, 0.9)
    assert torch.allclose(ema.weight, torch.full((1, 2), 0.9 * 1 + 0.1 * 3))
    assert torch.allclose(ema.bias, torch.tensor([0.9 * -2 + 0.1 * 2]))


def test_step_noise_depends_on_seed_step_and_row_only():
    a = T.step_noise(0, 5, range(4), 4, (3, 2, 2), (4, 2), (4, 2, 2), label_drop=0.5, feat_drop=0.5)
    for ranks in (2, 4):  # each rank draws the global batch's numbers and keeps its rows
        split = [T.step_noise(0, 5, range(r, r + 4 // ranks), 4, (3, 2, 2), (4, 2), (4, 2, 2), label_drop=0.5,
                              feat_drop=0.5) for r in range(0, 4, 4 // ranks)]
        for k in a._fields:
            assert torch.equal(getattr(a, k), torch.cat([getattr(s, k) for s in split])), k
    b = T.step_noise(1, 5, range(4), 4, (3, 2, 2), (4, 2))
    c = T.step_noise(0, 6, range(4), 4, (3, 2, 2), (4, 2))
    assert not torch.equal(a.eps_x, b.eps_x) and not torch.equal(a.eps_x, c.eps_x)
    assert not torch.equal(a.eps_x[0], a.eps_x[1])  # positions differ


def test_time_distributions():
    u = T.step_noise(0, 0, range(4000), 4000, (1,), space="latent").t
    assert abs(u.mean() - 0.5) < 0.02 and u.min() >= 0 and u.max() <= 1  # SiT: U(0, 1)
    assert abs(u.std() - 12 ** -0.5) < 0.01  # a uniform's spread (sigmoid of a normal has the mean, not this)
    assert abs((u < 0.1).float().mean() - 0.1) < 0.015
    p = T.step_noise(0, 0, range(4000), 4000, (1,), space="pixel").t
    logit = torch.log(p / (1 - p))
    assert abs(logit.mean() + 0.8) < 0.05 and abs(logit.std() - 0.8) < 0.05  # JiT: sigmoid(N(-0.8, 0.8))


def test_vae_posterior_sample_and_scale():
    mean, logvar = torch.full((1, 4, 2, 2), 0.5), torch.full((1, 4, 2, 2), math.log(4.0))  # std 2
    eps = torch.ones(1, 4, 2, 2)
    got = VAE.sample(torch.cat([mean, logvar], 1), eps)
    assert torch.allclose(got, torch.full_like(mean, (0.5 + 2.0) * 0.18215))


def test_to_velocity_from_x_prediction():
    x_t, t = torch.tensor([[1.0]]), torch.tensor([0.5])
    assert M.to_velocity(torch.tensor([[3.0]]), x_t, t, "x").item() == (3 - 1) / 0.5
    assert M.to_velocity(torch.tensor([[3.0]]), x_t, torch.tensor([0.99]), "x").item() == pytest.approx(2 / 0.05)
    assert M.to_velocity(torch.tensor([[3.0]]), x_t, t, "v").item() == 3.0


def test_images_convert_to_uint8_as_adm():
    class Const(torch.nn.Module):  # a 'model' whose final image is whatever the sampler integrates to
        num_classes, in_channels, input_size, grid, feat_dim, z_shape = 10, 3, 1, 1, 0, None

        def forward(self, x, t, y, z=None):
            return torch.zeros_like(x), None, None
    # With zero velocity the image stays the initial noise; check the conversion on it directly.
    images, _, _ = S.generate(Const(), range(3), torch.device("cpu"), "v", sampler="euler", steps=1, seed=0)
    x0 = S.draw_noise(0, torch.arange(3), 1, ((3, 1, 1), None))[0]
    want = np.clip(127.5 * x0.numpy() + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(images, want)


@pytest.mark.parametrize("sampler, steps, nfe", [("euler", 7, 7), ("heun", 7, 13), ("sde", 7, 7)])
def test_number_of_network_evaluations(sampler, steps, nfe):
    calls = []

    def v(state, t):
        calls.append(t)
        return tuple(None if s is None else torch.zeros_like(s) for s in state)
    state = (torch.zeros(1, 1), None)
    if sampler == "sde":
        S.sde_euler_maruyama(v, state, steps, lambda k: (torch.zeros(1, 1), None))
    else:
        (S.euler_ode if sampler == "euler" else S.heun_ode)(v, state, steps)
    assert len(calls) == nfe
    assert calls[0] == 0.0 and max(calls) <= 1.0  # from noise (t = 0) towards data
    if sampler == "sde":
        assert calls[-1] == pytest.approx(0.96)  # SiT's last deterministic step of 0.04


def test_warmup_is_linear_then_constant():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    opt.param_groups[0]["base_lr"] = 2.0
    lrs = []
    for step in range(6):
        T.warmup_lr(opt, step, 4)
        lrs.append(opt.param_groups[0]["lr"])
    # JiT's engine_jit.py sets lr = base * (fractional epoch) / warmup_epochs: 0 at the first step
    assert lrs == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]


def test_paper_defaults():
    latent = T.get_args(["--data-path", "x"])
    assert (latent.model, latent.global_batch_size, latent.lr, latent.beta2, latent.ema, latent.label_drop,
            latent.max_steps, latent.warmup_epochs) == ("SiT-XL/2", 256, 1e-4, 0.999, 0.9999, 0.1, 400_000, 0)
    assert (latent.feat_dim, latent.lambda_z, latent.repa_weight, latent.weight_decay) == (8, 1.0, 0.5, 0.0)
    pixel = T.get_args(["--data-path", "x", "--space", "pixel"])  # JiT-B/16
    assert (pixel.model, pixel.global_batch_size, T.derive(pixel).lr, pixel.beta2, pixel.warmup_epochs,
            pixel.grad_clip, pixel.flip) == ("JiT-B/16", 1024, 2e-4, 0.95, 5, 0.0, True)
    assert T.warmup_steps(pixel, 1_281_167) == 5 * (1_281_167 // 1024)  # JiT's 6,255 warm-up steps on ImageNet
    assert (T.JIT_T_MEAN, T.JIT_T_STD) == (-0.8, 0.8)
    # REPA's alignment depth: block 4 of B models, 8 of L and XL (REPA's paper)
    for model, depth in (("SiT-B/2", 4), ("SiT-L/2", 8), ("SiT-XL/2", 8), ("JiT-B/16", 4)):
        assert T.derive(T.get_args(["--data-path", "x", "--mode", "repa", "--model", model])).repa_depth == depth
    clip = {m: T.get_args(["--data-path", "x", "--mode", m]).grad_clip for m in M.MODES}
    assert clip == {"sit": 0.0, "repa": 1.0, "redi": 0.0, "coredi": 0.0}  # REPA clips; SiT and ReDi do not
    flips = {m: T.get_args(["--data-path", "x", "--mode", m]).flip for m in M.MODES}
    assert flips == {"sit": True, "repa": False, "redi": False, "coredi": False}
    assert T.get_args(["--data-path", "x", "--mode", "repa"]).enc == "vit_base_patch14_dinov2.lvd142m"
    assert T.get_args(["--data-path", "x", "--mode", "redi"]).enc == "vit_base_patch14_reg4_dinov2.lvd142m"
    assert S.default_sampler("latent") == dict(sampler="sde", steps=250, time_shift=1.0)  # SiT
    assert S.default_sampler("pixel") == dict(sampler="heun", steps=50, time_shift=1.0)  # JiT
    assert S.default_sampler("svg") == dict(sampler="euler", steps=25, time_shift=0.15)  # SVG


def test_repa_term_is_minus_the_mean_cosine_to_the_encoder_tokens():
    arch, x, z0, noise = draw("latent")

    class Aligned(M.DiT):  # its projections equal (a positive multiple of) the encoder tokens: cosine 1
        def forward(self, x_t, t, y, z=None):
            return torch.zeros_like(x_t), None, 3 * z0

    dit = Aligned(hidden_size=32, depth=1, num_heads=2, num_classes=10, repa_depth=1, repa_dim=32, **arch)
    total, logs = T.JointLoss(dit, None, (4, 4), repa_weight=0.5)(x, torch.arange(B) % 10, z0, noise)
    assert logs["repa"].item() == pytest.approx(-1.0, abs=1e-6)
    torch.testing.assert_close(total, logs["loss_x"] + 0.5 * logs["repa"])
