"""Dropout masks of one training step, drawn once by their own kernel and stored as bits for the forward and the
backward to read.

    keep[b, d, k] = philox4x(seed_b, step)[i // 4][i % 4] >= threshold_b,   i = 32 words pair_d + k,
                                                                              pair_d = m_d p + n_d

philox4x(key)[c] is the 4 x 32-bit output of Philox-4x32-10 (tl.randint4x) for counter c, so one draw serves four
neurons. A pure function of (model seed, step, pair, neuron): a model draws the same masks in any population, and
the order in which the kernels visit the examples does not matter. BITS (B, words, Dmax) int32, words = N / 32
rounded up: bit k % 32 of word [b, k // 32, d] is keep[b, d, k]. Word-major, so that a tile's examples find one
word each in a contiguous run.

Drawn in the kernels themselves, a mask cost a 10-round Philox per example and neuron in the forward and again in
the backward, in the middle of their dots (docs/performance.md: an H100 dropout model-step cost about 3.5 times one
without). Here it is drawn once, by a kernel that does nothing else, a quarter of a Philox per example and neuron,
and the two kernels read 4 bytes per 32 neurons of an example (300 KB per model-step at N 512, D 4704).
"""

import torch
import triton
import triton.language as tl

from fastgrok.kernels import layout
from fastgrok.kernels.hidden import model_bits


@triton.jit
def _bits(r, k, threshold, width):
    """The bits of neurons k (a (32,)-slice of one word, lanes of 4 apart) that r (D, 8) keeps, as one word per
    example: each a sum of distinct powers of two, so their bitwise or (and 20 times faster than tl.reduce with an
    or in the interpreter)."""
    keep = (r.to(tl.uint32) >= threshold) & (k < width)[None, :]
    return tl.sum(keep.to(tl.uint32) << (k % 32).to(tl.uint32)[None, :], axis=1)


@triton.jit
def _mask_kernel(M, N_, COUNT, SEED, THRESHOLD, BITS, p, width, step_key, stride_ib, BLOCK_D: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    count = tl.load(COUNT + b)
    if tl.program_id(0) * BLOCK_D < count:
        offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < count
        m = tl.load(M + b * stride_ib + offs_d, mask=mask_d, other=0)
        n = tl.load(N_ + b * stride_ib + offs_d, mask=mask_d, other=0)
        # step_key = step << 32, shifted on the host (a scalar argument may arrive as int32)
        key = step_key | (tl.load(SEED + b) & 0xFFFFFFFF)
        threshold = tl.load(THRESHOLD + b).to(tl.uint32)
        lane = tl.arange(0, 8)
        n_words = tl.cdiv(width, 32)
        bits = model_bits(BITS, b, width, stride_ib)
        for w in range(0, n_words):
            # counters 8 w .. 8 w + 7 of each pair: neurons 32 w + 4 lane + i from output i
            r0, r1, r2, r3 = tl.randint4x(key, (m * p + n)[:, None] * (8 * n_words) + (8 * w + lane)[None, :])
            k = 32 * w + 4 * lane
            word = (_bits(r0, k, threshold, width) + _bits(r1, k + 1, threshold, width)
                    + _bits(r2, k + 2, threshold, width) + _bits(r3, k + 3, threshold, width))
            tl.store(bits + w * stride_ib + offs_d, word.to(tl.int32, bitcast=True), mask=mask_d)


BLOCK_D = 64


def masks(m, n, count, dropout: tuple | None, *, p: int, width: int, step: int):
    """The step's masks for the forward and backward kernels: (BITS (B, words, Dmax) int32, inv_keep (B,) fp32),
    or None without dropout. m, n (B, Dmax) int32 in the kernels' slot order; dropout: None, or the per-model
    constants (seed (B,) int64, threshold (B,) int64 = rate 2^32 rounded, inv_keep (B,) fp32 = 1 / (1 - rate))."""
    if dropout is None:
        return None
    seed, threshold, inv_keep = dropout
    B, d_max = m.shape
    assert m.dtype == n.dtype == torch.int32 and m.is_contiguous() and n.is_contiguous() and count.shape == (B,)
    bits = torch.empty(B, layout.words(width), d_max, device=m.device, dtype=torch.int32)
    layout.launch(_mask_kernel, layout.cdiv(d_max, BLOCK_D), B, (m, n, count, seed, threshold, bits), p, width,
                  step << 32, m.stride(0), BLOCK_D=BLOCK_D, num_warps=4)
    return bits, inv_keep
