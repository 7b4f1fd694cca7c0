"""The hidden layer of one tile, recomputed wherever a kernel needs it, and the precision-selecting dot.

    pre[d, k] = U[b, m_d, k] + V[b, n_d, k]                  one-hot first layer = two row gathers (from memory,
                                                             or from a block's rows on chip: gathered_preactivation)
    pre       = pre * keep[d, k] / (1 - rate)                 dropout, keep: the step's mask bits (kernels/dropout.py)
    h         = pre^2 (quad) or max(pre, 0) (relu)

The dropout mask is a pure function of (model seed, step, pair m_d p + n_d, neuron k), drawn once a step into bits
that the forward and the backward read (kernels/dropout.py).
"""

import triton
import triton.language as tl

ACT_CODES = {"quad": 0, "relu": 1}
# Rows of U and V (and of dU, dV) that one block of the (m, n) table spans at most: the "block" example order
# (kernels/backward.py block_order) groups each model's examples by blocks of block_side(p) x block_side(p) pairs.
BLOCK_WINDOW = 32
LOSS_CODES = {"mse": 0, "ce": 1}


def block_side(p: int) -> int:
    """Side of the square blocks of the (m, n) table the "block" order walks: as even as possible, at most
    BLOCK_WINDOW (p 97: 4 x 4 blocks of 25)."""
    return triton.cdiv(p, triton.cdiv(p, BLOCK_WINDOW))


def block_count(p: int) -> int:
    """Blocks along each side of the (m, n) table."""
    return triton.cdiv(p, block_side(p))


@triton.jit
def aligned(x, ALIGN: tl.constexpr):
    """x, a multiple of ALIGN (the host checked, layout.alignment), written so that the compiler sees it is one. It
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
def model_bits(BITS, b, width, stride):
    """Model b's dropout mask bits in BITS (B, words, Dmax): word w of its slot d at model_bits + w stride + d. The
    one place that layout is written: the mask kernel stores through it, the forward and backward read."""
    return BITS + b * tl.cdiv(width, 32) * stride


@triton.jit
def dropout_scale(BITS, d, k, k0, mask_d, width, stride, inv_keep, BLOCK_N: tl.constexpr):
    """Inverted-dropout factors, 0 or 1 / (1 - rate), of slots d and neurons k, broadcast against each other:
    (D, 1) and (1, K) for a (D, K) tile, or transposed. k: a chunk of BLOCK_N neurons from k0 (a multiple of
    BLOCK_N); BITS: one model's mask bits (model_bits); mask_d:
    d's valid slots, shaped as d. A chunk spans BLOCK_N / 32 words (one below 32 neurons): one load of each per
    slot, and a shift per element."""
    word = d * 0 + k * 0
    for j in tl.static_range((BLOCK_N + 31) // 32):
        w = k0 // 32 + j
        # a word past the last one holds only neurons past N, which the tiles mask: read the last one instead
        column = tl.load(BITS + tl.minimum(w, tl.cdiv(width, 32) - 1) * stride + d, mask=mask_d, other=0)
        word = tl.where(k // 32 == w, column, word)
    return tl.where(((word >> (k % 32)) & 1) != 0, inv_keep, 0.0)


@triton.jit
def preactivation(U, V, m, n, k, mask, stride_up, stride_vp):
    """U[m, k] + V[n, k]; U, V point at model b; rows m, n and neurons k broadcast against each other as in
    dropout_scale."""
    u = tl.load(U + m * stride_up + k, mask=mask, other=0.0)
    v = tl.load(V + n * stride_vp + k, mask=mask, other=0.0)
    return u + v


@triton.jit
def block_span(BLOCKS, j, p, side):
    """Block j of the "block" order (BLOCKS: one model's block_order offsets): its slots [start, end) and its
    first rows of U (row_m) and V (row_n); blocks run row by row over the (m, n) table."""
    blocks = tl.cdiv(p, side)
    return tl.load(BLOCKS + j), tl.load(BLOCKS + j + 1), (j // blocks) * side, (j % blocks) * side


@triton.jit
def block_rows(U, row0, k, mask_k, p, side, stride, WINDOW: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Rows [row0, row0 + side) of U (one model's) at neurons k, one block's rows in the "block" order: a
    (WINDOW, K) tile, or (K, WINDOW) if TRANSPOSED (k then (K, 1), else (1, K)); rows past the block or p are 0."""
    offs_w = tl.arange(0, WINDOW)
    inside = (offs_w < side) & (row0 + offs_w < p)
    if TRANSPOSED:
        return tl.load(U + (row0 + offs_w)[None, :] * stride + k, mask=mask_k & inside[None, :], other=0.0)
    else:
        return tl.load(U + (row0 + offs_w)[:, None] * stride + k, mask=inside[:, None] & mask_k, other=0.0)


@triton.jit
def gathered_preactivation(u, v, m, n, row_m, row_n, k, mask, WINDOW: tl.constexpr, TRANSPOSED: tl.constexpr):
    """`preactivation` of a tile inside one block of the (m, n) table, from the block's rows of U and V
    (`block_rows` from row_m and row_n): each example's row is gathered on chip instead of loaded from memory on
    its own, so a tile of 64 examples reads 2 x 25 rows (p 97) instead of 2 x 64, and the backward, whose
    neurons stay fixed over a block, reads them once per block. Tiles are (D, K) with m, n (D, 1) and k (1, K);
    TRANSPOSED: (K, D), m, n (1, D), k (K, 1). mask: the tile's valid entries."""
    # each example's row in the window, broadcast to the tile's shape (k * 0) and kept inside it on masked slots
    at_m = tl.minimum(tl.maximum(m - row_m, 0), WINDOW - 1) + k * 0
    at_n = tl.minimum(tl.maximum(n - row_n, 0), WINDOW - 1) + k * 0
    if TRANSPOSED:
        pre = tl.gather(u, at_m, 1) + tl.gather(v, at_n, 1)
    else:
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
    """phi'(pre); 0 at pre 0 for both activations, which the backward's dropout relies on (kernels/backward.py)."""
    if ACT == 0:
        return 2.0 * pre
    else:
        return tl.where(pre > 0.0, 1.0, 0.0)
