"""The frozen networks: the SD-VAE (diffusers' AutoencoderKL) and the DINOv2 encoder (timm), with the offline checks
of their weights, and the PCA fit of the feature projection on the encoder's tokens."""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.cli import UserError, check_file, reason, require_hub
from support.data import item_image


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
            folder = "a diffusers AutoencoderKL folder (config.json and diffusion_pytorch_model.safetensors)"
            if os.path.isdir(weights or ""):
                held = os.listdir(weights)
                missing = [f for f, ok in (("config.json", "config.json" in held), ("diffusion_pytorch_model.safetensors",
                           any(f.startswith("diffusion_pytorch_model.") for f in held))) if not ok]
                if missing:
                    raise UserError(f"--vae-weights {weights} is a folder without {' and '.join(missing)}: pass "
                                    f"{folder}, e.g. one saved by save_pretrained")
            elif weights and os.path.exists(weights):
                raise UserError(f"--vae-weights {weights} is a file; pass {folder} or a hub name")
            else:  # a hub name: offline, fail at once unless it is cached
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
        can draw a fresh posterior sample every step. Always in float32, also under bf16 autocast, as SiT and
        REPA encode (it is done once per image in a cache)."""
        with torch.autocast(x.device.type, enabled=False):
            return self.vae.encode(x.float()).latent_dist.parameters

    def latent(self, images, eps=None):
        """What training diffuses for images in [-1, 1]: a scaled posterior sample (eps: its noise)."""
        return self.sample(self.moments(images), eps)

    def cached_latent(self, moments, eps=None):
        """What training diffuses for moments stored by prepare.py: a fresh posterior sample."""
        return self.sample(moments, eps)

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


VAE_EMA, VAE_MSE = "stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse"  # 1 encoder, 2 decoders
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
        if weights not in (None, "random"):
            check_file(weights, f"pass --enc-weights PATH to a local weights file of {name}", "--enc-weights")
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
            if weights not in (None, "random"):  # a file was given: say what is wrong with it
                raise UserError(f"--enc-weights {weights} holds no weights of {name} ({reason(e, 60)}); pass timm's "
                                f"model.safetensors or Meta's .pth of that encoder") from None
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



def make_encoder(args):
    """The frozen encoder. A random one (the demo's 'tiny', or 'random') is seeded, so that every rank, a resumed
    run and ablation.py's evaluation get the same network."""
    torch.manual_seed(args.seed)
    tiny = dict(depth=2, embed_dim=64, num_heads=2) if args.enc_weights == "tiny" else {}
    return Encoder(args.enc, "random" if tiny else args.enc_weights, args.enc_size, **tiny)



@torch.no_grad()
def fit_projection(proj, data, encoder, args, device, rank):
    """Fit the standardization and PCA on the encoder tokens of --pca-images images (a fixed seeded subset,
    the same on every rank; rank 0's result is broadcast anyway)."""
    n = min(args.pca_images, len(data))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
    tokens = []
    for i in range(0, n, 64):
        imgs = torch.stack([item_image(data[j]) for j in idx[i:i + 64]]).to(device)
        tokens.append(encoder(imgs.float() / 127.5 - 1).float().reshape(-1, encoder.dim).cpu())
    proj.cpu().fit(torch.cat(tokens), init=args.proj_init, generator=torch.Generator().manual_seed(args.seed))
    proj.to(device)
    if rank == 0:
        print(f"fitted the projection on {n} images: PCA variance of the first {args.feat_dim} components "
              f"{[round(v, 2) for v in proj.pca_var.tolist()]}")
