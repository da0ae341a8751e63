"""Readers for the files of the reference codes: the released weights of SiT, ReDi, REPA, JiT and SVG (recognised by
their keys, mapped to our layout and convention, loaded strictly) and ReDi's PCA file (read without scikit-learn
and without unpickling code)."""
import math
import pickle
import types

import torch

from model import DiT, JIT_SIZES, SIZES, create_model
from support.cli import UserError, reason


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
        raise UserError(f"cannot read {path} as ReDi's PCA file ({reason(e)})") from None
    pca = obj.get("pca_model") if isinstance(obj, dict) else None
    if not isinstance(pca, _PCAFields) or not all(hasattr(pca, k) for k in ("components_", "mean_")) or \
            not {"mean", "std"} <= obj.keys():
        raise UserError(f"{path} is not ReDi's PCA file: expected a dict with 'pca_model' (a fitted PCA), 'mean', 'std'")
    f64 = lambda a: torch.as_tensor(a).double()
    return dict(mean=f64(obj["mean"]), std=f64(obj["std"]), pca_mean=f64(pca.mean_), components=f64(pca.components_),
                explained_variance=f64(getattr(pca, "explained_variance_", torch.zeros(len(pca.components_)))))



@torch.no_grad()
def load_redi_pca(proj, pca):
    """Put ReDi's statistics and PCA (read_redi_pca) into a FeatureProjection, so that
    z~ = ((z0 - mean)/std - pca.mean_) @ components_[:d].T exactly as ReDi's training code computes it."""
    D, d = proj.P.shape
    if pca["components"].shape[1] != D or pca["components"].shape[0] < d or pca["mean"].shape != (D,):
        raise UserError(f"the PCA file has {pca['components'].shape[0]} components of {pca['components'].shape[1]} "
                        f"channels; this run needs at least {d} of the encoder's {D} (--feat-dim, --enc)")
    proj.enc_mean.copy_(pca["mean"])
    proj.enc_std.copy_(pca["std"])
    proj.pca_mean.copy_(pca["pca_mean"])
    proj.pca_var.copy_(pca["explained_variance"][:d])
    proj.P.copy_(pca["components"][:d].T)
    if proj.vf_map is not None:
        proj.vf_map.weight.copy_(proj.P)


def unwrap_state_dict(sd):
    """The network's state_dict inside a training checkpoint: DiT/SiT/REPA/ReDi keep the EMA under 'ema'; JiT under
    'model_ema1' (decay 0.9999, the one it samples with) with keys prefixed 'net.'. Wrapper prefixes of DDP and
    torch.compile are stripped."""
    for wrapper in ("ema", "model_ema1"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
            break
    return {k.removeprefix("module.").removeprefix("_orig_mod.").removeprefix("net."): v for k, v in sd.items()}


def nonfinite(sd):
    """The keys of sd's floating-point tensors that hold a NaN or an infinity: the weights of a diverged run."""
    return [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not v.is_meta
            and not torch.isfinite(v).all()]


def load_dit_state_dict(model, sd):
    """Load a DiT/SiT or JiT state_dict strictly. Released SiT/DiT checkpoints were trained with learn_sigma=True:
    their final layer predicts 2C channels per pixel, laid out (p, q, 2C) per token; we keep the first C (the mean)."""
    sd = unwrap_state_dict(sd)
    bad = nonfinite(sd)
    if bad:  # a diverged run: its samples would be black, silently
        raise UserError(f"the checkpoint's weights are not finite ({', '.join(bad[:2])}{', ...' * (len(bad) > 2)}): "
                        f"its run diverged; use an earlier checkpoint (step_N.pt)")
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


def from_repa_legacy(sd, repa_depth):
    """REPA's legacy checkpoints split the blocks in two: blocks.0..k-1 before its projector (k = its
    --encoder-depth) and decoder_blocks.0.. after it, which are our blocks k, k+1, ..."""
    def key(k):
        if not k.startswith("decoder_blocks."):
            return k
        _, i, rest = k.split(".", 2)
        return f"blocks.{int(i) + repa_depth}.{rest}"
    return {key(k): v for k, v in sd.items()}


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
    if any(k.startswith("decoder_blocks.") for k in sd):  # REPA's legacy layout (its generate.py --legacy)
        sd = from_repa_legacy(sd, repa_depth)
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
               feat_drop=None,
               # SiT's (and DiT's) forward_with_cfg guides the first 3 of the 4 latent channels, the 4th stays
               # conditional: its published FIDs were sampled so (REPA and ReDi guide all image channels)
               cfg_channels=3 if mode == "sit" and space == "latent" else None)
    return model.eval().requires_grad_(False), cfg
