"""Forward pass and loss gradient of a population, one program per (model, tile of examples).

    out[d, :] = sum_k h[d, k] W[b, k, :]            (BLOCK_D, P) accumulated over hidden chunks of BLOCK_N
    loss[d]   = mean_q (out - onehot(y))^2          MSE  (CE: logsumexp(out) - out[y])
    G[d, :]   = 2 (out - onehot(y)) / (p D_b)       MSE  (CE: (softmax(out) - onehot(y)) / D_b)
    pred[d]   = argmax_q out[d, q]                  evaluation only

Shapes: U, V (B, p, N) fp32 contiguous; WT (B, p, N') W transposed, in the dots' input type (bf16 in bf16),
rows padded with zeros to N' (a multiple of 16); M, N_, Y (B, Dmax) int32; COUNT (B,) int32 examples per model
(slots past it are skipped). P = p padded to a power of two (>= 16) inside the kernel. Training writes G
(B, Dmax, p'), rows padded with zeros to 16 bytes (layout.g_row; bf16 in bf16, layout.g_dtype), and the
per-example loss; evaluation writes the per-example loss and pred. Per-example losses are summed on the host in a
fixed order, so the result is deterministic.

Rows in memory are 16-byte aligned (W's own rows of p = 97 are not: hence the transposed copy, which also gives
the tensor cores the operand layout tf32 needs), and ALIGN_N / ALIGN_P tell the compiler so, so that every tile
moves in 16-byte vectors: without them a row of N 500 or of p is loaded or stored one element at a time.

Bytes, not FLOPs, bound this kernel (docs/performance.md): per tile of 64 examples and 32 neurons it reads 8 KB of
U rows, 8 KB of V rows and 12 KB of W from L2 for 0.5 MFLOP.
"""

import torch
import triton
import triton.language as tl

from fastgrok.kernels import layout
from fastgrok.kernels.hidden import (activation, aligned_rows, dropout_scale, loss_head, model_constants,
                                     output_chunk, preactivation, tile_slots)


@triton.jit
def _forward_kernel(
    # pointers
    U, V, WT, M, N_, Y, COUNT, BITS, INV_KEEP, G, LOSS, PRED,
    # sizes
    p, width,
    # strides (stride_tp: WT's padded row, a multiple of 16)
    stride_ub, stride_up, stride_vb, stride_vp, stride_tb, stride_tp, stride_ib, stride_gb, stride_gd,
    # meta-parameters
    ACT: tl.constexpr, LOSS_KIND: tl.constexpr, TRAIN: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    ALIGN_N: tl.constexpr, ALIGN_P: tl.constexpr,
):
    width, stride_ub, stride_up, stride_vb, stride_vp, stride_gb, stride_gd = aligned_rows(
        width, stride_ub, stride_up, stride_vb, stride_vp, stride_gb, stride_gd, ALIGN_N, ALIGN_P)
    b, count, inv_keep, BITS = model_constants(COUNT, INV_KEEP, BITS, width, stride_ib, DROPOUT)
    # Axis 0 walks one model's example tiles, so consecutive programs share W[b] in L2.
    if tl.program_id(0) * BLOCK_D < count:
        offs_d, mask_d, m, n = tile_slots(M + b * stride_ib, N_ + b * stride_ib, tl.program_id(0) * BLOCK_D, count,
                                          BLOCK_D)
        y = tl.load(Y + b * stride_ib + offs_d, mask=mask_d, other=0)
        offs_p = tl.arange(0, BLOCK_P)
        mask_p = offs_p < p
        out = tl.zeros((BLOCK_D, BLOCK_P), dtype=tl.float32)
        for k0 in range(0, width, BLOCK_N):
            offs_k = k0 + tl.arange(0, BLOCK_N)
            mask = mask_d[:, None] & (offs_k < width)[None, :]
            pre = preactivation(U + b * stride_ub, V + b * stride_vb, m[:, None], n[:, None], offs_k[None, :], mask,
                                stride_up, stride_vp)
            if DROPOUT:
                pre = pre * dropout_scale(BITS, offs_d[:, None], offs_k[None, :], k0, mask_d[:, None], width,
                                          stride_ib, inv_keep, BLOCK_N)
            out += output_chunk(activation(pre, ACT), WT + b * stride_tb, offs_p, mask_p, offs_k, stride_tp, PRECISION)
        loss_head(out, y, offs_d, mask_d, offs_p, mask_p, p, count, LOSS + b * stride_ib, G + b * stride_gb,
                  PRED + b * stride_ib, stride_gd, LOSS_KIND, TRAIN)


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


def arguments(U, V, W, m, n, y, count, *, act: int, loss: int, precision: str, train: bool, dropout: tuple | None,
              block_d: int, block_n: int, num_warps: int):
    """What a forward kernel needs (this module's and kernels/block.py's): checks the shapes, allocates the results
    and returns them, (losses (B, Dmax), G (B, Dmax, p) or None, pred or None), with the kernel's per-model
    pointers, sizes, strides, and meta-parameters and launch options (the tiles fitted to p: layout.fit). G is a
    view of rows padded to layout.g_row(p, precision) with zeros (the backward reads the padding), of type
    layout.g_dtype(precision). The losses stand in for the pointer the kernel does not write (G or PRED), the
    count for dropout's."""
    B, p, width = U.shape
    d_max = m.shape[1]
    assert V.shape == U.shape and W.shape == (B, width, p), "U, V: (B, p, N); W: (B, N, p)"
    assert m.shape == n.shape == y.shape == (B, d_max) and m.dtype == torch.int32 and count.shape == (B,)
    assert U.is_contiguous() and V.is_contiguous() and m.is_contiguous()
    w_t = transposed_weights(W, precision)
    losses = torch.empty(B, d_max, device=U.device, dtype=torch.float32)
    G = (torch.empty(B, d_max, layout.g_row(p, precision), device=U.device, dtype=layout.g_dtype(precision))
         if train else None)
    pred = None if train else torch.empty(B, d_max, device=U.device, dtype=torch.int32)
    use_dropout = train and dropout is not None
    bits, inv_keep = dropout if use_dropout else (count, count)
    assert not use_dropout or bits.shape == (B, layout.words(width), d_max), "kernels/dropout.py masks"
    per_model = (U, V, w_t, m, n, y, count, bits, inv_keep, G if train else losses, losses,
                 pred if pred is not None else losses)
    strides = (U.stride(0), U.stride(1), V.stride(0), V.stride(1), w_t.stride(0), w_t.stride(1), m.stride(0),
               G.stride(0) if train else 0, G.stride(1) if train else 0)
    block_d, block_n = layout.fit(block_d, block_n, p)
    meta = dict(ACT=act, LOSS_KIND=loss, TRAIN=train, DROPOUT=use_dropout, PRECISION=precision, BLOCK_D=block_d,
                BLOCK_N=block_n, BLOCK_P=layout.block_p(p), num_warps=num_warps,
                ALIGN_N=layout.alignment(width, U.stride(0), U.stride(1), V.stride(0), V.stride(1)),
                ALIGN_P=layout.alignment(G.stride(0), G.stride(1)) if train else 1)
    return (losses, (G[..., :p] if train else None), pred), per_model, (p, width), strides, meta


def forward(U, V, W, m, n, y, count, *, act: int, loss: int, precision: str, train: bool,
            dropout: tuple | None = None, block_d: int = TILES["block_d"], block_n: int = TILES["block_n"],
            num_warps: int = TILES["num_warps"]):
    """Launch over (cdiv(Dmax, block_d), B). Returns (loss (B, Dmax), G (B, Dmax, p) or None, pred or None)
    (`arguments`). The tiles are those for p <= 128; a larger p shrinks them (layout.fit). dropout: None, or the
    step's masks for training (kernels/dropout.py masks: bits drawn for these m, n)."""
    results, per_model, sizes, strides, meta = arguments(U, V, W, m, n, y, count, act=act, loss=loss,
                                                         precision=precision, train=train, dropout=dropout,
                                                         block_d=block_d, block_n=block_n, num_warps=num_warps)
    layout.launch(_forward_kernel, layout.cdiv(m.shape[1], meta["BLOCK_D"]), U.shape[0], per_model, *sizes, *strides,
                  **meta)
    return results
