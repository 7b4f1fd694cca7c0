"""Backends: one full-batch training step for a whole population.

`torch` is batched PyTorch with the backward pass written out (the same structure the Triton kernels use),
so that it runs anywhere and compiles whole under torch.compile:

    pre = U[m] + V[n]                    (B, D, N)   gather
    h   = phi(mask * pre)                (B, D, N)
    out = h W                            (B, D, p)   bmm
    G   = dL/dout                        MSE: 2 (out - onehot) / (D p);  CE: (softmax(out) - onehot) / D
    dW  = h^T G                          (B, N, p)   bmm
    dS  = (G W^T) phi'(mask pre) mask    (B, D, N)   bmm
    dU  = scatter-add of dS by m, dV by n

A model whose loss or gradients are not finite is flagged `diverged` and frozen; its neighbours never see it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgrok import optim
from fastgrok.errors import ConfigError
from fastgrok.population import Population


def _grads(U, V, W, m, n, y, valid, D, mask, act: str, loss: str):
    B, Dm = m.shape
    p = W.shape[-1]
    rows = torch.arange(B, device=U.device)[:, None]
    pre = U[rows, m] + V[rows, n]
    if mask is not None:
        pre = pre * mask
    h = pre * pre if act == "quad" else torch.relu(pre)
    out = torch.bmm(h, W)
    onehot = F.one_hot(y, p).to(out.dtype)
    scale = valid.to(out.dtype) / D.to(out.dtype)[:, None]  # (B, Dmax): 1/D on real examples, 0 on padding
    if loss == "mse":
        diff = out - onehot
        per_example = (diff * diff).mean(-1)
        G = diff * (2.0 / p) * scale[..., None]
    else:
        logp = torch.log_softmax(out, -1)
        per_example = -(logp * onehot).sum(-1)
        G = (logp.exp() - onehot) * scale[..., None]
    losses = torch.where(valid, per_example, 0.0).sum(1) / D
    dW = torch.bmm(h.transpose(1, 2), G)
    dS = torch.bmm(G, W.transpose(1, 2))
    dS = dS * (2.0 * pre) if act == "quad" else dS * (pre > 0)
    if mask is not None:
        dS = dS * mask
    flat = lambda idx: (rows * U.shape[1] + idx).reshape(-1)  # noqa: E731
    dU = torch.zeros_like(U).view(-1, U.shape[-1]).index_add_(0, flat(m), dS.reshape(B * Dm, -1)).view_as(U)
    dV = torch.zeros_like(V).view(-1, V.shape[-1]).index_add_(0, flat(n), dS.reshape(B * Dm, -1)).view_as(V)
    return losses, dU, dV, dW


# On a CPU, glibc returns allocations above 32 MB to the OS at every free, and touching fresh pages costs more
# than the arithmetic (2 cores: 16 models of N 500 ran at 23 model-steps/s in one batch, 57 one at a time).
# So the CPU path works through models in chunks whose (D, N) activations stay under this size.
CPU_CHUNK_BYTES = 24 << 20


class TorchBackend:
    """Batched PyTorch. compile=True wraps the forward/backward in torch.compile (GPU benchmarks)."""

    name = "torch"

    def __init__(self, compile: bool = False):
        self.grads = torch.compile(_grads, dynamic=False) if compile else _grads

    def step(self, pop: Population) -> torch.Tensor:
        """One step for every model; returns the (B,) training losses before the update."""
        s = pop.settings
        D = pop.D.to(pop.device).to(torch.float32)
        B, d_max = pop.train_m.shape
        masks = pop.dropout_masks()
        chunk = B
        if pop.device.type == "cpu":
            chunk = max(1, CPU_CHUNK_BYTES // (4 * d_max * max(pop.width, s.p)))
        parts = []
        for lo in range(0, B, chunk):
            sl = slice(lo, lo + chunk)
            parts.append(self.grads(pop.U[sl], pop.V[sl], pop.W[sl], pop.train_m[sl], pop.train_n[sl], pop.train_y[sl],
                                    pop.valid[sl], D[sl], None if masks is None else masks[sl], s.act, s.loss))
        losses, dU, dV, dW = (torch.cat(t) for t in zip(*parts)) if len(parts) > 1 else parts[0]
        ok = torch.isfinite(losses)
        for g in (dU, dV, dW):
            ok &= torch.isfinite(g).flatten(1).all(1)
        pop.diverged |= ~ok
        pop.step += 1
        optim.step_(s.optimizer, pop.params, (dU, dV, dW), pop.exp_avg, pop.exp_avg_sq, pop.step,
                    pop.lr, pop.wd, pop.beta1, pop.beta2, pop.eps, active=~pop.diverged)
        return losses


BACKENDS = ("auto", "torch")


def make_backend(name: str, device: torch.device):
    """'auto' picks the fastest backend available on `device`."""
    if name == "auto":
        name = "torch"
    if name == "torch":
        return TorchBackend()
    raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
