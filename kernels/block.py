"""The "block" example order, with its forward and its scatter: an alternative to the default step
(kernels/forward.py, kernels/backward.py) that no GPU has measured yet. It is kept for the benchmark (the bench
variants triton-tf32-block and triton-bf16-block, bench/sweep_blocks.py) until a GPU measurement decides it:
faster, and it replaces the windowed scatter; slower, and this file goes.

Each model's examples are grouped by blocks of side x side pairs of the (m, n) table (block_order: side <= 32, as
even as possible; p 97: 4 x 4 blocks of 25), with the offsets of each block's first slot. A block's examples touch
rows [i side, i side + side) of U, V, dU and dV only, so:

- the backward (one program per (model, chunk of BLOCK_N neurons), as the default) loops over blocks, and inside a
  block over tiles, summing dS into one static window of BLOCK_WINDOW rows of dU and of dV in registers, added
  once per block (a barrier per block, not per tile). The tile loop holds no other loop, so the compiler can
  software-pipeline its loads, which the windowed scatter's nested window loop prevents. Tiles are transposed
  (neurons x examples), so that every dot has BLOCK_N rows (wgmma's minimum of 64) even with 32-example tiles.
  The block's rows of U and V at the program's neurons are read once per block and each example's row gathered
  from them on chip (gathered_preactivation). Without `fused`, dW comes from the default kernel's dW launch.
- the forward runs a program per (block, model) over the block's tiles, reading its U and V rows from one window
  of BLOCK_WINDOW rows each: per tile of 64 examples and 32 neurons 6 KB of U, V rows where the default reads 16.

Predicted (docs/performance.md, from the compiler's reports and byte counts): the backward at N 512 falls
toward the dW-only kernel's pipelined rate, 1.3-1.8x faster than the windowed scatter if its spills do not eat
the gain (~45-55k model-steps/s for the tf32 step on an H100, against 37k); the forward, if L2-bound, 7.0 -> ~4.8
ms at N 512. Costs: the last tile of each block is partly empty (~5% more dot work at alpha 0.5), and more
registers (the fused kernel spills in tf32, bench/kernel_resources.py).
"""

import torch
import triton
import triton.language as tl

from fastgrok.kernels import backward as backward_module
from fastgrok.kernels import forward as forward_module
from fastgrok.kernels import layout
from fastgrok.kernels.backward import tile_order
from fastgrok.kernels.hidden import (activation, aligned_rows, dot, dropout_scale, g_tile, hidden_grad, loss_head,
                                     model_constants, neuron_chunk, output_chunk, tile_slots)

# Rows of U and V (and of dU, dV) that one block of the (m, n) table spans at most.
BLOCK_WINDOW = 32
WINDOW = tl.constexpr(BLOCK_WINDOW)  # as the kernels see it


def block_side(p: int) -> int:
    """Side of the square blocks of the (m, n) table: as even as possible, at most BLOCK_WINDOW (p 97: 4 x 4
    blocks of 25)."""
    return layout.cdiv(p, layout.cdiv(p, BLOCK_WINDOW))


def block_count(p: int) -> int:
    """Blocks along each side of the (m, n) table."""
    return layout.cdiv(p, block_side(p))


def block_order(m: torch.Tensor, n: torch.Tensor, valid: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tile_order over the blocks, and the (B, blocks^2 + 1) int32 offsets of each block's first slot in that
    order (the last: the model's example count)."""
    side, blocks = block_side(p), block_count(p)
    ids = torch.where(valid, (m // side) * blocks + n // side, blocks * blocks)
    sizes = torch.zeros(m.shape[0], blocks * blocks + 1, dtype=torch.int64, device=m.device)
    sizes.scatter_add_(1, ids, torch.ones_like(ids))
    offsets = torch.cat([torch.zeros_like(sizes[:, :1]), sizes[:, :-1].cumsum(1)], dim=1)
    return tile_order(m, n, valid, p, block=side), offsets.int()


@triton.jit
def block_span(BLOCKS, j, p, side):
    """Block j (BLOCKS: one model's block_order offsets): its slots [start, end) and its first rows of U (row_m)
    and V (row_n); blocks run row by row over the (m, n) table."""
    blocks = tl.cdiv(p, side)
    return tl.load(BLOCKS + j), tl.load(BLOCKS + j + 1), (j // blocks) * side, (j % blocks) * side


@triton.jit
def block_rows(U, row0, k, mask_k, p, side, stride, WINDOW: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Rows [row0, row0 + side) of U (one model's) at neurons k, one block's rows: a (WINDOW, K) tile, or (K, WINDOW)
    if TRANSPOSED (k then (K, 1), else (1, K)); rows past the block or p are 0."""
    offs_w = tl.arange(0, WINDOW)
    inside = (offs_w < side) & (row0 + offs_w < p)
    if TRANSPOSED:
        return tl.load(U + (row0 + offs_w)[None, :] * stride + k, mask=mask_k & inside[None, :], other=0.0)
    else:
        return tl.load(U + (row0 + offs_w)[:, None] * stride + k, mask=inside[:, None] & mask_k, other=0.0)


@triton.jit
def gathered_preactivation(u, v, m, n, row_m, row_n, k, mask, WINDOW: tl.constexpr, TRANSPOSED: tl.constexpr):
    """hidden.preactivation of a tile inside one block, from the block's rows of U and V (`block_rows` from row_m
    and row_n): each example's row is gathered on chip instead of loaded from memory on its own, so a tile of 64
    examples reads 2 x 25 rows (p 97) instead of 2 x 64, and the backward, whose neurons stay fixed over a block,
    reads them once per block. Tiles are (D, K) with m, n (D, 1) and k (1, K); TRANSPOSED: (K, D), m, n (1, D),
    k (K, 1). mask: the tile's valid entries."""
    # each example's row in the window, broadcast to the tile's shape (k * 0) and kept inside it on masked slots
    at_m = tl.minimum(tl.maximum(m - row_m, 0), WINDOW - 1) + k * 0
    at_n = tl.minimum(tl.maximum(n - row_n, 0), WINDOW - 1) + k * 0
    if TRANSPOSED:
        pre = tl.gather(u, at_m, 1) + tl.gather(v, at_n, 1)
    else:
        pre = tl.gather(u, at_m, 0) + tl.gather(v, at_n, 0)
    return tl.where(mask, pre, 0.0)


@triton.jit
def _block_forward_kernel(
    # pointers (BLOCKS: block_order's offsets)
    U, V, WT, M, N_, Y, COUNT, BITS, INV_KEEP, G, LOSS, PRED, BLOCKS,
    # sizes
    p, width, side,
    # strides (stride_tp: WT's padded row, a multiple of 16)
    stride_ub, stride_up, stride_vb, stride_vp, stride_tb, stride_tp, stride_ib, stride_gb, stride_gd, stride_bb,
    # meta-parameters
    ACT: tl.constexpr, LOSS_KIND: tl.constexpr, TRAIN: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    ALIGN_N: tl.constexpr, ALIGN_P: tl.constexpr,
):
    width, stride_ub, stride_up, stride_vb, stride_vp, stride_gb, stride_gd = aligned_rows(
        width, stride_ub, stride_up, stride_vb, stride_vp, stride_gb, stride_gd, ALIGN_N, ALIGN_P)
    b, count, inv_keep, BITS = model_constants(COUNT, INV_KEEP, BITS, width, stride_ib, DROPOUT)
    # Axis 0 walks the blocks of the (m, n) table, block j's examples from slot BLOCKS[b, j] to BLOCKS[b, j + 1]:
    # every tile of a block reads its U and V rows from one window of WINDOW rows each
    start, end, row_m, row_n = block_span(BLOCKS + b * stride_bb, tl.program_id(0), p, side)
    for d0 in range(start, end, BLOCK_D):
        offs_d, mask_d, m, n = tile_slots(M + b * stride_ib, N_ + b * stride_ib, d0, end, BLOCK_D)
        y = tl.load(Y + b * stride_ib + offs_d, mask=mask_d, other=0)
        offs_p = tl.arange(0, BLOCK_P)
        mask_p = offs_p < p
        out = tl.zeros((BLOCK_D, BLOCK_P), dtype=tl.float32)
        for k0 in range(0, width, BLOCK_N):
            offs_k = k0 + tl.arange(0, BLOCK_N)
            mask_k = offs_k < width
            u = block_rows(U + b * stride_ub, row_m, offs_k[None, :], mask_k[None, :], p, side, stride_up, WINDOW,
                           False)
            v = block_rows(V + b * stride_vb, row_n, offs_k[None, :], mask_k[None, :], p, side, stride_vp, WINDOW,
                           False)
            pre = gathered_preactivation(u, v, m[:, None], n[:, None], row_m, row_n, offs_k[None, :],
                                         mask_d[:, None] & mask_k[None, :], WINDOW, False)
            if DROPOUT:
                pre = pre * dropout_scale(BITS, offs_d[:, None], offs_k[None, :], k0, mask_d[:, None], width,
                                          stride_ib, inv_keep, BLOCK_N)
            out += output_chunk(activation(pre, ACT), WT + b * stride_tb, offs_p, mask_p, offs_k, stride_tp, PRECISION)
        loss_head(out, y, offs_d, mask_d, offs_p, mask_p, p, count, LOSS + b * stride_ib, G + b * stride_gb,
                  PRED + b * stride_ib, stride_gd, LOSS_KIND, TRAIN)


@triton.jit
def _block_backward_kernel(
    # pointers (BLOCKS: block_order's offsets)
    U, V, W, M, N_, COUNT, BITS, INV_KEEP, G, DU, DV, DW, BLOCKS,
    # sizes
    p, width, side,
    # strides (dU, dV, dW share U, V, W's layout)
    stride_ub, stride_up, stride_vb, stride_vp, stride_wb, stride_wn, stride_ib, stride_gb, stride_gd, stride_bb,
    # meta-parameters
    ACT: tl.constexpr, DROPOUT: tl.constexpr, WITH_W: tl.constexpr, PRECISION: tl.constexpr,
    G_TWICE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    ALIGN_N: tl.constexpr, ALIGN_P: tl.constexpr,
):
    # dU and dV, and dW too if WITH_W (fused). Axis 0 walks one model's neuron chunks, as the default backward.
    width, stride_ub, stride_up, stride_vb, stride_vp, stride_gb, stride_gd = aligned_rows(
        width, stride_ub, stride_up, stride_vb, stride_vp, stride_gb, stride_gd, ALIGN_N, ALIGN_P)
    b, count, inv_keep, BITS = model_constants(COUNT, INV_KEEP, BITS, width, stride_ib, DROPOUT)
    k0, offs_k, mask_k = neuron_chunk(width, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    mask_kp = mask_k[:, None] & (offs_p < p)[None, :]
    w = tl.load(W + b * stride_wb + offs_k[:, None] * stride_wn + offs_p[None, :], mask=mask_kp, other=0.0)
    d_w = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    blocks = tl.cdiv(p, side)
    offs_w = tl.arange(0, WINDOW)
    for j in range(0, blocks * blocks):
        start, end, row_m, row_n = block_span(BLOCKS + b * stride_bb, j, p, side)
        # the block's rows of U and V at this chunk's neurons, read once for all its tiles
        u = block_rows(U + b * stride_ub, row_m, offs_k[:, None], mask_k[:, None], p, side, stride_up, WINDOW, True)
        v = block_rows(V + b * stride_vb, row_n, offs_k[:, None], mask_k[:, None], p, side, stride_vp, WINDOW, True)
        d_u = tl.zeros((BLOCK_N, WINDOW), dtype=tl.float32)
        d_v = tl.zeros((BLOCK_N, WINDOW), dtype=tl.float32)
        for d0 in range(start, end, BLOCK_D):
            # one tile of examples [d0, d0 + BLOCK_D), transposed: (BLOCK_N, BLOCK_D)
            offs_d, mask_d, m, n = tile_slots(M + b * stride_ib, N_ + b * stride_ib, d0, end, BLOCK_D)
            g = g_tile(G + b * stride_gb, offs_d, mask_d, offs_p, stride_gd)
            mask_dk = mask_k[:, None] & mask_d[None, :]
            pre = gathered_preactivation(u, v, m[None, :], n[None, :], row_m, row_n, offs_k[:, None], mask_dk,
                                         WINDOW, True)
            if DROPOUT:
                pre = pre * dropout_scale(BITS, offs_d[None, :], offs_k[:, None], k0, mask_d[None, :], width,
                                          stride_ib, inv_keep, BLOCK_N)
            if WITH_W:
                d_w += dot(activation(pre, ACT), g, PRECISION)
            if G_TWICE:  # (fused: G already feeds dW's dot)
                # G's tile read again, as (P, D). In tf32 the tensor cores take each operand from shared memory
                # contiguous along the summed dimension, so the two dots need G in two layouts (dW: along examples,
                # dS: along p, in either orientation of either dot), and a load feeding two layouts, or a shared and
                # a register operand, the compiler neither copies asynchronously nor pipelines: it waits for g on
                # every tile (G_TWICE False). One load per dot it does, at twice G's bytes from L2; which is faster
                # is the GPU's to say (bench/sweep_blocks.py). bf16 operands may be transposed in shared memory, so
                # one copy serves both; fp32's IEEE dots take theirs from registers, and so, split in two, do
                # tf32x3's (one load, pipelined at 64 neurons: bench/results/kernel-resources-*.txt, "fused block"
                # tf32x3).
                g_t = tl.load(G + b * stride_gb + offs_d[None, :] * stride_gd + offs_p[:, None],
                              mask=mask_d[None, :] & (offs_p < stride_gd)[:, None], other=0.0)
                d_h = dot(w, g_t, PRECISION)
            else:
                d_h = dot(w, tl.trans(g), PRECISION)
            d_s_t = hidden_grad(d_h, pre, mask_dk, inv_keep, ACT, DROPOUT)
            d_u += dot(d_s_t, tl.where((m - row_m)[:, None] == offs_w[None, :], 1.0, 0.0), PRECISION)
            d_v += dot(d_s_t, tl.where((n - row_n)[:, None] == offs_w[None, :], 1.0, 0.0), PRECISION)
        _add_window(DU + b * stride_ub, row_m, d_u, offs_w, side, offs_k, mask_k, p, stride_up)
        _add_window(DV + b * stride_vb, row_n, d_v, offs_w, side, offs_k, mask_k, p, stride_vp)
        # the compiler may store an element from another thread than the one that loads it next block
        tl.debug_barrier()
    if WITH_W:
        tl.store(DW + b * stride_wb + offs_k[:, None] * stride_wn + offs_p[None, :], d_w, mask=mask_kp)


@triton.jit
def _add_window(OUT, row0, acc, offs_w, side, offs_k, mask_k, p, stride):
    """OUT[row0 + w, k] += acc[k, w] for a block's own rows (w < side)."""
    rows = row0 + offs_w
    mask = mask_k[:, None] & ((offs_w < side) & (rows < p))[None, :]
    ptrs = OUT + rows[None, :] * stride + offs_k[:, None]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)


# Defaults, not measured: chosen from the compiler's report (sm_90, Triton 3.6 and 3.9,
# bench/results/kernel-resources-sm90-triton*.txt): with tiles of 32 examples every dot stays on wgmma and two
# programs fit an SM; fused in tf32 and bf16 like the windowed step. In tf32 the fused kernel reads each tile of G
# twice (G_TWICE in _block_backward_kernel): two pipeline stages keep it at two programs an SM (107 KB of shared
# memory; three stages: 140 KB, one). bench/sweep_blocks.py decides.
BLOCK_STEP = {"tf32": {"fused": True, "block_d": 32, "num_warps": 4, "num_stages": 2},
              "tf32x3": {"block_d": 32, "num_warps": 4}, "bf16": {"fused": True, "block_d": 32, "num_warps": 4}}
# Precisions in which the fused block backward reads each tile of G twice unless told not to (g_twice): tf32
# only; fp32, tf32x3 and bf16 pipeline their one load.
G_TWICE_PRECISIONS = ("tf32",)


def default_step(precision: str) -> tuple[bool, dict]:
    """(fused, tiles) of the block backward at `precision` unless told otherwise (BLOCK_STEP over
    backward.TILES)."""
    step = BLOCK_STEP.get(precision, {})
    return step.get("fused", False), {**backward_module.TILES, **{k: v for k, v in step.items() if k != "fused"}}


def forward(U, V, W, m, n, y, count, blocks, *, act: int, loss: int, precision: str, train: bool,
            dropout: tuple | None = None, block_d: int = forward_module.TILES["block_d"],
            block_n: int = forward_module.TILES["block_n"], num_warps: int = forward_module.TILES["num_warps"]):
    """kernels/forward.py's forward for examples in block_order, whose offsets are `blocks`: launched over
    (blocks of the (m, n) table, B). The same results, in the same slots."""
    results, per_model, sizes, strides, meta = forward_module.arguments(
        U, V, W, m, n, y, count, act=act, loss=loss, precision=precision, train=train, dropout=dropout,
        block_d=block_d, block_n=block_n, num_warps=num_warps)
    B, p, _ = U.shape
    assert blocks.shape == (B, block_count(p) ** 2 + 1) and blocks.dtype == torch.int32, "block_order's offsets"
    layout.launch(_block_forward_kernel, block_count(p) ** 2, B, (*per_model, blocks), *sizes, block_side(p),
                  *strides, blocks.stride(0), **meta)
    return results


def backward(U, V, W, m, n, count, G, blocks, *, act: int, precision: str, dropout: tuple | None = None,
             fused: bool = False, block_d: int = backward_module.TILES["block_d"],
             block_n: int = backward_module.TILES["block_n"], num_warps: int = backward_module.TILES["num_warps"],
             num_stages: int | None = None, g_twice: bool = True):
    """kernels/backward.py's backward for examples in block_order, whose offsets are `blocks`: dU, dV (B, p, N)
    and dW (B, N, p). fused: one launch of the block kernel for all three; else the default kernel's dW launch
    and the block kernel's dU, dV. g_twice: the fused kernel in G_TWICE_PRECISIONS reads each tile of G twice,
    so that both loads are pipelined; False reads it once and waits for it."""
    grads, per_model, sizes, strides, meta = backward_module.arguments(
        U, V, W, m, n, count, G, act=act, precision=precision, dropout=dropout, block_d=block_d, block_n=block_n,
        num_warps=num_warps, num_stages=num_stages)
    B, p, width = U.shape
    assert blocks.shape == (B, block_count(p) ** 2 + 1) and blocks.dtype == torch.int32, "block_order's offsets"
    if not fused:  # dW needs no scatter: the default kernel's launch
        backward_module.launch_pass(per_model, sizes, strides, meta, with_w=True, with_uv=False)
    g_twice = g_twice and fused and precision in G_TWICE_PRECISIONS
    layout.launch(_block_backward_kernel, layout.cdiv(width, meta["BLOCK_N"]), B, (*per_model, blocks), *sizes,
                  block_side(p), *strides, blocks.stride(0), WITH_W=fused, G_TWICE=g_twice, **meta)
    return grads
