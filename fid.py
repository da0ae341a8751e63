"""
FID, sFID, Inception Score, precision and recall as the ADM evaluation suite computes them
(guided-diffusion `evaluations/evaluator.py`, which runs the 2015-12-05 TF Inception graph),
re-implemented in PyTorch, same numbers.

    python fid.py --ref VIRTUAL_imagenet256_labeled.npz --sample samples.npz  # or a folder of PNGs
    net = load_inception(); metrics = evaluate(uint8_nhwc, 'ref.npz', net, device='cuda')  # Python

ADM's conventions, each pinned by tests/test_fid.py against golden fixtures: uint8 NHWC images are
cast to float32 in [0, 255], resized to 299 with TF1's bilinear rule and normalised with
(x - 128) / 128; FID uses pool3 (2048-d), sFID the first 7 channels of `mixed_6/conv`
(= Mixed_6d.branch1x1) flattened to 17*17*7 = 2023, IS the softmax of pool3 @ fc.weight.T (no bias),
precision/recall pool3 with k = 3; means are float32, covariances float64 (np.cov). With fewer
images than dimensions + 1 (2049 for pool3) a covariance is singular: we warn, as FID is then
biased upward (and scipy may fail). ADM's protocol is 50,000 samples.
"""
import contextlib
import functools
import hashlib
import json
import os
import sys
import warnings
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

from support.cli import ArgumentParser, UserError, check_device, check_file, cli, online, positive_int
from support.images import open_rgb

WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               'pt_inception-2015-12-05-6726825d.pth')
WEIGHTS_SHA256 = '6726825d'  # prefix of the file's sha256, as torch.hub checks it
# --inception-weights random-smoke-test: the real architecture, seeded random weights, so the whole
# evaluation runs offline in a smoke test; whatever reports its numbers calls them meaningless.
SMOKE_TEST = 'random-smoke-test'
SMOKE_WARNING = 'SMOKE TEST: random Inception weights, these numbers are meaningless'

# -----------------------------------------------------------------------------
# The FID Inception network: torchvision's Inception3 layout (so the standard weights load by name)
# with the TF graph's pooling, which is what ADM's numbers were computed with.

class Conv(nn.Module):
    """conv (no bias) -> batch norm -> ReLU: the unit every layer of the network is made of."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def avg_pool(x):
    # TF's avg pool divides by the *valid* inputs at the border (torchvision's counts the padding)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # Mixed_5b/5c/5d at 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1 = Conv(cin, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], 1)


class BlockB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):  # Mixed_6b..6e at 17x17, 7x7 convs factorised into 1x7 and 7x1
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
                          self.branch_pool(avg_pool(x))], 1)


class BlockD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = Conv(cin, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)),
                          self.branch7x7x3_4(b7),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):  # Mixed_7b/7c at 8x8, each 3x3 split into parallel 1x3 and 3x1
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # the 2015 TF graph max-pools in the last block's pool branch (a known quirk FID inherited)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
                          self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    """state_dict of pt_inception-2015-12-05-6726825d.pth: 566 keys, 1008 classes, no aux head."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, stride=2), Conv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = Conv(32, 64, 3, padding=1), Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c = BlockA(192, pool_features=32), BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, c7=128), BlockC(768, c7=160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, c7=160), BlockC(768, c7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        """x: float32 (N, 3, 299, 299) already normalised to [-1, 1] (see `preprocess`).
        Returns pool3 (N, 2048), the sFID feature (N, 2023) and the bias-free logits (N, 1008)."""
        # channels_last: ~1.4x faster than NCHW on CPU (oneDNN); preprocess returns this layout
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d):
            x = block(x)
        # Mixed_6d's output begins with branch1x1 (TF `mixed_6/conv`): ADM keeps channels 0..6, HWC
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool3 = F.adaptive_avg_pool2d(x, 1).flatten(1)
        # ADM's IS reads `softmax/logits/MatMul`, i.e. the logits before the fc bias is added
        return pool3, spatial, pool3 @ self.fc.weight.T


def one_line(e):
    return f'{type(e).__name__}: {" ".join(str(e).split())}'


def sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def random_inception(seed=0):
    """The FID Inception with seeded random weights: He-scaled convolutions and identity batch
    norms, so the activations neither vanish nor explode through the network. Smoke tests only."""
    net, g = InceptionV3(), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() == 4:
                p.copy_(torch.randn(p.shape, generator=g) * (2 / p[0].numel()) ** 0.5)
            elif name == 'fc.weight':
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    return net


def load_inception(weights=None, device='cpu'):
    """The FID Inception with the standard weights: downloaded (cached by torch.hub) if `weights` is
    None, else the file at that path. Anything else (other keys, other bytes) raises: its metrics
    would not be ADM's. The one exception is weights=SMOKE_TEST: random weights, meaningless
    metrics, labelled so wherever they are reported."""
    if weights == SMOKE_TEST:
        return random_inception().to(device, memory_format=torch.channels_last).eval()
    get = f'download {WEIGHTS_URL}'
    if weights is None:
        url = urlparse(WEIGHTS_URL)
        cached = Path(torch.hub.get_dir()) / 'checkpoints' / Path(url.path).name
        if not cached.is_file() and not online(url.hostname):  # fail now, not after retries
            raise UserError(f'no network to fetch the FID Inception weights; {get} elsewhere '
                            f'and pass --inception-weights PATH')
        try:
            state = torch.hub.load_state_dict_from_url(
                WEIGHTS_URL, map_location='cpu', check_hash=True, weights_only=True)
        except Exception as e:  # offline, proxy, truncated download, hash mismatch
            raise UserError(f'could not fetch the FID Inception weights ({one_line(e)}); {get} '
                            f'and pass --inception-weights PATH') from None
    else:
        try:
            state = torch.load(weights, map_location='cpu', weights_only=True)
        except Exception as e:
            raise UserError(f'--inception-weights {weights}: cannot read it as a state_dict '
                            f'({one_line(e)})') from None
    net = InceptionV3()
    # num_batches_tracked counts BN training steps only: files may lack it (load_state_dict adds it)
    shapes = lambda sd: {k: v.shape for k, v in sd.items()
                         if torch.is_tensor(v) and 'num_batches' not in k}
    want, got = shapes(net.state_dict()), shapes(state) if isinstance(state, dict) else {}
    if got != want:
        bad = sorted(k for k in want.keys() | got.keys() if got.get(k) != want.get(k))
        raise UserError(f'{weights or WEIGHTS_URL}: not the FID Inception state_dict '
                        f'(pt_inception-2015-12-05): {len(bad)} tensors missing, unexpected or '
                        f'misshapen, e.g. {bad[:2]}')
    if weights is not None and not sha256(weights).startswith(WEIGHTS_SHA256):
        raise UserError(f'--inception-weights {weights}: sha256 does not start with '
                        f'{WEIGHTS_SHA256}, so these are not the standard FID weights; {get}')
    net.load_state_dict(state, strict=False)  # strict in effect: every trained tensor checked above
    return net.to(device, memory_format=torch.channels_last).eval()


# -----------------------------------------------------------------------------
# The TF graph's input path: uint8 NHWC -> float32 [0, 255] -> TF1 bilinear 299 -> (x - 128) / 128

@functools.lru_cache
def tf1_taps(n, size, device):
    """Source taps of TF1's legacy bilinear resize (align_corners=False, no half-pixel centres) from
    n to size. Every step is float32 as in TF's kernel: scale = n / size, s_i = i * scale,
    lo = floor(s_i), frac = s_i - lo."""
    scale = np.float32(n) / np.float32(size)
    src = np.arange(size, dtype=np.float32) * scale
    lo = np.floor(src)
    frac = torch.from_numpy(src - lo).to(device)
    lo = torch.from_numpy(lo.astype(np.int64)).to(device)
    return lo, (lo + 1).clamp(max=n - 1), frac


def tf1_resize(x, size=299):
    """Bilinear resize of NHWC images (uint8 or float32; float32 out) exactly as TF1, and so ADM's
    graph, does it: along x first, then y, each as a + (b - a) * frac in float32. torch's
    F.interpolate samples at half-pixel centres instead and differs by up to ~30 (of 255)."""
    # gather before the cast, update in place: same values, half the CPU time of a plain expression
    lo, hi, frac = tf1_taps(x.shape[2], size, x.device)
    a = x[:, :, lo].float()
    x = x[:, :, hi].float().sub_(a).mul_(frac[:, None]).add_(a)
    lo, hi, frac = tf1_taps(x.shape[1], size, x.device)
    a = x[:, lo]
    return x[:, hi].sub_(a).mul_(frac[:, None, None]).add_(a)


def preprocess(images):
    """uint8 NHWC images -> the network's float32 NCHW 299x299 input in [-1, 1]. No /255: TF's graph
    resizes values in [0, 255] and then normalises with (x - 128) / 128. The result is an NCHW view
    of NHWC memory, i.e. already in the channels_last layout the network runs in."""
    return tf1_resize(images).sub_(128).div_(128).permute(0, 3, 1, 2)


# -----------------------------------------------------------------------------
# Images in: an in-memory array, an ADM .npz, or a folder of PNGs, streamed in batches

def check_images(shape, dtype, what):
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise UserError(f'{what}: expected uint8 images of shape (N, H, W, 3) (NHWC RGB, as in ADM '
                        f'.npz files), got {dtype} {tuple(shape)}')


def open_npz(path):
    """The arr_0 member of an ADM .npz, positioned after its header, and the array's shape. np.load
    would read all arr_0 at once (50,000 images at 512 px are 39 GB); this reads it in batches."""
    check_file(path, 'pass an ADM .npz batch')
    if Path(path).suffix != '.npz' or not zipfile.is_zipfile(path):
        raise UserError(f'{path}: not an .npz file (or a truncated one); expected an ADM batch '
                        f'written by np.savez(path, arr_0=images)')
    with zipfile.ZipFile(path) as zf:  # the member stays readable after the archive is closed
        if 'arr_0.npy' not in zf.namelist():
            raise UserError(f'{path}: holds no arr_0; ADM batches store their uint8 NHWC images '
                            f'as arr_0')
        size = zf.getinfo('arr_0.npy').file_size
        f = zf.open('arr_0.npy')
    fmt, version = np.lib.format, np.lib.format.read_magic(f)
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran_order, dtype = read_header(f)
    check_images(shape, dtype, f'{path} arr_0')
    if fortran_order:
        raise UserError(f'{path}: arr_0 is in Fortran order; save it C-ordered (np.ascontiguousarray)')
    if size < f.tell() + int(np.prod(shape)):  # a cut write, found before hours of Inception
        raise UserError(f'{path}: arr_0 is truncated (its header says {shape[0]} images, the file '
                        f'holds fewer bytes); write the file again')
    return f, shape


def image_batches(images, batch_size):
    """(count, iterator of uint8 NHWC numpy batches). Checks the input now; reads files lazily."""
    if not isinstance(images, (str, os.PathLike)):
        images = np.asarray(images)
        check_images(images.shape, images.dtype, 'samples')
        return len(images), (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    path = Path(images)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == '.png')
        if not files:
            raise UserError(f'{path}: no .png files in this folder')
        sizes = {}
        for p in files:  # all of them, whatever --batch-size (the headers only)
            with Image.open(p) as img:
                sizes.setdefault(img.size, p.name)
        if len(sizes) > 1:
            raise UserError(f'{path}: PNGs of different sizes ({", ".join(list(sizes.values())[:3])})'
                            f'; use one size')

        def read_pngs():
            for i in range(0, len(files), batch_size):
                yield np.stack([np.asarray(open_rgb(p)) for p in files[i:i + batch_size]])
        return len(files), read_pngs()
    f, (n, h, w, c) = open_npz(path)
    f.close()

    def read_npz():
        with open_npz(path)[0] as f:
            for i in range(0, n, batch_size):
                m = min(batch_size, n - i)
                yield np.frombuffer(f.read(m * h * w * c), np.uint8).reshape(m, h, w, c)
    return n, read_npz()


# -----------------------------------------------------------------------------
# Activations

@contextlib.contextmanager
def full_float32(device):
    """ADM's graph ran in true float32: no TF32 (PyTorch's default for cuDNN convolutions, ~1e-3
    relative error) and no autocast from a caller's bf16 context (train.py). Restores the caller's
    settings on exit."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(cudnn, 'conv'):  # torch >= 2.9, which refuses the legacy flags once this API is used
        flags = [(matmul, 'fp32_precision', 'ieee'), (cudnn.conv, 'fp32_precision', 'ieee')]
    else:
        flags = [(matmul, 'allow_tf32', False), (cudnn, 'allow_tf32', False)]
    saved = [getattr(obj, name) for obj, name, _ in flags]
    try:
        for obj, name, value in flags:
            setattr(obj, name, value)
        with torch.autocast(torch.device(device).type, enabled=False):
            yield
    finally:
        for (obj, name, _), value in zip(flags, saved):
            setattr(obj, name, value)


@torch.inference_mode()
def activations(images, net, batch_size=100, device='cpu'):
    """pool3 (N, 2048), spatial (N, 2023) and logits (N, 1008) of the images, float32 numpy."""
    n, batches = image_batches(images, batch_size)
    outs, i = None, 0
    with full_float32(device):
        desc = Path(images).name if isinstance(images, (str, os.PathLike)) else 'samples'
        for batch in tqdm(batches, total=-(-n // batch_size), unit='batch', desc=desc, leave=False):
            x = torch.from_numpy(np.array(batch)).to(device)  # a copy: .npz buffers are read-only
            feats = [t.cpu().numpy() for t in net(preprocess(x))]
            if outs is None:  # preallocate: 50,000 x (2048 + 2023 + 1008) float32 is 1 GB
                outs = [np.empty((n, f.shape[1]), np.float32) for f in feats]
            for out, f in zip(outs, feats):
                out[i:i + len(f)] = f
            i += len(batch)
    return outs


# -----------------------------------------------------------------------------
# Statistics and metrics, with ADM's dtypes and branches

def statistics(acts):
    """ADM's FID statistics: float32 mean, float64 unbiased covariance."""
    n, d = acts.shape
    if n <= d:
        warnings.warn(f'{n} images for {d}-d features: the covariance is singular (needs at '
                      f'least {d + 1} images), so FID/sFID are biased upward and may fail; ADM '
                      f'uses 50,000 samples')
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^1/2), with ADM's fallbacks for
    singular products. ADM passes the samples' statistics first (sqrtm's rounding depends on it)."""
    diff = mu1 - mu2  # float32, as in ADM
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f'FID: singular product of covariances; adding {eps} to their diagonals')
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UserError(f'FID: the square root of the covariance product has an imaginary '
                            f'component {np.abs(covmean.imag).max():.3g}; too few images for a '
                            f'usable covariance?')
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=5000):
    """Mean over chunks of 5000 of exp(E_x KL(p(y|x) || p(y))), softmax in float32; no std (ADM
    reports none)."""
    logits = logits.astype(np.float32)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def sq_dists(a, b):
    """Squared distances in float32 by ADM's formula |a|^2 - 2 a.b + |b|^2, clamped at 0."""
    return ((a * a).sum(1, keepdim=True) - 2 * (a @ b.T) + (b * b).sum(1)).clamp_min(0)


def knn_radii(x, k, rows):
    # index k of each sorted distance row: index 0 is the point itself (ADM's ManifoldEstimator)
    return torch.cat([sq_dists(x[i:i + rows], x).topk(k + 1, dim=1, largest=False).values[:, k]
                      for i in range(0, len(x), rows)])


@torch.inference_mode()
def precision_recall(ref, sample, k=3, rows=1024, device='cpu'):
    """Improved precision/recall (Kynkaanniemi et al. 2019) as ADM computes it: a point is inside a
    set's manifold if it is within (<=) the k-NN radius of some point of that set. precision =
    samples inside the reference manifold, recall = references inside the sample manifold.
    Distances go `rows` rows at a time (50K x 50K never in memory)."""
    with full_float32(device):
        ref, sample = torch.from_numpy(ref).to(device), torch.from_numpy(sample).to(device)
        ref_r, sample_r = knn_radii(ref, k, rows), knn_radii(sample, k, rows)
        sample_in = torch.zeros(len(sample), dtype=torch.bool, device=device)
        ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
        for i in range(0, len(ref), rows):
            d = sq_dists(ref[i:i + rows], sample)
            ref_in[i:i + rows] = (d <= sample_r).any(dim=1)
            sample_in |= (d <= ref_r[i:i + rows, None]).any(dim=0)
    return sample_in.sum().item() / len(sample), ref_in.sum().item() / len(ref)


# -----------------------------------------------------------------------------
# Reference batch and evaluation

def check_stats(mu, sigma, dim, what):  # np.shape(None) == (): a missing array fails too
    if np.shape(mu) != (dim,) or np.shape(sigma) != (dim, dim):
        raise UserError(f'{what}: expected shapes ({dim},) and ({dim}, {dim}), '
                        f'got {np.shape(mu)} and {np.shape(sigma)}')
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f'{what}: statistics contain NaN or inf; recompute them, or delete them '
                        f'from the file to use its images')


def reference(ref, net, batch_size=100, device='cpu'):
    """pool3 activations of the reference images (for precision/recall) and the (mu, sigma) pairs
    for FID and sFID: the file's own `mu, sigma` / `mu_s, sigma_s` where present (as ADM does: its
    reference batches carry them), else those of arr_0. Cached next to the file as an .npz, keyed by
    the file's bytes and the network's weights."""
    image_batches(ref, batch_size)  # a clear error for a bad file before hashing it
    key = hashlib.sha256(sha256(ref).encode())
    for t in net.state_dict().values():
        key.update(t.cpu().numpy().tobytes())
    ref = Path(ref)
    cache = ref.with_name(f'{ref.stem}.inception-{key.hexdigest()[:16]}.npz')
    if cache.exists():
        try:  # our own file handle: np.load leaves its own open when the archive is damaged
            with open(cache, 'rb') as fh, np.load(fh, allow_pickle=False) as c:
                return c['pool3'], (c['mu'], c['sigma']), (c['mu_s'], c['sigma_s'])
        except Exception as e:  # our own file, cut short or damaged: recomputed and replaced below
            print(f'the cached reference activations {cache} are unreadable ({type(e).__name__}); '
                  f'recomputing them', file=sys.stderr)
    pool3, spatial, _ = activations(ref, net, batch_size, device)
    with np.load(ref, allow_pickle=False) as f:
        stats = (f['mu'], f.get('sigma')) if 'mu' in f else statistics(pool3)
        stats_s = (f['mu_s'], f.get('sigma_s')) if 'mu_s' in f else statistics(spatial)
    check_stats(*stats, pool3.shape[1], f'{ref} mu/sigma')
    check_stats(*stats_s, spatial.shape[1], f'{ref} mu_s/sigma_s')
    try:  # write-then-rename, so a concurrent reader never sees half a file
        tmp = cache.with_name(f'{cache.name}.{os.getpid()}.tmp')
        with open(tmp, 'wb') as f:
            np.savez(f, pool3=pool3, mu=stats[0], sigma=stats[1], mu_s=stats_s[0],
                     sigma_s=stats_s[1])
        os.replace(tmp, cache)
    except OSError as e:
        warnings.warn(f'could not cache the reference activations at {cache} ({one_line(e)})')
    return pool3, stats, stats_s


def evaluate(samples, ref, net, batch_size=100, device='cpu'):
    """The five ADM metrics of `samples` (uint8 NHWC array, ADM .npz path or folder of PNGs) against
    the reference batch `ref` (ADM .npz path), with `net` from load_inception."""
    for n, what in ((image_batches(samples, batch_size)[0], 'samples'),
                    (image_batches(ref, batch_size)[0], ref)):
        if n < 4:  # before any network time is spent
            raise UserError(f'{what}: {n} images; precision/recall need at least 4 (3rd nearest '
                            f'neighbour), and a full-rank FID covariance at least 2049')
    ref_pool3, ref_stats, ref_stats_s = reference(ref, net, batch_size, device)
    pool3, spatial, logits = activations(samples, net, batch_size, device)
    precision, recall = precision_recall(ref_pool3, pool3, device=device)
    return {'fid': frechet_distance(*statistics(pool3), *ref_stats),
            'sfid': frechet_distance(*statistics(spatial), *ref_stats_s),
            'inception_score': inception_score(logits), 'precision': precision, 'recall': recall}


# ----------------------------------------------------------------------------- the command line

def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument('--ref', required=True,
                   help='ADM reference batch .npz (arr_0 uint8 NHWC; optional mu, sigma, mu_s, '
                        'sigma_s); its activations are cached next to it')
    p.add_argument('--sample', required=True,
                   help='samples: ADM .npz with arr_0 uint8 NHWC, or a folder of PNGs')
    p.add_argument('--out', help='metrics JSON (default: <sample>.metrics.json beside the samples)')
    p.add_argument('--batch-size', type=positive_int, default=100, help='images per forward')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='where the Inception runs')
    p.add_argument('--inception-weights', metavar='PATH',
                   help=f'local copy of {WEIGHTS_URL} (its sha256 is checked); default: download '
                        f'it. {SMOKE_TEST}: seeded random weights of the same network, to test the '
                        f'pipeline offline (the numbers are meaningless, and every line that '
                        f'reports them says so)')
    return p.parse_args(argv)


def main(argv=None):
    cli(lambda: run(get_args(argv)))


def run(args):
    check_device(args.device)
    check_file(args.ref, 'the reference is an ADM .npz (arr_0, mu, sigma)', '--ref')
    sample = Path(args.sample)
    name = sample.stem if sample.is_file() else sample.name  # samples.npz and samples/ -> samples
    out = Path(args.out or sample.parent / f'{name}.metrics.json')
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):  # before hours of Inception
        raise UserError(f'--out {out}: {out.parent} is not a writable folder; pass another --out')
    net = load_inception(args.inception_weights, args.device)
    note = f'  ({SMOKE_WARNING})' if args.inception_weights == SMOKE_TEST else ''
    if note:
        print(SMOKE_WARNING)
    metrics = evaluate(args.sample, args.ref, net, args.batch_size, args.device)
    for name, value in metrics.items():
        print(f'{name:>16}: {round(value, 4) + 0.0:.4f}{note}')  # not -0.0000
    warning = {'warning': SMOKE_WARNING} if note else {}
    out.write_text(json.dumps(dict(metrics, **warning), indent=2) + '\n')
    print(f'wrote {out}{note}')


if __name__ == '__main__':
    main()
