"""The reference: one model of the paper as a plain nn.Module trained with torch.optim. The math lives here.

    f(m, n) = W phi(U e_m + V e_n)        U, V: (N, p), W: (p, N), no biases
    phi(x)  = x^2 ("quad", the paper's) or max(x, 0) ("relu")
    U, V, W ~ Normal(0, std = 0.5 / (2N)^(1/3))
    dropout (rate r) acts on the pre-activation: W phi(dropout(U e_m + V e_n)), off at evaluation
    BatchNorm (optional) acts after the activation: W BN(phi(U e_m + V e_n)), torch.nn.BatchNorm1d's defaults
      (affine, eps 1e-5, momentum 0.1): batch statistics in training, running statistics at evaluation
    MSE loss  = mean over the D examples and p outputs of (f - onehot(label))^2
    CE loss   = mean over the D examples of cross_entropy(f, label)
    AdamW(lr 1e-2, betas (0.9, 0.98), eps 1e-8), decoupled weight decay (param *= 1 - lr wd first), on every
      parameter (U, V, W and BatchNorm's weight and bias)
    a step sees the whole training set (full batch, the paper's default) or a minibatch of it
      (fastgrok.data.batch_slots: reshuffled every epoch, the remainder dropped)

One-hot inputs make the first layer a gather: U e_m is column m of U. Every backend (fastgrok.population,
the Triton kernels) is tested against this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastgrok.errors import ConfigError

ACTIVATIONS = {
    "quad": lambda x: x * x,
    "relu": torch.relu,
}
LOSSES = ("mse", "ce")
OPTIMIZERS = ("adamw", "adam", "sgd")


def check_choice(kind: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")


def init_std(width: int) -> float:
    return 0.5 / (2 * width) ** (1 / 3)


def init_weights(p: int, width: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, V: (N, p), W: (p, N), drawn in that order from `generator` (fp32, CPU)."""
    std = init_std(width)
    u = torch.randn(width, p, generator=generator) * std
    v = torch.randn(width, p, generator=generator) * std
    w = torch.randn(p, width, generator=generator) * std
    return u, v, w


def per_example_loss(out: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss of each example: out (..., p), labels (...) -> (...). MSE averages over the p outputs."""
    if loss == "mse":
        target = F.one_hot(labels, out.shape[-1]).to(out.dtype)
        return ((out - target) ** 2).mean(-1)
    if loss == "ce":
        return F.cross_entropy(out.flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
    raise ConfigError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def dropout_mask(shape, rate: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Inverted-dropout mask: 0 with probability `rate`, else 1 / (1 - rate)."""
    keep = torch.rand(shape, generator=generator, device=device) >= rate
    return keep.float() / (1.0 - rate)


class MLP(nn.Module):
    def __init__(self, p: int, width: int, act: str = "quad", dropout: float = 0.0,
                 generator: torch.Generator | None = None, batchnorm: bool = False):
        super().__init__()
        check_choice("activation", act, ACTIVATIONS)
        u, v, w = init_weights(p, width, generator if generator is not None else torch.Generator().manual_seed(0))
        self.U, self.V, self.W = nn.Parameter(u), nn.Parameter(v), nn.Parameter(w)
        self.bn = nn.BatchNorm1d(width) if batchnorm else None
        self.act, self.dropout = act, dropout

    def preactivation(self, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return self.U[:, m].T + self.V[:, n].T  # (D, N): U e_m + V e_n for each example

    def forward(self, m: torch.Tensor, n: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(D,) indices -> (D, p) outputs. `mask` (D, N) replaces the drawn dropout mask (for parity tests)."""
        pre = self.preactivation(m, n)
        if self.training and self.dropout > 0:
            pre = pre * (mask if mask is not None else dropout_mask(pre.shape, self.dropout, device=pre.device))
        h = ACTIVATIONS[self.act](pre)
        if self.bn is not None:
            h = self.bn(h)
        return h @ self.W.T


def make_optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-2, wd: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8) -> torch.optim.Optimizer:
    """Weight decay: decoupled for AdamW, added to the gradient (L2) for Adam and SGD, as torch does."""
    check_choice("optimizer", name, OPTIMIZERS)
    params = model.parameters()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    return torch.optim.SGD(params, lr=lr, weight_decay=wd, foreach=False)


def train_step(model: MLP, opt: torch.optim.Optimizer, m, n, labels, loss: str = "mse",
               mask: torch.Tensor | None = None) -> float:
    """One step on the examples (m, n, labels): the training set or a minibatch; returns the loss before the update."""
    model.train()
    opt.zero_grad(set_to_none=True)
    value = per_example_loss(model(m, n, mask), labels, loss).mean()
    value.backward()
    opt.step()
    return value.item()


@torch.no_grad()
def accuracy(model: MLP, m, n, labels) -> float:
    model.eval()
    return (model(m, n).argmax(-1) == labels).float().mean().item()
