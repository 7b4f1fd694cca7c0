"""Backward pass of a population: dW, dU and dV, one program per (model, chunk of BLOCK_N hidden neurons).

    dW[b, k, :] = sum_d h[d, k] G[d, :]                                       (BLOCK_N, P)
    dS[d, k]    = (G[d, :] . W[b, k, :]) phi'(pre[d, k]) dropout[d, k]        (BLOCK_D, BLOCK_N)
    dU[b, :, k] = onehot(m)^T dS,   dV[b, :, k] = onehot(n)^T dS              (P, BLOCK_N)

Each program owns its chunk of dW, dU and dV and loops over all of its model's examples, so the scatter of the
one-hot first layer needs no atomics: no race, bit-identical results run to run.

The scatter is windowed: the examples arrive in 16 x 16 blocks of the (m, n) table (tile_order; TritonBackend
sorts them), so a tile touches few rows; one-hot dots over windows of WINDOW rows from the tile's smallest index
are added to the program's own rows of dU, dV in global memory (zeroed before), with a barrier between tiles.
About 2 D N (2 WINDOW) FLOPs: a quarter or less of one-hot dots over all P rows per tile (2 x 2 D N P FLOPs beyond
the textbook 6 D N p), which lost to it at every tile on an H100 (docs/performance.md). Any example order gives
the right result; tile_order makes it cheap. The window loop sits inside the example loop, which stops the
compiler from software-pipelining the example loop's loads; kernels/block.py holds an alternative whose loop it
can pipeline, not yet measured.

The pre-activation is recomputed from U and V (cheap gathers) instead of being stored. `WITH_W` / `WITH_UV`
split the work into two launches (smaller register footprint) or fuse it into one. docs/performance.md has the
budget.
"""

import torch
import triton
import triton.language as tl

from fastgrok.kernels import layout
from fastgrok.kernels.hidden import (activation, aligned_rows, dot, dropout_scale, g_tile, hidden_grad,
                                     model_constants, neuron_chunk, preactivation, tile_slots)


@triton.jit
def _backward_kernel(
    # pointers
    U, V, W, M, N_, COUNT, BITS, INV_KEEP, G, DU, DV, DW,
    # sizes
    p, width,
    # strides (dU, dV, dW share U, V, W's layout)
    stride_ub, stride_up, stride_vb, stride_vp, stride_wb, stride_wn, stride_ib, stride_gb, stride_gd,
    # meta-parameters
    ACT: tl.constexpr, DROPOUT: tl.constexpr, WITH_W: tl.constexpr, WITH_UV: tl.constexpr,
    PRECISION: tl.constexpr, WINDOW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr, ALIGN_N: tl.constexpr, ALIGN_P: tl.constexpr,
):
    # Axis 0 walks one model's neuron chunks, so consecutive programs re-read the same G[b] from L2.
    width, stride_ub, stride_up, stride_vb, stride_vp, stride_gb, stride_gd = aligned_rows(
        width, stride_ub, stride_up, stride_vb, stride_vp, stride_gb, stride_gd, ALIGN_N, ALIGN_P)
    b, count, inv_keep, BITS = model_constants(COUNT, INV_KEEP, BITS, width, stride_ib, DROPOUT)
    k0, offs_k, mask_k = neuron_chunk(width, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < p
    mask_kp = mask_k[:, None] & mask_p[None, :]
    w = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    if WITH_UV:
        w = tl.load(W + b * stride_wb + offs_k[:, None] * stride_wn + offs_p[None, :], mask=mask_kp, other=0.0)
    d_w = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    for d0 in range(0, count, BLOCK_D):
        offs_d, mask_d, m, n = tile_slots(M + b * stride_ib, N_ + b * stride_ib, d0, count, BLOCK_D)
        g = g_tile(G + b * stride_gb, offs_d, mask_d, offs_p, stride_gd)
        mask_dk = mask_d[:, None] & mask_k[None, :]
        pre = preactivation(U + b * stride_ub, V + b * stride_vb, m[:, None], n[:, None], offs_k[None, :], mask_dk,
                            stride_up, stride_vp)
        if DROPOUT:
            pre = pre * dropout_scale(BITS, offs_d[:, None], offs_k[None, :], k0, mask_d[:, None], width, stride_ib,
                                      inv_keep, BLOCK_N)
        if WITH_W:
            d_w += dot(tl.trans(activation(pre, ACT)), g, PRECISION)
        if WITH_UV:
            d_s = hidden_grad(dot(g, tl.trans(w), PRECISION), pre, mask_dk, inv_keep, ACT, DROPOUT)
            _add_rows(DU + b * stride_ub, m, mask_d, d_s, offs_k, mask_k, p, stride_up, PRECISION, WINDOW)
            _add_rows(DV + b * stride_vb, n, mask_d, d_s, offs_k, mask_k, p, stride_vp, PRECISION, WINDOW)
            tl.debug_barrier()  # the next tile's windows may overlap these rows, held by other threads
    if WITH_W:
        tl.store(DW + b * stride_wb + offs_k[:, None] * stride_wn + offs_p[None, :], d_w, mask=mask_kp)


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


# Rows of dU, dV that one one-hot dot of the scatter adds to.
WINDOW = 16
# Default tiles: 64 neurons (dW's rows) and 64 examples (dS's rows) put both dots on Hopper's wgmma, without
# spills in tf32 or bf16 with 8 warps (bench/results/kernel-resources-sm90-triton3.9.txt); a chunk of 64 neurons
# also halves the re-reads of G against 32.
TILES = {"block_d": 64, "block_n": 64, "num_warps": 8}
# Measured on an H100 (bench/results/h100-2026-11-22/sweep.json, N 512, B 1024): in tf32 one fused launch at
# 4 warps beats two launches at 8 (36.7k against 23.5k model-steps/s) although ptxas reports 408 B of spills.
# fp32 (IEEE dots spill heavily): two launches at 8 warps, 3.6k (fused 0.8k); tf32x3: two launches at 4 warps,
# 9.8k; bf16: one fused launch at 8 warps, 16.9k (two at 8: 9.5k). bench/results/h100-2026-11-22/backward-defaults.log
STEP = {"tf32": {"fused": True, "num_warps": 4}, "tf32x3": {"num_warps": 4}, "bf16": {"fused": True, "num_warps": 8}}


def default_step(precision: str) -> tuple[bool, dict]:
    """(fused, tiles) of the backward the Triton step runs at `precision` unless told otherwise (STEP)."""
    step = STEP.get(precision, {})
    return step.get("fused", False), {**TILES, **{k: v for k, v in step.items() if k != "fused"}}


def arguments(U, V, W, m, n, count, G, *, act: int, precision: str, dropout: tuple | None, block_d: int,
              block_n: int, num_warps: int, num_stages: int | None):
    """What a backward kernel needs (this module's and kernels/block.py's): checks the shapes, allocates the
    gradients and returns them, (dU, dV, dW), with the kernel's per-model pointers, sizes, strides, and
    meta-parameters and launch options (the tiles fitted to p: layout.fit; num_stages None: Triton's default).
    The count stands in for dropout's pointers without dropout."""
    B, p, width = U.shape
    row = G.stride(1)
    assert G.shape == (B, m.shape[1], p) and G.stride(2) == 1 and row in (p, layout.g_row(p, precision))
    assert G.stride(0) == m.shape[1] * row and W.dtype == torch.float32
    assert G.dtype in (torch.float32, layout.g_dtype(precision)), "G in bf16 only for bf16 dots"
    dW = torch.empty_like(W)
    dU, dV = torch.zeros_like(U), torch.zeros_like(V)  # the scatters add into them
    bits, inv_keep = dropout if dropout is not None else (count, count)
    assert dropout is None or bits.shape == (B, layout.words(width), m.shape[1]), "kernels/dropout.py masks"
    per_model = (U, V, W, m, n, count, bits, inv_keep, G, dU, dV, dW)
    strides = (U.stride(0), U.stride(1), V.stride(0), V.stride(1), W.stride(0), W.stride(1), m.stride(0),
               G.stride(0), G.stride(1))
    block_d, block_n = layout.fit(block_d, block_n, p)
    stages = {} if num_stages is None else {"num_stages": num_stages}
    meta = dict(ACT=act, DROPOUT=dropout is not None, PRECISION=precision, BLOCK_D=block_d, BLOCK_N=block_n,
                BLOCK_P=layout.block_p(p), num_warps=num_warps, **stages,
                ALIGN_N=layout.alignment(width, *U.stride()[:2], *V.stride()[:2]),
                ALIGN_P=layout.alignment(G.stride(0), G.stride(1)))
    return (dU, dV, dW), per_model, (p, width), strides, meta


def launch_pass(per_model, sizes, strides, meta, *, with_w: bool, with_uv: bool) -> None:
    """One launch of this module's kernel over (cdiv(N, BLOCK_N), B), with `arguments`' pointers, sizes, strides
    and meta-parameters: dW (with_w), dU and dV (with_uv), or all three."""
    layout.launch(_backward_kernel, layout.cdiv(sizes[1], meta["BLOCK_N"]), per_model[0].shape[0], per_model, *sizes,
                  *strides, WITH_W=with_w, WITH_UV=with_uv, WINDOW=WINDOW, **meta)


def backward(U, V, W, m, n, count, G, *, act: int, precision: str, dropout: tuple | None = None,
             fused: bool = False, block_d: int = TILES["block_d"], block_n: int = TILES["block_n"],
             num_warps: int = TILES["num_warps"], num_stages: int | None = None):
    """Gradients dU, dV (B, p, N) and dW (B, N, p) of the loss whose output gradient is G (B, Dmax, p): contiguous,
    or the forward's view of rows padded with zeros to layout.g_row(p, precision). U, V, W fp32; G fp32, or bf16
    in bf16 (the forward's, layout.g_dtype: the dots would round it to bf16 anyway). dropout: None, or the step's
    masks (kernels/dropout.py masks), those the forward used. Any example order gives the right result;
    tile_order makes the scatter cheap.

    fused: one launch for all three gradients, else one for dW and one for dU, dV. num_stages: the depth of the
    software pipeline of loads (None: Triton's default). The tiles are those for p <= 128; a larger p shrinks
    them (layout.fit)."""
    grads, *args = arguments(U, V, W, m, n, count, G, act=act, precision=precision, dropout=dropout, block_d=block_d,
                             block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    for with_w, with_uv in [(True, True)] if fused else [(True, False), (False, True)]:
        launch_pass(*args, with_w=with_w, with_uv=with_uv)
    return grads


def tile_order(m: torch.Tensor, n: torch.Tensor, valid: torch.Tensor, p: int, block: int = 16) -> torch.Tensor:
    """(B, Dmax) permutations of each model's examples that walk the (m, n) table in block x block squares
    (row by row inside one), padding last: a tile of consecutive examples then spans few rows of dU and of dV."""
    blocks = layout.cdiv(p, block)
    key = ((m // block) * blocks + n // block) * (p * p) + m * p + n
    return torch.argsort(torch.where(valid, key, torch.iinfo(key.dtype).max), dim=1, stable=True)
