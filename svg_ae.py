"""
Train the SVG autoencoder (Shi et al. 2025, "Latent Diffusion Model without Variational Autoencoder"), the latent
space of `--space svg`. In data-flow order:

  1. a frozen DINOv3-S/16+ gives 384 feature channels on the 16x16 patch grid of a 256-px image;
  2. a small trained ViT, the residual encoder, adds 8 channels for what DINO drops (colour, fine detail), rescaled
     to the DINO features' scale: the latent is 392x16x16;
  3. a convolutional decoder (LDM's f16 decoder, built with diffusers) maps the latent back to the image;
  4. losses: L1 + LPIPS(VGG16) + a PatchGAN hinge discriminator with LDM's adaptive weight;
  5. the training loop (one process or torchrun), resumable from last.pt.

  torchrun --nproc_per_node 8 svg_ae.py --data-path /imagenet/train --dino-weights dinov3_vits16plus.pth \\
      --lpips-vgg vgg16-397923af.pth --lpips-heads lpips_vgg_v0.1.pth
  python svg_ae.py          # no data: a CPU demo with tiny networks on the built-in synthetic images

The API for the diffusion scripts (train.py / sample.py):

  ae = load_autoencoder("results/svg-ae/last.pt", dino_weights=...)   # eval mode, frozen
  with torch.no_grad():
      z = ae.encode(images)   # (B, 3, 256, 256) in [-1, 1] -> (B, 392, 16, 16), not normalised
      x = ae.decode(z)        # (B, 392, 16, 16) -> (B, 3, 256, 256), roughly [-1, 1] (clamp before saving)

  SVG's DiT standardises the latent per channel with fixed statistics (its dinov3_sp_stats.pt) before diffusion and
  undoes it before decoding; that belongs to the diffusion side. Note that encode() rescales the residual channels
  with statistics of the whole batch it is given (SVG's match_distribution, also at inference), so encode in
  batches of a few dozen images, as SVG does, when caching latents.
"""
import json
import os
import pickle
import re
import signal
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from support.cli import (ArgumentParser, UserError, cli, init_processes, nonneg_float, nonneg_int, number, positive_float,
                         positive_int, probability)
from support.data import GlobalBatchSampler, ImageFolder, SyntheticImages
from support.frozen import Encoder
from support.runs import save_checkpoint

# -----------------------------------------------------------------------------
# Configuration. Defaults are SVG's (autoencoder/configs/example_svg_autoencoder_vitsp.yaml and the code it
# names): 256 px, DINOv3-S/16+, residual ViT 6x384 -> 8 channels with 10% masking, LDM f16 decoder,
# L1 + LPIPS + PatchGAN (weight 0.5), Adam 1e-4 betas (0.5, 0.9), 8 GPUs x 64 images, fp32, no EMA.

DINO3 = "vit_small_plus_patch16_dinov3"


BETA = number(float, 0, 1, high_open=True, what="in [0, 1)")


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    # data
    p.add_argument("--data-path", default=None, help="ImageFolder root (class sub-folders); none = the CPU demo")
    p.add_argument("--synthetic", type=positive_int, default=None,
                   help="images in the built-in synthetic set (the demo's data)")
    p.add_argument("--image-size", type=positive_int, default=256, help="training resolution (SVG: 256)")
    p.add_argument("--num-workers", type=nonneg_int, default=8, help="data loader processes per rank")
    # 1. frozen DINOv3
    p.add_argument("--dino", default=DINO3, help="timm name of the frozen encoder (SVG: DINOv3 ViT-S/16+)")
    p.add_argument("--dino-weights", default=None,
                   help="local DINOv3 weights (timm's or Meta's dinov3_vits16plus file; none = download from the hub); "
                        "'random' or 'tiny' (a 2-block random ViT): demo and tests only")
    p.add_argument("--patch-size", type=positive_int, default=16, help="pixels per latent position (the DINO patch)")
    # 2. residual encoder
    p.add_argument("--res-depth", type=positive_int, default=6, help="residual ViT blocks")
    p.add_argument("--res-width", type=positive_int, default=384, help="residual ViT width")
    p.add_argument("--res-heads", type=positive_int, default=8, help="residual ViT attention heads")
    p.add_argument("--res-channels", type=positive_int, default=8,
                   help="residual channels appended to the DINO features")
    p.add_argument("--res-dropout", type=probability, default=0.1,
                   help="dropout and attention dropout of the residual ViT")
    p.add_argument("--mask-ratio", type=probability, default=0.1,
                   help="probability that a training image's residual channels are replaced by the learned mask token")
    # 3. decoder
    p.add_argument("--dec-channels", default="128,128,256,256,512",
                   help="decoder widths from the image up to the latent (LDM ch=128, ch_mult 1,1,2,2,4): "
                        "2^(n-1) must equal --patch-size")
    p.add_argument("--dec-layers", type=positive_int, default=2,
                   help="res blocks per decoder level (the up path has one more)")
    p.add_argument("--dec-groups", type=positive_int, default=32, help="GroupNorm groups in the decoder")
    # 4. losses
    p.add_argument("--lpips-vgg", default=None,
                   help="torchvision VGG16 ImageNet weights (vgg16-397923af.pth) for LPIPS")
    p.add_argument("--lpips-heads", default=None,
                   help="LPIPS v0.1 VGG linear heads (lpips' weights/v0.1/vgg.pth, = taming's vgg.pth); "
                        "without both files the loss is L1 (+GAN)")
    p.add_argument("--perceptual-weight", type=nonneg_float, default=1.0, help="weight of LPIPS")
    p.add_argument("--disc-start", type=nonneg_int, default=2501,
                   help="first step with the GAN terms. SVG's config says 5001, counted in Lightning steps, of which "
                        "each batch makes two (one per optimizer): its GAN starts at batch 2501")
    p.add_argument("--disc-weight", type=nonneg_float, default=0.5, help="scale of LDM's adaptive GAN weight")
    p.add_argument("--disc-channels", type=positive_int, default=64, help="PatchGAN base width")
    p.add_argument("--disc-layers", type=positive_int, default=3, help="PatchGAN strided layers")
    # optimisation
    p.add_argument("--global-batch-size", type=positive_int, default=512,
                   help="images per step over all ranks (SVG: 8 x 64)")
    p.add_argument("--lr", type=positive_float, default=1e-4,
                   help="Adam learning rate of both networks (SVG: not batch-scaled)")
    p.add_argument("--beta1", type=BETA, default=0.5, help="Adam beta1")
    p.add_argument("--beta2", type=BETA, default=0.9, help="Adam beta2")
    p.add_argument("--max-steps", type=positive_int, default=2_500_000,
                   help="SVG's config trains 1000 epochs (about 2.5M steps on ImageNet at batch 512)")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="seeds the weights, the data order and every random draw")
    # bookkeeping
    p.add_argument("--results-dir", default="results", help="parent folder of the run folder")
    p.add_argument("--run-name", default="svg-ae", help="run folder name")
    p.add_argument("--resume", action="store_true", help="continue from <run>/last.pt")
    p.add_argument("--log-every", type=positive_int, default=100, help="log the mean losses every N steps")
    p.add_argument("--ckpt-every", type=positive_int, default=5000, help="overwrite last.pt every N steps")
    p.add_argument("--picture-every", type=nonneg_int, default=5000,
                   help="write recon_<step>.png every N steps (0: never)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="SVG trains in fp32; bf16 autocast on GPU")
    if p.parse_known_args(argv)[0].data_path is None:  # no data: the demo's defaults; flags given still win
        p.set_defaults(**DEMO)
    args = p.parse_args(argv)
    widths = [int(c) for c in args.dec_channels.split(",")]
    if 2 ** (len(widths) - 1) != args.patch_size:
        raise UserError(f"--dec-channels has {len(widths)} levels, which upsample {2 ** (len(widths) - 1)}x, but "
                          f"--patch-size is {args.patch_size}: give log2(patch)+1 widths")
    if args.image_size % args.patch_size:
        raise UserError(f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    if (args.lpips_vgg is None) != (args.lpips_heads is None):
        raise UserError("LPIPS needs both --lpips-vgg and --lpips-heads (or neither, for L1 + GAN only)")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.global_batch_size % world:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by the {world} ranks")
    return args


# The demo: 32-px synthetic images, patch 4 (an 8x8 latent grid), networks a few hundred times smaller than SVG's.
# The GAN stays off (disc_start = max_steps): at this scale its adaptive weight (in the thousands) costs more L1
# than 300 steps win back; --disc-start 150 shows it join. About 2.5 minutes of one CPU core.
DEMO = dict(synthetic=2000, image_size=32, patch_size=4, dino_weights="tiny", res_depth=2, res_width=64, res_heads=2,
            dec_channels="32,64,64", dec_layers=1, dec_groups=16, disc_channels=16, disc_layers=2, disc_start=300,
            global_batch_size=16, lr=4e-4, max_steps=300, num_workers=0, log_every=50, ckpt_every=150,
            picture_every=150, run_name="svg-ae-demo")
TINY_DINO = dict(depth=2, embed_dim=64, num_heads=2)


# -----------------------------------------------------------------------------
# 1. The frozen DINOv3 encoder: patch tokens after the final norm, at the input resolution (no resize: DINOv3's
# RoPE takes any grid), ImageNet mean/std, as SVG's dino_decoder.py feeds it.

def make_dino(name, weights, image_size, patch_size):
    """support.frozen.Encoder around timm's DINOv3. timm converts Meta's checkpoint format when loading a local file."""
    if weights not in (None, "random", "tiny") and not os.path.isfile(weights):
        raise UserError(f"DINOv3 weights {weights} not found; pass --dino-weights PATH to a local file of {name}")
    arch = dict(TINY_DINO) if weights == "tiny" else {}
    if patch_size != 16:
        arch["patch_size"] = patch_size
    try:
        return Encoder(name, "random" if weights in ("random", "tiny") else weights, image_size, **arch)
    except UserError:
        raise UserError(f"could not load the DINOv3 weights for {name}; pass --dino-weights PATH to a local file "
                          f"(or --dino-weights tiny, for the demo only)") from None


# -----------------------------------------------------------------------------
# 2. The residual encoder and SVG's statistics matching

class ResidualEncoder(nn.Module):
    """torchvision's ViT (so SVG's `extra_vit.*` weights load as `vit.*`): patch embedding, class token, learned
    positions, pre-norm blocks with dropout, final LayerNorm; the class token is dropped and an MLP head maps each
    patch token to `channels` values. Input: the ImageNet-normalised image, as DINO gets it.
    The learned mask token replaces a whole image's residual output (SVG's 10% masking): the decoder must then
    rebuild that image from DINO features alone, which keeps it from ignoring them."""

    def __init__(self, image_size=256, patch=16, depth=6, width=384, heads=8, channels=8, dropout=0.1):
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer
        self.vit = VisionTransformer(image_size, patch, depth, heads, width, 4 * width, dropout=dropout,
                                     attention_dropout=dropout)
        self.vit.heads = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, channels))
        self.mask_token = nn.Parameter(torch.randn(channels) * 0.02)

    def forward(self, x, mask=None):
        """x (B, 3, H, W) normalised; mask (B,) bool or None. Returns (B, channels, H/patch, W/patch)."""
        v = self.vit
        h = v.conv_proj(x)
        B, _, gh, gw = h.shape
        h = torch.cat([v.class_token.expand(B, -1, -1), h.flatten(2).transpose(1, 2)], dim=1)
        r = v.heads(v.encoder(h)[:, 1:])  # (B, L, channels)
        if mask is not None:
            r = torch.where(mask.view(B, 1, 1), self.mask_token.to(r.dtype).expand_as(r), r)
        return r.transpose(1, 2).reshape(B, -1, gh, gw)


def match_distribution(x, target, eps=1e-6):
    """SVG's rescaling of the residual channels x (B, C, h, w) to the scale of the DINO features target (B, D, h, w).
    Each side is summarised by two scalars over the whole batch: the mean over channels of the per-channel means,
    and the mean over channels of the per-channel standard deviations (over batch and positions). Both are
    detached, so the map is affine for the gradient. The residual channels keep their relative scales; only their
    average mean and average std become DINO's."""
    def stats(t):
        t = t.detach().float().transpose(0, 1).flatten(1)  # (channels, batch x positions)
        return t.mean(1).mean(), t.std(1).mean()
    m_x, s_x = stats(x)
    m_t, s_t = stats(target)
    return (x.float() - m_x) / (s_x + eps) * s_t + m_t


# -----------------------------------------------------------------------------
# 3. The decoder: LDM's convolutional decoder (taming's naming in SVG), built from diffusers' equal Decoder

def make_decoder(latent_channels, widths=(128, 128, 256, 256, 512), layers=2, groups=32):
    """Latent (B, latent_channels, h, w) -> image (B, 3, h*2^(n-1), w*2^(n-1)). Attention sits in the middle block
    and in every block of the first up level, at the latent's resolution (LDM's attn_resolutions=[16] at 256 px)."""
    from diffusers.models.autoencoders.vae import Decoder
    up = ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (len(widths) - 1)
    return Decoder(in_channels=latent_channels, out_channels=3, up_block_types=up, block_out_channels=tuple(widths),
                   layers_per_block=layers, norm_num_groups=groups, act_fn="silu")


LDM_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
DIFFUSERS_ATTN = {v: k for k, v in LDM_ATTN.items()}


def ldm_to_diffusers(sd, levels):
    """SVG/LDM decoder state_dict (taming names: mid.block_1, up.<level>.block/attn/upsample, nin_shortcut, 1x1-conv
    attention) -> diffusers' Decoder. LDM counts up levels from the image side, diffusers in the order they run."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^mid\.block_([12])\.", lambda m: f"mid_block.resnets.{int(m[1]) - 1}.", k)
        k = re.sub(r"^mid\.attn_1\.", "mid_block.attentions.0.", k)
        k = re.sub(r"^up\.(\d+)\.(block|attn|upsample)\.", lambda m: f"up_blocks.{levels - 1 - int(m[1])}."
                   f"{dict(block='resnets', attn='attentions', upsample='upsamplers.0')[m[2]]}.", k)
        k = re.sub(r"^norm_out\.", "conv_norm_out.", k).replace(".nin_shortcut.", ".conv_shortcut.")
        if ".attentions." in k:
            k = re.sub(r"\.(norm|q|k|v|proj_out)\.", lambda m: f".{LDM_ATTN[m[1]]}.", k)
            v = v[:, :, 0, 0] if v.dim() == 4 else v  # 1x1 convolution -> linear
        out[k] = v
    return out


def diffusers_to_ldm(sd, levels):
    """The inverse of ldm_to_diffusers."""
    out = {}
    for k, v in sd.items():
        if ".attentions." in k:
            k = re.sub(r"\.(group_norm|to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{DIFFUSERS_ATTN[m[1]]}.", k)
            v = v[:, :, None, None] if v.dim() == 2 else v
        k = re.sub(r"^mid_block\.resnets\.([01])\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        k = re.sub(r"^mid_block\.attentions\.0\.", "mid.attn_1.", k)
        k = re.sub(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers\.0)\.", lambda m: f"up.{levels - 1 - int(m[1])}."
                   f"{dict(resnets='block', attentions='attn')[m[2]] if m[2] != 'upsamplers.0' else 'upsample'}.", k)
        k = re.sub(r"^conv_norm_out\.", "norm_out.", k).replace(".conv_shortcut.", ".nin_shortcut.")
        out[k] = v
    return out


class SVGAutoencoder(nn.Module):
    """The frozen DINO, the residual encoder and the decoder; encode/decode are the API of the module docstring."""

    def __init__(self, dino, residual, decoder):
        super().__init__()
        self.dino, self.residual, self.decoder = dino, residual, decoder
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def encode(self, images, mask=None):
        """images (B, 3, H, W) in [-1, 1]; mask (B,) bool: images whose residual is the mask token (training).
        Returns the latent (B, D_dino + C_res, H/p, W/p): DINO channels first, then the rescaled residual."""
        feats = self.dino(images)  # (B, L, D), no gradient
        B, L, D = feats.shape
        feats = feats.transpose(1, 2).reshape(B, D, *self.dino.grid)
        res = self.residual(((images.float() + 1) / 2 - self.mean) / self.std, mask)
        return torch.cat([feats.float(), match_distribution(res, feats)], dim=1)

    def decode(self, z):
        return self.decoder(z)

    def forward(self, images, mask=None):
        return self.decode(self.encode(images, mask))


def build_autoencoder(cfg):
    """The networks of a run's config (a dict of this script's flags), with fresh weights."""
    dino = make_dino(cfg["dino"], cfg["dino_weights"], cfg["image_size"], cfg["patch_size"])
    residual = ResidualEncoder(cfg["image_size"], cfg["patch_size"], cfg["res_depth"], cfg["res_width"],
                               cfg["res_heads"], cfg["res_channels"], cfg["res_dropout"])
    widths = [int(c) for c in cfg["dec_channels"].split(",")]
    decoder = make_decoder(dino.dim + cfg["res_channels"], widths, cfg["dec_layers"], cfg["dec_groups"])
    return SVGAutoencoder(dino, residual, decoder)


def load_autoencoder(path, dino_weights=None, device="cpu"):
    """A trained autoencoder from this script's last.pt, frozen and in eval mode. dino_weights overrides the path
    recorded in the run (a random demo DINO is rebuilt from the run's seed)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot load the SVG autoencoder {path} ({type(e).__name__}); train one with svg_ae.py") from None
    if not isinstance(ckpt, dict) or not {"config", "residual", "decoder"} <= ckpt.keys():
        raise UserError(f"{path} is not an SVG autoencoder (svg_ae.py's last.pt: config, residual, decoder)")
    cfg = dict(ckpt["config"], dino_weights=dino_weights or ckpt["config"]["dino_weights"])
    torch.manual_seed(cfg["seed"])  # the random demo DINO is a function of the seed, as in training
    ae = build_autoencoder(cfg)
    ae.residual.load_state_dict(ckpt["residual"])
    ae.decoder.load_state_dict(ckpt["decoder"])
    return ae.to(device).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# SVG's latent as the diffusion scripts see it (train.py, sample.py, prepare.py --space svg)

class SVGLatents(nn.Module):
    """SVG's latent space as the DiT sees it: the SVG autoencoder's latent (svg_ae.py: DINOv3 channels + residual
    channels) standardised per channel, z = (latent - mean) / std, with SVG's statistics file or statistics fitted
    on the data; decode() undoes it before the decoder, as SVG's sampler does.
    SVG's encoder rescales the residual channels with statistics of the batch it is given (match_distribution, also
    at inference), so a latent depends on its batch: encode() always encodes fixed chunks of `chunk` images in the
    order given (SVG's per-GPU batch, 256 / 8), which keeps latents reproducible (the cache, 1 or N ranks when
    the per-rank batch is a multiple of 32)."""
    chunk = 32

    def __init__(self, ae, mean, std):
        super().__init__()
        self.ae = ae
        self.register_buffer("mean", mean.float().reshape(-1))
        self.register_buffer("std", std.float().reshape(-1))

    @torch.no_grad()
    def raw(self, images):
        """images (B, 3, H, W) in [-1, 1] -> the autoencoder's latent (B, C, h, w), not standardised."""
        return torch.cat([self.ae.encode(c) for c in images.split(self.chunk)])

    def normalize(self, z):
        return (z.float() - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def encode(self, images):
        return self.normalize(self.raw(images))

    def latent(self, images, eps=None):
        """What training diffuses (train.py's interface of an autoencoder): the standardised latent, encoded
        in fp32 as SVG does; eps is unused (the latent is deterministic)."""
        with torch.autocast(images.device.type, enabled=False):
            return self.encode(images.float())

    def cached_latent(self, raw, eps=None):
        """What training diffuses for a latent stored by prepare.py --space svg: standardised."""
        return self.normalize(raw)

    @torch.no_grad()
    def decode(self, z):
        return self.ae.decode(z.float() * self.std.view(1, -1, 1, 1) + self.mean.view(1, -1, 1, 1))


def read_svg_stats(path, channels):
    """SVG's statistics file (dinov3_sp_stats.pt: dinov3_sp_mean and dinov3_sp_std, each 1x1xC) -> (mean, std) of
    the first `channels` channels, as SVG slices them."""
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
        mean, std = stats["dinov3_sp_mean"].float().reshape(-1), stats["dinov3_sp_std"].float().reshape(-1)
    except Exception as e:
        raise UserError(f"cannot read {path} as SVG's statistics file (dinov3_sp_mean, dinov3_sp_std): "
                        f"{type(e).__name__}") from None
    if len(mean) < channels or len(std) < channels:
        raise UserError(f"{path} has statistics of {len(mean)} channels; the SVG latent has {channels}")
    return mean[:channels], std[:channels]



def make_svg_latents(args, device):
    """SVG space: the frozen autoencoder with SVG's statistics (--svg-stats), or unit ones until fit_svg_stats or
    the checkpoint sets them."""
    if not os.path.isfile(args.svg_ae):
        raise UserError(f"--svg-ae {args.svg_ae} not found; train the SVG autoencoder with svg_ae.py "
                          f"(`python svg_ae.py` makes the demo's results/svg-ae-demo/last.pt)")
    ae = load_autoencoder(args.svg_ae, args.svg_dino_weights)
    dino = args.svg_dino_weights or torch.load(args.svg_ae, mmap=True, weights_only=True)["config"]["dino_weights"]
    if dino in ("random", "tiny"):
        print(f"NOTE: the SVG autoencoder's DINO has RANDOM weights ({dino}); fine for the demo, meaningless otherwise")
    if ae.dino.img_size != args.image_size:
        raise UserError(f"the SVG autoencoder {args.svg_ae} was trained at {ae.dino.img_size} px, this run is at "
                          f"{args.image_size} px (--image-size)")
    C = ae.decoder.conv_in.in_channels
    mean, std = read_svg_stats(args.svg_stats, C) if args.svg_stats else (torch.zeros(C), torch.ones(C))
    return SVGLatents(ae, mean, std).to(device)


@torch.no_grad()
def fit_svg_stats(latents, data, args, device, rank):
    """Per-channel mean and std of the raw SVG latent over the positions of --stats-images images (a fixed seeded
    subset in a fixed order, so fixed encoding chunks: the same on every rank; rank 0's are broadcast anyway)."""
    n = min(args.stats_images, len(data))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
    total, sq, count = 0, 0, 0
    for i in range(0, n, 256):
        items = [data[j][0] for j in idx[i:i + 256]]
        if isinstance(items[0], dict):  # the SVG latent cache
            z = torch.stack([x["latent"] for x in items]).to(device).double()
        else:
            z = latents.raw(torch.stack(items).to(device).float() / 127.5 - 1).double()
        total, sq, count = total + z.sum((0, 2, 3)), sq + z.pow(2).sum((0, 2, 3)), count + z[:, 0].numel()
    mean = total / count
    latents.mean.copy_(mean)
    latents.std.copy_((sq / count - mean ** 2).clamp_min(1e-12).sqrt())
    if rank == 0:
        print(f"fitted the SVG latent statistics on {n} images: mean std over channels "
              f"{latents.std.mean().item():.3g}")


# -----------------------------------------------------------------------------
# 4. Losses: LPIPS, the PatchGAN discriminator, LDM's adaptive weight

class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018), VGG16 variant, as LDM and SVG use it: the image is shifted and scaled per channel,
    the VGG16 activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 are unit-normalised over channels,
    their squared differences weighted by a learned 1x1 head, averaged over positions and summed over the five layers.
    Implemented here over torchvision's VGG16 (already a dependency) so the two weight files are plain local files:
    no `lpips` package and no download."""
    TAPS = (4, 9, 16, 23, 30)  # ends of the five slices of vgg16.features (after each of those ReLUs)
    WIDTHS = (64, 128, 256, 512, 512)

    def __init__(self, vgg_path, heads_path):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers
        self.vgg = make_layers(cfgs["D"])[:self.TAPS[-1]]
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.WIDTHS)
        vgg, heads = self._load(vgg_path, "--lpips-vgg"), self._load(heads_path, "--lpips-heads")
        try:
            self.vgg.load_state_dict({k[len("features."):]: v for k, v in vgg.items()
                                      if k.startswith("features.") and int(k.split(".")[1]) < self.TAPS[-1]})
            for i, h in enumerate(self.heads):
                h.weight.data.copy_(heads[f"lin{i}.model.1.weight"])
        except (RuntimeError, KeyError) as e:
            raise UserError(f"the LPIPS weight files do not fit VGG16 and the LPIPS v0.1 heads ({e}); --lpips-vgg "
                              f"takes torchvision's vgg16 ImageNet weights, --lpips-heads lpips' v0.1/vgg.pth") from None
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @staticmethod
    def _load(path, flag):
        if not os.path.isfile(path):
            raise UserError(f"LPIPS weights {path} not found; pass {flag} PATH to a local file")
        return torch.load(path, map_location="cpu", weights_only=True)

    def train(self, mode=True):  # frozen: stays in eval mode
        return super().train(False)

    def forward(self, x, y):
        """x, y (B, 3, H, W) in [-1, 1] -> (B,) perceptual distances."""
        h = (torch.cat([x, y]) - self.shift) / self.scale
        dist_, start = 0, 0
        for head, end in zip(self.heads, self.TAPS):
            h = self.vgg[start:end](h)
            start = end
            f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fx, fy = f.chunk(2)
            dist_ = dist_ + head((fx - fy).pow(2)).mean((1, 2, 3))
        return dist_


class PatchGAN(nn.Module):
    """pix2pix's N-layer PatchGAN as taming builds it (BatchNorm, LeakyReLU 0.2, 4x4 kernels; one logit per
    overlapping patch), with taming's initialisation; the `main.N` keys load taming/SVG discriminator weights.
    Unconditional, as in SVG (disc_conditional is False)."""

    def __init__(self, channels=64, layers=3):
        super().__init__()
        seq, mult = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)], 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(channels * prev, channels * mult, 4, 2 if n < layers else 1, 1, bias=False),
                    nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        self.main = nn.Sequential(*seq, nn.Conv2d(channels * mult, 1, 4, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def adaptive_weight(nll, g_loss, last_layer, scale):
    """LDM's balance of the GAN term: the ratio of the two losses' gradient norms at the decoder's last layer, so the
    adversarial gradient never dwarfs the reconstruction gradient (clamped to [0, 1e4], then scaled)."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach() * scale


def reconstruction_loss(x, x_rec, lpips, perceptual_weight):
    """LDM's convention, kept because the adaptive weight's clamp and epsilon see its scale: the per-pixel loss
    |x - x_rec| + w * LPIPS(image) is summed over pixels and averaged over images. (SVG's loss also divides by
    exp(logvar), but its logvar is not in any optimizer and stays 0, so it is left out.)"""
    per_pixel = (x - x_rec).abs()
    if lpips is not None:
        per_pixel = per_pixel + perceptual_weight * lpips(x, x_rec).view(-1, 1, 1, 1)
    return per_pixel.sum() / x.shape[0]


# -----------------------------------------------------------------------------
# 5. Training

def mask_flags(seed, step, positions, ratio, device):
    """Which images of this step have their residual masked: a draw per image from a generator seeded by
    (seed, step, global position), so 1 or N ranks and a resumed run mask the same images."""
    u = [torch.rand(1, generator=torch.Generator().manual_seed(hash((seed, step, p)) & (2 ** 63 - 1)))
         for p in positions]
    return (torch.cat(u) < ratio).to(device)


def average_gradients(params, world):
    """All-reduce the gradients by hand in one flat buffer. Not DDP: LDM's adaptive weight calls
    torch.autograd.grad, which DDP does not support. A parameter without a gradient this step (the mask token when
    no image is masked) gets zeros, so every rank steps the same parameters."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world > 1:
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        flat /= world
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))


def recon_picture(path, x, x_rec):
    """Originals (top row) above their reconstructions (bottom row), as uint8 PNG."""
    to_u8 = lambda t: (127.5 * t + 128).clamp(0, 255).to(torch.uint8)
    rows = [torch.cat(list(to_u8(t.float().cpu())), dim=2) for t in (x, x_rec)]
    Image.fromarray(torch.cat(rows, dim=1).permute(1, 2, 0).numpy()).save(path)


ARCH_KEYS = ("dino", "dino_weights", "image_size", "patch_size", "res_depth", "res_width", "res_heads", "res_channels",
             "dec_channels", "dec_layers", "dec_groups", "disc_channels", "disc_layers", "seed")


def build_training(args, device, last, master):
    """The autoencoder, the discriminator, LPIPS (None without its weights), the two Adams and the first step:
    the same initial weights on every rank, or a resumed run's."""
    if master and args.dino_weights in ("random", "tiny"):
        print(f"NOTE: DINO has RANDOM weights ({args.dino_weights}); fine for the demo, meaningless otherwise")
    if master and not args.lpips_vgg:
        print("NOTE: no LPIPS weights (--lpips-vgg, --lpips-heads): the loss is L1 + GAN only, not SVG's")
    torch.manual_seed(args.seed)
    ae = build_autoencoder(vars(args)).to(device)
    disc = PatchGAN(args.disc_channels, args.disc_layers).to(device)
    lpips = LPIPS(args.lpips_vgg, args.lpips_heads).to(device) if args.lpips_vgg else None
    ae_params = list(ae.residual.parameters()) + list(ae.decoder.parameters())
    opt_ae = torch.optim.Adam(ae_params, lr=args.lr, betas=(args.beta1, args.beta2))
    opt_disc = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    if not args.resume:
        return ae, disc, lpips, opt_ae, opt_disc, 0
    if not os.path.exists(last):
        raise UserError(f"--resume: no checkpoint at {last}")
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    diff = {k: (ckpt["config"].get(k), getattr(args, k)) for k in ARCH_KEYS if ckpt["config"].get(k) != getattr(args, k)}
    if diff:
        raise UserError(f"cannot resume {last}: it was trained with other settings (checkpoint, now): {diff}")
    ae.residual.load_state_dict(ckpt["residual"])
    ae.decoder.load_state_dict(ckpt["decoder"])
    disc.load_state_dict(ckpt["disc"])
    opt_ae.load_state_dict(ckpt["opt_ae"])
    opt_disc.load_state_dict(ckpt["opt_disc"])
    return ae, disc, lpips, opt_ae, opt_disc, ckpt["step"]


def write_log(acc, n_acc, t0, step, args, world, device, log_path, master):
    """The window's mean of each logged term, over the ranks: a line of log.jsonl and of the console."""
    keys = sorted(acc)
    stats = torch.stack([torch.as_tensor(acc[k][0] / acc[k][1], dtype=torch.float32, device=device) for k in keys])
    if world > 1:
        dist.all_reduce(stats)
        stats /= world
    rec = {"step": step, **dict(zip(keys, stats.tolist())), "img_per_s": n_acc * args.global_batch_size / (time.time() - t0)}
    if master:
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(" ".join(f"{k} {v:.4g}" for k, v in rec.items()), flush=True)


def discriminator_step(disc, opt_disc, x, x_rec, autocast, world):
    """One hinge-loss step of the PatchGAN on real x and reconstructed x_rec; returns the detached loss."""
    with autocast:
        d_loss = hinge_d_loss(disc(x).float(), disc(x_rec).float())
    opt_disc.zero_grad(set_to_none=True)
    d_loss.backward()
    average_gradients(list(disc.parameters()), world)
    opt_disc.step()
    return d_loss.detach()


def main(args):
    ddp, rank, world, device = init_processes()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and args.precision == "bf16")
    master = rank == 0
    run_dir = os.path.join(args.results_dir, args.run_name)
    last = os.path.join(run_dir, "last.pt")
    if master:
        os.makedirs(run_dir, exist_ok=True)
    if os.path.exists(last) and not args.resume:
        raise UserError(f"{last} exists: pass --resume to continue it, or choose another --run-name")

    # --- data (the project's ADM centre crop, no flips; SVG's loader takes a random 256 crop of the short side)
    data = ImageFolder(args.data_path, args.image_size) if args.data_path else \
        SyntheticImages(args.synthetic, args.image_size, seed=args.seed)

    ae, disc, lpips, opt_ae, opt_disc, step = build_training(args, device, last, master)
    ae_params = list(ae.residual.parameters()) + list(ae.decoder.parameters())
    if master:
        count = lambda m: sum(p.numel() for p in m.parameters())
        print(f"SVG autoencoder: DINO {count(ae.dino) / 1e6:.2f}M (frozen), residual {count(ae.residual) / 1e6:.2f}M, "
              f"decoder {count(ae.decoder) / 1e6:.2f}M, discriminator {count(disc) / 1e6:.2f}M; {len(data)} images, "
              f"{world} rank(s), global batch {args.global_batch_size}, starting at step {step}")

    # --- the loop
    sampler = GlobalBatchSampler(len(data), args.global_batch_size, rank, world, args.seed, start_step=step)
    indices = ([i for i, _flip in batch] for batch in sampler)  # SVG does not flip
    loader = torch.utils.data.DataLoader(data, batch_sampler=indices, num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda")
    fixed = torch.stack([data[i * len(data) // 8][0] for i in range(8)]).to(device).float() / 127.5 - 1
    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
    b = args.global_batch_size // world
    positions = range(rank * b, (rank + 1) * b)
    log_path = os.path.join(run_dir, "log.jsonl")
    last_layer = ae.decoder.conv_out.weight
    acc, n_acc, t0 = {}, 0, time.time()
    ae.train()
    for x, _ in loader:
        if step >= args.max_steps:
            break
        # Dropout draws from the global generator: reseeding it per (seed, step, rank) makes resume exact.
        torch.manual_seed(hash((args.seed, step, rank)) & (2 ** 63 - 1))
        x = x.to(device).float() / 127.5 - 1
        mask = mask_flags(args.seed, step, positions, args.mask_ratio, device)
        gan = step >= args.disc_start

        # autoencoder step
        with autocast:
            x_rec = ae(x, mask).float()
            nll = reconstruction_loss(x, x_rec, lpips, args.perceptual_weight)
            logs = {"l1": (x - x_rec).abs().mean().detach(), "nll": nll.detach()}
            loss = nll
            if gan:
                g_loss = -disc(x_rec).float().mean()
                d_weight = adaptive_weight(nll, g_loss, last_layer, args.disc_weight)
                loss = nll + d_weight * g_loss
                logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
        if not torch.isfinite(loss):
            raise UserError(f"non-finite loss at step {step}; stopping without saving (last good: {last})")
        opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(ae_params, world)
        opt_ae.step()

        if gan:  # the discriminator, on the reconstructions made before the autoencoder's update (as SVG)
            logs["d_loss"] = discriminator_step(disc, opt_disc, x, x_rec.detach(), autocast, world)
        step += 1
        for k, v in logs.items():
            s, c = acc.get(k, (0.0, 0))
            acc[k] = (s + v, c + 1)
        n_acc += 1

        if step % args.log_every == 0 or step == args.max_steps:
            write_log(acc, n_acc, t0, step, args, world, device, log_path, master)
            acc, n_acc, t0 = {}, 0, time.time()

        if master and args.picture_every and (step % args.picture_every == 0 or step == args.max_steps):
            ae.eval()
            with torch.no_grad(), autocast:
                recon_picture(os.path.join(run_dir, f"recon_{step:07d}.png"), fixed, ae(fixed))
            ae.train()

        if ddp:  # every rank stops at the same step, whichever got the signal
            flag = torch.tensor(float(stop["signal"] is not None), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop["signal"] = stop["signal"] or (signal.SIGTERM if flag.item() else None)
        if master and (step % args.ckpt_every == 0 or step == args.max_steps or stop["signal"] is not None):
            save_checkpoint(last, dict(residual=ae.residual.state_dict(), decoder=ae.decoder.state_dict(),
                                       disc=disc.state_dict(), opt_ae=opt_ae.state_dict(),
                                       opt_disc=opt_disc.state_dict(), step=step, config=vars(args)))
        if stop["signal"] is not None:
            if master:
                print(f"received signal {stop['signal']}: saved {last} at step {step}, exiting")
            break
    if ddp:
        dist.destroy_process_group()
    return ae, disc


if __name__ == "__main__":
    cli(lambda: main(get_args()))
