"""Forward pass and loss gradient of a population, one program per (model, tile of examples), or per (model,
block of the (m, n) table) when the examples come in block order (BLOCKED, below).

    out[d, :] = sum_k h[d, k] W[b, k, :]            (BLOCK_D, P) accumulated over hidden chunks of BLOCK_N
    loss[d]   = mean_q (out - onehot(y))^2          MSE  (CE: logsumexp(out) - out[y])
    G[d, :]   = 2 (out - onehot(y)) / (p D_b)       MSE  (CE: (softmax(out) - onehot(y)) / D_b)
    pred[d]   = argmax_q out[d, q]                  evaluation only

Shapes: U, V (B, p, N) fp32 contiguous; WT (B, p, N') W transposed, in the dots' input type (bf16 in bf16),
rows padded with zeros to N' (a multiple of 16); M, N_, Y (B, Dmax) int32; COUNT (B,) int32 examples per model
(slots past it are skipped). P = p padded to a power of two (>= 16) inside the kernel. Training writes G
(B, Dmax, p'), rows padded with zeros to 16 bytes (layout.g_row; bf16 in bf16, layout.g_dtype), and the
per-example loss; evaluation writes the per-example loss and pred. Per-example losses are summed on the host in a fixed order, so
the result is deterministic.

Rows in memory are 16-byte aligned (W's own rows of p = 97 are not: hence the transposed copy, which also gives
the tensor cores the operand layout tf32 needs), and ALIGN_N / ALIGN_P tell the compiler so, so that every tile
moves in 16-byte vectors: without them a row of N 500 or of p is loaded or stored one element at a time.

Bytes, not FLOPs, bound this kernel (bench/NOTES.md): per tile of 64 examples and 32 neurons it reads 8 KB of U
rows, 8 KB of V rows and 12 KB of W from L2 for 0.5 MFLOP. BLOCKED (the "block" example order of
kernels/backward.py, whose tiles stay inside one block of side <= 32 of the (m, n) table) reads each tile's U and
V rows from one window of 32 rows each instead (hidden.gathered_preactivation): 6 KB where it read 16.
"""

import torch
import triton
import triton.language as tl

from fastgrok.kernels import layout
from fastgrok.kernels.hidden import (BLOCK_WINDOW, activation, aligned, block_count, block_rows, block_side, block_span,
                                     dot, dropout_scale, gathered_preactivation, model_bits, preactivation)


WINDOW = tl.constexpr(BLOCK_WINDOW)  # as the kernels see it


@triton.jit
def _forward_kernel(
    # pointers
    U, V, WT, M, N_, Y, COUNT, BLOCKS, BITS, INV_KEEP, G, LOSS, PRED,
    # sizes
    p, width, side,
    # strides (stride_tp: WT's padded row, a multiple of 16)
    stride_ub, stride_up, stride_vb, stride_vp, stride_tb, stride_tp, stride_ib, stride_bb, stride_gb, stride_gd,
    # meta-parameters
    ACT: tl.constexpr, LOSS_KIND: tl.constexpr, TRAIN: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCKED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr, ALIGN_N: tl.constexpr, ALIGN_P: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    width = aligned(width, ALIGN_N)
    stride_ub, stride_up = aligned(stride_ub, ALIGN_N), aligned(stride_up, ALIGN_N)
    stride_vb, stride_vp = aligned(stride_vb, ALIGN_N), aligned(stride_vp, ALIGN_N)
    stride_gb, stride_gd = aligned(stride_gb, ALIGN_P), aligned(stride_gd, ALIGN_P)
    count = tl.load(COUNT + b)
    inv_keep = count  # unused without dropout
    if DROPOUT:
        inv_keep = tl.load(INV_KEEP + b)
        BITS = model_bits(BITS, b, width, stride_ib)
    if BLOCKED:
        # Axis 0 walks the blocks of the (m, n) table: the examples come grouped by blocks of side x side pairs
        # (block_order), block j's from slot BLOCKS[b, j] to BLOCKS[b, j + 1], so every tile of a block reads
        # its U and V rows from one window of WINDOW rows (hidden.gathered_preactivation)
        start, end, row_m, row_n = block_span(BLOCKS + b * stride_bb, tl.program_id(0), p, side)
        for d0 in range(start, end, BLOCK_D):
            _forward_tile(U, V, WT, M, N_, Y, BITS, G, LOSS, PRED, b, d0 + tl.arange(0, BLOCK_D), end, count,
                          row_m, row_n, p, side, width, inv_keep, stride_ub, stride_up, stride_vb, stride_vp,
                          stride_tb, stride_tp, stride_ib, stride_gb, stride_gd, ACT, LOSS_KIND, TRAIN, DROPOUT,
                          PRECISION, WINDOW, BLOCK_D, BLOCK_N, BLOCK_P)
    else:
        # Axis 0 walks one model's example tiles, so consecutive programs share W[b] in L2.
        if tl.program_id(0) * BLOCK_D < count:
            _forward_tile(U, V, WT, M, N_, Y, BITS, G, LOSS, PRED, b,
                          tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D), count, count, 0, 0, p, side, width,
                          inv_keep, stride_ub, stride_up, stride_vb, stride_vp, stride_tb, stride_tp, stride_ib,
                          stride_gb, stride_gd, ACT, LOSS_KIND, TRAIN, DROPOUT, PRECISION, 0, BLOCK_D, BLOCK_N, BLOCK_P)


@triton.jit
def _forward_tile(U, V, WT, M, N_, Y, BITS, G, LOSS, PRED, b, offs_d, end, count, row_m, row_n, p, side, width,
                  inv_keep, stride_ub, stride_up, stride_vb, stride_vp, stride_tb, stride_tp, stride_ib,
                  stride_gb, stride_gd, ACT: tl.constexpr, LOSS_KIND: tl.constexpr, TRAIN: tl.constexpr,
                  DROPOUT: tl.constexpr, PRECISION: tl.constexpr, WINDOW: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """Examples offs_d (those before `end`) of model b: out, the loss and G (or pred). WINDOW 0: each example's
    U and V rows loaded on their own; else from windows of WINDOW rows from row_m, row_n, which hold them all."""
    mask_d = offs_d < end
    m = tl.load(M + b * stride_ib + offs_d, mask=mask_d, other=0)
    n = tl.load(N_ + b * stride_ib + offs_d, mask=mask_d, other=0)
    y = tl.load(Y + b * stride_ib + offs_d, mask=mask_d, other=0)
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < p
    out = tl.zeros((BLOCK_D, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_N):
        offs_k = k0 + tl.arange(0, BLOCK_N)
        mask_k = offs_k < width
        mask = mask_d[:, None] & mask_k[None, :]
        if WINDOW > 0:
            u = block_rows(U + b * stride_ub, row_m, offs_k[None, :], mask_k[None, :], p, side, stride_up, WINDOW, False)
            v = block_rows(V + b * stride_vb, row_n, offs_k[None, :], mask_k[None, :], p, side, stride_vp, WINDOW, False)
            pre = gathered_preactivation(u, v, m[:, None], n[:, None], row_m, row_n, offs_k[None, :], mask, WINDOW,
                                         False)
        else:
            pre = preactivation(U + b * stride_ub, V + b * stride_vb, m[:, None], n[:, None], offs_k[None, :], mask,
                                stride_up, stride_vp)
        if DROPOUT:
            pre = pre * dropout_scale(BITS, offs_d[:, None], offs_k[None, :], k0, mask_d[:, None], width, stride_ib,
                                      inv_keep, BLOCK_N)
        h = activation(pre, ACT)
        # W[b, k, q] for the chunk, from the transposed copy; its padding is zero, so no mask on k < width
        w_t = tl.load(WT + b * stride_tb + offs_p[:, None] * stride_tp + offs_k[None, :],
                      mask=mask_p[:, None] & (offs_k < stride_tp)[None, :], other=0.0)
        out += dot(h, tl.trans(w_t), PRECISION)

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
    tl.store(LOSS + b * stride_ib + offs_d, loss, mask=mask_d)
    if TRAIN:  # the whole padded row: grad is 0 past p, so the backward reads G without a mask on p
        tl.store(G + b * stride_gb + offs_d[:, None] * stride_gd + offs_p[None, :], grad.to(G.dtype.element_ty),
                 mask=mask_d[:, None] & (offs_p < stride_gd)[None, :])
    else:
        pred = tl.argmax(tl.where(mask_p[None, :], out, float("-inf")), axis=1)
        tl.store(PRED + b * stride_ib + offs_d, pred.to(tl.int32), mask=mask_d)


# Default tiles. 64 examples is the smallest tile Hopper's wgmma takes (32 falls back to mma.sync); with 32
# neurons and 4 warps nothing spills in tf32 or bf16 (bench/results/kernel-resources-sm90-triton3.9.txt).
TILES = {"block_d": 64, "block_n": 32, "num_warps": 4}


def transposed_weights(W: torch.Tensor, precision: str) -> torch.Tensor:
    """The forward's copy of W (B, N, p): (B, p, N') in layout.w_dtype, rows zero-padded to N' = layout.w_row(N)."""
    B, width, p = W.shape
    w_t = torch.empty(B, p, layout.w_row(width), device=W.device, dtype=layout.w_dtype(precision))
    w_t[..., :width] = W.transpose(1, 2)
    w_t[..., width:] = 0.0
    return w_t


def forward(U, V, W, m, n, y, count, *, act: int, loss: int, precision: str, train: bool,
            dropout: tuple | None = None, blocks: torch.Tensor | None = None,
            block_d: int = TILES["block_d"], block_n: int = TILES["block_n"], num_warps: int = TILES["num_warps"]):
    """Launch over (cdiv(Dmax, block_d), B), or with `blocks` over (blocks of the (m, n) table, B). Returns
    (loss (B, Dmax), G (B, Dmax, p) or None, pred or None). The tiles are those for p <= 128; a larger p shrinks
    them (layout.fit). blocks: the offsets of block_order (kernels/backward.py), whose example order m, n, y are in.

    G is a view of rows padded to layout.g_row(p, precision) with zeros (the backward reads the padding), of type
    layout.g_dtype(precision): bf16 in bf16, fp32 otherwise. dropout: None, or the step's masks for training
    (kernels/dropout.py masks: bits drawn for these m, n)."""
    B, p, width = U.shape
    d_max = m.shape[1]
    assert V.shape == U.shape and W.shape == (B, width, p), "U, V: (B, p, N); W: (B, N, p)"
    assert m.shape == n.shape == y.shape == (B, d_max) and m.dtype == torch.int32 and count.shape == (B,)
    assert U.is_contiguous() and V.is_contiguous() and m.is_contiguous()
    block_d, block_n = layout.fit(block_d, block_n, p)
    w_t = transposed_weights(W, precision)
    losses = torch.empty(B, d_max, device=U.device, dtype=torch.float32)
    G = (torch.empty(B, d_max, layout.g_row(p, precision), device=U.device, dtype=layout.g_dtype(precision))
         if train else None)
    pred = None if train else torch.empty(B, d_max, device=U.device, dtype=torch.int32)
    use_dropout = train and dropout is not None
    bits, inv_keep = dropout if use_dropout else (count, count)  # unused placeholders
    assert not use_dropout or bits.shape == (B, layout.words(width), d_max), "kernels/dropout.py masks"
    align_p = layout.alignment(G.stride(0), G.stride(1)) if train else 1
    blocked = blocks is not None
    if blocked:
        assert blocks.shape == (B, block_count(p) ** 2 + 1) and blocks.dtype == torch.int32, "block_order's offsets"
    else:
        blocks = count  # unused placeholder
    tiles = block_count(p) ** 2 if blocked else layout.cdiv(d_max, block_d)
    layout.launch(
        _forward_kernel, tiles, B,
        (U, V, w_t, m, n, y, count, blocks, bits, inv_keep, G if train else losses, losses,
         pred if pred is not None else losses),
        p, width, block_side(p),
        U.stride(0), U.stride(1), V.stride(0), V.stride(1), w_t.stride(0), w_t.stride(1), m.stride(0),
        blocks.stride(0), G.stride(0) if train else 0, G.stride(1) if train else 0,
        ACT=act, LOSS_KIND=loss, TRAIN=train, DROPOUT=use_dropout, PRECISION=precision, BLOCKED=blocked,
        BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_P=layout.block_p(p), num_warps=num_warps,
        ALIGN_N=layout.alignment(width, U.stride(0), U.stride(1), V.stride(0), V.stride(1)), ALIGN_P=align_p,
    )
    return losses, (G[..., :p] if train else None), pred
