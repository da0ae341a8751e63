"""
The networks of joint image-feature diffusion, in data-flow order: the DiT/SiT that denoises the
image and the projected features together (ReDi's channel fusion in latent space, per token in pixel
space); JiT's block; REPA's projector; the feature projection z0 -> z~ (ReDi's frozen PCA, CoReDi's
learned P with batch norm), its regularizers and collapse diagnostics; the model sizes.
Time everywhere (SiT's interpolant): x_t = t*x + (1-t)*eps, t=0 is noise, t=1 is data.
"""
import math
import re
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Mlp
from torch.utils.checkpoint import checkpoint

from support.shapes import check_arch, check_inputs, resize_tokens
from support.cli import UserError
from support.distributed import GlobalBatchNorm, all_ranks_sum, global_mean

# What each mode trains (every script asks this table): features, the DiT denoises z~ with the
# image; learned_proj, P is trained with it (else frozen at the PCA); repa, REPA's alignment loss.
Mode = namedtuple("Mode", "features learned_proj repa")
MODES = {"sit": Mode(False, False, False), "repa": Mode(False, False, True),
         "redi": Mode(True, False, False), "coredi": Mode(True, True, False)}


# -----------------------------------------------------------------------------
# The DiT/SiT transformer (the state_dict layout of facebookresearch/DiT and willisma/SiT)

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding [cos, sin] of t (B,) in [0, 1], 0 = noise; unscaled, as SiT does."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * i / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """One more row, index num_classes: CFG's null label (the training loop drops labels)."""

    def __init__(self, num_classes, hidden):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y):
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Patches -> tokens; with a bottleneck, JiT's two steps, so large pixel patches stay cheap."""

    def __init__(self, patch, in_ch, hidden, bottleneck=0):
        super().__init__()
        if bottleneck:
            self.proj1 = nn.Conv2d(in_ch, bottleneck, patch, stride=patch, bias=False)
            self.proj2 = nn.Conv2d(bottleneck, hidden, 1)
        else:
            self.proj = nn.Conv2d(in_ch, hidden, patch, stride=patch)
        self.bottleneck = bottleneck

    def forward(self, x):  # (B, C, H, W) -> (B, H/p * W/p, hidden)
        x = self.proj2(self.proj1(x)) if self.bottleneck else self.proj(x)
        return x.flatten(2).transpose(1, 2)


class DiTBlock(nn.Module):
    """adaLN-Zero block: c gives both branches' shift, scale, gate. qk_norm: SVG's LayerNorms."""

    def __init__(self, hidden, heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True, qk_norm=qk_norm,  # SDPA
                              norm_layer=nn.LayerNorm if qk_norm else None)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        gelu = lambda: nn.GELU(approximate="tanh")
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=gelu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):  # x: (B, N, hidden), c: (B, hidden)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN, then each token's patch values (linear) and d feature values (linear_z). DiT's norm
    is a parameter-free LayerNorm, JiT's an RMSNorm."""

    def __init__(self, hidden, patch, out_ch, feat_dim=0, rmsnorm=False):
        super().__init__()
        layer_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.norm_final = RMSNorm(hidden) if rmsnorm else layer_norm
        self.linear = nn.Linear(hidden, patch * patch * out_ch)
        self.linear_z = nn.Linear(hidden, feat_dim) if feat_dim else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):  # (B, N, hidden) -> (B, N, p*p*out_ch), (B, N, d) or None
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x), (self.linear_z(x) if self.linear_z is not None else None)


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos table (grid^2, dim): token (r, c) has [sin cw, cos cw, sin rw, cos rw]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    r, c = torch.meshgrid(*[torch.arange(grid, dtype=torch.float64)] * 2, indexing="ij")
    c, r = c.reshape(-1, 1) * omega, r.reshape(-1, 1) * omega
    return torch.cat([c.sin(), c.cos(), r.sin(), r.cos()], dim=1).float()


class DiT(nn.Module):
    """Class-conditional DiT/SiT, with d feature channels denoised jointly, fused in two ways:
    'channels' (latent space, ReDi's): z (B, d, H, W) joins the image's channels before one patch
    embedding, and d more output channels predict it; 'tokens': z (B, grid^2, d) is embedded per
    token, h = embed_x(x_t) + embed_z(z_t) + pos, and a second head predicts it. REPA's projector
    after block repa_depth; no learn_sigma. qk_norm: SVG's. block='jit', in_context_*: JiT's."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, num_classes=1000, feat_dim=0, fusion="tokens",
                 bottleneck=0, repa_depth=0, repa_dim=0, projector_dim=2048, qk_norm=False,
                 block="dit", in_context_len=0, in_context_start=0, dropout=0.0):
        super().__init__()
        check_arch(input_size, patch_size, depth, repa_depth, hidden_size // num_heads, block,
                   feat_dim and fusion, in_context_len and in_context_start)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_classes, self.feat_dim, self.repa_depth = num_classes, feat_dim, repa_depth
        self.fusion = fusion if feat_dim else None
        tokens, jit = self.fusion == "tokens", block == "jit"
        self.out_channels = in_channels + (0 if tokens else feat_dim)  # per patch, in and out
        self.grid = input_size // patch_size
        self.in_context_len, self.in_context_start = in_context_len, in_context_start
        self.grad_checkpoint = False  # recompute blocks in the backward pass: memory for compute

        self.x_embedder = PatchEmbed(patch_size, self.out_channels, hidden_size, bottleneck)
        self.z_embedder = nn.Linear(feat_dim, hidden_size) if tokens else None
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(sincos_pos_embed(hidden_size, self.grid)[None], False)
        middle = range(depth // 4, depth // 4 * 3)  # JiT's dropout acts in the middle half only
        self.blocks = nn.ModuleList([
            JiTBlock(hidden_size, num_heads, mlp_ratio, dropout * (i in middle)) if jit else
            DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for i in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels,
                                      feat_dim if tokens else 0, rmsnorm=jit)
        self.projector = repa_projector(hidden_size, projector_dim, repa_dim) if repa_depth \
            else None
        self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, hidden_size)) \
            if in_context_len else None
        self.jit = jit
        if jit:  # RoPE tables of the class and image tokens; not saved (as in JiT's checkpoints)
            cos, sin = rope_2d(hidden_size // num_heads, self.grid, in_context_len)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        # DiT's (JiT's too): zeroed adaLN and output layers make the output exactly zero at init.
        linear = [m for m in self.modules() if isinstance(m, nn.Linear)]
        for m in linear + [m for m in self.x_embedder.modules() if isinstance(m, nn.Conv2d)]:
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias) if m.bias is not None else None
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        last = self.final_layer
        for m in [b.adaLN_modulation[-1] for b in self.blocks] + [last.adaLN_modulation[-1],
                                                                  last.linear, last.linear_z]:
            if m is not None:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        if self.in_context_posemb is not None:
            nn.init.normal_(self.in_context_posemb, std=0.02)

    def forward(self, x, t, y, z=None):
        """x: (B, C, H, W) noisy image; t: (B,) in [0, 1], 0 = noise, unscaled; y: (B,) labels
        (null: num_classes); z: (B, *z_shape) noisy features (zeros: none, --cfg-rep), iff feat_dim.
        Returns the image output like x, the feature output like z, REPA's projections (or None)."""
        check_inputs(self, x, z)
        if self.fusion == "channels":
            x = torch.cat([x, z.to(x.dtype)], dim=1)  # (B, C + d, H, W)
        h = self.x_embedder(x) + self.pos_embed  # (B, N, hidden), N = H * W / p^2
        if self.fusion == "tokens":
            h = h + self.z_embedder(z.to(h.dtype))
        y_emb = self.y_embedder(y)  # (B, hidden)
        c = self.t_embedder(t) + y_emb
        N, repa = h.shape[1], None
        for i, block in enumerate(self.blocks):
            if self.in_context_len and i == self.in_context_start:  # JiT: the class tokens join
                h = torch.cat([(y_emb[:, None] + self.in_context_posemb).to(h.dtype), h], dim=1)
            rope = (self.rope_cos[-h.shape[1]:], self.rope_sin[-h.shape[1]:]) if self.jit else ()
            if self.grad_checkpoint and self.training:
                h = checkpoint(block, h, c, *rope, use_reentrant=False)
            else:
                h = block(h, c, *rope)  # (B, [in_context_len +] N, hidden)
            if i + 1 == self.repa_depth:
                repa = self.projector(h[:, -N:])  # (B, N, D_enc)
        out, out_z = self.final_layer(h[:, -N:], c)  # (B, N, p*p*out_channels), (B, N, d) | None
        out = self.unpatchify(out)  # (B, out_channels, H, W)
        if self.fusion == "channels":
            out, out_z = out[:, :self.in_channels], out[:, self.in_channels:]
        return out, out_z, repa

    @property
    def z_shape(self):
        """The shape of one sample's feature input z (None without a feature stream)."""
        if self.fusion == "channels":
            return (self.feat_dim, self.input_size, self.input_size)
        return (self.grid ** 2, self.feat_dim) if self.fusion == "tokens" else None

    def features_in(self, z, enc_grid):
        """z~ (B, L, d) on the encoder grid -> the layout of the DiT's z input. Channels: the token
        map bilinearly upsampled to the image grid, as ReDi's code does (16x16 -> 32x32)."""
        if self.fusion == "tokens":
            return resize_tokens(z, enc_grid, (self.grid, self.grid))
        if z.shape[1] != enc_grid[0] * enc_grid[1]:
            raise UserError(f"{z.shape[1]} feature tokens do not form the encoder grid {enc_grid}")
        z = z.transpose(1, 2).reshape(z.shape[0], z.shape[2], *enc_grid)  # (B, d, h, w)
        size = (self.input_size, self.input_size)
        return F.interpolate(z.float(), size=size, mode="bilinear", align_corners=False).to(z.dtype)

    def unpatchify(self, x):
        """(B, N, p*p*C) -> (B, C, H, W), each token's values laid out as (p, q, C)."""
        p, g, C = self.patch_size, self.grid, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, g * p, g * p)


# -----------------------------------------------------------------------------
# JiT's block: the pixel-space transformer of Li & He 2025 ("Back to Basics: Let Denoising
# Generative Models Denoise"), in the state_dict layout of LTH14/JiT's model_jit.py

class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, in float32 at least (also under bf16): JiT's."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        return F.rms_norm(wide, (x.shape[-1],), self.weight.to(wide.dtype), self.eps).to(x.dtype)


def rope_2d(head_dim, grid, prefix=0, theta=10000.0):
    """JiT's 2-D rotary tables (cos, sin), (prefix + grid^2, head_dim), after `prefix` unrotated
    tokens (the class tokens); a head's first half turns with the row, its second with the column"""
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)
    angle = torch.outer(torch.arange(grid, dtype=torch.float32), freqs).repeat_interleave(2, dim=1)
    rows, cols = angle[:, None].expand(grid, grid, half), angle[None].expand(grid, grid, half)
    angle = torch.cat([torch.zeros(prefix, head_dim), torch.cat([rows, cols], -1).flatten(0, 1)])
    return angle.cos(), angle.sin()


def apply_rope(x, cos, sin):
    """Rotate each channel pair (a, b) of x (..., L, head_dim) to (a cos - b sin, b cos + a sin)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return x * cos + torch.stack([-b, a], dim=-1).flatten(-2) * sin


class RoPEAttention(nn.Module):
    """JiT's attention: RMSNorm on queries and keys (bounded logits), then 2-D RoPE. JiT's logits
    are float32 by hand; SDPA in v's dtype (bf16) is fused, and qk-norm keeps it well-behaved."""

    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = RMSNorm(dim // heads), RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x, cos, sin):  # x: (B, L, C)
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q = apply_rope(self.q_norm(q), cos, sin).to(v.dtype)  # (B, heads, L, C / heads)
        k = apply_rope(self.k_norm(k), cos, sin).to(v.dtype)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, L, C)))


class SwiGLU(nn.Module):
    """silu(x W1) * (x W2), then W3; W1 and W2 are one fused linear (JiT's w12)."""

    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.drop(F.silu(gate) * up))


class JiTBlock(nn.Module):
    """DiT's adaLN-Zero block with JiT's parts: RMSNorm, qk-norm + RoPE attention, SwiGLU MLP."""

    def __init__(self, hidden, heads, mlp_ratio=4.0, dropout=0.0):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(hidden), RMSNorm(hidden)
        self.attn = RoPEAttention(hidden, heads, dropout)
        # 2/3 of the width: SwiGLU's 3 matrices hold a GELU MLP's weights (B 2048, L 2730, H 3413)
        self.mlp = SwiGLU(hidden, int(int(hidden * mlp_ratio) * 2 / 3), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


# -----------------------------------------------------------------------------
# REPA's projector, a prediction as a velocity, the time shift

def repa_projector(hidden, projector_dim, repa_dim):
    """REPA: a per-token MLP from the DiT's hidden state to the encoder's feature space."""
    return nn.Sequential(nn.Linear(hidden, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, repa_dim))


def to_velocity(pred, x_t, t, prediction):
    """The network's output as a velocity v = x - eps. Latent space predicts v; pixel space (JiT)
    the clean x, and v = (x_hat - x_t) / (1 - t), with 1 - t clamped at 0.05 near the data end."""
    if prediction == "v":
        return pred
    t = t.view(-1, *[1] * (x_t.dim() - 1))
    return (pred - x_t) / (1 - t).clamp_min(0.05)


def shift_time(t, shift):
    """SVG's time shift t -> s t / (1 + (s - 1) t) of t in [0, 1] (0 = noise): it fixes 0 and 1 and,
    for s < 1, moves every t towards the noise end."""
    return shift * t / (1 + (shift - 1) * t)


# -----------------------------------------------------------------------------
# The feature projection z0 -> z~ (ReDi: frozen PCA; CoReDi: learned, co-evolving with the DiT).
# Under DDP each rank holds a share of the batch, but batch norm and the covariance penalty see the
# global batch (support/distributed.py), or 1 and N ranks would train different models.

class FeatureProjection(nn.Module):
    """z~ = BN((standardize(z0) - pca_mean) @ P), tokens (B, L, D_enc) -> (B, L, d); its state is
    tensors (in the checkpoint). ReDi: P = the top-d principal directions of standardized tokens,
    frozen, no BN (not whitened). CoReDi: P learnable (from the PCA or random), BN over B x L."""

    def __init__(self, enc_dim, d=8, learnable=False, batchnorm=False, vf_map="learned",
                 scale="unit"):
        super().__init__()
        self.d, self.learnable, self.pca_scale = d, learnable, batchnorm and scale == "pca"
        self.register_buffer("enc_mean", torch.zeros(enc_dim))
        self.register_buffer("enc_std", torch.ones(enc_dim))
        self.register_buffer("pca_mean", torch.zeros(enc_dim))
        self.register_buffer("pca_var", torch.zeros(d))  # explained variance, for the logs
        if learnable:
            self.P = nn.Parameter(torch.zeros(enc_dim, d))
        else:
            self.register_buffer("P", torch.zeros(enc_dim, d))
        # BN over all tokens keeps each channel at unit variance: what stops a learned P from
        # shrinking channels until the features are trivially predictable.
        self.bn = GlobalBatchNorm(d, affine=False) if batchnorm else None
        learned_map = learnable and vf_map == "learned"  # VF's map from z~ back to z0 (else P^T)
        self.vf_map = nn.Linear(d, enc_dim, bias=False) if learned_map else None

    @torch.no_grad()
    def fit(self, z0, init="pca", generator=None):
        """Fit the standardization and the PCA on encoder tokens z0 (N, D_enc); P is the PCA (or a
        random orthonormal matrix: init='random'). Once before training, equal on every rank."""
        z0 = z0.reshape(-1, z0.shape[-1]).double()
        if z0.shape[0] <= self.d or self.d > z0.shape[1]:
            raise UserError(f"a PCA of {z0.shape[0]} tokens of width {z0.shape[1]} has no {self.d} "
                            f"directions; lower --feat-dim or fit on more (--pca-images)")
        self.enc_mean.copy_(z0.mean(0))
        self.enc_std.copy_(z0.std(0).clamp_min(1e-6))
        s = (z0 - self.enc_mean.double()) / self.enc_std.double()
        mu = s.mean(0)
        s = s - mu
        evals, evecs = torch.linalg.eigh(s.T @ s / (s.shape[0] - 1))  # ascending
        P = evecs[:, -self.d:].flip(1)
        P = P * torch.sign(P[P.abs().argmax(0), torch.arange(self.d)])  # sign: largest entry > 0
        self.pca_mean.copy_(mu)
        self.pca_var.copy_(evals[-self.d:].flip(0))
        if init == "random":
            P = nn.init.orthogonal_(torch.empty_like(P), generator=generator)
        self.P.copy_(P)
        if self.vf_map is not None:  # the VF map starts as P^T, the inverse of an orthonormal P
            self.vf_map.weight.copy_(P)

    def standardize(self, z0):
        return (z0.float() - self.enc_mean) / self.enc_std

    def map_back(self, z):
        """VF's map from z~ (..., d) back to the encoder space: the learned linear map, or P^T."""
        return self.vf_map(z) if self.vf_map is not None else z @ self.P.T

    def forward(self, z0):  # (B, L, D_enc) -> (B, L, d)
        z = (self.standardize(z0) - self.pca_mean) @ self.P
        if self.bn is not None:
            B, L, d = z.shape
            z = self.bn(z.reshape(B * L, d)).reshape(B, L, d)
        return z

    @property
    def stream_scale(self):  # z~'s factor into the DiT: 1, or each channel's PCA std (ReDi's scale)
        return self.pca_var.sqrt() if self.pca_scale else 1.0


def build_projection(mode, enc_dim, d=8, batchnorm=True, vf_map="learned", scale="unit"):
    """A mode's feature projection: None without features; ReDi's frozen PCA; CoReDi's learned P
    with batch norm (batchnorm), VF's map (vf_map: 'learned', 'fixed' = P^T, None = no VF) and
    the scale after the norm (scale: 'unit', or 'pca': each channel at its PCA std, as ReDi's)."""
    m = MODES[mode]
    if not m.features:
        return None
    return FeatureProjection(enc_dim, d, learnable=m.learned_proj,
                             batchnorm=m.learned_proj and batchnorm,
                             vf_map=vf_map if m.learned_proj else None, scale=scale)


def ortho_loss(P):
    """||P^T P - I||_F^2: zero exactly when the columns of P are orthonormal."""
    return (P.T @ P - torch.eye(P.shape[1], device=P.device, dtype=P.dtype)).pow(2).sum()


def cov_loss(z):
    """VICReg's covariance term over the global batch: the squared off-diagonal entries of the
    channel covariance of z (..., d), summed and divided by d (VICReg's normalisation)."""
    z = z.reshape(-1, z.shape[-1]).float()
    mean, n = global_mean(z)
    z = z - mean
    cov = all_ranks_sum(z.T @ z) / (n - 1)
    return (cov - torch.diag(torch.diag(cov))).pow(2).sum() / cov.shape[0]


def vf_loss(z, f, vf_map, cos_margin=0.5, dist_margin=0.25):
    """VA-VAE's vision-foundation loss between z~ (B, L, d) and standardized features f (B, L, D):
    a marginal cosine term tying each token's vf_map(z) to f, and a marginal term matching each
    image's token-token cosine similarities (VA-VAE's margins). Per-token means: DDP-exact."""
    cos = F.cosine_similarity(vf_map(z).float(), f.float(), dim=-1)
    l_cos = F.relu(1 - cos_margin - cos).mean()
    zn, fn = F.normalize(z.float(), dim=-1), F.normalize(f.float(), dim=-1)
    l_dist = F.relu((zn @ zn.transpose(1, 2) - fn @ fn.transpose(1, 2)).abs() - dist_margin).mean()
    return l_cos + l_dist


@torch.no_grad()
def feature_stats(z):
    """Collapse diagnostics of z (..., d): the per-channel std, and the effective rank = exp of the
    entropy of the normalised singular values of the centred (N, d) matrix (d: isotropic)."""
    z = z.reshape(-1, z.shape[-1]).float()
    s = torch.linalg.svdvals(z - z.mean(0))
    p = (s / s.sum().clamp_min(1e-12))[s > 0]
    return z.std(0), torch.exp(-(p * p.log()).sum()).item()


# -----------------------------------------------------------------------------
# Model sizes: (depth, hidden, heads); S/B/L/XL are DiT's, T is ours (tiny: demo and tests). JiT's
# add (bottleneck, in-context tokens, first in-context block): B/L/H are model_jit.py's; T has 8 on
# its 64-token grid (JiT-B/16's 32 of 256) from block 1 (JiT: a third of the depth or less).
SIZES = {"T": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
         "XL": (28, 1152, 16)}
JIT_SIZES = {"T": (4, 128, 4, 32, 8, 1), "B": (12, 768, 12, 128, 32, 4),
             "L": (24, 1024, 16, 128, 32, 8), "H": (32, 1280, 16, 256, 32, 10)}


def create_model(name, **kwargs):
    """'DiT-XL/2' (or the same 'SiT-XL/2') or 'JiT-B/16' (a DiT of JiT's blocks, predicting the
    clean image), with DiT's keyword arguments (a bottleneck given here replaces JiT's)."""
    m = re.fullmatch(r"(?:DiT|SiT)-(T|S|B|L|XL)/(1|2|4|8|16)", name)
    if m is not None:
        depth, hidden, heads = SIZES[m[1]]
        return DiT(patch_size=int(m[2]), hidden_size=hidden, depth=depth, num_heads=heads, **kwargs)
    m = re.fullmatch(r"JiT-(T|B|L|H)/(4|8|16|32)", name)
    if m is not None:
        depth, hidden, heads, bottleneck, n_ctx, start = JIT_SIZES[m[1]]
        # pixels by default; JiT-H trains with --proj_dropout 0.2 (JiT's README), other sizes none
        own = dict(bottleneck=bottleneck, in_channels=3, dropout=0.2 if m[1] == "H" else 0.0)
        kwargs = {**own, **kwargs}
        return DiT(patch_size=int(m[2]), hidden_size=hidden, depth=depth, num_heads=heads,
                   block="jit", in_context_len=n_ctx, in_context_start=start, **kwargs)
    raise UserError(f"unknown model '{name}': use (DiT|SiT)-(T|S|B|L|XL)/(1|2|4|8|16), e.g. "
                    f"SiT-XL/2, or JiT-(T|B|L|H)/(4|8|16|32), e.g. JiT-B/16")
