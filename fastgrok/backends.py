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

With BatchNorm (torch backend only) h is normalised over the step's examples, h <- gamma xhat + beta, and dS
goes through BatchNorm's backward. A step sees each model's training set or a minibatch (Population.batch).

A model whose loss or gradients are not finite is flagged `diverged` and frozen; its neighbours never see it.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F

from fastgrok import optim, reference
from fastgrok.errors import ConfigError
from fastgrok.population import (BN_EPS, Population, cpu_pieces, flat_rows, pre_activation, torch_eval_bytes,
                                 torch_outputs)


# _grads pads the outputs of a p below these to a multiple of 8. On a CPU, bench/torch_knobs.py --knob pad, two runs
# on the 2-core development machine (AMD EPYC, AVX2; the second in bench/results/cpu-2core-pad.json): whole steps
# 1.06-1.09x at p 23, 1.13-1.23x on the cpu-demo (p 47), 1.26-1.28x with cross-entropy, 1.10-1.37x at p 61, nothing
# at p 13 (overhead-bound), and 0.94-0.99x at p 97 and 113, where the products gain nothing from it. On a GPU it is
# off until measured (--knob gpu-pad: whether cuBLAS keeps p 97's TF32 products off the tensor cores, bench/NOTES.md).
CPU_PAD_BELOW = 64
GPU_PAD_BELOW = 0


def _grads(U, V, W, m, n, y, valid, D, mask, act: str, loss: str, bn=None):
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
        # reference.per_example_loss, from the difference in hand: rebuilding the one-hot cost 25% at N 128 (CPU)
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


def finite_models(t: torch.Tensor) -> torch.Tensor:
    """(B,) whether each model's slice of t (B, ...) holds no NaN or inf. Its largest |x| is finite exactly
    then (the max carries NaN and inf through): one read of t, where isfinite(t).all() writes a mask as
    large as t and reads it again (1.2 of 27.9 ms of an H100 step at N 512, bench/NOTES.md)."""
    return torch.isfinite(torch.linalg.vector_norm(t.flatten(1), ord=float("inf"), dim=1))


def _finish_step(pop: Population, losses: torch.Tensor, grads, update) -> torch.Tensor:
    """Freeze every model whose loss or gradients are not finite (for good), then let `update` (an optimizer
    step with fastgrok.optim.step_'s signature) move the others."""
    ok = torch.isfinite(losses)
    for g in grads:
        ok &= finite_models(g)
    pop.diverged |= ~ok
    pop.step += 1
    update(pop.settings.optimizer, pop.optimized, grads, pop.exp_avg, pop.exp_avg_sq, pop.step, pop.lr, pop.wd,
           pop.beta1, pop.beta2, pop.eps, active=~pop.diverged)
    return losses


class TorchBackend:
    """Batched PyTorch. compile=True wraps the forward/backward in torch.compile (GPU benchmarks)."""

    name = "torch"
    outputs = staticmethod(torch_outputs)
    eval_bytes = staticmethod(torch_eval_bytes)

    def __init__(self, compile: bool = False):
        if compile:
            # One static graph per population shape; a benchmark visits a dozen shapes, and past dynamo's default
            # of 8 recompiles it would silently fall back to eager for the rest.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.grads = torch.compile(_grads, dynamic=False) if compile else _grads

    def check(self, settings) -> None:
        """Refuse settings this backend cannot run (any p runs here)."""

    def step(self, pop: Population) -> torch.Tensor:
        """One step for every model; returns the (B,) training losses before the update."""
        s = pop.settings
        m, n, y, valid, D = pop.batch()
        B, d_max = m.shape
        counts = pop.batch_counts
        chunk, span = cpu_pieces(d_max, pop.width, s.p, pop.batchnorm) if pop.device.type == "cpu" else (B, d_max)
        results = None
        for lo in range(0, B, chunk):
            # a chunk's examples stop at its largest training set (with alpha varying, the padding of small
            # training sets up to the population's largest would be most of the work); its dropout masks are
            # drawn here, never (B, Dmax, N) at once
            sl, d = slice(lo, lo + chunk), int(counts[lo : lo + chunk].max())
            bn = (pop.bn_weight[sl], pop.bn_bias[sl]) if pop.batchnorm else None
            masks = pop.dropout_masks(sl, d)
            part = None
            for start in range(0, d, span):  # losses (means over D, not over the span) and gradients add up
                ex = (sl, slice(start, min(start + span, d)))
                terms = self.grads(pop.U[sl], pop.V[sl], pop.W[sl], m[ex], n[ex], y[ex], valid[ex], D[sl],
                                   None if masks is None else masks[:, ex[1]], s.act, s.loss, bn)
                part = terms if part is None else [a.add_(t) for a, t in zip(part, terms)]
            if chunk >= B:
                results = part
            else:  # into the population's tensors as they come, never a second copy of every gradient
                results = results or [t.new_empty((B, *t.shape[1:])) for t in part]
                for whole, t in zip(results, part):
                    whole[sl] = t
        losses, *rest = results
        grads, stats = rest[: len(pop.optimized)], rest[len(pop.optimized) :]
        losses = _finish_step(pop, losses, grads, optim.step_)
        if stats:
            pop.update_running_stats(*stats)
        return losses


class TritonBackend:
    """Fused Triton kernels (fastgrok.kernels): forward + loss gradient, backward, optimizer, evaluation.

    precision: fp32 (IEEE products, exact parity with the reference), tf32, tf32x3 or bf16 dot inputs; parameters,
    gradients and Adam moments stay fp32 in every mode. Runs on a CPU under TRITON_INTERPRET=1 (slow)."""

    name = "triton"

    def __init__(self, precision: str = "fp32", fused: bool | None = None, forward_tiles: dict | None = None,
                 backward_tiles: dict | None = None):
        from fastgrok.kernels import forward

        check_precision(precision)
        # fused (one backward launch for dW, dU, dV) and the backward's tiles default per precision to what the
        # GPU measured fastest (kernels/backward.py STEP)
        default_fused, default_tiles = self.default_step(precision)
        self.precision = precision
        self.fused = default_fused if fused is None else fused
        # Tiles ({block_d, block_n, num_warps}) of the forward/evaluation and backward kernels: the defaults are
        # the fastest the H100 sweep found (kernels/*.py TILES, backward.STEP).
        self.forward_tiles = {**forward.TILES, **(forward_tiles or {})}
        self.backward_tiles = {**default_tiles, **(backward_tiles or {})}
        self.name = f"triton-{precision}"
        # per population: its dropout constants, and its examples in the kernels' order for full-batch training
        self._data = weakref.WeakKeyDictionary()

    @staticmethod
    def default_step(precision: str) -> tuple[bool, dict]:
        """(fused, tiles) of the backward at `precision` unless told otherwise."""
        from fastgrok.kernels.backward import default_step

        return default_step(precision)

    # p is padded to a power of two inside the kernels, and above 128 the launchers shrink the tiles with it
    # (kernels/layout.py fit) so that they fit an SM's shared memory: checked at compile time up to P 512
    # (bench/kernel_resources.py --check, run by the tests); past it the tiles would go below the dots' 16 rows.
    MAX_P = 512

    def check(self, settings) -> None:
        if settings.batchnorm:
            raise ConfigError("BatchNorm runs on --backend torch (the fused kernels have no BatchNorm)")
        if settings.p > self.MAX_P:
            raise ConfigError(f"the triton backend handles p up to {self.MAX_P}; use --backend torch for p {settings.p}")

    @staticmethod
    def example_order(m, n, valid, p: int) -> tuple[torch.Tensor, dict]:
        """The order in which the kernels see each model's examples, (B, Dmax) permutations of its slots, and what
        else the kernels need of it (here nothing): tile_order, which a step does not depend on beyond rounding
        and which makes the windowed scatter cheap (kernels/backward.py)."""
        from fastgrok.kernels.backward import tile_order

        return tile_order(m, n, valid, p), {}

    def step_data(self, pop: Population) -> dict:
        """What the kernels need for pop's next step: its examples as int32 copies in example_order (made once per
        population for full-batch training, every step for minibatches) and its dropout masks ("masks":
        kernels/dropout.py, drawn for this step; None without dropout)."""
        from fastgrok.kernels.dropout import masks

        cached = self._data.get(pop)
        if cached is None:
            dev = pop.device
            rates = pop.dropout.double()
            dropout = None
            if bool((rates > 0).any()):
                threshold = torch.clamp(torch.round(rates * 2.0**32), max=2.0**32 - 1).long()
                dropout = (pop.dropout_seed.to(dev), threshold.to(dev), (1.0 / (1.0 - rates)).float().to(dev))
            cached = self._data[pop] = {"dropout": dropout}
        examples = cached.get("examples")
        if examples is None:
            m, n, y, valid, D = pop.batch()
            perm, extra = self.example_order(m, n, valid, pop.settings.p)
            m, n, y = (torch.gather(t, 1, perm).int() for t in (m, n, y))
            examples = {"m": m, "n": n, "y": y, "valid": valid, "count": D.int(), "D": D, **extra}
            if pop.batch_size is None:
                cached["examples"] = examples
        drawn = masks(examples["m"], examples["n"], examples["count"], cached["dropout"], p=pop.settings.p,
                      width=pop.width, step=pop.step)
        return {**examples, "masks": drawn}

    def step(self, pop: Population) -> torch.Tensor:
        from fastgrok.kernels.optimizer import optimizer_step_

        data = self.step_data(pop)
        example_loss, G = self.forward(pop, data)
        # padding comes last in the kernels' order too, so `valid` masks the kernel's slots as well as the batch's
        losses = torch.where(data["valid"], example_loss, 0.0).sum(1) / data["D"]
        return _finish_step(pop, losses, self.backward(pop, data, G), optimizer_step_)

    def forward(self, pop: Population, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's forward kernel: per-example losses and the output gradient G, in the kernels' slot order."""
        from fastgrok.kernels.forward import forward
        from fastgrok.kernels.hidden import ACT_CODES, LOSS_CODES

        s = pop.settings
        example_loss, G, _ = forward(*pop.params, data["m"], data["n"], data["y"], data["count"], act=ACT_CODES[s.act],
                                     loss=LOSS_CODES[s.loss], precision=self.precision, train=True,
                                     dropout=data["masks"], **self.forward_tiles)
        return example_loss, G

    def backward(self, pop: Population, data: dict, G: torch.Tensor):
        """The step's backward kernel(s): dU, dV, dW (fp32)."""
        from fastgrok.kernels.backward import backward
        from fastgrok.kernels.hidden import ACT_CODES

        return backward(*pop.params, data["m"], data["n"], data["count"], G, act=ACT_CODES[pop.settings.act],
                        precision=self.precision, dropout=data["masks"], fused=self.fused, **self.backward_tiles)

    @staticmethod
    def eval_bytes(width: int, p: int) -> int:
        """Working memory per example of `outputs` (kernels/layout.py eval_bytes)."""
        from fastgrok.kernels.layout import eval_bytes

        return eval_bytes(width, p)

    def outputs(self, U, V, W, m, n, y, act: str, loss: str):
        """The evaluation kernel: predictions and per-example losses for a chunk of models (all examples valid)."""
        from fastgrok.kernels.forward import forward
        from fastgrok.kernels.hidden import ACT_CODES, LOSS_CODES

        count = torch.full((U.shape[0],), m.shape[1], dtype=torch.int32, device=U.device)
        losses, _, pred = forward(U.contiguous(), V.contiguous(), W, m.int().contiguous(),
                                  n.int().contiguous(), y.int().contiguous(), count, act=ACT_CODES[act],
                                  loss=LOSS_CODES[loss], precision=self.precision, train=False,
                                  **self.forward_tiles)
        return pred.long(), losses


BACKENDS = ("auto", "torch", "triton")
# The Triton kernels' dot precisions (kernels/hidden.py dot); the torch backend computes in fp32.
PRECISIONS = ("fp32", "tf32", "tf32x3", "bf16")
# The fastest Triton precision whose phases agree with fp32's on the validation grid (bench/validate_precision.py;
# H100, 2026-11-22: all four precisions agree on all 39 models, and tf32 steps fastest, bench/results/h100-2026-11-22).
DEFAULT_PRECISION = "tf32"


def make_backend(name: str, device: torch.device, precision: str | None = None, settings=None):
    """'auto': the Triton kernels on a CUDA device, batched PyTorch elsewhere and for `settings` the kernels do
    not run (BatchNorm, p above TritonBackend.MAX_P). precision (Triton only): None is DEFAULT_PRECISION."""
    precision = DEFAULT_PRECISION if precision is None else precision
    check_precision(precision)  # also where the torch backend ignores it: a typo is refused on every machine
    if name == "auto":
        runs = settings is None or not (settings.batchnorm or settings.p > TritonBackend.MAX_P)
        kernels = device.type == "cuda" and _has_triton() and runs
        name = "triton" if kernels else "torch"
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        if not _has_triton():
            raise ConfigError("--backend triton needs the triton package (pip install triton)")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("--backend triton on a CPU runs only under TRITON_INTERPRET=1 (slow; for tests and debugging)")
        return TritonBackend(precision)
    raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
