"""Backward pass of a population: dW, dU and dV, one program per (model, chunk of BLOCK_N hidden neurons).

    dW[b, k, :] = sum_d h[d, k] G[d, :]                                       (BLOCK_N, P)
    dS[d, k]    = (G[d, :] . W[b, k, :]) phi'(pre[d, k]) dropout[d, k]        (BLOCK_D, BLOCK_N)
    dU[b, :, k] = onehot(m)^T dS,   dV[b, :, k] = onehot(n)^T dS              (P, BLOCK_N)

Each program owns its chunk of dW, dU and dV and loops over all of its model's examples, so the scatter of the
one-hot first layer needs no atomics: no race, bit-identical results run to run. Two ways to scatter
(SCATTERS: WINDOW, BLOCKED); a third, one-hot dots over all P rows per tile (2 x 2 D N P FLOPs beyond the textbook
6 D N p), lost to the windowed one at every tile on an H100 and was removed (bench/NOTES.md, "Measured"):

- "window" (16): the examples arrive in 16 x 16 blocks of the (m, n) table (TritonBackend sorts them), so a tile
  touches few rows; one-hot dots over windows of WINDOW rows from the tile's smallest index are added to the
  program's own rows of dU, dV in global memory (zeroed before), with a barrier between tiles. About 2 D N
  (2 WINDOW) FLOPs: a quarter or less of the full dots, for a read-modify-write of each window. Any example order
  gives the right result; tile_order makes it cheap. The window loop sits inside the example loop, which stops
  the compiler from software-pipelining the example loop's loads.
- "block" (32, BLOCKED): the examples arrive grouped by side x side blocks of the table (block_order, side <= 32),
  with each block's slot range; a block's tiles touch one static window of 32 rows of dU and of dV, summed in
  registers and added once per block (a barrier per block, not per tile). The tile loop holds no loop, so its
  loads are pipelined; tiles are transposed (neurons x examples) so that every dot has BLOCK_N rows (wgmma) even
  with 32-example tiles. The block's rows of U and V at the program's neurons are read once per block and each
  example's row gathered from them on chip (hidden.gathered_preactivation), not loaded per example.

The pre-activation is recomputed from U and V (cheap gathers) instead of being stored. `WITH_W` / `WITH_UV`
split the work into two launches (smaller register footprint) or fuse it into one. bench/NOTES.md has the budget.
"""

import torch
import triton
import triton.language as tl

from fastgrok.kernels import layout
from fastgrok.kernels.hidden import (BLOCK_WINDOW, activation, activation_grad, aligned, block_count, block_rows,
                                     block_side, block_span, dot, dropout_scale, gathered_preactivation, model_bits,
                                     preactivation)


@triton.jit
def _backward_kernel(
    # pointers
    U, V, W, M, N_, COUNT, BLOCKS, BITS, INV_KEEP, G, DU, DV, DW,
    # sizes
    p, width, side,
    # strides (dU, dV, dW share U, V, W's layout)
    stride_ub, stride_up, stride_vb, stride_vp, stride_wb, stride_wn, stride_ib, stride_bb, stride_gb, stride_gd,
    # meta-parameters
    ACT: tl.constexpr, DROPOUT: tl.constexpr, WITH_W: tl.constexpr, WITH_UV: tl.constexpr,
    PRECISION: tl.constexpr, WINDOW: tl.constexpr, BLOCKED: tl.constexpr, G_TWICE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, ALIGN_N: tl.constexpr, ALIGN_P: tl.constexpr,
):
    # Axis 0 walks one model's neuron chunks, so consecutive programs re-read the same G[b] from L2.
    b = tl.program_id(1).to(tl.int64)
    # rows of N and of G's padded p are 16-byte aligned: tell the compiler (kernels/forward.py)
    width = aligned(width, ALIGN_N)
    stride_ub, stride_up = aligned(stride_ub, ALIGN_N), aligned(stride_up, ALIGN_N)
    stride_vb, stride_vp = aligned(stride_vb, ALIGN_N), aligned(stride_vp, ALIGN_N)
    stride_gb, stride_gd = aligned(stride_gb, ALIGN_P), aligned(stride_gd, ALIGN_P)
    count = tl.load(COUNT + b)
    k0 = tl.program_id(0) * BLOCK_N
    offs_k = k0 + tl.arange(0, BLOCK_N)
    mask_k = offs_k < width
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < p
    mask_kp = mask_k[:, None] & mask_p[None, :]
    inv_keep = count  # unused without dropout
    if DROPOUT:
        inv_keep = tl.load(INV_KEEP + b)
        BITS = model_bits(BITS, b, width, stride_ib)
    w = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    if WITH_UV:
        w = tl.load(W + b * stride_wb + offs_k[:, None] * stride_wn + offs_p[None, :], mask=mask_kp, other=0.0)
    d_w = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    if BLOCKED:
        # Examples come grouped by blocks of side x side pairs of the (m, n) table, block j's slots from
        # BLOCKS[b, j] to BLOCKS[b, j + 1]; a block touches rows [i side, i side + side) of dU and of dV only, so
        # its scatter is one static window of each, summed in registers over the block's tiles (transposed, so
        # that the dot has BLOCK_N rows, wgmma's minimum of 64) and added to dU, dV once. The inner loop holds no
        # other loop, so the compiler can software-pipeline its loads (the windowed scatter's loop it does not).
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
                m, n, mask_d, d_w, d_s_t = _tile(U, V, M, N_, BITS, G, b, d0, end, k0, offs_k, mask_k, offs_p, w,
                                                 d_w, p, width, inv_keep, stride_ub, stride_up, stride_vb, stride_vp,
                                                 stride_ib, stride_gb, stride_gd, u, v, row_m, row_n, ACT, DROPOUT,
                                                 WITH_W, WITH_UV, PRECISION, G_TWICE, BLOCK_D, BLOCK_N, WINDOW)
                if WITH_UV:
                    onehot_m = tl.where((m - row_m)[:, None] == offs_w[None, :], 1.0, 0.0)
                    onehot_n = tl.where((n - row_n)[:, None] == offs_w[None, :], 1.0, 0.0)
                    d_u += dot(d_s_t, onehot_m, PRECISION)
                    d_v += dot(d_s_t, onehot_n, PRECISION)
            if WITH_UV:
                _add_window(DU + b * stride_ub, row_m, d_u, offs_w, side, offs_k, mask_k, p, stride_up)
                _add_window(DV + b * stride_vb, row_n, d_v, offs_w, side, offs_k, mask_k, p, stride_vp)
                # the compiler may store an element from another thread than the one that loads it next block
                tl.debug_barrier()
    else:
        for d0 in range(0, count, BLOCK_D):
            m, n, mask_d, d_w, d_s = _tile(U, V, M, N_, BITS, G, b, d0, count, k0, offs_k, mask_k, offs_p, w, d_w,
                                           p, width, inv_keep, stride_ub, stride_up, stride_vb, stride_vp, stride_ib,
                                           stride_gb, stride_gd, w, w, 0, 0, ACT, DROPOUT, WITH_W, WITH_UV,
                                           PRECISION, False, BLOCK_D, BLOCK_N, 0)
            if WITH_UV:
                _add_rows(DU + b * stride_ub, m, mask_d, d_s, offs_k, mask_k, p, stride_up, PRECISION, WINDOW)
                _add_rows(DV + b * stride_vb, n, mask_d, d_s, offs_k, mask_k, p, stride_vp, PRECISION, WINDOW)
                tl.debug_barrier()  # the next tile's windows may overlap these rows, held by other threads
    if WITH_W:
        tl.store(DW + b * stride_wb + offs_k[:, None] * stride_wn + offs_p[None, :], d_w, mask=mask_kp)


@triton.jit
def _tile(U, V, M, N_, BITS, G, b, d0, end, k0, offs_k, mask_k, offs_p, w, d_w, p, width, inv_keep, stride_ub,
          stride_up, stride_vb, stride_vp, stride_ib, stride_gb, stride_gd, u, v, row_m, row_n, ACT: tl.constexpr,
          DROPOUT: tl.constexpr, WITH_W: tl.constexpr, WITH_UV: tl.constexpr, PRECISION: tl.constexpr,
          G_TWICE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """One tile of examples [d0, d0 + BLOCK_D) (those before `end`) at neurons offs_k (BLOCK_N of them from k0):
    its rows m, n and mask, d_w plus the tile's dW, and its dS (zero on masked examples; unset without WITH_UV) as
    (BLOCK_D, BLOCK_N). WINDOW > 0 (the block scatter): the tile lies in one block, whose rows of U and V from
    row_m, row_n are u, v (hidden.block_rows), and it is transposed, dS (BLOCK_N, BLOCK_D): then every dot has
    BLOCK_N rows, so BLOCK_D may be 32 and the dots stay on wgmma. G_TWICE (block scatter, fused, tf32): the dS
    dot reads G's tile again (below). BITS: model b's dropout bits (kernels/dropout.py)."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < end
    m = tl.load(M + b * stride_ib + offs_d, mask=mask_d, other=0)
    n = tl.load(N_ + b * stride_ib + offs_d, mask=mask_d, other=0)
    # G's rows are zero past p up to their padded length stride_gd, so the mask on p can be one the compiler
    # sees is constant over 16-byte vectors
    g = tl.load(G + b * stride_gb + offs_d[:, None] * stride_gd + offs_p[None, :],
                mask=mask_d[:, None] & (offs_p < stride_gd)[None, :], other=0.0)
    if WINDOW > 0:  # transposed
        ds, ks, mask_ds = offs_d[None, :], offs_k[:, None], mask_d[None, :]
        mask_dk = mask_k[:, None] & mask_ds
        pre = gathered_preactivation(u, v, m[None, :], n[None, :], row_m, row_n, ks, mask_dk, WINDOW, True)
    else:
        ds, ks, mask_ds = offs_d[:, None], offs_k[None, :], mask_d[:, None]
        mask_dk = mask_ds & mask_k[None, :]
        pre = preactivation(U + b * stride_ub, V + b * stride_vb, m[:, None], n[:, None], ks, mask_dk, stride_up,
                            stride_vp)
    if DROPOUT:
        pre = pre * dropout_scale(BITS, ds, ks, k0, mask_ds, width, stride_ib, inv_keep, BLOCK_N)
    if WITH_W:
        if WINDOW > 0:  # transposed
            d_w += dot(activation(pre, ACT), g, PRECISION)
        else:
            d_w += dot(tl.trans(activation(pre, ACT)), g, PRECISION)
    d_s = pre  # placeholder without WITH_UV
    if WITH_UV:
        if G_TWICE:  # G already feeds dW's dot
            # G's tile read again, as (P, D). In tf32 the tensor cores take each operand from shared memory
            # contiguous along the summed dimension, so the two dots need G in two layouts (dW: along examples,
            # dS: along p, in either orientation of either dot), and a load feeding two layouts, or a shared and
            # a register operand, the compiler neither copies asynchronously nor pipelines: it waits for g on
            # every tile (G_TWICE False). One load per dot it does, at twice G's bytes from L2; which is faster is
            # the GPU's to say (bench/sweep_blocks.py). bf16 operands may be transposed in shared memory, so one
            # copy serves both; fp32's IEEE dots take theirs from registers, and so, split in two, do tf32x3's
            # (one load, pipelined at 64 neurons: bench/results/kernel-resources-*.txt, "fused block" tf32x3).
            g_t = tl.load(G + b * stride_gb + offs_d[None, :] * stride_gd + offs_p[:, None],
                          mask=mask_d[None, :] & (offs_p < stride_gd)[:, None], other=0.0)
            d_s = dot(w, g_t, PRECISION)
        elif WINDOW > 0:
            d_s = dot(w, tl.trans(g), PRECISION)
        else:
            d_s = dot(g, tl.trans(w), PRECISION)
        d_s = d_s * activation_grad(pre, ACT)
        if DROPOUT:
            # dS carries the mask's factor once more: a dropped unit's pre is 0, where both activations' derivative
            # is 0 already, so only the kept units' 1 / (1 - rate) is left, a scalar (no mask tile kept across the
            # dots)
            d_s = d_s * inv_keep
        d_s = tl.where(mask_dk, d_s, 0.0)  # (masked neurons have zero rows of w: their dS is zero already)
    return m, n, mask_d, d_w, d_s


@triton.jit
def _add_window(OUT, row0, acc, offs_w, side, offs_k, mask_k, p, stride):
    """OUT[row0 + w, k] += acc[k, w] for a block's own rows (w < side)."""
    rows = row0 + offs_w
    mask = mask_k[:, None] & ((offs_w < side) & (rows < p))[None, :]
    ptrs = OUT + rows[None, :] * stride + offs_k[:, None]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit
def _add_rows(OUT, rows, mask_d, d_s, offs_k, mask_k, p, stride, PRECISION: tl.constexpr, WINDOW: tl.constexpr):
    """OUT[rows[d], k] += d_s[d, k] for the tile, a window of WINDOW rows at a time from its smallest row."""
    lo = tl.min(tl.where(mask_d, rows, p), axis=0)
    hi = tl.max(tl.where(mask_d, rows, -1), axis=0)
    for w0 in range(lo, hi + 1, WINDOW):
        offs_w = w0 + tl.arange(0, WINDOW)
        onehot = tl.where(rows[:, None] == offs_w[None, :], 1.0, 0.0)
        ptrs = OUT + offs_w[:, None] * stride + offs_k[None, :]
        mask = (offs_w < p)[:, None] & mask_k[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + dot(tl.trans(onehot), d_s, PRECISION), mask=mask)


# Scatters (module docstring) and their window of dU/dV rows. "block" needs its examples in block_order.
SCATTERS = {"window": 16, "block": BLOCK_WINDOW}
# Default tiles: 64 neurons (dW's rows) and 64 examples (dS's rows) put both dots on Hopper's wgmma, without
# spills in tf32 or bf16 with the windowed scatter and 8 warps (bench/results/kernel-resources-sm90-triton3.9.txt);
# a chunk of 64 neurons also halves the re-reads of G against 32.
TILES = {"block_d": 64, "block_n": 64, "num_warps": 8}
# Measured on an H100 (bench/results/h100-2026-11-22/sweep.json, N 512, B 1024): in tf32 one fused launch at
# 4 warps beats two launches at 8 (36.7k against 23.5k model-steps/s) although ptxas reports 408 B of spills.
# fp32 (IEEE dots spill heavily): two launches at 8 warps, 3.6k (fused 0.8k); tf32x3: two launches at 4 warps,
# 9.8k; bf16: one fused launch at 8 warps, 16.9k (two at 8: 9.5k). bench/results/h100-2026-11-22/backward-defaults.log
STEP = {"tf32": {"fused": True, "num_warps": 4}, "tf32x3": {"num_warps": 4}, "bf16": {"fused": True, "num_warps": 8}}
# The block scatter, not yet measured: chosen from the compiler's report (sm_90, Triton 3.6 and 3.9,
# bench/results/kernel-resources-sm90-triton*.txt): with tiles of 32 examples every dot stays on wgmma and
# two programs fit an SM; fused in tf32 and bf16 like the windowed step. In tf32 the fused kernel copies G
# twice per tile (_tile): two pipeline stages keep it at two programs an SM (107 KB of shared memory; three
# stages: 140 KB, one). bench/sweep_blocks.py decides.
# Precisions in which the fused block backward reads each tile of G twice unless told not to (g_twice, _tile):
# tf32 only; fp32, tf32x3 and bf16 pipeline their one load.
G_TWICE_PRECISIONS = ("tf32",)
BLOCK_STEP = {"tf32": {"fused": True, "block_d": 32, "num_warps": 4, "num_stages": 2},
              "tf32x3": {"block_d": 32, "num_warps": 4}, "bf16": {"fused": True, "block_d": 32, "num_warps": 4}}


def default_step(precision: str, scatter: str = "window") -> tuple[bool, dict]:
    """(fused, tiles) of the backward the Triton step runs at `precision` with `scatter` unless told otherwise."""
    step = (BLOCK_STEP if scatter == "block" else STEP).get(precision, {})
    return step.get("fused", False), {**TILES, **{k: v for k, v in step.items() if k != "fused"}}


def backward(U, V, W, m, n, count, G, *, act: int, precision: str, dropout: tuple | None = None,
             fused: bool = False, scatter: str = "window", blocks: torch.Tensor | None = None,
             block_d: int = TILES["block_d"], block_n: int = TILES["block_n"], num_warps: int = TILES["num_warps"],
             num_stages: int | None = None, g_twice: bool = True):
    """Gradients dU, dV (B, p, N) and dW (B, N, p) of the loss whose output gradient is G (B, Dmax, p): contiguous,
    or the forward's view of rows padded with zeros to layout.g_row(p, precision). U, V, W fp32; G fp32, or bf16
    in bf16 (the forward's, layout.g_dtype: the dots would round it to bf16 anyway). dropout: None, or the
    step's masks (kernels/dropout.py masks), those the forward used.

    scatter: "window" (any example order gives the right result; tile_order makes it cheap) or "block"
    (examples in block_order, whose block offsets `blocks` it needs).
    num_stages: the depth of the software pipeline of loads (None: Triton's default). The tiles are those for
    p <= 128; a larger p shrinks them (layout.fit). g_twice: the fused block backward in tf32 reads each tile
    of G twice, so that both loads are pipelined (_tile); False reads it once and waits for it."""
    B, p, width = U.shape
    row = G.stride(1)
    assert G.shape == (B, m.shape[1], p) and G.stride(2) == 1 and row in (p, layout.g_row(p, precision))
    assert G.stride(0) == m.shape[1] * row and W.dtype == torch.float32
    assert G.dtype in (torch.float32, layout.g_dtype(precision)), "G in bf16 only for bf16 dots"
    window = SCATTERS[scatter]
    blocked = scatter == "block"
    assert not blocked or (blocks is not None and blocks.shape == (B, block_count(p) ** 2 + 1)), "block_order's offsets"
    if not blocked:
        blocks = count  # unused placeholder
    dW = torch.empty_like(W)
    dU, dV = torch.zeros_like(U), torch.zeros_like(V)  # both scatters add into them
    bits, inv_keep = dropout if dropout is not None else (count, count)  # unused placeholders
    assert dropout is None or bits.shape == (B, layout.words(width), m.shape[1]), "kernels/dropout.py masks"
    passes = [(True, True)] if fused else [(True, False), (False, True)]
    block_d, block_n = layout.fit(block_d, block_n, p)
    stages = {} if num_stages is None else {"num_stages": num_stages}
    for with_w, with_uv in passes:
        layout.launch(
            _backward_kernel, layout.cdiv(width, block_n), B,
            (U, V, W, m, n, count, blocks, bits, inv_keep, G, dU, dV, dW),
            p, width, block_side(p),
            U.stride(0), U.stride(1), V.stride(0), V.stride(1), W.stride(0), W.stride(1), m.stride(0),
            blocks.stride(0), G.stride(0), G.stride(1),
            ACT=act, DROPOUT=dropout is not None, WITH_W=with_w, WITH_UV=with_uv, PRECISION=precision,
            WINDOW=window, BLOCKED=blocked and with_uv, BLOCK_D=block_d, BLOCK_N=block_n,
            G_TWICE=g_twice and blocked and with_w and with_uv and precision in G_TWICE_PRECISIONS,
            BLOCK_P=layout.block_p(p), num_warps=num_warps, **stages,
            ALIGN_N=layout.alignment(width, *U.stride()[:2], *V.stride()[:2]),
            ALIGN_P=layout.alignment(G.stride(0), G.stride(1)),
        )
    return dU, dV, dW


def tile_order(m: torch.Tensor, n: torch.Tensor, valid: torch.Tensor, p: int, block: int = 16) -> torch.Tensor:
    """(B, Dmax) permutations of each model's examples that walk the (m, n) table in block x block squares
    (row by row inside one), padding last: a tile of consecutive examples then spans few rows of dU and of dV."""
    blocks = layout.cdiv(p, block)
    key = ((m // block) * blocks + n // block) * (p * p) + m * p + n
    return torch.argsort(torch.where(valid, key, torch.iinfo(key.dtype).max), dim=1, stable=True)


def block_order(m: torch.Tensor, n: torch.Tensor, valid: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tile_order over the "block" scatter's blocks, and the (B, blocks^2 + 1) int32 offsets of each block's
    first slot in that order (the last: the model's example count)."""
    side, blocks = block_side(p), block_count(p)
    ids = torch.where(valid, (m // side) * blocks + n // side, blocks * blocks)
    sizes = torch.zeros(m.shape[0], blocks * blocks + 1, dtype=torch.int64, device=m.device).scatter_add_(1, ids, torch.ones_like(ids))
    offsets = torch.cat([torch.zeros_like(sizes[:, :1]), sizes[:, :-1].cumsum(1)], dim=1)
    return tile_order(m, n, valid, p, block=side), offsets.int()
