"""
The networks of joint image-feature diffusion, in data-flow order:

1. the frozen parts: the VAE (latent space) and the DINOv2 encoder that gives the semantic features z0;
2. the feature projection z0 -> z~ (ReDi's frozen PCA, or CoReDi's learned P with batch norm), its
   regularizers and the collapse diagnostics;
3. the DiT/SiT transformer that denoises image tokens and feature tokens together, and REPA's projector.

Time convention everywhere (SiT's interpolant): x_t = t*x + (1-t)*eps, t=0 is noise, t=1 is data.
"""
import argparse
import hashlib
import math
import os
import re
import socket
import sys
from collections import namedtuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.models.vision_transformer import Attention, Mlp


class UserError(ValueError):
    """A problem with the user's input or environment; the scripts print its one-line message and exit."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: the module docstring as written, and every flag's default after its help."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' --help layout, whose errors are one line like every other error (see cli)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        sys.exit(f"error: {message} (see --help)")


# argparse types for numeric flags: a bad value is refused when the command line is read, before any work.
def number(kind, low=None, high=None, low_open=False, high_open=False, what=None):
    """A type that parses kind (int or float) and checks low <= x <= high (< with *_open); what names the range."""
    def parse(s):
        try:
            x = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(x) or (low is not None and (x <= low if low_open else x < low)) or \
                (high is not None and (x >= high if high_open else x > high)):
            raise argparse.ArgumentTypeError(f"{s} is out of range: must be {what}")
        return x
    return parse


positive_int = number(int, 1, what=">= 1")
nonneg_int = number(int, 0, what=">= 0")
positive_float = number(float, 0, low_open=True, what="> 0")
nonneg_float = number(float, 0, what=">= 0")
probability = number(float, 0, 1, what="in [0, 1]")


def cli(main):
    """Run a script's main; a UserError exits with its one line, also one that a DataLoader worker re-raised
    (those arrive with the worker's traceback in the message: the last line is the error)."""
    try:
        return main()
    except UserError as e:
        sys.exit("error: " + str(e).strip().splitlines()[-1].split("UserError: ")[-1])


def online(host="huggingface.co", timeout=3.0):
    """Whether the weight hubs can be reached: False at once with HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1), else a
    connection to host within timeout seconds. Without it, a download fails only after 30-45 s of the hub's retries."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def require_hub(repo_id, files, flag):
    """Before loading default weights from the Hugging Face hub (repo_id, one of files): offline, cached weights still
    load (the hub is told to use its cache; its flag is read when huggingface_hub is imported, too early for us) and
    missing ones fail at once, naming flag, instead of after the hub's retries."""
    if online():
        return
    import huggingface_hub
    import huggingface_hub.constants
    if repo_id and not any(isinstance(huggingface_hub.try_to_load_from_cache(repo_id, f), str) for f in files):
        raise UserError(f"no network, and {repo_id} is not in the Hugging Face cache; download it where there is one "
                        f"and pass {flag} PATH")
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def check_device(device):
    """torch.device(device), or a one-line error for a device that is not here (--device cuda without a GPU)."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {device}: no such CUDA GPU is visible here; pass --device cpu")
    return device


def seeded_generator(seed, *keys, device="cpu"):
    """A torch generator seeded by (seed, *keys), e.g. (seed, step, position) in training or (seed, index) in
    sampling. The key is hashed because CPU generators keep only the low 32 bits of a seed: seed * 2**32 + i
    would ignore the seed."""
    h = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(h, "little") & (2 ** 63 - 1))


# What each mode trains; every script asks this table instead of testing mode names.
#   features:     a feature stream: the DiT denoises projected encoder features z~ with the image
#   learned_proj: the projection P is trained with the DiT (CoReDi, with its regularizers) or frozen at the PCA
#   repa:         REPA's alignment loss is on (train.py --repa adds it to redi/coredi)
Mode = namedtuple("Mode", "features learned_proj repa")
MODES = {"sit": Mode(False, False, False), "repa": Mode(False, False, True),
         "redi": Mode(True, False, False), "coredi": Mode(True, True, False)}


# -----------------------------------------------------------------------------
# Frozen parts: VAE and encoder

# The SD-VAE architecture (stabilityai/sd-vae-ft-ema), so random-weight tests exercise the real network.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                     block_out_channels=(128, 256, 512, 512), act_fn="silu", sample_size=256,
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


class VAE(nn.Module):
    """SD-VAE: images in [-1,1] <-> latents with 8x fewer pixels, scaled by 0.18215 to roughly unit variance.
    weights: None = download stabilityai/sd-vae-ft-ema, a folder = local diffusers copy, 'random' = tests only."""
    scale = 0.18215

    def __init__(self, weights=None):
        super().__init__()
        from diffusers.models import AutoencoderKL
        if weights == "random":
            self.vae = AutoencoderKL(**SD_VAE_CONFIG)
        else:
            if weights is None:
                require_hub("stabilityai/sd-vae-ft-ema", ["config.json"], "--vae-weights")
            try:
                self.vae = AutoencoderKL.from_pretrained(weights or "stabilityai/sd-vae-ft-ema")
            except Exception as e:
                raise UserError(f"could not load the SD-VAE weights ({type(e).__name__}); download "
                                f"stabilityai/sd-vae-ft-ema once and pass --vae-weights PATH to that folder") from None
        self.vae.eval().requires_grad_(False)

    @torch.no_grad()
    def moments(self, x):
        """Posterior moments (B, 8, H/8, W/8) = [mean, logvar]: stored by the latent cache so that training
        can draw a fresh posterior sample every step."""
        return self.vae.encode(x).latent_dist.parameters

    @staticmethod
    def sample(moments, eps=None):
        """A scaled posterior sample; eps (standard normal, like the mean) is drawn here unless given."""
        mean, logvar = moments.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the same clamp as diffusers' posterior
        eps = torch.randn_like(mean) if eps is None else eps
        return (mean + std * eps) * VAE.scale

    @torch.no_grad()
    def decode(self, z):
        return self.vae.decode(z / VAE.scale).sample


DINO = "vit_base_patch14_reg4_dinov2.lvd142m"


class Encoder(nn.Module):
    """Frozen timm ViT (DINOv2-B/14 with registers by default). Takes images in [-1,1] of any size, resizes
    them bicubically to img_size and normalises them as the encoder was trained; returns the patch tokens
    after the final norm, (B, L, D), on the grid self.grid.
    weights: None = download, a path = local file, 'random' = random init (the demo and tests only).
    arch: timm overrides of the architecture (the demo's tiny encoder: depth=2, embed_dim=64, ...)."""

    def __init__(self, name=DINO, weights=None, img_size=224, **arch):
        super().__init__()
        import timm
        kwargs = dict(img_size=img_size, num_classes=0, **arch)
        if weights not in (None, "random") and not os.path.isfile(weights):
            raise UserError(f"encoder weights {weights} not found; pass --enc-weights PATH to a local file of {name}")
        if weights is None:
            hub_cfg = timm.models.get_pretrained_cfg(name)
            require_hub(hub_cfg and hub_cfg.hf_hub_id, ["model.safetensors", "pytorch_model.bin"], "--enc-weights")
        try:
            if weights == "random":
                self.net = timm.create_model(name, pretrained=False, **kwargs)
            elif weights:
                self.net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=weights), **kwargs)
            else:
                self.net = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:
            raise UserError(f"could not load encoder weights for {name} ({type(e).__name__}); pass "
                            f"--enc-weights PATH to a local file (or --enc-weights random, for the demo only)") from None
        self.net.eval().requires_grad_(False)
        self.img_size = img_size
        self.dim = self.net.num_features
        self.grid = tuple(self.net.patch_embed.grid_size)
        cfg = self.net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):  # frozen: stays in eval mode whatever the caller does
        return super().train(False)

    @torch.no_grad()
    def forward(self, x):
        x = F.interpolate((x.float() + 1) / 2, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        return self.net.forward_features(x)[:, self.net.num_prefix_tokens:]


def resize_tokens(z, src, dst):
    """Resize tokens (B, L, C) on grid src=(h, w) to grid dst, e.g. DINOv2's 16x16 to the DiT's 8x8 in the demo."""
    if z.shape[1] != src[0] * src[1]:
        raise UserError(f"{z.shape[1]} feature tokens do not form the encoder grid {src[0]}x{src[1]}")
    if tuple(src) == tuple(dst):
        return z
    if src[0] * dst[1] != src[1] * dst[0]:
        raise UserError(f"the encoder grid {src[0]}x{src[1]} cannot be resized to the token grid {dst[0]}x{dst[1]}: "
                        f"their aspect ratios differ; choose --enc-size or the image size so the grids match")
    B, _, C = z.shape
    z = z.transpose(1, 2).reshape(B, C, *src)
    z = F.interpolate(z.float(), size=tuple(dst), mode="bilinear", align_corners=False, antialias=True).to(z.dtype)
    return z.flatten(2).transpose(1, 2)


# -----------------------------------------------------------------------------
# Batch statistics of the global batch: under DDP every rank sees its share of the batch, but batch norm and the
# covariance penalty must see all of it, or 1 and N ranks would train different models.

def all_ranks_sum(x):
    """x summed over the ranks when torch.distributed is initialised, else x. Gradients flow back through the
    all-reduce (torch.distributed.nn), so each rank's loss is differentiated through the global statistics."""
    return dist_nn.all_reduce(x) if dist.is_available() and dist.is_initialized() else x


def global_mean(x):
    """Mean over the first dimension of x (N, ...) over all ranks' rows; and the global N."""
    n = all_ranks_sum(torch.tensor(float(x.shape[0]), device=x.device))
    return all_ranks_sum(x.sum(0)) / n, n


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over (N, C) whose training statistics are those of the global batch (what SyncBatchNorm does, on
    CPU/gloo too). The same state_dict and eval-mode behaviour as nn.BatchNorm1d."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        x = x.float()  # statistics in float32, as autocast runs batch norm
        mean, n = global_mean(x)
        var = global_mean((x - mean).pow(2))[0]  # biased, for normalising (as BatchNorm)
        with torch.no_grad():  # running statistics: unbiased variance and momentum, as BatchNorm; equal on every rank
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        return (x - mean) / torch.sqrt(var + self.eps)


# -----------------------------------------------------------------------------
# Feature projection z0 -> z~ (ReDi: frozen PCA; CoReDi: learned, co-evolving with the DiT)

class FeatureProjection(nn.Module):
    """z~ = BN((standardize(z0) - pca_mean) @ P), tokens (B, L, D_enc) -> (B, L, d).
    ReDi:   P = top-d principal directions of standardized encoder tokens, frozen, no BN (not whitened).
    CoReDi: P learnable (initialised from the PCA or at random), BN without affine over batch x tokens.
    All state is plain tensors, so it travels in the checkpoint's state_dict."""

    def __init__(self, enc_dim, d=8, learnable=False, batchnorm=False, vf_map="learned"):
        super().__init__()
        self.d = d
        self.register_buffer("enc_mean", torch.zeros(enc_dim))
        self.register_buffer("enc_std", torch.ones(enc_dim))
        self.register_buffer("pca_mean", torch.zeros(enc_dim))
        self.register_buffer("pca_var", torch.zeros(d))  # explained variance, for the logs
        if learnable:
            self.P = nn.Parameter(torch.zeros(enc_dim, d))
        else:
            self.register_buffer("P", torch.zeros(enc_dim, d))
        # Per-channel BN over all tokens of the batch: keeps every channel at unit variance, which is what stops
        # the learned P from shrinking channels until the features are trivially predictable.
        self.bn = GlobalBatchNorm(d, affine=False) if batchnorm else None
        # VF loss: a linear map from z~ back to the encoder space (learned, or P^T).
        self.learnable = learnable
        self.vf_map = nn.Linear(d, enc_dim, bias=False) if learnable and vf_map == "learned" else None

    @torch.no_grad()
    def fit(self, z0, init="pca", generator=None):
        """Fit the standardization and the PCA on encoder tokens z0 (N, D_enc); set P to the PCA (or to a random
        orthonormal matrix with init='random'). Done once before training, identically on every rank."""
        z0 = z0.reshape(-1, z0.shape[-1]).double()
        if z0.shape[0] <= self.d:
            raise UserError(f"the PCA needs more than d={self.d} tokens, got {z0.shape[0]}")
        self.enc_mean.copy_(z0.mean(0))
        self.enc_std.copy_(z0.std(0).clamp_min(1e-6))
        s = (z0 - self.enc_mean.double()) / self.enc_std.double()
        mu = s.mean(0)
        s = s - mu
        evals, evecs = torch.linalg.eigh(s.T @ s / (s.shape[0] - 1))  # ascending
        P = evecs[:, -self.d:].flip(1)
        P = P * torch.sign(P[P.abs().argmax(0), torch.arange(self.d)])  # deterministic sign: largest entry > 0
        self.pca_mean.copy_(mu)
        self.pca_var.copy_(evals[-self.d:].flip(0))
        if init == "random":
            P = torch.empty_like(P)
            nn.init.orthogonal_(P, generator=generator)
        self.P.copy_(P)
        if self.vf_map is not None:  # start the VF map as P^T, the inverse of an orthonormal P
            self.vf_map.weight.copy_(P)

    def standardize(self, z0):
        return (z0.float() - self.enc_mean) / self.enc_std

    def map_back(self, z):
        """VF's map from z~ (..., d) back to the encoder space: the learned linear map, or P^T."""
        return self.vf_map(z) if self.vf_map is not None else z @ self.P.T

    def forward(self, z0):
        z = (self.standardize(z0) - self.pca_mean) @ self.P
        if self.bn is not None:
            B, L, d = z.shape
            z = self.bn(z.reshape(B * L, d)).reshape(B, L, d)
        return z


def build_projection(mode, enc_dim, d=8, batchnorm=True, vf_map="learned"):
    """The feature projection of a mode (see MODES): None without a feature stream; ReDi's frozen PCA; CoReDi's
    learned P with batch norm (if batchnorm) and VF's map (vf_map: 'learned', 'fixed' = P^T, None = no VF)."""
    m = MODES[mode]
    if not m.features:
        return None
    return FeatureProjection(enc_dim, d, learnable=m.learned_proj, batchnorm=m.learned_proj and batchnorm,
                             vf_map=vf_map if m.learned_proj else None)


def ortho_loss(P):
    """||P^T P - I||_F^2: zero exactly when the columns of P are orthonormal."""
    eye = torch.eye(P.shape[1], device=P.device, dtype=P.dtype)
    return (P.T @ P - eye).pow(2).sum()


def cov_loss(z):
    """VICReg's covariance term: mean squared off-diagonal entry of the channel covariance of z (..., d), over the
    global batch."""
    z = z.reshape(-1, z.shape[-1]).float()
    mean, n = global_mean(z)
    z = z - mean
    cov = all_ranks_sum(z.T @ z) / (n - 1)
    d = cov.shape[0]
    return (cov - torch.diag(torch.diag(cov))).pow(2).sum() / (d * (d - 1))


def vf_loss(z, f, vf_map, cos_margin=0.5, dist_margin=0.25):
    """VA-VAE's vision-foundation loss between projected features z (B, L, d) and standardized encoder features
    f (B, L, D_enc): a marginal cosine term tying each token's mapped feature vf_map(z) to f, plus a marginal
    term matching each image's token-token cosine similarity matrices. The margins (VA-VAE's values) leave
    small deviations unpenalised. Both terms are means of per-token and per-image values, so DDP's average of the
    ranks' gradients is already the global batch's: no batch statistic to all-reduce."""
    cos = F.cosine_similarity(vf_map(z).float(), f.float(), dim=-1)
    l_cos = F.relu(1 - cos_margin - cos).mean()
    zn, fn = F.normalize(z.float(), dim=-1), F.normalize(f.float(), dim=-1)
    l_dist = F.relu((zn @ zn.transpose(1, 2) - fn @ fn.transpose(1, 2)).abs() - dist_margin).mean()
    return l_cos + l_dist


@torch.no_grad()
def feature_stats(z):
    """Collapse diagnostics of z (..., d): per-channel std, and the effective rank = exp of the entropy of the
    normalised singular values of the centred (N, d) matrix (d for isotropic features, 1 for rank one)."""
    z = z.reshape(-1, z.shape[-1]).float()
    std = z.std(0)
    s = torch.linalg.svdvals(z - z.mean(0))
    p = s / s.sum().clamp_min(1e-12)
    p = p[p > 0]
    return std, torch.exp(-(p * p.log()).sum()).item()


# -----------------------------------------------------------------------------
# The DiT/SiT transformer (state_dict layout of facebookresearch/DiT and willisma/SiT)

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding [cos, sin] of t (B,) in [0, 1], 0 = noise, 1 = data; unscaled, as SiT does."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, index num_classes, for the null label of classifier-free guidance.
    Label dropout is done by the training loop, so this module has no randomness."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens. With bottleneck > 0 it is JiT's two-step embedding for pixel space
    (patch -> bottleneck channels -> hidden), which keeps large pixel patches from dominating the parameters."""

    def __init__(self, patch, in_ch, hidden, bottleneck=0):
        super().__init__()
        if bottleneck:
            self.proj1 = nn.Conv2d(in_ch, bottleneck, patch, stride=patch, bias=False)
            self.proj2 = nn.Conv2d(bottleneck, hidden, 1)
        else:
            self.proj = nn.Conv2d(in_ch, hidden, patch, stride=patch)
        self.bottleneck = bottleneck

    def forward(self, x):
        x = self.proj2(self.proj1(x)) if self.bottleneck else self.proj(x)
        return x.flatten(2).transpose(1, 2)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: shift, scale and gate of both branches come from c."""

    def __init__(self, hidden, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True)  # timm: fused SDPA kernel
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN + linear to each token's patch values; linear_z gives the token's d feature values."""

    def __init__(self, hidden, patch, out_ch, feat_dim=0):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_ch)
        self.linear_z = nn.Linear(hidden, feat_dim) if feat_dim else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x), (self.linear_z(x) if self.linear_z is not None else None)


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos table (grid*grid, dim): token (r, c) gets [sin(c w), cos(c w), sin(r w), cos(r w)]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    r, c = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    c, r = c.reshape(-1, 1) * omega, r.reshape(-1, 1) * omega
    return torch.cat([c.sin(), c.cos(), r.sin(), r.cos()], dim=1).float()


class DiT(nn.Module):
    """Class-conditional DiT/SiT over image tokens, optionally fused with d feature channels per token
    (ReDi's merged tokens: h = embed_x(x_t) + embed_z(z_t) + pos) and with REPA's projector after block
    repa_depth. Output channels equal input channels (no learn_sigma)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, feat_dim=0, bottleneck=0, repa_depth=0, repa_dim=0,
                 projector_dim=2048):
        super().__init__()
        if input_size % patch_size:
            raise UserError(f"image size {input_size} is not divisible by the patch size {patch_size}")
        if repa_depth > depth:
            raise UserError(f"REPA depth {repa_depth} is deeper than the model ({depth} blocks)")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_classes, self.feat_dim, self.repa_depth = num_classes, feat_dim, repa_depth
        self.grid = input_size // patch_size
        self.grad_checkpoint = False  # recompute each block in the backward pass: memory only, ~1/3 more compute

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, bottleneck)
        self.z_embedder = nn.Linear(feat_dim, hidden_size) if feat_dim else None
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(sincos_pos_embed(hidden_size, self.grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, feat_dim)
        # REPA: per-token MLP from the hidden state to the encoder's feature space.
        self.projector = nn.Sequential(
            nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, repa_dim)) if repa_depth else None
        self.initialize_weights()

    def initialize_weights(self):
        # DiT's initialisation; the zeroed adaLN and output layers make the network output exactly zero at init.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        for m in self.x_embedder.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias) if m.bias is not None else None
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear, self.final_layer.linear_z):
            if m is not None:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def unpatchify(self, x):
        """(B, N, p*p*C) -> (B, C, H, W), each token's values laid out as (p, q, C)."""
        p, g, C = self.patch_size, self.grid, self.in_channels
        x = x.reshape(x.shape[0], g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, g * p, g * p)

    def forward(self, x, t, y, z=None):
        """x: (B, C, H, W) noisy image at time t; t: (B,) in [0, 1], 0 = noise, 1 = data; y: (B,) labels
        (num_classes = null); z: (B, grid*grid, d) noisy feature tokens (zeros = representation guidance's
        'no features'), required iff the model has a feature stream.
        Returns (image output like x, feature output like z or None, REPA projections (B, N, D_enc) or None)."""
        if tuple(x.shape[1:]) != (self.in_channels, self.input_size, self.input_size):
            raise UserError(f"the model takes images of shape {(self.in_channels, self.input_size, self.input_size)}, "
                            f"got {tuple(x.shape[1:])}")
        if (z is not None) != bool(self.feat_dim):
            raise UserError("feature tokens z must be given exactly when the model has a feature stream "
                            f"(feat_dim={self.feat_dim})")
        if z is not None and tuple(z.shape) != (x.shape[0], self.grid ** 2, self.feat_dim):
            raise UserError(f"the model takes feature tokens of shape {(x.shape[0], self.grid ** 2, self.feat_dim)} "
                            f"({self.grid}x{self.grid} tokens), got {tuple(z.shape)}; resize_tokens maps the "
                            f"encoder grid to the token grid")
        h = self.x_embedder(x) + self.pos_embed
        if z is not None:
            h = h + self.z_embedder(z.to(h.dtype))
        c = self.t_embedder(t) + self.y_embedder(y)
        repa = None
        for i, block in enumerate(self.blocks):
            h = checkpoint(block, h, c, use_reentrant=False) if self.grad_checkpoint and self.training else block(h, c)
            if i + 1 == self.repa_depth:
                repa = self.projector(h)
        out_x, out_z = self.final_layer(h, c)
        return self.unpatchify(out_x), out_z, repa


def to_velocity(pred, x_t, t, prediction):
    """The network's output as a velocity v = x - eps. Latent space predicts v directly; pixel space (JiT)
    predicts the clean x and v = (x_hat - x_t) / (1 - t), with 1 - t clamped at 0.05 near the data end."""
    if prediction == "v":
        return pred
    t = t.view(-1, *[1] * (x_t.dim() - 1))
    return (pred - x_t) / (1 - t).clamp_min(0.05)


# -----------------------------------------------------------------------------
# Configs and checkpoint loading

# (depth, hidden, heads). S/B/L/XL are DiT's; T is ours, a tiny model for the CPU demo and the tests.
SIZES = {"T": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def create_model(name, **kwargs):
    """'DiT-XL/2' (or the same 'SiT-XL/2') plus DiT keyword arguments (input_size, in_channels, feat_dim, ...)."""
    m = re.fullmatch(r"(?:DiT|SiT)-(T|S|B|L|XL)/(1|2|4|8|16)", name)
    if m is None:
        raise UserError(f"unknown model '{name}': use (DiT|SiT)-(T|S|B|L|XL)/(1|2|4|8|16), e.g. SiT-XL/2")
    depth, hidden, heads = SIZES[m[1]]
    return DiT(patch_size=int(m[2]), hidden_size=hidden, depth=depth, num_heads=heads, **kwargs)


def load_dit_state_dict(model, sd):
    """Load a DiT/SiT state_dict strictly. Released SiT/DiT checkpoints were trained with learn_sigma=True: their
    final layer predicts 2C channels per pixel, laid out (p, q, 2C) per token; we keep the first C (the mean)."""
    if "ema" in sd and isinstance(sd["ema"], dict):  # DiT/SiT training checkpoints wrap the weights
        sd = sd["ema"]
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    own = model.state_dict()
    w, b = sd.get("final_layer.linear.weight"), sd.get("final_layer.linear.bias")
    if w is not None and b is not None and w.shape[0] == 2 * own["final_layer.linear.weight"].shape[0]:
        p, C = model.patch_size, model.in_channels
        sd["final_layer.linear.weight"] = w.reshape(p, p, 2 * C, -1)[:, :, :C].reshape(p * p * C, -1)
        sd["final_layer.linear.bias"] = b.reshape(p, p, 2 * C)[:, :, :C].reshape(-1)
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        raise UserError(f"checkpoint does not fit the model: missing keys {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                        f"unexpected keys {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for k, v in own.items():
        if sd[k].shape != v.shape:
            raise UserError(f"checkpoint does not fit the model: {k} has shape {tuple(sd[k].shape)} in the checkpoint "
                            f"and {tuple(v.shape)} in the model")
    model.load_state_dict(sd, strict=True)
    return model
