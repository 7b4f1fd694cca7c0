"""Triton's tl.randint4x (Philox 4x32, 10 rounds) in plain torch int64 arithmetic, to rebuild the kernels'
dropout masks (kernels/dropout.py) for parity tests."""

import torch

M32 = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of const * x for x < 2^32, without overflowing int64."""
    lo_part = x * (const & 0xFFFF)
    hi_part = x * (const >> 16)
    high = (hi_part + (lo_part >> 16)) >> 16
    low = (((hi_part & 0xFFFF) << 16) + lo_part) & M32
    return high, low


def randint4x(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """tl.randint4x(seed, offsets) for int32 offsets: four uint32 values as int64."""
    c0 = offsets.long() & M32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(10):
        hi_b, lo_b = _mul(ROUND_B, c2)
        hi_a, lo_a = _mul(ROUND_A, c0)
        c0, c2, c1, c3 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1, lo_b, lo_a
        k0, k1 = (k0 + KEY_A) & M32, (k1 + KEY_B) & M32
    return c0, c1, c2, c3


def dropout_mask(seed32: int, step: int, rate: float, pairs: torch.Tensor, width: int) -> torch.Tensor:
    """The (d, width) inverted-dropout factors the kernels use for one model at one step on examples whose pair
    ids m p + n are `pairs` (d,): neuron k of pair q draws output i % 4 of counter i // 4, i = q 32 words + k."""
    words = -(-width // 32)
    i = pairs.long().cpu()[:, None] * (32 * words) + torch.arange(width)[None, :]
    r = torch.stack(randint4x((step << 32) | seed32, i // 4)).gather(0, (i % 4)[None]).squeeze(0)
    threshold = min(round(rate * 2.0**32), 2**32 - 1)
    return (r >= threshold).float() * torch.tensor(1.0 / (1.0 - rate), dtype=torch.float64).float()
