"""
The networks of joint image-feature diffusion, in data-flow order:

1. the DiT/SiT transformer that denoises image tokens and projected feature tokens together (ReDi's channel
   fusion in latent space, per-token fusion in pixel space);
2. JiT's block and model, the pixel-space transformer;
3. REPA's projector, and the conversion of a prediction to a velocity;
4. the feature projection z0 -> z~: ReDi's frozen PCA, or CoReDi's learned P with batch norm, its regularizers
   and the collapse diagnostics;
5. the model sizes.

Time convention everywhere (SiT's interpolant): x_t = t*x + (1-t)*eps, t=0 is noise, t=1 is data.
"""
import math
import re
from collections import namedtuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Mlp
from torch.utils.checkpoint import checkpoint

from support.cli import UserError

# What each mode trains; every script asks this table instead of testing mode names.
#   features:     a feature stream: the DiT denoises projected encoder features z~ with the image
#   learned_proj: the projection P is trained with the DiT (CoReDi, with its regularizers) or frozen at the PCA
#   repa:         REPA's alignment loss is on (train.py --repa adds it to redi/coredi)
Mode = namedtuple("Mode", "features learned_proj repa")
MODES = {"sit": Mode(False, False, False), "repa": Mode(False, False, True),
         "redi": Mode(True, False, False), "coredi": Mode(True, True, False)}


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
    """Transformer block with adaLN-Zero conditioning: shift, scale and gate of both branches come from c.
    qk_norm: a LayerNorm with affine parameters on each head's queries and keys (SVG's DiT; timm's keys
    attn.q_norm / attn.k_norm are SVG's)."""

    def __init__(self, hidden, heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True, qk_norm=qk_norm,  # timm: fused SDPA kernel
                              norm_layer=nn.LayerNorm if qk_norm else None)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN + linear to each token's patch values; linear_z gives the token's d feature values.
    DiT normalises with a LayerNorm without parameters, JiT with an RMSNorm with a learned scale (rmsnorm=True)."""

    def __init__(self, hidden, patch, out_ch, feat_dim=0, rmsnorm=False):
        super().__init__()
        self.norm_final = RMSNorm(hidden) if rmsnorm else nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
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
class Backbone(nn.Module):
    """What DiT and JiT share: the input checks, unpatchify and DiT's initialisation (which JiT also uses)."""

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

    @property
    def z_shape(self):
        """Shape of one sample's feature input z (None without a feature stream)."""
        if self.fusion == "channels":
            return (self.feat_dim, self.input_size, self.input_size)
        return (self.grid ** 2, self.feat_dim) if self.fusion == "tokens" else None

    def features_in(self, z, enc_grid):
        """Projected features z~ (B, L, d) on the encoder grid -> the layout of the model's z input. Channels: the
        token map bilinearly upsampled to the image grid, as ReDi's code does (16x16 -> 32x32, align_corners=False)."""
        if self.fusion == "tokens":
            return resize_tokens(z, enc_grid, (self.grid, self.grid))
        if z.shape[1] != enc_grid[0] * enc_grid[1]:
            raise UserError(f"{z.shape[1]} feature tokens do not form the encoder grid {enc_grid[0]}x{enc_grid[1]}")
        z = z.transpose(1, 2).reshape(z.shape[0], z.shape[2], *enc_grid)
        return F.interpolate(z.float(), size=(self.input_size, self.input_size), mode="bilinear",
                             align_corners=False).to(z.dtype)

    def unpatchify(self, x):
        """(B, N, p*p*C) -> (B, C, H, W), each token's values laid out as (p, q, C)."""
        p, g, C = self.patch_size, self.grid, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, g * p, g * p)

    def check_inputs(self, x, z):
        if tuple(x.shape[1:]) != (self.in_channels, self.input_size, self.input_size):
            raise UserError(f"the model takes images of shape {(self.in_channels, self.input_size, self.input_size)}, "
                            f"got {tuple(x.shape[1:])}")
        if (z is not None) != bool(self.feat_dim):
            raise UserError("feature input z must be given exactly when the model has a feature stream "
                            f"(feat_dim={self.feat_dim})")
        if z is not None and tuple(z.shape) != (x.shape[0], *self.z_shape):
            raise UserError(f"the model takes features of shape {(x.shape[0], *self.z_shape)} ({self.fusion} fusion), "
                            f"got {tuple(z.shape)}; the model's features_in maps the encoder grid to it")


class DiT(Backbone):
    """Class-conditional DiT/SiT over image tokens, optionally with d feature channels denoised jointly, and with
    REPA's projector after block repa_depth. The features are fused in one of two ways:
      fusion='channels' (latent space, ReDi's layout): z (B, d, H, W) on the image grid is concatenated to the
        image channels and one patch embedding takes both; the output's extra d channels are the feature output.
      fusion='tokens' (the image token grid is the encoder grid): z (B, grid*grid, d) is embedded per token and
        added, h = embed_x(x_t) + embed_z(z_t) + pos, and a second head predicts each token's d values.
    The image output has in_channels channels (no learn_sigma). qk_norm: LayerNorm on queries and keys (SVG)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, feat_dim=0, fusion="tokens", bottleneck=0, repa_depth=0, repa_dim=0,
                 projector_dim=2048, qk_norm=False):
        super().__init__()
        if input_size % patch_size:
            raise UserError(f"image size {input_size} is not divisible by the patch size {patch_size}")
        if repa_depth > depth:
            raise UserError(f"REPA depth {repa_depth} is deeper than the model ({depth} blocks)")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_classes, self.feat_dim, self.repa_depth = num_classes, feat_dim, repa_depth
        self.fusion = fusion if feat_dim else None
        self.out_channels = in_channels + (feat_dim if self.fusion == "channels" else 0)  # per patch, both ways
        self.grid = input_size // patch_size
        self.grad_checkpoint = False  # recompute each block in the backward pass: memory only, ~1/3 more compute

        tokens = self.fusion == "tokens"
        self.x_embedder = PatchEmbed(patch_size, self.out_channels, hidden_size, bottleneck)
        self.z_embedder = nn.Linear(feat_dim, hidden_size) if tokens else None
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(sincos_pos_embed(hidden_size, self.grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, feat_dim if tokens else 0)
        self.projector = repa_projector(hidden_size, projector_dim, repa_dim) if repa_depth else None
        self.initialize_weights()

    def forward(self, x, t, y, z=None):
        """x: (B, C, H, W) noisy image at time t; t: (B,) in [0, 1], 0 = noise, 1 = data; y: (B,) labels
        (num_classes = null); z: (B, *z_shape) noisy features (zeros = representation guidance's 'no features'),
        required iff the model has a feature stream.
        Returns (image output like x, feature output like z or None, REPA projections (B, N, D_enc) or None)."""
        self.check_inputs(x, z)
        if self.fusion == "channels":
            x = torch.cat([x, z.to(x.dtype)], dim=1)
        h = self.x_embedder(x) + self.pos_embed
        if self.fusion == "tokens":
            h = h + self.z_embedder(z.to(h.dtype))
        c = self.t_embedder(t) + self.y_embedder(y)
        repa = None
        for i, block in enumerate(self.blocks):
            h = checkpoint(block, h, c, use_reentrant=False) if self.grad_checkpoint and self.training else block(h, c)
            if i + 1 == self.repa_depth:
                repa = self.projector(h)
        out, out_z = self.final_layer(h, c)
        out = self.unpatchify(out)
        if self.fusion == "channels":
            out, out_z = out[:, :self.in_channels], out[:, self.in_channels:]
        return out, out_z, repa


# -----------------------------------------------------------------------------
# JiT, the pixel-space transformer (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise";
# state_dict layout of LTH14/JiT's model_jit.py, so its released weights load)

class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, in float32 at least, as JiT does (also under bf16 autocast)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        return F.rms_norm(wide, (x.shape[-1],), self.weight.to(wide.dtype), self.eps).to(x.dtype)
def rope_2d(head_dim, grid, prefix=0, theta=10000.0):
    """JiT's 2-D rotary tables (cos, sin), each (prefix + grid*grid, head_dim), for row-major tokens after
    `prefix` unrotated ones (angle 0: the in-context class tokens have no position). The first half of a head's
    channels turns with the token's row, the second half with its column, in channel pairs (2i, 2i+1)."""
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)
    angle = torch.outer(torch.arange(grid, dtype=torch.float32), freqs).repeat_interleave(2, dim=1)  # (grid, half)
    angle = torch.cat([angle[:, None].expand(grid, grid, half), angle[None].expand(grid, grid, half)], dim=-1)
    angle = torch.cat([torch.zeros(prefix, head_dim), angle.reshape(grid * grid, head_dim)])
    return angle.cos(), angle.sin()


def apply_rope(x, cos, sin):
    """Rotate each channel pair (a, b) of x (..., L, head_dim) to (a cos - b sin, b cos + a sin)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return x * cos + torch.stack([-b, a], dim=-1).flatten(-2) * sin


class RoPEAttention(nn.Module):
    """JiT's attention: RMSNorm on each head's queries and keys (bounded logits), then 2-D RoPE on both.
    JiT computes the logits in float32 by hand; we call SDPA in v's dtype (bf16 under autocast) for its fused
    kernels, which qk-norm keeps well-conditioned."""

    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x, cos, sin):
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q = apply_rope(self.q_norm(q), cos, sin).to(v.dtype)
        k = apply_rope(self.k_norm(k), cos, sin).to(v.dtype)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, L, C)))


class SwiGLU(nn.Module):
    """silu(x W1) * (x W2), then W3; W1 and W2 are one fused linear (JiT's w12)."""

    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.drop(F.silu(gate) * up))


class JiTBlock(nn.Module):
    """DiT's adaLN-Zero block with JiT's parts: RMSNorm (learned scale), qk-norm + RoPE attention, SwiGLU MLP."""

    def __init__(self, hidden, heads, mlp_ratio=4.0, dropout=0.0):
        super().__init__()
        self.norm1 = RMSNorm(hidden)
        self.attn = RoPEAttention(hidden, heads, dropout)
        self.norm2 = RMSNorm(hidden)
        # SwiGLU has three matrices instead of two: 2/3 of the width keeps the parameters of a GELU MLP of
        # mlp_ratio (JiT rounds down twice: 2048 for B, 2730 for L, 3413 for H).
        self.mlp = SwiGLU(hidden, int(int(hidden * mlp_ratio) * 2 / 3), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class JiT(Backbone):
    """Class-conditional JiT over pixel patches: bottleneck patch embedding and JiT blocks; from block
    in_context_start on, in_context_len copies of the class embedding (each plus a learned offset) are prepended
    to the image tokens and are dropped before the final layer. It predicts the clean image (x-prediction:
    to_velocity turns it into v). Optional feature stream fused per token (h = embed_x(x_t) + pos + embed_z(z_t))
    and REPA's projector after block repa_depth, on the image tokens, as in DiT."""

    def __init__(self, input_size=256, patch_size=16, in_channels=3, hidden_size=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, num_classes=1000, feat_dim=0, fusion="tokens", bottleneck=128, in_context_len=32,
                 in_context_start=4, dropout=0.0, repa_depth=0, repa_dim=0, projector_dim=2048):
        super().__init__()
        if feat_dim and fusion != "tokens":
            raise UserError("JiT fuses the features per token (pixel space); channel fusion is for latent-space DiTs")
        if input_size % patch_size:
            raise UserError(f"image size {input_size} is not divisible by the patch size {patch_size}")
        if repa_depth > depth:
            raise UserError(f"REPA depth {repa_depth} is deeper than the model ({depth} blocks)")
        if hidden_size % (4 * num_heads):
            raise UserError(f"2-D RoPE needs a head size divisible by 4, got {hidden_size}/{num_heads} heads")
        if in_context_len and not 0 <= in_context_start < depth:
            raise UserError(f"in-context tokens start at block {in_context_start}, outside the {depth} blocks")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_classes, self.feat_dim, self.repa_depth = num_classes, feat_dim, repa_depth
        self.in_context_len, self.in_context_start = in_context_len, in_context_start
        self.fusion, self.out_channels = "tokens" if feat_dim else None, in_channels  # per-token features only
        self.grid = input_size // patch_size
        self.grad_checkpoint = False  # recompute each block in the backward pass: memory only, ~1/3 more compute

        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, bottleneck)
        self.z_embedder = nn.Linear(feat_dim, hidden_size) if feat_dim else None
        self.pos_embed = nn.Parameter(sincos_pos_embed(hidden_size, self.grid)[None], requires_grad=False)
        self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, hidden_size)) if in_context_len else None
        # RoPE tables for the in-context tokens and the image tokens; a block before in_context_start uses the
        # last grid^2 rows. Not saved: they are a function of the config (JiT's checkpoints do not hold them).
        cos, sin = rope_2d(hidden_size // num_heads, self.grid, in_context_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # JiT's dropout (its --proj_dropout) acts in the middle half of the blocks only.
        self.blocks = nn.ModuleList([
            JiTBlock(hidden_size, num_heads, mlp_ratio, dropout if depth // 4 <= i < depth // 4 * 3 else 0.0)
            for i in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, feat_dim, rmsnorm=True)
        self.projector = repa_projector(hidden_size, projector_dim, repa_dim) if repa_depth else None
        self.initialize_weights()

    def initialize_weights(self):
        super().initialize_weights()  # JiT initialises as DiT does; RMSNorm scales start at 1
        if self.in_context_posemb is not None:
            nn.init.normal_(self.in_context_posemb, std=0.02)

    def forward(self, x, t, y, z=None):
        """x: (B, C, H, W) noisy image at time t; t: (B,) in [0, 1], 0 = noise, 1 = data, fed to the timestep
        embedder unscaled (as JiT does; its time runs the same way as SiT's); y: (B,) labels (num_classes = null);
        z: (B, grid*grid, d) noisy feature tokens, required iff the model has a feature stream.
        Returns (predicted clean image like x, predicted clean features like z or None, REPA projections or None)."""
        self.check_inputs(x, z)
        N = self.grid ** 2
        h = self.x_embedder(x) + self.pos_embed
        if z is not None:
            h = h + self.z_embedder(z.to(h.dtype))
        y_emb = self.y_embedder(y)
        c = self.t_embedder(t) + y_emb
        repa = None
        for i, block in enumerate(self.blocks):
            if self.in_context_len and i == self.in_context_start:
                h = torch.cat([(y_emb[:, None] + self.in_context_posemb).to(h.dtype), h], dim=1)
            cos, sin = self.rope_cos[-h.shape[1]:], self.rope_sin[-h.shape[1]:]
            if self.grad_checkpoint and self.training:
                h = checkpoint(block, h, c, cos, sin, use_reentrant=False)
            else:
                h = block(h, c, cos, sin)
            if i + 1 == self.repa_depth:
                repa = self.projector(h[:, -N:])
        out_x, out_z = self.final_layer(h[:, -N:], c)
        return self.unpatchify(out_x), out_z, repa
# -----------------------------------------------------------------------------
# REPA's projector, the time shift and the conversion of the network's output to a velocity

def repa_projector(hidden, projector_dim, repa_dim):
    """REPA: per-token MLP from the hidden state to the encoder's feature space."""
    return nn.Sequential(nn.Linear(hidden, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, repa_dim))
def to_velocity(pred, x_t, t, prediction):
    """The network's output as a velocity v = x - eps. Latent space predicts v directly; pixel space (JiT)
    predicts the clean x and v = (x_hat - x_t) / (1 - t), with 1 - t clamped at 0.05 near the data end."""
    if prediction == "v":
        return pred
    t = t.view(-1, *[1] * (x_t.dim() - 1))
    return (pred - x_t) / (1 - t).clamp_min(0.05)
def shift_time(t, shift):
    """SVG's time shift t -> s t / (1 + (s - 1) t) of t in [0, 1] (0 = noise, 1 = data; a float or a tensor):
    it fixes 0 and 1 and, for s < 1, moves every t towards the noise end."""
    return shift * t / (1 + (shift - 1) * t)
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
# The feature projection z0 -> z~ (ReDi: frozen PCA; CoReDi: learned, co-evolving with the DiT).
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
    """VICReg's covariance term over the global batch: the squared off-diagonal entries of the channel covariance
    of z (..., d), summed and divided by d, as VICReg normalises it."""
    z = z.reshape(-1, z.shape[-1]).float()
    mean, n = global_mean(z)
    z = z - mean
    cov = all_ranks_sum(z.T @ z) / (n - 1)
    return (cov - torch.diag(torch.diag(cov))).pow(2).sum() / cov.shape[0]


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
# Model sizes

# (depth, hidden, heads). S/B/L/XL are DiT's; T is ours, a tiny model for the CPU demo and the tests.
SIZES = {"T": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# (depth, hidden, heads, bottleneck, in-context tokens, first in-context block). B/L/H are JiT's (model_jit.py,
# JiT_B_16 etc.); T is ours: DiT-T's size, with 8 in-context tokens on its 64-token demo grid (JiT-B/16's
# 32 on 256 tokens is the same eighth) from block 1 (JiT starts at a third of the depth, or less).
JIT_SIZES = {"T": (4, 128, 4, 32, 8, 1), "B": (12, 768, 12, 128, 32, 4), "L": (24, 1024, 16, 128, 32, 8),
             "H": (32, 1280, 16, 256, 32, 10)}


def create_model(name, **kwargs):
    """'DiT-XL/2' (or the same 'SiT-XL/2') plus DiT keyword arguments (input_size, in_channels, feat_dim, ...),
    or 'JiT-B/16' plus JiT keyword arguments (a bottleneck given here replaces the size's)."""
    m = re.fullmatch(r"(?:DiT|SiT)-(T|S|B|L|XL)/(1|2|4|8|16)", name)
    if m is not None:
        depth, hidden, heads = SIZES[m[1]]
        return DiT(patch_size=int(m[2]), hidden_size=hidden, depth=depth, num_heads=heads, **kwargs)
    m = re.fullmatch(r"JiT-(T|B|L|H)/(4|8|16|32)", name)
    if m is not None:
        depth, hidden, heads, bottleneck, n_ctx, start = JIT_SIZES[m[1]]
        kwargs.setdefault("bottleneck", bottleneck)
        return JiT(patch_size=int(m[2]), hidden_size=hidden, depth=depth, num_heads=heads, in_context_len=n_ctx,
                   in_context_start=start, **kwargs)
    raise UserError(f"unknown model '{name}': use (DiT|SiT)-(T|S|B|L|XL)/(1|2|4|8|16), e.g. SiT-XL/2, "
                    f"or JiT-(T|B|L|H)/(4|8|16|32), e.g. JiT-B/16")
