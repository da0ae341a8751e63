"""Counter-based random numbers for sampling: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
1, 2, 3", SC 2011; the generator behind cuRAND's and JAX's), written with int64 tensor ops so that it runs on the
sampling device in a few hundred elementwise kernels, whatever the batch size.

A draw is a pure function of its key (the seed) and its counter (position, sample index, draw number, stream), so a
sample's label and noise never depend on the batch it is drawn in, the rank that draws it, or the device. The 32-bit
words are the same on every device (integer arithmetic is exact). The normals are made from them in float64 and
rounded to float32, so two devices agree unless their float64 log/cos/sin straddle a float32 rounding boundary: about
one value in 10^8 may then differ in its last bit."""

import math

import torch

MASK = 0xFFFFFFFF
M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32's round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # its key schedule (the golden ratio and sqrt(3) - 1, as 32-bit fractions)


def mulhilo(a, m):
    """The high and low 32 bits of a * m, for uint32 values a (an int64 tensor) and a 32-bit constant m. m is split
    in 16-bit halves so that no product passes 2**48: an int64 cannot hold the full 64-bit product."""
    low_part, high_part = a * (m & 0xFFFF), a * (m >> 16)  # a * m = high_part * 2**16 + low_part
    return (high_part + (low_part >> 16)) >> 16, (((high_part & 0xFFFF) << 16) + low_part) & MASK


def philox(counter, key, rounds=10):
    """Philox4x32: four uint32 counter tensors (int64, broadcastable) and two uint32 key ints -> four uint32
    tensors of random bits."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
        h0, l0 = mulhilo(c0, M0)
        h1, l1 = mulhilo(c2, M1)
        c0, c1, c2, c3 = h1 ^ c1 ^ k0, l1, h0 ^ c3 ^ k1, l0
    return c0, c1, c2, c3


def words(seed, index, draw, stream, n):
    """(len(index), n) random uint32 words (int64): for each sample index i (an int64 tensor on the device, below
    2**32), its n words of this draw and stream, from the counters (position, i, draw, stream) under the key seed.
    The constants are made on the device (torch.full), so that no host copy waits for the device."""
    const = lambda v: torch.full((1, 1), v & MASK, dtype=torch.int64, device=index.device)  # noqa: E731
    position = torch.arange((n + 3) // 4, device=index.device)[None, :]
    out = philox((position, index[:, None], const(draw), const(stream)), (seed & MASK, (seed >> 32) & MASK))
    return torch.stack(torch.broadcast_tensors(*out), -1).flatten(1)[:, :n]


def normal(seed, index, draw, shape, stream=0):
    """(len(index), *shape) float32 standard normals by Box-Muller, two per pair of words."""
    n = math.prod(shape)
    w = words(seed, index, draw, stream, n + n % 2).double()
    radius = torch.sqrt(-2 * torch.log((w[:, 0::2] + 0.5) / 2 ** 32))  # (w + 0.5) / 2**32 > 0: a finite log
    angle = (2 * math.pi / 2 ** 32) * w[:, 1::2]
    z = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], -1).flatten(1)[:, :n]
    return z.float().reshape(len(z), *shape)


def randint(seed, index, draw, high):
    """(len(index),) integers in [0, high), one word each scaled by multiplication (Lemire's method; its bias,
    high / 2**32, is below 3e-7 for 1,000 classes)."""
    if not 0 < high <= 2 ** 31:
        raise ValueError("high must lie in [1, 2**31]")
    return (words(seed, index, draw, 0, 1)[:, 0] * high) >> 32
