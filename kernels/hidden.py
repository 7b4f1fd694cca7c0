"""The @triton.jit pieces the step's kernels share: the hidden layer of one tile, recomputed wherever a kernel
needs it, the precision-selecting dot, the forward's output chunk and loss head, and the backward's G tile and dS.

    pre[d, k] = U[b, m_d, k] + V[b, n_d, k]                  one-hot first layer = two row gathers
    pre       = pre * keep[d, k] / (1 - rate)                 dropout, keep: the step's mask bits (kernels/dropout.py)
    h         = pre^2 (quad) or max(pre, 0) (relu)

The dropout mask is a pure function of (model seed, step, pair m_d p + n_d, neuron k), drawn once a step into bits
that the forward and the backward read (kernels/dropout.py). Sizes and layouts on the host: kernels/layout.py.
"""

import triton
import triton.language as tl

ACT_CODES = {"quad": 0, "relu": 1}
LOSS_CODES = {"mse": 0, "ce": 1}


@triton.jit
def aligned(x, ALIGN: tl.constexpr):
    """x, a multiple of ALIGN (the host checked, layout.alignment), written so that the compiler sees it is one. It
    learns divisibility from arithmetic, but from an integer argument only whether it is a multiple of 16: rows
    of N 500 or of p padded to 100 would otherwise be loaded one element at a time."""
    return x // ALIGN * ALIGN


@triton.jit
def aligned_rows(width, stride_ub, stride_up, stride_vb, stride_vp, stride_gb, stride_gd, ALIGN_N: tl.constexpr,
                 ALIGN_P: tl.constexpr):
    """N and the strides of U, V (and of dU, dV) as multiples of ALIGN_N, G's as multiples of ALIGN_P (`aligned`):
    rows of N and of G's padded p are 16-byte aligned wherever the host found them so."""
    return (aligned(width, ALIGN_N), aligned(stride_ub, ALIGN_N), aligned(stride_up, ALIGN_N),
            aligned(stride_vb, ALIGN_N), aligned(stride_vp, ALIGN_N), aligned(stride_gb, ALIGN_P),
            aligned(stride_gd, ALIGN_P))


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
def model_constants(COUNT, INV_KEEP, BITS, width, stride_ib, DROPOUT: tl.constexpr):
    """The program's model b (grid axis 1), its example count, and with DROPOUT its factor 1 / (1 - rate) and
    mask bits (model_bits); without, the count and BITS stand in for the two (unused)."""
    b = tl.program_id(1).to(tl.int64)
    count = tl.load(COUNT + b)
    inv_keep = count
    if DROPOUT:
        inv_keep = tl.load(INV_KEEP + b)
        BITS = model_bits(BITS, b, width, stride_ib)
    return b, count, inv_keep, BITS


@triton.jit
def neuron_chunk(width, BLOCK_N: tl.constexpr):
    """The program's chunk of BLOCK_N neurons (grid axis 0): its first neuron k0, offs_k and mask_k (k < N)."""
    k0 = tl.program_id(0) * BLOCK_N
    offs_k = k0 + tl.arange(0, BLOCK_N)
    return k0, offs_k, offs_k < width


@triton.jit
def tile_slots(M, N_, d0, end, BLOCK_D: tl.constexpr):
    """Slots [d0, d0 + BLOCK_D) of one model's examples (M, N_: its row of indices), those before `end` valid:
    offs_d, mask_d and the rows m, n of U and V they read."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < end
    m = tl.load(M + offs_d, mask=mask_d, other=0)
    n = tl.load(N_ + offs_d, mask=mask_d, other=0)
    return offs_d, mask_d, m, n


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
def activation(pre, ACT: tl.constexpr):
    if ACT == 0:
        return pre * pre
    else:
        return tl.maximum(pre, 0.0)


@triton.jit
def activation_grad(pre, ACT: tl.constexpr):
    """phi'(pre); 0 at pre 0 for both activations, which the backward's dropout relies on (hidden_grad)."""
    if ACT == 0:
        return 2.0 * pre
    else:
        return tl.where(pre > 0.0, 1.0, 0.0)


@triton.jit
def output_chunk(h, WT, offs_p, mask_p, offs_k, stride_tp, PRECISION: tl.constexpr):
    """h @ W[b, k, :] for one chunk of neurons offs_k, h (D, K): W's rows from the forward's transposed copy WT
    (model b's); its padding is zero, so no mask on k < width."""
    w_t = tl.load(WT + offs_p[:, None] * stride_tp + offs_k[None, :],
                  mask=mask_p[:, None] & (offs_k < stride_tp)[None, :], other=0.0)
    return dot(h, tl.trans(w_t), PRECISION)


@triton.jit
def loss_head(out, y, offs_d, mask_d, offs_p, mask_p, p, count, LOSS, G, PRED, stride_gd, LOSS_KIND: tl.constexpr,
              TRAIN: tl.constexpr):
    """From the outputs out (D, P) of slots offs_d and their labels y: each example's loss into LOSS, and in
    training its output gradient into G (rows of stride_gd), else its prediction into PRED (LOSS, G, PRED: model
    b's). MSE: mean_q (out - onehot(y))^2 and 2 (out - onehot(y)) / (p count); CE: logsumexp(out) - out[y] and
    (softmax(out) - onehot(y)) / count."""
    target = tl.where(offs_p[None, :] == y[:, None], 1.0, 0.0)
    if LOSS_KIND == 0:
        diff = tl.where(mask_p[None, :], out - target, 0.0)
        loss = tl.sum(diff * diff, axis=1) / p
        grad = diff * (2.0 / (p * count.to(tl.float32)))
    else:
        logits = tl.where(mask_p[None, :], out, float("-inf"))
        shifted = logits - tl.max(logits, axis=1)[:, None]
        e = tl.exp(shifted)
        total = tl.sum(e, axis=1)
        loss = tl.log(total) - tl.sum(tl.where(target > 0, shifted, 0.0), axis=1)
        grad = (e / total[:, None] - target) / count.to(tl.float32)
    tl.store(LOSS + offs_d, loss, mask=mask_d)
    if TRAIN:  # the whole padded row: grad is 0 past p, so the backward reads G without a mask on p
        tl.store(G + offs_d[:, None] * stride_gd + offs_p[None, :], grad.to(G.dtype.element_ty),
                 mask=mask_d[:, None] & (offs_p < stride_gd)[None, :])
    else:
        pred = tl.argmax(tl.where(mask_p[None, :], out, float("-inf")), axis=1)
        tl.store(PRED + offs_d, pred.to(tl.int32), mask=mask_d)


@triton.jit
def g_tile(G, offs_d, mask_d, offs_p, stride_gd):
    """G's rows offs_d (model b's G), (D, P). They are zero past p up to their padded length stride_gd, so the mask
    on p can be one the compiler sees is constant over 16-byte vectors."""
    return tl.load(G + offs_d[:, None] * stride_gd + offs_p[None, :],
                   mask=mask_d[:, None] & (offs_p < stride_gd)[None, :], other=0.0)


@triton.jit
def hidden_grad(d_h, pre, mask, inv_keep, ACT: tl.constexpr, DROPOUT: tl.constexpr):
    """dS = dL/dh phi'(pre) times the dropout factor, zero outside `mask`. A dropped unit's pre is 0, where both
    activations' derivative is 0 already, so only the kept units' 1 / (1 - rate) is left to apply: a scalar (no
    mask tile kept across the dots). Masked neurons have zero rows of W, so their dS is zero already."""
    d_s = d_h * activation_grad(pre, ACT)
    if DROPOUT:
        d_s = d_s * inv_keep
    return tl.where(mask, d_s, 0.0)
