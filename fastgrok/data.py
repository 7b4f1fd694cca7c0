"""Modular-arithmetic tasks, train/test splits and label corruption, as index tensors.

A task is every valid pair (m, n) of residues mod p with its label z = (m op n) mod p: a named op (OPS) or any
polynomial in x = m, y = n (fastgrok.polynomials). A model's data is
that table shuffled with its split seed: the first int(alpha * P) pairs train, the rest test (P = number of
pairs). Its first int(xi * D) training examples have their labels replaced (paper: drawn uniformly from all
p labels, so a drawn label equals the true one with probability 1/p). Labels are drawn for all D training
examples from the noise seed before the first int(xi * D) are used, so for one split and noise seed the
corrupted sets are nested across xi. Test labels are never corrupted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastgrok.errors import ConfigError

OPS = {
    "add": "x + y",
    "sub": "x - y",
    "mul": "x * y",
    "div": "x / y (y != 0, p prime)",
    "x2y2": "x^2 + y^2",
    "x2xyy2": "x^2 + x y + y^2",
}
# the named ops as polynomials (fastgrok.polynomials); div is not one: it leaves out the pairs with y = 0
POLYNOMIALS = {"add": "x+y", "sub": "x-y", "mul": "x*y", "x2y2": "x^2+y^2", "x2xyy2": "x^2+x*y+y^2"}
NOISES = {
    "uniform": "labels drawn uniformly from all p (the paper's)",
    "wrong": "labels drawn uniformly from the p - 1 wrong ones",
}


def is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p**0.5) + 1))


def check_task(op: str, p: int) -> None:
    """A named op (OPS) or a polynomial in x, y (fastgrok.polynomials) defined on every pair mod p."""
    if p < 2:
        raise ConfigError(f"p must be at least 2, got {p}")
    if op == "div" and not is_prime(p):
        raise ConfigError(f"div needs a prime p (every nonzero n invertible); {p} is not prime")
    if op not in OPS:
        task_table(op, p)  # a polynomial: read, and evaluated on every pair (a divisor that can be 0 is refused)


def pair_count(op: str, p: int) -> int:
    """The number of valid pairs of a task, without building its table: p^2, or p (p - 1) for div."""
    check_task(op, p)
    return p * (p - 1) if op == "div" else p * p


def task_table(op: str, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All valid pairs in canonical order (m major): m, n, z as int64 tensors of length P."""
    from fastgrok import polynomials

    if p < 2:
        raise ConfigError(f"p must be at least 2, got {p}")
    m, n = (t.reshape(-1) for t in torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij"))
    if op == "div":
        if not is_prime(p):
            raise ConfigError(f"div needs a prime p (every nonzero n invertible); {p} is not prime")
        keep = n != 0
        m, n = m[keep], n[keep]
        inverse = torch.tensor([0] + [pow(k, p - 2, p) for k in range(1, p)])
        return m, n, m * inverse[n] % p
    if op not in OPS and not any(c in op for c in "xy0123456789"):
        raise ConfigError(f"unknown op {op!r}; choose one of {', '.join(OPS)}, or give a polynomial in x, y such as "
                          "x^2+y^2")
    tree = polynomials.parse(POLYNOMIALS.get(op, op))
    if polynomials.has_division(tree) and not is_prime(p):
        raise ConfigError(f"--op {op!r} divides, which needs a prime p (every nonzero residue invertible); {p} is "
                          "not prime")
    return m, n, polynomials.evaluate(tree, (m, n), p)


def stream_seed(seed: int, stream: str, *index: int) -> int:
    """A 63-bit seed for one named random stream of a model (split, noise, init, dropout, batches), and for
    numbered sub-streams of it (the batches of each epoch): independent streams."""
    tag = int.from_bytes(stream.encode()[:8].ljust(8, b"\0"), "little")
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, tag, *index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(seed: int, stream: str, *index: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, stream, *index))


def epoch_order(seed: int, epoch: int, size: int) -> torch.Tensor:
    """Minibatch training: the order (a permutation of the training slots 0..size-1) in which a model of this seed
    visits its training set in `epoch`. Batches are consecutive runs of batch_size slots of it; the remainder
    of an epoch is dropped, so every batch is full (BatchNorm needs two examples or more)."""
    return torch.randperm(size, generator=generator(seed, "batches", epoch))


def batch_slots(seed: int, size: int, batch_size: int, step: int) -> torch.Tensor:
    """The training slots a model (seed, `size` training examples) trains on at `step` (counting from 0)."""
    per_epoch = size // batch_size
    first = (step % per_epoch) * batch_size
    return epoch_order(seed, step // per_epoch, size)[first : first + batch_size]


def train_size(num_pairs: int, alpha: float) -> int:
    return int(alpha * num_pairs)


def checked_train_size(num_pairs: int, alpha: float) -> int:
    """train_size, or a ConfigError when it leaves no training or no test pair."""
    d = train_size(num_pairs, alpha)
    if d < 1 or d >= num_pairs:
        raise ConfigError(f"alpha {alpha} leaves {d} of {num_pairs} pairs for training: need at least one train and one test pair")
    return d


def check_training_sets(alphas, settings) -> None:
    """Every alpha leaves at least one training and one test pair, and its training set holds at least one
    batch: checked before a run writes anything."""
    num_pairs = pair_count(settings.op, settings.p)
    for alpha in sorted(set(alphas)):
        d = checked_train_size(num_pairs, alpha)
        if settings.batch_size is not None and d < settings.batch_size:
            raise ConfigError(f"--batch-size {settings.batch_size} is larger than the training set of alpha "
                              f"{alpha:g} ({d} examples)")


def corrupted_count(train_size: int, xi: float) -> int:
    return int(xi * train_size)


@dataclass(frozen=True)
class Split:
    """One model's data. perm: (P,) pair indices, training pairs first; labels: (D,) training labels as
    trained on (the first n_corrupt of them replaced)."""

    perm: torch.Tensor
    labels: torch.Tensor
    n_corrupt: int

    @property
    def size(self) -> int:
        return self.labels.numel()


def make_split(z: torch.Tensor, p: int, alpha: float, xi: float, split_seed: int, noise_seed: int,
               noise: str = "uniform") -> Split:
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha (train fraction) must be in (0, 1), got {alpha}")
    if not 0.0 <= xi <= 1.0:
        raise ConfigError(f"xi (corrupted fraction) must be in [0, 1], got {xi}")
    if noise not in NOISES:
        raise ConfigError(f"unknown noise {noise!r}; choose one of {', '.join(NOISES)}")
    num_pairs = z.numel()
    d = checked_train_size(num_pairs, alpha)
    perm = torch.randperm(num_pairs, generator=generator(split_seed, "split"))
    labels = z[perm[:d]].clone()
    c = corrupted_count(d, xi)
    g = generator(noise_seed, "noise")
    if noise == "uniform":
        drawn = torch.randint(0, p, (d,), generator=g)
    else:
        drawn = (labels + torch.randint(1, p, (d,), generator=g)) % p
    labels[:c] = drawn[:c]
    return Split(perm=perm, labels=labels, n_corrupt=c)
