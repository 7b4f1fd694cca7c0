"""Backward pass of a population: dW, dU and dV, one program per (model, chunk of BLOCK_N hidden neurons).

    dW[b, k, :] = sum_d h[d, k] G[d, :]                                       (BLOCK_N, P)
    dS[d, k]    = (G[d, :] . W[b, k, :]) phi'(pre[d, k]) dropout[d, k]        (BLOCK_D, BLOCK_N)
    dU[b, :, k] = onehot(m)^T dS,   dV[b, :, k] = onehot(n)^T dS              (P, BLOCK_N)

Each program owns its chunk of dW, dU and dV and loops over all of its model's examples, so the scatter of the
one-hot first layer is a dense one-hot dot instead of atomics: no race, bit-identical results run to run. The
pre-activation is recomputed from U and V (cheap gathers) instead of being stored. The one-hot dots cost
2 x 2 D N P FLOPs beyond the 6 D N p of the textbook count; they are here for determinism (the project's earlier
H100 measurement found one-hot dots and atomics about as fast; bench/NOTES.md has the FLOP budget).
`WITH_W` / `WITH_UV` split the work into two launches (smaller register footprint) or fuse it into one.
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
    PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
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
            scale = dropout_scale(offs_d, offs_k, width, seed, step_key, threshold, inv_keep)
            pre = pre * scale
        if WITH_W:
            d_w += dot(tl.trans(activation(pre, ACT)), g, PRECISION)
        if WITH_UV:
            d_s = dot(g, tl.trans(w), PRECISION) * activation_grad(pre, ACT)
            if DROPOUT:
                d_s = d_s * scale
            d_s = tl.where(mask_d[:, None], d_s, 0.0)
            onehot_m = tl.where(m[:, None] == offs_p[None, :], 1.0, 0.0)
            onehot_n = tl.where(n[:, None] == offs_p[None, :], 1.0, 0.0)
            d_u += dot(tl.trans(onehot_m), d_s, PRECISION)
            d_v += dot(tl.trans(onehot_n), d_s, PRECISION)
    if WITH_W:
        tl.store(DW + b * stride_wb + offs_k[:, None] * stride_wn + offs_p[None, :], d_w, mask=mask_kp)
    if WITH_UV:
        mask_pk = mask_p[:, None] & mask_k[None, :]
        tl.store(DU + b * stride_ub + offs_p[:, None] * stride_up + offs_k[None, :], d_u, mask=mask_pk)
        tl.store(DV + b * stride_vb + offs_p[:, None] * stride_vp + offs_k[None, :], d_v, mask=mask_pk)


def backward(U, V, W, m, n, count, G, *, act: int, precision: str, dropout: tuple | None = None, step: int = 0,
             fused: bool = False, block_d: int = 32, block_n: int = 32, num_warps: int = 4):
    """Gradients dU, dV (B, p, N) and dW (B, N, p) of the loss whose output gradient is G (B, Dmax, p)."""
    B, p, width = U.shape
    assert G.shape == (B, m.shape[1], p) and G.is_contiguous()
    dU, dV, dW = torch.empty_like(U), torch.empty_like(V), torch.empty_like(W)
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
                BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_P=forward_module.block_p(p), num_warps=num_warps,
            )
    return dU, dV, dW
