"""The paper's deeper ReLU MLP (fastgrok.reference.DeepMLP; its Fig. 7b: depth 3, width 500), as a population.

Population layout: U, V (B, p, N), so that the first layer is a gather of rows (U e_m is U[b, m], as the 2-layer
MLP's); each hidden layer Hk (B, N, N) and the readout W (B, N, p) in (in, out) layout, so that a layer is one
batched matmul h @ Hk over every model. Model b is the reference DeepMLP with U = U[b].T, V = V[b].T, Hk = Hk[b].T,
W = W[b].T. The step is autograd through this batched forward (Family.grads).

IPR and pruning work on the first layer's neurons: neuron k's input weights over the p residues of each operand
(U[b, :, k], V[b, :, k]) and, where the first layer is the last hidden one (depth 1), its readout weights
W[b, k, :]. A pruned neuron's U and V columns are zero, so its activation is phi(0) = 0 in every example.
"""

from __future__ import annotations

import torch

from fastgrok import reference
from fastgrok.errors import ConfigError
from fastgrok.families import Family, Spec, register
from fastgrok.families.mlp import pre_activation


class DeepOneHotMLP(Family):
    name = "deep-mlp"
    options = ("depth",)
    about = "W phi(H_k ... phi(U e_m + V e_n)): --depth ReLU layers of width N, no biases (the paper's Fig. 7b)"

    def check(self, settings):
        super().check(settings)
        if settings.depth < 1:
            raise ConfigError(f"--depth must be at least 1, got {settings.depth}")

    def tensors(self, settings, width):
        p = settings.p
        hidden = {f"H{k}": Spec((width, width)) for k in range(1, settings.depth)}
        return {"U": Spec((p, width)), "V": Spec((p, width)), **hidden, "W": Spec((width, p))}

    def init(self, settings, width, generator):
        net = reference.DeepMLP(settings.p, width, settings.depth, settings.act, generator=generator)
        return {"U": net.U.data.T, "V": net.V.data.T, **{f"H{k + 1}": h.data.T for k, h in enumerate(net.H)},
                "W": net.W.data.T}

    def forward(self, t, x, settings, mask=None):
        width = t["U"].shape[-1]
        act = reference.ACTIVATIONS[settings.act]
        pre = pre_activation((t["U"], t["V"]), x)
        for k in range(settings.depth):
            if mask is not None:
                pre = pre * mask[..., k * width : (k + 1) * width]
            h = act(pre)
            if k + 1 < settings.depth:
                pre = torch.bmm(h, t[f"H{k + 1}"])
        return torch.bmm(h, t["W"])

    def reference(self, settings, hyper, t):
        width = t["U"].shape[-1]
        net = reference.DeepMLP(settings.p, width, settings.depth, settings.act, hyper.dropout)
        with torch.no_grad():
            net.U.copy_(t["U"].T)
            net.V.copy_(t["V"].T)
            for k, h in enumerate(net.H):
                h.copy_(t[f"H{k + 1}"].T)
            net.W.copy_(t["W"].T)
        return net

    def dropout_units(self, settings, width):
        return settings.depth * width

    def ipr_parts(self, t):
        parts = {"u": (t["U"], 1), "v": (t["V"], 1)}
        if "H1" not in t:  # the first layer is the last hidden one: its readout weights are over the p outputs
            parts["w"] = (t["W"], 2)
        return parts

    def prune(self, t, keep):
        return {**t, "U": t["U"] * keep[:, None, :], "V": t["V"] * keep[:, None, :]}

    def step_bytes(self, settings, width, d):
        """What autograd keeps and the backward adds, per example: (depth + 1) N + 4 p floats, the activation each
        layer saves and the logits' loss terms. Fitted to the live memory of a step on the CPU (p 41 and 97, N 64-256,
        depth 1-3, within 16%; tests/test_deeper_families.py measures it again); glibc's default allocator
        fragments it, so a CPU process's resident peak runs up to twice this."""
        return 4 * d * ((settings.depth + 1) * width + 4 * settings.p)

    def eval_bytes(self, settings, width):
        return 4 * (2 * width + 3 * settings.p) + 6 * 8

    def row_bytes(self, settings, width):
        return 4 * max(width, settings.p)

    def flops(self, settings, width, d):
        """6 D ((depth - 1) N^2 + N p): the hidden layers and the readout (the first layer is a gather)."""
        return 6 * d * ((settings.depth - 1) * width * width + width * settings.p)


DEEP_MLP = register(DeepOneHotMLP())
