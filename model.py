"""
The networks of joint image-feature diffusion, in data-flow order:

1. the frozen parts: the VAE (latent space) and the DINOv2 encoder that gives the semantic features z0;
2. the feature projection z0 -> z~ (ReDi's frozen PCA, or CoReDi's learned P with batch norm), its
   regularizers and the collapse diagnostics;
3. the transformers that denoise image tokens and feature tokens together: DiT/SiT (latent space) and JiT
   (pixel space), with REPA's projector.

Time convention everywhere (SiT's interpolant): x_t = t*x + (1-t)*eps, t=0 is noise, t=1 is data.
"""
import argparse
import hashlib
import json
import math
import os
import pickle
import re
import socket
import sys
import types
import textwrap
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
    """The scripts' --help: the module docstring as written, and every flag's default after its help. A default of
    None (the help text says what happens) or False (a switch that is off) is not shown: it would say nothing."""

    def _get_help_string(self, action):
        hidden = action.default is None or action.default is False  # `in (None, False)` would hide a default of 0
        return action.help if hidden else super()._get_help_string(action)

    def _split_lines(self, text, width):  # never break "--data-path" or "SiT-XL/2" at a hyphen
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


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


def init_processes():
    """torchrun's environment -> (ddp, rank, world, device): one process per GPU with NCCL, or gloo on CPU; a plain
    `python script.py` is rank 0 of 1. The GPU is made current, so that NCCL and new tensors use it."""
    ddp = "RANK" in os.environ
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    return ddp, rank, world, device


def broadcast_from_rank0(tensors):
    """Every rank ends with rank 0's values of these tensors (a fit done on every rank, made identical)."""
    for t in tensors:
        dist.broadcast(t, 0)


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
    weights: a hub name (downloaded once; None = stabilityai/sd-vae-ft-ema), a local diffusers folder, or 'random'
    (tests only). sd-vae-ft-ema and sd-vae-ft-mse share the original encoder; only their decoders were fine-tuned."""
    scale = 0.18215

    def __init__(self, weights=None):
        super().__init__()
        from diffusers.models import AutoencoderKL
        if weights == "random":
            self.vae = AutoencoderKL(**SD_VAE_CONFIG)
        else:
            if not os.path.isdir(weights or ""):  # a hub name: offline, fail at once unless it is cached
                require_hub(weights or "stabilityai/sd-vae-ft-ema", ["config.json"], "--vae-weights")
            try:
                self.vae = AutoencoderKL.from_pretrained(weights or "stabilityai/sd-vae-ft-ema")
            except Exception as e:
                raise UserError(f"could not load the SD-VAE {weights or 'stabilityai/sd-vae-ft-ema'} "
                                f"({type(e).__name__}); download it once and pass --vae-weights PATH to that folder") from None
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


DINO = "vit_base_patch14_reg4_dinov2.lvd142m"  # DINOv2-B/14 with registers (ReDi)
DINO_NOREG = "vit_base_patch14_dinov2.lvd142m"  # without registers (REPA)


class Encoder(nn.Module):
    """Frozen timm ViT (DINOv2-B/14 with registers by default). Takes images in [-1,1] of any size, resizes
    them bicubically to img_size and normalises them as the encoder was trained; returns the patch tokens
    after the final norm, (B, L, D), on the grid self.grid.
    weights: None = download, a path = local file, 'random' = random init (the demo and tests only).
    arch: timm overrides of the architecture (the demo's tiny encoder: depth=2, embed_dim=64, ...). A .safetensors
    file may record its own overrides in its metadata (key 'timm_arch', JSON), as the toy encoder trained by
    convergence.py does, so that it loads through --enc-weights like real DINOv2 weights."""

    def __init__(self, name=DINO, weights=None, img_size=224, **arch):
        super().__init__()
        import timm
        if weights not in (None, "random") and not os.path.isfile(weights):
            raise UserError(f"encoder weights {weights} not found; pass --enc-weights PATH to a local file of {name}")
        if weights is None:
            hub_cfg = timm.models.get_pretrained_cfg(name)
            require_hub(hub_cfg and hub_cfg.hf_hub_id, ["model.safetensors", "pytorch_model.bin"], "--enc-weights")
        if weights not in (None, "random") and weights.endswith(".safetensors"):
            from safetensors import safe_open
            try:
                with safe_open(weights, "pt") as f:  # reads the header only
                    arch = {**json.loads((f.metadata() or {}).get("timm_arch", "{}")), **arch}
            except Exception as e:
                raise UserError(f"cannot read encoder weights {weights} ({type(e).__name__})") from None
        kwargs = dict(img_size=img_size, num_classes=0, **arch)
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

    @torch.no_grad()
    def load_redi_pca(self, pca):
        """Take ReDi's statistics and PCA (read_redi_pca), so that z~ = ((z0 - mean)/std - pca.mean_) @ components_[:d].T
        exactly as ReDi's training code computes it."""
        D, d = self.P.shape
        if pca["components"].shape[1] != D or pca["components"].shape[0] < d or pca["mean"].shape != (D,):
            raise UserError(f"the PCA file has {pca['components'].shape[0]} components of {pca['components'].shape[1]} "
                            f"channels; this run needs at least {d} of the encoder's {D} (--feat-dim, --enc)")
        self.enc_mean.copy_(pca["mean"])
        self.enc_std.copy_(pca["std"])
        self.pca_mean.copy_(pca["pca_mean"])
        self.pca_var.copy_(pca["explained_variance"][:d])
        self.P.copy_(pca["components"][:d].T)
        if self.vf_map is not None:
            self.vf_map.weight.copy_(self.P)

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


# ReDi's PCA file (its pcs/dino_pca_model.pth) is a torch.save'd dict {'pca_model': a pickled scikit-learn PCA,
# 'mean', 'std': numpy arrays}. Reading it must need neither scikit-learn nor trust: the unpickler below builds
# numpy arrays and a plain stand-in for the PCA (its fields only, no code) and refuses every other global.

class _PCAFields:
    """Takes the place of sklearn.decomposition.PCA while unpickling: keeps its fields, runs nothing."""

    def __setstate__(self, state):
        self.__dict__.update(state)


class _RestrictedUnpickler(pickle.Unpickler):
    SAFE = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        module = module.replace("numpy.core.", "numpy._core.")  # files pickled by numpy 1 name its old path
        if (module, name) == ("sklearn.decomposition._pca", "PCA"):
            return _PCAFields
        if (module, name) in self.SAFE:
            return super().find_class(module, name)
        raise UserError(f"refusing to unpickle {module}.{name}: a ReDi PCA file holds only numpy arrays and a "
                        f"scikit-learn PCA")


def read_redi_pca(path):
    """ReDi's PCA file -> dict of float64 tensors: mean, std (per encoder channel), pca_mean, components (rows),
    explained_variance."""
    restricted = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, __name__="restricted_pickle",
                                       load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load())
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except Exception as e:
        raise UserError(f"cannot read {path} as ReDi's PCA file ({type(e).__name__}: {str(e)[:80]})") from None
    pca = obj.get("pca_model") if isinstance(obj, dict) else None
    if not isinstance(pca, _PCAFields) or not all(hasattr(pca, k) for k in ("components_", "mean_")) or \
            not {"mean", "std"} <= obj.keys():
        raise UserError(f"{path} is not ReDi's PCA file: expected a dict with 'pca_model' (a fitted PCA), 'mean', 'std'")
    f64 = lambda a: torch.as_tensor(a).double()
    return dict(mean=f64(obj["mean"]), std=f64(obj["std"]), pca_mean=f64(pca.mean_), components=f64(pca.components_),
                explained_variance=f64(getattr(pca, "explained_variance_", torch.zeros(len(pca.components_)))))


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


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, in float32 at least, as JiT does (also under bf16 autocast)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        return F.rms_norm(wide, (x.shape[-1],), self.weight.to(wide.dtype), self.eps).to(x.dtype)


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


def repa_projector(hidden, projector_dim, repa_dim):
    """REPA: per-token MLP from the hidden state to the encoder's feature space."""
    return nn.Sequential(nn.Linear(hidden, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, repa_dim))


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


def unwrap_state_dict(sd):
    """The network's state_dict inside a training checkpoint: DiT/SiT/REPA/ReDi keep the EMA under 'ema'; JiT under
    'model_ema1' (decay 0.9999, the one it samples with) with keys prefixed 'net.'. Wrapper prefixes of DDP and
    torch.compile are stripped."""
    for wrapper in ("ema", "model_ema1"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
            break
    return {k.removeprefix("module.").removeprefix("_orig_mod.").removeprefix("net."): v for k, v in sd.items()}


def load_dit_state_dict(model, sd):
    """Load a DiT/SiT or JiT state_dict strictly. Released SiT/DiT checkpoints were trained with learn_sigma=True:
    their final layer predicts 2C channels per pixel, laid out (p, q, 2C) per token; we keep the first C (the mean)."""
    sd = unwrap_state_dict(sd)
    own = model.state_dict()
    w, b = sd.get("final_layer.linear.weight"), sd.get("final_layer.linear.bias")
    if w is not None and b is not None and w.shape[0] == 2 * own["final_layer.linear.weight"].shape[0]:
        p, C = model.patch_size, model.out_channels
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


# Released weights of the reference codes. They carry no config: the format is recognised by its keys and the
# architecture read off the shapes, then the state_dict is mapped to ours and loaded strictly:
#   SiT   (willisma/SiT, SiT-XL-2-256x256.pt): our keys; learn_sigma's doubled final layer -> first half.
#   ReDi  (zelaki/ReDi, SiT-ReDi-XL-2): SiT keys with 4 + d input channels (VAE latent, then d PCA channels on the
#         latent grid) -> our DiT with channel fusion, feat_dim d.
#   REPA  (sihyun-yu/REPA, SiT-XL/2 last.pt): SiT keys plus 'projectors.0.*' -> 'projector.*'. REPA's time runs the
#         other way (x_t = (1-t) x + t eps, t=1 noise) and its network predicts eps - x; both are undone exactly in the
#         weights by from_repa, so the loaded model is an ordinary one in our convention.
#   JiT   (LTH14/JiT): our keys (pixel space, x-prediction).
#   SVG   (shiml20/SVG, train_svg.py's {"ema": ...}): SiT keys on 16x16 tokens of the 392-channel SVG latent, with
#         qk-norm, learn_sigma's doubled final layer (first half kept) and the input Linear 'ln1' instead of a patch
#         embedding: a patch-1 convolution is the same map (from_svg). Its time runs as ours (t=0 noise), t unscaled.
REPA_ENCODER_DEPTH = 8  # REPA's default --encoder-depth, that of its released SiT-XL/2


def from_repa(sd):
    """REPA's SiT (network f, fed REPA's s = 1 - t, predicting eps - x) -> ours (fed t, predicting x - eps).
    The sinusoidal embedding of 1 - t is a fixed rotation of that of t: cos((1-t)w) = cos w cos tw + sin w sin tw and
    sin((1-t)w) = sin w cos tw - cos w sin tw, so the first timestep layer absorbs it; the sign of the output is
    absorbed by the final linear layer. The result equals -f(x, 1 - t) up to float rounding."""
    sd = {k.replace("projectors.0.", "projector."): v for k, v in sd.items()}
    W = sd["t_embedder.mlp.0.weight"]
    half = W.shape[1] // 2
    w = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    cos, sin = torch.diag(torch.cos(w)), torch.diag(torch.sin(w))
    R = torch.cat([torch.cat([cos, sin], 1), torch.cat([sin, -cos], 1)], 0)  # emb(1 - t) = R @ emb(t)
    sd["t_embedder.mlp.0.weight"] = (W.double() @ R).to(W.dtype)
    sd["final_layer.linear.weight"] = -sd["final_layer.linear.weight"]
    sd["final_layer.linear.bias"] = -sd["final_layer.linear.bias"]
    return sd


def from_svg(sd):
    """SVG's DiT -> ours: its input Linear on tokens, ln1 (hidden, C), is our patch-1 PatchEmbed (hidden, C, 1, 1);
    every other key is already ours."""
    sd = dict(sd)
    sd["x_embedder.proj.weight"] = sd.pop("ln1.weight")[:, :, None, None]
    sd["x_embedder.proj.bias"] = sd.pop("ln1.bias")
    return sd


def load_released(sd, repa_depth=REPA_ENCODER_DEPTH, num_heads=None):
    """A released SiT, ReDi, REPA, JiT or SVG state_dict (bare or wrapped) -> (model in eval mode, config dict with mode,
    space, model name, prediction, image_size, arch). Anything else is refused in one line. The architecture is read
    off the shapes; the number of heads (which no shape shows) comes from the named size, or num_heads."""
    sd = unwrap_state_dict(sd)
    expected = ("expected the released weights of SiT, ReDi, REPA, JiT or SVG (a SiT/DiT-style state_dict with "
                "x_embedder or ln1, pos_embed, blocks.N, final_layer), or a train.py checkpoint")
    if not all(k in sd for k in ("pos_embed", "y_embedder.embedding_table.weight", "t_embedder.mlp.0.weight")):
        raise UserError(f"unrecognised checkpoint format: {expected}")
    svg = "ln1.weight" in sd
    if svg:
        sd = from_svg(sd)
    tokens, hidden = sd["pos_embed"].shape[-2:]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    jit = "in_context_posemb" in sd
    embed = sd["x_embedder.proj1.weight" if jit else "x_embedder.proj.weight"]
    patch, channels = embed.shape[-1], embed.shape[1]
    sizes = JIT_SIZES if jit else SIZES
    size = next((k for k, v in sizes.items() if v[:2] == (depth, hidden)), None)
    if size is None and (jit or num_heads is None):
        raise UserError(f"a {'JiT' if jit else 'SiT/DiT'} of depth {depth} and width {hidden} is none of the sizes "
                        f"{list(sizes)}; {expected}")
    arch = dict(input_size=math.isqrt(tokens) * patch, in_channels=channels,
                num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1)
    if "blocks.0.attn.q_norm.weight" in sd and not jit:
        arch["qk_norm"] = True
    mode = "sit"
    if "projectors.0.0.weight" in sd:
        sd, mode = from_repa(sd), "repa"
        arch.update(repa_depth=repa_depth, repa_dim=sd["projector.4.weight"].shape[0],
                    projector_dim=sd["projector.0.weight"].shape[0])
    elif not jit and not svg and channels > 4:
        mode = "redi"
        arch.update(in_channels=4, feat_dim=channels - 4, fusion="channels")
    elif not jit and not svg and channels != 4:
        raise UserError(f"a SiT/DiT with {channels} input channels is neither SiT's (4) nor ReDi's (4 + d); {expected}")
    if size is not None:
        name = f"{'JiT' if jit else 'SiT'}-{size}/{patch}"
        model = create_model(name, **arch)
    else:  # an unnamed size (the tests' tiny reference models)
        name = None
        model = DiT(patch_size=patch, hidden_size=hidden, depth=depth, num_heads=num_heads, **arch)
    load_dit_state_dict(model, sd)
    space = "pixel" if jit else "svg" if svg else "latent"
    cfg = dict(mode=mode, space=space, model=name, prediction="x" if jit else "v", arch=arch, step=None,
               image_size=arch["input_size"] * {"pixel": 1, "latent": 8, "svg": 16}[space], vae_weights=None,
               feat_drop=None)
    return model.eval().requires_grad_(False), cfg
