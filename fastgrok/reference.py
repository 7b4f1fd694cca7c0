"""The reference: each model family of the paper as a plain nn.Module trained with torch.optim. The math lives here:
the 2-layer one-hot MLP (MLP, below), the deeper ReLU MLP (DeepMLP) and the encoder-only transformer (Transformer)
of the paper's Fig. 7. The 2-layer MLP:

    f(m, n) = W phi(U e_m + V e_n)        U, V: (N, p), W: (p, N), no biases
    phi(x)  = x^2 ("quad", the paper's) or max(x, 0) ("relu"); the deeper families take relu or tanh-GELU
    U, V, W ~ Normal(0, std = 0.5 / (2N)^(1/3))
    on S operands (the sequel's many-term tasks, --terms S):
    f(x_1..x_S) = W phi(U_1 e_x1 + ... + U_S e_xS), phi(x) = x^S ("pow"), U_1..U_S, W drawn as above in order
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
    "gelu": lambda x: F.gelu(x, approximate="tanh"),  # the transformer authors' GELU
}
ACT_NAMES = (*ACTIVATIONS, "pow")  # pow: x^S on S operands (x^2 on two, as quad)
LOSSES = ("mse", "ce")
OPTIMIZERS = ("adamw", "adam", "sgd")


def check_choice(kind: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")


def init_std(width: int) -> float:
    return 0.5 / (2 * width) ** (1 / 3)


def activation(act: str, terms: int = 2):
    """phi by name: ACTIVATIONS', or pow, x^S on S operands."""
    check_choice("activation", act, ACT_NAMES)
    return (lambda x: x**terms) if act == "pow" else ACTIVATIONS[act]


def input_names(terms: int) -> tuple[str, ...]:
    """The first layer's matrices of an MLP on `terms` operands: the paper's U and V, or U1..US."""
    return ("U", "V") if terms == 2 else tuple(f"U{k}" for k in range(1, terms + 1))


def init_weights(p: int, width: int, generator: torch.Generator, terms: int = 2) -> tuple[torch.Tensor, ...]:
    """U, V (or U1..US): (N, p) each, then W: (p, N), drawn in that order from `generator` (fp32, CPU)."""
    std = init_std(width)
    inputs = [torch.randn(width, p, generator=generator) * std for _ in range(terms)]
    return (*inputs, torch.randn(p, width, generator=generator) * std)


def per_example_loss(out: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss of each example: out (..., p), labels (...) -> (...). MSE averages over the p outputs."""
    if loss == "mse":  # the one-hot target by comparison: F.one_hot checks its labels on the host, which vmap
        # refuses, and vmap has no batching rule for an in-place scatter (it would loop over the models)
        target = (labels[..., None] == torch.arange(out.shape[-1], device=out.device)).to(out.dtype)
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
                 generator: torch.Generator | None = None, batchnorm: bool = False, terms: int = 2):
        super().__init__()
        self.phi = activation(act, terms)
        drawn = init_weights(p, width, generator if generator is not None else torch.Generator().manual_seed(0), terms)
        self.inputs = input_names(terms)
        for name, value in zip((*self.inputs, "W"), drawn):
            setattr(self, name, nn.Parameter(value))
        self.bn = nn.BatchNorm1d(width) if batchnorm else None
        self.act, self.dropout = act, dropout

    def preactivation(self, *operands: torch.Tensor) -> torch.Tensor:
        """(D, N): U e_m + V e_n (U_1 e_x1 + ... + U_S e_xS) for each example."""
        return sum(getattr(self, name)[:, x].T for name, x in zip(self.inputs, operands, strict=True))

    def forward(self, *operands: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(D,) indices of each operand (m, n) -> (D, p) outputs. `mask` (D, N) replaces the drawn dropout mask
        (for parity tests)."""
        pre = self.preactivation(*operands)
        if self.training and self.dropout > 0:
            pre = pre * (mask if mask is not None else dropout_mask(pre.shape, self.dropout, device=pre.device))
        h = self.phi(pre)
        if self.bn is not None:
            h = self.bn(h)
        return h @ self.W.T


DEEP_INITS = ("he", "lazy")  # the deep MLP's parameterisations (DeepMLP)


class DeepMLP(nn.Module):
    """The paper's deeper ReLU MLP (its Fig. 7b: depth 3, width 500):

        h_1 = phi(U e_m + V e_n)                      the first layer sees the one-hot pair e_m (+) e_n
        h_k = phi(H_k h_{k-1})      k = 2..depth      (N, N) hidden layers
        f   = W h_depth                               W: (p, N); no biases anywhere

    init "he" (the standard parameterisation, the default): He-normal fan-in, U and V ~ N(0, 2 / 2p) (the first
    layer's fan-in is the 2p inputs), H_k and W ~ N(0, 2 / N); "lazy" (To grok's App. G.3): every layer
    ~ N(0, 2 / N^(2/3)), a lazier training regime; drawn in that order. Dropout (rate r) acts on each hidden
    pre-activation, as the 2-layer MLP's; a mask is (D, depth N), layer k's in columns [(k - 1) N, k N). BatchNorm
    (optional) acts after each activation, h_k = BN_k(phi(.)), torch.nn.BatchNorm1d's defaults as the 2-layer MLP's."""

    def __init__(self, p: int, width: int, depth: int = 3, act: str = "relu", dropout: float = 0.0,
                 generator: torch.Generator | None = None, batchnorm: bool = False, init: str = "he"):
        super().__init__()
        check_choice("init", init, DEEP_INITS)
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        lazy = 2.0 / width ** (2 / 3)
        first, rest = (lazy, lazy) if init == "lazy" else (2.0 / (2 * p), 2.0 / width)
        normal = lambda shape, var: torch.randn(shape, generator=g) * var**0.5  # noqa: E731
        self.U, self.V = (nn.Parameter(normal((width, p), first)) for _ in range(2))
        self.H = nn.ParameterList([nn.Parameter(normal((width, width), rest)) for _ in range(depth - 1)])
        self.W = nn.Parameter(normal((p, width), rest))
        self.bn = nn.ModuleList([nn.BatchNorm1d(width) for _ in range(depth)]) if batchnorm else None
        self.act, self.dropout, self.width = act, dropout, width

    def forward(self, m: torch.Tensor, n: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        pre = self.U[:, m].T + self.V[:, n].T
        if self.training and self.dropout > 0 and mask is None:
            mask = dropout_mask((len(m), self.width * (len(self.H) + 1)), self.dropout, device=pre.device)
        for k in range(len(self.H) + 1):
            if self.training and self.dropout > 0:
                pre = pre * mask[:, k * self.width : (k + 1) * self.width]
            h = ACTIVATIONS[self.act](pre)
            if self.bn is not None:
                h = self.bn[k](h)
            if k < len(self.H):
                pre = h @ self.H[k].T
        return h @ self.W.T


SCALES = {"mup": 1.0, "sp": 0.0}  # the transformer's s: output scale d^-(1+s)/2, attention d_head^-(1+s)/2


def transformer_names(layers: int, layernorm: bool, tie: bool = False) -> list[str]:
    """The transformer's tensors in the order they are drawn (the authors' module order): the token and position
    embeddings, each block's attention (q, k, v from one map, then the output map) and MLP (in, out), LayerNorms'
    weights and biases where asked for, and the unembedding unless it is the token embedding (tie)."""
    names = ["embed", "pos"]
    for k in range(layers):
        names += [f"block{k}_qkv", f"block{k}_out", f"block{k}_fc", f"block{k}_proj"]
        if layernorm:
            names += [f"block{k}_ln{j}_{w}" for j in (1, 2) for w in ("weight", "bias")]
    if layernorm:
        names += ["final_ln_weight", "final_ln_bias"]
    return names + ([] if tie else ["unembed"])


def transformer_shapes(p: int, d: int, layers: int, layernorm: bool, tie: bool = False) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, linear maps as nn.Linear holds them (out, in); the MLP is 4 d wide."""
    shapes = {"embed": (p, d), "pos": (2, d), "unembed": (p, d)}
    for k in range(layers):
        shapes |= {f"block{k}_qkv": (3 * d, d), f"block{k}_out": (d, d), f"block{k}_fc": (4 * d, d),
                   f"block{k}_proj": (d, 4 * d)}
    return {name: shapes.get(name, (d,)) for name in transformer_names(layers, layernorm, tie)}


def transformer_init(p: int, d: int, layers: int, layernorm: bool, generator: torch.Generator,
                     tie: bool = False) -> dict[str, torch.Tensor]:
    """The authors' init: embeddings ~ N(0, 1), linear maps Kaiming-normal for a linear layer, N(0, 1 / fan_in),
    LayerNorms weight 1 and bias 0; drawn in transformer_names' order (a tied unembedding is the embedding as
    drawn)."""
    out = {}
    for name, shape in transformer_shapes(p, d, layers, layernorm, tie).items():
        if name in ("embed", "pos"):
            out[name] = torch.randn(shape, generator=generator)
        elif "_ln" in name:
            out[name] = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        else:
            out[name] = torch.randn(shape, generator=generator) / shape[1] ** 0.5
    return out


def transformer_units(d: int, layers: int, heads: int) -> int:
    """Entries of one example's dropout mask: the embeddings (2 d), then per block the attention weights
    (heads x 2 x 2), the attention's output and the MLP's output (2 d each): where the authors' code drops."""
    return 2 * d + layers * (heads * 4 + 4 * d)


class Transformer(nn.Module):
    """The authors' encoder-only transformer (their utils/models.py, EncoderOnlyTransformers), on the pair (m, n):

        x      = E[m, n] + P                                  (2, d): token and learned position embeddings
        x      = x + O attention(x),  x = x + Proj phi(Fc x)   per block; residual scale 1, no biases
        logits = c U x[last]                                   c = d^-(1+s)/2, U: the unembedding (p, d),
                                                               or with tie the token embedding E (weight tying)

    Multi-head attention without a mask: q, k, v = Qkv x split into `heads` heads of d_head, weights
    softmax(q k^T / d_head^((1+s)/2)). s = 1 (muP, the authors' notebook) or 0 (standard). With layernorm, a
    LayerNorm (eps 1e-5) before attention, before the MLP and before the readout. Dropout (rate r) on the summed
    embeddings, the attention weights, the attention's output and the MLP's output (transformer_units)."""

    def __init__(self, p: int, d: int, layers: int = 1, heads: int = 4, act: str = "relu", dropout: float = 0.0,
                 layernorm: bool = False, scale: str = "mup", generator: torch.Generator | None = None,
                 tie: bool = False):
        super().__init__()
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.w = nn.ParameterDict({k: nn.Parameter(v) for k, v in
                                   transformer_init(p, d, layers, layernorm, g, tie).items()})
        self.readout = "embed" if tie else "unembed"
        self.d, self.layers, self.heads, self.act, self.dropout, self.layernorm = d, layers, heads, act, dropout, layernorm
        s = SCALES[scale]
        self.out_scale, self.attention_power = d ** (-(1 + s) / 2), (1 + s) / 2
        self.no_decay = {f"w.{k}" for k in self.w if "_ln" in k}  # LayerNorms take no weight decay

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if not self.layernorm:
            return x
        return F.layer_norm(x, (self.d,), self.w[f"{name}_weight"], self.w[f"{name}_bias"], eps=1e-5)

    def forward(self, m: torch.Tensor, n: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        w, d, H = self.w, self.d, self.heads
        D, dh = len(m), d // H
        drop = self.training and self.dropout > 0
        if drop and mask is None:
            mask = dropout_mask((D, transformer_units(d, self.layers, H)), self.dropout, device=m.device)
        x = w["embed"][torch.stack([m, n], 1)] + w["pos"]  # (D, 2, d)
        if drop:
            x = x * mask[:, : 2 * d].view(D, 2, d)
        at = 2 * d
        for k in range(self.layers):
            q, key, v = (self._ln(x, f"block{k}_ln1") @ w[f"block{k}_qkv"].T).split(d, -1)
            q, key, v = (t.view(D, 2, H, dh).transpose(1, 2) for t in (q, key, v))  # (D, H, 2, dh)
            weights = torch.softmax(q @ key.transpose(-1, -2) / dh**self.attention_power, -1)
            if drop:
                weights = weights * mask[:, at : at + 4 * H].view(D, H, 2, 2)
            y = (weights @ v).transpose(1, 2).reshape(D, 2, d) @ w[f"block{k}_out"].T
            if drop:
                y = y * mask[:, at + 4 * H : at + 4 * H + 2 * d].view(D, 2, d)
            x = x + y
            h = ACTIVATIONS[self.act](self._ln(x, f"block{k}_ln2") @ w[f"block{k}_fc"].T) @ w[f"block{k}_proj"].T
            if drop:
                h = h * mask[:, at + 4 * H + 2 * d : at + 4 * H + 4 * d].view(D, 2, d)
            x = x + h
            at += 4 * H + 4 * d
        return self.out_scale * (self._ln(x, "final_ln")[:, -1] @ w[self.readout].T)


def make_optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-2, wd: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8) -> torch.optim.Optimizer:
    """Weight decay: decoupled for AdamW, added to the gradient (L2) for Adam and SGD, as torch does; none on the
    parameters a model names in `no_decay` (a transformer's LayerNorms)."""
    check_choice("optimizer", name, OPTIMIZERS)
    skip = getattr(model, "no_decay", set())
    named = list(model.named_parameters())
    params = [{"params": [p for k, p in named if k not in skip]},
              {"params": [p for k, p in named if k in skip], "weight_decay": 0.0}]
    params = [group for group in params if group["params"]]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    return torch.optim.SGD(params, lr=lr, weight_decay=wd, foreach=False)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, operands, labels, loss: str = "mse",
               mask: torch.Tensor | None = None) -> float:
    """One step on the examples (operands: (m, n), or an (S, D) tensor; labels): the training set or a minibatch;
    returns the loss before the update."""
    model.train()
    opt.zero_grad(set_to_none=True)
    value = per_example_loss(model(*operands, mask=mask), labels, loss).mean()
    value.backward()
    opt.step()
    return value.item()


@torch.no_grad()
def accuracy(model: nn.Module, operands, labels) -> float:
    model.eval()
    return (model(*operands).argmax(-1) == labels).float().mean().item()
