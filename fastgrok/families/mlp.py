"""The paper's model: a 2-layer MLP on one-hot inputs, f(m, n) = W phi(U e_m + V e_n) (fastgrok.reference.MLP).

Population layout (the Triton kernels' too): U, V (B, p, N), so that U e_m is the row U[b, m]; W (B, N, p). Model b
is the reference MLP with U = U[b].T, V = V[b].T, W = W[b].T. With Settings.batchnorm each model also has
BatchNorm1d's weight, bias and running statistics, (B, N) each.

The torch backend's step has its backward written out (the structure the Triton kernels use), so that it runs
anywhere and compiles whole under torch.compile:

    pre = U[m] + V[n]                    (B, D, N)   gather: the one-hot first layer
    h   = phi(mask * pre)                (B, D, N)
    out = h W                            (B, D, p)   bmm
    G   = dL/dout                        MSE: 2 (out - onehot) / (D p);  CE: (softmax(out) - onehot) / D
    dW  = h^T G                          (B, N, p)   bmm
    dS  = (G W^T) phi'(mask pre) mask    (B, D, N)   bmm
    dU  = scatter-add of dS by m, dV by n

With BatchNorm h is normalised over the step's examples, h <- gamma xhat + beta, and dS goes through BatchNorm's
backward. A neuron's IPR averages those of its U row, V row (over the p inputs) and W column (over the p outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgrok import reference
from fastgrok.errors import ConfigError
from fastgrok.families import Family, Spec, register

BN_EPS, BN_MOMENTUM = 1e-5, 0.1  # BatchNorm1d's defaults
# The step pads the outputs of a p below these to a multiple of 8. On a CPU (bench/torch_knobs.py --knob pad, 2-core
# AMD EPYC, 2026-11-23, bench/results/cpu-2core-pad.json): whole steps 1.09x faster at p 23, 1.13x on the cpu-demo
# (p 47), 1.26x with cross-entropy, 1.37x at p 61, level at p 13, and slower at p 97 (0.56x at N 128, 0.94x at
# N 500) and p 113 (0.97x). On a GPU it stays off until measured (--knob gpu-pad, docs/performance.md).
CPU_PAD_BELOW = 64
GPU_PAD_BELOW = 0


def flat_rows(idx: torch.Tensor, p: int) -> torch.Tensor:
    """(B, D) residues -> (B D,) row indices into a (B p, N) view of U or V."""
    return (torch.arange(idx.shape[0], device=idx.device)[:, None] * p + idx).reshape(-1)


def pre_activation(U, V, m, n) -> torch.Tensor:
    """U[b, m[b, d]] + V[b, n[b, d]], (B, D, N). index_select on the flattened rows: advanced indexing U[rows, m]
    takes 8 times longer on a CPU (2 cores, B 20, D 1104, N 128: 2.7 against 0.32 ms) for the same numbers."""
    B, p, N = U.shape
    pre = U.reshape(B * p, N).index_select(0, flat_rows(m, p))
    pre += V.reshape(B * p, N).index_select(0, flat_rows(n, p))
    return pre.view(B, m.shape[1], N)


def forward(U, V, W, m, n, act: str, mask=None, bn=None) -> torch.Tensor:
    """Batched forward: m, n (B, D) -> (B, D, p). bn: BatchNorm at evaluation as an affine map of the activation,
    (scale, shift), (B, N) each (bn_affine)."""
    pre = pre_activation(U, V, m, n)
    if mask is not None:
        pre = pre * mask
    h = reference.ACTIVATIONS[act](pre)
    if bn is not None:
        h = torch.addcmul(bn[1][:, None], h, bn[0][:, None])
    return torch.bmm(h, W)


def bn_affine(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm at evaluation, BN(h) = h scale + shift with the running statistics."""
    scale = t["bn_weight"] * torch.rsqrt(t["running_var"] + BN_EPS)
    return scale, t["bn_bias"] - t["running_mean"] * scale


def grads(U, V, W, m, n, y, valid, D, mask, act: str, loss: str, bn=None):
    """Losses (B,) and dU, dV, dW of one step; with bn = (gamma, beta) (B, N) also dgamma, dbeta and the batch
    mean and unbiased variance of the activations (B, N), for BatchNorm's running statistics."""
    # The forward and the loss are reference.py's; the derivatives below are checked against its autograd.
    # In-place where a tensor is not needed again: on a CPU, fresh (B, D, N) buffers cost page faults.
    B, Dm = m.shape
    p = W.shape[-1]
    pre = pre_activation(U, V, m, n)
    if mask is not None:
        pre.mul_(mask)
    h = reference.ACTIVATIONS[act](pre)
    if bn is not None:  # BatchNorm1d in training mode, statistics over each model's real examples
        keep, count = valid[..., None].to(h.dtype), D.to(h.dtype)[:, None, None]
        mean = (h * keep).sum(1, keepdim=True) / count
        xhat = h.sub_(mean).mul_(keep)
        var = xhat.square().sum(1, keepdim=True) / count
        inv_std = torch.rsqrt(var + BN_EPS)
        xhat.mul_(inv_std)
        h = torch.addcmul(bn[1][:, None], xhat, bn[0][:, None])
    # A p below CPU_PAD_BELOW (GPU_PAD_BELOW) is padded to a multiple of 8 with zero columns of W; the padded
    # outputs are 0 and so is their target: MSE gets no term from them, cross-entropy sees them at -inf.
    pad = (-p) % 8 if p < (CPU_PAD_BELOW if W.device.type == "cpu" else GPU_PAD_BELOW) else 0
    Wp = F.pad(W, (0, pad)) if pad else W
    out = torch.bmm(h, Wp)
    label = y[..., None]
    minus_one = torch.full(label.shape, -1.0, dtype=out.dtype, device=out.device)
    scale = (valid.to(out.dtype) / D.to(out.dtype)[:, None])[..., None]  # 1/D on real examples, 0 on padding
    if loss == "mse":  # dL/dout = 2 (out - onehot) / (p D)
        diff = out.scatter_add_(-1, label, minus_one)
        # reference.per_example_loss, from the difference in hand: rebuilding the one-hot costs 25% at N 128 (CPU)
        per_example = diff.square().sum(-1) / p
        G = diff.mul_(scale * (2.0 / p))
    else:  # dL/dout = (softmax(out) - onehot) / D
        if pad:
            out[..., p:] = -torch.inf
        per_example = reference.per_example_loss(out, y, loss)
        G = torch.softmax(out, -1).scatter_add_(-1, label, minus_one).mul_(scale)
    losses = torch.where(valid, per_example, 0.0).sum(1) / D
    dW = torch.bmm(h.transpose(1, 2), G)[..., :p]
    del h
    dS = torch.bmm(G, Wp.transpose(1, 2))
    if bn is not None:  # dS is dL/d(BN output) here; through BatchNorm to dL/dh (zero on padding)
        dgamma, dbeta = (dS * xhat).sum(1), dS.sum(1)
        dxhat = dS.mul_(bn[0][:, None])
        centred = dxhat.sum(1, keepdim=True) + xhat * (dxhat * xhat).sum(1, keepdim=True)
        dS = dxhat.mul_(count).sub_(centred).mul_(inv_std / count * keep)
        del xhat, centred
    if act == "quad":
        dS.mul_(pre).mul_(2.0)
    else:
        dS.mul_(pre > 0)
    if mask is not None:
        dS.mul_(mask)
    dS = dS.to(U.dtype)  # under autocast (the bf16 comparison in tests/test_gpu.py) bmm returns bf16
    dS = dS.reshape(B * Dm, -1)
    dU = torch.zeros_like(U).view(-1, U.shape[-1]).index_add_(0, flat_rows(m, U.shape[1]), dS).view_as(U)
    dV = torch.zeros_like(V).view(-1, V.shape[-1]).index_add_(0, flat_rows(n, V.shape[1]), dS).view_as(V)
    if bn is None:
        return losses, dU, dV, dW
    unbiased = var * (count / (count - 1))
    return losses, dU, dV, dW, dgamma, dbeta, mean.squeeze(1), unbiased.squeeze(1)


class OneHotMLP(Family):
    name = "mlp"
    about = "W phi(U e_m + V e_n): the paper's 2-layer MLP on one-hot inputs"
    acts = ("quad", "relu")  # the written-out backward's and the kernels'
    defaults = {}

    def check(self, settings):
        if settings.act not in self.acts:
            raise ConfigError(f"the mlp model takes --act {' or '.join(self.acts)}, got {settings.act!r}")

    @property
    def fused(self) -> dict:
        from fastgrok.families.mlp_triton import TritonBackend

        return {"triton": TritonBackend}

    def tensors(self, settings, width):
        p = settings.p
        specs = {"U": Spec((p, width)), "V": Spec((p, width)), "W": Spec((width, p))}
        if settings.batchnorm:
            specs |= {"bn_weight": Spec((width,), fill=1.0), "bn_bias": Spec((width,), fill=0.0),
                      "running_mean": Spec((width,), trained=False, fill=0.0),
                      "running_var": Spec((width,), trained=False, fill=1.0)}
        return specs

    def init(self, settings, width, generator):
        u, v, w = reference.init_weights(settings.p, width, generator)
        return {"U": u.T, "V": v.T, "W": w.T}

    def forward(self, t, m, n, settings, mask=None):
        bn = bn_affine(t) if settings.batchnorm else None
        return forward(t["U"], t["V"], t["W"], m, n, settings.act, mask, bn)

    def whole_batch(self, settings):
        return settings.batchnorm

    def grads(self, t, m, n, y, valid, D, mask, settings):
        bn = (t["bn_weight"], t["bn_bias"]) if settings.batchnorm else None
        return list(grads(t["U"], t["V"], t["W"], m, n, y, valid, D, mask, settings.act, settings.loss, bn))

    @torch.no_grad()
    def after_step(self, t, extras, frozen):
        """BatchNorm1d's update of the running statistics with the step's batch mean and unbiased variance."""
        if extras:
            for name, new in zip(("running_mean", "running_var"), extras):
                t[name].copy_(torch.where(frozen[:, None], t[name], torch.lerp(t[name], new, BN_MOMENTUM)))

    def reference(self, settings, hyper, t):
        width = t["U"].shape[-1]
        mlp = reference.MLP(settings.p, width, settings.act, hyper.dropout, batchnorm=settings.batchnorm)
        with torch.no_grad():
            for name in "UVW":
                getattr(mlp, name).copy_(t[name].T)
            if settings.batchnorm:
                for ours, theirs in (("bn_weight", "weight"), ("bn_bias", "bias"), ("running_mean", "running_mean"),
                                     ("running_var", "running_var")):
                    getattr(mlp.bn, theirs).copy_(t[ours])
        return mlp

    def ipr_parts(self, t):
        return {"u": (t["U"], 1), "v": (t["V"], 1), "w": (t["W"], 2)}

    def prune(self, t, keep):
        # a neuron with a zero W column adds nothing to any output; zeroing its U and V rows instead would not
        # remove it under BatchNorm, whose shift acts on a zero activation too
        return {**t, "W": t["W"] * keep[:, :, None]}

    def step_bytes(self, settings, width, d):
        """The written-out backward's pre-activation, activation, mask and dS with its temporary (5 d N), outputs,
        one-hot targets, difference, G and loss terms (5 d p); BatchNorm's normalised activation and its output
        (2 d N)."""
        p = settings.p
        return 4 * (5 * d * width + 5 * d * p + (2 * d * width if settings.batchnorm else 0))

    def eval_bytes(self, settings, width):
        """Pre-activation, activation, logits and their loss terms, plus the int64 indices and labels the
        evaluation builds."""
        return 4 * (2 * width + 3 * settings.p) + 6 * 8

    def row_bytes(self, settings, width):
        return 4 * max(width, settings.p)

    def flops(self, settings, width, d):
        """6 D N p: the output layer's forward, dW and dH (the first layer is a gather)."""
        return 6 * d * width * settings.p


MLP = register(OneHotMLP())
