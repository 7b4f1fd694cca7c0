"""The paper's model: a 2-layer MLP on one-hot inputs, f(m, n) = W phi(U e_m + V e_n) (fastgrok.reference.MLP), and
on S operands (--terms S, the sequel's many-term tasks) f = W phi(U1 e_x1 + ... + US e_xS), phi(x) = x^S.

Population layout (the Triton kernels' too): U, V (B, p, N), so that U e_m is the row U[b, m]; W (B, N, p). Model b
is the reference MLP with U = U[b].T, V = V[b].T, W = W[b].T. On S operands U1..US take U and V's place (the
Triton kernels take two). With Settings.batchnorm each model also has BatchNorm1d's weight, bias and running
statistics, (B, N) each.

The torch backend's step has its backward written out (the structure the Triton kernels use), so that it runs
anywhere and compiles whole under torch.compile:

    pre = U[m] + V[n]                    (B, D, N)   gather: the one-hot first layer (U1[x1] + ... + US[xS])
    h   = phi(mask * pre)                (B, D, N)
    out = h W                            (B, D, p)   bmm
    G   = dL/dout                        MSE: 2 (out - onehot) / (D p);  CE: (softmax(out) - onehot) / D
    dW  = h^T G                          (B, N, p)   bmm
    dS  = (G W^T) phi'(mask pre) mask    (B, D, N)   bmm
    dU  = scatter-add of dS by m, dV by n (dUs by xs)

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


def pre_activation(inputs, x) -> torch.Tensor:
    """U[b, m[b, d]] + V[b, n[b, d]] (the sum over the operands x (S, B, D) of inputs[s][b, x[s, b, d]]), (B, D,
    N). index_select on the flattened rows: advanced indexing U[rows, m] takes 8 times longer on a CPU (2 cores,
    B 20, D 1104, N 128: 2.7 against 0.32 ms) for the same numbers."""
    B, p, N = inputs[0].shape
    pre = inputs[0].reshape(B * p, N).index_select(0, flat_rows(x[0], p))
    for U, idx in zip(inputs[1:], x[1:], strict=True):
        pre += U.reshape(B * p, N).index_select(0, flat_rows(idx, p))
    return pre.view(B, x.shape[-1], N)


def forward(inputs, W, x, act: str, mask=None, bn=None) -> torch.Tensor:
    """Batched forward: operands x (S, B, D) -> (B, D, p); inputs: (U, V), or U1..US. bn: BatchNorm at evaluation
    as an affine map of the activation, (scale, shift), (B, N) each (bn_affine)."""
    pre = pre_activation(inputs, x)
    if mask is not None:
        pre = pre * mask
    h = reference.activation(act, len(inputs))(pre)
    if bn is not None:
        h = torch.addcmul(bn[1][:, None], h, bn[0][:, None])
    return torch.bmm(h, W)


@torch.no_grad()
def update_running(mean, var, batch_mean, batch_var, frozen) -> None:
    """BatchNorm1d's running statistics (B, N), in place, moved towards a step's batch mean and unbiased variance
    by its momentum; `frozen` (B,) models keep theirs."""
    for old, new in ((mean, batch_mean), (var, batch_var)):
        old.copy_(torch.where(frozen[:, None], old, torch.lerp(old, new, BN_MOMENTUM)))


def bn_affine(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm at evaluation, BN(h) = h scale + shift with the running statistics."""
    scale = t["bn_weight"] * torch.rsqrt(t["running_var"] + BN_EPS)
    return scale, t["bn_bias"] - t["running_mean"] * scale


def grads(inputs, W, x, y, valid, D, mask, act: str, loss: str, bn=None):
    """Losses (B,) and dU, dV (a gradient per input matrix), dW of one step; with bn = (gamma, beta) (B, N) also
    dgamma, dbeta and the batch mean and unbiased variance of the activations (B, N), for BatchNorm's running
    statistics."""
    # The forward and the loss are reference.py's; the derivatives below are checked against its autograd.
    # In-place where a tensor is not needed again: on a CPU, fresh (B, D, N) buffers cost page faults.
    B, Dm = x.shape[1:]
    p, terms = W.shape[-1], len(inputs)
    pre = pre_activation(inputs, x)
    if mask is not None:
        pre.mul_(mask)
    h = reference.activation(act, terms)(pre)
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
    if act == "quad" or (act == "pow" and terms == 2):
        dS.mul_(pre).mul_(2.0)
    elif act == "pow":  # d(x^S)/dx = S x^(S-1)
        dS.mul_(pre.pow_(terms - 1)).mul_(float(terms))
    else:
        dS.mul_(pre > 0)
    if mask is not None:
        dS.mul_(mask)
    dS = dS.to(W.dtype)  # under autocast (the bf16 comparison in tests/test_gpu.py) bmm returns bf16
    dS = dS.reshape(B * Dm, -1)
    dinputs = [torch.zeros_like(U).view(-1, U.shape[-1]).index_add_(0, flat_rows(idx, U.shape[1]), dS).view_as(U)
               for U, idx in zip(inputs, x, strict=True)]
    if bn is None:
        return losses, *dinputs, dW
    unbiased = var * (count / (count - 1))
    return losses, *dinputs, dW, dgamma, dbeta, mean.squeeze(1), unbiased.squeeze(1)


class OneHotMLP(Family):
    name = "mlp"
    about = "W phi(U e_m + V e_n): the paper's 2-layer MLP on one-hot inputs"
    acts = ("quad", "relu", "pow")  # the written-out backward's (the kernels': quad and relu)
    defaults = {}

    def check(self, settings):
        if settings.act not in self.acts:
            raise ConfigError(f"the mlp model takes --act {', '.join(self.acts)}, got {settings.act!r}")

    @property
    def fused(self) -> dict:
        from fastgrok.families.mlp_triton import TritonBackend

        return {"triton": TritonBackend}

    def tensors(self, settings, width):
        p = settings.p
        specs = {name: Spec((p, width)) for name in reference.input_names(settings.terms)} | {"W": Spec((width, p))}
        if settings.batchnorm:
            specs |= {"bn_weight": Spec((width,), fill=1.0), "bn_bias": Spec((width,), fill=0.0),
                      "running_mean": Spec((width,), trained=False, fill=0.0),
                      "running_var": Spec((width,), trained=False, fill=1.0)}
        return specs

    def init(self, settings, width, generator):
        drawn = reference.init_weights(settings.p, width, generator, settings.terms)
        return {name: w.T for name, w in zip((*reference.input_names(settings.terms), "W"), drawn)}

    def forward(self, t, x, settings, mask=None):
        bn = bn_affine(t) if settings.batchnorm else None
        return forward(self.inputs(t, settings), t["W"], x, settings.act, mask, bn)

    @staticmethod
    def inputs(t, settings) -> list[torch.Tensor]:
        """The first layer's matrices: U and V, or U1..US."""
        return [t[name] for name in reference.input_names(settings.terms)]

    def whole_batch(self, settings):
        return settings.batchnorm

    def grads(self, t, x, y, valid, D, mask, settings):
        bn = (t["bn_weight"], t["bn_bias"]) if settings.batchnorm else None
        return list(grads(self.inputs(t, settings), t["W"], x, y, valid, D, mask, settings.act, settings.loss, bn))

    @torch.no_grad()
    def after_step(self, t, extras, frozen):
        """BatchNorm1d's update of the running statistics with the step's batch mean and unbiased variance."""
        if extras:
            update_running(t["running_mean"], t["running_var"], *extras, frozen)

    def reference(self, settings, hyper, t):
        width = t["W"].shape[-2]
        mlp = reference.MLP(settings.p, width, settings.act, hyper.dropout, batchnorm=settings.batchnorm,
                            terms=settings.terms)
        with torch.no_grad():
            for name in (*reference.input_names(settings.terms), "W"):
                getattr(mlp, name).copy_(t[name].T)
            if settings.batchnorm:
                for ours, theirs in (("bn_weight", "weight"), ("bn_bias", "bias"), ("running_mean", "running_mean"),
                                     ("running_var", "running_var")):
                    getattr(mlp.bn, theirs).copy_(t[ours])
        return mlp

    def ipr_parts(self, t):
        inputs = {name.lower(): (value, 1) for name, value in t.items() if name in ("U", "V") or
                  (name[0] == "U" and name[1:].isdigit())}
        return {**inputs, "w": (t["W"], 2)}

    def bn_pairs(self, t):
        return {"bn_ipr_correlation": (self.ipr_parts(t), t["bn_weight"])} if "bn_weight" in t else {}

    def prune(self, t, keep):
        # a neuron with a zero W column adds nothing to any output; zeroing its U and V rows instead would not
        # remove it under BatchNorm, whose shift acts on a zero activation too
        return {**t, "W": t["W"] * keep[:, :, None]}

    def step_bytes(self, settings, width, d):
        """The written-out backward's pre-activation, activation, mask and dS with its temporary (5 d N), outputs,
        one-hot targets, difference, G and loss terms (5 d p); BatchNorm's normalised activation and its output
        (2 d N). (The operands' indices are the data's, data_bytes.)"""
        p = settings.p
        return 4 * (5 * d * width + 5 * d * p + (2 * d * width if settings.batchnorm else 0))

    def eval_bytes(self, settings, width):
        """Pre-activation, activation, logits and their loss terms, plus the int64 indices and labels the
        evaluation builds."""
        return 4 * (2 * width + 3 * settings.p) + (4 + settings.terms) * 8

    def row_bytes(self, settings, width):
        return 4 * max(width, settings.p)

    def flops(self, settings, width, d):
        """6 D N p: the output layer's forward, dW and dH (the first layer is a gather)."""
        return 6 * d * width * settings.p


MLP = register(OneHotMLP())
