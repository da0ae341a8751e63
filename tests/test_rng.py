"""support.rng: the sampler's counter-based random numbers (Philox4x32-10)."""
import math
import random

import torch

from support import rng

# Random123's known-answer vectors for philox4x32 with 10 rounds (tests/kat_vectors of
# github.com/DEShawResearch/random123): counter[4], key[2] -> result[4].
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]


def test_philox_known_answers():
    for counter, key, want in KAT:
        got = rng.philox([torch.tensor([c]) for c in counter], key)
        assert [int(g) for g in got] == list(want)


def test_mulhilo_is_the_exact_64_bit_product():
    r = random.Random(0)
    a = [0, 1, 0xffffffff, 0x80000000] + [r.getrandbits(32) for _ in range(200)]
    for m in (rng.M0, rng.M1, 0xffffffff):
        hi, lo = rng.mulhilo(torch.tensor(a), m)
        assert hi.tolist() == [x * m >> 32 for x in a] and lo.tolist() == [x * m & 0xffffffff for x in a]


def test_words_are_philox_of_position_index_draw_stream():
    w = rng.words(2 ** 32 + 5, torch.tensor([3, 9]), 7, 1, 6)  # 6 words: two counters, the second cut
    for row, i in enumerate((3, 9)):
        for pos in range(2):
            want = rng.philox([torch.tensor([c]) for c in (pos, i, 7, 1)], (5, 1))
            assert w[row, 4 * pos:4 * pos + 4].tolist() == [int(x) for x in want][:6 - 4 * pos]


def test_normal_is_box_muller_of_the_words():
    w = rng.words(0, torch.tensor([2]), 1, 0, 6)[0].tolist()
    got = rng.normal(0, torch.tensor([2]), 1, (5,))  # odd: the sixth normal is dropped
    want = []
    for a, b in zip(w[0::2], w[1::2]):
        r, angle = math.sqrt(-2 * math.log((a + 0.5) / 2 ** 32)), 2 * math.pi * b / 2 ** 32
        want += [r * math.cos(angle), r * math.sin(angle)]
    assert got.shape == (1, 5) and torch.allclose(got[0].double(), torch.tensor(want[:5], dtype=torch.float64),
                                                  rtol=1e-6, atol=1e-7)


def test_normal_and_randint_distributions():
    z = rng.normal(3, torch.arange(100), 1, (2000,)).flatten().double()  # 200,000 normals
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    for q, p in ((-1.0, 0.158655), (0.0, 0.5), (1.96, 0.975002)):  # the normal CDF at a few points
        assert abs((z < q).double().mean() - p) < 0.004
    assert torch.isfinite(z).all()
    y = rng.randint(0, torch.arange(20000), 0, 10)
    counts = torch.bincount(y, minlength=10).double()
    assert y.min() >= 0 and y.max() <= 9
    assert ((counts - 2000) ** 2 / 2000).sum() < 27.9  # chi-square, 9 degrees of freedom, p = 0.001


def test_every_part_of_the_key_and_counter_matters():
    i = torch.arange(4)
    base = rng.normal(0, i, 1, (8,))
    for other in (rng.normal(2 ** 32, i, 1, (8,)), rng.normal(1, i, 1, (8,)), rng.normal(0, i, 2, (8,)),
                  rng.normal(0, i, 1, (8,), stream=1), rng.normal(0, i + 4, 1, (8,))):
        assert (other - base).abs().min() > 0
    assert torch.equal(rng.normal(0, i, 1, (8,)), base)
