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
# Rows of U and V (and of dU, dV) that one block of the (m, n) table spans at most: the "block" example order
# (kernels/backward.py block_order) groups each model's examples by blocks of block_side(p) x block_side(p) pairs.
BLOCK_WINDOW = 32
LOSS_CODES = {"mse": 0, "ce": 1}
PRECISIONS = ("fp32", "tf32", "tf32x3", "bf16")


def alignment(*sizes: int, most: int = 16) -> int:
    """The largest power of two, up to `most`, that divides every one of `sizes` (row lengths and strides, in
    elements): a kernel told it (through `aligned`) loads and stores rows in 16-byte vectors."""
    align = most
    while align > 1 and any(size % align for size in sizes):
        align //= 2
    return align


def block_side(p: int) -> int:
    """Side of the square blocks of the (m, n) table the "block" order walks: as even as possible, at most
    BLOCK_WINDOW (p 97: 4 x 4 blocks of 25)."""
    return triton.cdiv(p, triton.cdiv(p, BLOCK_WINDOW))


def block_count(p: int) -> int:
    """Blocks along each side of the (m, n) table."""
    return triton.cdiv(p, block_side(p))


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
def block_preactivation(U, V, m, n, row_m, row_n, k, mask_k, mask, p, side, stride_up, stride_vp,
                        WINDOW: tl.constexpr, TRANSPOSED: tl.constexpr):
    """`preactivation` of a tile inside one block of the (m, n) table: its rows m lie in [row_m, row_m + WINDOW)
    and n in [row_n, row_n + WINDOW). The block's WINDOW rows of U and of V are loaded once per tile, whole rows
    in 16-byte vectors, and each example's row is gathered from them on chip, instead of one row of U and one of
    V loaded per example: a tile of 64 examples reads 2 x 25 rows (p 97) where it read 2 x 64. Tiles are (D, K),
    m, n (D, 1), k (1, K); TRANSPOSED: (K, D), m, n (1, D), k (K, 1). mask: the tile's valid entries; side: the
    block's rows (<= WINDOW), the only ones loaded."""
    offs_w = tl.arange(0, WINDOW)
    in_m = (offs_w < side) & (row_m + offs_w < p)
    in_n = (offs_w < side) & (row_n + offs_w < p)
    # each example's row in the window, broadcast to the tile's shape (k * 0) and kept inside it on masked slots
    at_m = tl.minimum(tl.maximum(m - row_m, 0), WINDOW - 1) + k * 0
    at_n = tl.minimum(tl.maximum(n - row_n, 0), WINDOW - 1) + k * 0
    if TRANSPOSED:
        u = tl.load(U + (row_m + offs_w)[None, :] * stride_up + k, mask=mask_k & in_m[None, :], other=0.0)
        v = tl.load(V + (row_n + offs_w)[None, :] * stride_vp + k, mask=mask_k & in_n[None, :], other=0.0)
        pre = tl.gather(u, at_m, 1) + tl.gather(v, at_n, 1)
    else:
        u = tl.load(U + (row_m + offs_w)[:, None] * stride_up + k, mask=in_m[:, None] & mask_k, other=0.0)
        v = tl.load(V + (row_n + offs_w)[:, None] * stride_vp + k, mask=in_n[:, None] & mask_k, other=0.0)
        pre = tl.gather(u, at_m, 0) + tl.gather(v, at_n, 0)
    return tl.where(mask, pre, 0.0)


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
