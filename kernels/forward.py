"""Forward pass and loss gradient of a population, one program per (model, tile of examples).

    out[d, :] = sum_k h[d, k] W[b, k, :]            (BLOCK_D, P) accumulated over hidden chunks of BLOCK_N
    loss[d]   = mean_q (out - onehot(y))^2          MSE  (CE: logsumexp(out) - out[y])
    G[d, :]   = 2 (out - onehot(y)) / (p D_b)       MSE  (CE: (softmax(out) - onehot(y)) / D_b)
    pred[d]   = argmax_q out[d, q]                  evaluation only

Shapes: U, V (B, p, N) and W (B, N, p) fp32 contiguous; M, N_, Y (B, Dmax) int32; COUNT (B,) int32 examples per
model (slots past it are skipped). P = p padded to a power of two (>= 16) inside the kernel. Training writes
G (B, Dmax, p) and the per-example loss; evaluation writes the per-example loss and pred. Per-example losses
are summed on the host in a fixed order, so the result is deterministic.
"""

import torch
import triton
import triton.language as tl

from fastgrok.kernels.hidden import activation, dot, dropout_scale, preactivation


@triton.jit
def _forward_kernel(
    # pointers
    U, V, W, M, N_, Y, COUNT, SEED, THRESHOLD, INV_KEEP, G, LOSS, PRED,
    # sizes
    p, width, step_key,
    # strides
    stride_ub, stride_up, stride_vb, stride_vp, stride_wb, stride_wn, stride_ib, stride_gb, stride_gd,
    # meta-parameters
    ACT: tl.constexpr, LOSS_KIND: tl.constexpr, TRAIN: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Axis 0 walks one model's example tiles, so consecutive programs share W[b] in L2.
    b = tl.program_id(1).to(tl.int64)
    count = tl.load(COUNT + b)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    if tl.program_id(0) * BLOCK_D < count:
        mask_d = offs_d < count
        m = tl.load(M + b * stride_ib + offs_d, mask=mask_d, other=0)
        n = tl.load(N_ + b * stride_ib + offs_d, mask=mask_d, other=0)
        y = tl.load(Y + b * stride_ib + offs_d, mask=mask_d, other=0)
        offs_p = tl.arange(0, BLOCK_P)
        mask_p = offs_p < p
        if DROPOUT:
            seed = tl.load(SEED + b)
            threshold = tl.load(THRESHOLD + b)
            inv_keep = tl.load(INV_KEEP + b)
        out = tl.zeros((BLOCK_D, BLOCK_P), dtype=tl.float32)
        for k0 in range(0, width, BLOCK_N):
            offs_k = k0 + tl.arange(0, BLOCK_N)
            mask_k = offs_k < width
            pre = preactivation(U + b * stride_ub, V + b * stride_vb, m[:, None], n[:, None], offs_k[None, :],
                                mask_d[:, None] & mask_k[None, :], stride_up, stride_vp)
            if DROPOUT:
                pre = pre * dropout_scale((m * p + n)[:, None], offs_k[None, :], width, seed, step_key, threshold,
                                          inv_keep)
            h = activation(pre, ACT)
            w = tl.load(W + b * stride_wb + offs_k[:, None] * stride_wn + offs_p[None, :],
                        mask=mask_k[:, None] & mask_p[None, :], other=0.0)
            out += dot(h, w, PRECISION)

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
        if TRAIN:
            tl.store(G + b * stride_gb + offs_d[:, None] * stride_gd + offs_p[None, :], grad,
                     mask=mask_d[:, None] & mask_p[None, :])
        else:
            pred = tl.argmax(tl.where(mask_p[None, :], out, float("-inf")), axis=1)
            tl.store(PRED + b * stride_ib + offs_d, pred.to(tl.int32), mask=mask_d)


MAX_GRID_Y = 65535
# Default tiles. 64 examples is the smallest tile Hopper's wgmma takes (32 falls back to mma.sync); with 32
# neurons and 4 warps nothing spills in tf32 or bf16 (bench/results/kernel-resources-sm90-triton3.9.txt).
TILES = {"block_d": 64, "block_n": 32, "num_warps": 4}


def block_p(p: int) -> int:
    return max(16, triton.next_power_of_2(p))


def forward(U, V, W, m, n, y, count, *, act: int, loss: int, precision: str, train: bool,
            dropout: tuple | None = None, step: int = 0, block_d: int = TILES["block_d"],
            block_n: int = TILES["block_n"], num_warps: int = TILES["num_warps"]):
    """Launch over (cdiv(Dmax, block_d), B). Returns (loss (B, Dmax), G (B, Dmax, p) or None, pred or None).

    dropout: None, or (seed (B,) int64, threshold (B,) int64, inv_keep (B,) fp32) for training."""
    B, p, width = U.shape
    d_max = m.shape[1]
    assert V.shape == U.shape and W.shape == (B, width, p), "U, V: (B, p, N); W: (B, N, p)"
    assert m.shape == n.shape == y.shape == (B, d_max) and m.dtype == torch.int32 and count.shape == (B,)
    assert U.is_contiguous() and V.is_contiguous() and W.is_contiguous() and m.is_contiguous()
    losses = torch.empty(B, d_max, device=U.device, dtype=torch.float32)
    G = torch.empty(B, d_max, p, device=U.device, dtype=torch.float32) if train else None
    pred = None if train else torch.empty(B, d_max, device=U.device, dtype=torch.int32)
    use_dropout = train and dropout is not None
    seed, threshold, inv_keep = dropout if use_dropout else (count, count, count)  # unused placeholders
    for lo in range(0, B, MAX_GRID_Y):  # CUDA caps the grid's second axis at 65535
        sl = slice(lo, min(B, lo + MAX_GRID_Y))
        _forward_kernel[(triton.cdiv(d_max, block_d), sl.stop - lo)](
            U[sl], V[sl], W[sl], m[sl], n[sl], y[sl], count[sl], seed[sl], threshold[sl], inv_keep[sl],
            G[sl] if train else losses, losses[sl], pred[sl] if pred is not None else losses,
            p, width, step << 32,
            U.stride(0), U.stride(1), V.stride(0), V.stride(1), W.stride(0), W.stride(1), m.stride(0),
            G.stride(0) if train else 0, G.stride(1) if train else 0,
            ACT=act, LOSS_KIND=loss, TRAIN=train, DROPOUT=use_dropout, PRECISION=precision,
            BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_P=block_p(p), num_warps=num_warps,
        )
    return losses, G, pred
