"""Shapes for model.py: its constructor arguments and inputs, refused in one line naming the problem, and
the resizing of a token grid (the encoder's to the DiT's)."""
import torch.nn.functional as F

from support.cli import UserError


def check_arch(input_size, patch_size, depth, repa_depth, head_dim, block, fusion, in_context):
    """A DiT's constructor arguments, refused in one line when they cannot build a network."""
    if input_size % patch_size:
        raise UserError(f"image size {input_size} is not divisible by the patch size {patch_size}")
    if repa_depth > depth:
        raise UserError(f"REPA depth {repa_depth} is deeper than the model ({depth} blocks)")
    if block == "jit" and fusion == "channels":
        raise UserError("JiT fuses the features per token; channel fusion is for latent DiTs")
    if block == "jit" and head_dim % 4:
        raise UserError(f"2-D RoPE needs a head size divisible by 4, not {head_dim}")
    if in_context and not 0 <= in_context < depth:
        raise UserError(f"in-context tokens start at block {in_context}, outside the {depth} blocks")


def check_inputs(model, x, z):
    image = (model.in_channels, model.input_size, model.input_size)
    if tuple(x.shape[1:]) != image:
        raise UserError(f"the model takes images of shape {image}, got {tuple(x.shape[1:])}")
    if (z is not None) != bool(model.feat_dim):
        raise UserError(f"feature input z must be given exactly when the model has a feature stream "
                        f"(feat_dim={model.feat_dim})")
    if z is not None and tuple(z.shape) != (x.shape[0], *model.z_shape):
        raise UserError(f"the model takes features of shape {(x.shape[0], *model.z_shape)} "
                        f"({model.fusion} fusion), got {tuple(z.shape)}; features_in makes it")


def resize_tokens(z, src, dst):
    """Tokens (B, L, C) on grid src=(h, w) -> grid dst (e.g. DINOv2's 16x16 to the demo's 8x8)."""
    if z.shape[1] != src[0] * src[1]:
        raise UserError(f"{z.shape[1]} feature tokens do not form the encoder grid {src}")
    if tuple(src) == tuple(dst):
        return z
    if src[0] * dst[1] != src[1] * dst[0]:
        raise UserError(f"the encoder grid {src} cannot be resized to the token grid {dst}: their "
                        f"aspect ratios differ; choose --enc-size or the image size to match them")
    B, _, C = z.shape
    z = z.transpose(1, 2).reshape(B, C, *src)
    z = F.interpolate(z.float(), size=tuple(dst), mode="bilinear", antialias=True).to(z.dtype)
    return z.flatten(2).transpose(1, 2)
