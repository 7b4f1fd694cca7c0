"""Backward pass of a population: dW, dU and dV, one program per (model, chunk of BLOCK_N hidden neurons).

    dW[b, k, :] = sum_d h[d, k] G[d, :]                                       (BLOCK_N, P)
    dS[d, k]    = (G[d, :] . W[b, k, :]) phi'(pre[d, k]) dropout[d, k]        (BLOCK_D, BLOCK_N)
    dU[b, :, k] = onehot(m)^T dS,   dV[b, :, k] = onehot(n)^T dS              (P, BLOCK_N)

Each program owns its chunk of dW, dU and dV and loops over all of its model's examples, so the scatter of the
one-hot first layer needs no atomics: no race, bit-identical results run to run. Two ways to scatter (WINDOW):

- 0: one one-hot dot over all P rows per tile into registers, 2 x 2 D N P FLOPs beyond the textbook 6 D N p.
- 16 or more: the examples arrive in 16 x 16 blocks of the (m, n) table (TritonBackend sorts them), so a tile
  touches few rows; one-hot dots over windows of WINDOW rows from the tile's smallest index are added to the
  program's own rows of dU, dV in global memory (zeroed before), with a barrier between tiles. About 2 D N
  (2 WINDOW) FLOPs: a quarter or less of the full dots, for a read-modify-write of each window.

The pre-activation is recomputed from U and V (cheap gathers) instead of being stored. `WITH_W` / `WITH_UV`
split the work into two launches (smaller register footprint) or fuse it into one. bench/NOTES.md has the budget.
"""

import torch
import triton
import triton.language as tl

from fastgrok.kernels import forward as forward_module
from fastgrok.kernels.hidden import activation, activation_grad, dot, dropout_scale, preactivation


@triton.jit
def _backward_kernel(
    # pointers
    U, V, W, M, N_, COUNT, SEED, THRESHOLD, INV_KEEP, G, DU, DV, DW,
    # sizes
    p, width, step_key,
    # strides (dU, dV, dW share U, V, W's layout)
    stride_ub, stride_up, stride_vb, stride_vp, stride_wb, stride_wn, stride_ib, stride_gb, stride_gd,
    # meta-parameters
    ACT: tl.constexpr, DROPOUT: tl.constexpr, WITH_W: tl.constexpr, WITH_UV: tl.constexpr,
    PRECISION: tl.constexpr, WINDOW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Axis 0 walks one model's neuron chunks, so consecutive programs re-read the same G[b] from L2.
    b = tl.program_id(1).to(tl.int64)
    count = tl.load(COUNT + b)
    offs_k = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < width
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < p
    mask_kp = mask_k[:, None] & mask_p[None, :]
    if DROPOUT:
        seed = tl.load(SEED + b)
        threshold = tl.load(THRESHOLD + b)
        inv_keep = tl.load(INV_KEEP + b)
    if WITH_UV:
        w = tl.load(W + b * stride_wb + offs_k[:, None] * stride_wn + offs_p[None, :], mask=mask_kp, other=0.0)
    d_w = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    d_u = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    d_v = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, count, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < count
        m = tl.load(M + b * stride_ib + offs_d, mask=mask_d, other=0)
        n = tl.load(N_ + b * stride_ib + offs_d, mask=mask_d, other=0)
        g = tl.load(G + b * stride_gb + offs_d[:, None] * stride_gd + offs_p[None, :],
                    mask=mask_d[:, None] & mask_p[None, :], other=0.0)
        pre = preactivation(U + b * stride_ub, V + b * stride_vb, m, n, offs_k,
                            mask_d[:, None] & mask_k[None, :], stride_up, stride_vp)
        if DROPOUT:
            scale = dropout_scale(m * p + n, offs_k, width, seed, step_key, threshold, inv_keep)
            pre = pre * scale
        if WITH_W:
            d_w += dot(tl.trans(activation(pre, ACT)), g, PRECISION)
        if WITH_UV:
            d_s = dot(g, tl.trans(w), PRECISION) * activation_grad(pre, ACT)
            if DROPOUT:
                d_s = d_s * scale
            d_s = tl.where(mask_d[:, None], d_s, 0.0)
            if WINDOW == 0:
                onehot_m = tl.where(m[:, None] == offs_p[None, :], 1.0, 0.0)
                onehot_n = tl.where(n[:, None] == offs_p[None, :], 1.0, 0.0)
                d_u += dot(tl.trans(onehot_m), d_s, PRECISION)
                d_v += dot(tl.trans(onehot_n), d_s, PRECISION)
            else:
                _add_rows(DU + b * stride_ub, m, mask_d, d_s, offs_k, mask_k, p, stride_up, PRECISION, WINDOW)
                _add_rows(DV + b * stride_vb, n, mask_d, d_s, offs_k, mask_k, p, stride_vp, PRECISION, WINDOW)
                tl.debug_barrier()  # the next tile's windows may overlap these rows, held by other threads
    if WITH_W:
        tl.store(DW + b * stride_wb + offs_k[:, None] * stride_wn + offs_p[None, :], d_w, mask=mask_kp)
    if WITH_UV and WINDOW == 0:
        mask_pk = mask_p[:, None] & mask_k[None, :]
        tl.store(DU + b * stride_ub + offs_p[:, None] * stride_up + offs_k[None, :], d_u, mask=mask_pk)
        tl.store(DV + b * stride_vb + offs_p[:, None] * stride_vp + offs_k[None, :], d_v, mask=mask_pk)


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


SCATTERS = {"onehot": 0, "window": 16}
# Default tiles: 64 neurons (dW's rows) and 64 examples (dS's rows) put both dots on Hopper's wgmma, without
# spills in tf32 or bf16 with the windowed scatter and 8 warps (bench/results/kernel-resources-sm90-triton3.9.txt);
# a chunk of 64 neurons also halves the re-reads of G against 32.
TILES = {"block_d": 64, "block_n": 64, "num_warps": 8}
# Measured on an H100 (bench/results/h100-2026-11-22/sweep.json, N 512, B 1024): in tf32 one fused launch at
# 4 warps beats two launches at 8 (36.7k against 23.5k model-steps/s) although ptxas reports 408 B of spills.
# fp32 (IEEE dots spill heavily): two launches at 8 warps, 3.6k (fused 0.8k); tf32x3: two launches at 4 warps,
# 9.8k; bf16: one fused launch at 8 warps, 16.9k (two at 8: 9.5k). bench/results/h100-2026-11-22/backward-defaults.log
STEP = {"tf32": {"fused": True, "num_warps": 4}, "tf32x3": {"num_warps": 4}, "bf16": {"fused": True, "num_warps": 8}}


def default_step(precision: str) -> tuple[bool, dict]:
    """(fused, tiles) of the backward the Triton step runs at `precision` unless told otherwise."""
    step = STEP.get(precision, {})
    return step.get("fused", False), {**TILES, **{k: v for k, v in step.items() if k != "fused"}}


def backward(U, V, W, m, n, count, G, *, act: int, precision: str, dropout: tuple | None = None, step: int = 0,
             fused: bool = False, scatter: str = "window", block_d: int = TILES["block_d"],
             block_n: int = TILES["block_n"], num_warps: int = TILES["num_warps"]):
    """Gradients dU, dV (B, p, N) and dW (B, N, p) of the loss whose output gradient is G (B, Dmax, p).

    scatter: "onehot" (dense one-hot dots over all rows) or "window" (examples should come in
    fastgrok.kernels.backward.tile_order; any order gives the right result, that one makes it cheap)."""
    B, p, width = U.shape
    assert G.shape == (B, m.shape[1], p) and G.is_contiguous()
    window = SCATTERS[scatter]
    dW = torch.empty_like(W)
    dU, dV = (torch.zeros_like(U), torch.zeros_like(V)) if window else (torch.empty_like(U), torch.empty_like(V))
    seed, threshold, inv_keep = dropout if dropout is not None else (count, count, count)  # unused placeholders
    passes = [(True, True)] if fused else [(True, False), (False, True)]
    for with_w, with_uv in passes:
        for lo in range(0, B, forward_module.MAX_GRID_Y):  # CUDA caps the grid's second axis at 65535
            sl = slice(lo, min(B, lo + forward_module.MAX_GRID_Y))
            _backward_kernel[(triton.cdiv(width, block_n), sl.stop - lo)](
                U[sl], V[sl], W[sl], m[sl], n[sl], count[sl], seed[sl], threshold[sl], inv_keep[sl], G[sl],
                dU[sl], dV[sl], dW[sl],
                p, width, step << 32,
                U.stride(0), U.stride(1), V.stride(0), V.stride(1), W.stride(0), W.stride(1), m.stride(0),
                G.stride(0), G.stride(1),
                ACT=act, DROPOUT=dropout is not None, WITH_W=with_w, WITH_UV=with_uv, PRECISION=precision,
                WINDOW=window, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_P=forward_module.block_p(p), num_warps=num_warps,
            )
    return dU, dV, dW


def tile_order(m: torch.Tensor, n: torch.Tensor, valid: torch.Tensor, p: int, block: int = 16) -> torch.Tensor:
    """(B, Dmax) permutations of each model's examples that walk the (m, n) table in block x block squares
    (row by row inside one), padding last: a tile of consecutive examples then spans few rows of dU and of dV."""
    blocks = triton.cdiv(p, block)
    key = ((m // block) * blocks + n // block) * (p * p) + m * p + n
    return torch.argsort(torch.where(valid, key, torch.iinfo(key.dtype).max), dim=1, stable=True)
