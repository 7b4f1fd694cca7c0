"""The hidden layer of one tile, recomputed wherever a kernel needs it, and the precision-selecting dot.

    pre[d, k] = U[b, m_d, k] + V[b, n_d, k]                  one-hot first layer = two row gathers
    pre       = pre * keep[d, k] / (1 - rate)                 dropout, keep = philox(seed_b, step)[pair_d N + k] >= rate 2^32
    h         = pre^2 (quad) or max(pre, 0) (relu)

The dropout mask is a pure function of (model seed, step, pair m_d p + n_d, neuron k), so the forward and both
backward kernels draw the same mask without storing it, a model draws the same masks in any population, and the
order in which a kernel visits the examples does not matter.
"""

import triton
import triton.language as tl

ACT_CODES = {"quad": 0, "relu": 1}
LOSS_CODES = {"mse": 0, "ce": 1}
PRECISIONS = ("fp32", "tf32", "tf32x3", "bf16")


def alignment(*sizes: int, most: int = 16) -> int:
    """The largest power of two, up to `most`, that divides every one of `sizes` (row lengths and strides, in
    elements): a kernel told it (through `aligned`) loads and stores rows in 16-byte vectors."""
    align = most
    while align > 1 and any(size % align for size in sizes):
        align //= 2
    return align


@triton.jit
def aligned(x, ALIGN: tl.constexpr):
    """x, a multiple of ALIGN (the host checked, `alignment`), written so that the compiler sees it is one. It
    learns divisibility from arithmetic, but from an integer argument only whether it is a multiple of 16: rows
    of N 500 or of p padded to 100 would otherwise be loaded one element at a time."""
    return x // ALIGN * ALIGN


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """fp32-accumulated a @ b. fp32 = exact IEEE products (slow; parity), tf32/tf32x3 on tensor cores, bf16 inputs."""
    if PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PRECISION == "fp32":
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def dropout_scale(pair, k, width, seed, step_key, threshold, inv_keep):
    """Inverted-dropout factors, 0 or 1 / (1 - rate), of pairs `pair` and neurons `k` (broadcast against each
    other: (D, 1) and (1, K) for a (D, K) tile, or transposed). step_key = step << 32, shifted on the host (a
    scalar argument may arrive as int32, or as a constant when it equals 1)."""
    key = step_key | (seed & 0xFFFFFFFF)
    r = tl.randint(key, pair * width + k)
    return tl.where(r.to(tl.uint32) >= threshold.to(tl.uint32), inv_keep, 0.0)


@triton.jit
def preactivation(U, V, m, n, k, mask, stride_up, stride_vp):
    """U[m, k] + V[n, k]; U, V point at model b; rows m, n and neurons k broadcast against each other as in
    dropout_scale."""
    u = tl.load(U + m * stride_up + k, mask=mask, other=0.0)
    v = tl.load(V + n * stride_vp + k, mask=mask, other=0.0)
    return u + v


@triton.jit
def activation(pre, ACT: tl.constexpr):
    if ACT == 0:
        return pre * pre
    else:
        return tl.maximum(pre, 0.0)


@triton.jit
def activation_grad(pre, ACT: tl.constexpr):
    if ACT == 0:
        return 2.0 * pre
    else:
        return tl.where(pre > 0.0, 1.0, 0.0)
