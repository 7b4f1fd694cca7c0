"""The paper's deeper ReLU MLP (fastgrok.reference.DeepMLP; its Fig. 7b: depth 3, width 500), as a population.

Population layout: U, V (B, p, N), so that the first layer is a gather of rows (U e_m is U[b, m], as the 2-layer
MLP's); each hidden layer Hk (B, N, N) and the readout W (B, N, p) in (in, out) layout, so that a layer is one
batched matmul h @ Hk over every model. Model b is the reference DeepMLP with U = U[b].T, V = V[b].T, Hk = Hk[b].T,
W = W[b].T. With BatchNorm (Settings.batchnorm) each hidden layer k also has bn{k}_weight, bn{k}_bias and running
statistics, (B, N) each; a step normalises by the statistics of each model's real examples (train_forward). The
step is autograd through this batched forward (Family.grads).

IPR and pruning work on the first layer's neurons: neuron k's input weights over the p residues of each operand
(U[b, :, k], V[b, :, k]) and, where the first layer is the last hidden one (depth 1), its readout weights
W[b, k, :]. A pruned neuron's U and V columns are zero, so its activation is phi(0) = 0 in every example (and
its first BatchNorm's weight and bias are zero, so that it stays 0 after it). Each last hidden neuron's readout
weights over the p outputs have an IPR too, whose mean `fastgrok ipr` reports per model (out_ipr).
"""

from __future__ import annotations

import torch

from fastgrok import reference
from fastgrok.errors import ConfigError
from fastgrok.families import Family, Spec, register
from fastgrok.families.mlp import BN_EPS, pre_activation, update_running

BN_PARTS = ("weight", "bias", "running_mean", "running_var")


class DeepOneHotMLP(Family):
    name = "deep-mlp"
    options = ("depth", "init")
    takes_batchnorm = True
    about = ("W phi(H_k ... phi(U e_m + V e_n)): --depth ReLU layers of width N, no biases (the paper's Fig. 7b), "
             "BatchNorm after each with --batchnorm")

    def check(self, settings):
        super().check(settings)
        if settings.depth < 1:
            raise ConfigError(f"--depth must be at least 1, got {settings.depth}")
        reference.check_choice("init", settings.init, reference.DEEP_INITS)

    def tensors(self, settings, width):
        p = settings.p
        hidden = {f"H{k}": Spec((width, width)) for k in range(1, settings.depth)}
        bn = {f"bn{k}_{part}": Spec((width,), trained=part in ("weight", "bias"),
                                     fill=float(part in ("weight", "running_var")))  # BatchNorm1d's start
              for k in range(1, settings.depth + 1) for part in BN_PARTS} if settings.batchnorm else {}
        return {"U": Spec((p, width)), "V": Spec((p, width)), **hidden, "W": Spec((width, p)), **bn}

    def init(self, settings, width, generator):
        net = reference.DeepMLP(settings.p, width, settings.depth, settings.act, generator=generator,
                                init=settings.init)
        return {"U": net.U.data.T, "V": net.V.data.T, **{f"H{k + 1}": h.data.T for k, h in enumerate(net.H)},
                "W": net.W.data.T}

    def forward(self, t, x, settings, mask=None):
        return self._forward(t, x, settings, mask)

    def train_forward(self, t, x, valid, D, settings, mask=None):
        if not settings.batchnorm:
            return self._forward(t, x, settings, mask), []
        stats = []
        return self._forward(t, x, settings, mask, (valid, D), stats), stats

    @staticmethod
    def _forward(t, x, settings, mask=None, batch=None, stats=None):
        """The logits; with BatchNorm, at evaluation by the running statistics, or with batch = (valid, D) by
        those of each model's real examples, whose mean and unbiased variance per layer go into `stats`."""
        width = t["U"].shape[-1]
        act = reference.ACTIVATIONS[settings.act]
        pre = pre_activation((t["U"], t["V"]), x)
        for k in range(settings.depth):
            if mask is not None:
                pre = pre * mask[..., k * width : (k + 1) * width]
            h = act(pre)
            if settings.batchnorm:
                gamma, beta = t[f"bn{k + 1}_weight"][:, None], t[f"bn{k + 1}_bias"][:, None]
                if batch is None:
                    mean, var = t[f"bn{k + 1}_running_mean"][:, None], t[f"bn{k + 1}_running_var"][:, None]
                else:
                    keep, count = batch[0][..., None].to(h.dtype), batch[1].to(h.dtype)[:, None, None]
                    mean = (h * keep).sum(1, keepdim=True) / count
                    var = ((h - mean) * keep).square().sum(1, keepdim=True) / count
                    stats += [mean.detach().squeeze(1), (var.detach() * (count / (count - 1))).squeeze(1)]
                h = (h - mean) * torch.rsqrt(var + BN_EPS) * gamma + beta
            if k + 1 < settings.depth:
                pre = torch.bmm(h, t[f"H{k + 1}"])
        return torch.bmm(h, t["W"])

    @torch.no_grad()
    def after_step(self, t, extras, frozen):
        """BatchNorm1d's update of each layer's running statistics with the step's batch mean and unbiased
        variance."""
        for k in range(len(extras) // 2):
            update_running(t[f"bn{k + 1}_running_mean"], t[f"bn{k + 1}_running_var"], *extras[2 * k : 2 * k + 2],
                           frozen)

    def whole_batch(self, settings):
        return settings.batchnorm

    def reference(self, settings, hyper, t):
        width = t["U"].shape[-1]
        net = reference.DeepMLP(settings.p, width, settings.depth, settings.act, hyper.dropout,
                                batchnorm=settings.batchnorm, init=settings.init)
        with torch.no_grad():
            net.U.copy_(t["U"].T)
            net.V.copy_(t["V"].T)
            for k, h in enumerate(net.H):
                h.copy_(t[f"H{k + 1}"].T)
            net.W.copy_(t["W"].T)
            for k, bn in enumerate(net.bn or ()):
                for part in BN_PARTS:
                    getattr(bn, part).copy_(t[f"bn{k + 1}_{part}"])
        return net

    def dropout_units(self, settings, width):
        return settings.depth * width

    def ipr_parts(self, t):
        parts = {"u": (t["U"], 1), "v": (t["V"], 1)}
        if "H1" not in t:  # the first layer is the last hidden one: its readout weights are over the p outputs
            parts["w"] = (t["W"], 2)
        return parts

    def ipr_extra(self, t):
        return {"out": (t["W"], 2)}  # each last hidden neuron's readout weights, over the p outputs

    def bn_pairs(self, t):
        """The first layer's neurons against the BatchNorm weight after them, and the last layer's readout
        weights against the BatchNorm weight before them (To grok's App. G.4)."""
        if "bn1_weight" not in t:
            return {}
        last = 1 + sum(name[0] == "H" for name in t)  # the depth: one BatchNorm per hidden layer
        return {"bn_ipr_correlation": (self.ipr_parts(t), t["bn1_weight"]),
                "bn_out_ipr_correlation": ({"w": (t["W"], 2)}, t[f"bn{last}_weight"])}

    def prune(self, t, keep):
        pruned = {**t, "U": t["U"] * keep[:, None, :], "V": t["V"] * keep[:, None, :]}
        if "bn1_weight" in t:
            pruned |= {"bn1_weight": t["bn1_weight"] * keep, "bn1_bias": t["bn1_bias"] * keep}
        return pruned

    def step_bytes(self, settings, width, d):
        """What autograd keeps and the backward adds, per example: (depth + 1) N + 4 p floats, the activation each
        layer saves and the logits' loss terms. Fitted to the live memory of a step on the CPU (p 41 and 97, N 64-256,
        depth 1-3, within 16%; tests/test_deeper_families.py measures it again); glibc's default allocator
        fragments it, so a CPU process's resident peak runs up to twice this."""
        return 4 * d * ((settings.depth * (3 if settings.batchnorm else 1) + 1) * width + 4 * settings.p)

    def eval_bytes(self, settings, width):
        return 4 * (2 * width + 3 * settings.p) + 6 * 8

    def row_bytes(self, settings, width):
        return 4 * max(width, settings.p)

    def flops(self, settings, width, d):
        """6 D ((depth - 1) N^2 + N p): the hidden layers and the readout (the first layer is a gather)."""
        return 6 * d * ((settings.depth - 1) * width * width + width * settings.p)


DEEP_MLP = register(DeepOneHotMLP())
